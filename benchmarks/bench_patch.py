"""Benchmark: rlsubnet-patch/1 size, speed and memory against the baselines of the field.

Pairs: (a) the real SmolLM2-135M (bf16) per-step deltas of a short GRPO run and its final-vs-init delta,
when the model is installed; (b) generated bf16 pairs with 1%, 5% and 20% of the entries moved by 1-3 ULPs.
Sizes: the tuned checkpoint; zstd of it; the plain encoding (int32 positions + raw values, what verl's
``delta_sharded`` sends); that plain encoding zstd-compressed (grail-style); our patch; and the empirical
entropy floor of the update (per tensor log2 C(n, k) bits for the positions, plus k times the zeroth-order
entropy of the value changes, the best of new bits / XOR / difference): no lossless code beats it on
average for an update whose positions and value changes are drawn independently.
Times: create and apply (each in its own process, with its peak RSS) against `rlsubnet diff` on the same
pair and against reading both checkpoints.
Usage: python benchmarks/bench_patch.py [--no-real] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from synth import write_pair  # noqa: E402

RUN = r"""
import json, sys, time
import rlsubnet, rlsubnet.deltas  # imports are not part of the measured time
from rlsubnet.deltas import apply, create
from rlsubnet.io import open_checkpoint
what, a, b, out = sys.argv[1:5]
t0 = time.perf_counter()
if what == "create":
    create(a, b, out)
elif what == "apply":
    apply(a, [b], out)
elif what == "diff":
    rlsubnet.diff(a, b, workers=1)
elif what == "read":
    for p in (a, b):
        for f in open_checkpoint(p).files:
            with open(f, "rb", buffering=0) as fh:
                while fh.read(1 << 24):
                    pass
