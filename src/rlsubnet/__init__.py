"""rlsubnet: what did this finetuning run change, and how? Measure, extract, compare and train the
subnetworks that RL finetuning updates in large language models (arXiv 2505.11711)."""

from .analysis import DiffResult, RankResult, diff, rank
from .io import InputError, open_checkpoint

__version__ = "0.1.0"
__all__ = ["DiffResult", "InputError", "RankResult", "diff", "open_checkpoint", "rank", "__version__"]
