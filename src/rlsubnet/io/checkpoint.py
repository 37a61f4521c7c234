"""Finding, validating and reading checkpoints in bounded memory.

Two objects, as in mergekit's ``ShardedTensorIndex`` and its loader: a :class:`CheckpointIndex` is data
(names, dtypes, shapes, byte offsets, files, config), and a :class:`Checkpoint` is a reader over one
index (open file descriptors, ``pread``). ``.bin`` files are unpickled only with
``torch.load(weights_only=True)`` and memory-mapped where the file format allows it.

**Why the safetensors header is parsed here and not by the safetensors library.** The engine reads flat
element ranges ``[start, start+count)`` of a tensor straight into a preallocated numpy buffer with one
``os.preadv`` per chunk (no mmap, so resident memory stays at the chunk size whatever the shard size, and
forked workers share nothing but the file descriptor), and it handles bf16 as raw ``uint16`` without
torch. ``safe_open(...).get_slice`` slices along dimensions, needs a framework tensor type for bf16, and
maps the whole file. So the header (a few KB of JSON) is parsed by hand, with checks at least as strict
as the library's own: the 8-byte length and its 100 MB limit, a JSON object without duplicate keys,
known dtypes, non-negative integer shapes whose size matches the byte range, and byte ranges that are
contiguous from 0 and cover the data exactly (no gap, no overlap, no trailing bytes). Mask files, which
are small and read whole, use ``safe_open`` itself.

Nothing outside what the user named is read: index entries are plain relative names inside the
checkpoint folder, resolved through symbolic links only as far as the folder itself (or, for a Hugging
Face cache snapshot, the repository's ``blobs`` folder); every file must be a regular file (a FIFO or a
device is refused before it is opened), and a cache reference's revision must name a snapshot of that
repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from .dtypes import DTYPES, TORCH_TO_CODE
from .errors import InputError
from .guard import _inside, allowed_roots, require_regular, within_roots
from .hfcache import HF_REPO_RE, hf_cache_dir, resolve_hf_cache  # noqa: F401  (re-exported)
from .index import CheckpointIndex, TensorInfo
from .safetensors_header import MAX_HEADER, printable_key, read_safetensors_header  # noqa: F401  (re-exported)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

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


class Checkpoint:
    """A reader over one :class:`CheckpointIndex`: open file descriptors and ``pread``."""

    fills_page_cache = True  # reads of local files go through the page cache (see page_cache_policy)

    def __init__(self, index: CheckpointIndex):
        self.index = index
        self._fds: dict[str, int] = {}
        # True: every range read is dropped from the page cache once read (posix_fadvise DONTNEED), so a pair
        # larger than memory does not evict the machine's cache with bytes it will not read again
        self.drop_cache = False

    def __getstate__(self) -> dict:
        """A checkpoint travels (to a Ray worker) as its index: file descriptors are opened again where it lands."""
        d = dict(self.__dict__)
        d["_fds"] = {}
        return d

    # the index's fields, for convenience
    path = property(lambda self: self.index.path)
    root = property(lambda self: self.index.root)
    format = property(lambda self: self.index.format)
    files = property(lambda self: self.index.files)
    tensors = property(lambda self: self.index.tensors)
    config = property(lambda self: self.index.config)

    # -- reading -------------------------------------------------------------------------------------
    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # ranges are read front to back: a larger readahead
            self._fds[file] = fd
        return fd

    def read(self, name: str, start: int = 0, count: int | None = None) -> np.ndarray:
        """Raw storage bits of elements ``[start, start+count)`` of the row-major flattened tensor."""
        info = self.tensors[name]
        if count is None:
            count = info.numel - start
        raw_t = info.dtype.raw
        if info.obj is not None:
            from .bits import torch_raw

            return torch_raw(info.obj.reshape(-1)[start : start + count]).copy()
        out = np.empty(count, dtype=raw_t)
        nbytes = count * info.dtype.itemsize
        fd, off = self._fd(info.file), info.offset + start * info.dtype.itemsize
        got = os.preadv(fd, [memoryview(out).cast("B")], off)
        if got != nbytes:
            raise InputError(f"{info.file}: file is truncated while reading tensor '{name}'.")
        if self.drop_cache and hasattr(os, "posix_fadvise"):
            # the range just read and DROP_LAG bytes before it: pages read moments ago may still sit in the kernel's
            # per-CPU LRU batches, which DONTNEED skips (measured: the range alone left 90% of a file cached)
            lo = max(0, off - DROP_LAG)
            os.posix_fadvise(fd, lo, off + nbytes - lo, os.POSIX_FADV_DONTNEED)
        return out

    def size_of(self, file: str) -> int:
        """Bytes of one of the checkpoint's files."""
        return os.path.getsize(file)

    def same_bits(self, a: str, b: str, chunk: int = 1 << 20) -> bool:
        """True when stored tensors ``a`` and ``b`` have the same dtype, shape and bits."""
        ia, ib = self.tensors[a], self.tensors[b]
        if ia.dtype != ib.dtype or ia.shape != ib.shape:
            return False
        return all(np.array_equal(self.read(a, s, c), self.read(b, s, c)) for s, c in iter_chunks(ia.numel, chunk))

    def ties_head(self) -> bool:
        """Whether this model ties its output head to its input embedding, by transformers' own rule."""
        return self.index.shared_head or tie_word_embeddings(self.config)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def drop_from_cache(self) -> None:
        """Drop every file of the checkpoint from the page cache (after a pass that read it with ``drop_cache``: the
        last pages each reader read can escape the per-read drops)."""
        if not hasattr(os, "posix_fadvise"):
            return
        for f in set(self.files):
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def __enter__(self) -> Checkpoint:
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


