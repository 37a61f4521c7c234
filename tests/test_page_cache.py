"""Pairs larger than memory: what rlsubnet reads is dropped from the page cache (``RLSUBNET_PAGE_CACHE``),
checked with util-linux's ``fincore`` (the kernel's own residency count)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from rlsubnet.io.checkpoint import page_cache_policy

pytestmark = pytest.mark.skipif(shutil.which("fincore") is None or not hasattr(os, "posix_fadvise"),
                                reason="needs util-linux fincore and posix_fadvise (Linux)")


def resident(path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def _pair(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for side in ("a", "b"):
        d = tmp_path / side
        d.mkdir()
        w = rng.standard_normal((1024, 1024)).astype(np.float32)  # 4 MiB
        more = {f"m{i}": rng.standard_normal((512, 1024)).astype(np.float32) for i in range(6)}  # 6 × 2 MiB, read in any order
        save_file({"w": w, "v": w[:8].copy(), **more}, str(d / "model.safetensors"))
        with open(d / "model.safetensors", "rb+") as fh:
            os.fsync(fh.fileno())  # clean pages: the kernel drops those when asked
            for _ in range(50):  # out of the cache, so what is cached later is only what the test reads
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                if resident(d / "model.safetensors") == 0:
                    break
                time.sleep(0.05)
        paths.append(d)
    return paths


@pytest.mark.parametrize("mode,kept,cached", [("drop", False, True), ("drop", False, False), ("keep", True, True)])
def test_what_is_read_leaves_the_page_cache(tmp_path, mode, kept, cached):
    """Defect (from disk): dropping each range right after reading it left most of a file cached (pages read moments
    ago sit in the kernel's per-CPU LRU batches, which DONTNEED skips): 80% of a 673 MB pair stayed."""
    a, b = _pair(tmp_path)
    for d in (a, b):
        if cached:
            subprocess.run(["cat", str(d / "model.safetensors")], stdout=subprocess.DEVNULL, check=True)  # cached now
            assert resident(d / "model.safetensors") > 3 << 20
    env = dict(os.environ, RLSUBNET_PAGE_CACHE=mode)
    r = subprocess.run([sys.executable, "-m", "rlsubnet.cli", "diff", str(a), str(b), "--json", "-", "-q", "--workers", "2"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    for d in (a, b):
        res = resident(d / "model.safetensors")
        # dropped: all but the header's pages (read, with the kernel's readahead, before the policy is known)
        assert (res > 3 << 20) if kept else (res < 256 << 10), (mode, res)


def test_auto_drops_only_pairs_larger_than_half_of_memory(tmp_path, monkeypatch):
    from rlsubnet.io import checkpoint as C

    a, b = _pair(tmp_path)
    with C.open_checkpoint(str(a)) as ca, C.open_checkpoint(str(b)) as cb:
        size = sum(os.path.getsize(d / "model.safetensors") for d in (a, b))
        monkeypatch.setattr(C, "available_memory", lambda: 4 * size)
        assert page_cache_policy([ca, cb], "auto") is False
        monkeypatch.setattr(C, "available_memory", lambda: size)
        assert page_cache_policy([ca, cb], "auto") is True
        assert page_cache_policy([ca, cb], "keep") is False and page_cache_policy([ca, cb], "drop") is True
        with pytest.raises(C.InputError, match="RLSUBNET_PAGE_CACHE"):
            page_cache_policy([ca], "sometimes")
