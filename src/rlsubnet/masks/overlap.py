"""Overlap of subnetworks against chance (the paper's Table 4, and the Jaccard view of arXiv 2511.08567).

For masks A and B over the same N parameters with |A| = a, |B| = b and |A∩B| = x:

- one-sided overlaps o1 = x/a and o2 = x/b, with random baselines o1_random = b/N (the density of the
  *other* mask) and o2_random = a/N; the identity o1·a = o2·b holds exactly;
- Jaccard x/|A∪B| with the Bernoulli baseline pq/(p+q−pq), p = a/N, q = b/N;
- a z-score of x against placing the same numbers of ones uniformly at random (hypergeometric:
  mean ab/N, variance ab(N−a)(N−b)/(N²(N−1))), and the ratio x/(ab/N) (= o1/o1_random = o2/o2_random).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np

from ..analysis.naming import layer_index, module_kind
from ..io.errors import InputError
from ..io.jsonout import dumps
from .subnetwork import Subnetwork, popcount


def overlap_stats(x: int, a: int, b: int, n: int) -> dict:
    """All overlap numbers from the intersection size and the two mask sizes."""
    p, q = (a / n, b / n) if n else (0.0, 0.0)
    union = a + b - x
    mean = a * b / n if n else 0.0
    var = a * b * (n - a) * (n - b) / (n * n * (n - 1)) if n > 1 else 0.0
    jr_den = p + q - p * q
    return {
        "intersection": x,
        "count_a": a,
        "count_b": b,
        "numel": n,
        "o1": x / a if a else math.nan,  # undefined for an empty mask: null in JSON
        "o2": x / b if b else math.nan,
        "o1_random": q,
        "o2_random": p,
        "jaccard": x / union if union else math.nan,
        "jaccard_random": p * q / jr_den if jr_den else 0.0,
        "ratio": x / mean if mean else math.nan,
        "z": (x - mean) / math.sqrt(var) if var > 0 else 0.0,
    }


Z_CHANCE = 3.0  # |z| beyond which an overlap is called above or below chance


def chance(z: float | None) -> str | None:
    """The one verdict on an overlap's z-score: "above", "below" or "consistent" (with chance); None when undefined."""
    if z is None or z != z:
        return None
    return "above" if z > Z_CHANCE else ("below" if z < -Z_CHANCE else "consistent")


@dataclass
class PairOverlap:
    a: int
    b: int
    o1: float
    o2: float
    o1_random: float
    o2_random: float
    jaccard: float
    jaccard_random: float
    intersection: int
    count_a: int
    count_b: int
    numel: int
    ratio: float
    z: float
    per_tensor: list[dict] = field(default_factory=list)
    per_kind: list[dict] = field(default_factory=list)
    baseline: dict | None = None  # a matched random baseline (``overlap(..., baseline=, base=)``)

    @property
    def above_chance(self) -> bool:
        return chance(self.baseline["z"] if self.baseline else self.z) == "above"


@dataclass
class OverlapResult:
    masks: list[dict]  # [{"path", "density"}]
    pairs: list[PairOverlap]
    consensus: dict | None = None

    def to_dict(self) -> dict:
        return {"masks": self.masks, "pairs": [asdict(p) for p in self.pairs], "consensus": self.consensus}

    def to_json(self, indent: int | None = 2) -> str:
        return dumps(self.to_dict(), indent=indent)


def pair_overlap(A: Subnetwork, B: Subnetwork, ia: int = 0, ib: int = 1) -> PairOverlap:
    A._check_same(B, "compare")
    per_tensor = []
    kinds: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    X = Ca = Cb = N = 0
    for name in A.names:
        pa, pb = A.packed(name), B.packed(name)
        x, a, b, n = popcount(pa & pb), A.count(name), B.count(name), A.numel(name)
        s = overlap_stats(x, a, b, n)
        s["name"] = name
        per_tensor.append(s)
        k = kinds[module_kind(name)]
        k[0] += x; k[1] += a; k[2] += b; k[3] += n  # noqa: E702
        X += x; Ca += a; Cb += b; N += n  # noqa: E702
    g = overlap_stats(X, Ca, Cb, N)
    per_kind = [dict(overlap_stats(*v), kind=k) for k, v in sorted(kinds.items())]
    return PairOverlap(a=ia, b=ib, per_tensor=per_tensor, per_kind=per_kind,
                       **{k: g[k] for k in ("o1", "o2", "o1_random", "o2_random", "jaccard", "jaccard_random",
                                             "intersection", "count_a", "count_b", "numel", "ratio", "z")})


BASELINES = ("uniform", "tensor", "magnitude")


def _exponent_bins(ck, name: str, n: int) -> int:
    """Number of exponent values of ``name`` in the base checkpoint, which must hold it as a float tensor of n entries."""
    info = ck.tensors.get(name)
    if info is None or info.numel != n or not info.dtype.is_float:
        raise InputError(f"{ck.path}: has no floating tensor '{name}' of the mask's shape, so it is not the mask's base.")
    return 1 << info.dtype.exponent_bits


