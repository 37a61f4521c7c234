"""Rendering a :class:`~rlsubnet.analysis.results.DiffResult`: terminal, CSV, Markdown and plots."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..analysis.results import DiffResult, Group
from ..io.atomic import write_text
from .fmt import num, pct, safe, tol


def expert_rows(result: DiffResult) -> list[dict]:
    """One row per layer and MoE part (router, router bias, shared experts, each routed expert)."""
    rows = []
    for L in (result.moe or {}).get("layers", []):
        parts = [("router", L["router"]), ("router_bias", L["router_bias"]), ("shared", L["shared"])]
        parts += [(f"expert {x['expert']}", x) for x in L["experts"]]
        for part, d in parts:
            if d:
                rows.append({"layer": L["layer"], "part": part, "numel": d["numel"], "changed": d["changed"],
                             "sparsity": 1 - d["changed"] / d["numel"] if d["numel"] else 1.0})
    return rows


def print_experts(result: DiffResult, con: Console, limit: int = 60) -> None:
    """Per MoE layer: router, its load-balancing bias, shared experts and how many routed experts RL touched."""
    m = result.moe
    t = Table(title="Mixture of experts: per layer (sparsity = 1 − changed/numel)")
    for c in ("layer", "router", "router bias", "shared experts", "routed experts touched", "routed sparsity"):
        t.add_column(c, justify="right")
    sp = lambda d: "-" if not d else pct(1 - d["changed"] / d["numel"] if d["numel"] else 1.0)
    for L in m["layers"][:limit]:
        n = sum(x["numel"] for x in L["experts"])
        c = sum(x["changed"] for x in L["experts"])
        t.add_row(str(L["layer"]), sp(L["router"]), sp(L["router_bias"]), sp(L["shared"]),
                  f"{L['experts_total'] - L['experts_untouched']} of {L['experts_total']}", pct(1 - c / n if n else 1.0))
    con.print(t)
    con.print(f"routed experts untouched by the run: {m['experts_untouched']} of {m['experts_total']}")


def _rows(result: DiffResult, by: str) -> list[dict]:
    """One row per tensor, layer or module kind, with sparsity at every criterion."""
    if by == "expert":
        return expert_rows(result)
    if by == "tensor":
        items = [(t.name, t.numel, t.changed, t.atol, t.bf16_rel_changed) for t in result.tensors]
    else:
        groups: list[Group] = result.by_layer if by == "layer" else result.by_module
        items = [(g.key, g.numel, g.changed, g.atol, g.bf16_rel_changed) for g in groups]
    rows = []
    for key, numel, changed, atol, rel in items:
        row = {by: key, "numel": numel, "changed": changed, "sparsity": 1 - changed / numel if numel else 1.0}
        for a in atol:
            row[f"sparsity@{a['atol']:g}"] = 1 - a["changed"] / numel if numel else 1.0
        row["bf16_rel_sparsity"] = 1 - rel / numel if numel else 1.0
        rows.append(row)
    return rows


def print_diff(result: DiffResult, by: str = "module", console: Console | None = None, limit: int = 60) -> None:
    """The readable summary: headline, tolerance sweep, grouped table, ULP histogram, skipped tensors."""
    con = console or Console()
    con.print(f"[bold]rlsubnet diff[/bold]  base={safe(result.base)}  tuned={safe(result.tuned)}")
    head = Table(title="Update sparsity (1 − changed/numel, pooled over all parameters)", show_lines=False)
    head.add_column("criterion")
    head.add_column("changed", justify="right")
    head.add_column("sparsity", justify="right")
    head.add_row("values identical" if result.quantized else "bits identical", num(result.changed), pct(result.sparsity))
    for a in result.atol:
        head.add_row(f"|Δ| ≤ {tol(a['atol'])}", num(a["changed"]), pct(a["sparsity"]))
    head.add_row(f"bf16-relative η={result.eta:g}", num(result.bf16_rel_changed), pct(result.bf16_rel_sparsity))
    con.print(head)
    con.print(f"parameters compared: {num(result.numel)} in {len(result.tensors)} tensors"
              + (f"; paper's layer-wise mean density: {pct(result.paper_layerwise_density)}" if result.paper_layerwise_density is not None else ""))
    if result.quantized is not None:
        q = result.quantized
        qt = Table(title="Quantized parameters: what moved, values, codes or scales")
        for c in ("parameter", "format", "values changed", "codes changed", "scales changed"):
            qt.add_column(c, justify="left" if c in ("parameter", "format") else "right")
        shown = [t for t in result.tensors if t.quantized is not None]
        for t in shown[:limit]:
            qi = t.quantized
            qt.add_row(safe(t.name), f"{qi['format']} {'x'.join(map(str, qi['block']))}", num(t.changed),
                       "-" if qi.get("codes_changed") is None else num(qi["codes_changed"]),
                       "-" if qi.get("scales_changed") is None else num(qi["scales_changed"]))
        con.print(qt)
        con.print(f"quantized: {q['tensors']} parameters; codes changed {num(q['codes_changed'])}, scales changed "
                  f"{num(q['scales_changed'])} (changed counts values: code × scale, exact)")
    if result.floor is not None:
        f = result.floor
        above = "-" if f.sparsity_above_floor is None else pct(f.sparsity_above_floor)
        con.print(f"precision floor at Σlr = {f.lr_sum:g}: {num(f.frozen)} entries ({pct(f.fraction)}) could not move "
                  f"(every value within Σlr rounds back to them); sparsity above the floor {above} "
                  f"({num(f.changed_above_floor)} changed of {num(result.numel - f.frozen)}); "
                  f"{num(f.changed_below_floor)} changed below it")
        e = Table(title="Changed fraction by |w0| exponent (|w0| in [2^e, 2^(e+1)))")
        for c in ("dtype", "e", "entries", "changed", "changed fraction"):
            e.add_column(c, justify="right")
        for x in result.by_exponent or []:
            e.add_row(x["dtype"], "zero/subnormal" if x["exponent"] is None else str(x["exponent"]), num(x["numel"]),
                      num(x["changed"]), pct(x["changed_fraction"]))
        con.print(e)
    if by == "expert":
        print_experts(result, con, limit)
    else:
        _print_rows(con, _rows(result, by), by, limit)
    _print_tail(result, con)


def _print_rows(con: Console, rows: list[dict], by: str, limit: int) -> None:
    t = Table(title=f"By {by}")
    cols = [by, "numel", "sparsity"] + [k for k in rows[0] if k.startswith("sparsity@")] + ["bf16_rel_sparsity"]
    for c in cols:
        t.add_column(c.replace("sparsity@", "|Δ|≤").replace("bf16_rel_sparsity", "bf16-rel"), justify="left" if c == by else "right")
    for r in rows[:limit]:
        t.add_row(*[safe(r[c]) if c == by else num(r[c]) if c == "numel" else pct(r[c]) for c in cols])
    if len(rows) > limit:
        t.caption = f"{len(rows) - limit} more rows in --csv/--json"
    con.print(t)


def _print_tail(result: DiffResult, con: Console) -> None:
    h = Table(title="|Δ| in ULPs of the base value (storage dtype)")
    h.add_column("ULPs")
    h.add_column("elements", justify="right")
    h.add_column("share of changed", justify="right")
    ch = max(result.changed, 1)
    for lab, c in result.ulp_hist.items():
        if lab != "0" and c:
            h.add_row(lab, num(c), pct(c / ch))
    con.print(h)
    for s in result.skipped:
        con.print(f"[yellow]skipped[/yellow] {safe(s['name'])}: {safe(s['reason'])}")
    for b in result.buffers:
        con.print(f"[dim]buffer (not a parameter, not counted)[/dim] {safe(b.name)}: {num(b.changed)} of {num(b.numel)} changed")
    for n in result.notes:
        con.print(f"[cyan]note[/cyan] {safe(n)}")
    con.print(f"[dim]{result.elapsed_s:.2f} s[/dim]")


def write_json_to(text: str, dest: str) -> None:
    """Write JSON text to a path atomically, or to stdout for ``-``."""
    if dest == "-":
        import sys

        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    else:
        write_text(dest, text + "\n")


def diff_csv(result: DiffResult, by: str = "tensor") -> str:
    rows = _rows(result, by)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def diff_markdown(result: DiffResult, by: str = "module") -> str:
    lines = ["# rlsubnet diff", "", f"- base: `{result.base}`", f"- tuned: `{result.tuned}`",
             f"- parameters compared: {num(result.numel)} in {len(result.tensors)} tensors", "",
             "| criterion | changed | sparsity |", "|---|---:|---:|",
             f"| {'values' if result.quantized else 'bits'} identical | {num(result.changed)} | {pct(result.sparsity)} |"]
    for a in result.atol:
        lines.append(f"| \\|Δ\\| ≤ {tol(a['atol'])} | {num(a['changed'])} | {pct(a['sparsity'])} |")
    lines.append(f"| bf16-relative η={result.eta:g} | {num(result.bf16_rel_changed)} | {pct(result.bf16_rel_sparsity)} |")
    rows = _rows(result, by)
    cols = list(rows[0])
    lines += ["", f"## By {by}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(pct(r[c]) if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    if result.quantized is not None:
        q = result.quantized
        lines += ["", "## Quantized parameters: what moved, values, codes or scales", "",
                  f"{q['tensors']} quantized parameters; `changed` counts dequantized values (code × scale, exact; +0 = −0), "
                  f"codes are counted one per weight and scales one per stored scale: codes changed {num(q['codes_changed'])}, "
                  f"scales changed {num(q['scales_changed'])}.", "",
                  "| parameter | format | block | values changed | codes changed | scales changed |", "|---|---|---|---:|---:|---:|"]
        for t in (t for t in result.tensors if t.quantized is not None):
            qi = t.quantized
            codes, scales = ("-" if qi.get(k) is None else num(qi[k]) for k in ("codes_changed", "scales_changed"))
            lines.append(f"| `{t.name}` | {qi['format']} | {'×'.join(map(str, qi['block']))} | {num(t.changed)} | {codes} | {scales} |")
    if result.skipped:
        lines += ["", "## Skipped", ""] + [f"- `{s['name']}`: {s['reason']}" for s in result.skipped]
    return "\n".join(lines) + "\n"


def diff_plots(result: DiffResult, out_dir: str | os.PathLike) -> list[Path]:
    """Heatmap of sparsity per layer × module kind, the tolerance sweep, and the ULP histogram."""
    from .plots import bar_chart, heatmap, line_chart

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    layers = sorted({t.layer for t in result.tensors if t.layer is not None})
    kinds = [k for k in ("q", "k", "v", "qkv", "o", "gate", "up", "down", "norm", "other") if any(t.kind == k and t.layer is not None for t in result.tensors)]
    if layers and kinds:
        grid = []
        for L in layers:
            row = []
            for k in kinds:
                ts = [t for t in result.tensors if t.layer == L and t.kind == k]
                n = sum(t.numel for t in ts)
                row.append(1 - sum(t.changed for t in ts) / n if n else float("nan"))
            grid.append(row)
        written.append(heatmap(out / "sparsity_heatmap.png", grid, [str(L) for L in layers], kinds,
                               "Update sparsity (bits identical) per layer × module", "module kind", "layer"))
    if result.moe:
        layers_m = result.moe["layers"]
        n_exp = max(L["experts_total"] for L in layers_m)
        grid = [[next((1 - x["changed"] / x["numel"] for x in L["experts"] if x["expert"] == e and x["numel"]), float("nan"))
                 for e in range(n_exp)] for L in layers_m]
        written.append(heatmap(out / "expert_heatmap.png", grid, [str(L["layer"]) for L in layers_m], [str(e) for e in range(n_exp)],
                               "Update sparsity per routed expert × layer", "expert", "layer"))
    if result.quantized is not None:
        qs = [t for t in result.tensors if t.quantized is not None][:40]
        written.append(bar_chart(out / "quantized_changes.png", [t.name.rsplit(".", 2)[-2] if t.name.count(".") >= 2 else t.name for t in qs], [],
                                 "Quantized parameters: values, codes and scales changed", "parameter", "entries changed",
                                 groups={"values": [t.changed for t in qs],
                                         "codes": [t.quantized.get("codes_changed") for t in qs],
                                         "scales": [t.quantized.get("scales_changed") for t in qs]}))
    xs = [a["atol"] for a in result.atol]
    written.append(line_chart(out / "tolerance_sweep.png", [max(x, 1e-12) for x in xs],
                              {"|Δ| ≤ tol": [a["sparsity"] for a in result.atol]},
                              "Sparsity vs absolute tolerance (0 plotted at 1e-12)", "tolerance", "sparsity", logx=True,
                              hlines={"bf16-relative": result.bf16_rel_sparsity}))
    labs = [k for k in result.ulp_hist if k != "0"]
    written.append(bar_chart(out / "ulp_histogram.png", labs, [result.ulp_hist[k] for k in labs],
                             "Changed elements by |Δ| in ULPs of the base value", "ULPs", "elements"))
    return written
