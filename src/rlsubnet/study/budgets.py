"""The study's budgets: how many steps, seeds, problems and checkpoints each research question gets.

A budget is the whole operating point of a study, stated once; the report's Setup section prints it.
"""

from __future__ import annotations

from dataclasses import dataclass

RQS = ("rq1", "rq2", "rq4", "rq5")


@dataclass(frozen=True)
class Budget:
    steps: int
    batch: int  # GRPO/RLOO: completions per step (prompts × generations)
    gens: int
    pref_batch: int
    max_new_tokens: int
    n_train: int
    n_eval: int  # held-out test problems (no twin of a training problem)
    pref_prompts: int
    rqs: tuple
    rq1_algos: tuple
    save_every: int
    rank: bool = True
    lr: float = 1e-5  # one learning rate for every algorithm (matched lr, steps and batch across RQ1)
    seeds: int = 1  # seeds for SFT vs RL (RQ1) and θ_sub vs θ_full (RQ2)
    rq2_algos: tuple = ("grpo",)
    controls: tuple = ("uniform", "magnitude")  # random masks of the same density trained in RQ2
    level: int = 2  # task difficulty (2-digit + 1-digit addition has 450 test problems, none a twin of a training one)
    precision: str = "mixed"  # bf16 mixed precision (fp32 masters, bf16 compute), as the paper's frameworks
    lr_schedule: str = "constant"  # after warmup: constant | linear (decay to 0) | cosine
    warmup_ratio: float = 0.0  # the paper's DPO: linear, warmup ratio 0.1
    rq2_every: int = 0  # RQ2 trajectories: a checkpoint every K steps for θ_full, θ_sub and the controls (0: steps // 4)
    pref_k: int = 4  # samples per prompt when building the model's own preference pairs
    pairs_per_prompt: int = 1  # distinct (chosen, rejected) pairs kept per prompt
    min_pairs: int = 0  # the preference data's target size; fewer distinct pairs is said in the report
    union_control: bool = False  # RQ2: also train θ_sub on the union of every step's changes and on the final mask padded to its size (every seed)
    mask_order: str = "before-clip"  # masked runs: mask the gradient before clipping (the paper's g ← m ⊙ ∇L)

    @property
    def every(self) -> int:
        return self.rq2_every or max(1, self.steps // 4)


BUDGETS = {
    # what `make demo` runs (its measured time is in the README); floor-dominated (Σlr = 1e-4) and says so
    "quick": Budget(steps=10, batch=16, gens=8, pref_batch=8, max_new_tokens=16, n_train=128, n_eval=200, pref_prompts=48,
                    rqs=("rq1", "rq2"), rq1_algos=("grpo", "dpo"), save_every=0, lr=1e-5, seeds=1, rq2_algos=("grpo",),
                    rq2_every=5),
    # the paper's regime on this model: linear schedule with 10% warmup (the paper's DPO), peak 6.4e-5, so
    # Σlr ≈ 16 × 6.4e-5 ≈ 1.0e-3 puts the floor near 1% of parameters; DPO on ≥ 256 distinct pairs of the model's
    # own samples (32 steps × 8 = one pass, no pair repeated); 3 seeds for SFT, GRPO and DPO; RQ2 on DPO (the
    # paper's default ablation), 3 seeds, both controls, the union and padded controls, a checkpoint every 4 steps
    "standard": Budget(steps=32, batch=16, gens=8, pref_batch=8, max_new_tokens=16, n_train=256, n_eval=200, pref_prompts=450,
                       rqs=("rq1", "rq2", "rq4", "rq5"), rq1_algos=("sft", "grpo", "dpo", "kto", "rloo", "orpo", "simpo"), save_every=0,
                       lr=6.4e-5, seeds=3, rq2_algos=("dpo",), lr_schedule="linear", warmup_ratio=0.1, rq2_every=4,
                       pref_k=8, pairs_per_prompt=3, min_pairs=256, union_control=True),
    # standard + PPO + the ablations of RQ5
    "full": Budget(steps=32, batch=16, gens=8, pref_batch=8, max_new_tokens=16, n_train=256, n_eval=200, pref_prompts=450,
                   rqs=RQS, rq1_algos=("sft", "grpo", "dpo", "kto", "rloo", "ppo", "orpo", "simpo"), save_every=8,
                   lr=6.4e-5, seeds=3, rq2_algos=("dpo", "grpo"), lr_schedule="linear", warmup_ratio=0.1, rq2_every=4,
                   pref_k=8, pairs_per_prompt=3, min_pairs=256, union_control=True),
    # seconds, for the test suite's tiny random model
    "tiny": Budget(steps=2, batch=4, gens=2, pref_batch=4, max_new_tokens=6, n_train=16, n_eval=8, pref_prompts=8,
                   rqs=RQS, rq1_algos=("sft", "grpo", "dpo", "kto", "rloo", "ppo", "orpo", "simpo"), save_every=1, rank=True,
                   lr=1e-5, seeds=2, rq2_algos=("grpo",), level=1, precision="fp32", rq2_every=1, union_control=True),
}
SEEDED = ("sft", "grpo", "dpo")  # the algorithms RQ1 runs with every seed (SFT vs RL needs a spread)
