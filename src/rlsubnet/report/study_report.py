"""The study's report: one renderer per research question, each returning a :class:`Section` of paragraphs,
:class:`Table` objects and PNG figures; Markdown and one self-contained HTML file are both rendered from
those objects (nothing is re-parsed). Every "what this shows" sentence is built from the measured numbers
and their intervals: a difference is stated only when its interval excludes zero, otherwise the sentence
says "inconclusive"."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..io.atomic import write_text
from ..masks.overlap import Z_CHANCE, chance
from ..study.results import StudyResults, equal_at
from .fmt import pct
from .plots import bar_chart, heatmap, interval_chart, line_chart


# -- the small document model ---------------------------------------------------------------------------
@dataclass
class Table:
    head: list[str]
    rows: list[list]

    def to_md(self) -> str:
        esc = lambda c: str(c).replace("|", "\\|")
        out = ["| " + " | ".join(esc(h) for h in self.head) + " |", "|" + "---|" * len(self.head)]
        return "\n".join(out + ["| " + " | ".join(esc(c) for c in r) + " |" for r in self.rows])

    def to_html(self) -> str:
        th = "".join(f"<th>{html.escape(str(h))}</th>" for h in self.head)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in self.rows)
        return f"<table><tr>{th}</tr>{trs}</table>"


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)  # str (a paragraph; "- " lines make a list) or Table
    figures: list[Path] = field(default_factory=list)

    def add(self, *blocks) -> Section:
        self.blocks.extend(b for b in blocks if b)
        return self


def _inline_html(s: str) -> str:
    s = html.escape(s.replace("\\*", "*").replace("\\|", "|"))  # Markdown escapes are for report.md only
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def _para_html(p: str) -> str:
    lines = p.split("\n")
    if all(x.startswith("- ") for x in lines):
        return "<ul>" + "".join(f"<li>{_inline_html(x[2:])}</li>" for x in lines) + "</ul>"
    return f"<p>{_inline_html(' '.join(lines))}</p>"


# -- helpers ------------------------------------------------------------------------------------------------
def _atol(a: list[dict], tol: float):
    return next((x["sparsity"] for x in a if x["atol"] == tol), None)



def _pm(ms: dict | None, digits: int = 1) -> str:
    """mean ± sd (n) of a fraction, or the single value."""
    if not ms or ms.get("mean") is None:
        return "—"
    if ms.get("sd") is None:
        return f"{pct(ms['mean'], digits)} (1 seed)"
    return f"{pct(ms['mean'], digits)} ± {100 * ms['sd']:.{digits}f} ({ms['n']} seeds)"


def _ci(c: dict, digits: int = 1) -> str:
    if c.get("lo") is None:
        return f"{100 * c['diff']:+.{digits}f} points (no interval)"
    return f"{100 * c['diff']:+.{digits}f} points [{100 * c['lo']:+.{digits}f}, {100 * c['hi']:+.{digits}f}]"


def _jitter_words(c: dict) -> str:
    """Where θ_full's jitter in comparison ``c`` came from (results written before ``jitter_source`` say both)."""
    return {"seeds": "between its seeds at the same step",
            "neighbouring checkpoint": "to its flatter neighbouring checkpoint, one seed only: an upper bound on the noise"}.get(
        c.get("jitter_source"), "between its neighbouring checkpoints or seeds")


def claim(c: dict, subject: str, measure: str, names: dict | None = None) -> str:
    """One sentence from a comparison: the direction only when its interval excludes 0 (and, where a family was
    corrected, its Holm-adjusted p-value is below 0.05, and it exceeds θ_full's own jitter), else "inconclusive"."""
    a, b = ((names or {}).get(c[k], c[k]) for k in ("a", "b"))
    if c.get("lo") == c.get("hi") == c["diff"] == 0:
        return f"{subject}: no difference — {measure} is the same on every one of the {c['n']} items"
    if c["verdict"] == "no interval":
        return f"{subject}: no interval — {measure} {b} − {a} = {_ci(c)}, and every seed gave the same value ({c['method']})"
    if c["verdict"] == "within jitter":
        return (f"{subject}: not an effect — {measure} {b} − {a} = {_ci(c)}, no larger than θ_full's own jitter "
                f"({100 * c['jitter']:.1f} points {_jitter_words(c)})")
    if c["verdict"] == "inconclusive":
        if c.get("lo") is None:
            return f"{subject}: inconclusive — {measure} {b} − {a} = {100 * c['diff']:+.1f} points, no interval ({c['method']})"
        why = "an interval that includes 0" if not (c["lo"] > 0 or c["hi"] < 0) else f"Holm-corrected p = {c.get('p_holm', 1):.2g} over {c.get('family')} tests"
        return f"{subject}: inconclusive — {measure} {b} − {a} = {_ci(c)}, {why}"
    word = "higher" if c["verdict"] == "higher" else "lower"
    holm = f"; Holm-corrected p = {c['p_holm']:.2g} over {c['family']} tests" if c.get("p_holm") is not None else ""
    return f"{subject}: {measure} of {b} is {word} than {a} by {abs(100 * c['diff']):.1f} points ({b} − {a} = {_ci(c)}; 95% interval excludes 0{holm})"


class _Paper:
    """The published values, as the study put them into ``results["paper"]``."""

    def __init__(self, d: dict):
        self.__dict__.update({k.upper(): v for k, v in d.items()})


# -- one renderer per part ------------------------------------------------------------------------------------
# why PPO stays out of every RL average: TRL's PPO scores with a reward *model*, here the backbone with a freshly
# initialised scalar head, so it optimises a random reward, not the task's
PPO_NOTE = ("PPO is reported but kept out of every RL average: TRL's PPO scores completions with a reward model, which "
            "here is the backbone with an untrained scalar head, so it optimises a random reward rather than the task's.")


def quant_note(meta: dict) -> str | None:
    """What a GGUF-quantized origin means for the study, from the numbers the study measured."""
    if meta.get("quantized_note"):  # results written by an older version carry the sentence itself
        return meta["quantized_note"]
    q = meta.get("quantized_source")
    if not q:
        return None
    types = q.get("gguf_tensor_types") or {}
    stored = ", ".join(f"{v} tensor{'s' if v != 1 else ''} in {k}" for k, v in types.items()) or "an unrecorded mix of types"
    share = pct(q["even_mantissa_share"], 0) if q.get("even_mantissa_share") is not None else "an unmeasured share"
    return ("The weights come from a GGUF file that was quantized before publication (" + stored + "; in the 4-bit types each "
            "block of weights holds at most 16 distinct levels) and were dequantized to bf16 here. What that changes is the "
            "distribution of values, not their bf16 bit patterns: the lowest mantissa bit is zero in " + share + " of the weights "
            "(50% for random bits), so the precision floor applies exactly as to any bf16 checkpoint; but the model has lost the "
            "fine structure of the original's weights, and its absolute sparsities are not directly comparable with those of "
            "unquantized checkpoints.")


def schedule_sum(steps: int, peak: float, schedule: str = "constant", warmup_ratio: float = 0.0) -> float:
    """Σ of the learning rates of ``steps`` optimizer steps under transformers' schedule of that name (warmup
    ``ceil(ratio × steps)`` steps, then constant, linear decay to 0, or a half cosine)."""
    import math

    w = math.ceil(steps * warmup_ratio) if warmup_ratio else 0
    total = 0.0
    for t in range(steps):
        if t < w:
            f = t / max(1, w)
        elif schedule == "linear":
            f = max(0.0, (steps - t) / max(1, steps - w))
        elif schedule == "cosine":
            f = max(0.0, 0.5 * (1.0 + math.cos(math.pi * (t - w) / max(1, steps - w))))
        else:
            f = 1.0
        total += peak * f
    return total


