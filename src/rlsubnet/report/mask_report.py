"""Rendering overlap, closeness and frozen-check results."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..masks.overlap import chance
from .fmt import num, pct, safe, tol


def verdict(p) -> str:
    """A plain sentence: is the overlap above chance, and by how much (against the matched baseline if any)."""
    b = p.baseline
    ratio, z = (b["ratio"], b["z"]) if b else (p.ratio, p.z)
    what = f"a random mask matched per {b['kind']}" if b and b["kind"] != "uniform" else "a uniformly random mask"
    c = chance(z)
    if ratio is None or ratio != ratio or c is None:
        return "undefined (a mask is empty, so there is no random expectation to compare with)"
    if c != "consistent":
        return f"{c} chance: {ratio:.2f}x the expectation of {what} (z = {z:.1f})"
    return f"consistent with chance against {what} (ratio {ratio:.2f}, z = {z:.1f})"


def print_overlap(r, console: Console | None = None) -> None:
    con = console or Console()
    for i, m in enumerate(r.masks):
        con.print(f"mask {i}: {safe(m['path'])}  density {pct(m['density'])}")
    t = Table(title="Subnetwork overlap (o1 = |A∩B|/|A|, o2 = |A∩B|/|B|) against random")
    for c in ("a", "b", "o1", "o1 random", "o2", "o2 random", "Jaccard", "Jaccard random", "ratio", "z"):
        t.add_column(c, justify="right")
    for p in r.pairs:
        t.add_row(str(p.a), str(p.b), pct(p.o1, 1), pct(p.o1_random, 1), pct(p.o2, 1), pct(p.o2_random, 1),
                  f"{p.jaccard:.3f}", f"{p.jaccard_random:.3f}", f"{p.ratio:.2f}", f"{p.z:.1f}")
    con.print(t)
    for p in r.pairs:
        if p.baseline and p.baseline["kind"] != "uniform":
            b = p.baseline
            con.print(f"masks {p.a} and {p.b}: uniform baseline o1 {pct(p.o1_random, 1)} (ratio {p.ratio:.2f}); matched per "
                      f"{b['kind']} ({b['strata']:,} strata) o1 {pct(b['o1_random'], 1)}, o2 {pct(b['o2_random'], 1)}")
        con.print(f"masks {p.a} and {p.b}: overlap is {verdict(p)}")
        k = Table(title=f"masks {p.a}–{p.b} by module kind")
        for c in ("kind", "o1", "o1 random", "o2", "o2 random", "Jaccard", "Jaccard random"):
            k.add_column(c, justify="right")
        for row in p.per_kind:
            k.add_row(row["kind"], pct(row["o1"], 1), pct(row["o1_random"], 1), pct(row["o2"], 1),
                      pct(row["o2_random"], 1), f"{row['jaccard']:.3f}", f"{row['jaccard_random']:.3f}")
        con.print(k)
    if r.consensus:
        c = r.consensus
        g = c["global"]
        con.print(f"consensus over {c['runs']} masks: {num(g['updated_by_any'])} parameters updated by any, "
                  f"{num(g['updated_by_all'])} by all; mean consensus of updated {pct(g['mean_consensus_of_updated'], 1)}")
        con.print("histogram (k masks → parameters): " + ", ".join(f"{k}: {num(v)}" for k, v in enumerate(g["hist"])))


def print_closeness(r, console: Console | None = None) -> None:
    con = console or Console()
    t = Table(title="Closeness of A and B (from the same init): fraction of parameters equal")
    t.add_column("tolerance")
    t.add_column("all", justify="right")
    if r.inside_mask is not None:
        t.add_column("inside mask", justify="right")
        t.add_column("outside mask", justify="right")
    for i, a in enumerate(r.atol):
        row = [f"|A−B| ≤ {tol(a['atol'])}", pct(a["equal_fraction"])]
        if r.inside_mask is not None:
            row += [pct(r.inside_mask[i]["equal_fraction"]), pct(r.outside_mask[i]["equal_fraction"])]
        t.add_row(*row)
    con.print(t)
    con.print(f"relative L2 ||A−B|| / ||A−INIT|| = {r.rel_l2:.4g} over {num(r.numel)} parameters")


def print_frozen(r, console: Console | None = None) -> None:
    con = console or Console()
    if r.ok:
        status = "[green]OK[/green]"
    elif r.frozen_moved:
        status = "[red]FROZEN ENTRIES MOVED[/red]"
    else:
        status = "[red]NOT VERIFIED[/red]"
    con.print(f"{status}: {num(r.frozen_moved)} of {num(r.frozen)} frozen entries moved; "
              f"{num(r.trainable_changed)} of {num(r.trainable)} trainable entries changed.")
    for t in r.tensors:
        if t["frozen_moved"]:
            con.print(f"  {safe(t['name'])}: {num(t['frozen_moved'])} frozen entries moved")
    for u in r.unchecked:
        con.print(f"  [yellow]not checked[/yellow] {safe(u['name'])}: {safe(u['reason'])}")
    if r.buffers:
        con.print(f"  [dim]{len(r.buffers)} stored non-parameter buffers were not checked (e.g. {safe(r.buffers[0])})[/dim]")
