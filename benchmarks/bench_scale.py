"""Benchmark (issue 19): diff throughput on a pair in DeepSeek-V3's layout, scaled down, by engine and workers.

The pair is generated here: DeepSeek-V3's shard naming (``model-0000K-of-000163.safetensors`` with an index) and
tensor names (``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`` in fp8 with float32
``weight_scale_inv`` in 128×128 blocks, bf16 norms), 2% of the codes moved and one block in 16 rescaled.
Measured, each as a user waits for it (a fresh ``rlsubnet diff`` process, best of 2, files in the page cache):
the local engine with 1 and 2 workers, the Ray engine on a local cluster of 1 and 2 CPUs, and the local engine
reading the pair from an S3-protocol server (moto, on this machine). Reported: GB/s of stored bytes (both
checkpoints) per setting and per worker, and the projection to DeepSeek-V3-Base → R1-Zero (2 × 688 GB) on N
such nodes. With ``--big-mb``, a second, larger pair separates each setting's fixed cost from its marginal rate.
Usage: python benchmarks/bench_scale.py [--mb 512] [--big-mb 2048] [--no-s3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from bench_quantized import _save  # noqa: E402

FULL_PAIR_BYTES = 2 * 688e9  # DeepSeek-V3-Base + DeepSeek-R1-Zero as published (fp8 with block scales)


def write_pair(out: Path, mb: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n_exp = max(2, mb // 3)  # experts of 3 × (1024 × 1024) fp8 codes: 3 MiB each
    per_shard = 16
    n_shards = (n_exp + per_shard - 1) // per_shard
    cfg = {"model_type": "deepseek_v3", "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}
    for side in ("base", "tuned"):
        (out / side).mkdir(parents=True, exist_ok=True)
        (out / side / "config.json").write_text(json.dumps(cfg))
    wm = {}
    for s in range(n_shards):
        tens = {"base": {}, "tuned": {}}
        name_f = f"model-{s + 1:05d}-of-000163.safetensors"
        for e in range(s * per_shard, min(n_exp, (s + 1) * per_shard)):
            L = 3 + e // 256
            for proj in ("gate_proj", "up_proj", "down_proj"):
                name = f"model.layers.{L}.mlp.experts.{e % 256}.{proj}.weight"
                codes = rng.integers(0, 256, (1024, 1024), dtype=np.uint8)
                codes[(codes & 0x7F) == 0x7F] = 0x30
                scale = (rng.random((8, 8), dtype=np.float32) + 0.5) * 1e-3
                tc, ts = codes.copy(), scale.copy()
                tc[rng.random(codes.shape) < 0.02] ^= 1
                tc[(tc & 0x7F) == 0x7F] = 0x30
                ts[rng.random(ts.shape) < 1 / 16] *= 1.01
                for side, (c, sc) in (("base", (codes, scale)), ("tuned", (tc, ts))):
                    tens[side][name] = ("F8_E4M3", c)
                    tens[side][name + "_scale_inv"] = ("F32", sc)
                wm[name] = wm[name + "_scale_inv"] = name_f
            norm = f"model.layers.{L}.post_attention_layernorm.weight"
            if norm not in wm:
                v = np.full(1024, 0x3F80, np.uint16)
                for side in ("base", "tuned"):
                    tens[side][norm] = ("BF16", v)
                wm[norm] = name_f
        for side in ("base", "tuned"):
            _save(out / side / name_f, tens[side])
    for side in ("base", "tuned"):
        (out / side / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def _stored(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def time_diff(a: str, b: str, *extra: str, env=None) -> tuple[float, dict]:
    best, out = None, None
    for _ in range(2):
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "rlsubnet.cli", "diff", a, b, "--json", "-", "-q", *extra], capture_output=True, text=True, env=env)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(p.stderr[-2000:])
        best = dt if best is None else min(best, dt)
        out = json.loads(p.stdout)
    return best, out


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_legs(a: str, b: str, tmp_root: Path, record) -> None:
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    if not ray:
        return
    for w in (1, 2):
        port = _port()
        tmp = tmp_root / f"ray-tmp-{w}"
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        subprocess.run([ray, "start", "--head", "--port", str(port), "--num-cpus", str(w), "--include-dashboard", "false",
                        "--temp-dir", str(tmp.resolve()), "--disable-usage-stats"], check=True, capture_output=True, env=env)
        try:
            record(f"ray, {w} worker(s)", w, *time_diff(a, b, "--engine", "ray", "--ray-address", f"127.0.0.1:{port}"))
        finally:
            subprocess.run([ray, "stop", "--force"], capture_output=True, env=env)
            shutil.rmtree(tmp, ignore_errors=True)


def _s3_legs(out: Path, record) -> None:
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError:
        return
    port = _port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
           "AWS_DEFAULT_REGION": "us-east-1"}
    c = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1")
    c.create_bucket(Bucket="bench")
    for side in ("base", "tuned"):
        for f in (out / side).iterdir():
            c.upload_file(str(f), "bench", f"{side}/{f.name}")
    try:
        for w in (1, 2):
            record(f"local from S3 (moto), {w} worker(s)", w, *time_diff("s3://bench/base", "s3://bench/tuned", "--workers", str(w), env=env))
    finally:
        server.stop()


def measure(out: Path, mb: int, tmp_root: Path, s3: bool) -> tuple[int, list[dict]]:
    """Every setting on one generated pair of about ``mb`` MiB a side: (stored bytes of both sides, rows)."""
    if not (out / "tuned" / "model.safetensors.index.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        write_pair(out, mb)
    a, b = str(out / "base"), str(out / "tuned")
    nbytes = _stored(out / "base") + _stored(out / "tuned")
    subprocess.run(["cat", *map(str, sorted((out / "base").glob("*.safetensors")) + sorted((out / "tuned").glob("*.safetensors")))],
                   stdout=subprocess.DEVNULL, check=True)  # into the page cache
    rows: list[dict] = []
    ref = None

    def record(label, workers, seconds, res):
        nonlocal ref
        summary = {k: res["summary"][k] for k in ("numel", "changed")} | {"quantized": res["summary"].get("quantized")}
        if ref is None:
            ref = summary
        gbs = nbytes / seconds / 1e9
        rows.append({"setting": label, "workers": workers, "seconds": seconds, "GB/s": gbs, "GB/s per worker": gbs / workers,
                     "identical": summary == ref})
        print(f"{label:<36} {seconds:6.2f} s  {gbs:5.2f} GB/s  ({gbs / workers:4.2f} per worker)  same answer: {summary == ref}")

    print(f"pair: {nbytes / 1e9:.2f} GB stored (both checkpoints), {len(list((out / 'base').glob('*.safetensors')))} shards each")
    for w in (1, 2):
        record(f"local, {w} worker(s)", w, *time_diff(a, b, "--workers", str(w)))
    _ray_legs(a, b, tmp_root, record)
    if s3:
        _s3_legs(out, record)
    return nbytes, rows


def marginal(small: tuple[int, list[dict]], big: tuple[int, list[dict]]) -> list[dict]:
    """Per setting measured on both pairs: the fixed cost (the intercept: process start, imports, worker start,
    connecting to the cluster) and the marginal rate (extra bytes over extra seconds), the rate at scale."""
    out = []
    by = {r["setting"]: r for r in big[1]}
    for r in small[1]:
        q = by.get(r["setting"])
        if q is None or q["seconds"] <= r["seconds"]:
            continue
        rate = (big[0] - small[0]) / (q["seconds"] - r["seconds"]) / 1e9
        fixed = r["seconds"] - small[0] / 1e9 / rate
        out.append({"setting": r["setting"], "workers": r["workers"], "fixed_s": fixed, "marginal GB/s": rate,
                    "marginal GB/s per worker": rate / r["workers"]})
        print(f"{r['setting']:<36} fixed {fixed:5.1f} s, then {rate:5.2f} GB/s ({rate / r['workers']:4.2f} per worker)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=512, help="stored MiB of each checkpoint (about)")
    ap.add_argument("--big-mb", type=int, default=0, help="also time a pair of this many MiB a side (no S3 legs) and report "
                    "each setting's fixed cost and marginal rate from the two sizes")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-s3", action="store_true", help="skip the legs from the S3-protocol server (moto: minutes)")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(exist_ok=True)
    small = measure(root / "scale", args.mb, root, s3=not args.no_s3)
    nbytes, rows = small
    result = {"bytes": nbytes, "rows": rows}
    best = max(r["GB/s per worker"] for r in rows if r["setting"].startswith("local,"))
    basis = "the best local rate per worker"
    if args.big_mb:
        big = measure(root / "scale-big", args.big_mb, root, s3=False)
        result["big"] = {"bytes": big[0], "rows": big[1]}
        result["marginal"] = marginal(small, big)
        local = [m["marginal GB/s per worker"] for m in result["marginal"] if m["setting"].startswith("local,")]
        if local:
            best, basis = max(local), "the best marginal local rate per worker"
        if not args.keep:
            shutil.rmtree(root / "scale-big", ignore_errors=True)
    print(f"projection for DeepSeek-V3-Base -> R1-Zero ({FULL_PAIR_BYTES / 1e12:.2f} TB) at {basis} "
          f"({best:.2f} GB/s), if reads scale with workers: " + ", ".join(
              f"{n} node(s) × 16 workers: {FULL_PAIR_BYTES / (best * 16 * n * 1e9) / 60:.0f} min" for n in (1, 4, 16)))
    (root / "bench_scale.json").write_text(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(root / "scale", ignore_errors=True)


if __name__ == "__main__":
    main()
