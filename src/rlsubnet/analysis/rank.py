"""The rank of update matrices (the paper's Table 2), one matrix at a time, singular values only."""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np
from rich.progress import Progress

from ..io.align import Pair, align
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.dtypes import widen
from ..io.errors import InputError
from ..io.jsonout import dumps
from .naming import layer_index, module_kind


@dataclass
class MatrixRank:
    name: str
    shape: list[int]
    rank: int
    max_rank: int
    rank_ratio: float
    stable_rank: float
    effective_rank: float
    kind: str
    layer: int | None


@dataclass
class RankResult:
    """Per-matrix ranks of ΔW and the paper's unweighted mean of rank ratios."""

    base: str
    tuned: str
    precision: str
    rtol: float | None
    matrices: list[MatrixRank]
    mean_rank_ratio: float
    by_kind: dict[str, float]
    excluded: list[str] = field(default_factory=list)
    device: str = "cpu"
    elapsed_s: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return dumps(self.to_dict(), indent=indent)


def _included(p: Pair) -> bool:
    return len(p.shape) == 2 and module_kind(p.name) != "norm" and "layernorm" not in p.name


def spectrum_stats(sv, rtol: float | None, shape: tuple[int, int], eps: float) -> tuple[int, float, float]:
    """(numerical rank, stable rank, effective rank) from singular values (a 1-D float tensor)."""
    s = sv.double().cpu().numpy()
    if s.size == 0 or s[0] == 0 or not np.isfinite(s).all():
        return 0, 0.0, 0.0
    tol = s[0] * (rtol if rtol is not None else max(shape) * eps)
    rank = int(np.count_nonzero(s > tol))
    stable = float(np.sum(s**2) / s[0] ** 2)
    p = s / s.sum()
    p = p[p > 0]
    eff = float(math.exp(-np.sum(p * np.log(p))))
    return rank, stable, eff


def rank_pairs(
    cb: Checkpoint,
    ct: Checkpoint,
    pairs: list[Pair],
    rtol: float | None = None,
    precision: str = "float32",
    device: str | None = None,
    progress: bool = False,
) -> RankResult:
    """Rank of every 2-D update matrix (norms and 1-D tensors excluded; embeddings and head included)."""
    from ..io.optional import need

    need("torch", what="rank (singular values)")
    import torch

    t0 = time.perf_counter()
    if precision not in ("float32", "float64"):
        raise InputError(f"--precision: {precision!r} is not float32 or float64.")
    tdt = torch.float32 if precision == "float32" else torch.float64
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    eps = float(torch.finfo(tdt).eps)
    rows: list[MatrixRank] = []
    todo = [p for p in pairs if _included(p) and not p.buffer]
    excluded: list[str] = [p.name for p in pairs if not _included(p) or p.buffer]
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("rank", total=len(todo))
        for p in todo:
            n = p.numel
            a = widen(cb.read(p.src_a, 0, n), p.a.dtype)
            b = widen(ct.read(p.src_b, 0, n), p.b.dtype)
            with np.errstate(invalid="ignore", over="ignore"):
                np.subtract(b, a, out=b)
            del a
            if not np.isfinite(b).all():
                excluded.append(f"{p.name} (its update has non-finite entries, so it has no rank)")
                bar.advance(task)
                continue
            delta = torch.from_numpy(b.reshape(p.shape)).to(device=dev, dtype=tdt)
            del b
            sv = torch.linalg.svdvals(delta)
            del delta
            r, stable, eff = spectrum_stats(sv, rtol, p.shape, eps)
            mr = min(p.shape)
            rows.append(MatrixRank(p.name, list(p.shape), r, mr, r / mr if mr else 0.0, stable, eff, module_kind(p.name), layer_index(p.name)))
            bar.advance(task)
    kinds = defaultdict(list)
    for m in rows:
        kinds[m.kind].append(m.rank_ratio)
    return RankResult(
        base=cb.path,
        tuned=ct.path,
        precision=precision,
        rtol=rtol,
        matrices=rows,
        mean_rank_ratio=float(np.mean([m.rank_ratio for m in rows])) if rows else 0.0,
        by_kind={k: float(np.mean(v)) for k, v in sorted(kinds.items())},
        excluded=excluded,
        device=dev,
        elapsed_s=time.perf_counter() - t0,
    )


def rank(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    rtol: float | None = None,
    precision: str = "float32",
    cache_dir: str | None = None,
    progress: bool = False,
    common_slice: bool = False,
) -> RankResult:
    """Open two checkpoints and compute the rank of every update matrix."""
    if rtol is not None and not (math.isfinite(rtol) and rtol >= 0):
        raise InputError(f"--rtol: {rtol!r} is not a non-negative number.")
    with open_checkpoint(base, cache_dir) as cb, open_checkpoint(tuned, cache_dir) as ct:
        pairs, _ = align(cb, ct, common_slice=common_slice)
        return rank_pairs(cb, ct, pairs, rtol=rtol, precision=precision, progress=progress)
