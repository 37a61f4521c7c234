"""Input safety (issues 8 and 15): nothing read is trusted until checked, and a few kilobytes never cost gigabytes.

Every test here failed on the tree before the fix it guards (its ``Defect:`` line says what it did).
Memory is asserted with tracemalloc (python-zstandard and json allocate through Python's allocator), as the
fuzz tests of the safetensors reader do.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from safetensors.torch import save_file

import rlsubnet
from rlsubnet.deltas import DeltaError, DeltaPublisher, apply_delta
from rlsubnet.deltas.format import END, PatchReader, checkpoint_hash
from rlsubnet.deltas.live import DirectorySink, ReceiveError, receive_directory
from rlsubnet.deltas.patch import apply, create, info, verify
from rlsubnet.io import InputError, open_checkpoint
from rlsubnet.io.guard import MARKER
from rlsubnet.masks import Subnetwork, overlap
from rlsubnet.masks.verify import verify_frozen

from conftest import bump_ulps, clean_error, run, save_folder, small_lm

MB = 1 << 20


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"model.embed_tokens.weight": torch.randn(64, 32, generator=g).bfloat16(),
            "model.layers.0.mlp.up_proj.weight": torch.randn(32, 32, generator=g).bfloat16()}


def _tuned(sd, n=7):
    out = {k: v.clone() for k, v in sd.items()}
    bump_ulps(out["model.layers.0.mlp.up_proj.weight"], torch.arange(n) * 3, 1)
    return out


@pytest.fixture
def patched(tmp_path):
    """(base folder, tuned folder, patch path) of a small real pair."""
    a = save_folder(tmp_path / "a", _model(), config={"model_type": "llama"})
    b = save_folder(tmp_path / "b", _tuned(_model()), config={"model_type": "llama", "x": 1})
    p = tmp_path / "p.rlspatch"
    create(a, b, p)
    return a, b, p


def _parts(data: bytes) -> tuple[bytes, dict]:
    """(blob area with magic, header) of a patch."""
    (n,) = struct.unpack("<Q", data[-16:-8])
    return data[: len(data) - 16 - n], json.loads(zstandard.ZstdDecompressor().decompress(data[len(data) - 16 - n : -16]))


def _assemble(blobs: bytes, header: dict | bytes, write_content_size: bool = True) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    comp = zstandard.ZstdCompressor(write_content_size=write_content_size).compress(text)
    return blobs + comp + struct.pack("<Q", len(comp)) + END


def _peak(fn) -> tuple[object, int]:
    """(result or exception, peak bytes traced) of ``fn()``."""
    tracemalloc.start()
    try:
        try:
            r = fn()
        except Exception as e:
            r = e
        return r, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _bomb_blob(patch: bytes, size: int = 512 * MB, content_size: bool = True) -> bytes:
    """The patch with its first values blob replaced by a frame of ``size`` zero bytes (a few KB compressed)."""
    blobs, h = _parts(patch)
    bomb = zstandard.ZstdCompressor(level=1, write_content_size=content_size).compress(b"\0" * size)
    v = h["tensors"][[i for i, t in enumerate(h["tensors"]) if t["chunks"]][0]]["chunks"][0]["values"]
    v["off"], v["len"] = len(blobs), len(bomb)
    return _assemble(blobs + bomb, h)


# -- decompression bombs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("content_size", [True, False])
def test_blob_bomb_is_refused_in_bounded_memory(patched, tmp_path, content_size):
    """Defect: max_output_size is ignored when a frame records its content size; a 39 KB patch took
    verify/apply to 1.3 GB before refusing."""
    a, _, p = patched
    bomb = tmp_path / "bomb.rlspatch"
    bomb.write_bytes(_bomb_blob(p.read_bytes(), content_size=content_size))
    assert bomb.stat().st_size < 200_000
    r, peak = _peak(lambda: verify(a, [bomb]))
    assert isinstance(r, InputError) and "data block" in r.message, r
    assert peak < 16 * MB, peak
    r, peak = _peak(lambda: apply(a, [bomb], tmp_path / "out"))
    assert isinstance(r, InputError) and peak < 16 * MB and not (tmp_path / "out").exists()


def test_live_payload_bomb_is_refused_in_bounded_memory():
    """Defect: a 34 KB live payload drove apply_delta to 1.25 GB."""
    target = _model()
    pub = DeltaPublisher({k: v.clone() for k, v in target.items()}, dtype=None)
    pub.model.update(_tuned(target))
    payload = _bomb_blob(pub.delta())
    before = {k: v.clone() for k, v in target.items()}
    r, peak = _peak(lambda: apply_delta(target, payload))
    assert isinstance(r, DeltaError) and peak < 16 * MB, (r, peak)
    assert all(torch.equal(target[k], before[k]) for k in target)


@pytest.mark.parametrize("content_size", [True, False])
def test_header_bomb_is_refused_before_parsing(patched, tmp_path, content_size):
    """Defect: a 28 KB header holding 250 MB of `{},` (inside the 256 MB header limit) cost 6.9 GB of objects."""
    _, _, p = patched
    blobs, h = _parts(p.read_bytes())
    text = json.dumps(h).encode()[:-1] + b', "pad": [' + b"{}," * (80 * MB // 3) + b"{}]}"
    bomb = tmp_path / "hbomb.rlspatch"
    bomb.write_bytes(_assemble(blobs, text, write_content_size=content_size))
    assert bomb.stat().st_size < 100_000
    r, peak = _peak(lambda: info(bomb))
    assert isinstance(r, InputError) and "header" in r.message, r
    assert peak < 24 * MB, peak


def test_header_with_many_objects_in_few_bytes_is_refused(patched, tmp_path):
    """Defect: the header limit bounded bytes, not parsed objects: 300 KB of `{},` parses to ~100k dicts."""
    _, _, p = patched
    blobs, h = _parts(p.read_bytes())
    h["pad"] = [{}] * 100_000
    bomb = tmp_path / "objs.rlspatch"
    bomb.write_bytes(_assemble(blobs, h))
    with pytest.raises(InputError, match="more than a patch header can"):
        info(bomb)


# -- what a header claims is checked ----------------------------------------------------------------------
def _rewrite(p: Path, dest: Path, edit) -> Path:
    blobs, h = _parts(p.read_bytes())
    edit(h)
    dest.write_bytes(_assemble(blobs, h))
    return dest


@pytest.mark.parametrize("name", ["model.safetensors", "model.safetensors.index.json", ".rlsubnet-output.json",
                                  "pytorch_model.bin", "a\x00b", "../config.json", "x\x1b[31m"])
def test_carried_file_may_not_name_weights(patched, tmp_path, name):
    """Defect: a side file named model.safetensors was written over the verified weights; verify said OK."""
    a, _, p = patched

    def edit(h):
        h["files"][0]["name"] = name

    bad = _rewrite(p, tmp_path / "side.rlspatch", edit)
    r = run("patch", "verify", a, bad, "-q")
    assert r.returncode == 2 and "carried file" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run("patch", "apply", a, bad, "-o", tmp_path / "out", "-q")
    assert r.returncode == 2 and not (tmp_path / "out").exists()


def test_verify_checks_carried_files(patched, tmp_path):
    """Defect: verify never read the carried files, so a tampered config passed verify and failed apply."""
    a, _, p = patched
    data = bytearray(p.read_bytes())
    _, h = _parts(bytes(data))
    f = h["files"][0]
    (tmp_path / "f.rlspatch").write_bytes(_rewrite_file_hash(bytes(data), "0" * 64))
    r = run("patch", "verify", a, tmp_path / "f.rlspatch", "-q")
    assert r.returncode == 1 and "MISMATCH" in r.stdout and f["name"] in r.stdout


def _rewrite_file_hash(data: bytes, digest: str) -> bytes:
    blobs, h = _parts(data)
    h["files"][0]["sha256"] = digest
    return _assemble(blobs, h)


def test_forged_checkpoint_hash_is_refused_and_printed_hash_is_computed(patched, tmp_path):
    """Defect: the printed 'reproduces sha256:...' was copied from the header; chains linked unverified strings."""
    a, b, p = patched

    def forge(h):
        h["result"]["hash"] = "sha256:" + "ab" * 32

    bad = _rewrite(p, tmp_path / "forged.rlspatch", forge)
    with pytest.raises(InputError, match="result hash is not the hash of the tensors"):
        PatchReader(bad)
    # the reported hash is computed from the bytes produced: equal to the tuned checkpoint's, hashed independently
    import hashlib

    from safetensors import safe_open

    with safe_open(str(b / "model.safetensors"), framework="pt") as f:
        ents = []
        for k in f.keys():
            t = f.get_tensor(k)
            raw = t.view(torch.int16).numpy().tobytes()
            ents.append((k, "BF16", tuple(t.shape), hashlib.sha256(raw).hexdigest()))
    assert verify(a, [p])["result"] == checkpoint_hash(ents)
    r = run("patch", "verify", a, p, "-q")
    assert r.returncode == 0 and checkpoint_hash(ents)[:23] in r.stdout


def test_chain_whose_second_patch_lacks_a_tensor(tmp_path):
    """Defect: a chain whose second patch lacked a tensor ended in KeyError."""
    s0 = _model()
    s1 = _tuned(s0)
    save_folder(tmp_path / "s0", s0)
    save_folder(tmp_path / "s1", s1)
    save_folder(tmp_path / "s1b", {"model.layers.0.mlp.up_proj.weight": s1["model.layers.0.mlp.up_proj.weight"]})
    save_folder(tmp_path / "s2b", _tuned({"model.layers.0.mlp.up_proj.weight": s1["model.layers.0.mlp.up_proj.weight"]}, 9))
    create(tmp_path / "s0", tmp_path / "s1", tmp_path / "p1")
    create(tmp_path / "s1b", tmp_path / "s2b", tmp_path / "p2")
    r = run("patch", "apply", tmp_path / "s0", tmp_path / "p1", tmp_path / "p2", "-o", tmp_path / "o", "-q")
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("drop", ["parent", "sizes"])
def test_patch_info_on_missing_keys_is_one_sentence(patched, tmp_path, drop):
    """Defect: `patch info` on a header missing parent/sizes ended in a traceback."""
    _, _, p = patched
    bad = _rewrite(p, tmp_path / "m.rlspatch", lambda h: h.pop(drop))
    r = run("patch", "info", bad)
    assert r.returncode == 2 and "malformed" in r.stderr and "Traceback" not in r.stderr


def test_markup_and_escapes_in_a_patch_never_reach_the_terminal(tmp_path):
    """Defect: raw terminal escapes from a patch header reached the terminal in `patch info`; markup raised
    MarkupError."""
    name = "evil\x1b[2J[/red][bold]x"
    base = {name: torch.zeros(4, 4, dtype=torch.bfloat16)}
    tuned = {name: torch.ones(4, 4, dtype=torch.bfloat16)}
    save_folder(tmp_path / "a", base)
    save_folder(tmp_path / "b", tuned)
    create(tmp_path / "a", tmp_path / "b", tmp_path / "p")
    r = run("patch", "info", tmp_path / "p")
    assert r.returncode == 0 and "\x1b" not in r.stdout and "Traceback" not in r.stderr
    r = run("patch", "info", tmp_path / "p", "--json")
    assert r.returncode == 0 and "\x1b" not in r.stdout and json.loads(r.stdout)["tensors"] == 1


def test_reader_checks_survive_python_O(patched, tmp_path):
    """Defect: PatchReader._validate was built from `assert`, which `python -O` removes."""
    _, _, p = patched
    bad = _rewrite(p, tmp_path / "o.rlspatch", lambda h: h["tensors"][0].update(shape=[-5]))
    code = ("import sys\nfrom rlsubnet.deltas.format import PatchReader\nfrom rlsubnet.io import InputError\n"
            f"try:\n    PatchReader({str(bad)!r})\nexcept InputError as e:\n    print('refused', e.message)\n    sys.exit(0)\nsys.exit(3)")
    r = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "refused" in r.stdout, r.stdout + r.stderr


def test_safetensors_header_limit_is_the_librarys():
    """Defect: MAX_HEADER was 100 MiB; the safetensors library refuses above 100,000,000 bytes."""
    from rlsubnet.io.checkpoint import MAX_HEADER

    assert MAX_HEADER == 100_000_000


def test_patch_create_carries_only_what_a_checkpoint_needs(tmp_path):
    """Defect: `patch create` shipped every top-level file of TUNED (a notes.txt with a secret went in)."""
    save_folder(tmp_path / "a", _model(), config={"model_type": "llama"})
    b = save_folder(tmp_path / "b", _tuned(_model()), config={"model_type": "llama"})
    (b / "notes.txt").write_text("secret")
    (b / "tokenizer.json").write_text("{}")
    (b / "chat_template.jinja").write_text("{{ x }}")
    (b / "sub").mkdir()
    (b / "sub" / "x.json").write_text("{}")
    r = run("patch", "create", tmp_path / "a", b, "-o", tmp_path / "p", "-q")
    assert r.returncode == 0 and "notes.txt" in r.stdout and "sub/" in r.stdout
    i = info(tmp_path / "p")
    assert sorted(i["files"]) == ["chat_template.jinja", "config.json", "tokenizer.json"]
    assert sorted(i["files_left_out"]) == ["notes.txt", "sub/"]
    st = create(tmp_path / "a", b, tmp_path / "p2", include=("notes.txt",))
    assert "notes.txt" in st.files_carried and "notes.txt" not in st.files_left_out
    apply(tmp_path / "a", [tmp_path / "p2"], tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "secret"
    r = run("patch", "create", tmp_path / "a", b, "-o", tmp_path / "p3", "--include", "model.safetensors", "-q")
    assert r.returncode == 2 and "--include" in r.stderr


# -- live sync ---------------------------------------------------------------------------------------------
def _published(tmp_path: Path, steps: int = 2):
    sd = _model()
    target = {k: v.clone() for k, v in sd.items()}
    pub = DeltaPublisher(sd, dtype=None)
    sink = DirectorySink(tmp_path / "sync", initial_hash=pub.hash)
    for s in range(steps):
        bump_ulps(sd["model.layers.0.mlp.up_proj.weight"], torch.tensor([s]), 1)
        payload = pub.delta()
        sink.send(s, payload, "", pub.hash)
    return sd, target, tmp_path / "sync"


def _swap_step_file(sync: Path, step: int, make) -> None:
    f = sync / f"step-{step:08d}.rlspatch"
    f.unlink()
    make(f)


def test_receive_refuses_a_step_linked_to_dev_zero(tmp_path):
    """Defect: receive_directory read a step file linked to /dev/zero until MemoryError."""
    sd, target, sync = _published(tmp_path)
    _swap_step_file(sync, 1, lambda f: f.symlink_to("/dev/zero"))
    t0 = time.monotonic()
    with pytest.raises(ReceiveError) as e:
        receive_directory(sync, target)
    assert time.monotonic() - t0 < 10 and e.value.last == 0 and "symbolic link" in e.value.message
    assert "after=0" in e.value.message


def test_receive_refuses_a_fifo_without_blocking(tmp_path):
    """Defect: a FIFO as a step file blocked forever; timeout= did not apply."""
    sd, target, sync = _published(tmp_path)
    _swap_step_file(sync, 0, lambda f: os.mkfifo(f))
    t0 = time.monotonic()
    with pytest.raises(ReceiveError, match="not a regular file") as e:
        receive_directory(sync, target, timeout=1.0)
    assert time.monotonic() - t0 < 10 and e.value.last == -1


@pytest.mark.parametrize("name", ["../x.rlspatch", "/etc/passwd", "a/../../b"])
def test_receive_never_reads_outside_the_sync_folder(tmp_path, name):
    """Defect: manifest entries could name files outside the sync folder."""
    sd, target, sync = _published(tmp_path, steps=1)
    m = json.loads((sync / "manifest.json").read_text())
    m["steps"][0]["file"] = name
    (sync / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DeltaError, match="not a file in the sync folder"):
        receive_directory(sync, target)


@pytest.mark.parametrize("manifest", ['{"steps": 5}', "[1]", '{"format": "rlsubnet-delta-manifest/1", "steps": [{"step": "x"}]}', "{"])
def test_receive_malformed_manifest_is_a_delta_error(tmp_path, manifest):
    """Defect: a malformed manifest was silently read as 'no steps' (or raised KeyError)."""
    sync = tmp_path / "sync"
    sync.mkdir()
    (sync / "manifest.json").write_text(manifest)
    with pytest.raises(DeltaError):
        receive_directory(sync, _model())


def test_receive_waits_for_a_listed_file_then_resumes(tmp_path):
    """Defect: a listed file not there yet raised FileNotFoundError; a failure did not say how far it got."""
    sd, target, sync = _published(tmp_path)
    f = sync / "step-00000001.rlspatch"
    data = f.read_bytes()
    f.unlink()
    with pytest.raises(ReceiveError, match="not there") as e:
        receive_directory(sync, target, until=1, timeout=0.5, poll=0.05)
    assert e.value.last == 0
    threading.Timer(0.3, lambda: f.write_bytes(data)).start()
    assert receive_directory(sync, target, after=e.value.last, until=1, timeout=10, poll=0.05) == 1
    assert all(torch.equal(target[k], sd[k]) for k in sd)


def test_receive_refuses_a_step_of_the_wrong_size(tmp_path):
    sd, target, sync = _published(tmp_path, steps=1)
    f = sync / "step-00000000.rlspatch"
    f.write_bytes(f.read_bytes() + b"\0" * 100)
    with pytest.raises(ReceiveError, match="manifest announces"):
        receive_directory(sync, target)


def test_apply_delta_refuses_targets_that_share_storage():
    """Defect: on a state dict whose names share storage, apply_delta returned success with a tensor that no
    longer equalled its recorded result."""
    src = {"a": torch.zeros(8, dtype=torch.bfloat16), "b": torch.zeros(8, dtype=torch.bfloat16)}
    pub = DeltaPublisher(src, dtype=None)
    src["a"][3] = 1.0
    payload = pub.delta()
    shared = torch.zeros(8, dtype=torch.bfloat16)
    target = {"a": shared, "b": shared}
    with pytest.raises(DeltaError, match="share storage"):
        apply_delta(target, payload)
    assert torch.equal(shared, torch.zeros(8, dtype=torch.bfloat16))


def test_apply_delta_on_inference_tensors_writes_nothing():
    """Defect: a target made under torch.inference_mode() was left half-updated with a RuntimeError."""
    src = {"a": torch.zeros(8), "b": torch.zeros(8)}
    pub = DeltaPublisher(src, dtype=None)
    src["a"][1] = 2.0
    src["b"][2] = 3.0
    payload = pub.delta()
    target = {"a": torch.zeros(8)}
    with torch.inference_mode():
        target["b"] = torch.zeros(8)
    with pytest.raises(DeltaError, match="inference_mode"):
        apply_delta(target, payload)
    assert not target["a"].any() and not target["b"].any()
    with torch.inference_mode():  # where it can be written, it is
        target["a"] = torch.zeros(8)
        assert apply_delta(target, payload) == 2


# -- outputs -----------------------------------------------------------------------------------------------
def test_patch_apply_never_deletes_a_folder_that_appears_at_o(tmp_path):
    """Defect: `patch apply` deleted a folder that appeared at -o while it ran (3 of 3 trials)."""
    from rlsubnet.io.atomic import atomic_dir

    dest = tmp_path / "out"
    with pytest.raises(InputError, match="not written by rlsubnet"):
        with atomic_dir(dest, guard="-o") as tmp:
            (tmp / "x").write_text("ours")
            dest.mkdir()  # the user's folder appears while the command runs
            (dest / "precious").write_text("keep")
    assert (dest / "precious").read_text() == "keep" and not list(tmp_path.glob(".out.*"))


def test_guarded_swap_swaps_back_what_is_not_ours(tmp_path):
    """The check at the swap itself: what comes out of the destination is checked after the exchange."""
    from rlsubnet.io import atomic

    dest = tmp_path / "out"
    dest.mkdir()
    (dest / MARKER).write_text("{}")
    tmp = tmp_path / "new"
    tmp.mkdir()
    (tmp / "w").write_text("new")
    real = atomic.exchange
    calls = []

    def racing_exchange(a, b):  # the user's folder replaces ours between the check and the swap
        if not calls:
            (dest / MARKER).unlink()
            (dest / "precious").write_text("keep")
        calls.append(1)
        return real(a, b)

    atomic.exchange = racing_exchange
    try:
        with pytest.raises(InputError):
            atomic.replace_dir(tmp, dest, guard="-o")
    finally:
        atomic.exchange = real
    assert (dest / "precious").read_text() == "keep" and (tmp / "w").read_text() == "new"


def test_outputs_onto_a_fifo_and_a_device_are_written_into(pair, tmp_path):
    """Defect: `--json /dev/null` replaced the machine's /dev/null with a regular file; a FIFO was replaced too."""
    a, b = pair
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = {}

    def reader():
        with open(fifo, "rb") as fh:
            got["data"] = fh.read()

    t = threading.Thread(target=reader)
    t.start()
    r = run("diff", a, b, "--json", fifo, "-q")
    t.join(30)
    assert r.returncode == 0, r.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and json.loads(got["data"])["summary"]["changed"] == 5
    r = subprocess.run(["bash", "-c", f'"{sys.executable}" -m rlsubnet.cli diff "{a}" "{b}" -q --json >(cat > "{tmp_path}/ps.json")'],
                       capture_output=True, text=True, timeout=300)
    for _ in range(50):
        if (tmp_path / "ps.json").exists() and (tmp_path / "ps.json").stat().st_size:
            break
        time.sleep(0.1)
    assert r.returncode == 0 and json.loads((tmp_path / "ps.json").read_text())["summary"]["changed"] == 5
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    dev = tmp_path / "null"
    os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # the numbers of /dev/null
    r = run("diff", a, b, "--json", dev, "--csv", dev.with_name("x.csv"), "-q")
    assert r.returncode == 0 and stat.S_ISCHR(os.lstat(dev).st_mode)


