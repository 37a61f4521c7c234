"""The built-in default job: a small Llama-style pair (base, and a copy finetuned a few steps) and its diff."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console


def make_pair(out: Path, steps: int = 20, lr: float = 1e-4, seed: int = 0) -> tuple[str, str]:
    """Write ``out/base`` and ``out/tuned``: bf16 checkpoints, tuned by AdamW in fp32 on a copy task."""
    import torch

    from ..training.tiny import build_tiny_llama, save_model

    base = build_tiny_llama(seed=seed, dtype="bfloat16", hidden=128, layers=4, heads=4, inter=256, vocab=512)
    save_model(base, out / "base")
    model = base.float()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x = torch.randint(3, 512, (8, 16), generator=g)
        ids = torch.cat([x, x], dim=1)  # learn to repeat the first half
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    save_model(model.to(torch.bfloat16), out / "tuned")
    return str(out / "base"), str(out / "tuned")


def run_demo(out: str = "demo-out") -> None:
    from ..analysis import diff
    from ..masks import Subnetwork
    from ..report.diff_report import diff_markdown, diff_plots, print_diff
    from ..io.atomic import write_text

    con = Console()
    o = Path(out)
    con.print(f"[bold]building a small Llama-style pair in {o}[/bold] (20 AdamW steps, lr 1e-4, stored in bf16)")
    b, t = make_pair(o)
    res = diff(b, t, progress=True, rank=True, mask_criterion="bitwise")
    print_diff(res, console=con)
    from ..report.rank_report import print_rank, rank_plot

    print_rank(res.rank, console=con)
    write_text(o / "diff.json", res.to_json() + "\n")
    write_text(o / "diff.md", diff_markdown(res))
    for p in diff_plots(res, o / "plots") + [rank_plot(res.rank, o / "plots")]:
        con.print(f"wrote {p}")
    Subnetwork.from_diff(res, criterion="bitwise").save(o / "mask.safetensors")
    con.print(f"wrote {o / 'diff.json'}, {o / 'diff.md'}, {o / 'mask.safetensors'}")
