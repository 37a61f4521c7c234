"""Studies side by side, claim by claim (``rlsubnet study-compare``): does the paper's answer depend on the model?

Each study's claims come from :func:`rlsubnet.study.claims.claims` on its ``results.json``; rows are the claims'
fixed keys, columns the studies. Written: ``compare.md``, a self-contained ``compare.html``, ``compare.json``
(strict JSON) and ``figures/compare-*.png`` (forest plots of the claims that carry an interval).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..io.atomic import write_text
from ..io.errors import InputError
from ..io.jsonout import dumps
from ..study.claims import NOT_MEASURED, VERDICTS, Claim, claims, load_study, span
from .study_report import Section, Table, write_document


def describe(c: Claim) -> str:
    """The cell a claims table shows for ``c``: its verdict and the number it rests on."""
    if c.verdict == NOT_MEASURED:
        return NOT_MEASURED
    return f"{c.verdict}: {span(c.value, c.lo, c.hi, c.unit)}"


def label_of(results: dict) -> str:
    """A study's column name: its model's folder name, budget and seed count."""
    meta = results.get("meta") or {}
    b = meta.get("budget_settings") or {}
    return f"{Path(str(meta.get('model', '?'))).name} · {meta.get('budget', '?')} · {b.get('seeds', 1)} seed(s)"


def _unique(labels: list[str]) -> list[str]:
    seen: Counter = Counter()
    out = []
    for x in labels:
        seen[x] += 1
        out.append(x if seen[x] == 1 else f"{x} ({seen[x]})")
    return out


def comparison(studies: list[tuple[str, dict]]) -> dict:
    """The side-by-side table as data: ``studies`` (label, model, budget, seeds, steps, lr), ``claims`` (key, rq,
    statement, rule, ``per_study`` {label: claim}, ``agreement`` same|differs|partial) and per-study verdict counts."""
    labels = _unique([lab for lab, _ in studies])
    per = {lab: {c.key: c for c in claims(res)} for lab, (_, res) in zip(labels, studies)}
    keys = list(per[labels[0]]) if labels else []
    rows = []
    for k in keys:
        cs = [per[lab][k] for lab in labels]
        measured = [c.verdict for c in cs if c.verdict != NOT_MEASURED]
        agree = "partial" if len(measured) < len(cs) else "same" if len(set(measured)) == 1 else "differs"
        rows.append({"key": k, "rq": cs[0].rq, "statement": cs[0].statement, "rule": cs[0].rule, "agreement": agree,
                     "per_study": {lab: c.to_dict() for lab, c in zip(labels, cs)}})
    info = []
    for lab, (_, res) in zip(labels, studies):
        meta = res.get("meta") or {}
        b = meta.get("budget_settings") or {}
        info.append({"label": lab, "model": meta.get("model"), "budget": meta.get("budget"), "seeds": b.get("seeds"),
                     "steps": b.get("steps"), "lr": meta.get("lr"), "rqs": meta.get("rqs"),
                     "counts": {v: sum(per[lab][k].verdict == v for k in keys) for v in VERDICTS}})
    return {"studies": info, "claims": rows}


def _claims_table(rows: list[dict], labels: list[str]) -> Table:
    return Table(["claim"] + labels + (["agreement"] if len(labels) > 1 else []),
                 [[r["statement"]] + [describe(Claim(**r["per_study"][lab])) for lab in labels] + ([r["agreement"]] if len(labels) > 1 else [])
                  for r in rows])


def _figures(cmp: dict, figdir: Path) -> list[Path]:
    from .plots import grouped_interval_chart

    labels = [s["label"] for s in cmp["studies"]]
    out = []
    for rq, title in (("rq2", "RQ2: accuracy differences (points), 95% intervals"), ("rq4", "RQ4: overlap above the matched expectation (%)"),
                      ("rq1", "RQ1: sparsity differences (points), 95% intervals"),
                      ("rq5", "RQ5: sparsity differences (points), 95% intervals")):
        unit = "relative" if rq == "rq4" else "points"
        rows = [r for r in cmp["claims"] if r["rq"] == rq and any(r["per_study"][lab]["unit"] == unit and r["per_study"][lab]["value"] is not None
                                                                     for lab in labels)]
        if not rows:
            continue

        def pts(c, unit=unit):
            f = lambda x: None if x is None else 100 * x
            return (f(c["value"]), f(c["lo"]), f(c["hi"])) if c["unit"] == unit and c["value"] is not None else None

        series = {lab: [pts(r["per_study"][lab]) for r in rows] for lab in labels}
        out.append(grouped_interval_chart(figdir / f"compare-{rq}.png", [r["key"].split(".", 1)[1] for r in rows], series, title,
                                          ("% of the expected intersection" if unit == "relative" else "points")
                                          + " (filled: the interval excludes 0)"))
    return out


def render(cmp: dict, figdir: Path | None = None) -> list[Section]:
    labels = [s["label"] for s in cmp["studies"]]
    summary = []
    for s in cmp["studies"]:
        c = s["counts"]
        summary.append(f"- **{s['label']}** ({Path(str(s['model'])).name}; {s['steps']} steps, peak lr {s['lr']:g}, RQs {', '.join(s['rqs'] or [])}): "
                       f"{c['holds']} hold, {c['fails']} fail, {c['inconclusive']} inconclusive, {c['not measured']} not measured")
    differ = [r for r in cmp["claims"] if r["agreement"] == "differs"]
    if len(labels) > 1:
        summary.append(f"- The verdicts differ on {len(differ)} of {len(cmp['claims'])} claims"
                       + (": " + "; ".join(r["key"] for r in differ) if differ else "")
                       + "; a claim measured in only some studies is *partial*.")
    secs = [Section("Summary").add("\n".join(summary),
                                   "A claim *holds* when its interval excludes 0 in the claimed direction (or, for recovery, lies "
                                   "above minus θ_full's jitter), *fails* when it excludes 0 the other way, and is *inconclusive* "
                                   "otherwise, including every single-run measurement; each cell shows the verdict, the effect "
                                   "(points: differences of percentages; %: a level; % of the expected: RQ4's overlap above its matched "
                                   "expectation) and its 95% interval.")]
    for rq, title in (("rq1", "RQ1: sparsity"), ("rq2", "RQ2: the subnetwork alone"), ("rq4", "RQ4: overlap"), ("rq5", "RQ5: what makes it sparse")):
        rows = [r for r in cmp["claims"] if r["rq"] == rq]
        ev = []
        for r in rows:
            e = "; ".join(f"*{lab}*: {r['per_study'][lab]['evidence']}" for lab in labels if r["per_study"][lab]["evidence"])
            ev.append(f"- `{r['key']}` — {r['rule']}" + (f". {e}" if e else ""))
        secs.append(Section(title).add(_claims_table(rows, labels), "\n".join(ev)))
    if figdir is not None:
        figs = _figures(cmp, figdir)
        if figs:
            secs.append(Section("Figures", figures=figs).add("Each row is a claim, each marker a study; the dashed line is 0."))
    return secs


def write_comparison(paths: list[str | Path], out_dir: str | Path, labels: list[str] | None = None) -> list[Path]:
    """Read each study (folder or results.json), decide its claims and write the side-by-side comparison."""
    if not paths:
        raise InputError("study-compare: name at least one study folder or results.json.")
    if labels and len(labels) != len(paths):
        raise InputError(f"--label: {len(labels)} labels for {len(paths)} studies.")
    loaded = [load_study(p) for p in paths]  # every input checked before anything is drawn
    studies = [((labels[i] if labels else label_of(res)), res) for i, (_, res) in enumerate(loaded)]
    cmp = comparison(studies)
    for s, (f, _) in zip(cmp["studies"], loaded):
        s["results"] = f
    out = Path(out_dir)
    written = write_document(render(cmp, out / "figures"), out, "compare", "rlsubnet: studies side by side, claim by claim",
                             owns=("compare-*.png",))
    write_text(out / "compare.json", dumps(cmp, indent=2) + "\n")
    return written + [out / "compare.json"]
