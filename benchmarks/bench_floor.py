"""Benchmark (issue 19): `rlsubnet diff` against reading the same bytes, from the page cache.

A ~0.95B-parameter bf16 pair (``synth.write_pair``, 20% of entries moved) is read once into the page cache, then
timed, best of 3 each, as a user waits: ``cat`` of every shard of both checkpoints to /dev/null, and
``rlsubnet diff BASE TUNED --json /dev/null -q`` (default tolerances, bf16-relative test, ULP histogram; process
start, imports and worker start included), with ``--lr-sum`` (the floor) too. Also timed: ``rlsubnet --version``
(process start and imports alone). The timed commands run with Python's bytecode cache allowed (this machine sets
PYTHONDONTWRITEBYTECODE=1, which would recompile rlsubnet's sources at every start; an installed wheel carries its
bytecode), after one untimed start that writes it. Usage: python benchmarks/bench_floor.py [--small] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from synth import write_pair  # noqa: E402

BASE_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def best(cmd: list[str], n: int = 3, env: dict | None = None) -> float:
    out = None
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**BASE_ENV, **(env or {})})
        dt = time.perf_counter() - t0
        out = dt if out is None else min(out, dt)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    out = Path(args.out) / ("floor-small" if args.small else "floor")
    dims = dict(hidden=1024, layers=4, vocab=8000, inter=2816, heads=8) if args.small else \
        dict(hidden=2048, layers=16, vocab=32000, inter=5632, heads=16)
    if not (out / "tuned" / "model.safetensors.index.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        write_pair(out, **dims)
    files = sorted(map(str, (out / "base").glob("*.safetensors"))) + sorted(map(str, (out / "tuned").glob("*.safetensors")))
    nbytes = sum(Path(f).stat().st_size for f in files)
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    exe = [sys.executable, "-m", "rlsubnet.cli"]
    t_cat = best(["cat", *files])
    subprocess.run([*exe, "--version"], check=True, stdout=subprocess.DEVNULL, env=BASE_ENV)  # writes the bytecode cache
    t_start = best([*exe, "--version"])
    d = [*exe, "diff", str(out / "base"), str(out / "tuned"), "--json", "/dev/null", "-q"]
    t_diff = best(d)  # the compiled pass where numba is installed (RLSUBNET_JIT=auto: this pair is large enough)
    t_floor = best([*d, "--lr-sum", "1e-4"])
    t_np = best(d, env={"RLSUBNET_JIT": "0"})  # the numpy probes, the baseline
    t_np_floor = best([*d, "--lr-sum", "1e-4"], env={"RLSUBNET_JIT": "0"})
    res = {"bytes": nbytes, "cat_s": t_cat, "start_s": t_start, "diff_s": t_diff, "diff_floor_s": t_floor,
           "diff_numpy_s": t_np, "diff_floor_numpy_s": t_np_floor, "ratio": t_diff / t_cat, "ratio_floor": t_floor / t_cat}
    print(f"{nbytes / 1e9:.2f} GB (both checkpoints) from the page cache: cat {t_cat:.2f} s; rlsubnet --version {t_start:.2f} s; "
          f"diff {t_diff:.2f} s ({t_diff / t_cat:.1f}x cat; numpy probes {t_np:.2f} s, {t_np / t_cat:.1f}x); "
          f"diff --lr-sum {t_floor:.2f} s ({t_floor / t_cat:.1f}x cat; numpy probes {t_np_floor:.2f} s, {t_np_floor / t_cat:.1f}x)")
    Path(args.out).mkdir(exist_ok=True)
    (Path(args.out) / "bench_floor.json").write_text(json.dumps(res, indent=2))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
