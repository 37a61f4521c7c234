"""Finding, validating and reading checkpoints in bounded memory.

A :class:`Checkpoint` is a validated table of tensors (name → :class:`TensorInfo`) over one or more files.
Safetensors files are read with ``os.pread`` into small buffers, so reading a chunk never maps or loads
more than that chunk, whatever the size of a tensor or a shard. ``.bin`` files are unpickled only with
``torch.load(weights_only=True)`` and memory-mapped where the file format allows it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .dtypes import DTYPES, TORCH_TO_CODE, DType
from .errors import InputError

MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
HF_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")

# Names under which the output head is stored, and the embeddings it is commonly tied to.
HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")
EMBED_NAMES = (
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "model.decoder.embed_tokens.weight",
    "gpt_neox.embed_in.weight",
    "tok_embeddings.weight",
    "embed_tokens.weight",
    "wte.weight",
)


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
class Checkpoint:
    """A validated checkpoint: its tensors, its config, and the tied names it holds."""

    path: str  # as the user named it
    root: Path  # the folder (or the file's folder)
    format: str
    files: list[str]
    tensors: dict[str, TensorInfo]
    config: dict | None = None
    aliases: dict[str, str] = field(default_factory=dict)  # tied name -> name it is tied to
    _fds: dict[str, int] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- reading -------------------------------------------------------------------------------------
    def _fd(self, file: str) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = os.open(file, os.O_RDONLY)
                self._fds[file] = fd
            return fd

    def read(self, name: str, start: int = 0, count: int | None = None) -> np.ndarray:
        """Raw storage bits of elements ``[start, start+count)`` of the row-major flattened tensor."""
        info = self.tensors[name]
        if count is None:
            count = info.numel - start
        raw_t = info.dtype.raw
        if info.obj is not None:
            import torch

            flat = info.obj.reshape(-1)[start : start + count]
            int_view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[info.dtype.itemsize]
            if flat.dtype == torch.bool:
                flat = flat.to(torch.uint8)
            return flat.contiguous().view(int_view).numpy().view(raw_t).copy()
        out = np.empty(count, dtype=raw_t)
        nbytes = count * info.dtype.itemsize
        got = os.preadv(self._fd(info.file), [memoryview(out).cast("B")], info.offset + start * info.dtype.itemsize)
        if got != nbytes:
            raise InputError(f"{info.file}: file is truncated while reading tensor '{name}'.")
        return out

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fingerprint(self) -> str:
        """A quick content fingerprint: the tensor table plus sampled bytes of every file.

        It reads a few KiB per file, so it is cheap for any size; two checkpoints that differ in any
        header or in the sampled bytes get different fingerprints.
        """
        h = hashlib.sha256()
        for name in sorted(self.tensors):
            t = self.tensors[name]
            h.update(f"{name}|{t.dtype.name}|{t.shape}\n".encode())
        for f in self.files:
            size = os.path.getsize(f)
            h.update(f"{os.path.basename(f)}|{size}\n".encode())
            with open(f, "rb") as fh:
                for k in range(17):
                    fh.seek(size * k // 17)
                    h.update(fh.read(4096))
        return "sha256:" + h.hexdigest()[:32]


# -- safetensors --------------------------------------------------------------------------------------
def read_safetensors_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; returns its tensors and metadata.

    Checks the header length, the JSON, every dtype name and shape, that every tensor's byte range has
    the size its shape and dtype imply, lies inside the file and overlaps no other tensor.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: not a safetensors file (shorter than its 8-byte header length).")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise InputError(f"{path}: corrupt or truncated safetensors file (header length {n} exceeds the file).")
            raw = fh.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot read file ({e.strerror}).") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InputError(f"{path}: corrupt safetensors file (its header is not valid JSON).") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors file (its header is not a JSON object).")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InputError(f"{path}: corrupt safetensors file (__metadata__ must map strings to strings).")
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    ranges = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise InputError(f"{path}: corrupt safetensors header (entry '{name}' is not an object).")
        dt = entry.get("dtype")
        if not isinstance(dt, str) or dt not in DTYPES:
            raise InputError(f"{path}: unsupported or invalid dtype {dt!r} for tensor '{name}'.")
        shape = entry.get("shape")
        offs = entry.get("data_offsets")
        if (
            not isinstance(shape, list)
            or not all(type(s) is int and 0 <= s < 2**48 for s in shape)
            or not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int for o in offs)
        ):
            raise InputError(f"{path}: corrupt safetensors header (bad shape or data_offsets for '{name}').")
        b, e = offs
        dtype = DTYPES[dt]
        if not (0 <= b <= e <= data_len):
            raise InputError(f"{path}: corrupt or truncated safetensors file (tensor '{name}' lies outside the file).")
        if e - b != prod(shape) * dtype.itemsize:
            raise InputError(
                f"{path}: corrupt safetensors header (tensor '{name}' has {e - b} bytes, its shape needs "
                f"{prod(shape) * dtype.itemsize})."
            )
        ranges.append((b, e, name))
        tensors[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + b)
    ranges = sorted(r for r in ranges if r[1] > r[0])
    for (b0, e0, n0), (b1, e1, n1) in zip(ranges, ranges[1:]):
        if b1 < e0:
            raise InputError(f"{path}: corrupt safetensors header (tensors '{n0}' and '{n1}' overlap).")
    return tensors, meta


# -- .bin ---------------------------------------------------------------------------------------------
def _load_bin(path: str) -> dict[str, TensorInfo]:
    import pickle
    import zipfile

    import torch

    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else "unsafe content"
        raise InputError(
            f"{path}: refused to unpickle (only plain tensors are loaded, with weights_only=True): {first}"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, struct.error) as e:
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__}).") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise InputError(f"{path}: not a state dict (expected a mapping from names to tensors).")
    out = {}
    for name, t in sd.items():
        code = TORCH_TO_CODE.get(str(t.dtype).removeprefix("torch."))
        if code is None:
            raise InputError(f"{path}: unsupported dtype {t.dtype} for tensor '{name}'.")
        out[name] = TensorInfo(name, DTYPES[code], tuple(t.shape), path, obj=t)
    return out


def _bin_aliases(tensors: dict[str, TensorInfo]) -> dict[str, str]:
    """Names in a .bin that share storage (same data, shape and stride) with an earlier name."""
    seen: dict[tuple, str] = {}
    aliases = {}
    for name in sorted(tensors, key=lambda n: (n in HEAD_NAMES, n)):
        t = tensors[name].obj
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


# -- resolving a user's path ---------------------------------------------------------------------------
def _inside(root: Path, rel: str, index_path: Path) -> str:
    """Join an index entry to its folder, refusing absolute paths and any escape from the folder."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel:
        raise InputError(f"{index_path}: index entry {rel!r} is not a file name inside the checkpoint folder.")
    norm = os.path.normpath(rel)
    if norm.startswith("..") or norm == ".":
        raise InputError(f"{index_path}: index entry {rel!r} points outside the checkpoint folder.")
    full = root / norm
    if not full.is_file():
        raise InputError(f"{index_path}: index entry {rel!r} names a file that does not exist.")
    return str(full)


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise InputError(f"{index_path}: not a valid JSON index file.") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise InputError(f"{index_path}: index has no weight_map.")
    return {k: _inside(index_path.parent, v, index_path) for k, v in wm.items()}


