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
    s = html.escape(s)
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


def claim(c: dict, subject: str, measure: str, names: dict | None = None) -> str:
    """One sentence from a comparison: the direction only when its interval excludes 0, else "inconclusive"."""
    a, b = ((names or {}).get(c[k], c[k]) for k in ("a", "b"))
    if c.get("lo") == c.get("hi") == c["diff"] == 0:
        return f"{subject}: no difference — {measure} is the same on every one of the {c['n']} items"
    if c["verdict"] == "inconclusive":
        return (f"{subject}: inconclusive — {measure} of {b} against {a} is {_ci(c)}, an interval that includes 0"
                if c.get("lo") is not None else f"{subject}: inconclusive — {measure} {_ci(c)} and no interval ({c['method']})")
    word = "higher" if c["verdict"] == "higher" else "lower"
    return f"{subject}: {measure} of {b} is {word} than {a} by {_ci(c)} (95% interval excludes 0)"


class _Paper:
    """The published values, as the study put them into ``results["paper"]``."""

    def __init__(self, d: dict):
        self.__dict__.update({k.upper(): v for k, v in d.items()})


# -- one renderer per part ------------------------------------------------------------------------------------
def render_setup(res: StudyResults, figdir: Path) -> Section:
    meta = res.meta
    b = meta["budget_settings"]
    lines = [f"- model: `{meta['model']}`",
             f"- budget: {meta['budget']}: {b['steps']} steps per run at one learning rate for every algorithm "
             f"({meta['lr']:g}, so Σlr = {b['steps'] * meta['lr']:.2g}), training precision {meta.get('precision', 'fp32')}"
             + (" (fp32 master weights, bf16 compute and sampling, checkpoints stored in the base dtype)" if meta.get("precision") == "mixed" else ""),
             f"- seed {meta['seed']} ({b.get('seeds', 1)} seed(s) where the report gives mean ± sd), task `{meta['task']}` level {meta['level']}, "
             f"second task `{meta['task2']}`; accuracy on {meta.get('n_eval', b['n_eval'])} held-out problems, none a reordering of a training problem",
             f"- {meta['runs']} runs, {meta['elapsed_s'] / 60:.1f} minutes in all"]
    if meta.get("quantized_note"):
        lines.append(f"- **Note on the weights.** {meta['quantized_note']}")
    return Section("Setup").add("\n".join(lines))


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
    if rq.ppo_note:
        sec.add("\\* " + rq.ppo_note)
    for f in rq.failed:
        sec.add(f"{f['run'].upper()} is missing from the table: {f['why']}")
    tols = [1e-8, 1e-7, 1e-6, 1e-5]
    t6 = [[r.algo.upper()] + [pct(_atol(r.atol, t)) for t in tols] for r in rows_in]
    t6 += [[f"paper: {k}"] + [f"{v:.2f}%" for v in vals] for k, vals in P.TABLE6.items()]
    sec.add("Table 6 analogue: sparsity at each absolute tolerance.", Table(["run"] + [f"{t:g}" for t in tols], t6),
            "Paper Table 2 (mean update rank): " + ", ".join(f"{k} {v}%" for k, v in P.TABLE2.items()) + ".")
    labels = [r.algo.upper() for r in rows_in]
    sd = lambda key: [(getattr(r, key) or {}).get("sd") or 0.0 for r in rows_in]
    sec.figures.append(bar_chart(figdir / "rq1_sparsity.png", labels, [], "Update sparsity by algorithm (± sd over seeds)", "algorithm", "sparsity",
                                 groups={"bits identical": [(r.sparsity_mean_sd or {}).get("mean", r.sparsity) for r in rows_in],
                                         "above the floor": [(r.above_floor_mean_sd or {}).get("mean") for r in rows_in]},
                                 errors={"bits identical": sd("sparsity_mean_sd"), "above the floor": sd("above_floor_mean_sd")}))
    xs = [max(a["atol"], 1e-12) for a in rows_in[0].atol]
    sec.figures.append(line_chart(figdir / "rq1_tolerance.png", xs, {r.algo.upper(): [a["sparsity"] for a in r.atol] for r in rows_in},
                                  "Sparsity vs absolute tolerance (0 at 1e-12)", "tolerance", "sparsity", logx=True))
    d = res.diffs
    for a in [r.run for r in rows_in][:3]:
        g = d.get(a, {}).get("grid")
        if g:
            layers = sorted(g, key=int)
            kinds = sorted({k for L in g.values() for k in L})
            sec.figures.append(heatmap(figdir / f"rq1_layers_{a}.png", [[g[L].get(k, float("nan")) for k in kinds] for L in layers], layers, kinds,
                                       f"{a.upper()}: sparsity per layer × module (Fig. 3 analogue)", "module", "layer"))
    ulp = d.get(rows_in[0].run, {}).get("ulp_hist")
    if ulp:
        ks = list(ulp)  # in the order the diff wrote them (1, 2, ... ULPs)
        sec.figures.append(bar_chart(figdir / "rq1_ulp.png", [str(k) for k in ks], [ulp[k] for k in ks],
                                     f"{rows_in[0].algo.upper()}: changed entries by ULP distance", "ULPs moved", "entries"))
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


