"""The study's report: Markdown tables, PNG figures and one self-contained HTML file, all generated from
the ``results.json`` dictionary, with the paper's published values side by side."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from ..io.atomic import write_text
from .fmt import pct
from .plots import bar_chart, heatmap, line_chart


def _t(rows: list[list], head: list[str]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _atol(a: list[dict], tol: float):
    return next((x["sparsity"] for x in a if x["atol"] == tol), None)


class _Paper:
    """The published values, as the study put them into ``results["paper"]``."""

    def __init__(self, d: dict):
        self.__dict__.update({k.upper(): v for k, v in d.items()})


def sections(res: dict, figdir: Path) -> list[tuple[str, str, list[Path]]]:
    """(title, markdown body, figures) for every part of the study present in ``res``."""
    meta = res["meta"]
    P = _Paper(res["paper"])
    out = []
    intro = [f"- model: `{meta['model']}`", f"- budget: {meta['budget']} ({meta['budget_settings']['steps']} steps per run), "
             f"seed {meta['seed']}, task `{meta['task']}` level {meta['level']}, second task `{meta['task2']}`",
             f"- {meta['runs']} runs, {meta['elapsed_s'] / 60:.1f} minutes in all"]
    if meta.get("quantized_note"):
        intro.append(f"- **Note on the weights.** {meta['quantized_note']}")
    out.append(("Setup", "\n".join(intro), []))
    d = res["diffs"]
    if "rq1" in res:
        rows, figs = [], []
        for r in res["rq1"]["rows"]:
            paper = "; ".join(f"{n}: {v}" for n, v in P.TABLE1.get(r["algo"], [])) or "—"
            dd = r
            fl = r.get("floor") or {}
            rows.append([r["algo"].upper(), pct(r["sparsity"]),
                         f"{pct(fl.get('fraction'))} (Σlr {dd['lr_sum']:.2g})" if fl else "—",
                         pct(dd.get("sparsity_above_floor")) if fl else "—",
                         pct(_atol(r["atol"], 1e-5)), pct(r["bf16_rel_sparsity"]),
                         pct(r["rank_mean"], 1) if r.get("rank_mean") is not None else "—",
                         "✓" if r["in_distribution"] else "✗", paper])
        body = "Table 1/2 analogue: update sparsity of each algorithm from the same init.\n\n" + _t(
            rows, ["algorithm", "bits identical", "below the floor", "sparsity above the floor", "\\|Δ\\| ≤ 1e-5", "bf16-relative",
                   "mean rank (Table 2)", "in-dist", "paper Table 1 (\\|Δ\\| ≤ 1e-5)"])
        body += ("\n\n*Below the floor*: share of entries that no update of the run's size (Σ of its logged learning rates) "
                 "could move in bf16 (every value within Σlr rounds back to the stored one); the sparsity above the floor "
                 "counts only the entries that could have changed.")
        tols = [1e-8, 1e-7, 1e-6, 1e-5]
        t6 = [[r["algo"].upper()] + [pct(_atol(r["atol"], t)) for t in tols] for r in res["rq1"]["rows"]]
        t6 += [[f"paper: {k}"] + [f"{v:.2f}%" for v in vals] for k, vals in P.TABLE6.items()]
        body += "\n\nTable 6 analogue: sparsity at each absolute tolerance.\n\n" + _t(t6, ["run"] + [f"{t:g}" for t in tols])
        body += "\n\nPaper Table 2 (mean update rank): " + ", ".join(f"{k} {v}%" for k, v in P.TABLE2.items()) + "."
        algos = [r["algo"] for r in res["rq1"]["rows"]]
        figs.append(bar_chart(figdir / "rq1_sparsity.png", [a.upper() for a in algos], [], "Update sparsity by algorithm", "algorithm", "sparsity",
                              groups={"bits identical": [r["sparsity"] for r in res["rq1"]["rows"]],
                                      "|Δ| ≤ 1e-5": [_atol(r["atol"], 1e-5) for r in res["rq1"]["rows"]],
                                      "bf16-relative": [r["bf16_rel_sparsity"] for r in res["rq1"]["rows"]]}))
        xs = [max(a["atol"], 1e-12) for a in res["rq1"]["rows"][0]["atol"]]
        figs.append(line_chart(figdir / "rq1_tolerance.png", xs, {r["algo"].upper(): [a["sparsity"] for a in r["atol"]] for r in res["rq1"]["rows"]},
                               "Sparsity vs absolute tolerance (0 at 1e-12)", "tolerance", "sparsity", logx=True))
        for a in algos[:3]:
            g = d[a]["grid"]
            if g:
                layers = sorted(g, key=int)
                kinds = sorted({k for L in g.values() for k in L})
                figs.append(heatmap(figdir / f"rq1_layers_{a}.png", [[g[L].get(k, float("nan")) for k in kinds] for L in layers], layers, kinds,
                                    f"{a.upper()}: sparsity per layer × module (Fig. 3 analogue)", "module", "layer"))
        best = max(res["rq1"]["rows"], key=lambda r: r["sparsity"])
        worst = min(res["rq1"]["rows"], key=lambda r: r["sparsity"])
        rl = [r for r in res["rq1"]["rows"] if r["algo"] != "sft"]
        sft = next((r for r in res["rq1"]["rows"] if r["algo"] == "sft"), None)
        text = (f"**What this shows.** Bitwise update sparsity ranges from {pct(worst['sparsity'], 1)} ({worst['algo'].upper()}) to "
                f"{pct(best['sparsity'], 1)} ({best['algo'].upper()}); the paper reports 68.5–96.0% for RL on 7–70B models. ")
        if sft and rl:
            mean_rl = sum(r["sparsity"] for r in rl) / len(rl)
            text += (f"SFT on reference text leaves {pct(sft['sparsity'], 1)} unchanged against a mean of {pct(mean_rl, 1)} for the RL runs "
                     f"({'RL sparser, as the paper finds' if mean_rl > sft['sparsity'] else 'not sparser here, unlike the paper'}). ")
        ranks = [r["rank_mean"] for r in res["rq1"]["rows"] if r.get("rank_mean") is not None]
        if ranks:
            text += f"Updates are {'nearly full-rank' if min(ranks) > 0.9 else 'not full-rank'}: mean rank ratio {pct(min(ranks), 1)}–{pct(max(ranks), 1)} (paper 99.2–99.8%)."
        out.append(("RQ1: how sparse are the updates?", body + "\n\n" + text, figs))
    if "rq2" in res:
        rows, figs = [], []
        for r in res["rq2"]["rows"]:
            c5, c4 = _eq(r["closeness"], 1e-5), _eq(r["closeness"], 1e-4)
            rows.append([r["algo"].upper(), pct(r["acc_init"], 1), pct(r["acc_full"], 1), pct(r["acc_sub"], 1),
                         pct(_eq(r["closeness"], 0)), pct(c5), pct(c4), pct(r["mask_density"])])
            figs.append(line_chart(figdir / f"rq2_loss_{r['algo']}.png", list(range(1, len(r["loss_full"]) + 1)),
                                   {"θ_full": r["loss_full"], "θ_sub": r["loss_sub"]}, f"{r['algo'].upper()} training loss (Fig. 4 analogue)",
                                   "step", "loss", xs_by={"θ_sub": list(range(1, len(r["loss_sub"]) + 1))}))
        body = "Table 3 analogue: the subnetwork run restarted from θ_init (same seed, data, hyperparameters; only the mask trained).\n\n" + _t(
            rows, ["algorithm", "acc θ_init", "acc θ_full", "acc θ_sub", "equal bits", "equal \\|Δ\\|≤1e-5", "equal \\|Δ\\|≤1e-4", "mask density"])
        body += ("\n\nPaper: closeness at 1e-5 94.0% (DPO) and 90.5% (PRIME), 100% at 1e-4; accuracy θ_full→θ_sub "
                 "DPO 40.3→41.9, PRIME 69.8→72.2.")
        r0 = res["rq2"]["rows"][0]
        text = (f"**What this shows.** Training only the {pct(r0['mask_density'], 1)} of parameters that full {r0['algo'].upper()} changed "
                f"gives test accuracy {pct(r0['acc_sub'], 1)} against {pct(r0['acc_full'], 1)} for full finetuning (init {pct(r0['acc_init'], 1)}), "
                f"and {pct(_eq(r0['closeness'], 1e-5), 2)} of all parameters are equal to θ_full at |Δ| ≤ 1e-5 "
                f"({pct(_eq(r0['closeness'], 0), 2)} bit-identical). Accuracy is measured on {res['accuracy']['init']['n']} test problems "
                f"(standard error about ±{100 * (0.25 / max(res['accuracy']['init']['n'], 1)) ** 0.5:.0f} points).")
        out.append(("RQ2/RQ3: does the subnetwork recover full finetuning?", body + "\n\n" + text, figs))
    if "rq4" in res:
        rows = []
        for r in res["rq4"]["rows"]:
            p = P.TABLE4[r["axis"]]
            rows.append([r["axis"], f"{r['a']} vs {r['b']}", f"{pct(r['o1'], 1)} / {pct(r['o2'], 1)}",
                         f"{pct(r['o1_random'], 1)} / {pct(r['o2_random'], 1)}", f"{r['jaccard']:.3f} / {r['jaccard_random']:.3f}",
                         f"{r['ratio']:.2f}", f"{r['z']:.0f}",
                         f"{pct(r['matched']['o1_random'], 1)}; {r['matched']['ratio']:.2f}x, z {r['matched']['z']:.0f}" if r.get("matched") else "—",
                         f"{pct(r['s1'], 1)} / {pct(r['s2'], 1)}",
                         f"{p['rl'][0]} / {p['rl'][1]} vs random {p['random'][0]} / {p['random'][1]}"])
        body = "Table 4 analogue: overlap of the updated sets against random sets of the same sizes.\n\n" + _t(
            rows, ["axis", "runs", "o1 / o2", "uniform random o1 / o2", "Jaccard / random", "ratio", "z",
                   "magnitude-matched random o1; ratio, z", "sparsity s1 / s2", "paper o1 / o2"])
        fig = bar_chart(figdir / "rq4_overlap.png", [r["axis"] for r in res["rq4"]["rows"]], [], "Overlap against chance", "axis", "o1",
                        groups={"o1": [r["o1"] for r in res["rq4"]["rows"]], "random": [r["o1_random"] for r in res["rq4"]["rows"]]})
        def _mz(r):
            return r["matched"]["z"] if r.get("matched") and r["matched"]["z"] is not None else r["z"]

        above = [r["axis"] for r in res["rq4"]["rows"] if _mz(r) > 3]
        text = ("**What this shows.** Against random masks matched per tensor × |w0| exponent (weights of similar size "
                f"move alike in bf16), overlap is above chance (z > 3) for: {', '.join(above) or 'none'}; "
                + "; ".join(f"{r['axis']} {r['matched']['ratio']:.2f}× the matched expectation ({r['ratio']:.2f}× the uniform one)"
                            if r.get("matched") else f"{r['axis']} {r['ratio']:.2f}× the uniform expectation"
                            for r in res["rq4"]["rows"]) + ".")
        out.append(("RQ4: do subnetworks from different runs overlap?", body + "\n\n" + text, [fig]))
    if "rq5" in res:
        f = res["rq5"]
        figs = []
        rows = [["KL term (GRPO β)", f"without {pct(f['kl']['without'], 1)}", f"with {pct(f['kl']['with'], 1)}", f"paper: {P.KL['without KL']} / {P.KL['with KL']}"],
                ["gradient clipping", f"with {pct(f['clip']['with'], 1)}", f"without {pct(f['clip']['without'], 1)}", "paper: comparable"],
                ["storage precision", f"bf16 {pct(f['precision']['bf16']['sparsity'], 2)}", f"fp32 {pct(f['precision']['fp32']['sparsity'], 2)}",
                 "RL's Razor / 2511.08567: sparsity mostly vanishes in fp32"]]
        body = _t(rows, ["factor", "A", "B", "published"])
        body += "\n\nLearning rate (same run at 1×, 4×, 16×):\n\n" + _t(
            [[f"{x['scale']}×", pct(x["sparsity"], 2), pct(x["bf16_rel_sparsity"], 2)] for x in f["lr"]], ["lr", "bits identical", "bf16-relative"])
        body += "\n\nTable 5 analogue (in- vs off-distribution data):\n\n" + _t(
            [[x["method"], "✓" if x["in_distribution"] else "✗", pct(x["sparsity"], 1)] for x in f["distribution"]]
            + [[f"paper: {n} ({k})", "✓" if i else "✗", f"{v}%"] for n, v, k, i in P.TABLE5], ["method", "in-dist", "sparsity"])
        if f["steps"]:
            s = f["steps"]
            body += "\n\nSparsity over training (Fig. 5/6 analogue):\n\n" + _t(
                [[x["step"], pct(x["sparsity"], 2), pct(x["consecutive_sparsity"], 2), pct(x["outside_final_share"], 2)] for x in s],
                ["step", "vs θ_init", "vs previous checkpoint", "updated share outside final mask"])
            figs.append(line_chart(figdir / "rq5_steps.png", [x["step"] for x in s],
                                   {"vs θ_init": [x["sparsity"] for x in s], "vs previous": [x["consecutive_sparsity"] for x in s]},
                                   "Sparsity over training steps", "step", "sparsity"))
        figs.append(bar_chart(figdir / "rq5_lr.png", [f"{x['scale']}×" for x in f["lr"]], [x["sparsity"] for x in f["lr"]],
                              "Sparsity vs learning-rate scale", "learning rate", "sparsity"))
        text = (f"**What this shows.** Storing the same GRPO run in fp32 instead of bf16 changes bitwise sparsity from "
                f"{pct(f['precision']['bf16']['sparsity'], 1)} to {pct(f['precision']['fp32']['sparsity'], 1)}; a 16× learning rate gives "
                f"{pct(f['lr'][-1]['sparsity'], 1)} against {pct(f['lr'][0]['sparsity'], 1)} at 1×. The KL term moves sparsity by "
                f"{100 * (f['kl']['with'] - f['kl']['without']):+.1f} points (paper: -1.0).")
        if f.get("ever_updated_outside_final") is not None:
            text += f" Of all entries updated at some saved step, {pct(f['ever_updated_outside_final'], 1)} end outside the final mask (paper: about 8.5%)."
        out.append(("RQ5: what makes updates sparse?", body + "\n\n" + text, figs))
    sync = [(name, r) for name, r in res.get("runs", {}).items() if r.get("delta_sync")]
    if sync:
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
        body = ("Bytes a delta weight sync would send after each optimizer step (the stored bf16 view against the previous "
                "step), as an rlsubnet-patch/1 payload and in the plain encoding of int32 positions + raw values (what "
                "verl's `delta_sharded` sends), and the ratio of the full checkpoint to the payload. Measured on this "
                "run's steps only.\n\n" + _t(rows, ["run", "step", "entries changed", "patch bytes", "int32 + raw bytes",
                                                        "plain / patch", "checkpoint / patch"]))
        steps = sorted({x for v in xs_by.values() for x in v})
        fig = line_chart(figdir / "delta_sync.png", steps, series, "Delta-sync payload per step", "step", "MB", xs_by=xs_by)
        out.append(("Delta weight sync: what a step sends", body, [fig]))
    return out


def _eq(rows: list[dict], tol: float):
    return next((x["equal_fraction"] for x in rows if x["atol"] == tol), None)


def write_report(res: dict, out_dir: str | Path) -> list[Path]:
    """Write ``report.md`` and a self-contained ``report.html`` (PNG figures embedded) into ``out_dir``."""
    out = Path(out_dir)
    figdir = out / "figures"
    secs = sections(res, figdir)
    md = ["# rlsubnet study report", ""]
    for title, body, figs in secs:
        md += [f"## {title}", "", body, ""] + [f"![{f.stem}](figures/{f.name})" for f in figs] + [""]
    write_text(out / "report.md", "\n".join(md))
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>rlsubnet study</title><style>",
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}img{max-width:100%;margin:.5em 0}",
             "</style></head><body><h1>rlsubnet study report</h1>"]
    for title, body, figs in secs:
        parts.append(f"<h2>{html.escape(title)}</h2>" + _md_to_html(body))
        for f in figs:
            b64 = base64.b64encode(f.read_bytes()).decode()
            parts.append(f"<img alt='{f.stem}' src='data:image/png;base64,{b64}'>")
    parts.append("</body></html>")
    write_text(out / "report.html", "\n".join(parts))
    return [out / "report.md", out / "report.html"]


def _md_to_html(md: str) -> str:
    """The small Markdown subset the report uses: paragraphs, bullet lists, pipe tables, **bold**, `code`."""
    import re

    def inline(s: str) -> str:
        s = html.escape(s.replace("\\|", "|"))
        s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", s)

    out, lines, i = [], md.split("\n"), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not re.match(r"^\|(-+\|)+$", lines[i].replace(":", "")):
                    rows.append([c.strip() for c in lines[i].strip("|").split(" | ")])
                i += 1
            out.append("<table>" + "".join(("<tr>" + "".join(f"<{'th' if k == 0 else 'td'}>{inline(c)}</{'th' if k == 0 else 'td'}>" for c in r) + "</tr>")
                                             for k, r in enumerate(rows)) + "</table>")
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        if line.strip():
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    return "\n".join(out)
