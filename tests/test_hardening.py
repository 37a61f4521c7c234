"""Issue 8: nothing lost, nothing misread. One regression test (or more) per defect found by the review.

Each test names the defect it covers; each failed on the main branch before this change.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import rlsubnet
from rlsubnet.io import InputError, open_checkpoint
from rlsubnet.io.atomic import write_text
from rlsubnet.io.guard import MARKER, check_outputs
from rlsubnet.masks import Subnetwork, overlap
from rlsubnet.masks.verify import verify_frozen

from conftest import EXE, bump_ulps, run, save_folder


def clean_error(r, needle=None):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    if needle:
        assert needle in r.stderr, r.stderr


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes: to prove nothing was modified or removed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}




# -- data loss: train --out -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tiny import write_tiny_checkpoint

    d = tmp_path_factory.mktemp("model")
    return Path(write_tiny_checkpoint(d / "model", seed=0, dtype="bfloat16", hidden=32, layers=2, heads=2, inter=64))


TRAIN = ["train", "--algo", "sft", "--steps", "1", "--batch-size", "2", "--lr", "1e-3"]


def test_train_out_dot_does_not_empty_the_working_directory(tmp_path, tiny_model):
    """Defect: `--out .` emptied the working directory (model and unrelated files) and crashed."""
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    import shutil

    shutil.copytree(tiny_model, work / "model")
    before = snapshot(work)
    r = run(*TRAIN, "--model", "model", "--out", ".", cwd=work)
    clean_error(r, "refusing")
    assert snapshot(work) == before


@pytest.mark.parametrize("where", ["parent", "same", "inside"])
def test_train_out_never_lands_on_the_model(tmp_path, tiny_model, where):
    """Defect: `--out` = the model's parent deleted the model; `--out` = `--model` overwrote it."""
    import shutil

    holder = tmp_path / "holder"
    shutil.copytree(tiny_model, holder / "model")
    before = snapshot(holder)
    out = {"parent": holder, "same": holder / "model", "inside": holder / "model" / "sub"}[where]
    r = run(*TRAIN, "--model", holder / "model", "--out", out)
    clean_error(r, "refusing")
    assert snapshot(holder) == before


