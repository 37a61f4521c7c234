"""Live delta sync: publish only what changed since the last publication, in the same patch format.

``pub = DeltaPublisher(model)`` snapshots the *stored view* of the model's named parameters (the bits an
inference engine holds: bf16 by default, so fp32 master weights are published as bf16); ``pub.delta()``
returns the payload (``rlsubnet-patch/2`` bytes with ``mix64`` tensor digests, or ``/1`` with
``digest="sha256"``) of what changed since the previous call, and ``apply_delta(target, payload)`` updates a
model or a state dict in place after checking every base and result digest: a payload that fails
verification raises and leaves the target's weights unchanged.

Sinks: :class:`DirectorySink` (shared storage: one atomic file per step plus ``manifest.json``, the chain)
with :func:`receive_directory` on the other side, and :class:`DistributedSink` with :func:`receive_distributed`.
The TRL callback that publishes during training is :class:`rlsubnet.training.sync.DeltaSyncCallback`
(callbacks belong to the training layer).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import stat
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.autograd.graph import increment_version

from ..io.atomic import write_bytes, write_text
from ..io.bits import torch_raw
from ..io.dtypes import TORCH_TO_CODE
from ..io.errors import InputError
from .format import (
    CHUNK,
    DIGESTS,
    DeltaError,
    Encoder,
    PatchReader,
    PatchWriter,
    checkpoint_hash,
    encode_chunk,
    mix64_terms,
    mix64_update,
    tensor_digest,
)

_KEEP = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu") if hasattr(torch, n)}


def _stored(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The tensor as an inference engine holds it: cast to ``dtype``, except fp8 codes, which are already stored
    (engines serving fp8 receive fp8)."""
    t = t.detach()
    if dtype is not None and t.is_floating_point() and t.dtype not in _KEEP:
        t = t.to(dtype)
    return t.to("cpu").contiguous()


def _code(t: torch.Tensor) -> str:
    return TORCH_TO_CODE[str(t.dtype).removeprefix("torch.")]


def sha256_many(arrays: list) -> list[str]:
    """sha256 hex digests of several buffers, in threads (hashlib releases the GIL on large buffers)."""
    if len(arrays) < 2:
        return [hashlib.sha256(a.data).hexdigest() for a in arrays]
    with ThreadPoolExecutor(_threads()) as ex:
        return list(ex.map(lambda a: hashlib.sha256(a.data).hexdigest(), arrays))


def _threads() -> int:
    """Threads for per-tensor and per-chunk work (numpy, torch and zstd release the GIL)."""
    return max(1, min(4, os.cpu_count() or 1))


def _dist():
    """(rank, world size) of an initialised torch.distributed process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def _shard_offset(p) -> int:
    """Flat offset, in the full tensor, of this process's shard of a DTensor (row-wise Shard(0) or replicated)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not all(isinstance(pl, (Shard, Replicate)) for pl in p.placements) or any(
            isinstance(pl, Shard) and pl.dim != 0 for pl in p.placements):
        raise DeltaError(f"DeltaPublisher: parameter with placements {p.placements} is not sharded by rows; "
                         "publish from a model sharded with FSDP2's default Shard(0).")
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row = 1
    for x in p.shape[1:]:
        row *= x
    return int(offset[0]) * row if offset else 0


