"""Delta weight sync during training: a TRL/transformers callback publishing what each step changed."""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from ..deltas.live import DeltaPublisher


class DeltaSyncCallback(TrainerCallback):
    """Publish the stored view's delta after every ``every`` optimizer steps to ``sink``.

    Under DDP or FSDP2 add it on every rank (the publisher's snapshot and diff are collective under FSDP2);
    only rank 0 sends.

    The bytes of each publication (and of the plain int32 + raw encoding) are kept in ``self.records``.
    """

    def __init__(self, sink, model: torch.nn.Module | None = None, every: int = 1, dtype: torch.dtype | None = torch.bfloat16,
                 level: int = 3):
        self.sink = sink
        self.every = max(1, int(every))
        self.dtype = dtype
        self.level = level
        self.pub: DeltaPublisher | None = DeltaPublisher(model, dtype, level) if model is not None else None
        self.records: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, **kw):
        if self.pub is None and model is not None:
            self.pub = DeltaPublisher(model, self.dtype, self.level)
        if self.pub is not None and hasattr(self.sink, "manifest") and self.sink.manifest.get("initial") is None:
            self.sink.manifest["initial"] = self.pub.hash

    def on_step_end(self, args, state, control, model=None, **kw):
        if self.pub is None or state.global_step % self.every:
            return
        parent = self.pub.hash
        payload = self.pub.delta()  # collective under FSDP2: every rank calls it
        if payload is None:  # a rank other than 0 of a process group: rank 0 publishes
            return
        self.sink.send(state.global_step, payload, parent, self.pub.hash)
        self.records.append({"step": state.global_step, **self.pub.sizes[-1]})