def test_train_out_refuses_unrelated_folder_and_file(tmp_path, tiny_model):
    """Defect: an existing unrelated folder was silently wiped."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    clean_error(run(*TRAIN, "--model", tiny_model, "--out", other), "not written by rlsubnet")
    assert (other / "keep.txt").read_text() == "precious"
    f = tmp_path / "file"
    f.write_text("x")
    clean_error(run(*TRAIN, "--model", tiny_model, "--out", f), "not a folder")
    assert f.read_text() == "x"


@pytest.mark.slow
def test_train_replaces_its_own_output_atomically_and_cleans_after_kill(tmp_path, tiny_model):
    """Defects: non-atomic replacement (a kill left config + log but no weights, previous result gone);
    `.NAME.work` leftovers never cleaned; two runs with one --out collided with a traceback; SIGTERM
    was not handled like SIGINT."""
    out = tmp_path / "run"
    r = run(*TRAIN, "--model", tiny_model, "--out", out)
    assert r.returncode == 0, r.stderr
    assert (out / MARKER).is_file() and (out / "model.safetensors").is_file()
    first = snapshot(out)
    # a second run, killed with SIGKILL mid-way: the first result stays whole
    p = subprocess.Popen([*EXE, *TRAIN, "--steps", "100000", "--model", str(tiny_model), "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not list(tmp_path.glob(".run.*.work")) and time.time() - t0 < 120:
        time.sleep(0.2)
    assert list(tmp_path.glob(".run.*.work")), "the run never started"
    # meanwhile, a third run with the same --out is refused in one sentence
    clean_error(run(*TRAIN, "--model", tiny_model, "--out", out), "another rlsubnet train")
    p.kill()
    p.wait(timeout=60)
    assert snapshot(out) == first
    # SIGTERM: handled like Ctrl-C, the run says nothing was written and leaves no temporary behind
    p = subprocess.Popen([*EXE, *TRAIN, "--steps", "100000", "--model", str(tiny_model), "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not list(tmp_path.glob(f".run.{p.pid}.*.work")) and time.time() - t0 < 120:  # its own work folder
        time.sleep(0.2)
    time.sleep(3)  # inside trainer.train()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert "terminated" in err and "nothing was written" in err and "Traceback" not in err
    assert snapshot(out) == first
    # the next run cleans the SIGKILL leftover and replaces the old result as a whole
    r = run(*TRAIN, "--model", tiny_model, "--out", out, "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]
    assert json.loads((out / "train_log.json").read_text())["config"]["seed"] == 1


def test_replace_dir_swaps_in_one_step(tmp_path):
    from rlsubnet.io.atomic import exchange, replace_dir

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("new")
    (b / "y").write_text("old")
    if not exchange(a, b):
        pytest.skip("renameat2 unavailable")
    assert (b / "x").exists() and (a / "y").exists()
    replace_dir(b, a)
    assert (a / "x").read_text() == "new" and not b.exists()


# -- data loss: every output option against every input ----------------------------------------------------
def test_outputs_never_overwrite_inputs(pair, tmp_path):
    """Defect: `diff A B --json A` replaced checkpoint A with JSON (exit 0); same for every output option."""
    a, b = pair
    before = {p: snapshot(p) for p in (a, b)}
    for opt in ("--json", "--csv", "--markdown", "--mask-out"):
        clean_error(run("diff", a, b, opt, a, "-q"), "refusing")
        clean_error(run("diff", a, b, opt, b / "model.safetensors", "-q"), "refusing")
    clean_error(run("diff", a, b, "--plot", a, "-q"), "refusing")
    clean_error(run("mask", a, b, "-o", b / "model.safetensors", "-q"), "refusing")
    m = tmp_path / "m.safetensors"
    assert run("mask", a, b, "-o", m, "-q").returncode == 0
    mb = m.read_bytes()
    clean_error(run("overlap", m, m, "--json", m), "refusing")
    clean_error(run("closeness", a, a, b, "--json", b, "-q"), "refusing")
    clean_error(run("verify-frozen", a, b, m, "--json", m, "-q"), "refusing")
    clean_error(run("rank", a, b, "--json", a / "model.safetensors", "-q"), "refusing")
    assert {p: snapshot(p) for p in (a, b)} == before and m.read_bytes() == mb


def test_check_outputs_rules(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"x")
    check_outputs({"--json": tmp_path / "out.json"}, [tmp_path / "ck"])  # a sibling is fine
    with pytest.raises(InputError, match="same output"):
        check_outputs({"--json": tmp_path / "o", "--csv": tmp_path / "o"}, [])
    with pytest.raises(InputError, match="would contain"):
        check_outputs({"--out": tmp_path}, [tmp_path / "ck"], folder_outputs=["--out"])
    os.symlink(tmp_path / "ck" / "model.safetensors", tmp_path / "link.json")
    with pytest.raises(InputError, match="refusing"):  # through a symbolic link, too
        check_outputs({"--json": tmp_path / "link.json"}, [tmp_path / "ck"])


# -- wrong answers: tied heads ------------------------------------------------------------------------------
def _lm(seed=0, vocab=20, hidden=8):
    g = torch.Generator().manual_seed(seed)
    return {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g).bfloat16(),
            "model.layers.0.mlp.up_proj.weight": torch.randn(hidden, hidden, generator=g).bfloat16()}


def test_tied_on_one_side_untied_on_the_other(tmp_path):
    """Defect: a head tied on one side and untied on the other was skipped as "counted once": 0 changed."""
    base = _lm()
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["lm_head.weight"] = base["model.embed_tokens.weight"].clone()
    bump_ulps(tuned["lm_head.weight"], torch.arange(6), 1)  # the untied head moved in 6 entries
    save_folder(tmp_path / "a", base, config={"model_type": "llama", "tie_word_embeddings": True})
    save_folder(tmp_path / "b", tuned, config={"model_type": "llama", "tie_word_embeddings": False})
    r = rlsubnet.diff(tmp_path / "a", tmp_path / "b")
    assert r.changed == 6
    assert any("lm_head" in n for n in r.notes)
    # and verify-frozen sees the frozen head entries that moved
    mask = Subnetwork.full({t.name: tuple(t.shape) for t in r.tensors}, value=False)
    mask.save(tmp_path / "none.safetensors")
    v = verify_frozen(tmp_path / "a", tmp_path / "b", tmp_path / "none.safetensors")
    assert v.frozen_moved == 6 and not v.ok


def test_config_says_tied_but_stored_head_differs(tmp_path):
    """Defect: config says tied while the stored head differs from the embedding: head skipped."""
    base = _lm()
    base["lm_head.weight"] = base["model.embed_tokens.weight"].clone()
    bump_ulps(base["lm_head.weight"], torch.arange(3), 2)  # not actually tied
    tuned = {k: v.clone() for k, v in base.items()}
    bump_ulps(tuned["lm_head.weight"], torch.arange(10, 14), 1)
    for n, sd in (("a", base), ("b", tuned)):
        save_folder(tmp_path / n, sd, config={"model_type": "llama", "tie_word_embeddings": True})
    r = rlsubnet.diff(tmp_path / "a", tmp_path / "b")
    assert r.changed == 4 and "lm_head.weight" in {t.name for t in r.tensors}


def test_gpt2_default_tie_counts_head_once(tmp_path):
    """Defect: a GPT-2 config without `tie_word_embeddings` (tied by default) storing a head copy was
    double-counted."""
    g = torch.Generator().manual_seed(1)
    base = {"transformer.wte.weight": torch.randn(20, 8, generator=g).bfloat16(),
            "transformer.h.0.mlp.c_fc.weight": torch.randn(8, 8, generator=g).bfloat16()}
    tuned = {k: v.clone() for k, v in base.items()}
    bump_ulps(tuned["transformer.wte.weight"], torch.arange(5), 1)
    base["lm_head.weight"] = base["transformer.wte.weight"].clone()
    tuned["lm_head.weight"] = tuned["transformer.wte.weight"].clone()
    for n, sd in (("a", base), ("b", tuned)):
        save_folder(tmp_path / n, sd, config={"model_type": "gpt2"})
    r = rlsubnet.diff(tmp_path / "a", tmp_path / "b")
    assert r.changed == 5 and r.numel == 20 * 8 + 64
    assert any(s["name"] == "lm_head.weight" and "counted once" in s["reason"] for s in r.skipped)


def test_buffers_reported_apart(tmp_path):
    """Defect: stored buffers (attn.bias, masked_bias, inv_freq) were counted as parameters."""
    g = torch.Generator().manual_seed(2)
    sd = {"transformer.h.0.attn.c_attn.weight": torch.randn(8, 24, generator=g),
          "transformer.h.0.attn.c_attn.bias": torch.zeros(24),
          "transformer.h.0.attn.bias": torch.tril(torch.ones(1, 1, 16, 16)),
          "transformer.h.0.attn.masked_bias": torch.tensor(-1e4),
          "model.layers.0.self_attn.rotary_emb.inv_freq": torch.rand(4, generator=g)}
    tuned = {k: v.clone() for k, v in sd.items()}
    tuned["transformer.h.0.attn.c_attn.weight"][0, :3] += 1
    save_folder(tmp_path / "a", sd)
    save_folder(tmp_path / "b", tuned)
    r = rlsubnet.diff(tmp_path / "a", tmp_path / "b")
    assert r.numel == 8 * 24 + 24 and r.changed == 3
    assert {b.name for b in r.buffers} == {"transformer.h.0.attn.bias", "transformer.h.0.attn.masked_bias",
                                           "model.layers.0.self_attn.rotary_emb.inv_freq"}
    assert json.loads(r.to_json())["buffers"][0]["numel"] > 0


# -- wrong answers: masks ------------------------------------------------------------------------------------
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
    base = _lm()
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


# -- strict JSON ---------------------------------------------------------------------------------------------
def _strict(text: str):
    def bad(c):
        raise ValueError(f"non-JSON constant {c}")

    return json.loads(text, parse_constant=bad)


def test_json_output_is_strict(tmp_path):
    """Defect: --json held NaN/Infinity (non-finite weights in diff, empty mask in overlap, A == INIT in
    closeness)."""
    base = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0]).bfloat16()}
    tuned = {"w": torch.tensor([1.0, float("nan"), float("inf"), 4.5]).bfloat16()}
    save_folder(tmp_path / "a", base)
    save_folder(tmp_path / "b", tuned)
    r = run("diff", tmp_path / "a", tmp_path / "b", "--json", "-", "-q")
    assert r.returncode == 0, r.stderr
    d = _strict(r.stdout)
    assert d["tensors"][0]["max_abs_delta"] is None and d["tensors"][0]["nonfinite"] == 2
    Subnetwork.full({"w": (4,)}, value=False).save(tmp_path / "e.safetensors")
    Subnetwork.full({"w": (4,)}).save(tmp_path / "f.safetensors")
    r = run("overlap", tmp_path / "e.safetensors", tmp_path / "f.safetensors", "--json", "-")
    assert r.returncode == 0, r.stderr
    p = _strict(r.stdout)["pairs"][0]
    assert p["o1"] is None and p["ratio"] is None
    r = run("closeness", tmp_path / "a", tmp_path / "a", tmp_path / "b", "--json", "-", "-q")
    assert r.returncode == 0, r.stderr
    assert _strict(r.stdout)["rel_l2"] is None


def test_atol_sparsity_names_the_missing_tolerance(pair):
    """Defect: `DiffResult.atol_sparsity(tol)` raised a bare KeyError for a tolerance not computed."""
    r = rlsubnet.diff(*pair, atol=[0, 1e-5])
    with pytest.raises(ValueError, match="was not computed"):
        r.atol_sparsity(1e-3)


# -- names are data ----------------------------------------------------------------------------------------
def test_markup_and_escape_sequences_in_names(tmp_path):
    """Defect: Rich markup in a file or tensor name crashed with MarkupError or named the wrong file;
    escape sequences in names reached the terminal raw."""
    evil = "[/bold]evil\x1b[31m"
    g = torch.Generator().manual_seed(0)
    base = {evil: torch.randn(4, 4, generator=g).bfloat16()}
    tuned = {evil: base[evil].clone()}
    bump_ulps(tuned[evil], torch.arange(2), 1)
    d = tmp_path / "[red]dir"
    (d / "[").mkdir(parents=True)
    save_file(base, str(d / "[/red]x.safetensors"))  # folder "[" holding "red]x.safetensors"
    save_file(tuned, str(d / "y.safetensors"))
    env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"}
    r = subprocess.run([*EXE, "diff", str(d / "[/red]x.safetensors"), str(d / "y.safetensors"), "--by", "tensor"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "evil\x1b[31m" not in r.stdout  # the raw escape sequence never reaches the terminal
    assert "[/red]x.safetensors" in r.stdout and "[/bold]evil\\x1b[31m" in r.stdout
    r = run("diff", d / "[/red]missing.safetensors", d / "y.safetensors")
    clean_error(r, "[/red]missing.safetensors")


def test_outputs_honour_the_umask(pair, tmp_path):
    """Defect: outputs were created 0600 and --out folders 0700 whatever the umask."""
    old = os.umask(0o002)
    try:
        write_text(tmp_path / "f.txt", "x")
        from rlsubnet.io.atomic import atomic_dir

        with atomic_dir(tmp_path / "d") as t:
            (t / "x").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f.txt").st_mode) == 0o664
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o775
    a, b = pair
    r = subprocess.run(["sh", "-c", "umask 022 && exec \"$@\"", "sh", *EXE, "diff", str(a), str(b), "--json",
                        str(tmp_path / "j.json"), "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "j.json").st_mode) == 0o644


# -- reading outside what was named -------------------------------------------------------------------------
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


# -- the safetensors header, as strict as the library ------------------------------------------------------
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


# -- processes --------------------------------------------------------------------------------------------
def test_workers_validated_and_capped(pair):
    """Defect: `--workers 1000` forked 1000 processes for 3 tensors; `--workers -1` was accepted."""
    from rlsubnet.analysis.engine import Job, map_chunks

    a, b = pair
    clean_error(run("diff", a, b, "--workers", "-1"), "--workers")
    clean_error(run("mask", a, b, "-o", a.parent / "m.safetensors", "--workers", "0"), "--workers")
    with open_checkpoint(a) as ck:
        jobs = [Job(n, [(ck, n)], ck.tensors[n].numel) for n in ck.tensors]
        pids = {res[0] for _, res in map_chunks(jobs, lambda job, s, raws: os.getpid(), workers=1000, progress=False)}
    assert 1 <= len(pids) <= 3


WORKER_SCRIPT = r"""
import os, sys, time
from rlsubnet.io import open_checkpoint
from rlsubnet.analysis.engine import Job, map_chunks
ck = open_checkpoint(sys.argv[1])
jobs = [Job(n, [(ck, n)], ck.tensors[n].numel) for n in ck.tensors]
def slow(job, start, raws):
    if job.name.endswith("1.self_attn.v_proj.weight"):
        raise RuntimeError("boom")
    time.sleep(600)