def _exponents(ck, name: str, start: int, count: int) -> np.ndarray:
    """The stored exponent field of entries [start, start + count) of a base tensor: the |w0| magnitude bin."""
    dt = ck.tensors[name].dtype
    return ((ck.read(name, start, count) >> dt.raw(dt.mantissa_bits)) & dt.raw((1 << dt.exponent_bits) - 1)).astype(np.int64)


def stratified_baseline(A: Subnetwork, B: Subnetwork, kind: str = "magnitude", base=None, chunk: int = 1 << 20) -> dict:
    """Overlap against random masks matched to A and B within strata, exactly (no sampling).

    ``uniform``: one stratum (all parameters); ``tensor``: each tensor; ``magnitude``: each tensor × exponent
    of the base value |w0| (needs ``base``, the checkpoint both masks were made from). Within a stratum of n
    entries holding a of A's ones and b of B's, a random pair of masks with the same a and b has
    E[x] = a·b/n and Var[x] = a·b·(n−a)·(n−b)/(n²(n−1)) (hypergeometric); strata add up. Returns the expected
    intersection, the matched baselines of o1 and o2, the ratio observed/expected and the z-score.
    """
    if kind not in BASELINES:
        raise InputError(f"--baseline: {kind!r} is not one of {', '.join(BASELINES)}.")
    if kind == "magnitude" and base is None:
        raise InputError("--baseline magnitude: needs --base, the checkpoint the masks were made from.")
    A._check_same(B, "compare")
    mean = var = 0.0
    X = Ca = Cb = 0
    strata = 0

    def add(n, a, b):
        nonlocal mean, var, strata
        ok = n > 0
        n, a, b = n[ok].astype(np.float64), a[ok].astype(np.float64), b[ok].astype(np.float64)
        mean += float((a * b / n).sum())
        big = n > 1
        n, a, b = n[big], a[big], b[big]
        var += float((a * b * (n - a) * (n - b) / (n * n * (n - 1))).sum())
        strata += int(ok.sum())

    ck = None
    if kind == "magnitude":
        from ..io.checkpoint import Checkpoint, open_checkpoint

        ck = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    try:
        if kind == "uniform":
            X = sum(popcount(A.packed(nm) & B.packed(nm)) for nm in A.names)
            add(np.array([A.numel()]), np.array([A.count()]), np.array([B.count()]))
        for name in (A.names if kind != "uniform" else []):
            x, a, b, n = popcount(A.packed(name) & B.packed(name)), A.count(name), B.count(name), A.numel(name)
            X += x
            if kind == "tensor":
                add(np.array([n]), np.array([a]), np.array([b]))
                continue
            bins = _exponent_bins(ck, name, n)
            nn, aa, bb = (np.zeros(bins, np.int64) for _ in range(3))
            for s0 in range(0, n, chunk):
                c = min(chunk, n - s0)
                e = _exponents(ck, name, s0, c)
                nn += np.bincount(e, minlength=bins)
                aa += np.bincount(e, weights=A.bits(name, s0, c), minlength=bins).astype(np.int64)
                bb += np.bincount(e, weights=B.bits(name, s0, c), minlength=bins).astype(np.int64)
            add(nn, aa, bb)
    finally:
        if ck is not None and ck is not base:
            ck.close()
    Ca, Cb = A.count(), B.count()
    return {"kind": kind, "strata": strata, "expected_intersection": mean, "variance": var,
            "o1_random": mean / Ca if Ca else math.nan, "o2_random": mean / Cb if Cb else math.nan,
            "ratio": X / mean if mean else math.nan, "z": (X - mean) / math.sqrt(var) if var > 0 else math.nan}


def consensus(masks: list[Subnetwork], chunk: int = 1 << 22) -> dict:
    """For R masks: how many masks hold each parameter, as a histogram (0..R), globally and per layer."""
    R = len(masks)
    total = np.zeros(R + 1, np.int64)
    per_layer: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(R + 1, np.int64))
    for name in masks[0].names:
        n = masks[0].numel(name)
        L = layer_index(name)
        key = "-" if L is None else str(L)
        for s in range(0, n, chunk):
            c = min(chunk, n - s)
            cnt = np.zeros(c, np.uint8)
            for m in masks:
                cnt += m.bits(name, s, c)
            h = np.bincount(cnt, minlength=R + 1)
            total += h
            per_layer[key] += h

    def summ(h: np.ndarray) -> dict:
        updated = int(h[1:].sum())
        mean_c = float((np.arange(R + 1) * h).sum() / (R * updated)) if updated else 0.0
        return {"hist": h.tolist(), "updated_by_any": updated, "updated_by_all": int(h[R]),
                "mean_consensus_of_updated": mean_c}

    order = sorted(per_layer, key=lambda k: (0, int(k)) if k.isdigit() else (1, 0))
    return {"runs": R, "global": summ(total), "per_layer": [dict(summ(per_layer[k]), layer=k) for k in order]}