class DeltaPublisher:
    """Snapshots a model's stored view and encodes what changed since the last snapshot.

    Cost per step grows with the change, apart from one cast and compare of every tensor: the snapshot's
    digests are kept between steps (the base of step k is the result of step k−1); with ``digest="mix64"`` (the
    default, ``rlsubnet-patch/2``) a changed tensor's digest is updated from its changed entries, with
    ``"sha256"`` (``/1``) a changed tensor is hashed whole; unchanged tensors are never hashed.

    Under ``torch.distributed`` (DDP or FSDP2) every process constructs the publisher and calls :meth:`delta`
    at the same points (both are collective under FSDP2); one payload per step comes out, on rank 0
    (``delta()`` returns ``None`` on the other ranks). With DDP the replicas are identical and rank 0 alone
    does the work. With FSDP2 each process compares its own shard against its own snapshot and sends rank 0
    the changed entries in global checkpoint coordinates; rank 0 keeps the full stored view (one copy of the
    model in the publication dtype, on its host), applies them and encodes the payload.
    """

    def __init__(self, model: torch.nn.Module | dict, dtype: torch.dtype | None = torch.bfloat16, level: int = 3,
                 chunk: int = CHUNK, raw_values: bool = False, layout: str | None = None, digest: str = "mix64"):
        if digest not in DIGESTS:
            raise ValueError(f"digest={digest!r}: expected one of {', '.join(DIGESTS)}")
        self.digest = digest  # "mix64": rlsubnet-patch/2 payloads verified in time proportional to the change; "sha256": /1
        self.model = model
        self.layout = _choose_layout(model, layout)  # "file": the checkpoint's names (transformers' conversion, reverted)
        self.raw_values = raw_values  # new values as they are (no xor/sub against the base): readable by iter_updates alone
        self.dtype = dtype
        self.level = level
        self.chunk = chunk
        self.rank, self.world = _dist()
        named = self._named()
        self.sharded = any(_is_dtensor(t) for _, t in named)
        if self.sharded and self.layout == "file":
            raise ValueError("layout='file' publishes in the checkpoint's names, which needs whole (unsharded) parameters; "
                             "under FSDP2 publish with layout='model'")
        self._local: dict[str, np.ndarray] = {}  # FSDP2: this process's shard of the stored view
        self._spare: dict[str, np.ndarray] = {}  # per tensor, the buffer the next step's stored view is cast into
        self._offset: dict[str, int] = {}
        if self.sharded:
            for n, t in named:
                if _is_dtensor(t):
                    self._local[n] = torch_raw(_stored(t.to_local(), dtype)).copy()
                    self._offset[n] = _shard_offset(t)
            full = {n: (t.full_tensor() if _is_dtensor(t) else t) for n, t in named}  # collective: every rank takes part
        else:
            full = dict(named)
        self.sizes: list[dict] = []
        self.hash = ""
        if self.rank != 0:
            return
        self._snap = {n: torch_raw(_stored(t, dtype)).copy() for n, t in full.items()}
        self._shapes = {n: (tuple(t.shape), _code(_stored(t.reshape(-1)[:0], dtype))) for n, t in full.items()}
        with ThreadPoolExecutor(_threads()) as ex:  # the one whole digest of every tensor, in threads
            self._digest = dict(zip(self._snap, ex.map(lambda n: tensor_digest(self._snap[n], digest), self._snap)))
        self.hash = checkpoint_hash([(n, c, s, self._digest[n]) for n, (s, c) in self._shapes.items()], digest)

    def _named(self):
        if isinstance(self.model, dict):
            return list(self.model.items())
        if self.layout == "file":
            from transformers.core_model_loading import revert_weight_conversion

            return list(revert_weight_conversion(self.model, dict(self.model.named_parameters())).items())
        return list(self.model.named_parameters())

    def _changes(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """FSDP2: ``{name: (global flat indices, new bits)}`` of this process's shards since the last call."""
        out = {}
        for n, t in self._named():
            if n not in self._local:
                continue
            cur = torch_raw(_stored(t.to_local(), self.dtype))
            old = self._local[n]
            idx = np.flatnonzero(cur != old)
            if idx.size:
                out[n] = (idx + self._offset[n], cur[idx].copy())
                old[idx] = cur[idx]
        return out

    def _gathered(self) -> dict[str, np.ndarray | None]:
        """FSDP2: the stored view now, per tensor, on rank 0, assembled from every process's changed entries
        (None: bit-identical to the snapshot); a collective."""
        import torch.distributed as dist

        mine = self._changes()
        got = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, got, dst=0)
        if self.rank != 0:
            return {}
        cur: dict[str, np.ndarray | None] = {}
        for part in got:
            for n, (idx, vals) in part.items():
                arr = cur.get(n)
                if arr is None:
                    arr = cur[n] = self._snap[n].copy()
                arr[idx] = vals
        for n, t in self._named():
            if n not in self._local:  # replicated, not sharded: compared here
                c = torch_raw(_stored(t, self.dtype))
                cur[n] = c if not np.array_equal(c, self._snap[n]) else None
        return cur

    def _fetch(self, name: str, t: torch.Tensor):
        """One tensor's stored view now (every tensor is compared: torch's version counter misses writes through
        ``.data``, which trainers use): a buffer kept between steps (the previous snapshot of a tensor that
        changed, or the last step's buffer of one that did not: no fresh pages to fault in every step) and
        ``fill(start, stop)``, which casts that range into it (range by range, compared while in cache)."""
        buf = self._spare.get(name)
        if buf is None:
            buf = self._spare[name] = np.empty_like(self._snap[name])
        src = t.detach().reshape(-1)
        dst = torch.from_numpy(buf.view(_signed(buf.dtype.itemsize))).view(_stored(src[:0], self.dtype).dtype)

        def fill(start: int, stop: int) -> None:
            with torch.no_grad():
                dst[start:stop].copy_(src[start:stop])

        return buf, fill

    def delta(self) -> bytes | None:
        """The payload that turns the previous snapshot into the current stored view, and snapshot it (rank 0);
        ``None`` on other ranks of a process group."""
        if self.rank != 0 and not self.sharded:
            return None  # DDP: the replicas are identical; rank 0 publishes
        if self.sharded:
            current = self._gathered()
            if self.rank != 0:
                return None
            fetch = lambda n: (current.get(n), None)
        else:
            live = dict(self._named())
            fetch = lambda n: self._fetch(n, live[n])
        buf = io.BytesIO()
        w = PatchWriter(buf, level=self.level, chunk=self.chunk, raw_values=self.raw_values, digest=self.digest)
        base_key, result_key = w.keys
        local = threading.local()
        names = list(self._snap)
        fetched = {n: fetch(n) for n in names}

        def work(unit: tuple[str, int]):
            enc = getattr(local, "enc", None)
            if enc is None:  # a zstd compressor is not shared between threads
                enc = local.enc = Encoder(self.level, w.enc.value_encodings)
            return self._encode_chunk(unit[0], fetched[unit[0]], unit[1], enc)

        # work units are chunks of tensors (a change packed into one tensor still spreads over the threads); results
        # come back in order and are written in order
        units = [(n, s) for n in names if fetched[n][0] is not None for s in range(0, fetched[n][0].size, self.chunk)]
        res_e = []
        with ThreadPoolExecutor(_threads()) as ex:  # numpy, torch and zstd release the GIL
            done = iter(ex.map(work, units))
            for name in names:
                cur = fetched[name][0]
                shape, code = self._shapes[name]
                t = w.begin_tensor(name, code, shape)
                t[base_key] = self._digest[name]
                moved = 0  # mix64: Σ term(new) − Σ term(old) over the changed entries
                for _ in range(0, cur.size, self.chunk) if cur is not None else ():
                    e, diff = next(done)
                    if e is not None:
                        w.add_encoded(t, e)
                        moved += diff
                if t["changed"]:  # the new snapshot; the old one becomes the next step's buffer
                    if not self.sharded:
                        self._spare[name] = self._snap[name]
                    self._snap[name] = cur
                    self._digest[name] = (f"{(int(self._digest[name], 16) + moved) & ((1 << 64) - 1):016x}" if self.digest == "mix64"
                                          else hashlib.sha256(cur.data).hexdigest())  # sha256: only what changed, whole
                t[result_key] = self._digest[name]
                res_e.append((name, code, shape, t[result_key]))
        h = w.finish(self.hash, checkpoint_hash(res_e, self.digest))
        self.hash = h["result"]["hash"]
        payload = buf.getvalue()
        self.sizes.append({"bytes": len(payload), "plain": h["sizes"]["plain"],
                           "changed": sum(t["changed"] for t in h["tensors"])})
        return payload

    def _encode_chunk(self, name: str, fetched: tuple, s: int, enc: Encoder):
        """One chunk of a tensor against the snapshot: (its change encoded or None, and for mix64 the change of the
        digest: Σ term(new) − Σ term(old) over its changed entries)."""
        cur, fill = fetched
        if fill is not None:
            fill(s, s + self.chunk)
        o, c = self._snap[name][s : s + self.chunk], cur[s : s + self.chunk]
        idx = np.flatnonzero(o != c)
        if not idx.size:
            return None, 0
        e = encode_chunk(enc, s, o, c, idx)
        if self.digest != "mix64":
            return e, 0
        at = idx + s
        return e, mix64_terms(at, c[idx]) - mix64_terms(at, o[idx])