def _schedule_words(b: dict) -> str:
    s, w = b.get("lr_schedule", "constant"), b.get("warmup_ratio", 0.0)
    return (f"{s} schedule" if s != "constant" else "constant") + (f" after {100 * w:.0f}% warmup" if w else "")


def _time_line(res: StudyResults) -> str:
    """How long it took: the runs' own training time (their logs; evaluation and sampling not included) and this
    invocation's wall time, which is much shorter when runs came from the cache, so it is never the only figure."""
    meta = res.meta
    train_min = sum(r.elapsed_s for r in res.runs.values()) / 60
    if meta.get("merged_from"):
        return (f"- {meta['runs']} runs, {train_min:.1f} minutes of training in all (the runs' own logs; sampling and evaluation "
                f"not included); the merged studies' last invocations took {meta['elapsed_s'] / 60:.1f} minutes in all (a study resumed "
                "from its cache counts only its last invocation)")
    return (f"- {meta['runs']} runs, {train_min:.1f} minutes of training in all (the runs' own logs; sampling and evaluation "
            f"not included); this invocation took {meta['elapsed_s'] / 60:.1f} minutes (runs found in the cache are not re-run)")


def _recovery_words(c: dict) -> str:
    """θ_sub − θ_full read as the paper's recovery claim (non-inferiority, :func:`rlsubnet.study.claims.recovery_verdict`),
    beside the test for a difference, so that "inconclusive" there is not read as "not recovered"."""
    from ..study.claims import recovery_verdict

    margin = f"−{100 * c['jitter']:.1f} points, θ_full's jitter" if c.get("jitter") is not None else "0, no jitter measured"
    return f"; as recovery (the whole interval at or above {margin}): **{recovery_verdict(c)}**"


def _seeds_ran(meta: dict) -> int:
    """How many seeds this record holds: those it ran (``--only-seeds``) or was merged from, else the budget's."""
    ran = meta.get("seeds_run")
    return len(ran) if isinstance(ran, list) and ran else meta["budget_settings"].get("seeds", 1)


def render_setup(res: StudyResults, figdir: Path) -> Section:
    meta = res.meta
    b = meta["budget_settings"]
    lines = [f"- model: `{Path(meta['model']).name}` (no local paths in the report; `results.json` has the full one)",
             f"- budget: {meta['budget']}: {b['steps']} steps per run at one learning rate for every algorithm "
             f"(peak {meta['lr']:g}" + (f", the budget's {b['lr']:g} × {meta['lr_scale']:g} (`--lr-scale`)" if meta.get("lr_scale", 1.0) != 1.0 else "")
             + f", {_schedule_words(b)}, so Σlr = {schedule_sum(b['steps'], meta['lr'], b.get('lr_schedule', 'constant'), b.get('warmup_ratio', 0.0)):.2g}), "
             f"training precision {meta.get('precision', 'fp32')}"
             + (" (fp32 master weights, bf16 compute and sampling, checkpoints stored in the base dtype)" if meta.get("precision") == "mixed" else ""),
             f"- seed {meta['seed']} ({_seeds_ran(meta)} seed(s) where the report gives mean ± sd"
             + (f"; only `--only-seeds {','.join(map(str, meta['seeds_run']))}` of the study's {b.get('seeds', 1)} ran here"
                if _seeds_ran(meta) < b.get("seeds", 1) and not meta.get("merged_from") else "")
             + (f"; {b.get('seeds', 1)} of the budget's {meta['budget_seeds']}, merged" if meta.get("merged_from")
                and meta.get("budget_seeds") not in (None, b.get("seeds", 1))
                else f"; `--seeds {b.get('seeds', 1)}`, the budget's own is {meta['budget_seeds']}"
                if meta.get("budget_seeds") not in (None, b.get("seeds", 1)) else "") + f"), task `{meta['task']}` level {meta['level']}, "
             f"second task `{meta['task2']}`; accuracy on {meta.get('n_eval', b['n_eval'])} held-out problems, none a reordering of a training problem",
             _time_line(res)]
    if meta.get("merged_from"):
        seeds = lambda ss: f"seed{'s' if len(ss) > 1 else ''} {', '.join(map(str, ss))}"
        only_rq2 = all(set(m.get("rqs") or {"rq2": 0}) == {"rq2"} for m in meta["merged_from"])
        what = lambda m: seeds(m["seeds"]) if only_rq2 else ", ".join(rq.upper() if rq == "rq4" else f"{rq.upper()} {seeds(ss)}"
                                                                       for rq, ss in m["rqs"].items())
        parts = [f"{what(m)} from `{m['record']}` (its last invocation: {m['elapsed_s'] / 60:.0f} minutes)" for m in meta["merged_from"]]
        again = [w for rq, w in (("rq1", "RQ1's means and SFT-against-RL comparisons"), ("rq2", "RQ2's points, verdicts and nulls"),
                                 ("rq5", "RQ5's in- against off-distribution comparisons")) if rq in (meta.get("rqs") or ["rq2"])]
        lines.append(f"- **merged** (`rlsubnet study-merge`) from {len(parts)} studies whose "
                     + ("seeds" if only_rq2 else "questions and seeds") + " ran apart: " + "; ".join(parts)
                     + ". They were checked to share the model, budget, lr, task, precision, test problems and preference "
                     "pairs" + (f"; {', '.join(again)} are decided again over every seed" if again else "")
                     + "".join(f"; {n}" for n in meta.get("merge_notes") or []))
    lines += _signal_lines(res)
    note = quant_note(meta)
    if note:
        lines.append(f"- **Note on the weights.** {note}")
    return Section("Setup").add("\n".join(lines))


def _signal_lines(res: StudyResults) -> list[str]:
    """Did the sampling algorithms learn? Steps with a gradient (some group of completions scored unevenly) and
    truncated completions, per GRPO/RLOO run; masked runs whose reward curve equals θ_full's are named."""
    out = []
    for name, r in res.runs.items():
        zs = [z for z in r.zero_std or [] if z is not None]
        if not zs or r.mask:
            continue
        signal = sum(1 for z in zs if z < 1)
        cl = [c for c in r.clipped or [] if c is not None]
        out.append(f"- learning signal of `{name}` ({r.algo.upper()}): a gradient in {signal} of {len(zs)} steps (in the others every "
                   "group of completions got the same reward)" + (f"; {pct(sum(cl) / len(cl), 0)} of completions were cut at the token limit"
                                                                  if cl else "")
                   + (" — **this run barely learned**" if signal < len(zs) / 2 else ""))
        same = [m for m, q in res.runs.items() if m.startswith(name + "_") and q.mask and q.reward and q.reward == r.reward]
        if same:
            out.append(f"- the reward curves of {', '.join(f'`{m}`' for m in same)} are identical to `{name}`'s")
    return out


