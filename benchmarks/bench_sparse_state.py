"""Benchmark: optimizer state, peak memory and step time of masked training with dense and sparse state.

(a) Optimizer alone on a generated Llama-shaped set of fp32 parameters (~0.4B by default; random
gradients, AdamW with weight decay, clipping): unmasked AdamW, masked with dense state (MaskedOptimizer),
masked with sparse state (SparseMaskedOptimizer) at densities 1%, 5%, 20% and 50%, each in its own
process (peak RSS = VmHWM of that process), median optimizer-step time (grad masking included).
(b) The real SmolLM2-135M with TRL's DPO and GRPO (a few steps each): unmasked, masked dense and masked
sparse at 5% density; optimizer-state bytes from train_log.json and the median training-step time.
Usage: python benchmarks/bench_sparse_state.py [--params-m 400] [--no-real]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = r"""
import json, statistics, sys, time
import torch
from rlsubnet.training.masked import MaskedOptimizer
from rlsubnet.training.sparse import sparse_from
variant, density, params_m, steps = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
hidden = 1024
inter = 2816
per_layer = 4 * hidden * hidden + 3 * hidden * inter
layers = max(1, params_m * 10**6 // per_layer)
mp = variant.startswith("mp_")  # bf16 weights: mp_dense = fp32 masters for every entry, mp_sparse = in the mask only
dt = torch.bfloat16 if mp else torch.float32
ps = []
for _ in range(layers):
    ps += [torch.nn.Parameter((torch.randn(hidden, hidden) * 0.02).to(dt)) for _ in range(4)]
    ps += [torch.nn.Parameter((torch.randn(inter, hidden) * 0.02).to(dt)) for _ in range(3)]
n = sum(p.numel() for p in ps)
masters = [torch.nn.Parameter(p.detach().float()) for p in ps] if variant == "mp_dense" else None
inner = torch.optim.AdamW(masters or ps, lr=1e-4, weight_decay=0.1)
masks = None
if variant == "unmasked":
    opt = inner
else:
    g = torch.Generator().manual_seed(1)
    masks = {p: torch.rand(p.shape, generator=g) < density for p in ps}
    if variant in ("dense", "mp_dense"):
        opt = MaskedOptimizer(inner, {(masters[i] if masters else p): masks[p] for i, p in enumerate(ps)})
    else:
        opt = sparse_from(inner, masks, master_dtype=torch.float32 if mp else None)
        masks = None
times = []
for s in range(steps):
    for p in ps:
        p.grad = (torch.randn(p.shape) * 1e-3).to(dt)
        if hasattr(opt, "_mask_grad"):
            opt._mask_grad(p)
    torch.nn.utils.clip_grad_norm_(ps, 1.0)
    t0 = time.perf_counter()
    if masters:  # the mixed-precision reference: bf16 grads into the fp32 masters, step, round back
        for m, p in zip(masters, ps):
            m.grad = p.grad.float().mul_(masks[p])
    elif masks is not None:
        for p in ps:
            p.grad.mul_(masks[p])
    opt.step()
    if masters:
        with torch.no_grad():
            for m, p in zip(masters, ps):
                p.copy_(m.to(torch.bfloat16))
    times.append(time.perf_counter() - t0)
state = opt.state_bytes() if hasattr(opt, "state_bytes") else sum(
    v.numel() * v.element_size() for st in (getattr(opt, "optimizer", opt)).state.values() for v in st.values() if torch.is_tensor(v))
masks_bytes = sum(m.numel() for m in opt.masks.values()) if hasattr(opt, "masks") else 0
if masters:
    state += sum(m.numel() * 4 for m in masters)  # the fp32 master copy is optimizer memory too
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM"))
print(json.dumps({"params": n, "state_bytes": state, "mask_bytes": masks_bytes, "step_s": statistics.median(times[1:] or times),
                  "peak_rss_mb": hwm / 1024}))
"""


def micro(params_m: int, steps: int) -> list[dict]:
    rows = []
    variants = [("unmasked", 1.0)] + [(v, d) for d in (0.01, 0.05, 0.2, 0.5) for v in ("dense", "sparse", "mp_dense", "mp_sparse")]
    for v, d in variants:
        p = subprocess.run([sys.executable, "-c", RUN, v, str(d), str(params_m), str(steps)], capture_output=True, text=True)
        if p.returncode != 0:  # e.g. killed for memory at ~1B parameters: say so and go on with the others
            why = "killed (out of memory?)" if p.returncode < 0 else p.stderr.strip().splitlines()[-1][:200] if p.stderr.strip() else f"exit {p.returncode}"
            print(f"  {v} at density {d:.0%}: did not finish: {why}")
            rows.append({"variant": v, "density": d, "failed": why})
            continue
        r = {"variant": v, "density": d, **json.loads(p.stdout.strip().splitlines()[-1])}
        rows.append(r)
    ok = [r for r in rows if "failed" not in r]
    base = {r["density"]: r for r in ok if r["variant"] == "dense"}
    un = rows[0]
    if "failed" in un:
        un = {"params": ok[0]["params"] if ok else 0, "state_bytes": 0, "step_s": float("nan"), "peak_rss_mb": float("nan")}
    print(f"(a) optimizer only, {un['params'] / 1e6:.0f}M fp32 parameters, AdamW: unmasked state {un['state_bytes'] / 2**20:.0f} MiB, "
          f"step {un['step_s'] * 1e3:.0f} ms, peak {un['peak_rss_mb']:.0f} MB")
    for r in ok:
        if r["variant"] != "sparse" or r["density"] not in base:
            continue
        d = base[r["density"]]  # fp32 weights
        print(f"  density {r['density']:>4.0%}: state dense {d['state_bytes'] / 2**20:.0f} MiB (+{d['mask_bytes'] / 2**20:.0f} MiB bool masks) "
              f"-> sparse {r['state_bytes'] / 2**20:.1f} MiB (positions included) = {d['state_bytes'] / r['state_bytes']:.1f}x smaller; "
              f"step {d['step_s'] * 1e3:.0f} -> {r['step_s'] * 1e3:.0f} ms ({r['step_s'] / d['step_s']:.2f}x); "
              f"peak {d['peak_rss_mb']:.0f} -> {r['peak_rss_mb']:.0f} MB")
    mpd = {r["density"]: r for r in ok if r["variant"] == "mp_dense"}
    print("  bf16 weights (masked): fp32 masters + moments for every entry -> for the masked entries only")
    for r in ok:
        if r["variant"] != "mp_sparse" or r["density"] not in mpd:
            continue
        d = mpd[r["density"]]
        per = r["state_bytes"] / r["params"]
        print(f"  density {r['density']:>4.0%}: {d['state_bytes'] / 2**20:.0f} MiB ({d['state_bytes'] / d['params']:.1f} B/param) -> "
              f"{r['state_bytes'] / 2**20:.1f} MiB ({per:.2f} B/param, 2 + {per:.2f} with the bf16 weights) = "
              f"{d['state_bytes'] / r['state_bytes']:.1f}x smaller; step {d['step_s'] * 1e3:.0f} -> {r['step_s'] * 1e3:.0f} ms "
              f"({r['step_s'] / d['step_s']:.2f}x); peak {d['peak_rss_mb']:.0f} -> {r['peak_rss_mb']:.0f} MB")
    return rows


REAL = r"""
import json, statistics, sys
from rlsubnet.training.recipes import TrainConfig, run_training
algo, model, out, mask, variant, steps = sys.argv[1:7]
kw = {"dense": {}, "sparse": {"sparse_state": True}, "master": {"sparse_state": True, "master_in_mask": True, "precision": "bf16"}}.get(variant, {})
cfg = TrainConfig(algo=algo, model=model, out=out, mask=None if mask == "-" else mask, steps=int(steps), lr=1e-5, batch_size=8,
                  num_generations=4, max_new_tokens=16, n_train=64, weight_decay=0.1, **kw)
r = run_training(cfg, progress=False)
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM"))
print(json.dumps({"state_bytes": r.optimizer_state_bytes, "step_s": statistics.median(r.step_times[1:] or r.step_times), "peak_rss_mb": hwm / 1024}))
"""


def real(steps: int, densities=(0.01, 0.05, 0.2, 0.5)) -> list[dict]:
    """SmolLM2-135M with TRL's DPO and GRPO, each variant in its own process (peak RSS = its VmHWM)."""
    import numpy as np
    from safetensors.torch import load_file

    from rlsubnet.masks import Subnetwork
    from rlsubnet.study.pipeline import default_model

    model = default_model()
    tmp = Path(tempfile.mkdtemp(prefix="sparse-", dir="bench-out"))
    sd = load_file(str(Path(model) / "model.safetensors"))
    rows = []
    for d in densities:
        rs = np.random.default_rng(0)
        Subnetwork.from_bool({n: rs.random(tuple(t.shape)) < d for n, t in sd.items()}).save(tmp / f"mask-{d}.safetensors")

    def go(algo, variant, d):
        out = tmp / f"{algo}-{variant}-{d}"
        mask = str(tmp / f"mask-{d}.safetensors") if variant != "unmasked" else "-"
        p = subprocess.run([sys.executable, "-c", REAL, algo, model, str(out), mask, variant, str(steps)], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(p.stderr[-3000:])
        return {"algo": algo, "variant": variant, "density": d, **json.loads(p.stdout.strip().splitlines()[-1])}

    for algo in ("dpo", "grpo"):
        u = go(algo, "unmasked", 1.0)
        rows.append(u)
        print(f"(b) SmolLM2-135M {algo.upper()}, {steps} steps: unmasked optimizer state {u['state_bytes'] / 2**20:.0f} MiB, "
              f"step {u['step_s']:.2f} s, peak {u['peak_rss_mb']:.0f} MB")
        for d in densities:
            dn, sp, ms = (go(algo, v, d) for v in ("dense", "sparse", "master"))
            rows += [dn, sp, ms]
            a = load_file(str(tmp / f"{algo}-dense-{d}" / "model.safetensors"))
            b = load_file(str(tmp / f"{algo}-sparse-{d}" / "model.safetensors"))
            same = all(bool((a[k] == b[k]).all()) for k in a)
            print(f"  density {d:>4.0%}: state dense {dn['state_bytes'] / 2**20:.0f} MiB -> sparse {sp['state_bytes'] / 2**20:.1f} MiB "
                  f"({dn['state_bytes'] / sp['state_bytes']:.1f}x smaller), bf16 + fp32 master in mask {ms['state_bytes'] / 2**20:.1f} MiB; "
                  f"step {dn['step_s']:.2f} / {sp['step_s']:.2f} / {ms['step_s']:.2f} s (sparse/dense {sp['step_s'] / dn['step_s']:.2f}x); "
                  f"peak {dn['peak_rss_mb']:.0f} / {sp['peak_rss_mb']:.0f} / {ms['peak_rss_mb']:.0f} MB; dense = sparse bit-identical: {same}",
                  flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params-m", type=int, default=400, help="size of the generated parameter set, in millions")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--no-real", action="store_true")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    Path(args.out).mkdir(exist_ok=True)
    out = {"micro": micro(args.params_m, args.steps)}
    if not args.no_real:
        out["real"] = real(args.steps)
    (Path(args.out) / f"bench_sparse_state-{args.params_m}M.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
