"""The update as something to ship: the ``rlsubnet-patch/1`` format, create/apply/verify, live delta sync."""

from .format import FORMAT, PatchReader, PatchWriter
from .live import (
    DeltaError,
    DeltaPublisher,
    DirectorySink,
    DistributedSink,
    apply_delta,
    receive_directory,
    receive_distributed,
)
from .patch import PatchStats, apply, create, info, verify

__all__ = [
    "FORMAT", "DeltaError", "DeltaPublisher", "DirectorySink", "DistributedSink", "PatchReader", "PatchStats",
    "PatchWriter", "apply", "apply_delta", "create", "info", "receive_directory", "receive_distributed", "verify",
]
