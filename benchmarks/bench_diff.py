"""Benchmark: rlsubnet diff against the reference approach on a ~0.95B-parameter bf16 pair.

Both run in subprocesses of this script, on the same files, one after the other; the figures are their
wall time and peak RSS and the ratios between them. Counts must be identical.
Usage: python benchmarks/bench_diff.py [--small] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from synth import write_pair  # noqa: E402


def measure(script: str, a: Path, b: Path) -> dict:
    p = subprocess.run([sys.executable, str(HERE / script), str(a), str(b)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{script} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="a 4-layer, hidden-1024 pair (quick check)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints in bench-out/")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    out = Path(args.out) / ("diff-small" if args.small else "diff")
    dims = dict(hidden=1024, layers=4, vocab=8000, inter=2816, heads=8) if args.small else \
        dict(hidden=2048, layers=16, vocab=32000, inter=5632, heads=16)
    t0 = time.perf_counter()
    if not (out / "tuned" / "model.safetensors.index.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        write_pair(out, **dims)
    print(f"pair ready in {out} ({time.perf_counter() - t0:.0f} s): {dims}")
    ours = measure("_run_rlsubnet.py", out / "base", out / "tuned")
    print(f"rlsubnet : {ours['seconds']:.2f} s, peak RSS {ours['peak_rss_mb']:.0f} MB, {ours['numel']:,} params")
    ref = measure("_run_reference.py", out / "base", out / "tuned")
    print(f"reference: {ref['seconds']:.2f} s, peak RSS {ref['peak_rss_mb']:.0f} MB")
    same = ours["numel"] == ref["numel"] and ours["atol"] == ref["atol"] and ours["changed"] == ref["changed"]
    print(f"counts identical: {same}  (changed {ours['changed']:,}; per tolerance {ours['atol']})")
    print(f"speed-up: {ref['seconds'] / ours['seconds']:.1f}x   memory ratio: {ref['peak_rss_mb'] / ours['peak_rss_mb']:.1f}x less")
    (Path(args.out) / "bench_diff.json").write_text(json.dumps({"ours": ours, "reference": ref, "identical": same, "dims": dims}, indent=2))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    if not same:
        raise SystemExit("counts differ")


if __name__ == "__main__":
    main()
