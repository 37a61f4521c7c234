"""What a training run depends on, its defaults, and the one validation every entry point runs first.

Nothing here imports torch or transformers: ``rlsubnet train`` refuses a bad option in a fraction of a
second, before anything heavy is loaded. Errors name the Python argument (``lr``); the command line maps
them to its flags (:data:`CLI_FLAGS`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass

from ..io.errors import InputError
from . import tasks as T

ALGOS = ("sft", "grpo", "dpo", "kto", "rloo", "orpo", "simpo", "ppo")
GENERATIVE = ("grpo", "rloo")  # sample groups of completions and score them with a reward function
PREFERENCE = ("dpo", "kto", "orpo", "simpo")  # learn from (chosen, rejected) pairs
DEFAULT_BETA = {"grpo": 0.0, "rloo": 0.0, "dpo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0, "ppo": 0.05, "sft": 0.0}
PRECISIONS = ("fp32", "mixed", "bf16")
SCHEDULES = ("constant", "linear", "cosine")
MASK_ORDERS = ("before-clip", "after-clip")


@dataclass
class TrainConfig:
    """Everything a run depends on (its hash names the run in the study's cache)."""

    algo: str
    model: str
    task: str = "add"
    out: str = "run"
    mask: str | None = None
    steps: int = 8
    lr: float = 1e-5
    lr_schedule: str = "constant"  # constant | linear | cosine (transformers' schedulers), after warmup
    warmup_ratio: float = 0.0  # share of the steps spent warming the learning rate up from 0 (the paper's DPO: 0.1)
    mask_order: str = "before-clip"  # mask the gradient before clipping (the norm is the masked one) or after it
    seed: int = 0
    beta: float | None = None
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    save_every: int = 0
    precision: str = "fp32"  # fp32 | mixed (fp32 master weights, bf16 compute) | bf16 (bf16 weights)
    level: int = 1
    batch_size: int = 8
    num_generations: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    epsilon: float = 0.2
    n_train: int = 256
    grad_accum: int = 1
    track_every: int = 0
    reward: str = "exact"  # "exact" (final answer matches) or "digits" (dense shaping, for tiny models)
    sparse_state: bool = False  # optimizer state for the masked entries only (training/sparse.py)
    master_in_mask: bool = False  # with precision bf16 and sparse_state: fp32 master copies of the masked entries only
    fsdp: bool = False  # shard parameters, gradients and optimizer state with FSDP2 (under torchrun / accelerate launch)
    fp32_copy: bool = False  # also write the final weights in float32 to out/fp32 (storage-precision study)
    preference: dict | None = None  # {"prompt": [...], "chosen": [...], "rejected": [...]} to use instead of built-in pairs
    sft_data: dict | None = None  # {"prompt": [...], "completion": [...]}

    def key(self) -> str:
        """A content key of the run: the model's weights and config (not its path), the mask's bits, the data
        and every hyperparameter; the same key means the same run."""
        from ..io.content import content_key

        d = dataclasses.asdict(self)
        d.pop("out")
        if self.model and os.path.exists(self.model):
            d["model"] = content_key(self.model)
        for flag in ("sparse_state", "master_in_mask", "fsdp"):
            if not d[flag]:
                d.pop(flag)  # keeps the keys of runs cached before these options existed
        for flag, default in (("lr_schedule", "constant"), ("warmup_ratio", 0.0), ("mask_order", "before-clip")):
            if d[flag] == default:
                d.pop(flag)
        if self.algo in GENERATIVE + ("ppo",):
            d["scoring"] = T.SCORING  # the reward a sampling run trained on is part of what it is
        if self.mask:
            from ..masks.subnetwork import Subnetwork

            d["mask"] = Subnetwork.load(self.mask).digest()  # the content, not the path or metadata
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


MAX_LEVEL = 9
MAX_SEED = 2**32 - 1  # numpy's seed range, which transformers' set_seed also seeds


# the command line's flag for each TrainConfig field (the CLI turns Python names into these in its messages)
CLI_FLAGS = {f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig)} | {"mask": "--mask"}


