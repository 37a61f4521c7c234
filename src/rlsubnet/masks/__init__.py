"""The subnetwork as data: masks, their file format, set algebra, overlap and closeness."""

from .closeness import ClosenessResult, closeness
from .overlap import OverlapResult, PairOverlap, consensus, overlap, overlap_stats
from .subnetwork import FORMAT, Subnetwork, load_masks
from .verify import FrozenCheck, verify_frozen

__all__ = [
    "FORMAT", "ClosenessResult", "FrozenCheck", "OverlapResult", "PairOverlap", "Subnetwork",
    "closeness", "consensus", "load_masks", "overlap", "overlap_stats", "verify_frozen",
]