def render_rq1(res: StudyResults, figdir: Path) -> Section:
    P = _Paper(res.paper)
    rq = res.rq1
    rows_in = rq.rows
    sec = Section("RQ1: how sparse are the updates?")
    rows = []
    for r in rows_in:
        fl = r.floor or {}
        paper = "; ".join(f"{n}: {v}" for n, v in P.TABLE1.get(r.algo, [])) or "—"
        rows.append([r.algo.upper() + ("" if r.in_rl_average or r.algo == "sft" else " *"),
                     _pm(r.sparsity_mean_sd, 2),
                     f"{pct(fl.get('fraction'))} (Σlr {r.lr_sum:.2g})" if fl else "—",
                     _pm(r.above_floor_mean_sd, 2) if fl else "—",
                     pct(_atol(r.atol, 1e-5)), pct(r.bf16_rel_sparsity),
                     pct(r.rank_mean, 1) if r.rank_mean is not None else "—",
                     "✓" if r.in_distribution else "✗", paper])
    sec.add("Table 1/2 analogue: update sparsity of each algorithm from the same init, with the same learning rate, "
            "steps and batch for every algorithm.",
            Table(["algorithm", "bits identical", "below the floor", "sparsity above the floor", "|Δ| ≤ 1e-5 (seed 0)", "bf16-relative",
                   "mean rank (Table 2)", "in-dist", "paper Table 1 (|Δ| ≤ 1e-5)"], rows),
            "*Below the floor*: share of entries that no update of the run's size (Σ of its logged learning rates) could move in "
            "bf16 (every value within Σlr rounds back to the stored one); the sparsity above the floor counts only the entries "
            "that could have changed.")
    if rq.ppo_note or any(r.algo == "ppo" for r in rows_in):
        sec.add("\\* " + PPO_NOTE)
    for f in rq.failed:
        sec.add(f"{f['run'].upper()} is missing from the table: {f['why']}")
    tols = [1e-8, 1e-7, 1e-6, 1e-5]
    t6 = [[r.algo.upper()] + [pct(_atol(r.atol, t)) for t in tols] for r in rows_in]
    t6 += [[f"paper: {k}"] + [f"{v:.2f}%" for v in vals] for k, vals in P.TABLE6.items()]
    sec.add("Table 6 analogue: sparsity at each absolute tolerance.", Table(["run"] + [f"{t:g}" for t in tols], t6),
            "Paper Table 2 (mean update rank): " + ", ".join(f"{k} {v}%" for k, v in P.TABLE2.items()) + ".")
    labels = [r.algo.upper() for r in rows_in]
    sd = lambda key: [(getattr(r, key) or {}).get("sd") or 0.0 for r in rows_in]
    seeded = any((r.sparsity_mean_sd or {}).get("sd") is not None for r in rows_in)  # error bars only where there are seeds
    sec.figures.append(bar_chart(figdir / "rq1_sparsity.png", labels, [],
                                 "Update sparsity by algorithm" + (" (± sd over seeds, where run with several)" if seeded else " (one seed)"),
                                 "algorithm", "sparsity",
                                 groups={"bits identical": [(r.sparsity_mean_sd or {}).get("mean", r.sparsity) for r in rows_in],
                                         "above the floor": [(r.above_floor_mean_sd or {}).get("mean") for r in rows_in]},
                                 errors={"bits identical": sd("sparsity_mean_sd"), "above the floor": sd("above_floor_mean_sd")} if seeded else None))
    xs = [max(a["atol"], 1e-12) for a in rows_in[0].atol]
    sec.figures.append(line_chart(figdir / "rq1_tolerance.png", xs, {r.algo.upper(): [a["sparsity"] for a in r.atol] for r in rows_in},
                                  "Sparsity vs absolute tolerance (0 at 1e-12)", "tolerance", "sparsity", logx=True))
    d = res.diffs
    for a in [r.run for r in rows_in][:3]:
        g = d[a].grid if a in d else None
        if g:
            layers = sorted(g, key=int)
            kinds = sorted({k for L in g.values() for k in L})
            sec.figures.append(heatmap(figdir / f"rq1_layers_{a}.png", [[g[L].get(k, float("nan")) for k in kinds] for L in layers], layers, kinds,
                                       f"{a.upper()}: sparsity per layer × module (Fig. 3 analogue)", "module", "layer"))
    ulp = d[rows_in[0].run].ulp_hist if rows_in[0].run in d else None
    if ulp:
        ks = [k for k in ulp if k != "0"]  # changed entries only, in the order the diff wrote them (<1, 1, 2, ... ULPs)
        sec.figures.append(bar_chart(figdir / "rq1_ulp.png", [str(k) for k in ks], [ulp[k] for k in ks],
                                     f"{rows_in[0].algo.upper()}: changed entries by ULP distance", "ULPs moved", "entries"))
    _exponent_table(res, rows_in, sec)
    text = ["**What this shows.**"]
    floors = [(r.algo, (r.floor or {}).get("fraction")) for r in rows_in if r.floor]
    if floors:
        worst = max(floors, key=lambda x: x[1])
        if worst[1] > 0.5:
            text.append(f"These runs are floor-dominated: in {worst[0].upper()}, {pct(worst[1], 1)} of the parameters could not move at "
                        "this Σlr, so the bitwise sparsity mostly measures bf16 rounding, not RL; read the column *sparsity above the floor*.")
        else:
            text.append(f"The floor is at most {pct(worst[1], 1)} of the parameters here, so the sparsity measures which entries the runs moved.")
    for c in rq.comparisons:
        text.append(claim(c, f"SFT against {c['b'].upper()}", c["what"], {c["a"]: c["a"].upper(), c["b"]: c["b"].upper()}) + ".")
    ranks = [r.rank_mean for r in rows_in if r.rank_mean is not None]
    if ranks:
        text.append(f"Mean update rank ratio {pct(min(ranks), 1)}–{pct(max(ranks), 1)} of the maximum (paper 99.2–99.8%)")
        st = [r.stable_rank_mean for r in rows_in if r.stable_rank_mean is not None]
        ef = [r.effective_rank_mean for r in rows_in if r.effective_rank_mean is not None]
        if st and ef:
            text.append(f"— but the numerical rank counts every non-zero singular value: the stable rank (‖ΔW‖_F²/‖ΔW‖_2²) is "
                        f"{pct(min(st), 1)}–{pct(max(st), 1)} and the effective rank (exponential of the entropy of the singular "
                        f"values) {pct(min(ef), 1)}–{pct(max(ef), 1)} of the maximum.")
        else:
            text[-1] += "."
    sec.add(" ".join(text))
    return sec


def half_ulp_bf16(e: int) -> float:
    """Half a bf16 ULP for |w0| in [2^e, 2^(e+1)): 7 stored mantissa bits, so the ULP is 2^(e−7)."""
    return 2.0 ** (e - 8)


def _exponent_table(res: StudyResults, rows_in, sec: Section) -> None:
    """Sparsity per |w0| bin beside the run's Σlr / half-ULP: how much of the sparsity still depends on magnitude."""
    d = res.diffs
    runs = [(r.algo.upper(), d[r.run].by_exponent if r.run in d else None, r.lr_sum) for r in rows_in]
    runs = [(a, [x for x in bx if x["dtype"] == "bfloat16" and x["exponent"] is not None], S) for a, bx, S in runs if bx and S]
    if not runs:
        return
    exps = sorted({x["exponent"] for _, bx, _ in runs for x in bx})
    numel = {e: max((x["numel"] for _, bx, _ in runs for x in bx if x["exponent"] == e), default=0) for e in exps}
    total, acc, med = sum(numel.values()), 0, exps[0]
    for e in exps:
        acc += numel[e]
        if acc >= total / 2:
            med = e
            break
    S = runs[0][2]
    rows = []
    for e in exps:
        if numel[e] < total * 1e-4:
            continue  # bins holding under 0.01% of the weights
        rows.append([f"[2^{e}, 2^{e + 1})", pct(numel[e] / total, 2), f"{S / half_ulp_bf16(e):.3g}"]
                    + [pct(next((x["changed_fraction"] for x in bx if x["exponent"] == e), None), 1) for _, bx, _ in runs])
    sec.add(f"Sparsity depends on weight magnitude: the share of entries changed per |w0| bin (bf16), beside Σlr / half-ULP of the bin "
            f"(an entry whose accumulated update stays below half a ULP cannot change). The median |w0| lies in [2^{med}, 2^{med + 1}), "
            f"where Σlr / half-ULP = {S / half_ulp_bf16(med):.3g} (Σlr {S:.2g} of {runs[0][0]}).",
            Table(["|w0| bin", "share of weights", "Σlr / half-ULP"] + [f"{a}: changed" for a, _, _ in runs], rows))


