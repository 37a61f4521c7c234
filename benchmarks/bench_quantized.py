"""Benchmark (issue 17): diff of an fp8 block-scaled pair against a bf16 pair holding the same stored bytes.

Both pairs are generated here in DeepSeek-V3's names (``model.layers.L.mlp.experts.E.*``, fp8 ``X.weight`` beside
float32 ``X.weight_scale_inv`` in 128×128 blocks; the bf16 pair has half as many entries, so both hold the same
bytes), with a share of the codes moved by one step (1% and 20% by default) and one block in 16 rescaled. Each diff runs in its own
subprocess (``rlsubnet diff --json``, default tolerances), best of 3 wall times from the page cache, with peak RSS;
the figure is the ratio quantized / bf16 (target ≤ 1.5).
Usage: python benchmarks/bench_quantized.py [--mb 512] [--keep]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write_pairs(out: Path, mb: int, density: float, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n_exp = max(1, mb // 8)  # experts of 3 × 1024×1024 fp8 codes (3 MiB) plus the bf16 twins
    cfg = {"model_type": "deepseek_v3", "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}
    for side in ("base", "tuned"):
        for kind in ("fp8", "bf16"):
            (out / kind / side).mkdir(parents=True, exist_ok=True)
            (out / kind / side / "config.json").write_text(json.dumps(cfg if kind == "fp8" else {"model_type": "deepseek_v3"}))
    per_shard = 8
    for shard in range(0, n_exp, per_shard):
        tens = {k: {"base": {}, "tuned": {}} for k in ("fp8", "bf16")}
        for e in range(shard, min(n_exp, shard + per_shard)):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                name = f"model.layers.{3 + e // 256}.mlp.experts.{e % 256}.{proj}.weight"
                codes = rng.integers(0, 256, (1024, 1024), dtype=np.uint8)
                codes[(codes & 0x7F) == 0x7F] = 0x30  # no NaN codes
                scale = (rng.random((8, 8), dtype=np.float32) + 0.5) * 1e-3
                tc, ts = codes.copy(), scale.copy()
                moved = rng.random(codes.shape) < density
                tc[moved] ^= 1
                tc[(tc & 0x7F) == 0x7F] = 0x30
                ts[rng.random(ts.shape) < 1 / 16] *= 1.01
                tens["fp8"]["base"][name], tens["fp8"]["base"][name + "_scale_inv"] = codes, scale
                tens["fp8"]["tuned"][name], tens["fp8"]["tuned"][name + "_scale_inv"] = tc, ts
                bf = (rng.integers(0, 1 << 16, (1024, 512), dtype=np.uint16) & np.uint16(0x807F)) | np.uint16(120 << 7)
                tb = bf.copy()
                tb[rng.random(bf.shape) < density] ^= 1
                tens["bf16"]["base"][name], tens["bf16"]["tuned"][name] = bf, tb
        for kind in ("fp8", "bf16"):
            for side in ("base", "tuned"):
                f = out / kind / side / f"model-{shard // per_shard:05d}.safetensors"
                _save(f, {k: ((("F8_E4M3" if v.dtype == np.uint8 else "F32") if kind == "fp8" else "BF16"), v)
                          for k, v in tens[kind][side].items()})
    for kind in ("fp8", "bf16"):
        for side in ("base", "tuned"):
            folder = out / kind / side
            wm = {}
            for f in sorted(folder.glob("model-*.safetensors")):
                n = int.from_bytes(f.read_bytes()[:8], "little")
                wm.update({k: f.name for k in json.loads(f.read_bytes()[8 : 8 + n]) if k != "__metadata__"})
            (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))


def _save(f: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A safetensors file written directly (numpy has no fp8 or bf16 type to hand to the library)."""
    header, off = {}, 0
    for k, (dt, arr) in tensors.items():
        header[k] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + arr.nbytes]}
        off += arr.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(f, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little") + text)
        for _, arr in tensors.values():
            fh.write(np.ascontiguousarray(arr).tobytes())


def measure(a: Path, b: Path) -> dict:
    best = None
    for _ in range(3):
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "rlsubnet.cli", "diff", str(a), str(b), "--json", "-", "-q"], capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(p.stderr[-2000:])
        best = dt if best is None else min(best, dt)
    d = json.loads(p.stdout)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"seconds": best, "peak_rss_mb": rss, "numel": d["summary"]["numel"], "changed": d["summary"]["changed"],
            "stored_bytes": sum(f.stat().st_size for f in a.glob("*.safetensors")), "quantized": d["summary"].get("quantized")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=384, help="stored bytes of each checkpoint, in MiB (about)")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--density", type=float, nargs="+", default=[0.01, 0.2], help="share of codes (bf16: entries) moved")
    args = ap.parse_args()
    results = {}
    for density in args.density:
        out = Path(args.out) / f"quantized-{density:g}"
        if not (out / "bf16" / "tuned" / "model.safetensors.index.json").exists():
            shutil.rmtree(out, ignore_errors=True)
            write_pairs(out, args.mb, density)
        print(f"-- density {density:g} (codes or bf16 entries moved; one fp8 block in 16 rescaled)")
        results[density] = one(out)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    (Path(args.out) / "bench_quantized.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))


def one(out: Path) -> dict:
    bf = measure(out / "bf16" / "base", out / "bf16" / "tuned")
    print(f"bf16 pair : {bf['stored_bytes'] / 2**20:.0f} MiB per side, {bf['numel']:,} entries: {bf['seconds']:.2f} s")
    q = measure(out / "fp8" / "base", out / "fp8" / "tuned")
    print(f"fp8 pair  : {q['stored_bytes'] / 2**20:.0f} MiB per side, {q['numel']:,} entries: {q['seconds']:.2f} s "
          f"(codes changed {q['quantized']['codes_changed']:,}, scales changed {q['quantized']['scales_changed']:,}); peak RSS of the children {q['peak_rss_mb']:.0f} MB")
    ratio = q["seconds"] / bf["seconds"]
    print(f"quantized / bf16 time at equal stored bytes: {ratio:.2f}x (target ≤ 1.5)")
    return {"bf16": bf, "fp8": q, "ratio": ratio}


if __name__ == "__main__":
    main()
