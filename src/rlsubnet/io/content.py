"""Content keys: a digest of what a checkpoint holds, never of its name.

Caches keyed by a path reuse stale results when the files at that path change (the study once mixed one
model's sparsities with another's accuracies). :func:`content_key` hashes the weight files and the config;
the digest of an unchanged file is remembered per process by (device, inode, size, mtime), so asking again
costs a ``stat``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_MEMO: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """blake2b of one file's bytes (remembered while the file's identity and mtime stay the same)."""
    st = os.stat(path)
    ident = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    d = _MEMO.get(ident)
    if d is None:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        d = _MEMO[ident] = h.hexdigest()
    return d


def content_key(path: str | os.PathLike) -> str:
    """A digest of a checkpoint folder's weights and config (or of one file): the same content gives the same
    key whatever its path, and any change of a weight file or the config gives another."""
    p = Path(path)
    h = hashlib.blake2b(digest_size=8)
    files = (sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")) + sorted(p.glob("*.index.json")) + [p / "config.json"]
             if p.is_dir() else [p])
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + b"\0" + file_digest(f).encode() + b"\n")
    return h.hexdigest()
