"""``diff``: compare two checkpoints parameter by parameter, exactly, in one streaming pass."""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

from ..io.align import Pair, align, tie_notes
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.errors import InputError
from .engine import DEFAULT_CHUNK, Job, map_chunks
from .naming import layer_index, module_kind, paper_layer_index
from .probes import ULP_LABELS, ChunkStats, floor_probe, parse_criterion, probe_chunk
from .results import DiffResult, Group, TensorDiff

DEFAULT_ATOL = (0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4)
DEFAULT_ETA = 1e-3


def check_tolerances(atol: Iterable[float | str], what: str = "--atol") -> list[float]:
    """Parse tolerances; each must be a finite non-negative number."""
    out = []
    for t in atol:
        try:
            v = float(t)
        except (TypeError, ValueError):
            raise InputError(f"{what}: {t!r} is not a number.") from None
        if not (math.isfinite(v) and v >= 0):
            raise InputError(f"{what}: {t!r} is not a non-negative number.")
        out.append(v)
    if not out:
        raise InputError(f"{what}: at least one tolerance is needed.")
    return out


def _as_checkpoint(x: str | os.PathLike | Checkpoint, cache_dir) -> Checkpoint:
    return x if isinstance(x, Checkpoint) else open_checkpoint(x, cache_dir=cache_dir)