def tie_word_embeddings(config: dict | None) -> bool:
    """``tie_word_embeddings`` as transformers reads it: the config's value, else its model type's default."""
    if not config:
        return False
    for c in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else None):
        if c and "tie_word_embeddings" in c:
            return c["tie_word_embeddings"] is True
    mt = config.get("model_type")
    if not isinstance(mt, str):
        return False
    try:
        from transformers import CONFIG_MAPPING, PretrainedConfig

        cls = CONFIG_MAPPING[mt] if mt in CONFIG_MAPPING else PretrainedConfig
        return bool(getattr(cls(), "tie_word_embeddings", False))
    except Exception:  # a config class that cannot be built without arguments: no tie assumed
        return False


def _load_bin(path: str) -> dict[str, TensorInfo]:
    import pickle
    import zipfile

    from .optional import need

    need("torch", what=f"{path}: reading a PyTorch .bin checkpoint")
    import torch

    require_regular(path)
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


def _bin_shared_head(tensors: dict[str, TensorInfo]) -> bool:
    """True when a .bin stores its head in the same storage as its embedding (torch's way of saving ties)."""
    for h in HEAD_NAMES:
        for e in EMBED_NAMES:
            if h in tensors and e in tensors:
                a, b = tensors[h].obj, tensors[e].obj
                if a.numel() and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and \
                        a.storage_offset() == b.storage_offset() and a.shape == b.shape and a.stride() == b.stride():
                    return True
    return False


# -- resolving a user's path ---------------------------------------------------------------------------
def _read_index(index_path: Path) -> dict[str, str]:
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise InputError(f"{index_path}: not a valid JSON index file.") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise InputError(f"{index_path}: index has no weight_map.")
    files: dict = {}  # each distinct file checked once (an index names a few files for thousands of tensors)
    return {k: files[v] if isinstance(v, str) and v in files else files.setdefault(v, _inside(index_path.parent, v, index_path))
            for k, v in wm.items()}


