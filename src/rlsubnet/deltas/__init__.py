"""The update as something to ship: the ``rlsubnet-patch/1`` format, create/apply/verify, live delta sync.

Importing this package does not import torch: the format, the patch reader and writer and
create/apply/verify need numpy and zstandard only. The live-sync names (``DeltaPublisher``, ``apply_delta``,
the sinks and receivers), which work on torch tensors, load :mod:`rlsubnet.deltas.live` when first used.
"""

from .format import FORMAT, DeltaError, PatchReader, PatchWriter
from .patch import PatchStats, apply, create, info, verify

_LIVE = ("DeltaPublisher", "DirectorySink", "DistributedSink", "ReceiveError", "apply_delta", "receive_directory",
         "receive_distributed")

__all__ = [
    "FORMAT", "DeltaError", "DeltaPublisher", "DirectorySink", "DistributedSink", "PatchReader", "PatchStats",
    "PatchWriter", "ReceiveError", "apply", "apply_delta", "create", "info", "receive_directory", "receive_distributed", "verify",
]


def __getattr__(name: str):
    if name in _LIVE:
        from ..io.optional import need

        need("torch", what=f"rlsubnet.deltas.{name} (live sync of torch tensors)")
        from . import live

        return getattr(live, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
