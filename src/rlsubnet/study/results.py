"""The study's typed results: one dataclass per research question's rows, all serialising to ``results.json``.

``Study.run()`` returns a :class:`StudyResults`; ``to_dict()`` is exactly what ``results.json`` holds and what
the report layer renders (the study never renders). Fields whose values are themselves JSON-shaped analysis
records (a diff's tolerance sweep, a closeness list) stay plain dicts and lists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import asdict, dataclass, field

from ..io.errors import InputError


class _Typed:
    """``from_dict`` for the result dataclasses: the JSON is the dataclass, in both directions (as transformers'
    ``TrainerState``). Nested result types are rebuilt; a missing field or a value of the wrong kind is an error
    naming the field (``rq2.rows[0].acc_sub``), never a KeyError at the end of a one-hour study."""

    @classmethod
    def from_dict(cls, d: dict, where: str = ""):
        where = where or cls.__name__
        if not isinstance(d, dict):
            raise InputError(f"{where}: expected an object, found {type(d).__name__}.")
        hints = typing.get_type_hints(cls)
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                    continue
                raise InputError(f"{where}.{f.name}: missing (results written by another version?).")
            kw[f.name] = _build(hints[f.name], d[f.name], f"{where}.{f.name}")
        return cls(**kw)


def _build(tp, v, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], v, where) if len(inner) == 1 else v
    if isinstance(tp, type) and issubclass(tp, _Typed):
        return tp.from_dict(v, where)
    if origin is list and args and isinstance(args[0], type) and issubclass(args[0], _Typed):
        if not isinstance(v, list):
            raise InputError(f"{where}: expected a list, found {type(v).__name__}.")
        return [args[0].from_dict(x, f"{where}[{i}]") for i, x in enumerate(v)]
    if origin is dict and len(args) == 2 and isinstance(args[1], type) and issubclass(args[1], _Typed):
        if not isinstance(v, dict):
            raise InputError(f"{where}: expected an object, found {type(v).__name__}.")
        return {k: args[1].from_dict(x, f"{where}[{k!r}]") for k, x in v.items()}
    return v


@dataclass
class RunRecord(_Typed):
    """One training run of the study, as its log recorded it."""

    dir: str
    algo: str
    elapsed_s: float
    mask: str | None
    loss: list  # per logged step
    reward: list
    margin: list  # DPO: chosen − rejected reward
    zero_std: list  # GRPO/RLOO: share of reward groups with zero spread (no gradient)
    clipped: list  # GRPO/RLOO: share of completions cut at the token limit
    step_time_s: float
    saved: list  # intermediate checkpoint folders
    delta_sync: list  # per step: {step, changed_vs_prev, delta_bytes, delta_plain_bytes, numel}
    checkpoint_bytes: int


@dataclass
class DiffSummary(_Typed):
    """What the study keeps of one diff against the base (cached as JSON under OUT/cache)."""

    numel: int
    changed: int
    sparsity: float
    atol: list  # [{"atol", "changed", "sparsity"}]
    bf16_rel_sparsity: float
    ulp_hist: dict
    by_module: dict  # module kind -> sparsity
    by_layer: dict  # layer -> sparsity
    grid: dict  # layer -> {kind -> sparsity}
    paper_layerwise_density: typing.Any = None
    skipped: int = 0
    notes: list = field(default_factory=list)
    lr_sum: float | None = None  # with the floor: the run's Σlr
    floor: dict | None = None  # FloorSummary.to_dict()
    sparsity_above_floor: float | None = None
    by_exponent: list | None = None
    rank_mean: float | None = None
    rank_by_kind: dict | None = None
    stable_rank_mean: float | None = None
    effective_rank_mean: float | None = None


@dataclass
class AccuracyRecord(_Typed):
    """Greedy held-out accuracy of one model, every per-problem outcome kept."""

    task: str
    model: str
    accuracy: float
    n: int = 0
    correct: int = 0
    format_rate: float | None = None
    strict_accuracy: float | None = None
    outcomes: list = field(default_factory=list)
    formatted: list = field(default_factory=list)
    completions: list = field(default_factory=list)
    problems_digest: str | None = None
    samples: list = field(default_factory=list)


@dataclass
class RQ1Row(_Typed):
    """One algorithm: its first seed's figures, every seed's, and the spread over seeds."""

    algo: str
    run: str
    seed: int
    sparsity: float
    atol: list[dict]
    bf16_rel_sparsity: float
    rank_mean: float | None
    stable_rank_mean: float | None
    effective_rank_mean: float | None
    by_module: dict
    in_distribution: bool
    lr_sum: float | None
    floor: dict | None
    sparsity_above_floor: float | None
    seeds: list[dict]
    sparsity_mean_sd: dict
    above_floor_mean_sd: dict
    in_rl_average: bool


@dataclass
class RQ1(_Typed):
    rows: list[RQ1Row]
    comparisons: list[dict]  # stats.Comparison.to_dict(): SFT against each seeded RL algorithm
    lr: float
    steps: int
    failed: list[dict] = field(default_factory=list)
    ppo_note: str | None = None


@dataclass
class RQ2Row(_Typed):
    """One algorithm × seed: θ_init, θ_full, θ_sub and the random-mask controls, compared."""

    algo: str
    seed: int
    run: str
    n_eval: int
    accuracy: dict  # model -> {accuracy, format_rate, strict_accuracy}
    comparisons: list[dict]
    closeness_to_full: dict  # masked model -> {all, inside_mask, outside_mask, rel_l2, mask_density}
    random_control: dict  # "uniform" | "magnitude" -> {accuracy, closeness}
    reward: dict  # model -> per-step mean reward
    acc_init: float
    acc_full: float
    acc_sub: float
    closeness: list[dict]
    inside_mask: list[dict] | None
    outside_mask: list[dict] | None
    rel_l2: float
    mask_density: float
    loss_full: list
    loss_sub: list
    reward_full: list
    reward_sub: list


@dataclass
class TrajectoryPoint(_Typed):
    """One checkpoint of a run: its held-out accuracy and the training progress up to it."""

    step: int
    accuracy: float
    format_rate: float | None
    record: str  # its entry in StudyResults.accuracy (per-problem outcomes)
    loss: float | None  # mean logged training loss over the steps since the previous checkpoint
    progress: float | None  # DPO: mean reward margin; GRPO/RLOO: mean reward, over the same steps


@dataclass
class Trajectory(_Typed):
    """A run's accuracy along training: θ_full, θ_sub or a control, one seed."""

    algo: str
    variant: str  # full | sub | random_uniform | random_magnitude | union | padded
    seed: int
    run: str
    points: list[TrajectoryPoint]

    def at(self, step: int) -> TrajectoryPoint | None:
        return next((p for p in self.points if p.step == step), None)