def _load_config(folder: Path) -> dict | None:
    p = folder / "config.json"
    if not p.is_file():
        return None
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
        return cfg if isinstance(cfg, dict) else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def open_checkpoint(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, storage: bool = False) -> Checkpoint:
    """Find and validate a checkpoint.

    ``path`` may be a folder holding ``model.safetensors``, a sharded ``model.safetensors.index.json``,
    ``pytorch_model.bin`` or its sharded index (or other ``*.safetensors`` files), a single
    ``.safetensors``/``.bin`` file, an index file, a Hugging Face cache reference ``org/name[@rev]``, or an
    fsspec URL (``s3://bucket/prefix``, ``gs://…``, ``file://…``: :mod:`rlsubnet.io.remote`, read by ranges).

    Quantized storage (fp8 with scales, MXFP4) is presented by value: the result is a
    :class:`rlsubnet.io.quant.ValueCheckpoint` whose tensors are the model's parameters. ``storage=True``
    gives the stored tensors as they are (codes and scales apart), which is what a patch carries.
    """
    shown = str(path)
    from .remote import is_url

    if is_url(shown):
        from .remote import open_remote

        return _by_value(open_remote(shown), storage)
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
        roots = allowed_roots(root)
        for f in files:
            if not within_roots(f, roots):
                raise InputError(f"{f}: links to a file outside the checkpoint folder {shown}; refusing to read it.")
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
        require_regular(p)

    shared_head = False

    def shards():
        nonlocal shared_head
        for f in files:
            if f.endswith(".safetensors"):
                yield f, f, read_safetensors_header(f)[0]
            else:
                ts = _load_bin(f)
                shared_head = shared_head or _bin_shared_head(ts)
                yield f, f, ts

    tensors = merge_shards(shards(), wm, shown)
    config = _load_config(root)
    return _by_value(Checkpoint(CheckpointIndex(shown, root, kind, files, tensors, config, shared_head)), storage)


def merge_shards(shards, wm: dict[str, str] | None, shown: str) -> dict[str, TensorInfo]:
    """One tensor table from ``(file, name shown, tensors)`` per shard: each tensor once, where the index says it
    lives, and every tensor the index names present."""
    tensors: dict[str, TensorInfo] = {}
    for f, label, ts in shards:
        for name, info in ts.items():
            if wm is not None and wm.get(name, f) != f:
                continue  # the index says this tensor lives in another shard
            if name in tensors:
                raise InputError(f"{label}: tensor '{name}' is stored twice in the checkpoint.")
            tensors[name] = info
    if wm is not None:
        missing = [n for n in wm if n not in tensors]
        if missing:
            raise InputError(f"{shown}: index names tensor '{missing[0]}' but its shard does not contain it.")
    if not tensors:
        raise InputError(f"{shown}: checkpoint holds no tensors.")
    return tensors


def _by_value(ck: Checkpoint, storage: bool) -> Checkpoint:
    """The checkpoint as stored (``storage``), or with quantized parameters presented by value."""
    if storage:
        return ck
    from .quant import ValueCheckpoint, detect

    specs = detect(ck)  # quantized storage is read by value; an unknown quantization is refused here
    return ValueCheckpoint(ck, specs) if specs else ck


def iter_chunks(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    """(start, count) pairs covering ``range(numel)`` in pieces of at most ``chunk``."""
    for s in range(0, numel, chunk):
        yield s, min(chunk, numel - s)


DROP_LAG = 4 << 20  # bytes behind each read that are dropped again (see Checkpoint.read)


def page_cache_policy(checkpoints, env: str | None = None) -> bool:
    """Whether to drop what is read from the page cache: ``RLSUBNET_PAGE_CACHE`` = ``keep`` | ``drop`` | ``auto``
    (default). ``auto`` drops when the local files of ``checkpoints`` together exceed half of the memory the
    kernel reports available: such a pair cannot stay cached anyway, and reading it would evict everything else."""
    mode = (env if env is not None else os.environ.get("RLSUBNET_PAGE_CACHE", "auto")).strip().lower()
    if mode not in ("keep", "drop", "auto"):
        raise InputError(f"RLSUBNET_PAGE_CACHE: {mode!r} is not keep, drop or auto.")
    if mode != "auto":
        return mode == "drop"
    total = 0
    for ck in checkpoints:
        if not getattr(ck, "fills_page_cache", False):
            continue
        for f in set(ck.files):
            try:
                total += os.path.getsize(f)
            except OSError:
                pass
    return total > available_memory() / 2


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes (a very large number where the system does not say)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62
