"""Benchmark: step time of masked against unmasked training (GRPO and DPO), same model, data and seed.

Runs in one script, alternating, on a random Llama-style model with a character tokenizer; reports the
median step time (first step excluded) and the optimizer-state memory of each run.
Usage: python benchmarks/bench_train.py [--steps N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from rlsubnet.masks import Subnetwork
from rlsubnet.training.recipes import TrainConfig, run_training

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import write_tiny_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    model = write_tiny_checkpoint(tmp / "model", seed=0, dtype="bfloat16", hidden=256, layers=4, heads=4, inter=688)
    sd = load_file(str(tmp / "model" / "model.safetensors"))
    rs = np.random.default_rng(0)
    Subnetwork.from_bool({n: rs.random(tuple(t.shape)) < 0.2 for n, t in sd.items()}).save(tmp / "mask.safetensors")
    nparams = sum(t.numel() for t in sd.values())
    rows = {}
    for algo in ("grpo", "dpo"):
        for label, mask in (("unmasked", None), ("masked", str(tmp / "mask.safetensors")), ("unmasked2", None), ("masked2", str(tmp / "mask.safetensors"))):
            cfg = TrainConfig(algo=algo, model=model, out=str(tmp / f"{algo}-{label}"), mask=mask, steps=args.steps, lr=1e-4,
                              batch_size=8, num_generations=4, max_new_tokens=16, n_train=64, weight_decay=0.1, reward="digits")
            r = run_training(cfg, progress=False)
            key = label.rstrip("2")
            rows.setdefault((algo, key), {"times": [], "state_bytes": r.optimizer_state_bytes})
            rows[(algo, key)]["times"] += r.step_times[1:]
    out = {"params": nparams, "steps": args.steps}
    print(f"model: {nparams:,} parameters (random Llama, hidden 256, 4 layers); mask density 20%; {args.steps} steps x 2 runs each")
    for algo in ("grpo", "dpo"):
        u, m = rows[(algo, "unmasked")], rows[(algo, "masked")]
        tu, tm = statistics.median(u["times"]), statistics.median(m["times"])
        print(f"{algo}: unmasked {tu * 1e3:.0f} ms/step, masked {tm * 1e3:.0f} ms/step, ratio {tm / tu:.3f}x; "
              f"optimizer state {u['state_bytes'] / 2**20:.1f} MiB unmasked, {m['state_bytes'] / 2**20:.1f} MiB masked")
        out[algo] = {"unmasked_s": tu, "masked_s": tm, "ratio": tm / tu, "state_unmasked": u["state_bytes"], "state_masked": m["state_bytes"]}
    Path(args.out).mkdir(exist_ok=True)
    (Path(args.out) / "bench_train.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