# -- training and the study --------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_checks_config_against_weights_before_building(tmp_path):
    """Defect: `train` on 16 KB of weights with {"model_type": "llama"} built the 6.7B default model first."""
    m = save_folder(tmp_path / "m", {"model.embed_tokens.weight": torch.zeros(64, 32)}, config={"model_type": "llama"})
    t0 = time.monotonic()
    r = run("train", "--algo", "sft", "--model", m, "--out", tmp_path / "o")
    assert r.returncode == 2 and "config.json" in r.stderr and "does not belong to these weights" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 60 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,where", [(["train", "--algo", "nope"], "--algo"), (["train", "--algo", "sft", "--seed", str(2**64)], "--seed"),
                                        (["study", "--level", "-1"], "--level"), (["study", "--seeds", "0"], "--seeds"),
                                        (["study", "--lr-scale", "nan"], "--lr-scale"), (["study", "--lr-scale", "0"], "--lr-scale"),
                                        (["study", "--mask-order", "sideways"], "--mask-order")])
def test_bad_options_are_refused_before_heavy_work(tmp_path, args, where):
    """Defect: `train --algo nope` took 5 s (torch imported first); --seed 2**64 and study --level -1 gave tracebacks."""
    extra = ["--model", tmp_path, "--out", tmp_path / "o"] if args[0] == "train" else ["--out", tmp_path / "o"]
    t0 = time.monotonic()
    r = run(*args, *extra, timeout=120)
    assert r.returncode == 2 and where in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert time.monotonic() - t0 < 5