def diff(
    base: str | os.PathLike | Checkpoint,
    tuned: str | os.PathLike | Checkpoint,
    atol: Sequence[float] = DEFAULT_ATOL,
    eta: float = DEFAULT_ETA,
    common_slice: bool = False,
    workers: int | None = None,
    chunk: int = DEFAULT_CHUNK,
    mask_criterion: str | None = None,
    cache_dir: str | None = None,
    progress: bool = False,
    rank: bool = False,
    rank_rtol: float | None = None,
    lr_sum: float | None = None,
) -> DiffResult:
    """Compare ``tuned`` against ``base`` and return every probe's counts.

    ``changed`` counts elements whose stored bits differ (+0/-0 equal); each tolerance in ``atol`` counts
    elements with exact |Δ| > tol; the bf16-relative test counts |Δ| > η·max(|w0|,|w1|). With
    ``mask_criterion`` (``bitwise``, ``atol:X`` or ``bf16rel:η``) the result also carries the packed
    changed-mask of every tensor (``result.mask_bits``), for ``rlsubnet.masks``.

    With ``lr_sum`` (Σ of the learning rates of the run, the largest distance an Adam-like update can move an
    entry), the result carries the precision floor: base entries that no update of that size could move
    (every value within ``lr_sum`` rounds back to the stored one), the sparsity above that floor, and the
    changed fraction per exponent of |w0| (``result.floor``, ``result.by_exponent``).
    """
    t0 = time.perf_counter()
    tols_user = check_tolerances(atol)
    if not (math.isfinite(eta) and eta >= 0):
        raise InputError(f"--eta: {eta!r} is not a non-negative number.")
    if lr_sum is not None and not (isinstance(lr_sum, (int, float)) and math.isfinite(lr_sum) and lr_sum >= 0):
        raise InputError(f"--lr-sum: {lr_sum!r} is not a non-negative number.")
    crit = None
    if mask_criterion is not None:
        try:
            crit = parse_criterion(mask_criterion)
        except ValueError:
            raise InputError(f"--criterion: {mask_criterion!r} is not one of bitwise, atol:TOL, bf16rel:ETA.") from None
    tols = np.unique(np.array(tols_user, dtype=np.float64))
    cb, ct = _as_checkpoint(base, cache_dir), _as_checkpoint(tuned, cache_dir)
    try:
        pairs, skipped = align(cb, ct, common_slice=common_slice)
        jobs = [Job(p.name, [(cb, p.src_a), (ct, p.src_b)], p.numel, payload=p) for p in pairs]
        stats: dict[str, ChunkStats] = {p.name: ChunkStats(atol_changed=np.zeros(tols.size, np.int64)) for p in pairs}
        masks: dict[str, np.ndarray] | None = None
        if crit is not None:
            masks = {p.name: np.zeros((p.numel + 7) // 8, np.uint8) for p in pairs}

        def fn(job: Job, start: int, raws: list[np.ndarray]):
            p: Pair = job.payload
            st, m = probe_chunk(raws[0], raws[1], p.a.dtype, p.b.dtype, tols, eta, crit)
            if lr_sum is not None:
                floor_probe(raws[0], raws[1], p.a.dtype, p.b.dtype, lr_sum, st)
            return st, (np.packbits(m, bitorder="little") if m is not None else None)

        for job, results in map_chunks(jobs, fn, workers=workers, chunk=chunk, desc="diff", progress=progress):
            pos8 = 0
            for st, packed in results:
                stats[job.name].add(st)
                if packed is not None:
                    masks[job.name][pos8 : pos8 + packed.size] = packed
                    pos8 += packed.size
        result = _assemble(cb, ct, pairs, skipped, stats, tols_user, tols, eta)
        if lr_sum is not None:
            _floor(result, pairs, stats, float(lr_sum))
        if masks is not None:
            masks = {p.name: masks[p.name] for p in pairs if not p.buffer}  # buffers are not parameters
        result.mask_bits = masks
        if masks is not None:
            result.fingerprints = {"base": cb.fingerprint(), "tuned": ct.fingerprint()}
        if rank:
            from .rank import rank_pairs

            result.rank = rank_pairs(cb, ct, [p for p in pairs if not p.buffer], rtol=rank_rtol, progress=progress)
    finally:
        if not isinstance(base, Checkpoint):
            cb.close()
        if not isinstance(tuned, Checkpoint):
            ct.close()
    result.elapsed_s = time.perf_counter() - t0
    return result


def _assemble(cb, ct, pairs, skipped, stats, tols_user, tols, eta) -> DiffResult:
    pos = {float(t): i for i, t in enumerate(tols)}
    tensors, buffers = [], []
    for p in pairs:
        s = stats[p.name]
        if s.atol_changed.size == 0:
            s.atol_changed = np.zeros(tols.size, np.int64)
        (buffers if p.buffer else tensors).append(
            TensorDiff(
                name=p.name,
                shape=list(p.shape),
                dtype=p.a.dtype.torch_name,
                numel=p.numel,
                changed=s.changed,
                atol=[{"atol": t, "changed": int(s.atol_changed[pos[t]])} for t in tols_user],
                bf16_rel_changed=s.rel_changed,
                ulp_hist={lab: int(c) for lab, c in zip(ULP_LABELS, s.ulp_hist)},
                max_abs_delta=s.max_abs if s.nonfinite == 0 else math.nan,
                l2_delta=math.sqrt(s.sumsq_delta) if s.nonfinite == 0 else math.nan,
                l2_base=math.sqrt(s.sumsq_base) if math.isfinite(s.sumsq_base) else math.nan,
                nonfinite=s.nonfinite,
                layer=layer_index(p.name),
                kind=module_kind(p.name),
                tuned_dtype=p.b.dtype.torch_name,
                sliced=p.sliced,
            )
        )
    numel = sum(t.numel for t in tensors)
    changed = sum(t.changed for t in tensors)
    atol_tot = []
    for j, t in enumerate(tols_user):
        c = sum(td.atol[j]["changed"] for td in tensors)
        atol_tot.append({"atol": t, "changed": c, "sparsity": 1 - c / numel if numel else 1.0})
    rel = sum(t.bf16_rel_changed for t in tensors)
    hist = {lab: sum(t.ulp_hist[lab] for t in tensors) for lab in ULP_LABELS}
    notes = tie_notes(pairs)
    if buffers:
        notes.append(f"{len(buffers)} stored non-parameter buffers (e.g. {buffers[0].name}) are reported under 'buffers' and not counted in any sparsity")
    nonfinite = sum(t.nonfinite for t in tensors)
    if nonfinite:
        notes.append(f"{nonfinite} changed entries have a non-finite value or difference: their max |Δ| and L2 are null in JSON")
    mixed = sorted({(t.dtype, t.tuned_dtype) for t in tensors if t.dtype != t.tuned_dtype})
    for a, b in mixed:
        notes.append(f"tensors stored as {a} in base and {b} in tuned were compared by value after exact widening to float64")
    paper = [t.changed / t.numel for t in tensors if paper_layer_index(t.name) is not None and t.numel]
    return DiffResult(
        base=cb.path,
        tuned=ct.path,
        numel=numel,
        changed=changed,
        atol=atol_tot,
        eta=eta,
        bf16_rel_changed=rel,
        ulp_hist=hist,
        tensors=tensors,
        skipped=[{"name": s.name, "reason": s.reason} for s in skipped],
        buffers=buffers,
        by_layer=group(tensors, lambda t: "-" if t.layer is None else str(t.layer), tols_user),
        by_module=group(tensors, lambda t: t.kind, tols_user),
        paper_layerwise_density=float(np.mean(paper)) if paper else None,
        notes=notes,
    )


def floor_summary(numel: int, changed: int, frozen: int, changed_frozen: int, lr_sum: float) -> dict:
    """The floor numbers of one set of entries: frozen (below the floor), and sparsity above it."""
    above = numel - frozen
    ch_above = changed - changed_frozen
    return {"lr_sum": lr_sum, "frozen": frozen, "fraction": frozen / numel if numel else 0.0,
            "changed_above_floor": ch_above, "changed_below_floor": changed_frozen,
            "sparsity_above_floor": 1 - ch_above / above if above else None}


def _floor(result: DiffResult, pairs, stats, lr_sum: float) -> None:
    """Attach the precision floor (global, per tensor, per module kind) and the per-exponent table."""
    by_name = {p.name: p for p in pairs}
    tot = [0, 0, 0, 0]
    kinds: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    exp: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for t in result.tensors:
        s = stats[t.name]
        t.floor = floor_summary(t.numel, t.changed, s.frozen, s.changed_frozen, lr_sum)
        for acc in (tot, kinds[t.kind]):
            acc[0] += t.numel
            acc[1] += t.changed
            acc[2] += s.frozen
            acc[3] += s.changed_frozen
        if s.exp_numel is not None:
            dt = by_name[t.name].a.dtype
            for field in np.flatnonzero(s.exp_numel):
                key = (dt.name, int(field))
                exp[key][0] += int(s.exp_numel[field])
                exp[key][1] += int(s.exp_changed[field])
    result.floor = floor_summary(*tot, lr_sum)
    for g in result.by_module:
        g.floor = floor_summary(*kinds[g.key], lr_sum)
    from ..io.dtypes import DTYPES

    rows = []
    for (dname, field), (n, c) in sorted(exp.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        dt = DTYPES[dname]
        e = None if field == 0 else field - dt.exponent_bias  # |w0| in [2^e, 2^(e+1)); None: zero or subnormal
        rows.append({"dtype": dt.torch_name, "exponent": e, "numel": n, "changed": c, "changed_fraction": c / n if n else 0.0})
    result.by_exponent = rows


def group(tensors: list[TensorDiff], key, tols_user) -> list[Group]:
    """Pool tensors by ``key(tensor)``; layers sort numerically, the non-layer group last."""
    buckets: dict[str, list[TensorDiff]] = defaultdict(list)
    for t in tensors:
        buckets[key(t)].append(t)

    def order(k: str):
        return (0, int(k), "") if k.isdigit() else (1, 0, k)

    out = []
    for k in sorted(buckets, key=order):
        ts = buckets[k]
        out.append(
            Group(
                key=k,
                tensors=len(ts),
                numel=sum(t.numel for t in ts),
                changed=sum(t.changed for t in ts),
                atol=[{"atol": tol, "changed": sum(t.atol[j]["changed"] for t in ts)} for j, tol in enumerate(tols_user)],
                bf16_rel_changed=sum(t.bf16_rel_changed for t in ts),
            )
        )
    return out
