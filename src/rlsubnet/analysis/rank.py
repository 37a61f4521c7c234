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


def matrix_rank(cb: Checkpoint, ct: Checkpoint, p: Pair, rtol: float | None, precision: str, device: str | None):
    """The rank of one update matrix, read where this runs: ``(MatrixRank | None, why excluded | None, device)``."""
    import torch

    tdt = torch.float32 if precision == "float32" else torch.float64
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    n = p.numel
    a = widen(cb.read(p.src_a, 0, n), p.a.dtype)
    b = widen(ct.read(p.src_b, 0, n), p.b.dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        np.subtract(b, a, out=b)
    del a
    if not np.isfinite(b).all():
        return None, f"{p.name} (its update has non-finite entries, so it has no rank)", dev
    delta = torch.from_numpy(b.reshape(p.shape)).to(device=dev, dtype=tdt)
    del b
    sv = torch.linalg.svdvals(delta)
    del delta
    r, stable, eff = spectrum_stats(sv, rtol, p.shape, float(torch.finfo(tdt).eps))
    mr = min(p.shape)
    return MatrixRank(p.name, list(p.shape), r, mr, r / mr if mr else 0.0, stable, eff, module_kind(p.name), layer_index(p.name)), None, dev


def _rank_task(shared: list, p: Pair, rtol, precision, device):
    from .engine import ray_shared

    cb, ct = ray_shared(shared)
    return matrix_rank(cb, ct, p, rtol, precision, device)


def _ranks_on_ray(cb, ct, todo: list[Pair], rtol, precision, device, address, bar, task):
    """:func:`matrix_rank` of every matrix as a Ray task (each reads its own two matrices where it runs; the
    checkpoints travel as their index), in the order of ``todo`` whatever order they finish in."""
    from .engine import ray_connect, ray_failure

    ray = ray_connect(address)
    remote = ray.remote(max_retries=3, retry_exceptions=[OSError])(_rank_task)
    shared = [ray.put(cb), ray.put(ct)]  # in a list: each worker deserializes the checkpoints' indexes once, not per task
    refs = {remote.remote(shared, p, rtol, precision, device): k for k, p in enumerate(todo)}
    out: list = [None] * len(todo)
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            k = refs[done[0]]
            try:
                out[k] = ray.get(done[0])
            except ray.exceptions.RayError as e:
                raise ray_failure(e, todo[k].name, "computing its rank") from None
            bar.advance(task)
    finally:
        for r in pending:
            ray.cancel(r, force=True)
    return out


def rank_pairs(
    cb: Checkpoint,
    ct: Checkpoint,
    pairs: list[Pair],
    rtol: float | None = None,
    precision: str = "float32",
    device: str | None = None,
    progress: bool = False,
    engine: str = "local",
    ray_address: str | None = None,
) -> RankResult:
    """Rank of every 2-D update matrix (norms and 1-D tensors excluded; embeddings and head included), one matrix
    at a time here, or each as a task on a Ray cluster (``engine="ray"``: the same answer, matrix for matrix)."""
    from ..io.optional import need

    need("torch", what="rank (singular values)")
    t0 = time.perf_counter()
    if precision not in ("float32", "float64"):
        raise InputError(f"--precision: {precision!r} is not float32 or float64.")
    if engine not in ("local", "ray"):
        raise InputError(f"--engine: {engine!r} is not local or ray.")
    todo = [p for p in pairs if _included(p) and not p.buffer]
    excluded: list[str] = [p.name for p in pairs if not _included(p) or p.buffer]
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("rank" + (" (ray)" if engine == "ray" else ""), total=len(todo))
        if engine == "ray":
            got = _ranks_on_ray(cb, ct, todo, rtol, precision, device, ray_address, bar, task)
        else:
            got = []
            for p in todo:
                got.append(matrix_rank(cb, ct, p, rtol, precision, device))
                bar.advance(task)
    rows = [m for m, _, _ in got if m is not None]
    excluded += [why for _, why, _ in got if why is not None]
    devices = sorted({d for _, _, d in got})
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
        device=",".join(devices) if devices else (device or "cpu"),
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
    engine: str = "local",
    ray_address: str | None = None,
) -> RankResult:
    """Open two checkpoints and compute the rank of every update matrix (``engine="ray"``: each on a Ray cluster)."""
    if rtol is not None and not (math.isfinite(rtol) and rtol >= 0):
        raise InputError(f"--rtol: {rtol!r} is not a non-negative number.")
    with open_checkpoint(base, cache_dir) as cb, open_checkpoint(tuned, cache_dir) as ct:
        pairs, _ = align(cb, ct, common_slice=common_slice)
        return rank_pairs(cb, ct, pairs, rtol=rtol, precision=precision, progress=progress, engine=engine, ray_address=ray_address)