def test_train_config_key_follows_the_weights_not_the_path(tmp_path):
    """Defect: TrainConfig.key() hashed the path string, so the study reused runs trained from another model."""
    from rlsubnet.training.recipes import TrainConfig

    m = save_folder(tmp_path / "m", _model(), config={"model_type": "llama"})
    k1 = TrainConfig(algo="sft", model=str(m)).key()
    save_folder(tmp_path / "m", _tuned(_model()), config={"model_type": "llama"})
    k2 = TrainConfig(algo="sft", model=str(m)).key()
    save_folder(tmp_path / "copy", _tuned(_model()), config={"model_type": "llama"})
    assert k1 != k2 and TrainConfig(algo="sft", model=str(tmp_path / "copy")).key() == k2


def test_study_cache_entries_of_the_wrong_shape_and_lost_masks_are_rebuilt(tmp_path):
    """Defect: a cache entry of the wrong shape gave a traceback; a deleted or truncated mask was a dead end."""
    from rich.console import Console

    from rlsubnet.masks import Subnetwork
    from rlsubnet.study.pipeline import Study

    a = save_folder(tmp_path / "a", _model(), config={"model_type": "llama"})
    b = save_folder(tmp_path / "b", _tuned(_model()), config={"model_type": "llama"})
    con = Console(record=True, width=200)
    s = Study(str(tmp_path / "out"), console=con)
    s.model = str(a)
    d = s.analyze("x", str(b))
    assert d.changed == 7 and Subnetwork.load(s.mask("x")).count() == 7
    Path(s.mask("x")).unlink()
    for entry in (tmp_path / "out" / "cache").glob("diff-*.json"):
        entry.write_text('{"numel": 1}')
    d = s.analyze("x", str(b))
    text = con.export_text()
    assert "is not what this version writes" in text and "rebuilding" not in text  # the recomputed diff rewrote the mask
    assert d.changed == 7 and Subnetwork.load(s.mask("x")).count() == 7
    Path(s.mask("x")).write_bytes(Path(s.mask("x")).read_bytes()[:40])  # truncated
    assert s.analyze("x", str(b)).changed == 7  # cached diff ...
    assert "rebuilding" in con.export_text() and Subnetwork.load(s.mask("x")).count() == 7  # ... and the mask rebuilt