def overlap(paths_or_masks: list, consensus_for: int = 3, baseline: str | None = None, base=None) -> OverlapResult:
    """Pairwise overlaps of every pair of masks, plus consensus when there are ``consensus_for`` or more.

    With ``baseline`` (``uniform``, ``tensor`` or ``magnitude`` with ``base``) every pair also carries that
    matched random baseline (:func:`stratified_baseline`), from which its verdict is taken.
    """
    masks = [m if isinstance(m, Subnetwork) else Subnetwork.load(m) for m in paths_or_masks]  # str or PathLike
    for m in masks[1:]:
        masks[0]._check_same(m, "compare")
    pairs = [pair_overlap(masks[i], masks[j], i, j) for i in range(len(masks)) for j in range(i + 1, len(masks))]
    if baseline is not None:
        for p in pairs:
            p.baseline = stratified_baseline(masks[p.a], masks[p.b], baseline, base)
    info = [{"path": m.path or f"mask{i}", "density": m.density()} for i, m in enumerate(masks)]
    cons = consensus(masks) if len(masks) >= consensus_for else None
    return OverlapResult(info, pairs, cons)


def matched_random_mask(A: Subnetwork, kind: str = "magnitude", base=None, seed: int = 0, within: Subnetwork | None = None) -> Subnetwork:
    """A random mask drawn like ``stratified_baseline``'s null: the same number of ones as ``A`` in every
    stratum (``uniform``: the whole model; ``tensor``: each tensor; ``magnitude``: each tensor × exponent of
    |w0| in ``base``), positions uniformly at random within the stratum. The control a "the subnetwork
    matters" claim needs: the same density, placed without knowledge of the run.

    ``within`` (``magnitude`` only) draws only among its entries; a stratum with fewer of them than ``A`` has
    gets all it has and the rest is drawn from the nearest exponent bins of the same tensor that have entries
    to spare (nearest first, the smaller exponent first at equal distance; ``meta["moved"]`` counts them), and
    ``meta["shortfall"]`` says how many ones are still missing when the tensor's set is smaller than its share."""
    if kind not in BASELINES:
        raise InputError(f"--baseline: {kind!r} is not one of {', '.join(BASELINES)}.")
    if within is not None:
        if kind != "magnitude":
            raise InputError(f"a random mask drawn within a set: only the magnitude-matched kind supports it, not {kind!r}.")
        A._check_same(within, "the set to draw within")
    if kind != "magnitude":
        out = A.random_like(seed=seed, per_tensor=kind == "tensor")
        out.meta = {**out.meta, "criterion": f"random-{kind}", "matched_to": A.digest()}
        return out
    if base is None:
        raise InputError("magnitude-matched random mask: needs the base checkpoint the mask was made from.")
    from ..io.checkpoint import Checkpoint, open_checkpoint

    rng = np.random.default_rng(seed)
    ck = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    bits = {}
    short = moved = 0
    try:
        for name in A.names:
            n = A.numel(name)
            bins = _exponent_bins(ck, name, n)
            e = _exponents(ck, name, 0, n)
            want = np.bincount(e, weights=A.bits(name, 0, n), minlength=bins).astype(np.int64)
            # order entries by (exponent bin, random key) and keep the first want[bin] of every bin; drawing
            # within a set, its entries come first in every bin and no entry outside it is kept
            if within is None:
                order = np.lexsort((rng.random(n), e))
            else:
                ok = within.bits(name, 0, n).astype(bool)
                order = np.lexsort((rng.random(n), ~ok, e))
                have = np.bincount(e, weights=ok, minlength=bins).astype(np.int64)
                want, s, m = _spill_to_nearest(want, have)
                short, moved = short + s, moved + m
            starts = np.concatenate([[0], np.cumsum(np.bincount(e, minlength=bins))[:-1]])
            rank_in_bin = np.arange(n) - starts[e[order]]
            b = np.zeros(n, bool)
            b[order[rank_in_bin < want[e[order]]]] = True
            bits[name] = np.packbits(b, bitorder="little")
    finally:
        if ck is not base:
            ck.close()
    meta = {"criterion": "random-magnitude", "seed": str(seed), "matched_to": A.digest()}
    if within is not None:
        meta.update(within=within.digest(), shortfall=str(short), moved=str(moved), fill="nearest bin")
    return Subnetwork(dict(A.shapes), bits, meta)


def _spill_to_nearest(want: np.ndarray, have: np.ndarray) -> tuple[np.ndarray, int, int]:
    """How many entries to draw per bin when bin b holds only ``have[b]``: each bin's own first, then every
    bin's deficit (in bin order) from the nearest bins with entries to spare. Returns the counts, the ones still
    missing and the ones moved to another bin."""
    take = np.minimum(want, have)
    spare = have - take
    short = moved = 0
    for b in np.flatnonzero(want > have):
        need = int(want[b] - have[b])
        for j in sorted(np.flatnonzero(spare > 0), key=lambda j: (abs(int(j) - int(b)), int(j))):
            k = min(need, int(spare[j]))
            take[j] += k
            spare[j] -= k
            need -= k
            moved += k
            if not need:
                break
        short += need
    return take, short, moved
