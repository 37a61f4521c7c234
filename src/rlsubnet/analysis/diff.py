"""``diff``: compare two checkpoints parameter by parameter, exactly, in one streaming pass."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

from ..io.align import Pair, align, tie_notes
from ..io.atomic import atomic_dir
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.errors import InputError
from ..io.guard import write_marker
from ..io.mask_shards import PartSink, write_index
from .engine import DEFAULT_CHUNK, Job, map_chunks
from .experts import expert_role, moe_section
from .floor import attach_floor, floor_probe
from .kernels import use_for
from .naming import layer_index, module_kind, paper_layer_index
from .probes import ULP_LABELS, ChunkStats, differing, parse_criterion, probe_chunk
from .quantized import block_row_chunk, quant_chunk, quant_probe, quant_spec, same_format
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
    engine: str = "local",
    ray_address: str | None = None,
    mask_dir: str | os.PathLike | None = None,
) -> DiffResult:
    """Compare ``tuned`` against ``base`` and return every probe's counts.

    ``changed`` counts elements whose stored bits differ (+0/-0 equal); each tolerance in ``atol`` counts
    elements with exact |Δ| > tol; the bf16-relative test counts |Δ| > η·max(|w0|,|w1|). With
    ``mask_criterion`` (``bitwise``, ``atol:X`` or ``bf16rel:η``) the result also carries the packed
    changed-mask of every tensor (``result.mask_bits``), for ``rlsubnet.masks``; with ``mask_dir`` as well, the
    mask is written instead as a sharded mask folder, each part by the worker that computed it (the bits never
    reach this process; ``result.mask_bits`` stays None).

    With ``lr_sum`` (Σ of the learning rates of the run, the largest distance an Adam-like update can move an
    entry), the result carries the precision floor: base entries that no update of that size could move
    (every value within ``lr_sum`` rounds back to the stored one), the sparsity above that floor, and the
    changed fraction per exponent of |w0| (``result.floor``, ``result.by_exponent``).
    """
    t0 = time.perf_counter()
    tols_user, tols, crit = _options(atol, eta, lr_sum, mask_criterion)
    if mask_dir is not None and crit is None:
        raise InputError("a sharded mask needs a criterion (mask_criterion).")
    cb, ct = _as_checkpoint(base, cache_dir), _as_checkpoint(tuned, cache_dir)
    shards = atomic_dir(mask_dir, guard="-o") if mask_dir is not None else contextlib.nullcontext()  # never over a folder not ours
    try:
        with shards as folder:
            result = _run(cb, ct, common_slice, tols_user, tols, eta, crit, lr_sum, workers, chunk, progress, engine,
                          ray_address, folder, mask_criterion)
        if rank:
            from .rank import rank_pairs

            pairs = align(cb, ct, common_slice=common_slice)[0]
            result.rank = rank_pairs(cb, ct, [p for p in pairs if not p.buffer], rtol=rank_rtol, progress=progress, engine=engine,
                                     ray_address=ray_address)
    finally:
        if not isinstance(base, Checkpoint):
            cb.close()
        if not isinstance(tuned, Checkpoint):
            ct.close()
    result.elapsed_s = time.perf_counter() - t0
    return result


def _run(cb, ct, common_slice, tols_user, tols, eta, crit, lr_sum, workers, chunk, progress, engine, ray_address, folder,
         mask_criterion) -> DiffResult:
    """The pass over the pair: every chunk probed (in workers), merged, assembled; the sharded mask's index written
    into ``folder`` when there is one."""
    pairs, skipped = align(cb, ct, common_slice=common_slice)
    both = {p.name for p in pairs if same_format(cb, ct, p.src_a, p.src_b) and not p.sliced}  # read by their codes
    jobs = [Job(p.name, [(cb, p.src_a), (ct, p.src_b)], p.numel, payload=p, read=p.name not in both,
                chunk=block_row_chunk(cb.quant[p.src_a], chunk) if p.name in both else None) for p in pairs]
    stats: dict[str, ChunkStats] = {p.name: ChunkStats(atol_changed=np.zeros(tols.size, np.int64)) for p in pairs}
    masks = {p.name: np.zeros((p.numel + 7) // 8, np.uint8) for p in pairs} if crit is not None and folder is None else None
    parts: dict[str, list] = {p.name: [] for p in pairs if not p.buffer}
    fused = {p.name: p.shape[0] for p in pairs if len(p.shape) >= 2 and (r := expert_role(p.name)) is not None and r.role == "fused"}
    fn = _chunk_probe(cb, ct, pairs, both, fused, tols, eta, crit, lr_sum)
    sink = PartSink(folder) if folder is not None else None
    for job, results in map_chunks(jobs, fn, workers=workers, chunk=chunk, desc="diff", progress=progress,
                                   engine=engine, ray_address=ray_address, sink=sink):
        pos8 = 0
        for st, packed in results:
            stats[job.name].add(st)
            if isinstance(packed, dict):  # a part of the sharded mask, written where it was made
                parts[job.name].append(packed)
            elif packed is not None:
                masks[job.name][pos8 : pos8 + packed.size] = packed
                pos8 += packed.size
    result = _assemble(cb, ct, pairs, skipped, stats, tols_user, tols, eta)
    _quantized(result, cb, ct, pairs, stats)
    result.moe = moe_section(result.tensors, {n: stats[n].per_expert.tolist() for n in fused if stats[n].per_expert is not None})
    if lr_sum is not None:
        attach_floor(result, pairs, stats, float(lr_sum))
    if crit is not None:
        result.fingerprints = {"base": cb.fingerprint(), "tuned": ct.fingerprint()}
    if masks is not None:
        result.mask_bits = {p.name: masks[p.name] for p in pairs if not p.buffer}  # buffers are not parameters
    if folder is not None:
        meta = {"criterion": mask_criterion, "base": result.base, "tuned": result.tuned,
                **{f"{k}_fingerprint": v for k, v in result.fingerprints.items()}}
        write_index(folder, {p.name: tuple(p.shape) for p in pairs if not p.buffer}, parts, meta)
        write_marker(folder, "sharded mask")
    return result


def _options(atol, eta, lr_sum, mask_criterion):
    """The options checked before anything is read: (the tolerances as given, sorted and unique, the criterion)."""
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
    return tols_user, np.unique(np.array(tols_user, dtype=np.float64)), crit


def _chunk_probe(cb, ct, pairs, both: set, fused: dict, tols, eta, crit, lr_sum):
    """The work of one chunk of one pair, as the engine calls it: (stats, packed mask bits or None)."""
    quantized = {p.name for p in pairs if quant_spec(cb, p.src_a) or quant_spec(ct, p.src_b)}
    compiled = use_for(sum(p.numel for p in pairs if p.name not in quantized and p.a.dtype.name == p.b.dtype.name
                           and p.a.dtype.name in ("BF16", "F16")))

    def fn(job: Job, start: int, raws: list[np.ndarray] | int):
        p: Pair = job.payload
        if p.name in both:  # raws is the chunk's length: codes and scales are read by the probe
            st, m = quant_chunk(cb, ct, p.src_a, p.src_b, start, raws, tols, eta, crit, lr_sum)
            if p.name in fused:
                st.per_expert = _per_expert(cb, ct, p, start, raws, fused[p.name])
            return st, (np.packbits(m, bitorder="little") if m is not None else None)
        kept = {} if p.name in quantized and quant_spec(cb, p.src_a) else None
        st, m = probe_chunk(raws[0], raws[1], p.a.dtype, p.b.dtype, tols, eta, crit, keep=kept, compiled=compiled)
        if p.name in quantized:  # codes, scales, ULPs in the stored grid, the floor with the scale held fixed
            quant_probe(st, raws[0], raws[1], p.a.dtype, p.b.dtype, cb, ct, p.src_a, p.src_b, start, lr_sum, kept)
        elif lr_sum is not None:
            floor_probe(raws[0], raws[1], p.a.dtype, p.b.dtype, lr_sum, st, compiled=compiled)
        if p.name in fused:  # changed entries per expert: expert e holds flat range [e·per, (e+1)·per)
            idx = differing(raws[0], raws[1], p.a.dtype, p.b.dtype)[0]
            st.per_expert = np.bincount((start + idx) // (p.numel // fused[p.name]), minlength=fused[p.name])
        return st, (np.packbits(m, bitorder="little") if m is not None else None)

    return fn


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
                dtype=_stored(cb, p.src_a, p.a),
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
                tuned_dtype=_stored(ct, p.src_b, p.b),
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


def _per_expert(cb, ct, p, start: int, count: int, experts: int) -> np.ndarray:
    """Changed entries per expert of a fused quantized expert tensor (values compared exactly)."""
    va = cb.values(p.src_a, start, count)[2]
    vb = ct.values(p.src_b, start, count)[2]
    with np.errstate(invalid="ignore"):
        idx = np.flatnonzero(~((va == vb) | (np.isnan(va) & np.isnan(vb))))
    return np.bincount((start + idx) // (p.numel // experts), minlength=experts)


def _stored(ck, name: str, info) -> str:
    """How a tensor is stored: its dtype, or the quantized format a parameter's values come from."""
    q = quant_spec(ck, name)
    return ck.stored_dtype(name) if q is not None else info.dtype.torch_name