@dataclass
class RQ2Point(_Typed):
    """Where RQ2's verdicts are taken: a checkpoint step for θ_full and, per variant and seed, the step compared."""

    name: str  # "peak" | "final" | "matched"
    why: str
    full_step: int
    steps: dict  # variant -> [step per seed] (matched progress: each run's own step)


@dataclass
class RQ2(_Typed):
    rows: list[RQ2Row]
    across_seeds: dict
    every: int = 0  # checkpoint interval of the trajectories (0: endpoints only, results of an older version)
    trajectories: list[Trajectory] = field(default_factory=list)
    points: list[RQ2Point] = field(default_factory=list)
    verdicts: list[dict] = field(default_factory=list)  # stats.Comparison.to_dict() + "point": pooled over seeds, Holm-corrected
    nulls: list[dict] = field(default_factory=list)  # θ_full against θ_full' (another seed; its neighbouring checkpoint)
    replay: dict | None = None  # what the mask can and cannot replay (ever-changed outside the mask, agreement by kind)
    data: dict | None = None  # the preference data and training progress: pairs, epochs, final loss and margin


@dataclass
class OverlapRow(_Typed):
    """Overlap of two runs' masks against a uniform random pair and against one matched per tensor × |w0| exponent."""

    axis: str
    paper_row: str | None
    a: str
    b: str
    o1: float
    o2: float
    o1_random: float
    o2_random: float
    jaccard: float
    jaccard_random: float
    ratio: float
    z: float
    s1: float
    s2: float
    matched: dict