LAYOUTS = ("model", "file")


def _choose_layout(model, layout: str | None) -> str:
    """``layout=None``: ``"file"`` where transformers keeps the model's parameters under other names than its
    checkpoint files (fused MoE experts), so live deltas name what patches and masks name; else ``"model"``."""
    if layout is not None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r}: expected 'model' or 'file'")
        if layout == "file" and not isinstance(model, torch.nn.Module):
            raise ValueError("layout='file' needs a transformers model (a state dict has no conversion to revert)")
        return layout
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        return "model"
    params = dict(model.named_parameters())
    if any(_is_dtensor(t) for t in params.values()):
        return "model"  # sharded: names are compared per process in the model's own layout
    try:
        from transformers.core_model_loading import revert_weight_conversion

        names = set(revert_weight_conversion(model, params))
    except (ImportError, AttributeError, TypeError, ValueError, KeyError, RuntimeError):
        return "model"
    return "file" if names != set(params) else "model"


def apply_delta(target: torch.nn.Module | dict, payload: bytes, recheck: bool = False) -> int:
    """Apply a payload to a model's parameters or a state dict in place; returns the entries changed.

    Before anything is written: every tensor's base digest, that each target tensor can be written in place (not
    an inference-mode tensor), and that names sharing storage (tied weights) receive the same result. With a
    ``mix64`` payload (``rlsubnet-patch/2``, the publisher's default) each result is verified before any write
    from the base's digest and the changed entries alone (the digest is a sum of per-entry terms), so the cost
    grows with the change; with a ``sha256`` payload each written tensor is hashed whole afterwards, and if any
    result fails, every entry written is restored. A contiguous target alone in its storage takes only its
    changed entries, in place on its device; other targets are built whole and read back. A payload that fails
    (:class:`DeltaError`) leaves the target unchanged.

    The digest of every tensor verified or written is remembered with torch's version counter, so a tensor is not
    hashed again while it has not been written since. A write through ``.data`` bypasses that counter: after
    changing the target's weights that way, pass ``recheck=True`` (every tensor is then hashed again).
    """
    try:
        d = _decode_delta(target, payload, recheck)
    except DeltaError:
        raise
    except InputError as e:
        raise DeltaError(e.message) from None
    check = _check_writable(d.updates, d.named, d.results)
    # contiguous targets that share no storage take the changed entries in place, on their device (cost grows
    # with the change); the rest receive whole new tensors, built and checked before anything is written
    inplace = [n for n in d.updates if n not in check and d.named[n].is_contiguous()]
    whole = _whole_results(d, [n for n in d.updates if n not in inplace])
    _write_in_place(d, inplace)
    _write_whole(d, whole, check)
    for name in d.updates:  # the digest of what each written tensor now holds, for the next payload's base check
        _remember(d.named[name], d.kind, d.results[name])
    return d.changed