el = time.perf_counter() - t0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the parent, which may have trained a model
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM"))
print(json.dumps({"seconds": el, "peak_rss_mb": hwm / 1024}))
"""


def measure(what: str, a, b, out="") -> dict:
    p = subprocess.run([sys.executable, "-c", RUN, what, str(a), str(b), str(out)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{what} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _h(counts: np.ndarray) -> float:
    """Total bits of a zeroth-order code for symbols with these counts."""
    c = counts[counts > 0].astype(np.float64)
    n = c.sum()
    return float(-(c * np.log2(c / n)).sum()) if n else 0.0


def sizes(base: Path, tuned: Path) -> dict:
    """Baseline sizes and the entropy floor, in one streaming pass over the pair."""
    import zstandard

    from rlsubnet.deltas.format import CHUNK
    from rlsubnet.io import iter_chunks, open_checkpoint

    cz = zstandard.ZstdCompressor(level=3)
    full = full_z = plain = 0
    plain_z = cz.compressobj()
    plain_zn = 0
    pos_bits = 0.0
    hist = {k: np.zeros(1 << 16, np.int64) for k in ("raw", "xor", "sub")}
    with open_checkpoint(base) as cb, open_checkpoint(tuned) as ct:
        for f in ct.files:
            full += os.path.getsize(f)
            with open(f, "rb") as fh:
                full_z += len(cz.compress(fh.read()))
        for name, info in cb.tensors.items():
            k = 0
            for s, c in iter_chunks(info.numel, CHUNK):
                a, b = cb.read(name, s, c), ct.read(name, s, c)
                idx = np.flatnonzero(a != b)
                k += idx.size
                if idx.size:
                    nv, ov = b[idx], a[idx]
                    blob = (idx + s).astype(np.int32).tobytes() + nv.tobytes()
                    plain += len(blob)
                    plain_zn += len(plain_z.compress(blob))
                    if info.dtype.itemsize == 2:
                        for key, v in (("raw", nv), ("xor", nv ^ ov), ("sub", (nv - ov).astype(np.uint16))):
                            hist[key] += np.bincount(v.astype(np.int64), minlength=1 << 16)
            n = info.numel
            if 0 < k < n:  # log2 C(n, k) via lgamma
                pos_bits += (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)
    plain_zn += len(plain_z.flush())
    val_bits = min(_h(h) for h in hist.values())
    return {"tuned_checkpoint": full, "tuned_zstd": full_z, "plain": plain, "plain_zstd": plain_zn,
            "entropy_floor": int(math.ceil((pos_bits + val_bits) / 8)), "entropy_positions": int(pos_bits / 8),
            "entropy_values": int(val_bits / 8)}


def bench_pair(label: str, base: Path, tuned: Path, work: Path) -> dict:
    from rlsubnet.deltas import info

    patch = work / f"{label}.rlspatch"
    cr = measure("create", base, tuned, patch)
    ap = measure("apply", base, patch, work / f"{label}-applied")
    df = measure("diff", base, tuned)
    rd = measure("read", base, tuned)
    i = info(patch)
    s = sizes(base, tuned)
    shutil.rmtree(work / f"{label}-applied", ignore_errors=True)
    streams = i["sizes"]["positions"] + i["sizes"]["values"] + i["sizes"]["header"]
    row = {"pair": label, "numel": i["numel"], "changed": i["changed"], "patch": i["sizes"]["total"], "patch_tensors": streams,
           "patch_positions": i["sizes"]["positions"], "patch_values": i["sizes"]["values"], **s,
           "create_s": cr["seconds"], "create_rss_mb": cr["peak_rss_mb"], "apply_s": ap["seconds"],
           "apply_rss_mb": ap["peak_rss_mb"], "diff_s": df["seconds"], "read_both_s": rd["seconds"],
           "encodings": i["encodings"]}
    p = row["patch"]
    print(f"{label}: {row['changed']:,} of {row['numel']:,} changed ({row['changed'] / row['numel']:.3%})")
    print(f"  patch {p:,} B | full {s['tuned_checkpoint'] / p:.1f}x | zstd(full) {s['tuned_zstd'] / p:.1f}x | "
          f"plain {s['plain'] / p:.2f}x | zstd(plain) {s['plain_zstd'] / p:.2f}x | entropy floor {s['entropy_floor']:,} B "
          f"(patch = {p / max(s['entropy_floor'], 1):.2f}x the floor)")
    print(f"  tensor part only (positions + values + header, no config/tokenizer files): {streams:,} B = "
          f"{s['plain'] / streams:.2f}x smaller than plain, {streams / max(s['entropy_floor'], 1):.2f}x the floor")
    print(f"  create {cr['seconds']:.2f} s ({cr['peak_rss_mb']:.0f} MB) = {cr['seconds'] / df['seconds']:.2f}x diff "
          f"({df['seconds']:.2f} s), {cr['seconds'] / rd['seconds']:.2f}x reading both ({rd['seconds']:.2f} s); "
          f"apply {ap['seconds']:.2f} s ({ap['peak_rss_mb']:.0f} MB)")
    return row


def real_pairs(work: Path) -> list[tuple[str, Path, Path]]:
    """A short GRPO run on SmolLM2 with a checkpoint after every step (skipped when the model is missing)."""
    from rlsubnet.study.pipeline import default_model
    from rlsubnet.training.recipes import TrainConfig, run_training

    try:
        model = default_model()
    except Exception as e:
        print(f"real model unavailable ({e}); generated pairs only")
        return []
    run = work / "grpo"
    if not (run / "train_log.json").exists():
        run_training(TrainConfig(algo="grpo", model=model, out=str(run), steps=3, lr=1e-5, save_every=1, batch_size=8,
                                 num_generations=4, max_new_tokens=16), progress=True, label="bench grpo")
    return [("smollm2-grpo step1->2", run / "step-1", run / "step-2"),
            ("smollm2-grpo step2->3", run / "step-2", run / "step-3"),
            ("smollm2-grpo final-vs-init", Path(model), run)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--no-real", action="store_true", help="generated pairs only")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="patch-", dir=out))
    rows = []
    t0 = time.perf_counter()
    try:
        pairs = [] if args.no_real else real_pairs(out / "patch-real")
        for density in (0.01, 0.05, 0.2):
            d = work / f"gen{density}"
            write_pair(d, hidden=1024, layers=4, vocab=8000, inter=2816, heads=8, density=density)
            pairs.append((f"generated {density:.0%}", d / "base", d / "tuned"))
        for label, a, b in pairs:
            rows.append(bench_pair(label.replace(" ", "_").replace(">", ""), a, b, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (out / "bench_patch.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {out / 'bench_patch.json'} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
