"""How close two models finetuned from one init are (the paper's θ_sub vs θ_full), and where a model
moved relative to a mask (the frozen-entry check of masked training)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from ..analysis.diff import DEFAULT_ATOL, check_tolerances
from ..analysis.engine import Job, map_chunks
from ..analysis.probes import atol_exceed, differing
from ..io.align import align
from ..io.checkpoint import open_checkpoint
from ..io.dtypes import dot
from ..io.errors import InputError
from ..io.jsonout import dumps
from .subnetwork import Subnetwork


@dataclass
class ClosenessResult:
    init: str
    a: str
    b: str
    numel: int
    atol: list[dict]  # [{"atol", "equal", "equal_fraction"}]
    tensors: list[dict]
    mask: str | None = None
    inside_mask: list[dict] | None = None
    outside_mask: list[dict] | None = None
    mask_numel: int | None = None
    rel_l2: float = 0.0  # ||A−B|| / ||A−INIT|| over all compared parameters
    skipped: list[dict] = field(default_factory=list)

    def equal_fraction(self, tol: float) -> float:
        return next(x["equal_fraction"] for x in self.atol if x["atol"] == tol)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return dumps(self.to_dict(), indent=indent)


def _eq_list(tols, exceed, numel):
    return [{"atol": t, "equal": int(numel - e), "equal_fraction": (numel - e) / numel if numel else 1.0} for t, e in zip(tols, exceed)]


def _check_mask(mask: Subnetwork, pairs, what: str) -> None:
    for p in pairs:
        if p.name in mask.shapes and tuple(mask.shapes[p.name]) != tuple(p.shape):
            raise InputError(f"{mask.path}: mask shape {list(mask.shapes[p.name])} of '{p.name}' does not match {what} {list(p.shape)}.")
    missing = [p.name for p in pairs if p.name not in mask.shapes]
    if missing:
        raise InputError(f"{mask.path}: mask has no entry for parameter '{missing[0]}'.")


def closeness(init: str | os.PathLike, a: str | os.PathLike, b: str | os.PathLike,
              mask: str | os.PathLike | Subnetwork | None = None, atol=DEFAULT_ATOL,
              workers: int | None = None, progress: bool = False, cache_dir: str | None = None,
              engine: str = "local", ray_address: str | None = None) -> ClosenessResult:
    """Fraction of parameters where A and B are equal at each tolerance (|A−B| ≤ tol; 0 = same bits)."""
    tols_user = check_tolerances(atol)
    tols = np.unique(np.array(tols_user))
    pos = [int(np.searchsorted(tols, t)) for t in tols_user]
    m = mask if mask is None or isinstance(mask, Subnetwork) else Subnetwork.load(mask)
    init, a, b = str(init), str(a), str(b)
    with open_checkpoint(init, cache_dir) as ci, open_checkpoint(a, cache_dir) as ca, open_checkpoint(b, cache_dir) as cb:
        pairs_ab, skipped = align(ca, cb)
        pairs_ia, _ = align(ci, ca)
        init_src = {p.name: p.src_a for p in pairs_ia if not p.sliced}
        pairs = [p for p in pairs_ab if p.name in init_src and not p.sliced and not p.buffer]
        if not pairs:
            raise InputError(f"{init}, {a} and {b}: the three checkpoints have no tensor in common.")
        if m is not None:
            _check_mask(m, pairs, "the checkpoints'")
        jobs = [Job(p.name, [(ci, init_src[p.name]), (ca, p.src_a), (cb, p.src_b)], p.numel, payload=p) for p in pairs]
        acc = {p.name: {"ex": np.zeros(tols.size, np.int64), "in": np.zeros(tols.size, np.int64),
                        "out": np.zeros(tols.size, np.int64), "nin": 0, "ab2": 0.0, "ai2": 0.0} for p in pairs}

        def fn(job, start, raws):
            p = job.payload
            ri, ra, rb = raws
            idx, fa, fb = differing(ra, rb, p.a.dtype, p.b.dtype)
            with np.errstate(invalid="ignore", over="ignore"):
                absd = np.abs(fb - fa)
            k = atol_exceed(absd, fa, fb, tols)
            ex = np.bincount(k, minlength=tols.size + 1)[::-1].cumsum()[::-1][1:]
            res = {"ex": ex, "ab2": dot(absd) if absd.size else 0.0}
            _, fi, fa2 = differing(ri, ra, ci.tensors[init_src[p.name]].dtype, p.a.dtype)
            dd = fa2 - fi
            res["ai2"] = dot(dd) if dd.size else 0.0
            if m is not None:
                bits = m.bits(p.name, start, ra.size)
                inside = bits[idx]
                res["in"] = np.bincount(k[inside], minlength=tols.size + 1)[::-1].cumsum()[::-1][1:]
                res["out"] = ex - res["in"]
                res["nin"] = int(np.count_nonzero(bits))
            return res

        for job, results in map_chunks(jobs, fn, workers=workers, desc="closeness", progress=progress,
                                           engine=engine, ray_address=ray_address):
            s = acc[job.name]
            for r in results:
                s["ex"] += r["ex"]
                s["ab2"] += r["ab2"]
                s["ai2"] += r["ai2"]
                if m is not None:
                    s["in"] += r["in"]
                    s["out"] += r["out"]
                    s["nin"] += r["nin"]
    numel = sum(p.numel for p in pairs)
    tensors = []
    for p in pairs:
        s = acc[p.name]
        row = {"name": p.name, "numel": p.numel, "atol": _eq_list(tols_user, [s["ex"][j] for j in pos], p.numel),
               "rel_l2": math.sqrt(s["ab2"] / s["ai2"]) if s["ai2"] else (0.0 if s["ab2"] == 0 else math.inf)}
        if m is not None:  # agreement inside the mask, per tensor (the study groups it by tensor kind)
            row["inside_mask"] = _eq_list(tols_user, [s["in"][j] for j in pos], s["nin"])
            row["mask_numel"] = s["nin"]
        tensors.append(row)
    tot = sum((acc[p.name]["ex"] for p in pairs), np.zeros(tols.size, np.int64))
    ab2 = sum(acc[p.name]["ab2"] for p in pairs)
    ai2 = sum(acc[p.name]["ai2"] for p in pairs)
    res = ClosenessResult(init, a, b, numel, _eq_list(tols_user, [tot[j] for j in pos], numel), tensors,
                          rel_l2=math.sqrt(ab2 / ai2) if ai2 else (0.0 if ab2 == 0 else math.inf),
                          skipped=[{"name": s.name, "reason": s.reason} for s in skipped])
    if m is not None:
        nin = sum(acc[p.name]["nin"] for p in pairs)
        tin = sum((acc[p.name]["in"] for p in pairs), np.zeros(tols.size, np.int64))
        res.mask = m.path
        res.mask_numel = nin
        res.inside_mask = _eq_list(tols_user, [tin[j] for j in pos], nin)
        res.outside_mask = _eq_list(tols_user, [tot[j] - tin[j] for j in pos], numel - nin)
    return res