VARIANT = {"init": "θ_init", "full": "θ_full", "sub": "θ_sub", "random_uniform": "random mask (uniform)",
           "random_magnitude": "random mask (|w0|-matched)", "union": "θ_sub on the union mask",
           "padded": "θ_sub on the final mask padded at random to the union's size"}


def _vname(v: str) -> str:
    if "@" in v:  # a null: "full@8", "full seed k+1@8"
        m, step = v.rsplit("@", 1)
        return f"{VARIANT.get(m, m.replace('full', 'θ_full'))} at step {step}"
    return VARIANT.get(v, v)


def _n(k: int, word: str) -> str:
    return f"{k} {word}" + ("" if k == 1 else "s")


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _rq2_trajectories(rq, algo: str, figdir: Path, sec: Section) -> None:
    """Accuracy against step and against training progress, and the training curves, for one algorithm."""
    ts = [t for t in rq.trajectories if t.algo == algo]
    variants = list(dict.fromkeys(t.variant for t in ts))
    steps = sorted({p.step for t in ts for p in t.points})
    seeds = sorted({t.seed for t in ts if t.variant == "full"})

    def mean_at(v, s, attr="accuracy"):
        return _mean([getattr(t.at(s), attr) for t in ts if t.variant == v and t.at(s) is not None])

    head = ["step"] + [VARIANT.get(v, v) + (f" ({_n(sum(1 for t in ts if t.variant == v), 'seed')})" if len(seeds) > 1 else "") for v in variants]
    rows = [[s] + [pct(mean_at(v, s), 1) for v in variants] for s in steps]
    peak = next((p.full_step for p in rq.points if p.name == "peak"), None)
    sec.add(f"{algo.upper()}: held-out accuracy along training (mean over seeds; step 0 is θ_init), a checkpoint every {_n(rq.every, 'step')}:",
            Table(head, rows))
    if len(seeds) > 1:  # the spread the means hide: every run, seed by seed
        order = sorted(ts, key=lambda t: (variants.index(t.variant), t.seed))
        sec.add(f"{algo.upper()}: the same, seed by seed:",
                Table(["step"] + [f"{VARIANT.get(t.variant, t.variant)} s{t.seed}" for t in order],
                      [[s] + [pct(t.at(s).accuracy, 1) if t.at(s) is not None else "–" for t in order] for s in steps]))
    series = {VARIANT.get(v, v): [mean_at(v, s) for s in steps] for v in variants}
    sec.figures.append(line_chart(figdir / f"rq2_trajectory_{algo}.png", steps, series,
                                  f"{algo.upper()}: accuracy along training (mean over seeds)", "training step", "held-out accuracy",
                                  integer_x=True, vlines={"θ_full's peak": peak} if peak else None))
    key = "loss" if algo in ("dpo", "kto", "orpo", "simpo") else "progress"
    what = "training loss (mean since the previous checkpoint)" if key == "loss" else "mean training reward"
    xs_by, ser = {}, {}
    for v in variants:
        pts = [(mean_at(v, s, key), mean_at(v, s)) for s in steps if s > 0 and mean_at(v, s, key) is not None]
        if pts:
            xs_by[VARIANT.get(v, v)], ser[VARIANT.get(v, v)] = [x for x, _ in pts], [y for _, y in pts]
    if ser:
        sec.figures.append(line_chart(figdir / f"rq2_progress_{algo}.png", [], ser, f"{algo.upper()}: accuracy against training progress",
                                      what, "held-out accuracy", xs_by=xs_by))


def _rq2_curves(res: StudyResults, algo: str, figdir: Path, sec: Section) -> None:
    """The training curves (the paper's Fig. 4 is DPO's loss): loss and, for DPO, the reward margin, per step."""
    rq = res.rq2
    runs = res.runs
    by_variant: dict = {}
    for t in rq.trajectories:
        if t.algo == algo and t.run in runs:
            by_variant.setdefault(t.variant, []).append(runs[t.run])
    for key, label in (("loss", "training loss"), ("margin", "reward margin (chosen − rejected)"), ("reward", "mean reward")):
        series = {}
        for v, rs in by_variant.items():
            curves = [getattr(r, key) or [] for r in rs]
            n = min((len(c) for c in curves), default=0)
            if n:
                series[VARIANT.get(v, v)] = [_mean([c[i] for c in curves]) for i in range(n)]
        pref = algo in ("dpo", "kto", "orpo", "simpo")
        if series and {"loss": pref, "margin": algo == "dpo", "reward": not pref}[key]:
            n = max(len(v) for v in series.values())
            sec.figures.append(line_chart(figdir / f"rq2_{key}_{algo}.png", list(range(1, n + 1)), series,
                                          f"{algo.upper()}: {label} per step (mean over seeds)", "training step", label, integer_x=True))


