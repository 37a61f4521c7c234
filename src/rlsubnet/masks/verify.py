"""Checking a finished masked run from its files: did any frozen entry move, and was everything checked?

``verify_frozen(init, trained, mask)`` compares the two checkpoints bit by bit (+0/-0 equal) over the
mask. It is only OK when no frozen entry moved *and* every parameter of the checkpoints and of the mask
was checked: a tensor whose shapes differ, that is in one checkpoint only, or that the mask does not
cover (or that the mask names but the checkpoints lack) is listed under ``unchecked`` and fails the check.
Stored non-parameter buffers are listed apart and are not part of the check.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np

from ..analysis.engine import Job, map_chunks
from ..io.align import align
from ..io.bits import changed_index
from ..io.checkpoint import open_checkpoint
from ..io.jsonout import dumps
from .subnetwork import Subnetwork


@dataclass
class FrozenCheck:
    """Where a trained model moved relative to a mask: frozen entries must not move."""

    init: str
    trained: str
    mask: str | None
    numel: int
    trainable: int
    frozen: int
    frozen_moved: int
    trainable_changed: int
    tensors: list[dict]
    unchecked: list[dict] = field(default_factory=list)  # [{"name", "reason"}]: not verified, so not OK
    buffers: list[str] = field(default_factory=list)  # stored non-parameter buffers (not checked)

    @property
    def ok(self) -> bool:
        return self.frozen_moved == 0 and not self.unchecked

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return dumps(self.to_dict(), indent=indent)


def verify_frozen(init: str | os.PathLike, trained: str | os.PathLike, mask: str | os.PathLike | Subnetwork,
                  workers: int | None = None, progress: bool = False, cache_dir: str | None = None,
                  engine: str = "local", ray_address: str | None = None) -> FrozenCheck:
    """Count entries outside the mask whose bits moved, and entries inside it that changed."""
    m = mask if isinstance(mask, Subnetwork) else Subnetwork.load(mask)
    init, trained = str(init), str(trained)
    unchecked: list[dict] = []
    with open_checkpoint(init, cache_dir) as ci, open_checkpoint(trained, cache_dir) as ct:
        pairs, skipped = align(ci, ct)
        for s in skipped:
            if "counted once" not in s.reason:  # a tied head identical to its embedding is checked through it
                unchecked.append({"name": s.name, "reason": s.reason})
        buffers = [p.name for p in pairs if p.buffer]
        todo = []
        for p in pairs:
            if p.buffer:
                continue
            if p.name not in m.shapes:
                unchecked.append({"name": p.name, "reason": "the mask has no entry for it"})
            elif tuple(m.shapes[p.name]) != tuple(p.shape):
                unchecked.append({"name": p.name, "reason": f"the mask's shape {list(m.shapes[p.name])} differs from the checkpoints' {list(p.shape)}"})
            else:
                todo.append(p)
        names = {p.name for p in pairs} | {s.name for s in skipped}
        for n in m.names:
            if n not in names:
                unchecked.append({"name": n, "reason": "in the mask but in neither checkpoint"})
        jobs = [Job(p.name, [(ci, p.src_a), (ct, p.src_b)], p.numel, payload=p) for p in todo]
        acc = {p.name: [0, 0, 0] for p in todo}  # frozen_moved, trainable_changed, trainable

        def fn(job, start, raws):
            p = job.payload
            if p.a.dtype.name == p.b.dtype.name:
                idx = changed_index(raws[0], raws[1], p.a.dtype.is_float)
            else:
                from ..analysis.probes import differing

                idx, _, _ = differing(raws[0], raws[1], p.a.dtype, p.b.dtype)
            bits = m.bits(p.name, start, raws[0].size)
            inside = bits[idx]
            return int(idx.size - np.count_nonzero(inside)), int(np.count_nonzero(inside)), int(np.count_nonzero(bits))

        for job, results in map_chunks(jobs, fn, workers=workers, desc="verify", progress=progress,
                                           engine=engine, ray_address=ray_address):
            for r in results:
                for i in range(3):
                    acc[job.name][i] += r[i]
    rows = [{"name": p.name, "numel": p.numel, "trainable": acc[p.name][2], "frozen_moved": acc[p.name][0],
             "trainable_changed": acc[p.name][1]} for p in todo]
    numel = sum(p.numel for p in todo)
    trainable = sum(r["trainable"] for r in rows)
    return FrozenCheck(init, trained, m.path, numel, trainable, numel - trainable,
                       sum(r["frozen_moved"] for r in rows), sum(r["trainable_changed"] for r in rows), rows,
                       unchecked, buffers)