def test_sparse_state_from_another_mask_of_the_same_size_is_refused():
    """Defect: sparse optimizer state saved with another mask of the same size was accepted (77 of 340 entries
    then differed from the dense masked run)."""
    from rlsubnet.training.sparse import SparseMaskedOptimizer

    def opt(mask):
        p = torch.nn.Parameter(torch.ones(20))
        o = SparseMaskedOptimizer([{"params": [p], "lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8}], {p: mask}, "adamw")
        p.grad = torch.ones(20)
        o.step()
        return o

    m1 = torch.zeros(20, dtype=torch.bool)
    m1[:5] = True
    m2 = torch.zeros(20, dtype=torch.bool)
    m2[5:10] = True
    saved = opt(m1).state_dict()
    opt(m1).load_state_dict(saved)  # the same mask: accepted
    with pytest.raises(ValueError, match="another mask"):
        opt(m2).load_state_dict(saved)


def test_unguarded_folder_output_never_replaces_a_folder_that_appeared(tmp_path):
    from rlsubnet.io import atomic

    dest, tmp = tmp_path / "out", tmp_path / "new"
    tmp.mkdir()
    real = atomic._rename_new

    def appears(a, b):  # the destination appears between the check and the rename
        dest.mkdir()
        (dest / "precious").write_text("keep")
        return real(a, b)

    atomic._rename_new = appears
    try:
        with pytest.raises(InputError, match="appeared"):
            atomic.replace_dir(tmp, dest)
    finally:
        atomic._rename_new = real
    assert (dest / "precious").read_text() == "keep"


def test_a_header_of_many_identical_tensors_is_accepted():
    """The header bounds must not refuse genuine payloads that compress hugely: 20,000 zero tensors share one hash."""
    sd = {f"layers.{i}.bias": torch.zeros(3, dtype=torch.bfloat16) for i in range(20000)}
    pub = DeltaPublisher(sd, dtype=None)
    sd["layers.7.bias"][1] = 1.0
    payload = pub.delta()
    assert len(payload) < 60_000 and len(PatchReader(payload).header["tensors"]) == 20000


def _hostile_mask(path: Path, bits: dict, shapes: dict, counts=None, extra_meta=None):
    meta = {"format": "rlsubnet-mask/1", "shapes": json.dumps(shapes), "criterion": "bitwise"}
    if counts is not None:
        meta["counts"] = json.dumps(counts)
    meta.update(extra_meta or {})
    save_file({k: torch.from_numpy(np.asarray(v, np.uint8)) for k, v in bits.items()}, str(path), metadata=meta)
    return path


def test_mask_counts_are_recomputed_from_bits(tmp_path):
    """Defect: `counts` metadata trusted: negative or huge counts gave negative or absurd densities."""
    a = _hostile_mask(tmp_path / "a.safetensors", {"w": [0b1111, 0]}, {"w": [16]}, counts={"w": -5})
    b = _hostile_mask(tmp_path / "b.safetensors", {"w": [0b0011, 0]}, {"w": [16]}, counts={"w": 10**15})
    r = overlap([a, b])
    assert r.masks[0]["density"] == 4 / 16 and r.masks[1]["density"] == 2 / 16
    assert r.pairs[0].intersection == 2 and r.pairs[0].o1 == 0.5


def test_mask_padding_bits_refused(tmp_path):
    """Defect: set padding bits were counted as parameters."""
    m = _hostile_mask(tmp_path / "p.safetensors", {"w": [0xFF, 0xFF]}, {"w": [10]})  # 10 entries, 6 padding bits set
    with pytest.raises(InputError, match="padding bits"):
        Subnetwork.load(m).count()
    clean_error(run("overlap", m, m), "padding bits")


def test_mask_shapes_cannot_claim_more_than_the_file(tmp_path):
    """Defect: a 4 KB mask whose shapes claim 2^36 parameters made `overlap` allocate 8 GB."""
    m = _hostile_mask(tmp_path / "h.safetensors", {"w": np.zeros(4000, np.uint8)}, {"w": [2**18, 2**18]})
    with pytest.raises(InputError, match="packed uint8 bytes"):
        Subnetwork.load(m)
    m = _hostile_mask(tmp_path / "n.safetensors", {"w": [0]}, {"w": [-8, -1]})
    with pytest.raises(InputError, match="non-negative integers"):
        Subnetwork.load(m)


def test_verify_frozen_fails_on_what_it_could_not_check(tmp_path):
    """Defect: verify-frozen silently skipped tensors whose shapes differ and said OK."""
    base = small_lm()
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["model.layers.0.mlp.up_proj.weight"] = torch.zeros(4, 8).bfloat16()  # reshaped
    save_folder(tmp_path / "a", base)
    save_folder(tmp_path / "b", tuned)
    Subnetwork.full({k: tuple(v.shape) for k, v in base.items()}).save(tmp_path / "m.safetensors")
    v = verify_frozen(tmp_path / "a", tmp_path / "b", tmp_path / "m.safetensors")
    assert not v.ok and v.frozen_moved == 0
    assert v.unchecked[0]["name"] == "model.layers.0.mlp.up_proj.weight"
    r = run("verify-frozen", tmp_path / "a", tmp_path / "b", tmp_path / "m.safetensors", "-q")
    assert r.returncode == 1 and "not checked" in r.stdout and "NOT VERIFIED" in r.stdout


def test_symlinked_index_entries_cannot_escape(tmp_path):
    """Defect: an index entry that is a symlink (or goes through a symlinked subfolder) was followed outside."""
    outside = tmp_path / "outside"
    save_folder(outside, {"w": torch.zeros(4)})
    ck = tmp_path / "ck"
    ck.mkdir()
    os.symlink(outside / "model.safetensors", ck / "shard.safetensors")
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "shard.safetensors"}}))
    with pytest.raises(InputError, match="outside the checkpoint folder"):
        open_checkpoint(ck)
    ck2 = tmp_path / "ck2"
    ck2.mkdir()
    os.symlink(outside, ck2 / "sub")
    (ck2 / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "sub/model.safetensors"}}))
    with pytest.raises(InputError, match="outside the checkpoint folder"):
        open_checkpoint(ck2)
    ck3 = tmp_path / "ck3"
    ck3.mkdir()
    os.symlink(outside / "model.safetensors", ck3 / "model.safetensors")
    with pytest.raises(InputError, match="outside the checkpoint folder"):
        open_checkpoint(ck3)
    # a name that merely starts with two dots is inside the folder
    ck4 = tmp_path / "ck4"
    save_file({"w": torch.zeros(4)}, str((ck4.mkdir() or ck4) / "..a.safetensors"))
    (ck4 / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "..a.safetensors"}}))
    assert list(open_checkpoint(ck4).tensors) == ["w"]