def render_rq2(res: StudyResults, figdir: Path) -> Section:
    P = _Paper(res.paper)
    rq = res.rq2
    sec = Section("RQ2/RQ3: does the subnetwork recover full finetuning?")
    algos = list(dict.fromkeys(r.algo for r in rq.rows))
    d = rq.data or {}
    if d:
        lines = [f"- {d['steps']} steps, peak lr {d['lr']:g}, schedule {d['lr_schedule']}"
                 + (f" with {100 * d['warmup_ratio']:.0f}% warmup" if d.get("warmup_ratio") else "")
                 + f"; a checkpoint every {_n(d['every'], 'step')} for θ_full, θ_sub and every control, each evaluated on the same problems"]
        if d.get("pairs") is not None:
            short = d.get("min_pairs") and d["pairs"] < d["min_pairs"]
            lines.append(f"- preference data: {d['pairs']} distinct pairs of the model's own samples from {d.get('distinct_prompts')} prompts; "
                         f"{d['examples']} examples drawn, so {d['epochs']:.2f} passes over the pairs"
                         + (f" — **fewer than the {d['min_pairs']} pairs this budget asks for**" if short else ""))
        for run, f in (d.get("final") or {}).items():
            bits = [f"loss {f['first_loss']:.3f} → {f['loss']:.3f}" if f.get("loss") is not None and f.get("first_loss") is not None else None,
                    f"margin {f['margin']:.2f}" if f.get("margin") is not None else None,
                    f"reward {f['reward']:.2f}" if f.get("reward") is not None else None]
            bits = [b for b in bits if b]
            if bits:
                lines.append(f"- θ_full `{run}` at the end (mean over the last {_n(d['every'], 'step')}): " + ", ".join(bits))
        order = (rq.replay or {}).get("mask_order", "before-clip")
        lines.append(f"- masked runs mask the gradient {order.split('-')[0]} gradient clipping"
                     + (" (the paper's g ← m ⊙ ∇L: clipping sees the masked gradient)" if order == "before-clip"
                        else " (`--mask-order after-clip`: clipping sees the whole gradient's norm, then the mask applies)"))
        sec.add("**Operating point.**", "\n".join(lines))
    for algo in algos:
        if rq.trajectories:
            _rq2_trajectories(rq, algo, figdir, sec)
        _rq2_curves(res, algo, figdir, sec)
    if rq.verdicts:
        fam = max((c.get("family") or 0 for c in rq.verdicts), default=0)
        bullets = []
        for pt in rq.points:
            steps = ", ".join(f"{VARIANT.get(v, v)} {'/'.join(str(x) for x in ss)}" for v, ss in pt.steps.items()) if pt.name == "matched" else None
            bullets.append(f"- **{pt.name}** — {pt.why}" + (f" (steps: {steps})" if steps else ""))
            for c in rq.verdicts:
                if c["point"] == pt.name and (c["a"], c["b"]) in (("init", "full"), ("full", "sub"), ("random_magnitude", "sub"), ("random_uniform", "sub"), ("full", "union"),
                                                                   ("full", "padded"), ("padded", "union")):
                    bullets.append("  - " + claim(c, f"{_vname(c['b'])} against {_vname(c['a'])}", "accuracy", VARIANT)
                                   + (_recovery_words(c) if (c["a"], c["b"]) == ("full", "sub") else ""))
        sec.add(f"**Verdicts.** Differences pooled over seeds and problems (bootstrap over seeds × problems); {fam} comparisons "
                "are drawn in all, with Holm's correction over them; a difference no larger than θ_full's own jitter (the largest "
                "difference between two of its seeds at the same step; with one seed, the run against its flatter neighbouring checkpoint, which also holds the "
                "trajectory's trend and so overstates the noise) is not called an effect.",
                "\n".join(b.replace("  - ", "- ↳ ") for b in bullets))
        sec.add("Every comparison (accuracy points; p: two-sided bootstrap; Holm: corrected over the whole family):",
                Table(["point", "difference", "value [95% interval]", "p", "Holm p", "verdict"],
                      [[c["point"], f"{_vname(c['b'])} − {_vname(c['a'])}", _ci(c), f"{c['p']:.3g}" if c.get("p") is not None else "—",
                        f"{c['p_holm']:.3g}" if c.get("p_holm") is not None else "—", c["verdict"]] for c in rq.verdicts]))
        forest = [c for c in rq.verdicts if c["point"] == "peak"]
        if forest:
            sec.figures.append(interval_chart(figdir / "rq2_accuracy_intervals.png", [f"{_vname(c['b'])} − {_vname(c['a'])}" for c in forest],
                                              [c["diff"] for c in forest], [c["lo"] for c in forest], [c["hi"] for c in forest],
                                              "At θ_full's peak: accuracy differences, 95% intervals pooled over seeds", "accuracy difference"))
    if rq.nulls:
        sec.add("The null: θ_full against itself (what checkpoint choice and seed alone do to accuracy):",
                Table(["point", "comparison", "value [95% interval]"],
                      [[n["point"], f"{_vname(n['b'])} − {_vname(n['a'])}", _ci(n)] for n in rq.nulls]))
    _rq2_replay(rq, sec)
    _examples(res, sec)
    acc_rows, close_rows = [], []
    for r in rq.rows:
        tag = f"{r.algo.upper()} seed {r.seed}"
        for v, a in r.accuracy.items():
            acc_rows.append([tag, VARIANT.get(v, v), pct(a["accuracy"], 1), pct(a.get("format_rate"), 1), pct(a.get("strict_accuracy"), 1)])
        for v, c in r.closeness_to_full.items():
            close_rows.append([tag, VARIANT.get(v, v), pct(c["mask_density"], 2), pct(equal_at(c["inside_mask"], 0), 1), pct(equal_at(c["inside_mask"], 1e-5), 1),
                               pct(equal_at(c["inside_mask"], 1e-4), 1), pct(equal_at(c["all"], 1e-5), 2), f"{c['rel_l2']:.3f}"])
    n = rq.rows[0].n_eval if rq.rows else 0
    sec.add(f"Final checkpoints, per seed (data for the record; the verdicts above are taken at the stated points). Accuracy on {n} "
            "held-out problems (greedy); *format* = the completion is the number alone, as the prompt asks; *strict* = right answer in that format.",
            Table(["run", "model", "accuracy", "format", "strict"], acc_rows),
            "Table 3 analogue: closeness to θ_full at the final step. Outside a mask both models equal θ_init by construction, so closeness is "
            "shown inside the mask; *relative distance* = ‖θ − θ_full‖ / ‖θ_full − θ_init‖ over all parameters.",
            Table(["run", "model", "mask density", "inside: bits equal", "inside: |Δ| ≤ 1e-5", "inside: |Δ| ≤ 1e-4", "all: |Δ| ≤ 1e-5",
                   "relative distance"], close_rows),
            f"Paper: closeness at 1e-5 {P.TABLE3['closeness_1e-5']['dpo']}% (DPO) and {P.TABLE3['closeness_1e-5']['prime']}% (PRIME) "
            f"over all parameters, {P.TABLE3['closeness_1e-4']}% at 1e-4; accuracy θ_full→θ_sub DPO 40.3→41.9, PRIME 69.8→72.2.")
    if not rq.trajectories:  # results of an older version: endpoint comparisons only
        comp_rows = [[f"{r.algo.upper()} seed {r.seed}", c["what"], f"{_vname(c['b'])} − {_vname(c['a'])}", _ci(c), c["verdict"]]
                     for r in rq.rows for c in r.comparisons]
        sec.add("Paired comparisons at the final step, per seed (95% paired-bootstrap intervals):",
                Table(["run", "measure", "difference", "value [95% interval]", "verdict"], comp_rows))
    return sec


def _examples(res: StudyResults, sec: Section, k: int = 3) -> None:
    """A few greedy completions per model on the same problems: accuracy swings with answer style."""
    rows = res.rq2.rows
    if not rows:
        return
    r = rows[0]
    recs = [("θ_init", "init"), ("θ_full", r.run), ("θ_sub", f"{r.run}_sub")]
    recs = [(label, res.accuracy[key]) for label, key in recs if key in res.accuracy and res.accuracy[key].samples]
    if not recs:
        return
    table = []
    for i in range(min(k, min(len(a.samples) for _, a in recs))):
        p = recs[0][1].samples[i]
        table.append([p["prompt"][:60], p["answer"]] + [f"{'✓' if a.samples[i]['correct'] else '✗'} {a.samples[i]['completion'][:60]!r}"
                                                       for _, a in recs])
    sec.add(f"Example completions at the final step ({r.algo.upper()} seed {r.seed}; greedy, the first {len(table)} test problems):",
            Table(["problem", "answer"] + [label for label, _ in recs], table))


def _rq2_replay(rq, sec: Section) -> None:
    """What the final mask can and cannot replay, with numbers."""
    rp = (rq.replay or {}).get("runs") or {}
    if not rp:
        return
    lines = []
    for run, x in rp.items():
        if x.get("ever_changed") is not None:
            lines.append(f"- `{run}`: {x['ever_changed']:,} entries changed (in bf16) at some step, {x['final_mask']:,} are in the final mask; "
                         f"{x['ever_outside_final']:,} ({pct(x['ever_outside_share'], 1)} of the ever-changed) crossed a rounding boundary and came "
                         "back, so a mask taken at the end cannot replay them (paper: about 8.5%)"
                         + (f"; the padded mask adds {x['padded_added']:,} never-changed entries"
                            + (f" ({x['padded_moved']:,} of them from a neighbouring |w0| bin of the same tensor, where the union's own bin "
                               "held too few never-changed entries)" if x.get("padded_moved") else "")
                            + (f", {x['padded_shortfall']:,} short of the union's size (tensors without enough never-changed entries)"
                               if x.get("padded_shortfall") else "") if x.get("padded_added") is not None else ""))
    kinds, outside = {}, {}
    for x in rp.values():
        for k, v in (x.get("inside_by_kind") or {}).items():
            kinds.setdefault(k, []).append(v)
        for k, v in (x.get("outside_by_kind") or {}).items():  # records written before it have none
            o = outside.setdefault(k, [0, 0])
            o[0], o[1] = o[0] + v["outside"], o[1] + v["numel"]
    sec.add("**What the mask can and cannot replay.** Under bf16 mixed precision the mask is the set of entries whose stored bf16 value "
            "differs at the end; embeddings and norms are read in fp32 by the forward pass, and entries that moved and came back are "
            "outside it, so θ_sub cannot replay θ_full exactly. The control *θ_sub on the union mask* trains every entry that changed "
            "at any step." + (" Its partner, *θ_sub on the final mask padded at random to the union's size*, trains the final mask plus "
                              "as many entries as the union adds, drawn among the entries that never changed (matched per tensor × |w0| bin "
                              "to the added ones): if the union recovers θ_full and the padded mask does not, it is *which* entries the "
                              "union adds, not how many." if any(t.variant == "padded" for t in rq.trajectories) else ""),
            "\n".join(lines) if lines else None)
    if kinds:
        head = ["kind", "entries in mask", "bits equal", "|Δ| ≤ 1e-5", "|Δ| ≤ 1e-4"]
        rows = [[k, f"{sum(v['inside'] for v in vs):,}"] + [pct(sum(v[key] * v["inside"] for v in vs) / max(1, sum(v["inside"] for v in vs)), 1)
                                                           for key in ("bits_equal", "equal_1e-5", "equal_1e-4")] for k, vs in kinds.items()]
        if outside:  # the entries the final mask freezes that θ_full moved and brought back, by kind
            head.append("changed at some step, outside the final mask (of the kind's entries)")
            for row in rows:
                o = outside.get(row[0])
                row.append(f"{o[0]:,} ({pct(o[0] / o[1], 2)})" if o and o[1] else "—")
        sec.add("θ_sub against θ_full inside the mask, by tensor kind (final step, all RQ2 runs pooled"
                + ("; the last column over the runs whose record has it" if outside and any(not x.get("outside_by_kind") for x in rp.values()) else "")
                + "):", Table(head, rows))