VARIANT = {"init": "θ_init", "full": "θ_full", "sub": "θ_sub", "random_uniform": "random mask (uniform)",
           "random_magnitude": "random mask (|w0|-matched)"}


def render_rq2(res: StudyResults, figdir: Path) -> Section:
    P = _Paper(res.paper)
    rq = res.rq2
    sec = Section("RQ2/RQ3: does the subnetwork recover full finetuning?")
    acc_rows, close_rows, comp_rows, forest = [], [], [], []
    for r in rq.rows:
        tag = f"{r.algo.upper()} seed {r.seed}"
        for v, a in r.accuracy.items():
            acc_rows.append([tag, VARIANT.get(v, v), pct(a["accuracy"], 1), pct(a.get("format_rate"), 1), pct(a.get("strict_accuracy"), 1)])
        for v, c in r.closeness_to_full.items():
            close_rows.append([tag, VARIANT.get(v, v), pct(c["mask_density"], 2), pct(equal_at(c["inside_mask"], 0), 1), pct(equal_at(c["inside_mask"], 1e-5), 1),
                               pct(equal_at(c["inside_mask"], 1e-4), 1), pct(equal_at(c["all"], 1e-5), 2), f"{c['rel_l2']:.3f}"])
        for c in r.comparisons:
            comp_rows.append([tag, c["what"], f"{VARIANT.get(c['b'], c['b'])} − {VARIANT.get(c['a'], c['a'])}", _ci(c), c["verdict"]])
            if c["what"] == "accuracy":
                forest.append((f"{tag}: {VARIANT.get(c['b'], c['b'])} − {VARIANT.get(c['a'], c['a'])}", c))
    n = rq.rows[0].n_eval if rq.rows else 0
    sec.add(f"Each masked run restarts from θ_init with the full run's seed, data and hyperparameters; only the mask differs. "
            f"Controls: random masks of the same density, uniform over the model and matched per tensor × |w0| exponent bin. "
            f"Accuracy on {n} held-out problems (greedy); *format* = the completion is the number alone, as the prompt asks; "
            "*strict* = right answer in that format.",
            Table(["run", "model", "accuracy", "format", "strict"], acc_rows),
            "Table 3 analogue: closeness to θ_full. Outside a mask both models equal θ_init by construction, so closeness is "
            "shown inside the mask; *relative distance* = ‖θ − θ_full‖ / ‖θ_full − θ_init‖ over all parameters.",
            Table(["run", "model", "mask density", "inside: bits equal", "inside: |Δ| ≤ 1e-5", "inside: |Δ| ≤ 1e-4", "all: |Δ| ≤ 1e-5",
                   "relative distance"], close_rows),
            f"Paper: closeness at 1e-5 {P.TABLE3['closeness_1e-5']['dpo']}% (DPO) and {P.TABLE3['closeness_1e-5']['prime']}% (PRIME) "
            f"over all parameters, {P.TABLE3['closeness_1e-4']}% at 1e-4; accuracy θ_full→θ_sub DPO 40.3→41.9, PRIME 69.8→72.2.",
            "Paired comparisons (same test problems; 95% paired-bootstrap intervals, in accuracy points):",
            Table(["run", "measure", "difference", "value [95% interval]", "verdict"], comp_rows))
    if forest:
        sec.figures.append(interval_chart(figdir / "rq2_accuracy_intervals.png", [x[0] for x in forest], [x[1]["diff"] for x in forest],
                                          [x[1]["lo"] for x in forest], [x[1]["hi"] for x in forest],
                                          "Accuracy differences with 95% paired-bootstrap intervals", "accuracy difference"))
    for r in rq.rows:
        series = {VARIANT.get(v, v): [x for x in ys if x is not None] for v, ys in (r.reward or {}).items() if ys}
        if series:
            xs = {k: list(range(1, len(v) + 1)) for k, v in series.items()}
            sec.figures.append(line_chart(figdir / f"rq2_reward_{r.run}.png", list(range(1, max(len(v) for v in series.values()) + 1)),
                                          series, f"{r.algo.upper()} seed {r.seed}: training reward (Fig. 4 analogue)", "step",
                                          "mean reward", xs_by=xs))
    text = ["**What this shows.**"]
    for r in rq.rows:
        tag = f"{r.algo.upper()} seed {r.seed}"
        cs = {(c["a"], c["b"], c["what"]): c for c in r.comparisons}
        for key, subj in ((("init", "full", "accuracy"), f"{tag}, full finetuning against θ_init"),
                          (("full", "sub", "accuracy"), f"{tag}, θ_sub against θ_full"),
                          (("random_uniform", "sub", "accuracy"), f"{tag}, θ_sub against a uniform random mask of its density"),
                          (("random_magnitude", "sub", "accuracy"), f"{tag}, θ_sub against a |w0|-matched random mask")):
            if key in cs:
                text.append(claim(cs[key], subj, "accuracy", VARIANT) + ".")
        fmt = cs.get(("init", "full", "format"))
        if fmt:
            text.append(claim(fmt, f"{tag}, answer format", "the share of number-only answers", VARIANT) + ".")
        sub = r.closeness_to_full["sub"]
        rnd = [(k, v) for k, v in r.closeness_to_full.items() if k.startswith("random_")]
        text.append(f"Inside its mask θ_sub equals θ_full at |Δ| ≤ 1e-5 for {pct(equal_at(sub['inside_mask'], 1e-5), 1)} of entries and at 1e-4 for "
                    f"{pct(equal_at(sub['inside_mask'], 1e-4), 1)} (the paper reports 100% at 1e-4 over all parameters); relative distance "
                    f"{sub['rel_l2']:.3f}" + ("" if not rnd else " against " + ", ".join(f"{v['rel_l2']:.3f} for the {k[7:]} random mask" for k, v in rnd)) + ".")
    sec.add(" ".join(text))
    return sec


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
    for r in rows_in:
        m = r.matched
        if m and _mz(r) is not None:
            c = chance(_mz(r))
            verdict = f"{c} chance" if c in ("above", "below") else f"inconclusive (|z| ≤ {Z_CHANCE:g})"
            parts.append(f"{r.axis}: {m['ratio']:.2f}× the matched expectation, {verdict} ({r.ratio:.2f}× the uniform one)")
        else:
            parts.append(f"{r.axis}: {r.ratio:.2f}× the uniform expectation; no matched baseline, so inconclusive")
    sec.add("**What this shows.** Verdicts are taken against the magnitude-matched random masks: " + "; ".join(parts) + ".")
    return sec