def _hf_repo(cache: Path, name: str, sd: dict, commit: str = "a" * 40) -> Path:
    """A Hugging Face cache repository laid out as huggingface_hub writes it (snapshot files link to blobs)."""
    repo = cache / f"models--org--{name}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(sd, str(repo / "blobs" / "deadbeef"))
    os.symlink("../../blobs/deadbeef", repo / "snapshots" / commit / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo


def test_hf_cache_blobs_allowed_escapes_refused(tmp_path):
    """Defect: `org/name@../../x` or a refs file holding `../../x` escaped the cache; a non-UTF-8 refs file
    gave a traceback. Snapshots that link to ../../blobs are how the cache works and stay allowed."""
    cache = tmp_path / "hub"
    base = {"w": torch.arange(8.0)}
    tuned = {"w": torch.arange(8.0) + torch.tensor([0, 0, 1.0, 0, 0, 0, 0, 0])}
    _hf_repo(cache, "base", base)
    repo = _hf_repo(cache, "tuned", tuned)
    assert rlsubnet.diff("org/base", "org/tuned", cache_dir=str(cache)).changed == 1
    victim = tmp_path / "victim"
    save_folder(victim, base)
    with pytest.raises(InputError, match="not a branch, tag or commit"):
        open_checkpoint("org/base@../../../victim", cache_dir=str(cache))
    (repo / "refs" / "evil").write_text("../../../victim")
    with pytest.raises(InputError, match="does not hold a commit hash"):
        open_checkpoint("org/tuned@evil", cache_dir=str(cache))
    (repo / "refs" / "bad").write_bytes(b"\xff\xfe\x00")
    r = run("diff", "org/tuned@bad", "org/base", "--cache-dir", cache)
    clean_error(r, "not a readable reference")
    # closeness and verify-frozen take --cache-dir too
    r = run("closeness", "org/base", "org/base", "org/tuned", "--cache-dir", cache, "-q")
    assert r.returncode == 0, r.stderr
    Subnetwork.full({"w": (8,)}).save(tmp_path / "m.safetensors")
    r = run("verify-frozen", "org/base", "org/tuned", tmp_path / "m.safetensors", "--cache-dir", cache, "-q")
    assert r.returncode == 0, r.stderr


def test_fifo_is_refused_not_waited_on(tmp_path):
    """Defect: a FIFO passed as a checkpoint hung forever."""
    f = tmp_path / "model.safetensors"
    os.mkfifo(f)
    r = run("diff", f, f, timeout=60)
    clean_error(r, "not a regular file")
    d = tmp_path / "d"
    d.mkdir()
    os.mkfifo(d / "model.safetensors")
    clean_error(run("diff", d, d, timeout=60), "not a regular file")
    os.mkfifo(tmp_path / "m.safetensors")
    clean_error(run("overlap", tmp_path / "m.safetensors", tmp_path / "m.safetensors", timeout=60), "not a regular file")


def _raw_file(path: Path, header: dict | bytes, data: bytes = b"", n: int | None = None) -> Path:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if n is None else n) + h + data)
    return path


