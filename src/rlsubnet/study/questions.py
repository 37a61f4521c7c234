"""RQ1, RQ4 and RQ5 of the study, one function each, returning typed rows (RQ2 has its own module, ``rq2.py``).

Each function takes the :class:`~rlsubnet.study.pipeline.Study` for its building blocks (train, analyze,
mask, accuracy, the preference data: all cached) and returns what ``StudyResults`` holds for its question.
"""

from __future__ import annotations

from pathlib import Path

from ..io.errors import InputError
from ..masks import Subnetwork
from ..masks.overlap import pair_overlap
from ..training import tasks as T
from .budgets import SEEDED
from .results import RQ1, RQ4, RQ5, DistributionRow, LrRow, OverlapRow, RQ1Row, StepRow
from .stats import mean_sd, seed_difference


def run_rq1(study) -> RQ1:
    """Sparsity of every algorithm at one matched learning rate, steps and batch (Table 1), every seed of the
    seeded algorithms, and SFT against each seeded RL algorithm (a difference only where its interval excludes 0)."""
    b = study.b
    rows = []
    pref = study.own_preferences()
    failed = []
    for algo in b.rq1_algos:
        # with --only-seeds, the seeded algorithms run those seeds; the others (one seed) belong to seed 0's record
        seeds = study.seed_ks if algo in SEEDED else (0,) if 0 in study.seed_ks else ()
        per_seed = []
        for k in seeds:
            cfg = study.main_config(algo, k)
            name = study.run_name(algo, k)
            try:
                path = study.train(name, cfg)
            except InputError as e:  # e.g. a run that diverged at the matched learning rate: say so, keep going
                if "diverged" not in str(e):
                    raise
                study.con.print(f"[yellow]run {name} diverged; it is reported as such[/yellow]")
                failed.append({"algo": algo, "run": name, "why": str(e)})
                continue
            a = study.analyze(name, path, rank=b.rank and not k)
            indist = algo not in ("sft", "ppo") and (cfg.preference is None or cfg.preference is pref)
            per_seed.append({"run": name, "seed": cfg.seed, "sparsity": a.sparsity, "atol": a.atol,
                             "bf16_rel_sparsity": a.bf16_rel_sparsity, "rank_mean": a.rank_mean, "by_module": a.by_module,
                             "stable_rank_mean": a.stable_rank_mean, "effective_rank_mean": a.effective_rank_mean,
                             "in_distribution": indist, "lr_sum": a.lr_sum, "floor": a.floor,
                             "sparsity_above_floor": a.sparsity_above_floor})
        if per_seed:
            rows.append(rq1_row(algo, per_seed))
    return RQ1(rows=rows, comparisons=rq1_comparisons(rows), lr=study.lr, steps=b.steps, failed=failed,
               ppo_note=None)  # the report explains PPO; the study records numbers


def rq1_row(algo: str, per_seed: list[dict]) -> RQ1Row:
    """An algorithm's row from its seeds' figures (in seed order): the first seed's figures, every seed's, the spread."""
    per_seed = sorted(per_seed, key=lambda x: x["seed"])
    return RQ1Row(**per_seed[0], algo=algo, seeds=per_seed, sparsity_mean_sd=mean_sd([x["sparsity"] for x in per_seed]),
                  above_floor_mean_sd=mean_sd([x["sparsity_above_floor"] for x in per_seed]), in_rl_average=algo not in ("sft", "ppo"))


def rq1_comparisons(rows: list[RQ1Row]) -> list[dict]:
    """SFT against each seeded RL algorithm over seeds (Welch; a difference only where its interval excludes 0)."""
    comps = []
    by = {r.algo: r for r in rows}
    if "sft" in by:
        for algo in ("grpo", "dpo"):
            if algo in by:
                for what, key in (("sparsity", "sparsity"), ("sparsity above the floor", "sparsity_above_floor")):
                    comps.append(seed_difference([x[key] for x in by["sft"].seeds], [x[key] for x in by[algo].seeds],
                                                 what, ("sft", algo)).to_dict())
    return comps


def overlap_row(study, a: str, b: str, axis: str, paper_row: str | None) -> OverlapRow:
    """Overlap of two runs' masks against a uniform random pair and a pair matched per tensor × |w0| exponent."""
    from ..masks.overlap import stratified_baseline

    A, B = Subnetwork.load(study.mask(a)), Subnetwork.load(study.mask(b))
    p = pair_overlap(A, B)
    m = stratified_baseline(A, B, "magnitude", study.model)
    return OverlapRow(axis=axis, paper_row=paper_row, a=a, b=b, o1=p.o1, o2=p.o2, o1_random=p.o1_random, o2_random=p.o2_random,
                      jaccard=p.jaccard, jaccard_random=p.jaccard_random, ratio=p.ratio, z=p.z,
                      s1=1 - p.count_a / p.numel, s2=1 - p.count_b / p.numel, matched=m)