def render_rq5(res: StudyResults, figdir: Path) -> Section:
    P = _Paper(res.paper)
    f = res.rq5
    sec = Section("RQ5: what makes updates sparse?")
    kl_paper = P.KL["with KL"] - P.KL["without KL"]
    af = lambda x, k: f" ({pct((x.get('above_floor') or {}).get(k), 1)} above the floor)" if (x.get("above_floor") or {}).get(k) is not None else ""
    rows = [["KL term (GRPO β)", f"without {pct(f['kl']['without'], 1)}{af(f['kl'], 'without')}", f"with {pct(f['kl']['with'], 1)}{af(f['kl'], 'with')}",
             f"paper: with {P.KL['with KL']}%, without {P.KL['without KL']}% ({kl_paper:+.1f} points)"],
            ["gradient clipping", f"with {pct(f['clip']['with'], 1)}{af(f['clip'], 'with')}", f"without {pct(f['clip']['without'], 1)}{af(f['clip'], 'without')}",
             "paper: comparable"],
            ["storage precision (one run)", f"bf16 {pct(f['precision']['bf16']['sparsity'], 2)}", f"fp32 copy {pct(f['precision']['fp32']['sparsity'], 2)}",
             "RL's Razor / 2511.08567: sparsity mostly vanishes in fp32"]]
    tp = f.get("training_precision")
    if tp:
        rows.append(["training precision", f"{tp['main']['precision']} {pct(tp['main']['sparsity'], 2)}", f"pure fp32 {pct(tp['fp32']['sparsity'], 2)}",
                     "the paper trained in bf16 mixed precision"])
    sec.add("Single runs (one seed each): a difference smaller than the seed spread of RQ1 is not evidence.",
            Table(["factor", "A", "B", "published"], rows))
    sec.add("Learning rate (same run at 1×, 4×, 16×):",
            Table(["lr", "bits identical", "below the floor", "sparsity above the floor", "bf16-relative"],
                  [[f"{x['scale']}×", pct(x["sparsity"], 2), pct((x.get("floor") or {}).get("fraction"), 2), pct(x.get("sparsity_above_floor"), 2),
                    pct(x["bf16_rel_sparsity"], 2)] for x in f["lr"]]))
    sec.add("Table 5 analogue (in- vs off-distribution data; the off-distribution sets have as many examples as the in-distribution ones):",
            Table(["method", "in-dist", "examples", "sparsity", "sparsity above the floor"],
                  [[x["method"], "✓" if x["in_distribution"] else "✗", x.get("examples", "—"), pct(x["sparsity"], 1), pct(x.get("sparsity_above_floor"), 1)]
                   for x in f["distribution"]]
                  + [[f"paper: {n} ({k})", "✓" if i else "✗", "—", f"{v}%", "—"] for n, v, k, i in P.TABLE5]))
    tols = [x["atol"] for x in f["precision"]["bf16"]["atol"]]
    sec.add("The same run stored in bf16 and in fp32 (its fp32 copy), across the tolerance sweep:",
            Table(["stored as"] + [f"|Δ| ≤ {t:g}" if t else "bits identical" for t in tols],
                  [[k] + [pct(_atol(f["precision"][k]["atol"], t), 2) for t in tols] for k in ("bf16", "fp32")]))
    if f["steps"]:
        s = f["steps"]
        sec.add("Sparsity over training (Fig. 5/6 analogue):",
                Table(["step", "vs θ_init", "vs previous checkpoint", "updated share outside final mask"],
                      [[x["step"], pct(x["sparsity"], 2), pct(x["consecutive_sparsity"], 2), pct(x["outside_final_share"], 2)] for x in s]))
        sec.figures.append(line_chart(figdir / "rq5_steps.png", [x["step"] for x in s],
                                      {"vs θ_init": [x["sparsity"] for x in s], "vs previous": [x["consecutive_sparsity"] for x in s]},
                                      "Sparsity over training steps", "step", "sparsity"))
    sec.figures.append(bar_chart(figdir / "rq5_lr.png", [f"{x['scale']}×" for x in f["lr"]], [x["sparsity"] for x in f["lr"]],
                                 "Sparsity vs learning-rate scale", "learning rate", "sparsity"))
    text = (f"**What this shows.** The fp32 copy of the same GRPO run has bitwise sparsity {pct(f['precision']['fp32']['sparsity'], 2)} "
            f"against {pct(f['precision']['bf16']['sparsity'], 1)} in bf16: under Adam nearly every entry with a non-zero gradient moves, "
            "so this is mechanical, not a finding about RL. "
            f"A 16× learning rate gives {pct(f['lr'][-1]['sparsity'], 1)} against {pct(f['lr'][0]['sparsity'], 1)} at 1× (the floor moves with Σlr). "
            f"The KL term moves sparsity by {100 * (f['kl']['with'] - f['kl']['without']):+.1f} points in one run (paper: {kl_paper:+.1f}); "
            "with one seed per setting this is inconclusive.")
    if f.get("ever_updated_outside_final") is not None:
        text += f" Of all entries updated at some saved step, {pct(f['ever_updated_outside_final'], 1)} end outside the final mask (paper: about 8.5%)."
    sec.add(text)
    return sec


