"""Benchmark: the whole-model rank pass against the reference approach (update_rank.py of the paper:
both models loaded whole, ``torch.linalg.matrix_rank`` of every 2-D delta). Ranks must be equal.
Usage: python benchmarks/bench_rank.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from synth import write_pair  # noqa: E402

OURS = """
import json, resource, sys, time
t0 = time.perf_counter()
import rlsubnet
r = rlsubnet.rank(sys.argv[1], sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "ranks": {m.name: m.rank for m in r.matrices}, "mean": r.mean_rank_ratio}))
"""
REF = """
import json, resource, sys, time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
a = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
b = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.bfloat16).state_dict()
ranks, ratios = {}, []
for name, p in a.named_parameters():
    if "layernorm" in name or "norm" in name or p.ndim <= 1:
        continue
    d = (b[name].float() - p.data.float())
    r = int(torch.linalg.matrix_rank(d).item())
    ranks[name] = r
    ratios.append(r / min(d.shape))
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "ranks": ranks, "mean": sum(ratios) / len(ratios)}))
"""


def measure(code: str, a: Path, b: Path) -> dict:
    p = subprocess.run([sys.executable, "-c", code, str(a), str(b)], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    out = Path("bench-out") / "rank"
    shutil.rmtree(out, ignore_errors=True)
    dims = dict(hidden=512, layers=4, vocab=4000, inter=1376, heads=8)
    write_pair(out, **dims)
    ours = measure(OURS, out / "base", out / "tuned")
    ref = measure(REF, out / "base", out / "tuned")
    same = ours["ranks"] == ref["ranks"]
    print(f"pair: {dims}; {len(ours['ranks'])} matrices")
    print(f"rlsubnet : {ours['seconds']:.1f} s, peak RSS {ours['peak_rss_mb']:.0f} MB, mean rank ratio {ours['mean']:.4f}")
    print(f"reference: {ref['seconds']:.1f} s, peak RSS {ref['peak_rss_mb']:.0f} MB, mean rank ratio {ref['mean']:.4f}")
    print(f"ranks equal: {same}; speed-up {ref['seconds'] / ours['seconds']:.2f}x; memory {ref['peak_rss_mb'] / ours['peak_rss_mb']:.1f}x less")
    (Path("bench-out") / "bench_rank.json").write_text(json.dumps({"ours": ours, "reference": ref, "equal": same}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    if not same:
        raise SystemExit("ranks differ")


if __name__ == "__main__":
    main()
