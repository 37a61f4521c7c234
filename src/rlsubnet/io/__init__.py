"""Finding, validating, aligning and reading checkpoints; atomic writing."""

from .align import Pair, Skipped, align
from .atomic import atomic_dir, atomic_path, write_bytes, write_text, write_with
from .checkpoint import Checkpoint, CheckpointIndex, TensorInfo, iter_chunks, open_checkpoint, read_safetensors_header
from .dtypes import DTYPES, DType, ulp_exponent, widen, widen32
from .errors import InputError

__all__ = [
    "Checkpoint", "CheckpointIndex", "DType", "DTYPES", "InputError", "Pair", "Skipped", "TensorInfo", "align", "atomic_dir",
    "atomic_path", "iter_chunks", "open_checkpoint", "read_safetensors_header", "ulp_exponent", "widen",
    "widen32", "write_bytes", "write_text", "write_with",
]