def render_sync(res: StudyResults, figdir: Path) -> Section | None:
    sync = [(name, r) for name, r in res.runs.items() if r.get("delta_sync")]
    if not sync:
        return None
    rows, series, xs_by = [], {}, {}
    for name, r in sync:
        for x in r["delta_sync"]:
            full = r.get("checkpoint_bytes") or 0
            rows.append([name, x["step"], f"{x['changed_vs_prev']:,}", f"{x['delta_bytes']:,}", f"{x['delta_plain_bytes']:,}",
                         f"{x['delta_plain_bytes'] / x['delta_bytes']:.2f}x" if x["delta_bytes"] else "—",
                         f"{full / x['delta_bytes']:.0f}x" if x["delta_bytes"] and full else "—"])
        series[name] = [x["delta_bytes"] / 1e6 for x in r["delta_sync"]]
        series[f"{name} (int32 + raw)"] = [x["delta_plain_bytes"] / 1e6 for x in r["delta_sync"]]
        xs_by[name] = xs_by[f"{name} (int32 + raw)"] = [x["step"] for x in r["delta_sync"]]
    sec = Section("Delta weight sync: what a step sends")
    sec.add("Bytes a delta weight sync would send after each optimizer step (the stored bf16 view against the previous step), as an "
            "rlsubnet-patch/1 payload and in the plain encoding of int32 positions + raw values (what verl's `delta_sharded` sends), "
            "and the ratio of the full checkpoint to the payload. Measured on this run's steps only.",
            Table(["run", "step", "entries changed", "patch bytes", "int32 + raw bytes", "plain / patch", "checkpoint / patch"], rows))
    steps = sorted({x for v in xs_by.values() for x in v})
    sec.figures.append(line_chart(figdir / "delta_sync.png", steps, series, "Delta-sync payload per step", "step", "MB", xs_by=xs_by))
    return sec