def _digests(arrays: list, kind: str) -> list[str]:
    return sha256_many(arrays) if kind == "sha256" else [tensor_digest(a, kind) for a in arrays]


def _whole_results(d, names: list[str]) -> dict[str, np.ndarray]:
    """The new bits of whole tensors, each checked against its recorded result before anything is written."""
    whole = {}
    for name in names:
        idx, vals, _ = d.updates[name]
        new = torch_raw(d.named[name].detach().cpu()).copy()
        new[idx] = vals
        whole[name] = new
    todo = [n for n in names if n not in d.verified]
    for name, digest in zip(todo, _digests([whole[n] for n in todo], d.kind)):
        if digest != d.results[name]:
            raise DeltaError(f"delta payload: tensor '{name}' does not reproduce the recorded result.")
    return whole


def _write_in_place(d, names: list[str]) -> None:
    """Write the changed entries of ``names`` by index on their device; results not verified before the write
    (sha256) are then hashed, and if any fails (or anything is raised), every entry written is restored."""
    saved = []  # (target, write) of every write, to undo them with the old bits read while decoding
    try:
        with torch.no_grad():
            for name in names:
                dst = d.named[name]
                idx, vals, olds = d.updates[name]
                write = _scatter(dst, idx)
                saved.append((write, olds))
                write(vals)
        todo = [n for n in names if n not in d.verified]
        got = _digests([torch_raw(d.named[n].detach().cpu()) for n in todo], d.kind)
        for name, digest in zip(todo, got):
            if digest != d.results[name]:
                raise DeltaError(f"delta payload: tensor '{name}' does not reproduce the recorded result.")
    except BaseException:
        with torch.no_grad():
            for write, olds in reversed(saved):
                write(olds)
        raise