def render_rq4(res: StudyResults, figdir: Path) -> Section:
    P = _Paper(res.paper)
    rows_in = res.rq4.rows
    rows = []
    for r in rows_in:
        prow = r.paper_row if r.paper_row is not None else (r.axis if r.axis in P.TABLE4 else None)
        p = P.TABLE4.get(prow) if prow else None
        rows.append([r.axis, f"{r.a} vs {r.b}", f"{pct(r.o1, 1)} / {pct(r.o2, 1)}",
                     f"{pct(r.o1_random, 1)} / {pct(r.o2_random, 1)}", f"{r.ratio:.2f}", f"{r.z:.0f}",
                     f"{pct(r.matched['o1_random'], 1)}; {r.matched['ratio']:.2f}x, z {r.matched['z']:.0f}" if r.matched else "—",
                     f"{pct(r.s1, 1)} / {pct(r.s2, 1)}",
                     f"{p['rl'][0]} / {p['rl'][1]} vs random {p['random'][0]} / {p['random'][1]}" if p else "— (no single-factor row)"])
    sec = Section("RQ4: do subnetworks from different runs overlap?")
    sec.add("Table 4 analogue: overlap of the updated sets against random sets of the same sizes, uniform and matched per "
            "tensor × |w0| exponent bin (weights of similar size move alike in bf16). The paper's row 3 (\"algorithm\") "
            "changes seed, data and algorithm at once: it is the row *seed+data+algorithm* here.",
            Table(["axis", "runs", "o1 / o2", "uniform random o1 / o2", "ratio (uniform)", "z (uniform)",
                   "magnitude-matched random o1; ratio, z", "sparsity s1 / s2", "paper o1 / o2"], rows))
    sec.figures.append(bar_chart(figdir / "rq4_overlap.png", [r.axis for r in rows_in], [], "Overlap o1 against chance", "axis", "o1",
                                 groups={"observed": [r.o1 for r in rows_in], "uniform random": [r.o1_random for r in rows_in],
                                         "|w0|-matched random": [(r.matched or {}).get("o1_random") for r in rows_in]}))

    def _mz(r):
        return r.matched["z"] if r.matched and r.matched["z"] is not None else None

    parts = []
    effects = []
    for r in rows_in:
        m = r.matched
        if m and _mz(r) is not None:
            c = chance(_mz(r))
            effects.append(100 * (m["ratio"] - 1))
            verdict = f"{c} chance (z {_mz(r):.0f})" if c in ("above", "below") else f"inconclusive (|z| ≤ {Z_CHANCE:g})"
            parts.append(f"{r.axis}: o1 {100 * (m['ratio'] - 1):+.1f}% against the magnitude-matched expectation, {verdict}; "
                         f"{r.ratio:.2f}× the uniform expectation")
        else:
            parts.append(f"{r.axis}: {r.ratio:.2f}× the uniform expectation; no matched baseline, so inconclusive")
    lead = (f"The effect size first: the overlap o1 lies {min(effects):+.1f}% to {max(effects):+.1f}% from what random masks matched per "
            "tensor × |w0| bin give" if effects else "No matched baseline was computed")
    sec.add(f"**What this shows.** {lead}; that, not the uniform ratio, is the overlap RL adds beyond weight magnitude.",
            "\n".join("- " + p for p in parts),
            "The z-scores treat the entries of each stratum as independent draws (a hypergeometric count); neighbouring weights of "
            "one tensor are not independent, so z overstates the evidence, and a large z on a small effect is still a small effect.")
    return sec


def render_rq5(res: StudyResults, figdir: Path) -> Section:
    P = _Paper(res.paper)
    f = res.rq5
    sec = Section("RQ5: what makes updates sparse?")
    if f.kl is not None:
        _rq5_ablations(P, f, sec)
    else:
        sec.add("The single-run ablations (KL, clipping, learning rate, precision, steps) run with seed 0, which this record "
                "does not have (`--only-seeds`): only the in- vs off-distribution runs of its seeds are here.")
    sec.add("Table 5 analogue (in- vs off-distribution data; the off-distribution sets have as many examples as the in-distribution ones; "
            "sparsity and above the floor of the first seed, then over every seed):",
            Table(["method", "in-dist", "examples", "sparsity", "sparsity above the floor", "over seeds"],
                  [[x.method, "✓" if x.in_distribution else "✗", x.examples, pct(x.sparsity, 1), pct(x.sparsity_above_floor, 1),
                    _pm(x.sparsity_mean_sd, 2)] for x in f.distribution]
                  + [[f"paper: {n} ({k})", "✓" if i else "✗", "—", f"{v}%", "—", "—"] for n, v, k, i in P.TABLE5]))
    names = {"sft_in": "SFT in-distribution", "sft_off": "SFT off-distribution", "dpo": "DPO in-distribution", "dpo_off": "DPO off-distribution"}
    dc = [c for c in f.distribution_comparisons if c["what"] == "sparsity"]
    if dc:
        sec.add("In- against off-distribution data, over seeds (the paper's causal claim):\n"
                + "\n".join("- " + claim(c, c["algo"].upper(), "sparsity", names) for c in dc))
    if f.kl is None:
        return sec
    tols = [x["atol"] for x in f.precision["bf16"]["atol"]]
    sec.add("The same run stored in bf16 and in fp32 (its fp32 copy), across the tolerance sweep:",
            Table(["stored as"] + [f"|Δ| ≤ {t:g}" if t else "bits identical" for t in tols],
                  [[k] + [pct(_atol(f.precision[k]["atol"], t), 2) for t in tols] for k in ("bf16", "fp32")]))
    if f.steps:
        s = f.steps
        sec.add("Sparsity over training (Fig. 5/6 analogue):",
                Table(["step", "vs θ_init", "vs previous checkpoint", "updated share outside final mask"],
                      [[x.step, pct(x.sparsity, 2), pct(x.consecutive_sparsity, 2), pct(x.outside_final_share, 2)] for x in s]))
        sec.figures.append(line_chart(figdir / "rq5_steps.png", [x.step for x in s],
                                      {"vs θ_init": [x.sparsity for x in s], "vs previous": [x.consecutive_sparsity for x in s]},
                                      "Sparsity over training steps", "step", "sparsity", integer_x=True))
    sec.figures.append(bar_chart(figdir / "rq5_lr.png", [f"{x.scale:g}×" for x in f.lr], [x.sparsity for x in f.lr],
                                 "Sparsity vs learning-rate scale", "learning rate", "sparsity"))
    kl_paper = P.KL["with KL"] - P.KL["without KL"]
    text = (f"**What this shows.** The fp32 copy of the same GRPO run has bitwise sparsity {pct(f.precision['fp32']['sparsity'], 2)} "
            f"against {pct(f.precision['bf16']['sparsity'], 1)} in bf16: under Adam nearly every entry with a non-zero gradient moves, "
            "so this is mechanical, not a finding about RL. " + _fp32_still(res) +
            f"A 16× learning rate gives {pct(f.lr[-1].sparsity, 1)} against {pct(f.lr[0].sparsity, 1)} at 1× (the floor moves with Σlr). "
            f"The KL term moves sparsity by {100 * (f.kl['with'] - f.kl['without']):+.1f} points in one run (paper: {kl_paper:+.1f}); "
            "with one seed per setting this is inconclusive.")
    if f.ever_updated_outside_final is not None:
        text += f" Of all entries updated at some saved step, {pct(f.ever_updated_outside_final, 1)} end outside the final mask (paper: about 8.5%)."
    sec.add(text)
    return sec