RENDERERS = (("rq1", render_rq1), ("rq2", render_rq2), ("rq4", render_rq4), ("rq5", render_rq5))


def sections(res: StudyResults, figdir: Path) -> list[Section]:
    """Every part of the study present in ``res``, rendered."""
    out = [render_setup(res, figdir)]
    out += [fn(res, figdir) for key, fn in RENDERERS if getattr(res, key) is not None]
    sync = render_sync(res, figdir)
    return out + ([sync] if sync else [])


def write_report(res: StudyResults | dict, out_dir: str | Path) -> list[Path]:
    """Write ``report.md`` and a self-contained ``report.html`` (PNG figures embedded) into ``out_dir``.

    ``res`` is the study's typed result (a ``results.json`` read back with :meth:`StudyResults.from_json`, or its
    dict, which is typed first: a field the report needs and the results lack fails there, in one sentence)."""
    if not isinstance(res, StudyResults):
        res = StudyResults.from_dict(res)
    out = Path(out_dir)
    figdir = out / "figures"
    secs = sections(res, figdir)
    md = ["# rlsubnet study report", ""]
    for s in secs:
        md += [f"## {s.title}", ""]
        for b in s.blocks:
            md += [b.to_md() if isinstance(b, Table) else b, ""]
        md += [f"![{f.stem}](figures/{f.name})" for f in s.figures] + [""]
    write_text(out / "report.md", "\n".join(md))
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>rlsubnet study</title><style>",
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}img{max-width:100%;margin:.5em 0}",
             "</style></head><body><h1>rlsubnet study report</h1>"]
    for s in secs:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        parts += [b.to_html() if isinstance(b, Table) else _para_html(b) for b in s.blocks]
        for f in s.figures:
            b64 = base64.b64encode(f.read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(f.stem)}' src='data:image/png;base64,{b64}'>")
    parts.append("</body></html>")
    write_text(out / "report.html", "\n".join(parts))
    return [out / "report.md", out / "report.html"]