def run_rq4(study) -> RQ4:
    """Overlap of the updated sets: one factor at a time (seed; data; algorithm), and the paper's row 3, where
    seed, data and algorithm all differ (GRPO on the main task against DPO with another seed on the second task)."""
    s, rank = study, study.b.rank
    s.analyze("grpo", s.train("grpo", s.main_config("grpo")), rank=rank)
    s.analyze("grpo_s1", s.train("grpo_s1", s.main_config("grpo", 1)))
    s.analyze("grpo_task2", s.train("grpo_task2", s.config("grpo", task=s.task2, track_every=0)))
    s.analyze("dpo", s.train("dpo", s.main_config("dpo")), rank=rank)
    other = s.config("dpo", seed=s.seed + 1, task=s.task2, preference=s.offdist_preferences(s.task2))
    s.analyze("dpo_s1_task2", s.train("dpo_s1_task2", other))
    return RQ4(rows=[overlap_row(s, "grpo", "grpo_s1", "seed", "seed"),
                     overlap_row(s, "grpo", "grpo_task2", "data", "data"),
                     overlap_row(s, "grpo", "dpo", "algorithm", None),
                     overlap_row(s, "grpo", "dpo_s1_task2", "seed+data+algorithm", "algorithm")])


def _ablations(study, main: str) -> dict:
    """KL, clipping, learning rate and precision: the main GRPO run against one change at a time."""
    s = study
    base = s.analyze("grpo", main, rank=s.b.rank)
    variants = {"grpo_kl": {"beta": 0.04}, "grpo_noclip": {"max_grad_norm": None}, "grpo_lr4": {"lr": s.lr * 4},
                "grpo_lr16": {"lr": s.lr * 16}, "grpo_fp32train": {"precision": "fp32"}}
    d = {name: s.analyze(name, s.train(name, s.config("grpo", **kw))) for name, kw in variants.items()}
    d["grpo"] = base
    out = {
        "kl": {"without": base.sparsity, "with": d["grpo_kl"].sparsity,
               "above_floor": {"without": base.sparsity_above_floor, "with": d["grpo_kl"].sparsity_above_floor}},
        "clip": {"with": base.sparsity, "without": d["grpo_noclip"].sparsity,
                 "above_floor": {"with": base.sparsity_above_floor, "without": d["grpo_noclip"].sparsity_above_floor}},
        "lr": [LrRow(scale=k, sparsity=d[n].sparsity, bf16_rel_sparsity=d[n].bf16_rel_sparsity, floor=d[n].floor,
                     sparsity_above_floor=d[n].sparsity_above_floor) for k, n in ((1, "grpo"), (4, "grpo_lr4"), (16, "grpo_lr16"))],
    }
    fp32 = s.analyze("grpo_fp32", str(Path(main) / "fp32"))
    out["precision"] = {"bf16": {"sparsity": base.sparsity, "atol": base.atol}, "fp32": {"sparsity": fp32.sparsity, "atol": fp32.atol}}
    # training precision: the main run's (mixed by default) against the same run trained in pure fp32
    out["training_precision"] = {"main": {"precision": s.precision, "sparsity": base.sparsity, "floor": base.floor},
                                 "fp32": {"precision": "fp32", "sparsity": d["grpo_fp32train"].sparsity, "floor": d["grpo_fp32train"].floor}}
    return out