class ConfigError(InputError):
    """A TrainConfig field that cannot give a meaningful run; ``field`` names it (``lr``)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem

    def for_cli(self) -> InputError:
        """The same sentence, naming the command-line flag (``--lr``) instead of the argument."""
        return InputError(f"{CLI_FLAGS.get(self.field, self.field)}: {_cli_words(self.problem)}")


def _cli_words(problem: str) -> str:
    for name, flag in sorted(CLI_FLAGS.items(), key=lambda kv: -len(kv[0])):
        problem = problem.replace(f"`{name}`", flag)
    return problem


def _finite(x, what: str, lo: float = 0.0, strict: bool = False) -> None:
    if x is None:
        return
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < lo or (strict and x == lo):
        cmp = ">" if strict else "\u2265"
        raise ConfigError(what, f"{x!r} is not a finite number {cmp} {lo:g}.")


def validate_config(cfg: TrainConfig) -> None:
    """Refuse options that cannot give a meaningful run, before anything is imported, loaded or written.

    Raises :class:`ConfigError` naming the field (``lr: ...``); ``e.for_cli()`` names the flag (``--lr: ...``).
    No clipping is spelled ``max_grad_norm=None`` (the command line's ``--max-grad-norm 0``).
    """
    if cfg.algo not in ALGOS:
        raise ConfigError("algo", f"unknown algorithm {cfg.algo!r} (choose from {', '.join(ALGOS)}).")
    if cfg.task not in T.TASKS:
        raise ConfigError("task", f"unknown task {cfg.task!r} (choose from {', '.join(T.TASKS)}).")
    for what, lo in (("steps", 1), ("batch_size", 1), ("max_new_tokens", 1), ("save_every", 0), ("track_every", 0),
                     ("seed", 0), ("grad_accum", 1), ("n_train", 1), ("level", 1), ("num_generations", 1)):
        v = getattr(cfg, what)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ConfigError(what, f"{v!r} must be an integer \u2265 {lo}.")
    if cfg.seed > MAX_SEED:
        raise ConfigError("seed", f"{cfg.seed} must be at most {MAX_SEED} (the range numpy and transformers seed).")
    if cfg.level > MAX_LEVEL:
        raise ConfigError("level", f"{cfg.level!r} must be between 1 and {MAX_LEVEL}.")
    _finite(cfg.lr, "lr", strict=True)
    _finite(cfg.weight_decay, "weight_decay")
    _finite(cfg.beta, "beta")
    _finite(cfg.max_grad_norm, "max_grad_norm", strict=True)
    _finite(cfg.temperature, "temperature", strict=True)
    _finite(cfg.epsilon, "epsilon")
    if cfg.lr_schedule not in SCHEDULES:
        raise ConfigError("lr_schedule", f"{cfg.lr_schedule!r} is not one of {', '.join(SCHEDULES)}.")
    _finite(cfg.warmup_ratio, "warmup_ratio")
    if cfg.warmup_ratio >= 1:
        raise ConfigError("warmup_ratio", f"{cfg.warmup_ratio!r} must be below 1 (a share of the steps).")
    if cfg.mask_order not in MASK_ORDERS:
        raise ConfigError("mask_order", f"{cfg.mask_order!r} is not one of {', '.join(MASK_ORDERS)}.")
    if cfg.mask_order == "after-clip" and cfg.sparse_state:
        raise ConfigError("mask_order", "after-clip masks the clipped dense gradient, so it needs dense optimizer state (no `sparse_state`).")
    if cfg.master_in_mask and not (cfg.sparse_state and cfg.precision == "bf16"):
        raise ConfigError("master_in_mask", "keeps fp32 masters for bf16 weights, so it needs `precision` bf16 and `sparse_state`.")
    if cfg.fsdp and cfg.algo == "ppo":
        raise ConfigError("fsdp", "TRL's PPO builds its optimizer around a policy-and-value wrapper and is not supported with FSDP2 here; use DDP.")
    if cfg.sparse_state and not cfg.mask:
        raise ConfigError("sparse_state", "keeps optimizer state for a mask's entries, so it needs `mask`.")
    if cfg.precision not in PRECISIONS:
        raise ConfigError("precision", f"{cfg.precision!r} is not fp32, mixed or bf16.")
    if cfg.reward not in T.REWARDS:
        raise ConfigError("reward", f"{cfg.reward!r} is not one of {', '.join(T.REWARDS)}.")
    if cfg.algo in GENERATIVE:
        if cfg.num_generations < 2:
            raise ConfigError("num_generations", f"{cfg.num_generations} must be at least 2 for {cfg.algo} (advantages compare generations).")
        if cfg.batch_size % cfg.num_generations:
            raise ConfigError("batch_size", f"{cfg.batch_size} is not a multiple of `num_generations` {cfg.num_generations}.")