print("started", flush=True)
for _ in map_chunks(jobs, slow, workers=2, progress=False):
    pass
"""


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _wait_gone(pids, timeout=30.0) -> bool:
    import psutil

    t0 = time.time()
    while time.time() - t0 < timeout:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.2)
    return False


def test_workers_die_with_their_parent(pair, tmp_path):
    """Defect: when only the parent was killed (SIGKILL, e.g. by the OOM killer), forked workers lived on."""
    a, _ = pair
    script = WORKER_SCRIPT.replace('raise RuntimeError("boom")', "time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", script, str(a)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "started"
    t0 = time.time()
    while len(_children(p.pid)) < 2 and time.time() - t0 < 30:
        time.sleep(0.2)
    kids = _children(p.pid)
    assert len(kids) >= 2
    p.kill()
    p.wait()
    assert _wait_gone(kids), "workers outlived their parent"


def test_first_error_cancels_pending_work(pair):
    """Defect: pending work was not cancelled on the first error (the pool waited for every sleeping job)."""
    a, _ = pair
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", WORKER_SCRIPT, str(a)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "boom" in r.stderr
    assert time.time() - t0 < 60


def test_stale_temporaries_are_cleaned(tmp_path):
    """Defect: after a kill, `.NAME.*.tmp` files stayed behind and nothing cleaned them."""
    dead = 2**22 + 12345  # above the default pid_max of small systems; checked to be free below
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
    stale = tmp_path / f".out.json.{dead}.0123abcd.tmp"
    stale.write_text("half")
    alive = tmp_path / f".out.json.{os.getpid()}.0123abcd.tmp"
    alive.write_text("someone is writing")
    foreign = tmp_path / ".out.json.tmp"
    foreign.write_text("not ours")
    write_text(tmp_path / "out.json", "{}")
    assert not stale.exists() and alive.exists() and foreign.exists()


@pytest.mark.parametrize("dest,needle", [("folder", "it is a folder"), ("under-file", "is a file, not a folder"),
                                         ("too-long", "too long")])
def test_bad_destinations_one_sentence(pair, tmp_path, dest, needle):
    """Defect: output destinations that are a folder, under a file or too long gave tracebacks."""
    a, b = pair
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    path = {"folder": tmp_path / "folder", "under-file": tmp_path / "file" / "x.json",
            "too-long": tmp_path / ("x" * 300 + ".json")}[dest]
    clean_error(run("diff", a, b, "--json", path, "-q"), needle)


def test_full_disk_and_readonly_are_one_sentence(tmp_path):
    """The errors a root user cannot provoke on a tmp folder, checked on the conversion itself."""
    import errno

    from rlsubnet.io.atomic import _os_error

    for code, needle in [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"), (errno.EACCES, "permission denied")]:
        e = _os_error(tmp_path / "x.json", OSError(code, os.strerror(code)))
        assert needle in e.message and str(tmp_path / "x.json") in e.message
    if Path("/dev/full").exists():
        r = run("diff", "nope-a", "nope-b", "--json", "/dev/full/x")
        clean_error(r)


# -- train options ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts,needle", [
    (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--weight-decay", "nan"], "--weight-decay"), (["--beta", "nan"], "--beta"),
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-2"], "--batch-size"),
    (["--level", "0"], "--level"), (["--level", "-1"], "--level"), (["--level", "1000"], "--level"),
    (["--algo", "grpo", "--num-generations", "0"], "--num-generations"),
    (["--algo", "grpo", "--num-generations", "1"], "--num-generations"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--algo", "grpo", "--batch-size", "6", "--num-generations", "4"], "not a multiple"),
])
def test_train_options_validated(tiny_model, tmp_path, opts, needle):
    """Defect: unvalidated train options gave tracebacks, or an all-NaN checkpoint with exit 0."""
    from rlsubnet.training.recipes import TrainConfig, run_training

    kw = {"algo": "sft", "model": str(tiny_model), "out": str(tmp_path / "o")}
    names = {"--lr": "lr", "--weight-decay": "weight_decay", "--beta": "beta", "--batch-size": "batch_size",
             "--level": "level", "--num-generations": "num_generations", "--max-new-tokens": "max_new_tokens", "--algo": "algo"}
    for k, v in zip(opts[::2], opts[1::2]):
        kw[names[k]] = v if k == "--algo" else (float(v) if k in ("--lr", "--weight-decay", "--beta") else int(v))
    with pytest.raises(InputError, match=names.get(needle, needle)):  # the Python API names the argument
        run_training(TrainConfig(**kw), progress=False)
    assert not (tmp_path / "o").exists()
    r = run(*TRAIN, *opts, "--model", tiny_model, "--out", tmp_path / "o")  # a repeated option: the last one counts
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr  # the command line names its flag


def test_train_cli_bad_models_one_sentence(tmp_path, tiny_model):
    """Defects: a config.json that is not JSON or lacks model_type, and a malicious .bin given to
    `train --model` (safely refused, but with a traceback)."""
    import shutil

    bad = tmp_path / "notjson"
    shutil.copytree(tiny_model, bad)
    (bad / "config.json").write_text("{nope")
    clean_error(run(*TRAIN, "--model", bad, "--out", tmp_path / "o"), "not valid JSON")
    nomt = tmp_path / "nomt"
    shutil.copytree(tiny_model, nomt)
    cfg = json.loads((nomt / "config.json").read_text())
    cfg.pop("model_type")
    (nomt / "config.json").write_text(json.dumps(cfg))
    clean_error(run(*TRAIN, "--model", nomt, "--out", tmp_path / "o"), "model_type")
    evil = tmp_path / "evil"
    shutil.copytree(tiny_model, evil)
    (evil / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"w": Evil()}, evil / "pytorch_model.bin")
    clean_error(run(*TRAIN, "--model", evil, "--out", tmp_path / "o"), "refused to unpickle")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_divergence_is_not_saved():
    """Defect: a run whose weights became NaN was written with exit 0; the guard finds the parameter."""
    from rlsubnet.training.recipes import _nonfinite_params

    m = torch.nn.Linear(3, 3)
    assert _nonfinite_params(m) is None
    with torch.no_grad():
        m.bias[1] = float("nan")
    assert _nonfinite_params(m) == "bias"


@pytest.mark.slow
def test_epoch_based_schedule_is_sized_by_the_trainer(tmp_path, tiny_model):
    """Defect: `build_masked_optimizer(..., num_training_steps=args.max_steps)` with an epoch-based config
    (max_steps = -1) built a schedule whose learning rate was 0 at every step: nothing changed."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from rlsubnet.training.masked import build_masked_optimizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    names = [n for n, _ in model.named_parameters()]
    mask = Subnetwork.from_bool({n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()})
    args = TrainingArguments(output_dir=str(tmp_path / "t"), num_train_epochs=1, per_device_train_batch_size=2,
                             learning_rate=1e-2, lr_scheduler_type="linear", report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True)
    assert args.max_steps == -1
    with pytest.raises(ValueError, match="positive number of steps"):
        build_masked_optimizer(model, args, mask, num_training_steps=args.max_steps)
    opt, sched = build_masked_optimizer(model, args, mask)
    assert sched is None
    ids = torch.randint(3, 100, (8, 12))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched)).train()
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
    assert moved > 0.5 * sum(p.numel() for p in before.values()), names[:2]


