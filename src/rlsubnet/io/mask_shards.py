"""Sharded masks (the on-disk format; :mod:`rlsubnet.masks` reads them): a mask too large for one process,
written as parts by the workers that computed them.

A sharded mask is a folder: ``index.json`` and part files ``part-J-S.safetensors``, each holding one tensor
``bits`` (packed uint8, little bit order) with a run of consecutive bytes of one parameter's packed mask. The
index says, per parameter, which parts hold which bytes::

    {"format": "rlsubnet-mask/1", "layout": "sharded", "metadata": {...}, "shapes": {name: [dims]},
     "parts": {name: [{"file": "part-....safetensors", "start": byte, "nbytes": n, "count": set bits}, ...]}}

With ``diff(..., mask_dir=...)`` (``rlsubnet mask --sharded``) every work unit — a local worker process's
tensor, or a Ray task's run of chunks — writes its own part where it runs and sends back only its descriptor,
so the mask's bits never travel to or sit in the driver. ``Subnetwork.load`` opens such a folder like a mask
file and reads a parameter's parts on first use; the index is checked before anything else is read: parts are
plain file names inside the folder, each parameter's parts cover its bytes exactly once, in order.
"""

from __future__ import annotations

import json
import os
from math import prod
from pathlib import Path

import numpy as np

from .errors import InputError

FORMAT = "rlsubnet-mask/1"  # the mask format, file or sharded folder (rlsubnet.masks.subnetwork documents the file)
INDEX = "index.json"
MAX_INDEX_BYTES = 256 << 20  # an index far larger than any model's would need is refused before it is parsed


class PartSink:
    """Called in a worker with one unit's results ``[(stats, packed bits), ...]`` (consecutive chunks of one
    tensor): writes the unit's bits as one part file into ``folder`` and returns the results with the bits
    replaced by the part's descriptor (on the first chunk) and None (on the others)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = str(folder)

    def __call__(self, job, start: int, results: list) -> list:
        import hashlib

        from safetensors.numpy import save_file

        if getattr(job.payload, "buffer", False):  # buffers are not parameters: no part
            return [(st, None) for st, _ in results]
        bits = [b for _, b in results if b is not None]
        if not bits:
            return results
        data = np.concatenate(bits) if len(bits) > 1 else bits[0]
        name = f"part-{hashlib.sha256(job.name.encode()).hexdigest()[:16]}-{start // 8:014d}.safetensors"
        tmp = os.path.join(self.folder, "." + name + f".{os.getpid()}.tmp")
        save_file({"bits": np.ascontiguousarray(data)}, tmp)
        os.replace(tmp, os.path.join(self.folder, name))  # a retried task writes the same part again, whole
        part = {"file": name, "start": start // 8, "nbytes": int(data.size),
                "count": int(np.bitwise_count(data).sum()) if data.size else 0}
        return [(st, part if k == 0 else None) for k, (st, _) in enumerate(results)]


def write_index(folder: str | os.PathLike, shapes: dict[str, tuple], parts: dict[str, list[dict]], meta: dict) -> None:
    index = {"format": FORMAT, "layout": "sharded", "metadata": {k: str(v) for k, v in meta.items()},
             "shapes": {n: list(s) for n, s in shapes.items()},
             "parts": {n: sorted(parts.get(n, []), key=lambda p: p["start"]) for n in shapes}}
    Path(folder, INDEX).write_text(json.dumps(index, indent=None), encoding="utf-8")


def read_index(folder: str) -> tuple[dict, dict, dict]:
    """(shapes, parts, metadata) of a sharded mask folder, every claim checked against the files."""
    p = os.path.join(folder, INDEX)
    if not os.path.isfile(p):
        raise InputError(f"{folder}: a folder, but not a sharded mask (no {INDEX}).")
    if os.path.getsize(p) > MAX_INDEX_BYTES:
        raise InputError(f"{p}: the mask index is larger than {MAX_INDEX_BYTES >> 20} MiB; refused.")
    try:
        index = json.loads(Path(p).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise InputError(f"{p}: the mask index is not valid JSON.") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("layout") != "sharded":
        raise InputError(f"{p}: not an rlsubnet sharded mask index (format {FORMAT}, layout sharded).")
    shapes, parts, meta = index.get("shapes"), index.get("parts"), index.get("metadata", {})
    if not (isinstance(shapes, dict) and isinstance(parts, dict) and isinstance(meta, dict)) or set(parts) != set(shapes):
        raise InputError(f"{p}: corrupt mask index (shapes and parts must name the same parameters).")
    sizes: dict[str, int] = {}
    for name, shape in shapes.items():
        if not (isinstance(shape, list) and all(type(x) is int and 0 <= x < 2**48 for x in shape)):
            raise InputError(f"{p}: corrupt mask index (the shape of '{name}' is not a list of non-negative integers).")
        need, at = (prod(shape) + 7) // 8, 0
        lst = parts[name]
        if not isinstance(lst, list):
            raise InputError(f"{p}: corrupt mask index (the parts of '{name}' are not a list).")
        for part in lst:
            ok = isinstance(part, dict) and all(type(part.get(k)) is int and part[k] >= 0 for k in ("start", "nbytes", "count"))
            f = part.get("file") if isinstance(part, dict) else None
            if not ok or not isinstance(f, str) or not f or f != os.path.basename(f) or f.startswith(".") or f == INDEX:
                raise InputError(f"{p}: corrupt mask index (a part of '{name}' is not {{file, start, nbytes, count}} with a plain file name).")
            if part["start"] != at:
                raise InputError(f"{p}: corrupt mask index (the parts of '{name}' do not cover its bytes once, in order, at byte {at}).")
            at += part["nbytes"]
            sizes[f] = sizes.get(f, 0) + part["nbytes"]
        if at != need:
            raise InputError(f"{p}: corrupt mask index (the parts of '{name}' hold {at} bytes; its shape needs {need}).")
    for f in sizes:
        fp = os.path.join(folder, f)
        if os.path.islink(fp) or not os.path.isfile(fp):
            raise InputError(f"{fp}: a part the mask index names is missing or not a regular file.")
    return {k: tuple(v) for k, v in shapes.items()}, parts, meta


def read_parts(folder: str, name: str, parts: list[dict], numel: int) -> np.ndarray:
    """A parameter's packed bits from its parts, each checked to hold what the index says."""
    from safetensors import SafetensorError, safe_open

    out = np.empty((numel + 7) // 8, np.uint8)
    for part in parts:
        fp = os.path.join(folder, part["file"])
        try:
            with safe_open(fp, framework="numpy") as f:
                sl = f.get_slice("bits")
                if sl.get_dtype() not in ("U8", "uint8") or tuple(sl.get_shape()) != (part["nbytes"],):
                    raise InputError(f"{fp}: mask part holds {sl.get_dtype()}{list(sl.get_shape())}, not the {part['nbytes']} bytes "
                                     f"the index gives '{name}'.")
                b = f.get_tensor("bits")
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"{fp}: not a valid mask part ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}).") from None
        out[part["start"] : part["start"] + part["nbytes"]] = b
    return out