def _fp32_still(res: StudyResults) -> str:
    """Where the fp32 copy's unchanged entries sit, by module kind, when there are enough of them to ask (≥ 1%; Gemma's
    fp32 copy keeps 23% of its entries, nearly all in the embedding and the norms): the sentence before it speaks of the
    entries that move, this one of those that do not."""
    fp = res.diffs.get("grpo_fp32")
    if fp is None or not fp.by_module or (fp.sparsity or 0) < 0.01:
        return ""
    kinds = sorted(fp.by_module.items(), key=lambda kv: -kv[1])
    big = [f"{k} {pct(v, 1)}" for k, v in kinds if v >= 0.01]
    small = [v for _, v in kinds if v < 0.01]
    return ("Unchanged in the fp32 copy, by module kind: " + ", ".join(big)
            + (f"; every other kind at most {pct(max(small), 2)}" if small else "") + ". ")


def _rq5_ablations(P, f, sec: Section) -> None:
    """The single-run factors of seed 0's record: KL, clipping, storage and training precision, learning rate."""
    kl_paper = P.KL["with KL"] - P.KL["without KL"]
    af = lambda x, k: f" ({pct((x.get('above_floor') or {}).get(k), 1)} above the floor)" if (x.get("above_floor") or {}).get(k) is not None else ""
    rows = [["KL term (GRPO β)", f"without {pct(f.kl['without'], 1)}{af(f.kl, 'without')}", f"with {pct(f.kl['with'], 1)}{af(f.kl, 'with')}",
             f"paper: with {P.KL['with KL']}%, without {P.KL['without KL']}% ({kl_paper:+.1f} points)"],
            ["gradient clipping", f"with {pct(f.clip['with'], 1)}{af(f.clip, 'with')}", f"without {pct(f.clip['without'], 1)}{af(f.clip, 'without')}",
             "paper: comparable"],
            ["storage precision (one run)", f"bf16 {pct(f.precision['bf16']['sparsity'], 2)}", f"fp32 copy {pct(f.precision['fp32']['sparsity'], 2)}",
             "RL's Razor / 2511.08567: sparsity mostly vanishes in fp32"]]
    tp = f.training_precision
    if tp:
        rows.append(["training precision", f"{tp['main']['precision']} {pct(tp['main']['sparsity'], 2)}", f"pure fp32 {pct(tp['fp32']['sparsity'], 2)}",
                     "the paper trained in bf16 mixed precision"])
    sec.add("Single runs (one seed each): a difference smaller than the seed spread of RQ1 is not evidence.",
            Table(["factor", "A", "B", "published"], rows))
    sec.add("Learning rate (same run at 1×, 4×, 16×):",
            Table(["lr", "bits identical", "below the floor", "sparsity above the floor", "bf16-relative"],
                  [[f"{x.scale:g}×", pct(x.sparsity, 2), pct((x.floor or {}).get("fraction"), 2), pct(x.sparsity_above_floor, 2),
                    pct(x.bf16_rel_sparsity, 2)] for x in f.lr]))


def render_sync(res: StudyResults, figdir: Path) -> Section | None:
    sync = [(name, r) for name, r in res.runs.items() if r.delta_sync]
    if not sync:
        return None
    rows, series, xs_by = [], {}, {}
    # a payload is bit-exact: it also carries zeros whose sign flipped (+0 <-> -0, equal values, not "changed");
    # records written before `delta_entries` existed do not say how many, and the column is left out
    flips = [(name, x["step"], x["delta_entries"] - x["changed_vs_prev"]) for name, r in sync for x in r.delta_sync
             if x.get("delta_entries") is not None and x["delta_entries"] != x["changed_vs_prev"]]
    for name, r in sync:
        for x in r.delta_sync:
            full = r.checkpoint_bytes or 0
            rows.append([name, x["step"], f"{x['changed_vs_prev']:,}"] + ([f"{x['delta_entries']:,}" if x.get("delta_entries") is not None else "—"]
                                                                          if flips else [])
                        + [f"{x['delta_bytes']:,}", f"{x['delta_plain_bytes']:,}",
                           f"{x['delta_plain_bytes'] / x['delta_bytes']:.2f}x" if x["delta_bytes"] and x["delta_plain_bytes"] else "—",
                           f"{full / x['delta_bytes']:.0f}x" if x["delta_bytes"] and full else "—"])
        series[name] = [x["delta_bytes"] / 1e6 for x in r.delta_sync]
        series[f"{name} (int32 + raw)"] = [x["delta_plain_bytes"] / 1e6 for x in r.delta_sync]
        xs_by[name] = xs_by[f"{name} (int32 + raw)"] = [x["step"] for x in r.delta_sync]
    sec = Section("Delta weight sync: what a step sends")
    sec.add("Bytes a delta weight sync would send after each optimizer step (the stored bf16 view against the previous step), as an "
            "rlsubnet-patch/1 payload and in the plain encoding of int32 positions + raw values (what verl's `delta_sharded` sends), "
            "and the ratio of the full checkpoint to the payload. Measured on this run's steps only."
            + (" The payload is bit-exact, so it also sends zeros whose sign flipped (+0 ↔ −0: the same value, not counted as "
               "changed): " + "; ".join(f"`{n}` step {st}: {k:,}" for n, st, k in flips[:6])
               + (f"; {len(flips) - 6} more steps" if len(flips) > 6 else "") + " (column *entries sent*)." if flips else ""),
            Table(["run", "step", "entries changed"] + (["entries sent"] if flips else [])
                  + ["patch bytes", "int32 + raw bytes", "plain / patch", "checkpoint / patch"], rows))
    steps = sorted({x for v in xs_by.values() for x in v})
    sec.figures.append(line_chart(figdir / "delta_sync.png", steps, series, "Delta-sync payload per step", "step", "MB", xs_by=xs_by, integer_x=True))
    return sec


RENDERERS = (("rq1", render_rq1), ("rq2", render_rq2), ("rq4", render_rq4), ("rq5", render_rq5))


SUMMARY_CLAIMS = ("rq2.full_improves.peak", "rq2.sub_recovers_full.peak", "rq2.sub_beats_random_uniform.peak",
                  "rq2.sub_beats_random_magnitude.peak")


