"""PNG plots with matplotlib (Agg backend, no display), each written atomically."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from ..io.optional import need

need("matplotlib", what="--plot")
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..io.atomic import write_with  # noqa: E402


def _save(fig, path: Path) -> Path:
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def heatmap(path, grid, rows: Sequence[str], cols: Sequence[str], title: str, xlabel: str, ylabel: str,
            vmin: float | None = None, vmax: float | None = None, fmt: str = "{:.1%}") -> Path:
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(cols), 1.2 + 0.32 * len(rows)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(rows) * len(cols) <= 200:
        for i, r in enumerate(grid):
            for j, v in enumerate(r):
                if not (isinstance(v, float) and math.isnan(v)):
                    ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax)
    return _save(fig, Path(path))


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
STYLES = ("-", "--", "-.", ":")


def line_chart(path, xs, series: dict[str, Sequence[float]], title: str, xlabel: str, ylabel: str,
               logx: bool = False, hlines: dict[str, float] | None = None, xs_by: dict | None = None,
               integer_x: bool = False, vlines: dict[str, float] | None = None) -> Path:
    """Lines with a marker and a dash pattern of their own (series that overlap stay distinguishable);
    ``integer_x`` for step axes; ``vlines`` marks stated points (an operating point)."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (name, ys) in enumerate(series.items()):
        ax.plot((xs_by or {}).get(name, xs), ys, marker=MARKERS[i % len(MARKERS)], ls=STYLES[i % len(STYLES)],
                markersize=5 if i else 6, alpha=0.9, label=name)
    for name, y in (hlines or {}).items():
        ax.axhline(y, ls="--", color="gray", label=name)
    for name, x in (vlines or {}).items():
        ax.axvline(x, ls=":", color="k", lw=0.9, label=name)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the data
    return _save(fig, Path(path))


def _data_range(ax, values: Sequence[float], errors: Sequence[float] | None = None) -> bool:
    """Keep the axis where the differences are (a 0-1 axis hides 93% against 96%); True when it does not start at 0."""
    vs = [(v, e or 0.0) for v, e in zip(values, errors or [0.0] * len(values)) if v is not None and math.isfinite(v)]
    if not vs:
        return False
    lo, hi = min(v - e for v, e in vs), max(v + e for v, e in vs)
    pad = max((hi - lo) * 0.25, abs(hi) * 0.005, 1e-6)
    if lo - pad > 0:
        ax.set_ylim(lo - pad, hi + pad)
        return True
    return False


def bar_chart(path, labels: Sequence[str], values: Sequence[float], title: str, xlabel: str, ylabel: str,
              groups: dict[str, Sequence[float]] | None = None, errors: dict[str, Sequence[float]] | None = None) -> Path:
    """Bars (grouped with ``groups``; ``errors``: ± bars per group, e.g. the seed sd); the value axis spans the data."""
    fig, ax = plt.subplots(figsize=(max(5, 0.55 * len(labels)), 3.6))
    if groups:
        n = len(groups)
        w = 0.8 / n
        allv, alle = [], []
        for i, (g, vals) in enumerate(groups.items()):
            err = (errors or {}).get(g)
            ax.bar([x + i * w - 0.4 + w / 2 for x in range(len(labels))], [v if v is not None else float("nan") for v in vals],
                   width=w, label=g, yerr=[e or 0.0 for e in err] if err else None, capsize=3)
            allv += list(vals)
            alle += list(err) if err else [0.0] * len(vals)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the data
        cut = _data_range(ax, allv, alle)
    else:
        ax.bar(range(len(labels)), values)
        cut = _data_range(ax, list(values))
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel + (" (axis not from 0)" if cut else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, Path(path))


def interval_chart(path, labels: Sequence[str], diffs: Sequence[float], los: Sequence[float | None], his: Sequence[float | None],
                   title: str, xlabel: str) -> Path:
    """Differences with their confidence intervals, one row each, against a line at 0 (a forest plot)."""
    fig, ax = plt.subplots(figsize=(6.5, 0.9 + 0.45 * len(labels)))
    ys = list(range(len(labels)))[::-1]
    for y, d, lo, hi in zip(ys, diffs, los, his):
        if lo is not None and hi is not None:
            ax.plot([lo, hi], [y, y], color="C0", lw=2)
        ax.plot([d], [y], "o", color="C0" if lo is not None and (lo > 0 or hi < 0) else "gray")
    ax.axvline(0, color="k", lw=0.8, ls="--")
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, Path(path))


def grouped_interval_chart(path, labels: Sequence[str], series: dict[str, Sequence[tuple]], title: str, xlabel: str) -> Path:
    """A forest plot with one row per label and, within it, one marker and interval per series (a study):
    ``series[name][i] = (value, lo, hi)``, None where absent; a filled marker where the interval excludes 0."""
    n = max(len(series), 1)
    fig, ax = plt.subplots(figsize=(7, 1.0 + 0.28 * n * len(labels)))
    ys = list(range(len(labels)))[::-1]
    h = 0.7 / n
    for k, (name, vals) in enumerate(series.items()):
        col, mk = f"C{k % 10}", MARKERS[k % len(MARKERS)]
        first = True
        for y, v in zip(ys, vals):
            if not v or v[0] is None:
                continue
            d, lo, hi = v
            yy = y + 0.35 - h / 2 - k * h
            if lo is not None and hi is not None:
                ax.plot([lo, hi], [yy, yy], color=col, lw=2)
            sig = lo is not None and hi is not None and (lo > 0 or hi < 0)
            ax.plot([d], [yy], mk, color=col, mfc=col if sig else "white", label=name if first else None)
            first = False
    ax.axvline(0, color="k", lw=0.8, ls="--")
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the data
    return _save(fig, Path(path))