def _scatter(dst: torch.Tensor, idx: np.ndarray):
    """``write(bits)``: store raw ``bits`` at flat positions ``idx`` of a contiguous target, in place. On the CPU through
    a numpy view of its storage (torch's indexed assignment is many times slower there), bumping torch's version
    counter as an in-place op does; on other devices by indexed assignment on the device."""
    if dst.device.type == "cpu" and dst.dtype != torch.bool:  # (torch_raw of a bool tensor is a converted copy)
        view = torch_raw(dst.detach())

        def write(bits: np.ndarray) -> None:
            view[idx] = bits
            increment_version(dst)

        return write
    flat, at = dst.view(-1), torch.from_numpy(idx).to(dst.device)

    def write(bits: np.ndarray) -> None:
        flat[at] = torch.from_numpy(bits.view(_signed(bits.dtype.itemsize))).view(dst.dtype).to(dst.device)

    return write


def _write_whole(d, whole: dict, check: list[str]) -> None:
    """Copy whole verified tensors into the target, then read back the names that share storage."""
    written = {}
    with torch.no_grad():
        for name, new in whole.items():
            dst = d.named[name]
            src = torch.from_numpy(new.view(_signed(new.dtype.itemsize))).view(dst.dtype).reshape(dst.shape).to(dst.device)
            dst.copy_(src)
            written[name] = src
    for name in check:  # read back on the target's device: what it now holds is the recorded result
        dst = d.named[name]
        src = written.get(name)
        ok = (src is not None and torch.equal(_bits(dst.detach()), _bits(src))) or (
            src is None and tensor_digest(torch_raw(dst.detach().cpu()), d.kind) == d.results[name])
        if not ok:
            raise DeltaError(f"delta payload: tensor '{name}' does not hold the recorded result after writing "
                             "(another tensor of the target shares its storage).")


# id(tensor) -> (weak reference, _version, data_ptr, {digest kind: digest of its bits}); tensors compare
# elementwise, so they are keyed by identity, and an entry counts only while its weak reference still points at
# the same tensor
_DIGESTS: dict[int, tuple] = {}


def _remember(t: torch.Tensor, kind: str, digest: str) -> None:
    if t.is_inference():  # no version counter: nothing can tell a later write apart, so nothing is remembered
        return
    hit = _DIGESTS.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == t._version and hit[2] == t.data_ptr():
        hit[3][kind] = digest  # the same bits, another kind of digest
        return
    try:
        ref = weakref.ref(t, lambda _r, k=id(t): _DIGESTS.pop(k, None))
    except TypeError:  # a tensor type that does not take weak references
        return
    _DIGESTS[id(t)] = (ref, t._version, t.data_ptr(), {kind: digest})