@dataclass
class RQ4(_Typed):
    rows: list[OverlapRow]


@dataclass
class LrRow(_Typed):
    """The same GRPO run at a multiple of the learning rate."""

    scale: float
    sparsity: float
    bf16_rel_sparsity: float
    floor: dict | None
    sparsity_above_floor: float | None


@dataclass
class DistributionRow(_Typed):
    """In- vs off-distribution training data of matched size (Table 5)."""

    name: str
    method: str
    in_distribution: bool
    examples: int
    sparsity: float
    floor: dict | None
    sparsity_above_floor: float | None
    seeds: list[dict] = field(default_factory=list)  # per seed: seed, run, sparsity, sparsity_above_floor (the first is above)
    sparsity_mean_sd: dict | None = None  # mean, sd, n over seeds


@dataclass
class StepRow(_Typed):
    """An intermediate checkpoint of the main GRPO run (Figs. 5-6)."""

    step: int
    sparsity: float
    consecutive_sparsity: float
    outside_final_share: float


@dataclass
class RQ5(_Typed):
    """What makes updates sparse: KL, clipping, learning rate, precision, data distribution, training steps."""

    # the single-run ablations and the main GRPO run's steps belong to seed 0: a record of other seeds alone
    # (``--only-seeds 1,2``) has the distribution rows only, these None or empty
    kl: dict | None = None  # {"without", "with", "above_floor": {"without", "with"}}
    clip: dict | None = None  # {"with", "without", "above_floor": {...}}
    lr: list[LrRow] = field(default_factory=list)
    precision: dict | None = None  # storage: {"bf16": {"sparsity", "atol"}, "fp32": {...}}
    distribution: list[DistributionRow] = field(default_factory=list)
    steps: list[StepRow] = field(default_factory=list)
    training_precision: dict | None = None  # {"main": {"precision", "sparsity", "floor"}, "fp32": {...}}
    ever_updated_outside_final: float | None = None
    # in- against off-distribution data: stats.Comparison dicts (b = in-distribution, a = off) + algo (sft|dpo), Welch over seeds
    distribution_comparisons: list[dict] = field(default_factory=list)


@dataclass
class StudyResults(_Typed):
    meta: dict
    paper: dict
    runs: dict[str, RunRecord]
    diffs: dict[str, DiffSummary]
    accuracy: dict[str, AccuracyRecord]
    preferences: dict | None = None
    rq1: RQ1 | None = None
    rq2: RQ2 | None = None
    rq4: RQ4 | None = None
    rq5: RQ5 | None = None

    def to_dict(self) -> dict:
        """``results.json``: every field, research questions that did not run left out."""
        d = asdict(self)
        return {k: v for k, v in d.items() if not (k in ("rq1", "rq2", "rq4", "rq5", "preferences") and v is None)}

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> StudyResults:
        """A ``results.json`` read back as typed results (``write_report(StudyResults.from_json(p), out)``)."""
        try:
            with open(path, encoding="utf-8") as fh:
                d = json.load(fh)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise InputError(f"{path}: not a readable results.json ({type(e).__name__}).") from None
        return cls.from_dict(d, "results")


def equal_at(rows: list[dict] | None, tol: float) -> float | None:
    """From a closeness list ``[{atol, equal, equal_fraction}]``: the fraction equal at ``tol`` (None if not swept)."""
    return next((x["equal_fraction"] for x in rows or [] if x["atol"] == tol), None)
