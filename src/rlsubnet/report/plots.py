"""PNG plots with matplotlib (Agg backend, no display), each written atomically."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ..io.atomic import write_with


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


def line_chart(path, xs, series: dict[str, Sequence[float]], title: str, xlabel: str, ylabel: str,
               logx: bool = False, hlines: dict[str, float] | None = None, xs_by: dict | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, ys in series.items():
        ax.plot((xs_by or {}).get(name, xs), ys, marker="o", label=name)
    for name, y in (hlines or {}).items():
        ax.axhline(y, ls="--", color="gray", label=name)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the data
    return _save(fig, Path(path))


def bar_chart(path, labels: Sequence[str], values: Sequence[float], title: str, xlabel: str, ylabel: str,
              groups: dict[str, Sequence[float]] | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(max(5, 0.55 * len(labels)), 3.6))
    if groups:
        n = len(groups)
        w = 0.8 / n
        for i, (g, vals) in enumerate(groups.items()):
            ax.bar([x + i * w - 0.4 + w / 2 for x in range(len(labels))], vals, width=w, label=g)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the data
    else:
        ax.bar(range(len(labels)), values)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, Path(path))
