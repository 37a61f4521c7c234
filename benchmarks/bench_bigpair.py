"""Benchmark (issue 19, item 3): a pair larger than memory, from disk, against sequential reads of its files.

Generates (once, kept under ``--out``) a bf16 pair whose files together exceed half of this machine's memory
(``--gb`` per checkpoint, default 12), then, each time after dropping every file from the page cache
(``posix_fadvise(DONTNEED)``):

1. reads both checkpoints' files front to back in 16 MiB blocks (what ``dd bs=16M`` does), timed;
2. runs ``rlsubnet diff BASE TUNED --json /dev/null -q`` under ``/usr/bin/time -v`` (peak RSS), timed;

and reports the throughput ratio, the peak RSS, and how much of the pair the page cache holds afterwards
(``fincore``; with the default ``RLSUBNET_PAGE_CACHE=auto`` a pair this large is not kept).
Usage: python benchmarks/bench_bigpair.py [--gb 12] [--out bench-out] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from synth import write_pair  # noqa: E402


def drop(files: list[str]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident(files: list[str]) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *files], capture_output=True, text=True)
    return sum(int(x) for x in out.stdout.split()) if out.returncode == 0 else -1


def sequential_read(files: list[str]) -> float:
    buf = bytearray(16 << 20)
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=12.0, help="size of each checkpoint in GB")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--keep", action="store_true", help="keep the generated pair")
    args = ap.parse_args()
    out = Path(args.out) / f"bigpair-{args.gb:g}"
    layers = max(1, round(args.gb * 1e9 / 2 / (4 * 4096 * 4096 + 3 * 4096 * 11008)))  # Llama-7B-shaped layers
    if not (out / "tuned" / "model.safetensors.index.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        write_pair(out, hidden=4096, layers=layers, vocab=32000, inter=11008, heads=32, density=0.05)
        print(f"generated {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    files = sorted(map(str, (out / "base").glob("*.safetensors"))) + sorted(map(str, (out / "tuned").glob("*.safetensors")))
    nbytes = sum(os.path.getsize(f) for f in files)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    drop(files)
    t_read = sequential_read(files)
    drop(files)
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "rlsubnet.cli", "diff", str(out / "base"), str(out / "tuned"),
                        "--json", "/dev/null", "-q"], capture_output=True, text=True)
    t_diff = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) * 1024
    cached = resident(files)
    res = {"bytes": nbytes, "memory": mem, "read_s": t_read, "diff_s": t_diff, "read_GBps": nbytes / t_read / 1e9,
           "diff_GBps": nbytes / t_diff / 1e9, "ratio": t_diff / t_read, "diff_peak_rss": rss, "cached_after": cached}
    print(f"{nbytes / 1e9:.1f} GB pair ({nbytes / mem:.2f}x memory) from disk: sequential read {t_read:.1f} s "
          f"({res['read_GBps']:.2f} GB/s); rlsubnet diff {t_diff:.1f} s ({res['diff_GBps']:.2f} GB/s, {res['ratio']:.2f}x the read); "
          f"peak RSS of the largest diff process {rss / 1e6:.0f} MB; page cache holding {cached / 1e6:.0f} MB of the pair afterwards")
    Path(args.out).mkdir(exist_ok=True)
    (Path(args.out) / "bench_bigpair.json").write_text(json.dumps(res, indent=2))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
