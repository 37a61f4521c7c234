"""Live delta sync: publish only what changed since the last publication, in the same patch format.

``pub = DeltaPublisher(model)`` snapshots the *stored view* of the model's named parameters (the bits an
inference engine holds: bf16 by default, so fp32 master weights are published as bf16); ``pub.delta()``
returns the payload (``rlsubnet-patch/1`` bytes) of what changed since the previous call, and
``apply_delta(target, payload)`` updates a model or a state dict in place after checking every base and
result hash: a payload that fails verification raises and leaves the target's weights unchanged.

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
import time
from pathlib import Path

import numpy as np
import torch

from ..io.atomic import write_bytes, write_text
from ..io.bits import torch_raw
from ..io.dtypes import TORCH_TO_CODE
from ..io.errors import InputError
from .format import CHUNK, DeltaError, PatchReader, PatchWriter, checkpoint_hash


def _stored(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to("cpu").contiguous()


def _code(t: torch.Tensor) -> str:
    return TORCH_TO_CODE[str(t.dtype).removeprefix("torch.")]


class DeltaPublisher:
    """Snapshots a model's stored view and encodes what changed since the last snapshot."""

    def __init__(self, model: torch.nn.Module | dict, dtype: torch.dtype | None = torch.bfloat16, level: int = 3,
                 chunk: int = CHUNK, raw_values: bool = False):
        self.model = model
        self.raw_values = raw_values  # new values as they are (no xor/sub against the base): readable by iter_updates alone
        self.dtype = dtype
        self.level = level
        self.chunk = chunk
        self._snap = {n: torch_raw(_stored(t, dtype)).copy() for n, t in self._named()}
        self._shapes = {n: (tuple(t.shape), _code(_stored(t, dtype))) for n, t in self._named()}
        self.hash = checkpoint_hash([(n, c, s, hashlib.sha256(self._snap[n].data).hexdigest())
                                     for n, (s, c) in self._shapes.items()])
        self.sizes: list[dict] = []

    def _named(self):
        if isinstance(self.model, dict):
            return list(self.model.items())
        return list(self.model.named_parameters())

    def delta(self) -> bytes:
        """The payload that turns the previous snapshot into the current stored view; snapshots it."""
        buf = io.BytesIO()
        w = PatchWriter(buf, level=self.level, chunk=self.chunk, raw_values=self.raw_values)
        base_e, res_e = [], []
        new_snap = {}
        for name, p in self._named():
            cur = torch_raw(_stored(p, self.dtype))
            old = self._snap[name]
            shape, code = self._shapes[name]
            t = w.begin_tensor(name, code, shape)
            ha, hb = hashlib.sha256(old.data), hashlib.sha256(cur.data)
            for s in range(0, cur.size, self.chunk):
                w.chunk_update(t, s, old[s : s + self.chunk], cur[s : s + self.chunk])
            t["base_sha256"], t["result_sha256"] = ha.hexdigest(), hb.hexdigest()
            base_e.append((name, code, shape, t["base_sha256"]))
            res_e.append((name, code, shape, t["result_sha256"]))
            new_snap[name] = cur.copy() if t["changed"] else old
        h = w.finish(self.hash, checkpoint_hash(res_e))
        self._snap = new_snap
        self.hash = h["result"]["hash"]
        payload = buf.getvalue()
        self.sizes.append({"bytes": len(payload), "plain": h["sizes"]["plain"],
                           "changed": sum(t["changed"] for t in h["tensors"])})
        return payload


def apply_delta(target: torch.nn.Module | dict, payload: bytes) -> int:
    """Apply a payload to a model's parameters or a state dict in place; returns the entries changed.

    Everything is verified before anything is written: every tensor's base hash, every decoded result hash,
    that each target tensor can be written in place (not an inference-mode tensor), and that names sharing
    storage (tied weights) receive the same result. Only then are the tensors written, and each written
    tensor is read back and checked against its recorded result. A payload that fails (:class:`DeltaError`)
    leaves the target unchanged.
    """
    try:
        updates, changed, named, results = _decode_delta(target, payload)
    except DeltaError:
        raise
    except InputError as e:
        raise DeltaError(e.message) from None
    check = _check_writable(updates, named, results)
    with torch.no_grad():
        for name, new in updates.items():
            dst = named[name]
            src = torch.from_numpy(new.view(_signed(new.dtype.itemsize))).view(dst.dtype).reshape(dst.shape)
            dst.copy_(src.to(dst.device))
    for name in check:  # read back: what the target now holds is the recorded result
        if hashlib.sha256(torch_raw(named[name].detach().cpu()).data).hexdigest() != results[name]:
            raise DeltaError(f"delta payload: tensor '{name}' does not hold the recorded result after writing "
                             "(another tensor of the target shares its storage).")
    return changed


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
    check = list(updates)
    for names in by_storage.values():
        if len(names) < 2 or not any(n in updates for n in names):
            continue
        if len({results[n] for n in names}) > 1:
            raise DeltaError(f"delta payload: tensors {', '.join(repr(n) for n in names)} of the target share storage "
                             "but the payload gives them different results; nothing was written.")
        check += [n for n in names if n not in updates]
    return check


def _decode_delta(target, payload: bytes):
    r = PatchReader(payload, name="delta payload")
    named = dict(target.items() if isinstance(target, dict) else target.named_parameters())
    updates = {}
    results = {}
    changed = 0
    for t in r.header["tensors"]:
        name = t["name"]
        results[name] = t["result_sha256"]
        dst = named.get(name)
        if dst is None:
            raise DeltaError(f"delta payload: the target has no tensor '{name}'.")
        if not isinstance(dst, torch.Tensor):
            raise DeltaError(f"delta payload: '{name}' of the target is not a tensor.")
        if _code(dst) != t["dtype"] or list(dst.shape) != t["shape"]:
            raise DeltaError(f"delta payload: tensor '{name}' is {t['dtype']}{t['shape']} in the payload but "
                             f"{_code(dst)}{list(dst.shape)} in the target.")
        old = torch_raw(dst.detach().cpu())
        if hashlib.sha256(old.data).hexdigest() != t["base_sha256"]:
            raise DeltaError(f"delta payload: tensor '{name}' of the target is not the state the payload applies to "
                             "(a step was missed or applied twice).")
        if not t["chunks"]:
            continue
        new = old.copy()
        for c in t["chunks"]:
            s = c["start"]
            new[s : s + c["count"]] = r.apply_chunk(c, old[s : s + c["count"]])
        if hashlib.sha256(new.data).hexdigest() != t["result_sha256"]:
            raise DeltaError(f"delta payload: tensor '{name}' does not reproduce the recorded result.")
        updates[name] = new
        changed += t["changed"]
    return updates, changed, named, results


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
