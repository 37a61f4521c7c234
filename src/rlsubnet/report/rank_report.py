"""Rendering rank results."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .fmt import pct, safe


def print_rank(r, console: Console | None = None, limit: int = 40) -> None:
    con = console or Console()
    t = Table(title=f"Rank of update matrices ΔW ({r.precision}, {r.device}); paper's mean rank ratio: {pct(r.mean_rank_ratio, 1)}")
    for c in ("matrix", "shape", "rank", "rank/min(m,n)", "stable rank", "effective rank"):
        t.add_column(c, justify="left" if c == "matrix" else "right")
    for m in r.matrices[:limit]:
        t.add_row(safe(m.name), "×".join(map(str, m.shape)), str(m.rank), pct(m.rank_ratio, 1), f"{m.stable_rank:.2f}", f"{m.effective_rank:.1f}")
    if len(r.matrices) > limit:
        t.caption = f"{len(r.matrices) - limit} more matrices in --json"
    con.print(t)
    con.print("mean rank ratio by module kind: " + ", ".join(f"{k} {pct(v, 1)}" for k, v in r.by_kind.items()))


def rank_plot(r, out_dir) -> Path:
    from .plots import line_chart

    out = Path(out_dir)
    kinds = sorted({m.kind for m in r.matrices if m.layer is not None})
    layers = sorted({m.layer for m in r.matrices if m.layer is not None})
    series, xs_by = {}, {}
    for k in kinds:
        pts = [(m.layer, m.rank_ratio) for m in r.matrices if m.kind == k and m.layer is not None]
        xs_by[k] = [p[0] for p in pts]
        series[k] = [p[1] for p in pts]
    return line_chart(out / "rank_per_layer.png", layers, series, "Update rank / max rank per layer", "layer",
                      "rank ratio", xs_by=xs_by)
