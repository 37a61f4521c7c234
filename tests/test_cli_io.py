"""The command line, and bad input: one clear sentence, exit code 2, no partial output."""

from __future__ import annotations

import json
import os
import struct
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rlsubnet.io import InputError, open_checkpoint
from rlsubnet.io.checkpoint import read_safetensors_header
from rlsubnet.masks import Subnetwork

from conftest import EXE, bump_ulps, clean_error, run, save_folder, strict_json


def test_diff_cli_outputs(pair, tmp_path):
    a, b = pair
    out = tmp_path / "out"
    r = run("diff", a, b, "--json", out / "d.json", "--csv", out / "d.csv", "--markdown", out / "d.md",
            "--plot", out / "plots", "--by", "layer", "--atol", "1e-5,1e-4", "--atol", "0", "-q")
    assert r.returncode == 0, r.stderr
    d = json.loads((out / "d.json").read_text())
    assert d["summary"]["changed"] == 5 and [x["atol"] for x in d["summary"]["atol"]] == [1e-5, 1e-4, 0.0]
    assert (out / "d.csv").read_text().startswith("layer,numel,changed")
    assert "bits identical" in (out / "d.md").read_text()
    for png in ("sparsity_heatmap.png", "tolerance_sweep.png", "ulp_histogram.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    r = run("diff", a, b, "--json", "-", "-q")
    assert json.loads(r.stdout)["summary"]["changed"] == 5
    r = run("diff", a, b)
    assert "bits identical" in r.stdout and r.returncode == 0


@pytest.mark.parametrize("bad", ["abc", "-1e-5", "nan", "inf"])
def test_bad_tolerance(pair, tmp_path, bad):
    a, b = pair
    r = run("diff", a, b, "--atol", bad, "--json", tmp_path / "x.json")
    assert r.returncode == 2
    assert "--atol" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.json").exists()


def _assert_clean_error(r, needle, tmp_path=None):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert needle in r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) <= 3  # one sentence (rich may wrap it)


def test_bad_inputs_exit_2(pair, tmp_path):
    a, b = pair
    _assert_clean_error(run("diff", tmp_path / "nope", b), "no such file")
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_clean_error(run("diff", empty, b), "not a checkpoint folder")
    # truncated safetensors
    t = tmp_path / "trunc"
    t.mkdir()
    data = (a / "model.safetensors").read_bytes()
    (t / "model.safetensors").write_bytes(data[: len(data) - 10])
    _assert_clean_error(run("diff", t, b), "model.safetensors")
    # unsafe pickle
    u = tmp_path / "unsafe"
    u.mkdir()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": Evil()}, u / "pytorch_model.bin", _use_new_zipfile_serialization=True)
    r = run("diff", u, b)
    _assert_clean_error(r, "refused to unpickle")
    assert "pwned" not in r.stdout
    # index pointing outside its folder
    x = tmp_path / "escape"
    x.mkdir()
    (x / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../etc/x"}}))
    _assert_clean_error(run("diff", x, b), "outside the checkpoint folder")
    # nothing in common
    other = save_folder(tmp_path / "other", {"zzz": torch.zeros(3)})
    _assert_clean_error(run("diff", a, other), "no tensor in common")
    # --by
    _assert_clean_error(run("diff", a, b, "--by", "row"), "--by")


def _header(entries: dict, meta=None) -> bytes:
    h = dict(entries)
    if meta is not None:
        h["__metadata__"] = meta
    raw = json.dumps(h).encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize(
    "blob,needle",
    [
        (b"", "shorter"),
        (struct.pack("<Q", 10**12), "header length"),
        (struct.pack("<Q", 5) + b"{nope", "not valid JSON"),
        (_header({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}) + bytes(8), "dtype"),
        (_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}}) + bytes(8), "outside the file"),
        (_header({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}) + bytes(8), "shape needs"),
        (_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                  "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}) + bytes(12), "overlap"),
        (_header({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}) + bytes(8), "bad shape"),
        (_header({"w": [1, 2]}) + bytes(8), "not an object"),
        (_header({}, meta={"a": 1}), "__metadata__"),
    ],
)
def test_corrupt_headers(tmp_path, blob, needle):
    f = tmp_path / "m.safetensors"
    f.write_bytes(blob)
    with pytest.raises(InputError, match=needle):
        read_safetensors_header(str(f))


def test_fuzzed_headers_never_crash(tmp_path):
    rs = np.random.default_rng(0)
    good = _header({"a": {"dtype": "BF16", "shape": [4, 2], "data_offsets": [0, 16]},
                    "b": {"dtype": "F32", "shape": [3], "data_offsets": [16, 28]}}) + bytes(28)
    f = tmp_path / "f.safetensors"
    for i in range(400):
        blob = bytearray(good)
        mode = i % 3
        if mode == 0:
            for _ in range(rs.integers(1, 6)):
                blob[rs.integers(0, len(blob))] = rs.integers(0, 256)
        elif mode == 1:
            blob = blob[: rs.integers(0, len(blob))]
        else:
            blob = bytearray(rs.bytes(int(rs.integers(0, 64))))
        f.write_bytes(bytes(blob))
        try:
            ck = open_checkpoint(f)
            for n in ck.tensors:
                ck.read(n)
            ck.close()
        except InputError:
            pass


def test_no_partial_output_on_error(pair, tmp_path):
    a, b = pair
    out = tmp_path / "never.json"
    r = run("diff", a, tmp_path / "missing", "--json", out)
    assert r.returncode == 2 and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_inputs_not_modified(pair, tmp_path):
    a, b = pair
    before = {p: p.read_bytes() for d in (a, b) for p in d.iterdir()}
    assert run("diff", a, b, "--mask-out", tmp_path / "m.safetensors", "-q").returncode == 0
    assert {p: p.read_bytes() for d in (a, b) for p in d.iterdir()} == before


def test_json_output_is_strict(tmp_path):
    """Defect: --json held NaN/Infinity (non-finite weights in diff, empty mask in overlap, A == INIT in
    closeness)."""
    base = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0]).bfloat16()}
    tuned = {"w": torch.tensor([1.0, float("nan"), float("inf"), 4.5]).bfloat16()}
    save_folder(tmp_path / "a", base)
    save_folder(tmp_path / "b", tuned)
    r = run("diff", tmp_path / "a", tmp_path / "b", "--json", "-", "-q")
    assert r.returncode == 0, r.stderr
    d = strict_json(r.stdout)
    assert d["tensors"][0]["max_abs_delta"] is None and d["tensors"][0]["nonfinite"] == 2
    Subnetwork.full({"w": (4,)}, value=False).save(tmp_path / "e.safetensors")
    Subnetwork.full({"w": (4,)}).save(tmp_path / "f.safetensors")
    r = run("overlap", tmp_path / "e.safetensors", tmp_path / "f.safetensors", "--json", "-")
    assert r.returncode == 0, r.stderr
    p = strict_json(r.stdout)["pairs"][0]
    assert p["o1"] is None and p["ratio"] is None
    r = run("closeness", tmp_path / "a", tmp_path / "a", tmp_path / "b", "--json", "-", "-q")
    assert r.returncode == 0, r.stderr
    assert strict_json(r.stdout)["rel_l2"] is None


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