def _distribution(study) -> tuple[list[DistributionRow], list[dict]]:
    """In- vs off-distribution data of matched size, for SFT and DPO, every seed of the budget: the off-distribution
    sets take as many examples as the in-distribution ones have (the model's own correct samples; its own preference
    pairs). The in-distribution DPO runs are the main DPO runs (RQ2's θ_full where RQ2 runs). Returns the rows (first
    seed's figures, every seed's, mean ± sd) and, per method, in − off with Welch's interval over seeds."""
    s = study
    pref = s.own_preferences()
    own = pref["correct_samples"]
    ref = T.generate(s.task, max(len(own["prompt"]), 2), level=s.level, split="train")
    off = s.offdist_preferences()
    k = max(len(pref["prompt"]), 4)
    sizes = {"sft_in": len(own["prompt"]), "sft_off": len(ref), "dpo": len(pref["prompt"]), "dpo_off": min(k, len(off["prompt"]))}
    specs = (("sft_in", "SFT on own correct samples (RFT)", True), ("sft_off", "SFT on reference solutions", False),
             ("dpo", "DPO on own samples", len(pref["prompt"]) >= 4), ("dpo_off", "DPO on reference vs corrupted", False))
    per: dict[str, list] = {name: [] for name, _, _ in specs}
    first: dict = {}
    for j in s.seed_ks:
        seed = s.seed + j
        sfx = f"_s{j}" if j else ""
        paths = {
            "sft_in": s.train("sft_in" + sfx, s.config("sft", sft_data=own, seed=seed)) if len(own["prompt"]) >= 2 else None,
            "sft_off": s.train("sft_off" + sfx, s.config("sft", seed=seed, sft_data={"prompt": [p.prompt for p in ref],
                                                                                     "completion": [p.solution for p in ref]})),
            "dpo": s.train(s.run_name("dpo", j), s.main_config("dpo", j)),
            "dpo_off": s.train("dpo_off" + sfx, s.config("dpo", seed=seed, preference={x: v[:k] for x, v in off.items()})),
        }
        for name, path in paths.items():
            if path:
                run = s.run_name("dpo", j) if name == "dpo" else name + sfx
                a = s.analyze(run, path)
                first.setdefault(name, a)
                per[name].append({"seed": seed, "run": run, "sparsity": a.sparsity, "sparsity_above_floor": a.sparsity_above_floor})
    rows = [DistributionRow(name=name, method=method, in_distribution=indist, examples=sizes[name], sparsity=first[name].sparsity,
                            floor=first[name].floor, sparsity_above_floor=first[name].sparsity_above_floor, seeds=per[name],
                            sparsity_mean_sd=mean_sd([x["sparsity"] for x in per[name]]))
            for name, method, indist in specs if name in first]
    return rows, distribution_comparisons(rows)


def distribution_comparisons(rows: list[DistributionRow]) -> list[dict]:
    """In- against off-distribution data per method, over seeds (Welch; ``b`` in-distribution, ``a`` off)."""
    by = {r.name: r for r in rows}
    comps = []
    for method, a, b in (("SFT", "sft_off", "sft_in"), ("DPO", "dpo_off", "dpo")):
        if a in by and b in by and by[a].seeds and by[b].seeds and by[b].in_distribution:
            for what, key in (("sparsity", "sparsity"), ("sparsity above the floor", "sparsity_above_floor")):
                c = seed_difference([x[key] for x in by[a].seeds], [x[key] for x in by[b].seeds], what, (a, b)).to_dict()
                comps.append({**c, "algo": method.lower()})
    return comps


def _steps(study, main: str) -> tuple[list[StepRow], float | None]:
    """Sparsity over the main GRPO run's intermediate checkpoints (Figs. 5-6), and the share of entries ever
    updated that end outside the final mask."""
    s = study
    steps = sorted(int(Path(x).name.split("-")[1]) for x in s.results["runs"]["grpo"].saved)
    prev, traj, union = s.model, [], None
    final = Subnetwork.load(s.mask("grpo"))
    for k in steps:
        ck = str(Path(main) / f"step-{k}")
        v_init = s.analyze(f"grpo_step{k}", ck)
        v_prev = s.analyze(f"grpo_step{k}_consecutive", ck, base=prev)
        m = Subnetwork.load(s.mask(f"grpo_step{k}"))
        union = m if union is None else union | m
        traj.append(StepRow(step=k, sparsity=v_init.sparsity, consecutive_sparsity=v_prev.sparsity,
                            outside_final_share=(m - final).count() / max(m.count(), 1)))
        prev = ck
    return traj, ((union - final).count() / max(union.count(), 1)) if union is not None else None


def run_rq5(study) -> RQ5:
    """What makes updates sparse: KL, clipping, learning rate, precision, data distribution, training steps."""
    study.own_preferences()
    res: dict = {}
    if 0 in study.seed_ks:  # the single-run ablations and the steps belong to seed 0 (``--only-seeds`` without it: data only)
        main = study.train("grpo", study.main_config("grpo"))
        res = _ablations(study, main)
        res["steps"], res["ever_updated_outside_final"] = _steps(study, main)
    res["distribution"], res["distribution_comparisons"] = _distribution(study)
    return RQ5(**res)
