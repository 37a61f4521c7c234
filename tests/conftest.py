"""Shared helpers: tests build their own tiny checkpoints with known, planted differences."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# -- two tiers: `pytest` runs the unit and contract tests (about a minute); `pytest --full` (make test, CI) also
# runs the slow tier: real training with every trainer, multi-process runs, the study on the real model.
SLOW_MODULES = {"test_training", "test_distributed", "test_study"}


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="also run the slow tier (training, several processes, the study): what `make test` and CI run")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
    if config.getoption("--full") or os.environ.get("RLSUBNET_FULL_TESTS") == "1":
        return
    keep = [i for i in items if i.get_closest_marker("slow") is None]
    dropped = [i for i in items if i.get_closest_marker("slow") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def save_folder(path: Path, tensors: dict, config: dict | None = None, shards: int = 1, fmt: str = "safetensors") -> Path:
    """Write ``tensors`` as a checkpoint folder: one file or an index with ``shards`` shards."""
    path.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    ext = "safetensors" if fmt == "safetensors" else "bin"
    base = "model" if fmt == "safetensors" else "pytorch_model"
    if shards == 1:
        f = path / f"{base}.{ext}"
        _write(f, {n: tensors[n] for n in names}, fmt)
        return path
    wm = {}
    per = (len(names) + shards - 1) // shards
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        fname = f"{base}-{i + 1:05d}-of-{shards:05d}.{ext}"
        _write(path / fname, {n: tensors[n] for n in part}, fmt)
        wm.update({n: fname for n in part})
    (path / f"{base}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return path


def _write(f: Path, tensors: dict, fmt: str) -> None:
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(f))
    else:
        torch.save(tensors, str(f))


def bits_view(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def bump_ulps(t: torch.Tensor, idx: torch.Tensor, ulps: int) -> None:
    """Move the elements at flat ``idx`` by ``ulps`` units in the last place (bit pattern + ulps)."""
    b = bits_view(t).view(-1)
    b[idx] += ulps


def reference_counts(a: torch.Tensor, b: torch.Tensor, tols, eta=1e-3):
    """Brute force over whole tensors in float64: the independent truth the engine must match."""
    ab, bb = bits_view(a).view(-1).numpy(), bits_view(b).view(-1).numpy()
    fa = a.double().view(-1).numpy()
    fb = b.double().view(-1).numpy()
    if a.dtype == b.dtype:
        changed = int(np.count_nonzero((ab != bb) & ~((fa == 0) & (fb == 0))))
    else:
        changed = int(np.count_nonzero((fa != fb) & ~(np.isnan(fa) & np.isnan(fb))))
    d = np.abs(fb - fa)
    atol = [int(np.count_nonzero(~(d <= t))) for t in tols]  # finite inputs only
    rel = int(np.count_nonzero(~(d <= eta * np.maximum(np.abs(fa), np.abs(fb)))))
    return changed, atol, rel


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


EXE = [sys.executable, "-m", "rlsubnet.cli"]


def run(*args, cwd=None, timeout=300):
    """The command line in a subprocess, as a user runs it."""
    return subprocess.run([*EXE, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)


@pytest.fixture
def pair(tmp_path):
    """Two bf16 checkpoint folders that differ in exactly 5 entries of one tensor."""
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.self_attn.v_proj.weight": torch.randn(8, 8, generator=g).bfloat16() for i in range(3)}
    tuned = {k: v.clone() for k, v in base.items()}
    bump_ulps(tuned["model.layers.1.self_attn.v_proj.weight"], torch.arange(5), 1)
    return save_folder(tmp_path / "a", base), save_folder(tmp_path / "b", tuned)


def clean_error(r, needle=None):
    """Bad input: exit code 2, one sentence (containing ``needle``), no traceback."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    if needle:
        assert needle in r.stderr, r.stderr


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes: to prove nothing was modified or removed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tiny import write_tiny_checkpoint

    d = tmp_path_factory.mktemp("model")
    return Path(write_tiny_checkpoint(d / "model", seed=0, dtype="bfloat16", hidden=32, layers=2, heads=2, inter=64))


TRAIN = ["train", "--algo", "sft", "--steps", "1", "--batch-size", "2", "--lr", "1e-3"]


def small_lm(seed=0, vocab=20, hidden=8):
    """A two-tensor bf16 language-model state dict (embeddings, one MLP matrix)."""
    g = torch.Generator().manual_seed(seed)
    return {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g).bfloat16(),
            "model.layers.0.mlp.up_proj.weight": torch.randn(hidden, hidden, generator=g).bfloat16()}


def strict_json(text: str):
    """``json.loads`` that refuses NaN and Infinity, which strict JSON has no spelling for."""
    def bad(c):
        raise ValueError(f"non-JSON constant {c}")

    return json.loads(text, parse_constant=bad)


def split_payload(data: bytes) -> tuple[bytes, dict]:
    """A patch's bytes before its header, and its header (no check: tests build hostile variants from it)."""
    import struct

    import zstandard

    (n,) = struct.unpack("<Q", data[-16:-8])
    return data[: len(data) - 16 - n], json.loads(zstandard.ZstdDecompressor().decompress(data[len(data) - 16 - n : -16]))


def join_payload(blobs: bytes, header: dict) -> bytes:
    """The inverse of :func:`split_payload`, with ``header`` as given."""
    import struct

    import zstandard

    comp = zstandard.ZstdCompressor().compress(json.dumps(header).encode())
    return blobs + comp + struct.pack("<Q", len(comp)) + b"RLSPEND1"
