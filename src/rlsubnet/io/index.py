"""A checkpoint's index as plain data (mergekit's ``ShardedTensorIndex`` shape): names, dtypes, shapes, byte
offsets, files and config, no open files. The reader over an index is :class:`rlsubnet.io.checkpoint.Checkpoint`."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

from .dtypes import DType


@dataclass
class TensorInfo:
    """Where one tensor lives and what it is."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    file: str  # path of the file holding it
    offset: int = 0  # absolute byte offset (safetensors)
    obj: Any = None  # the torch tensor (``.bin``), memory-mapped where possible

    @property
    def numel(self) -> int:
        return int(prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class CheckpointIndex:
    """What a checkpoint holds and where: plain data, no open files."""

    path: str  # as the user named it
    root: Path  # the folder (or the file's folder)
    format: str
    files: list[str]
    tensors: dict[str, TensorInfo]
    config: dict | None = None
    shared_head: bool = False  # a .bin stores its head in the embedding's storage (how torch saves ties)
