"""Benchmark (issue 18): live delta sync, publish + apply time per step against density and model size.

A model of fp32 master weights (dict of tensors) is published in bf16 (``DeltaPublisher``) and applied to a bf16
copy (``apply_delta``), three steps per setting, each step moving a given share of the entries by enough to
change their bf16 value; the figure is the median per step. The baseline is the publisher and ``apply_delta``
of the previous release (``git show d513499:src/rlsubnet/deltas/live.py``), loaded beside the current one and
run on the same steps in the same process. Changes are spread over every tensor (an unmasked step: every tensor
must then be hashed, the format's tensor hashes being of whole tensors) or packed into as few tensors as hold them.
Target: at 1% density, current ≤ 0.25x the baseline on the 63M model.
Usage: python benchmarks/bench_live.py [--sizes 16,63] [--densities 0.001,0.01,0.1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BASELINE_COMMIT = "d513499"


def load_baseline():
    try:
        src = subprocess.check_output(["git", "show", f"{BASELINE_COMMIT}:src/rlsubnet/deltas/live.py"], cwd=ROOT, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError):
        return None
    import rlsubnet.deltas  # noqa: F401  (the package its relative imports resolve in)

    spec = importlib.util.spec_from_loader("rlsubnet.deltas._live_baseline", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "rlsubnet.deltas"
    exec(compile(src, "live_baseline.py", "exec"), mod.__dict__)
    return mod


def model(millions: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    per = 4 * 1024 * 1024  # 4M entries a tensor
    return {f"layers.{i}.weight": torch.randn(per // 2048, 2048, generator=g) * 0.02 for i in range(max(1, millions * 1_000_000 // per))}


def move(sd: dict, density: float, g: torch.Generator, spread: str = "all") -> None:
    """Move ``density`` of all entries: spread over every tensor (an unmasked step), or packed into as few tensors
    as hold them (a subnetwork confined to some tensors)."""
    ts = list(sd.values())
    total = sum(t.numel() for t in ts)
    todo = max(1, int(density * total))
    if spread == "all":
        for t in ts:
            flat = t.view(-1)
            idx = torch.randperm(flat.numel(), generator=g)[: max(1, int(density * flat.numel()))]
            flat[idx] *= 1.05  # changes the bf16 value
        return
    for t in ts[int(torch.randint(len(ts), (1,), generator=g)):] + ts:
        flat = t.view(-1)
        k = min(todo, flat.numel())
        flat[torch.randperm(flat.numel(), generator=g)[:k]] *= 1.05
        todo -= k
        if todo <= 0:
            return


def run(impl, sd: dict, density: float, spread: str) -> dict:
    master = {k: v.clone() for k, v in sd.items()}
    target = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    pub = impl.DeltaPublisher(master)
    g = torch.Generator().manual_seed(1)
    pubs, apps, sizes = [], [], []
    for _ in range(3):
        move(master, density, g, spread)
        t0 = time.perf_counter()
        payload = pub.delta()
        t1 = time.perf_counter()
        impl.apply_delta(target, payload)
        t2 = time.perf_counter()
        pubs.append(t1 - t0)
        apps.append(t2 - t1)
        sizes.append(len(payload))
    assert all(torch.equal(target[k], master[k].to(torch.bfloat16)) for k in master)
    return {"publish_s": statistics.median(pubs), "apply_s": statistics.median(apps), "payload_bytes": statistics.median(sizes)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16,63", help="model sizes in millions of parameters")
    ap.add_argument("--densities", default="0.001,0.01,0.1")
    ap.add_argument("--spread", default="all,packed", help="all: every tensor changes; packed: the changes fill as few tensors as they can")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    import rlsubnet.deltas.live as current

    base = load_baseline()
    rows = []
    for m in map(int, args.sizes.split(",")):
        sd = model(m)
        n = sum(t.numel() for t in sd.values())
        for spread, d in ((s, d) for s in args.spread.split(",") for d in map(float, args.densities.split(","))):
            now = run(current, sd, d, spread)
            ref = run(base, sd, d, spread) if base is not None else None
            row = {"params": n, "density": d, "spread": spread, "current": now, "baseline": ref}
            tot, rtot = now["publish_s"] + now["apply_s"], (ref["publish_s"] + ref["apply_s"]) if ref else None
            row["ratio"] = tot / rtot if rtot else None
            rows.append(row)
            print(f"{n / 1e6:5.0f}M params, {spread:>6}, density {d:<6g}: publish {now['publish_s']:.3f} s + apply {now['apply_s']:.3f} s"
                  + (f"  | baseline {ref['publish_s']:.3f} + {ref['apply_s']:.3f} s  -> {row['ratio']:.2f}x" if ref else "")
                  + f"  ({now['payload_bytes'] / 1e6:.2f} MB a step)")
    Path(args.out).mkdir(exist_ok=True)
    (Path(args.out) / "bench_live.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
