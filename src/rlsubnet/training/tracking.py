"""Watching a run: per-step logs, intermediate checkpoints, and update sparsity during training."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from ..io.atomic import write_text
from ..io.bits import changed, stored_raw
from ..io.checkpoint import open_checkpoint
from ..io.jsonout import dumps

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


class _Counter:
    """A write-only stream that only counts bytes."""

    def write(self, b: bytes) -> int:
        return len(b)


class SparsityTracker(TrainerCallback):
    """Every ``every`` steps, record the update sparsity relative to the initial checkpoint and to the
    previous record, as the parameters would be stored (the dtype of the initial checkpoint).

    Memory: one bit per parameter (the changed-since-init mask of the last record, packed), one bit for
    the ever-changed union, plus the stored values of the entries that differ from init (the rest of the
    previous record is the initial checkpoint, re-read from disk one tensor at a time). No checkpoint is
    written.
    """

    def __init__(self, init_path: str, every: int = 1, model: torch.nn.Module | None = None):
        self.init = open_checkpoint(init_path)
        self.every = max(1, int(every))
        self.records: list[dict] = []
        self._prev_mask: dict[str, np.ndarray] = {}
        self._prev_vals: dict[str, np.ndarray] = {}
        self._ever: dict[str, np.ndarray] = {}
        self.model = model

    def record(self, model: torch.nn.Module, step: int) -> dict:
        from ..deltas.format import PatchWriter

        numel = n_changed = consec = ever = sent = 0
        sizer = PatchWriter(_Counter())  # the patch a delta sync would send since the previous record
        for name, p in model.named_parameters():
            info = self.init.tensors.get(name)
            if info is None or tuple(info.shape) != tuple(p.shape):
                continue
            dt = _DTYPES.get(info.dtype.torch_name)
            if dt is None:
                continue
            cur = stored_raw(p, dt)
            init = self.init.read(name)
            m = changed(cur, init, info.dtype.is_float)
            prev = init
            if name in self._prev_mask:
                pm = np.unpackbits(self._prev_mask[name], count=cur.size, bitorder="little").view(bool)
                prev = init.copy()
                prev[pm] = self._prev_vals[name]
                consec += int(np.count_nonzero(changed(cur, prev, info.dtype.is_float)))
                e = self._ever[name] | np.packbits(m, bitorder="little")
            else:
                consec += int(np.count_nonzero(m))  # the first record is compared with init
                e = np.packbits(m, bitorder="little")
            self._ever[name] = e
            t = sizer.begin_tensor(name, info.dtype.name, info.shape)
            for s0 in range(0, cur.size, sizer.chunk):
                sent += sizer.chunk_update(t, s0, prev[s0 : s0 + sizer.chunk], cur[s0 : s0 + sizer.chunk])
            t["base_sha256"] = t["result_sha256"] = "0" * 64
            mx = cur != init  # exact bits, so the reconstruction of this record next time is exact
            self._prev_mask[name] = np.packbits(mx, bitorder="little")
            self._prev_vals[name] = cur[mx]
            numel += cur.size
            n_changed += int(np.count_nonzero(m))
            ever += int(np.bitwise_count(e).sum())
        rec = {"step": step, "numel": numel, "changed_vs_init": n_changed, "sparsity_vs_init": 1 - n_changed / numel if numel else 1.0,
               "changed_vs_prev": consec, "sparsity_vs_prev": 1 - consec / numel if numel else 1.0,
               "ever_changed": ever}
        h = sizer.finish("sha256:" + "0" * 64, "sha256:" + "0" * 64)
        rec["delta_bytes"] = h["sizes"]["total"]  # an rlsubnet-patch/1 payload since the previous record
        rec["delta_stream_bytes"] = h["sizes"]["positions"] + h["sizes"]["values"]  # without the header
        rec["delta_plain_bytes"] = h["sizes"]["plain"]  # int32 positions + raw values (verl's delta_sharded)
        # the entries the payload carries: bit-exact, so a zero whose sign flipped (+0 <-> -0, the same value, not
        # counted in changed_vs_prev) is sent too
        rec["delta_entries"] = sent
        self.records.append(rec)
        return rec

    def ever_outside(self, final_mask) -> int:
        """How many entries changed at some record but are outside ``final_mask`` (a Subnetwork)."""
        tot = 0
        for name, e in self._ever.items():
            if name in final_mask.shapes:
                tot += int(np.bitwise_count(e & ~final_mask.packed(name)).sum())
        return tot

    def ever_mask(self):
        """The entries that differed from init at any record, as a Subnetwork (one tensor per tracked parameter)."""
        from ..masks.subnetwork import Subnetwork

        shapes = {n: tuple(self.init.tensors[n].shape) for n in self._ever}
        return Subnetwork(shapes, {n: e.copy() for n, e in self._ever.items()},
                          meta={"criterion": "bitwise", "what": "changed at any tracked step", "every": str(self.every)})

    def on_step_end(self, args, state, control, model=None, **kw):
        model = model or self.model
        if model is not None and state.global_step % self.every == 0:
            self.record(model, state.global_step)


class TrainLog(TrainerCallback):
    """Collects every log line (loss, reward, ...) with its step; saved as ``train_log.json``."""

    def __init__(self):
        self.steps: list[dict] = []
        self.t0 = time.perf_counter()
        self.step_times: list[float] = []
        self._last = None

    def on_step_begin(self, args, state, control, **kw):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self._last is not None:
            self.step_times.append(time.perf_counter() - self._last)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs:
            row = {"step": state.global_step}
            row.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            self.steps.append(row)


class SaveEvery(TrainerCallback):
    """Write an intermediate checkpoint (in the input's dtype) every ``every`` steps to ``out/step-N``."""

    def __init__(self, out: Path, every: int, dtype: torch.dtype, tokenizer=None, model=None):
        self.out, self.every, self.dtype, self.tok, self.model = Path(out), int(every), dtype, tokenizer, model
        self.saved: list[str] = []

    def on_step_end(self, args, state, control, model=None, **kw):
        model = self.model or model
        if self.every > 0 and model is not None and state.global_step % self.every == 0:
            from .checkpoints import save_as

            path = self.out / f"step-{state.global_step}"
            save_as(model, path, self.dtype, self.tok)
            self.saved.append(str(path))


def write_log(path: Path, payload: dict) -> None:
    write_text(path, dumps(payload, indent=2, default=str) + "\n")


class StepProgress(TrainerCallback):
    """A rich progress bar over training steps (which run, which step, time left)."""

    def __init__(self, label: str, total: int, console=None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=console, transient=True)
        self.task = self.bar.add_task(label, total=total)

    def on_train_begin(self, args, state, control, **kw):
        self.bar.start()

    def on_step_end(self, args, state, control, **kw):
        self.bar.update(self.task, completed=state.global_step)

    def on_train_end(self, args, state, control, **kw):
        self.bar.stop()