def test_masked_optimizer_hooks_work():
    """Defect: MaskedOptimizer did not initialise its base class, so register_step_pre_hook failed."""
    from rlsubnet.training.masked import MaskedOptimizer

    p = torch.nn.Parameter(torch.ones(4))
    opt = MaskedOptimizer(torch.optim.AdamW([p], lr=0.1, weight_decay=0.0), {p: torch.tensor([True, False, True, False])})
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    (p * torch.arange(4.0)).sum().backward()
    opt.step()
    assert seen == ["pre", "post"]
    assert p[1] == 1 and p[3] == 1 and p[2] != 1
    assert opt.param_groups is opt.optimizer.param_groups and opt.state is opt.optimizer.state


# -- the rest of the traceback list ------------------------------------------------------------------------
def test_rank_with_nonfinite_update(tmp_path):
    """Defect: `rank` on an update with NaN/Inf gave a traceback."""
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(6, 6, generator=g),
            "model.layers.0.mlp.down_proj.weight": torch.randn(6, 6, generator=g)}
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")
    tuned["model.layers.0.mlp.down_proj.weight"][0, 0] += 1
    save_folder(tmp_path / "a", base)
    save_folder(tmp_path / "b", tuned)
    r = run("rank", tmp_path / "a", tmp_path / "b", "--json", "-", "-q")
    assert r.returncode == 0, r.stderr
    d = _strict(r.stdout)
    assert [m["name"] for m in d["matrices"]] == ["model.layers.0.mlp.down_proj.weight"]
    assert any("non-finite" in e for e in d["excluded"])


@pytest.mark.slow
def test_truncated_cached_train_log_in_study(tmp_path, tiny_model):
    """Defect: a truncated cached `train_log.json` in a study gave a traceback."""
    from rlsubnet.study.pipeline import Study
    from rlsubnet.training.recipes import TrainConfig

    st = Study(str(tmp_path / "study"), model=str(tiny_model), budget="tiny")
    cfg = TrainConfig(algo="sft", model=str(tiny_model))
    d = tmp_path / "study" / "runs" / f"x-{cfg.key()}"
    d.mkdir(parents=True)
    (d / "train_log.json").write_text('{"elapsed_s": 1.0, "ste')
    with pytest.raises(InputError, match="corrupt or truncated"):
        st.train("x", cfg)


def test_interruption_says_what_was_written(tmp_path, capsys):
    """Defect: "interrupted: nothing was written." was printed after some outputs had been written."""
    import typer

    from rlsubnet.cli import clean_errors

    @clean_errors
    def job():
        write_text(tmp_path / "first.json", "{}")
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as e:
        job()
    assert e.value.exit_code == 130
    err = capsys.readouterr().err
    assert "first.json" in err and "nothing else was written" in err and "nothing was written" not in err