def _known_digest(t: torch.Tensor, kind: str) -> str | None:
    """The digest recorded for ``t`` if it has not been written since (torch bumps ``_version`` on every in-place
    change), else None."""
    hit = _DIGESTS.get(id(t))
    if hit is not None and not t.is_inference() and hit[0]() is t and hit[1] == t._version and hit[2] == t.data_ptr():
        return hit[3].get(kind)
    return None


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _storage_key(t: torch.Tensor):
    try:
        return (t.device, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return None


def _check_writable(updates: dict, named: dict, results: dict) -> list[str]:
    """Refuse, before any write, targets that cannot take the update in place or that share storage with a
    tensor the payload gives another result; returns the names to read back after writing."""
    for name in updates:
        dst = named[name]
        if dst.is_inference() and not torch.is_inference_mode_enabled():
            raise DeltaError(f"delta payload: tensor '{name}' of the target was made under torch.inference_mode() and "
                             "cannot be updated in place outside it; apply the delta inside torch.inference_mode().")
    by_storage: dict = {}
    for name in results:
        k = _storage_key(named[name])
        if k is not None:
            by_storage.setdefault(k, []).append(name)
    check = []  # a tensor alone in its storage holds exactly what was copied into it; aliases are read back
    for names in by_storage.values():
        if len(names) < 2 or not any(n in updates for n in names):
            continue
        if len({results[n] for n in names}) > 1:
            raise DeltaError(f"delta payload: tensors {', '.join(repr(n) for n in names)} of the target share storage "
                             "but the payload gives them different results; nothing was written.")
        check += names
    return check


@dataclass
class _Decoded:
    """A payload decoded against a target: the updates to write and what the checks need."""

    kind: str  # the payload's tensor digest
    named: dict  # the target's tensors by name
    updates: dict = field(default_factory=dict)  # name -> (flat positions, new bits, old bits)
    results: dict = field(default_factory=dict)  # name -> recorded result digest
    verified: set = field(default_factory=set)  # results already verified before any write (mix64)
    changed: int = 0


def _gather_bits(dst: torch.Tensor, at: np.ndarray) -> np.ndarray:
    """The target's raw bits at flat positions ``at``, gathered on its device (only those cross to the host)."""
    if dst.device.type == "cpu":
        return torch_raw(dst.detach())[at]
    return torch_raw(dst.detach().reshape(-1)[torch.from_numpy(at).to(dst.device)].cpu())


_MISSED = "is not the state the payload applies to (a step was missed or applied twice)."


def _decode_delta(target, payload: bytes, recheck: bool = False) -> _Decoded:
    r = PatchReader(payload, name="delta payload")
    named = dict(target.items() if isinstance(target, dict) else target.named_parameters())
    d = _Decoded(r.digest, named)
    for t in r.header["tensors"]:  # names, types and shapes first, in order
        name = t["name"]
        dst = named.get(name)
        if dst is None:
            raise DeltaError(f"delta payload: the target has no tensor '{name}'.")
        if not isinstance(dst, torch.Tensor):
            raise DeltaError(f"delta payload: '{name}' of the target is not a tensor.")
        if _code(dst) != t["dtype"] or list(dst.shape) != t["shape"]:
            raise DeltaError(f"delta payload: tensor '{name}' is {t['dtype']}{t['shape']} in the payload but "
                             f"{_code(dst)}{list(dst.shape)} in the target.")
        d.results[name] = r.digests(t)[1]
    tensors = r.header["tensors"]
    # each tensor's check and decoding in threads (random reads of the target's old bits wait on memory, and numpy
    # and zstd release the GIL); results are taken in order, so the first failing tensor is the one reported
    with ThreadPoolExecutor(_threads()) as ex:
        for t, upd in zip(tensors, ex.map(lambda t: _decode_tensor(r, t, named[t["name"]], d.kind, recheck), tensors)):
            if upd is not None:
                d.updates[t["name"]] = upd
                d.changed += t["changed"]
                if d.kind == "mix64":
                    d.verified.add(t["name"])
    return d


def _decode_tensor(r: PatchReader, t: dict, dst: torch.Tensor, kind: str, recheck: bool):
    """One tensor of a payload against the target: its base checked, its changed entries decoded, and (mix64) its
    result checked from them; returns (flat positions, new bits, old bits), or None when the payload leaves it
    unchanged."""
    name = t["name"]
    base, result = r.digests(t)
    known = None if recheck else _known_digest(dst, kind)
    whole = None
    if known is None:  # not verified since its last write: hashed whole, once
        whole = torch_raw(dst.detach().cpu())
        known = tensor_digest(whole, kind)
        _remember(dst, kind, known)
    if known != base:
        raise DeltaError(f"delta payload: tensor '{name}' of the target {_MISSED}")
    if not t["chunks"]:
        return None
    parts = []
    for c in t["chunks"]:
        if c["count"] < 0 or c["start"] < 0 or c["start"] + c["count"] > dst.numel():
            raise DeltaError(f"delta payload: a chunk of tensor '{name}' lies outside it.")
        at = r.chunk_positions(c) + c["start"]
        old = whole[at] if whole is not None else _gather_bits(dst, at)
        v = r.chunk_values(c, old)
        if v.size != at.size:
            raise DeltaError(f"delta payload: a chunk of tensor '{name}' has {v.size} values for {at.size} positions.")
        parts.append((at, old, v))
    at, old, new = (np.concatenate(x) for x in zip(*parts))
    # mix64: the result follows from the verified base and the changed entries, so it is checked before any write
    if kind == "mix64" and mix64_update(base, at, old, new) != result:
        raise DeltaError(f"delta payload: tensor '{name}' does not reproduce the recorded result.")
    return at, new, old


def _signed(itemsize: int):
    return {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[itemsize]


class DirectorySink:
    """Shared storage: ``step-00000012.rlspatch`` per publication (atomic) and ``manifest.json`` (the chain)."""

    def __init__(self, path: str | os.PathLike, initial_hash: str | None = None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest: dict = {"format": "rlsubnet-delta-manifest/1", "initial": initial_hash, "steps": []}

    def send(self, step: int, payload: bytes, parent: str, result: str) -> None:
        name = f"step-{step:08d}.rlspatch"
        write_bytes(self.path / name, payload)
        self.manifest["steps"].append({"step": step, "file": name, "parent": parent, "result": result, "bytes": len(payload)})
        write_text(self.path / "manifest.json", json.dumps(self.manifest, indent=1) + "\n")


MAX_MANIFEST = 64 * 1024 * 1024
MAX_STEP_FILE = 1 << 40  # a payload the manifest may announce (the size itself is checked against the file)


class ReceiveError(DeltaError):
    """A failure of :func:`receive_directory`; ``last`` is the last step applied, so ``after=last`` resumes."""

    def __init__(self, message: str, last: int):
        super().__init__(message)
        self.last = last


def _manifest_steps(path: Path) -> list[dict] | None:
    """The manifest's steps, checked; None while there is no manifest yet."""
    mp = path / "manifest.json"
    try:
        fd = os.open(mp, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DeltaError(f"{mp}: cannot be read ({e.strerror}).") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MANIFEST:
            raise DeltaError(f"{mp}: not a regular file of at most {MAX_MANIFEST} bytes.")
        text = fh.read(MAX_MANIFEST + 1)
    try:
        m = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise DeltaError(f"{mp}: not a JSON manifest.") from None
    steps = m.get("steps") if isinstance(m, dict) else None
    if not isinstance(m, dict) or m.get("format") != "rlsubnet-delta-manifest/1" or not isinstance(steps, list):
        raise DeltaError(f"{mp}: not an rlsubnet-delta-manifest/1 manifest.")
    prev = None
    for s in steps:
        ok = (isinstance(s, dict) and type(s.get("step")) is int and s["step"] >= 0 and isinstance(s.get("file"), str)
              and type(s.get("bytes")) is int and 24 <= s["bytes"] <= MAX_STEP_FILE)
        if not ok:
            raise DeltaError(f"{mp}: malformed step entry {str(s)[:80]!r}.")
        f = s["file"]
        if os.path.basename(f) != f or f in ("", ".", "..") or "\x00" in f:
            raise DeltaError(f"{mp}: step {s['step']} names {f!r}, which is not a file in the sync folder.")
        if prev is not None and s["step"] <= prev:
            raise DeltaError(f"{mp}: steps are not in increasing order ({prev} then {s['step']}).")
        prev = s["step"]
    return steps


def _read_step(path: Path, entry: dict) -> bytes | None:
    """The payload of one step, read only if it is a regular file inside the sync folder of exactly the size
    the manifest announces (None: not there yet)."""
    p = path / entry["file"]
    try:  # O_NOFOLLOW: a symbolic link (out of the folder or not) is never followed; O_NONBLOCK: a FIFO never blocks
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        why = "it is a symbolic link" if e.errno == errno.ELOOP else e.strerror
        raise DeltaError(f"{p}: refusing to read this step file ({why}).") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise DeltaError(f"{p}: not a regular file (a device, FIFO or socket); refusing to read it.")
        if st.st_size != entry["bytes"]:
            if st.st_size < entry["bytes"]:
                return None  # still arriving (a copy that is not atomic)
            raise DeltaError(f"{p}: {st.st_size} bytes, the manifest announces {entry['bytes']}.")
        data = fh.read(entry["bytes"] + 1)
    if len(data) != entry["bytes"]:
        raise DeltaError(f"{p}: changed size while being read.")
    return data


def receive_directory(path: str | os.PathLike, target, after: int = -1, until: int | None = None,
                      timeout: float = 0.0, poll: float = 0.2) -> int:
    """Apply, in order, every published step after ``after`` (up to ``until``); returns the last step applied.

    With ``timeout > 0`` it waits for new steps until ``until`` is reached or the time is up (a receiver
    loop); each file is applied only after its manifest entry appears, and a listed file that is not there
    yet (or not whole yet) is waited for within ``timeout``. Only regular files directly inside ``path`` are
    read, never more bytes than the manifest announces. A malformed manifest, a step file that is a link,
    device, FIFO or of the wrong size, or a payload that does not apply raises :class:`ReceiveError`, whose
    ``last`` says how far the receiver got (retry with ``after=e.last``).
    """
    path = Path(path)
    deadline = time.monotonic() + timeout
    last = after
    while True:
        waiting = None
        try:
            steps = _manifest_steps(path) or []
            for s in steps:
                if s["step"] <= last or (until is not None and s["step"] > until):
                    continue
                data = _read_step(path, s)
                if data is None:
                    waiting = s
                    break
                apply_delta(target, data)
                last = s["step"]
        except DeltaError as e:
            raise ReceiveError(f"{e.message} (applied through step {last}; retry with after={last})", last) from None
        if (until is not None and last >= until) or time.monotonic() >= deadline:
            if waiting is not None and not (until is not None and last >= until):
                raise ReceiveError(f"{path / waiting['file']}: listed in the manifest but not there (whole) within the "
                                   f"timeout (applied through step {last}; retry with after={last}).", last)
            return last
        time.sleep(poll)


class DistributedSink:
    """Broadcast each payload from the trainer's rank to the receivers of a ``torch.distributed`` group.

    Gloo on CPU, NCCL on GPU (the payload travels as a uint8 tensor on ``device``). Each publication is two
    broadcasts: ``[step, nbytes]`` (int64), then the bytes. :meth:`close` sends ``step = -1``.
    """

    def __init__(self, src: int = 0, group=None, device: str | torch.device = "cpu"):
        self.src, self.group, self.device = src, group, torch.device(device)

    def send(self, step: int, payload: bytes, parent: str = "", result: str = "") -> None:
        import torch.distributed as dist

        head = torch.tensor([step, len(payload)], dtype=torch.int64, device=self.device)
        dist.broadcast(head, self.src, group=self.group)
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
        dist.broadcast(data, self.src, group=self.group)

    def close(self) -> None:
        import torch.distributed as dist

        dist.broadcast(torch.tensor([-1, 0], dtype=torch.int64, device=self.device), self.src, group=self.group)


def receive_distributed(target, src: int = 0, group=None, device: str | torch.device = "cpu", on_step=None) -> int:
    """Receiver loop: apply every broadcast payload to ``target`` until the sender closes; returns the last step.

    ``on_step(step, target)`` is called after each applied step.
    """
    import torch.distributed as dist

    dev = torch.device(device)
    last = -1
    while True:
        head = torch.zeros(2, dtype=torch.int64, device=dev)
        dist.broadcast(head, src, group=group)
        step, n = int(head[0]), int(head[1])
        if step < 0:
            return last
        data = torch.empty(n, dtype=torch.uint8, device=dev)
        dist.broadcast(data, src, group=group)
        apply_delta(target, data.cpu().numpy().tobytes())
        last = step
        if on_step is not None:
            on_step(step, target)
