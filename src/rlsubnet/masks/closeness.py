"""How close two models finetuned from one init are (the paper's θ_sub vs θ_full), and where a model
moved relative to a mask (the frozen-entry check of masked training)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..analysis.diff import DEFAULT_ATOL, check_tolerances
from ..analysis.engine import Job, map_chunks
from ..analysis.probes import atol_exceed, differing
from ..io.align import align
from ..io.checkpoint import open_checkpoint
from ..io.dtypes import dot
from ..io.errors import InputError
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
        return json.dumps(self.to_dict(), indent=indent)


def _eq_list(tols, exceed, numel):
    return [{"atol": t, "equal": int(numel - e), "equal_fraction": (numel - e) / numel if numel else 1.0} for t, e in zip(tols, exceed)]


def _check_mask(mask: Subnetwork, pairs, what: str) -> None:
    for p in pairs:
        if p.name in mask.shapes and tuple(mask.shapes[p.name]) != tuple(p.shape):
            raise InputError(f"{mask.path}: mask shape {list(mask.shapes[p.name])} of '{p.name}' does not match {what} {list(p.shape)}.")
    missing = [p.name for p in pairs if p.name not in mask.shapes]
    if missing:
        raise InputError(f"{mask.path}: mask has no entry for parameter '{missing[0]}'.")


def closeness(init: str, a: str, b: str, mask: str | Subnetwork | None = None, atol=DEFAULT_ATOL,
              threads: int | None = None, progress: bool = False) -> ClosenessResult:
    """Fraction of parameters where A and B are equal at each tolerance (|A−B| ≤ tol; 0 = same bits)."""
    tols_user = check_tolerances(atol)
    tols = np.unique(np.array(tols_user))
    pos = [int(np.searchsorted(tols, t)) for t in tols_user]
    m = Subnetwork.load(mask) if isinstance(mask, str) else mask
    with open_checkpoint(init) as ci, open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        pairs_ab, skipped = align(ca, cb)
        pairs_ia, skipped_i = align(ci, ca)
        init_names = {p.name for p in pairs_ia if not p.sliced}
        pairs = [p for p in pairs_ab if p.name in init_names and not p.sliced]
        if not pairs:
            raise InputError(f"{init}, {a} and {b}: the three checkpoints have no tensor in common.")
        if m is not None:
            _check_mask(m, pairs, "the checkpoints'")
        jobs = [Job(p.name, [(ci, p.name), (ca, p.name), (cb, p.name)], p.numel, payload=p) for p in pairs]
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
            di, fi, fa2 = differing(ri, ra, ci.tensors[p.name].dtype, p.a.dtype)
            dd = fa2 - fi
            res["ai2"] = dot(dd) if dd.size else 0.0
            if m is not None:
                bits = m.bits(p.name, start, ra.size)
                inside = bits[idx]
                res["in"] = np.bincount(k[inside], minlength=tols.size + 1)[::-1].cumsum()[::-1][1:]
                res["out"] = ex - res["in"]
                res["nin"] = int(np.count_nonzero(bits))
            return res

        for job, results in map_chunks(jobs, fn, workers=threads, desc="closeness", progress=progress):
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
        tensors.append({"name": p.name, "numel": p.numel,
                        "atol": _eq_list(tols_user, [s["ex"][j] for j in pos], p.numel),
                        "rel_l2": math.sqrt(s["ab2"] / s["ai2"]) if s["ai2"] else (0.0 if s["ab2"] == 0 else math.inf)})
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


@dataclass
class FrozenCheck:
    """Where a trained model moved relative to a mask: frozen entries must not move."""

    init: str
    trained: str
    mask: str | None
    numel: int
    trainable: int
    frozen: int
    frozen_moved: int
    trainable_changed: int
    tensors: list[dict]

    @property
    def ok(self) -> bool:
        return self.frozen_moved == 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def changes_by_mask(init: str, trained: str, mask: str | Subnetwork, threads: int | None = None,
                    progress: bool = False) -> FrozenCheck:
    """Count entries outside the mask whose bits moved, and entries inside it that changed."""
    m = Subnetwork.load(mask) if isinstance(mask, str) else mask
    with open_checkpoint(init) as ci, open_checkpoint(trained) as ct:
        pairs, _ = align(ci, ct)
        pairs = [p for p in pairs if not p.sliced]
        _check_mask(m, pairs, "the checkpoints'")
        jobs = [Job(p.name, [(ci, p.name), (ct, p.name)], p.numel, payload=p) for p in pairs]
        acc = {p.name: [0, 0, 0] for p in pairs}  # frozen_moved, trainable_changed, trainable

        def fn(job, start, raws):
            p = job.payload
            idx, _, _ = differing(raws[0], raws[1], p.a.dtype, p.b.dtype)
            bits = m.bits(p.name, start, raws[0].size)
            inside = bits[idx]
            return int(idx.size - np.count_nonzero(inside)), int(np.count_nonzero(inside)), int(np.count_nonzero(bits))

        for job, results in map_chunks(jobs, fn, workers=threads, desc="verify", progress=progress):
            for r in results:
                for i in range(3):
                    acc[job.name][i] += r[i]
    rows = [{"name": p.name, "numel": p.numel, "trainable": acc[p.name][2], "frozen_moved": acc[p.name][0],
             "trainable_changed": acc[p.name][1]} for p in pairs]
    numel = sum(p.numel for p in pairs)
    trainable = sum(r["trainable"] for r in rows)
    return FrozenCheck(init, trained, m.path, numel, trainable, numel - trainable,
                       sum(r["frozen_moved"] for r in rows), sum(r["trainable_changed"] for r in rows), rows)
