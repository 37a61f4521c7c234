"""Probes, the streaming engine, aggregation and the rank of updates."""

from .diff import DEFAULT_ATOL, DEFAULT_ETA, check_tolerances, diff, group
from .engine import DEFAULT_CHUNK, Job, map_chunks
from .naming import KINDS, layer_index, module_kind
from .probes import ULP_LABELS, parse_criterion
from .rank import MatrixRank, RankResult, rank
from .results import DiffResult, Group, TensorDiff

__all__ = [
    "DEFAULT_ATOL", "DEFAULT_CHUNK", "DEFAULT_ETA", "DiffResult", "Group", "Job", "KINDS", "MatrixRank",
    "RankResult", "TensorDiff", "ULP_LABELS", "check_tolerances", "diff", "group", "layer_index",
    "map_chunks", "module_kind", "parse_criterion", "rank",
]