def _rq2_summary(res: StudyResults) -> list[str]:
    """RQ2 at θ_full's peak in the Summary, decided by the same rules as the Claims table (:mod:`rlsubnet.study.claims`),
    so that the two never disagree; recovery states its margin, θ_full's jitter, and where that came from."""
    from ..study.claims import NOT_MEASURED, claims
    from .compare_report import describe

    by = {c.key: c for c in claims(res.to_dict())}
    out = []
    for key in SUMMARY_CLAIMS:
        c = by.get(key)
        if c is None or c.verdict == NOT_MEASURED:
            continue
        line = f"- **RQ2 at θ_full's peak**: {c.statement} — **{describe(c)}**"
        if key.startswith("rq2.sub_recovers_full."):
            cmp = next((v for v in res.rq2.verdicts if v.get("point") == "peak" and (v.get("a"), v.get("b")) == ("full", "sub")
                        and v.get("jitter") is not None), None)
            if cmp is not None:
                line += f" (the margin: −{100 * cmp['jitter']:.1f} points, θ_full's own jitter {_jitter_words(cmp)})"
        out.append(line)
    return out


def headline(res: StudyResults) -> Section:
    """The report in a few bullets: what was measured, and which claims held, each with its interval."""
    meta = res.meta
    b = meta["budget_settings"]
    out = [f"- **Measured**: {meta['runs']} training runs of `{Path(meta['model']).name}` ({meta['budget']} budget: {b['steps']} steps, "
           f"peak lr {meta['lr']:g}, {_seeds_ran(meta)} seed(s) where stated), {meta.get('n_eval', b['n_eval'])} held-out problems per evaluation"]
    if res.rq1 is not None and res.rq1.rows:
        rs = res.rq1.rows
        sp = [(r.sparsity_mean_sd or {}).get("mean", r.sparsity) for r in rs]
        fl = [(r.floor or {}).get("fraction") for r in rs if r.floor]
        span = lambda xs: pct(min(xs), 1) if pct(min(xs), 1) == pct(max(xs), 1) else f"{pct(min(xs), 1)}–{pct(max(xs), 1)}"
        out.append(f"- **RQ1 sparsity**: {span(sp)} of parameters bit-identical across {len(rs)} algorithms"
                   + (f"; the precision floor alone accounts for {span(fl)}" if fl else ""))
    if res.rq2 is not None and res.rq2.verdicts:
        out += _rq2_summary(res)
    elif res.rq2 is not None and res.rq2.rows:
        out.append("- **RQ2**: endpoint comparisons only (results written before trajectories existed); see the section")
    if res.rq4 is not None and res.rq4.rows:
        ms = [r for r in res.rq4.rows if r.matched and r.matched.get("ratio") is not None]
        if ms:
            out.append(f"- **RQ4 overlap**: o1 {min(100 * (r.matched['ratio'] - 1) for r in ms):+.1f}% to {max(100 * (r.matched['ratio'] - 1) for r in ms):+.1f}% "
                       "against random masks matched per tensor × |w0| bin (the uniform baseline overstates it)")
    if res.rq5 is not None:
        p = res.rq5.precision or {}
        if p:
            out.append(f"- **RQ5 precision**: the same run stored in fp32 has sparsity {pct(p['fp32']['sparsity'], 2)} against "
                       f"{pct(p['bf16']['sparsity'], 1)} in bf16")
    return Section("Summary").add("\n".join(out))


def render_claims(res: StudyResults) -> Section | None:
    """The paper's claims this study measured, each decided by its stated rule (:mod:`rlsubnet.study.claims`)."""
    from ..study.claims import NOT_MEASURED, claims
    from .compare_report import describe

    cs = [c for c in claims(res.to_dict()) if c.verdict != NOT_MEASURED]
    if not cs:
        return None
    return Section("Claims, one by one").add(
        "Each claim of the paper that this study measured: *holds* when its interval lies on the claimed side (for recovery: "
        "above minus θ_full's own jitter), *fails* when it lies on the other, else *inconclusive* (every single-run "
        "measurement is). `rlsubnet study-compare` puts studies side by side on these rows.",
        Table(["claim", "verdict: effect [95% interval]", "rule"], [[c.statement, describe(c), c.rule] for c in cs]))


def sections(res: StudyResults, figdir: Path) -> list[Section]:
    """Every part of the study present in ``res``, rendered."""
    cl = render_claims(res)
    out = [headline(res), render_setup(res, figdir)] + ([cl] if cl else [])
    out += [fn(res, figdir) for key, fn in RENDERERS if getattr(res, key) is not None]
    sync = render_sync(res, figdir)
    return out + ([sync] if sync else [])


def _anchor(title: str) -> str:
    """GitHub-style anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title.lower()).strip())


STUDY_FIGURES = ("rq[0-9]_*.png", "delta_sync.png")  # the names a study report draws, and only those


def write_report(res: StudyResults | dict, out_dir: str | Path) -> list[Path]:
    """Write ``report.md`` and a self-contained ``report.html`` (PNG figures embedded) into ``out_dir``.

    ``res`` is the study's typed result (a ``results.json`` read back with :meth:`StudyResults.from_json`, or its
    dict, which is typed first: a field the report needs and the results lack fails there, in one sentence)."""
    if not isinstance(res, StudyResults):
        res = StudyResults.from_dict(res)
    out = Path(out_dir)
    return write_document(sections(res, out / "figures"), out, "report", "rlsubnet study report", owns=STUDY_FIGURES)


def write_document(secs: list[Section], out: Path, stem: str, title: str, owns: tuple[str, ...] = ()) -> list[Path]:
    """``OUT/STEM.md`` and a self-contained ``OUT/STEM.html`` (its figures embedded as PNG) from ``secs``, with a
    table of contents; both written atomically. A figure in ``OUT/figures`` whose name matches ``owns`` (a name this
    kind of document draws) but that this document does not show is an earlier report's, which this one replaced
    (a study split by ``--only`` into one ``--out``): it is removed, so the folder holds what the report shows and no
    figure of another run lies beside it. Files of any other name are left alone."""
    md = [f"# {title}", "", "Contents: " + " · ".join(f"[{s.title}](#{_anchor(s.title)})" for s in secs), ""]
    for s in secs:
        md += [f"## {s.title}", ""]
        for b in s.blocks:
            md += [b.to_md() if isinstance(b, Table) else b, ""]
        md += [f"![{f.stem}](figures/{f.name})" for f in s.figures] + [""]
    write_text(out / f"{stem}.md", "\n".join(md))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>",
             "body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em;line-height:1.45}"
             "table{border-collapse:collapse;margin:1em 0;display:block;overflow-x:auto}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
             "img{width:100%;height:auto;margin:.5em 0}nav ul{columns:2}",
             f"</style></head><body><h1>{html.escape(title)}</h1>",
             "<nav><b>Contents</b><ul>" + "".join(f"<li><a href='#{_anchor(s.title)}'>{html.escape(s.title)}</a></li>" for s in secs) + "</ul></nav>"]
    for s in secs:
        parts.append(f"<h2 id='{_anchor(s.title)}'>{html.escape(s.title)}</h2>")
        parts += [b.to_html() if isinstance(b, Table) else _para_html(b) for b in s.blocks]
        for f in s.figures:
            b64 = base64.b64encode(f.read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(f.stem)}' src='data:image/png;base64,{b64}'>")
    parts.append("</body></html>")
    write_text(out / f"{stem}.html", "\n".join(parts))
    shown = {f.resolve() for s in secs for f in s.figures}
    for pattern in owns:
        for f in (out / "figures").glob(pattern):
            if f.is_file() and f.resolve() not in shown:
                f.unlink()
    return [out / f"{stem}.md", out / f"{stem}.html"]