def _quantized(result: DiffResult, cb, ct, pairs, stats) -> None:
    """Per quantized tensor: format, block, codes and scales changed; totals in ``result.quantized``; notes."""
    by_name = {p.name: p for p in pairs}
    n = codes = scales = survive = 0
    mixed = 0
    for t in result.tensors:
        p = by_name[t.name]
        qa, qb = quant_spec(cb, p.src_a), quant_spec(ct, p.src_b)
        q = qa or qb
        if q is None:
            continue
        s = stats[t.name]
        n += 1
        t.quantized = {"format": q.format, "block": list(q.block)}
        if qa is not None and qb is not None and qa.format == qb.format:
            t.quantized.update(codes_changed=s.codes_changed, scales_changed=s.scales_changed)
            codes += s.codes_changed
            scales += s.scales_changed
        else:
            mixed += 1
            t.quantized.update(codes_changed=None, scales_changed=None, compared="by value: one side is not stored in this format")
            if qa is not None:
                t.quantized["survive_requantize"] = s.survive_requantize
                survive += s.survive_requantize
    if not n:
        return
    result.quantized = {"tensors": n, "codes_changed": codes, "scales_changed": scales}
    result.notes.append(f"{n} quantized parameters were compared by value (code × scale, exact in float64); 'changed' counts "
                        "entries whose value differs, codes_changed and scales_changed count stored codes and scales; ULPs are "
                        "those of the stored grid")
    if mixed:
        result.quantized["compared_by_value_only"] = mixed
        result.quantized["survive_requantize"] = survive
        result.notes.append(f"{mixed} parameters are quantized on one side only and were compared by value; "
                            f"{survive:,} of their changes survive rounding the tuned values into the base's grid (base scales held)")


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
