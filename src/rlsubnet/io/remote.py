"""Checkpoints in object storage (``s3://bucket/prefix``, ``gs://…``, ``file://…``), read by byte ranges.

Through fsspec (``pip install 'rlsubnet[s3]'``; s3fs for S3, gcsfs for GCS): credentials and the endpoint
come from the environment as the client library takes them (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL`` for an
S3-compatible server, ...). Nothing is downloaded whole and nothing is copied locally: a safetensors header is
two range requests (its 8-byte length, then the checked header), every chunk of a tensor one range request of
exactly its bytes; ``config.json`` and an index are read whole, up to 16 MiB. The rules of local folders hold:
index entries are plain names inside the prefix, and only ``.safetensors`` shards are read (a pickled ``.bin``
is never fetched).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from .checkpoint import SAFETENSORS_INDEX, Checkpoint, CheckpointIndex, merge_shards
from .errors import InputError
from .optional import need
from .safetensors_header import parse_safetensors_header

URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://")
MAX_SMALL = 16 * 1024 * 1024  # config.json, an index


def is_url(path) -> bool:
    return isinstance(path, str) and bool(URL_RE.match(path))


class _FS:
    """A filesystem made again in each process that uses it (fsspec's async clients do not survive ``fork``)."""

    def __init__(self, url: str):
        need("fsspec", what=f"{url}: reading from object storage")
        import fsspec

        protocol = url.split("://", 1)[0].lower()
        if protocol in ("s3", "s3a"):
            need("s3fs", what=f"{url}: reading from S3")
        self.protocol = protocol
        self._fs, _ = fsspec.core.url_to_fs(url)
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {"protocol": self.protocol, "_pid": -1, "_fs": None}

    @property
    def fs(self):
        if self._pid != os.getpid():
            import fsspec

            self._fs = fsspec.filesystem(self.protocol, skip_instance_cache=True)
            self._pid = os.getpid()
        return self._fs


def _join(root: str, name: str, where: str) -> str:
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or "\0" in name or "://" in name:
        raise InputError(f"{where}: index entry {name!r} is not a file name inside the checkpoint prefix.")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InputError(f"{where}: index entry {name!r} points outside the checkpoint prefix.")
    return f"{root.rstrip('/')}/{name}"


class RemoteCheckpoint(Checkpoint):
    """A checkpoint in object storage: the same index, reads by range requests."""

    fills_page_cache = False  # range requests go through the network, not this machine's page cache

    def __init__(self, index: CheckpointIndex, fs: _FS, sizes: dict[str, int]):
        super().__init__(index)
        self._remote = fs
        self._sizes = sizes

    def read(self, name: str, start: int = 0, count: int | None = None) -> np.ndarray:
        info = self.tensors[name]
        if count is None:
            count = info.numel - start
        nbytes = count * info.dtype.itemsize
        a = info.offset + start * info.dtype.itemsize
        data = self._remote.fs.cat_file(info.file, start=a, end=a + nbytes) if nbytes else b""
        if len(data) != nbytes:
            raise InputError(f"{self._url(info.file)}: object is truncated while reading tensor '{name}'.")
        return np.frombuffer(data, dtype=info.dtype.raw).copy()

    def _url(self, key: str) -> str:
        return key if "://" in key else f"{self._remote.protocol}://{key}"

    def size_of(self, file: str) -> int:
        return self._sizes[file]

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for name in sorted(self.tensors):
            t = self.tensors[name]
            h.update(f"{name}|{t.dtype.name}|{t.shape}\n".encode())
        for f in self.files:
            size = self._sizes[f]
            h.update(f"{os.path.basename(f)}|{size}\n".encode())
            for k in range(17):
                a = size * k // 17
                h.update(self._remote.fs.cat_file(f, start=a, end=min(size, a + 4096)))
        return "sha256:" + h.hexdigest()[:32]

    def close(self) -> None:
        pass

    def side_files(self, include, wanted, max_size: int) -> tuple[list, list[str]]:
        """(files to carry as objects with ``.name`` and ``.read_bytes()``, names left out) directly under the prefix."""
        f = self._remote.fs
        out, left = [], []
        weights = set(self.files)
        for entry in f.ls(self.root, detail=True):
            key = entry["name"].rstrip("/")
            n = os.path.basename(key)
            if n.startswith(".") or key in weights or n.endswith(".index.json"):
                continue
            if entry.get("type") == "file" and wanted(n) and int(entry.get("size") or 0) <= max_size:
                out.append(_Object(f, key, n))
            else:
                left.append(n + ("/" if entry.get("type") == "directory" else ""))
        return out, left


class _Object:
    def __init__(self, f, key: str, name: str):
        self._f, self._key, self.name = f, key, name

    def read_bytes(self) -> bytes:
        return self._f.cat_file(self._key)


def open_remote(url: str) -> RemoteCheckpoint:
    """Find and validate a checkpoint at an fsspec URL (a prefix holding ``model.safetensors`` or a sharded index,
    a ``.safetensors`` object, or an ``.index.json`` object)."""
    fs = _FS(url)
    f = fs.fs
    path = url.split("://", 1)[1].rstrip("/")
    try:
        if path.endswith(".safetensors") or path.endswith(".index.json"):
            root, single = path.rsplit("/", 1)[0], path
        else:
            root, single = path, None
            names = {os.path.basename(p.rstrip("/")): p for p in f.ls(root, detail=False)}
            if SAFETENSORS_INDEX in names:
                single = f"{root}/{SAFETENSORS_INDEX}"
            elif "model.safetensors" in names:
                single = f"{root}/model.safetensors"
            else:
                shards = sorted(p for n, p in names.items() if n.endswith(".safetensors"))
                if len(shards) != 1:
                    raise InputError(f"{url}: no model.safetensors or {SAFETENSORS_INDEX} under this prefix.")
                single = shards[0]
        if single.endswith(".index.json"):
            wm = _read_index(f, single, url)
            files = sorted(set(wm.values()))
            kind = "safetensors-sharded"
        else:
            wm, files, kind = None, [single], "safetensors"
        sizes = {x: int(f.size(x)) for x in files}
        shards = ((x, f"{fs.protocol}://{x}", parse_safetensors_header(f"{fs.protocol}://{x}", sizes[x],
                                                                        lambda a, b, x=x: f.cat_file(x, start=a, end=b))[0])
                  for x in files)
        tensors = merge_shards(shards, wm, url)
        config = _read_json(f, f"{root}/config.json", url, missing_ok=True)
    except FileNotFoundError:
        raise InputError(f"{url}: no such object or prefix.") from None
    except PermissionError:
        raise InputError(f"{url}: access denied (check the credentials in the environment).") from None
    except OSError as e:
        raise InputError(f"{url}: cannot read ({e.strerror or e}).") from None
    return RemoteCheckpoint(CheckpointIndex(url, root, kind, files, tensors, config if isinstance(config, dict) else None), fs, sizes)


def _read_json(f, key: str, url: str, missing_ok: bool = False):
    try:
        size = int(f.size(key))
    except FileNotFoundError:
        if missing_ok:
            return None
        raise
    if size > MAX_SMALL:
        raise InputError(f"{url}: {os.path.basename(key)} is {size} bytes, more than the {MAX_SMALL} a JSON file here may have.")
    try:
        return json.loads(f.cat_file(key).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InputError(f"{url}: {os.path.basename(key)} is not valid JSON.") from None


def _read_index(f, key: str, url: str) -> dict[str, str]:
    data = _read_json(f, key, url)
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise InputError(f"{url}: index has no weight_map.")
    root = key.rsplit("/", 1)[0]
    out = {}
    for k, v in wm.items():
        full = _join(root, v, url)
        if not full.endswith(".safetensors"):
            raise InputError(f"{url}: index entry {v!r} is not a .safetensors shard (object storage is read as safetensors only).")
        out[k] = full
    return out