def test_header_checks_match_the_library(tmp_path):
    """Defects: duplicate keys accepted (last wins); a header over the size limit reported as "exceeds the
    file"; non-contiguous offsets accepted."""
    from rlsubnet.io.checkpoint import read_safetensors_header

    dup = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    with pytest.raises(InputError, match="appears twice"):
        read_safetensors_header(str(_raw_file(tmp_path / "dup.safetensors", dup, b"\0" * 4)))
    with pytest.raises(InputError, match="exceeds the limit"):
        read_safetensors_header(str(_raw_file(tmp_path / "big.safetensors", b"{}", n=200 * 1024 * 1024)))
    gap = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    with pytest.raises(InputError, match="gap"):
        read_safetensors_header(str(_raw_file(tmp_path / "gap.safetensors", gap, b"\0" * 8)))
    tail = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    with pytest.raises(InputError, match="after the last tensor"):
        read_safetensors_header(str(_raw_file(tmp_path / "tail.safetensors", tail, b"\0" * 12)))


def test_sharded_mask_index_is_checked_before_use(tmp_path):
    """A sharded mask's index names its parts: a name outside the folder, parts that leave a gap or overlap, a
    symbolic link and a part smaller than the index says are each refused in one sentence, never read or trusted."""
    from rlsubnet.analysis import diff
    from rlsubnet.masks import Subnetwork

    a = save_folder(tmp_path / "a", _model(), config={"model_type": "llama"})
    b = save_folder(tmp_path / "b", _tuned(_model()), config={"model_type": "llama"})
    good = tmp_path / "mask"
    diff(str(a), str(b), mask_criterion="bitwise", mask_dir=good, chunk=64)
    assert Subnetwork.load(good).count() == 7
    index = json.loads((good / "index.json").read_text())
    name = next(n for n, ps in index["parts"].items() if ps)
    first = index["parts"][name][0]

    def broken(tag, edit, files=None):
        d = tmp_path / tag
        shutil.copytree(good, d)
        idx = json.loads(json.dumps(index))
        edit(idx)
        (d / "index.json").write_text(json.dumps(idx))
        if files:
            files(d)
        return d

    cases = {
        "escape": (lambda i: i["parts"][name][0].update(file="../a/model.safetensors"), None, "plain file name"),
        "gap": (lambda i: i["parts"][name][0].update(start=1), None, "do not cover its bytes"),
        "short": (lambda i: i["parts"][name][0].update(nbytes=first["nbytes"] + 1), None, "its shape needs"),
        "link": (lambda i: None, lambda d: (d / first["file"]).unlink() or (d / first["file"]).symlink_to(good / first["file"]),
                 "missing or not a regular file"),
    }
    for tag, (edit, files, needle) in cases.items():
        with pytest.raises(InputError, match=needle):
            Subnetwork.load(broken(tag, edit, files))
    # the output folder: never over a folder rlsubnet did not write; its own sharded mask is replaced whole
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="not written by rlsubnet"):
        diff(str(a), str(b), mask_criterion="bitwise", mask_dir=mine)
    assert (mine / "notes.txt").read_text() == "keep"
    diff(str(a), str(b), mask_criterion="bitwise", mask_dir=good)
    assert Subnetwork.load(good).count() == 7
    # a part whose file holds other bytes than the index says: refused when the parameter is read
    d = broken("swapped", lambda i: None)
    other = next(p for n, ps in index["parts"].items() for p in ps if p["nbytes"] != first["nbytes"])
    shutil.copy(good / other["file"], d / first["file"])
    with pytest.raises(InputError, match="not the .* bytes"):
        Subnetwork.load(d).packed(name)