def hf_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub would choose it (offline)."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


def resolve_hf_cache(ref: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Resolve ``org/name[@revision]`` to its snapshot folder in the local cache, never downloading."""
    repo, _, rev = ref.partition("@")
    root = hf_cache_dir(cache_dir) / ("models--" + repo.replace("/", "--"))
    if not root.is_dir():
        raise InputError(f"{ref}: no such path, and not in the Hugging Face cache at {root.parent} (rlsubnet never downloads).")
    rev = rev or "main"
    ref_file = root / "refs" / rev
    snap = root / "snapshots" / (ref_file.read_text().strip() if ref_file.is_file() else rev)
    if not snap.is_dir():
        snaps = sorted((root / "snapshots").glob("*")) if (root / "snapshots").is_dir() else []
        if len(snaps) == 1 and not ref_file.is_file() and rev == "main":
            snap = snaps[0]
        else:
            raise InputError(f"{ref}: revision '{rev}' is not in the Hugging Face cache at {root}.")
    return snap


def _load_config(folder: Path) -> dict | None:
    p = folder / "config.json"
    if not p.is_file():
        return None
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
        return cfg if isinstance(cfg, dict) else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def open_checkpoint(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Checkpoint:
    """Find and validate a checkpoint.

    ``path`` may be a folder holding ``model.safetensors``, a sharded ``model.safetensors.index.json``,
    ``pytorch_model.bin`` or its sharded index (or other ``*.safetensors`` files), a single
    ``.safetensors``/``.bin`` file, an index file, or a Hugging Face cache reference ``org/name[@rev]``.
    """
    shown = str(path)
    p = Path(path).expanduser()
    if not p.exists():
        if HF_REPO_RE.match(shown) and not shown.startswith((".", "/")):
            p = resolve_hf_cache(shown, cache_dir)
        else:
            raise InputError(f"{shown}: no such file or folder.")
    files: list[str]
    if p.is_dir():
        root = p
        if (p / SAFETENSORS_INDEX).is_file():
            kind, wm = "safetensors-sharded", _read_index(p / SAFETENSORS_INDEX)
        elif (p / "model.safetensors").is_file():
            kind, wm = "safetensors", None
            files = [str(p / "model.safetensors")]
        elif (p / BIN_INDEX).is_file():
            kind, wm = "bin-sharded", _read_index(p / BIN_INDEX)
        elif (p / "pytorch_model.bin").is_file():
            kind, wm = "bin", None
            files = [str(p / "pytorch_model.bin")]
        else:
            st = sorted(str(f) for f in p.glob("*.safetensors"))
            if not st:
                raise InputError(f"{shown}: not a checkpoint folder (no model.safetensors, index, or pytorch_model.bin in it).")
            kind, wm, files = "safetensors", None, st
        if wm is not None:
            files = sorted(set(wm.values()))
    else:
        root = p.parent
        name = p.name
        if name.endswith(".index.json"):
            wm = _read_index(p)
            files = sorted(set(wm.values()))
            kind = "bin-sharded" if all(f.endswith(".bin") for f in files) else "safetensors-sharded"
        elif name.endswith(".safetensors"):
            kind, wm, files = "safetensors", None, [str(p)]
        elif name.endswith((".bin", ".pt", ".pth")):
            kind, wm, files = "bin", None, [str(p)]
        else:
            raise InputError(f"{shown}: not a checkpoint file (expected .safetensors, .bin or an index .json).")

    tensors: dict[str, TensorInfo] = {}
    aliases: dict[str, str] = {}
    for f in files:
        if f.endswith(".safetensors"):
            ts, _ = read_safetensors_header(f)
        else:
            ts = _load_bin(f)
            aliases.update(_bin_aliases(ts))
        for name, info in ts.items():
            if wm is not None and wm.get(name, f) != f:
                continue  # the index says this tensor lives in another shard
            if name in tensors:
                raise InputError(f"{f}: tensor '{name}' is stored twice in the checkpoint.")
            tensors[name] = info
    if wm is not None:
        missing = [n for n in wm if n not in tensors]
        if missing:
            raise InputError(f"{shown}: index names tensor '{missing[0]}' but its shard does not contain it.")
    if not tensors:
        raise InputError(f"{shown}: checkpoint holds no tensors.")
    config = _load_config(root)
    if config and config.get("tie_word_embeddings") is True:
        emb = next((e for e in EMBED_NAMES if e in tensors), None)
        for h in HEAD_NAMES:
            if h in tensors and emb and h not in aliases:
                aliases[h] = emb
    return Checkpoint(shown, root, kind, files, tensors, config, aliases)


def iter_chunks(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    """(start, count) pairs covering ``range(numel)`` in pieces of at most ``chunk``."""
    for s in range(0, numel, chunk):
        yield s, min(chunk, numel - s)
