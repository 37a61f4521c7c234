"""The paper's claims, one by one, decided from a study's results: ``holds``, ``fails`` or ``inconclusive``.

Every claim has a fixed key, so that the claims of two studies (two models, two budgets) line up row by row; a
claim whose research question did not run is ``not measured``. A claim is decided by an interval wherever the
study has one, and says which rule decided it:

- *superiority* (``b`` above ``a``): ``holds`` when the interval of ``b − a`` lies above 0 (and, for RQ2, survives
  Holm's correction and exceeds θ_full's own jitter: the study's verdict ``higher``), ``fails`` when it lies below 0,
  else ``inconclusive`` (no interval included);
- *recovery* (θ_sub against θ_full, non-inferiority): ``holds`` when the whole interval of θ_sub − θ_full lies at or
  above minus θ_full's own jitter (seed to seed at the point; with one seed, its flatter neighbouring checkpoint:
  the margin), ``fails`` when the study finds θ_sub lower (interval below 0, Holm, beyond the jitter), else
  ``inconclusive``;
- *threshold* (a measured fraction against a stated bound): over seeds, a t interval of the mean; ``holds`` when it
  lies above the bound, ``fails`` when it lies below, ``inconclusive`` when it straddles it or there is one seed.
- RQ4's overlap against magnitude-matched random masks: a normal interval from the expected intersection and its
  variance, under the independence of entries within a stratum that the study states for its z.

Deterministic single-run measurements (update rank; RQ5's one run per setting) carry no interval: their claims are
``inconclusive`` unless every run is on one side of a stated bound, and they say so.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from ..io.errors import InputError
from .results import StudyResults
from .stats import LEVEL, t_quantile

HOLDS, FAILS, INCONCLUSIVE, NOT_MEASURED = "holds", "fails", "inconclusive", "not measured"
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE, NOT_MEASURED)
Z95 = 1.959963984540054
RQ2_POINTS = ("peak", "matched", "final")


@dataclass
class Claim:
    key: str  # stable across studies: "rq2.sub_recovers_full.peak"
    rq: str
    statement: str  # what is claimed, in the paper's terms
    rule: str  # how it was decided
    verdict: str  # holds | fails | inconclusive | not measured
    value: float | None = None  # the effect or the measured fraction (fractions, not percent)
    lo: float | None = None
    hi: float | None = None
    unit: str = "points"  # "points": a difference of fractions; "fraction": a level; "relative": (b − a) / a
    evidence: str = ""  # one line with the numbers it rests on

    def to_dict(self) -> dict:
        return asdict(self)


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def span(value, lo, hi, unit: str) -> str:
    """A value and its interval as text: percent for a ``fraction``, signed points for ``points``."""
    if value is None:
        return "—"
    if unit == "fraction":
        v = f"{100 * value:.1f}%"
        return v if lo is None else f"{v} [{100 * lo:.1f}, {100 * hi:.1f}]"
    if unit == "relative":  # (observed − expected) / expected: a percent of the expectation, not points
        nd = 2 if lo is not None and 0 < 100 * (hi - lo) < 0.5 else 1  # a narrow interval keeps its width visible
        v = f"{100 * value:+.{nd}f}% of the expected"
        return v if lo is None else f"{v} [{100 * lo:+.{nd}f}, {100 * hi:+.{nd}f}]"
    v = f"{_pts(value)} points"
    return v if lo is None else f"{v} [{_pts(lo)}, {_pts(hi)}]"


def _superiority(cmp: dict | None) -> str:
    if not cmp:
        return NOT_MEASURED
    return {"higher": HOLDS, "lower": FAILS}.get(cmp.get("verdict"), INCONCLUSIVE)


def recovery_verdict(cmp: dict | None) -> str:
    """Non-inferiority with θ_full's own jitter as the margin: the whole interval of θ_sub − θ_full at or above
    −jitter holds; a difference the study calls ``lower`` (interval below 0, Holm, beyond the jitter) fails."""
    if not cmp:
        return NOT_MEASURED
    if cmp.get("verdict") == "lower":
        return FAILS
    lo = cmp.get("lo")
    if lo is not None and math.isfinite(lo) and lo >= -(cmp.get("jitter") or 0.0):
        return HOLDS
    return INCONCLUSIVE


def _from_cmp(key, rq, statement, rule, cmp, decide) -> Claim:
    v = decide(cmp)
    if v == NOT_MEASURED:
        return Claim(key, rq, statement, rule, v)
    what = f"{cmp['b']} − {cmp['a']} = {span(cmp['diff'], cmp.get('lo'), cmp.get('hi'), 'points')}"
    if cmp.get("algo"):
        what = f"{cmp['algo'].upper()}: {what}"
    how = f"{cmp.get('method', '')}; the study's test of the difference: {cmp.get('verdict')}"
    if cmp.get("p_holm") is not None:
        how += f", Holm p = {cmp['p_holm']:.2g} over {cmp.get('family')} tests"
    if cmp.get("jitter") is not None:
        how += f", θ_full's jitter {100 * cmp['jitter']:.1f} points" + {
            "seeds": " (seed to seed)", "neighbouring checkpoint": " (one seed: its flatter neighbouring checkpoint)"}.get(cmp.get("jitter_source"), "")
    return Claim(key, rq, statement, rule, v, cmp["diff"], cmp.get("lo"), cmp.get("hi"), "points", f"{what} ({how})")


def threshold(xs: list[float], bound: float, level: float = LEVEL) -> tuple[str, float | None, float | None, float | None]:
    """(verdict, mean, lo, hi) of the claim "the mean of the fractions ``xs`` exceeds ``bound``": a t interval over
    the values (seeds), clipped to [0, 1]; one value has no interval and is ``inconclusive``."""
    xs = [float(x) for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return NOT_MEASURED, None, None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return INCONCLUSIVE, m, None, None
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    h = t_quantile(0.5 + level / 2, len(xs) - 1) * sd / math.sqrt(len(xs))
    lo, hi = max(m - h, 0.0), min(m + h, 1.0)  # fractions
    return (HOLDS if lo > bound else FAILS if hi < bound else INCONCLUSIVE), m, lo, hi


def _seeds_text(xs) -> str:
    xs = [x for x in xs if x is not None]
    return f"{len(xs)} seed(s): " + ", ".join(f"{100 * x:.2f}%" for x in xs)


# -- the claims, research question by research question --------------------------------------------------------
SPARSE_BOUND = 0.5  # "most parameters unchanged"
RANK_BOUND = 0.9  # "nearly full rank" (the paper measures 99.2-99.8%)
CLOSE_BOUND = 0.9  # θ_sub equal to θ_full within 1e-5 inside the mask (the paper: 90.5-94.0%)


def _rq1(r: dict | None) -> list[Claim]:
    out = []
    rows = (r or {}).get("rows") or []
    cmps = (r or {}).get("comparisons") or []
    rl = [x for x in rows if x.get("in_rl_average")]
    for algo in ("grpo", "dpo"):
        cmp = next((c for c in cmps if c.get("what") == "sparsity above the floor" and c.get("a") == "sft" and c.get("b") == algo), None)
        out.append(_from_cmp(f"rq1.sparser_than_sft.{algo}", "rq1",
                             f"{algo.upper()} leaves more parameters unchanged than SFT does, above the precision floor "
                             "(the paper: RL 68-96% against SFT 6-15%)",
                             "superiority: Welch's interval over seeds excludes 0", cmp, _superiority))
    for algo in ("grpo", "dpo"):
        row = next((x for x in rl if x.get("algo") == algo), None)
        seeds = [s.get("sparsity_above_floor") for s in (row or {}).get("seeds") or []] if row else []
        if row and not seeds:
            seeds = [row.get("sparsity_above_floor")]
        v, m, lo, hi = threshold(seeds, SPARSE_BOUND) if row else (NOT_MEASURED, None, None, None)
        out.append(Claim(f"rq1.most_unchanged.{algo}", "rq1",
                         f"{algo.upper()} leaves most parameters (over {SPARSE_BOUND:.0%}) bit-identical above the precision floor",
                         f"threshold: t interval over seeds against {SPARSE_BOUND:.0%}", v, m, lo, hi, "fraction",
                         _seeds_text(seeds) if row else ""))
    ranks = [(x["algo"], x["rank_mean"]) for x in rl if x.get("rank_mean") is not None]
    if ranks:
        lo_r = min(v for _, v in ranks)
        v = HOLDS if lo_r >= RANK_BOUND else FAILS if max(v for _, v in ranks) < RANK_BOUND else INCONCLUSIVE
        out.append(Claim("rq1.full_rank", "rq1", f"RL's updates are nearly full-rank (every algorithm at least {RANK_BOUND:.0%} of the maximum rank)",
                         "threshold on each algorithm's first seed (a deterministic measurement, no interval)", v, lo_r, None, None,
                         "fraction", "lowest of " + ", ".join(f"{a} {100 * x:.1f}%" for a, x in ranks)))
    else:
        out.append(Claim("rq1.full_rank", "rq1", f"RL's updates are nearly full-rank (every algorithm at least {RANK_BOUND:.0%} of the maximum rank)",
                         "threshold", NOT_MEASURED))
    return out


def _rq2(r: dict | None) -> list[Claim]:
    out = []
    vs = (r or {}).get("verdicts") or []
    algos = sorted({c["algo"] for c in vs if c.get("algo")}) or ["dpo"]
    algo = "dpo" if "dpo" in algos else algos[0]

    def find(point, a, b):
        return next((c for c in vs if c.get("point") == point and c.get("algo") == algo and c.get("a") == a and c.get("b") == b), None)

    for p in RQ2_POINTS:
        out.append(_from_cmp(f"rq2.full_improves.{p}", "rq2", f"θ_full is more accurate than θ_init ({p} point): the run learned",
                             "superiority: pooled bootstrap over seeds × problems, Holm-corrected, beyond θ_full's jitter",
                             find(p, "init", "full"), _superiority))
    for p in RQ2_POINTS:
        out.append(_from_cmp(f"rq2.sub_recovers_full.{p}", "rq2",
                             f"training only θ_full's subnetwork (θ_sub) recovers θ_full's accuracy ({p} point)",
                             "recovery (non-inferiority): the interval of θ_sub − θ_full lies at or above −(θ_full's jitter); fails when lower",
                             find(p, "full", "sub"), recovery_verdict))
    for ctl, name in (("random_uniform", "a uniform random mask"), ("random_magnitude", "a random mask matched per tensor × |w0| bin")):
        out.append(_from_cmp(f"rq2.sub_beats_{ctl}.peak", "rq2",
                             f"θ_sub is more accurate than training {name} of the same density (peak point): the subnetwork, not its size, matters",
                             "superiority: pooled bootstrap over seeds × problems, Holm-corrected, beyond θ_full's jitter",
                             find("peak", ctl, "sub"), _superiority))
    rows = [x for x in (r or {}).get("rows") or [] if x.get("algo") == algo]
    close = []
    for x in rows:
        inside = ((x.get("closeness_to_full") or {}).get("sub") or {}).get("inside_mask") or x.get("inside_mask") or []
        close += [y["equal_fraction"] for y in inside if y.get("atol") == 1e-5]
    v, m, lo, hi = threshold(close, CLOSE_BOUND) if close else (NOT_MEASURED, None, None, None)
    out.append(Claim("rq2.sub_close_to_full", "rq2",
                     f"θ_sub's weights equal θ_full's within 1e-5 inside the mask for over {CLOSE_BOUND:.0%} of entries (the paper: 94.0% for DPO)",
                     f"threshold: t interval over seeds against {CLOSE_BOUND:.0%} (final checkpoints)", v, m, lo, hi, "fraction",
                     _seeds_text(close) if close else ""))
    return out


def _rq4(r: dict | None) -> list[Claim]:
    out = []
    rows = (r or {}).get("rows") or []
    for axis in ("seed", "data", "algorithm", "seed+data+algorithm"):
        row = next((x for x in rows if x.get("axis") == axis), None)
        st = f"masks of two runs that differ in {axis.replace('+', ', ')} overlap more than random masks matched per tensor × |w0| bin"
        m = (row or {}).get("matched") or {}
        if not row or m.get("ratio") is None or m.get("expected_intersection") in (None, 0):
            out.append(Claim(f"rq4.overlap.{axis}", "rq4", st, "superiority of the intersection over its matched expectation", NOT_MEASURED))
            continue
        eff = m["ratio"] - 1
        sd = math.sqrt(max(m.get("variance") or 0.0, 0.0)) / m["expected_intersection"]
        lo, hi = eff - Z95 * sd, eff + Z95 * sd
        v = HOLDS if lo > 0 else FAILS if hi < 0 else INCONCLUSIVE
        out.append(Claim(f"rq4.overlap.{axis}", "rq4", st,
                         "superiority: a normal interval of (observed − expected) / expected intersection, entries independent within a stratum",
                         v, eff, lo, hi, "relative",
                         f"o1 {100 * row['o1']:.1f}% against {100 * m['o1_random']:.1f}% matched ({100 * row['o1_random']:.1f}% uniform); z = {m.get('z', float('nan')):.1f}"))
    return out


def _rq5(r: dict | None) -> list[Claim]:
    out = []
    dist = {x["name"]: x for x in (r or {}).get("distribution") or []}
    cmps = (r or {}).get("distribution_comparisons") or []
    for method, a, b in (("SFT", "sft_off", "sft_in"), ("DPO", "dpo_off", "dpo")):
        key = f"rq5.in_distribution_sparser.{method.lower()}"
        st = (f"{method} on in-distribution data (the model's own samples) leaves more parameters unchanged than on "
              "off-distribution data of the same size (the paper's causal claim, Table 5)")
        cmp = next((c for c in cmps if c.get("a") == a and c.get("b") == b and c.get("what") == "sparsity"), None)
        xa, xb = dist.get(a), dist.get(b)
        if not (xa and xb) or not xb.get("in_distribution", True):
            out.append(Claim(key, "rq5", st, "superiority: Welch's interval over seeds", NOT_MEASURED))
            continue
        sizes = f"; {xb['examples']} examples each" if xa["examples"] == xb["examples"] else f"; {xb['examples']} against {xa['examples']} examples"
        if cmp and cmp.get("lo") is not None:
            out.append(_from_cmp(key, "rq5", st, "superiority: Welch's interval over seeds excludes 0", cmp, _superiority))
            out[-1].evidence += sizes
            continue
        d = xb["sparsity"] - xa["sparsity"]
        out.append(Claim(key, "rq5", st, "one run each (or no spread): no interval, so no verdict", INCONCLUSIVE, d, None, None, "points",
                         f"in {100 * xb['sparsity']:.1f}% against off {100 * xa['sparsity']:.1f}%{sizes}"))
    kl = (r or {}).get("kl") or {}
    if kl.get("with") is not None and kl.get("without") is not None:
        d = kl["with"] - kl["without"]
        out.append(Claim("rq5.kl_not_the_cause", "rq5", "the KL term is not what makes updates sparse (the paper: 69.8% with, 68.8% without)",
                         "one run each: no interval, so no verdict", INCONCLUSIVE, d, None, None, "points",
                         f"with KL {100 * kl['with']:.1f}%, without {100 * kl['without']:.1f}%"))
    else:
        out.append(Claim("rq5.kl_not_the_cause", "rq5", "the KL term is not what makes updates sparse", "one run each", NOT_MEASURED))
    return out


def claims(results: dict) -> list[Claim]:
    """Every claim, decided from a study's ``results.json`` (as a dict); research questions absent are ``not measured``."""
    return _rq1(results.get("rq1")) + _rq2(results.get("rq2")) + _rq4(results.get("rq4")) + _rq5(results.get("rq5"))


def load_study(path: str | Path) -> tuple[str, dict]:
    """(path of its results.json, the results) of a study folder or a results.json, checked before anything is
    decided from it: at most 1 GiB, strict JSON, typed as the study's results; one sentence naming the file where not."""
    p = Path(path)
    f = p / "results.json" if p.is_dir() else p
    if not p.exists():
        raise InputError(f"{path}: no such study folder or results.json.")
    if not f.is_file():
        raise InputError(f"{path}: a folder without a results.json (not a study's output folder, or its study has not finished).")
    if f.stat().st_size > 1 << 30:
        raise InputError(f"{f}: {f.stat().st_size:,} bytes is not a study's results.json (over 1 GiB).")
    try:
        d = json.loads(f.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"{f}: not a readable results.json ({type(e).__name__}: {str(e)[:120]}).") from None
    StudyResults.from_dict(d, f"{f}: results")  # the study's own schema, field by field
    try:
        claims(d)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise InputError(f"{f}: a claim cannot be decided from these results ({type(e).__name__}: {e}).") from None
    return str(f), d


def _no_constant(x: str):
    raise ValueError(f"{x} is not a JSON number (not strict JSON)")
