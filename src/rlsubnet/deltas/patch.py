"""Create, apply, verify and describe ``rlsubnet-patch/1`` files for checkpoints on disk.

Everything streams chunk by chunk (``CHUNK`` elements), so memory stays bounded whatever the model size:
``create`` reads both checkpoints once; ``apply`` reads the base once, decodes each patch's chunk in turn
(a chain is applied chunk by chunk, never materialising an intermediate checkpoint) and writes a folder in
the base's layout (same shards, same headers, same index) with the tuned checkpoint's non-tensor files,
checking every tensor's hash on the way in (the base the patch expects) and on the way out (the result
the patch records). Outputs are written atomically: a wrong base, a corrupt patch or a chain out of order
is one sentence, exit 2, and nothing is written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import Progress

from ..io.atomic import atomic_dir, atomic_path
from ..io.checkpoint import BIN_INDEX, SAFETENSORS_INDEX, Checkpoint, iter_chunks, open_checkpoint
from ..io.errors import InputError
from .format import (
    CHUNK,
    MAX_SIDE_FILE,
    Encoder,
    PatchReader,
    PatchWriter,
    TensorHasher,
    carried_name_problem,
    checkpoint_hash,
    encode_chunk,
)

# what a checkpoint needs beside its weights: carried by default; anything else only when asked for by name
CARRIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
           "added_tokens.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt",
           "merges.txt", "chat_template.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json")


def side_files(ck: Checkpoint, include: tuple[str, ...] = ()) -> tuple[list[Path], list[str]]:
    """(files a patch carries, names it leaves out) of the tuned checkpoint's non-tensor files.

    Carried: the files a checkpoint needs to load and chat (config, generation config, tokenizer, chat
    template: :data:`CARRIED`, and ``*.jinja`` templates) plus the names in ``include``; regular files directly
    in the checkpoint folder (or Hugging Face cache snapshot), up to 64 MB. Everything else in the folder
    (notes, logs, optimizer state, subfolders) is listed as left out, never shipped silently. None when the
    checkpoint was named as a single weight file.
    """
    from ..io.checkpoint import allowed_roots, within_roots
    from ..io.remote import RemoteCheckpoint

    if isinstance(ck, RemoteCheckpoint):
        return ck.side_files(include, lambda n: (n in CARRIED or n.endswith(".jinja") or n in include) and carried_name_problem(n) is None,
                             MAX_SIDE_FILE)
    named = Path(ck.path)
    if named.exists() and not named.is_dir():  # a single weight file: its folder is not the checkpoint
        return [], []
    weights = {os.path.realpath(f) for f in ck.files}
    roots = allowed_roots(Path(ck.root))  # symbolic links only inside the folder (or a cache snapshot's blobs)
    out, left = [], []
    for p in sorted(Path(ck.root).iterdir()):
        n = p.name
        if n.startswith(".") or n in (SAFETENSORS_INDEX, BIN_INDEX) or os.path.realpath(p) in weights:
            continue
        wanted = n in CARRIED or n.endswith(".jinja") or n in include
        if (wanted and carried_name_problem(n) is None and p.is_file() and within_roots(str(p), roots)
                and p.stat().st_size <= MAX_SIDE_FILE):
            out.append(p)
        else:
            left.append(n + ("/" if p.is_dir() else ""))
    return out, left


class HashThread:
    """sha256 of chunks in a second thread (hashlib releases the GIL on large buffers), in submission order.

    At most two chunks wait, so memory stays bounded.
    """

    def __enter__(self) -> HashThread:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1)
        self._pending: list = []
        return self

    @staticmethod
    def _run(items) -> None:
        for h, a in items:
            h.update(a.data)

    def update(self, *items) -> None:
        self._pending.append(self._pool.submit(self._run, items))
        while len(self._pending) > 2:
            self._pending.pop(0).result()

    def wait(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class PatchStats:
    """What ``create`` wrote: the size breakdown and the ratios the command prints."""

    path: str
    tensors: int
    numel: int
    changed: int
    positions: int
    values: int
    files: int
    header: int
    total: int
    plain: int
    tuned_checkpoint: int
    elapsed_s: float
    files_carried: list[str] = field(default_factory=list)
    files_left_out: list[str] = field(default_factory=list)  # non-tensor files of TUNED the patch does not carry

    @property
    def ratio_full(self) -> float:
        return self.tuned_checkpoint / self.total if self.total else float("nan")

    @property
    def ratio_plain(self) -> float:
        return self.plain / self.total if self.total else float("nan")


def _bar(progress: bool) -> Progress:
    from ..io.display import make_progress

    return make_progress(progress)


def create(base: str | os.PathLike, tuned: str | os.PathLike, out: str | os.PathLike, level: int = 3,
           cache_dir: str | None = None, progress: bool = False, chunk: int = CHUNK,
           include: tuple[str, ...] = (), workers: int | None = 1, engine: str = "local",
           ray_address: str | None = None) -> PatchStats:
    """Write the patch that turns ``base`` into ``tuned`` (same tensor names, dtypes and shapes).

    The tuned folder's config, generation config, tokenizer and chat template travel with it, plus the
    files named in ``include``; every other file there is listed in ``PatchStats.files_left_out``.

    ``workers`` > 1 (or None: the CPU count) encodes tensors in worker processes, ``engine="ray"`` as Ray tasks
    (one task per tensor, reading its own ranges where it runs); chunks are encoded and hashed where they are
    read and written here in the sequential order, so the file is byte-for-byte the one ``workers=1`` writes.
    """
    for n in include:
        why = carried_name_problem(n)
        if why is not None:
            raise InputError(f"--include: {n!r} cannot be carried by a patch ({why}).")
    t0 = time.perf_counter()
    with open_checkpoint(base, cache_dir, storage=True) as cb, open_checkpoint(tuned, cache_dir, storage=True) as ct:
        src, omitted = _sources(cb, ct, base, tuned)
        base_entries, result_entries = [], []
        numel = changed = 0
        with atomic_path(out) as tmp, open(tmp, "wb") as fh, _bar(progress) as bar, HashThread() as hashing:
            w = PatchWriter(fh, level=level, chunk=chunk)
            order = sorted(cb.tensors, key=lambda n: (cb.tensors[n].file, cb.tensors[n].offset))
            if engine == "local" and workers == 1:
                encoded = None
            else:
                encoded = _encoded_tensors(cb, ct, src, order, level, chunk, workers, engine, ray_address, progress)
            task = bar.add_task("patch", total=sum(t.nbytes for t in cb.tensors.values()) if encoded is None else 0)
            for name in order:
                info = cb.tensors[name]
                t = w.begin_tensor(name, info.dtype.name, info.shape)
                if encoded is not None:  # encoded and hashed elsewhere, written here in order
                    chunks, (da, db) = next(encoded)
                    for e in chunks:
                        changed += w.add_encoded(t, e)
                    t["base_sha256"], t["result_sha256"] = da, db
                else:
                    ha, hb = hashlib.sha256(), hashlib.sha256()
                    for s, c in iter_chunks(info.numel, chunk):
                        old, new = cb.read(name, s, c), ct.read(src[name], s, c)
                        hashing.update((ha, old), (hb, new))
                        changed += w.chunk_update(t, s, old, new)
                        bar.advance(task, c * info.dtype.itemsize)
                    hashing.wait()
                    t["base_sha256"], t["result_sha256"] = ha.hexdigest(), hb.hexdigest()
                base_entries.append((name, info.dtype.name, tuple(info.shape), t["base_sha256"]))
                result_entries.append((name, info.dtype.name, tuple(info.shape), t["result_sha256"]))
                numel += info.numel
            carried, left_out = side_files(ct, tuple(include))
            missing = [n for n in include if n not in {f.name for f in carried}]
            if missing:
                raise InputError(f"{tuned}: --include {missing[0]!r} is not a regular file of at most {MAX_SIDE_FILE} bytes in the checkpoint folder.")
            for f in carried:
                w.add_file(f.name, f.read_bytes())
            tuned_bytes = sum(ct.size_of(f) for f in ct.files)
            h = w.finish(checkpoint_hash(base_entries), checkpoint_hash(result_entries),
                         source={"base": str(base), "tuned": str(tuned)}, tuned_checkpoint_bytes=tuned_bytes,
                         omitted=omitted, files_left_out=left_out)
    s = h["sizes"]
    return PatchStats(str(out), len(h["tensors"]), numel, changed, s["positions"], s["values"], s["files"], s["header"],
                      s["total"], s["plain"], tuned_bytes, time.perf_counter() - t0, [f.name for f in carried], left_out)


_HASHES: dict[str, tuple] = {}  # per worker process: the running sha256 of the tensor it is encoding
_ENCODERS: dict[int, Encoder] = {}


def _encode_piece(level: int, job, start: int, raws) -> tuple:
    """One chunk of a tensor, in a worker: its encoded change, and both tensor hashes once its last chunk is read
    (a job's chunks arrive in order in one process: ``Job.whole``)."""
    old, new = raws
    if start == 0:
        _HASHES[job.name] = (hashlib.sha256(), hashlib.sha256())
    ha, hb = _HASHES[job.name]
    ha.update(old.data)
    hb.update(new.data)
    enc = _ENCODERS.get(level)
    if enc is None:
        enc = _ENCODERS[level] = Encoder(level)
    e = encode_chunk(enc, start, old, new)
    if start + old.size >= job.numel:
        del _HASHES[job.name]
        return e, (ha.hexdigest(), hb.hexdigest())
    return e, None


def _encoded_tensors(cb, ct, src, order, level, chunk, workers, engine, ray_address, progress):
    """``(encoded chunks, (base sha256, result sha256))`` per tensor, in ``order``, computed by the engine's workers
    and re-ordered here (a tensor finished early waits, encoded, for its turn)."""
    import functools

    from ..analysis.engine import Job, map_chunks

    jobs = [Job(n, [(cb, n), (ct, src[n])], cb.tensors[n].numel, whole=True) for n in order]
    empty = hashlib.sha256(b"").hexdigest()
    ready: dict[str, tuple] = {}
    it = map_chunks(jobs, functools.partial(_encode_piece, level), workers=workers, chunk=chunk, desc="patch",
                    progress=progress, engine=engine, ray_address=ray_address)
    for name in order:
        while name not in ready:
            job, res = next(it)
            hashes = next((h for _, h in res if h is not None), (empty, empty))
            ready[job.name] = ([e for e, _ in res if e is not None], hashes)
        yield ready.pop(name)


def _sources(cb: Checkpoint, ct: Checkpoint, base, tuned) -> tuple[dict[str, str], list[dict]]:
    """For every base tensor, the tuned tensor that holds its new value; and tuned tensors left out.

    Same names, dtypes and shapes are required, with one exception that transformers itself creates: a
    tied output head stored on one side only. A head stored by TUNED alone that is bit-identical to
    TUNED's embedding (while BASE ties and stores none) is omitted (the result loads to the same model); a
    head stored by BASE alone takes its new value from TUNED's embedding when TUNED ties them.
    """
    from ..io.align import embedding_name
    from ..io.checkpoint import HEAD_NAMES

    src: dict[str, str] = {}
    omitted: list[dict] = []
    emb_b = embedding_name(ct)
    for name, ta in cb.tensors.items():
        if name not in ct.tensors and name in HEAD_NAMES and emb_b and ct.ties_head():
            src[name] = emb_b
        elif name not in ct.tensors:
            raise InputError(f"{base}: tensor '{name}' is not in {tuned}; a patch carries updates of the same tensors only.")
        else:
            src[name] = name
        tb = ct.tensors[src[name]]
        if ta.dtype != tb.dtype or ta.shape != tb.shape:
            raise InputError(f"{tuned}: tensor '{src[name]}' is {tb.dtype.name}{list(tb.shape)} but {ta.dtype.name}{list(ta.shape)} "
                             f"in {base}; a patch carries same-layout updates only.")
    for name in ct.tensors:
        if name in cb.tensors or name in src.values():
            continue
        if name in HEAD_NAMES and emb_b and cb.ties_head() and ct.same_bits(name, emb_b):
            omitted.append({"name": name, "reason": f"a tied copy of {emb_b} (identical bits) that the base does not store"})
            continue
        raise InputError(f"{tuned}: tensor '{name}' is not in {base}; a patch carries updates of the same tensors only.")
    return src, omitted


def open_chain(patches: list[str | os.PathLike]) -> list[PatchReader]:
    """Open and validate patches; each must apply to the result of the one before it."""
    if not patches:
        raise InputError("patch: give at least one patch file.")
    readers: list[PatchReader] = []
    try:
        for p in patches:
            readers.append(PatchReader(p))
        for a, b in zip(readers, readers[1:]):
            if b.header["parent"] != a.header["result"]["hash"]:
                raise InputError(f"{b.name}: chain out of order: it applies to {b.header['parent'][:23]}..., but {a.name} "
                                 f"produces {a.header['result']['hash'][:23]}... .")
            if b.header["chunk"] != a.header["chunk"]:
                raise InputError(f"{b.name}: its chunk size {b.header['chunk']} differs from {a.name}'s; they cannot be chained.")
    except BaseException:
        for r in readers:
            r.close()
        raise
    return readers


def _stream(cb: Checkpoint, readers: list[PatchReader], sink, progress: bool) -> tuple[int, list[str], str]:
    """Apply a chain tensor by tensor in the base's file order; ``sink(file, tensor, bits)`` receives output.

    Returns (changed entries in the last result vs base, names whose result hash did not match, the checkpoint
    hash of the result as computed from the bytes produced).
    """
    tables = [{t["name"]: t for t in r.header["tensors"]} for r in readers]
    for n in cb.tensors:
        for r, tb in zip(readers, tables):
            if n not in tb:
                raise InputError(f"{r.name}: does not cover tensor '{n}' of {cb.path}; it was made from another base.")
    for r, tb in zip(readers, tables):
        extra = [n for n in tb if n not in cb.tensors]
        if extra:
            raise InputError(f"{cb.path}: has no tensor '{extra[0]}', which {r.name} expects; it is not this patch's base.")
    computed: list[tuple[str, str, tuple, str]] = []
    chunk = readers[0].header["chunk"]
    bad: list[str] = []
    changed = 0
    with _bar(progress) as bar, HashThread() as hashing:
        task = bar.add_task("apply", total=sum(t.nbytes for t in cb.tensors.values()))
        for name in sorted(cb.tensors, key=lambda n: (cb.tensors[n].file, cb.tensors[n].offset)):
            info = cb.tensors[name]
            ts = [tb[name] for tb in tables]
            if ts[0]["dtype"] != info.dtype.name or tuple(ts[0]["shape"]) != tuple(info.shape):
                raise InputError(f"{cb.path}: tensor '{name}' is {info.dtype.name}{list(info.shape)}, the patch expects "
                                 f"{ts[0]['dtype']}{ts[0]['shape']}; it is not this patch's base.")
            # the base in the first patch's digest, each result in its patch's (a chain shares one kind: its hashes link)
            w = info.dtype.itemsize
            hashes = [TensorHasher(readers[0].digest, w)] + [TensorHasher(r.digest, w) for r in readers]
            cursors = [{c["start"]: c for c in t["chunks"]} for t in ts]
            for s, c in iter_chunks(info.numel, chunk):
                bits = cb.read(name, s, c)
                first = bits
                stages = [(hashes[0], bits)]
                for i, (r, cur) in enumerate(zip(readers, cursors)):
                    ch = cur.get(s)
                    if ch is not None:
                        bits = r.apply_chunk(ch, bits)
                    stages.append((hashes[i + 1], bits))
                hashing.update(*stages)
                changed += int(np.count_nonzero(first != bits))
                sink(info, bits)
                bar.advance(task, c * info.dtype.itemsize)
            hashing.wait()
            if hashes[0].hexdigest() != readers[0].digests(ts[0])[0]:
                raise InputError(f"{cb.path}: tensor '{name}' differs from the base {readers[0].name} expects; "
                                 "it is not this patch's base.")
            for i, t in enumerate(ts):
                if hashes[i + 1].hexdigest() != readers[i].digests(t)[1]:
                    bad.append(f"{readers[i].name}: {name}")
            computed.append((name, info.dtype.name, tuple(info.shape), hashes[-1].hexdigest()))
    return changed, bad, checkpoint_hash(computed, readers[-1].digest)


def apply(base: str | os.PathLike, patches: list[str | os.PathLike], out: str | os.PathLike,
          cache_dir: str | None = None, progress: bool = False) -> dict:
    """Apply ``patches`` (a chain) to ``base`` and write the result as a folder in the base's layout."""
    readers = open_chain(patches)
    try:
        with open_checkpoint(base, cache_dir, storage=True) as cb:
            if not cb.format.startswith("safetensors"):
                raise InputError(f"{base}: patches are applied to safetensors checkpoints (this one is {cb.format}).")
            with atomic_dir(out, guard="-o") as tmp:
                handles: dict[str, object] = {}
                root = Path(cb.root)

                def sink(info, bits):
                    fh = handles.get(info.file)
                    if fh is None:
                        dest = tmp / os.path.relpath(info.file, root)
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        fh = open(dest, "wb")
                        with open(info.file, "rb") as src:  # the base's header, byte for byte
                            (n,) = struct.unpack("<Q", src.read(8))
                            src.seek(0)
                            fh.write(src.read(8 + n))
                        handles[info.file] = fh
                    fh.write(bits.tobytes())

                try:
                    changed, bad, result = _stream(cb, readers, sink, progress)
                finally:
                    for fh in handles.values():
                        fh.close()
                if bad:
                    raise InputError(f"{bad[0].split(': ')[0]}: applying it does not reproduce the recorded result "
                                     f"(tensor '{bad[0].split(': ', 1)[1]}'); nothing was written.")
                for f in cb.files:  # files with no tensors in them: copy as they are
                    dest = tmp / os.path.relpath(f, root)
                    if not dest.exists():
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(f, dest)
                for idx in (SAFETENSORS_INDEX,):
                    if (root / idx).is_file():
                        shutil.copyfile(root / idx, tmp / idx)
                last = readers[-1]
                for f in last.header["files"]:  # names checked by the reader: never a weight file, index or marker
                    (tmp / f["name"]).write_bytes(last.file_data(f))
                from ..io.guard import write_marker

                write_marker(tmp, "patch apply", base=str(base), patches=[str(p) for p in patches])
    finally:
        for r in readers:
            r.close()
    return {"out": str(out), "changed": changed, "result": result}


def verify(base: str | os.PathLike, patches: list[str | os.PathLike], cache_dir: str | None = None,
           progress: bool = False) -> dict:
    """Would applying ``patches`` to ``base`` reproduce the recorded result? Nothing is written."""
    readers = open_chain(patches)
    try:
        with open_checkpoint(base, cache_dir, storage=True) as cb:
            changed, bad, result = _stream(cb, readers, lambda info, bits: None, progress)
        for f in readers[-1].header["files"]:  # the carried files, too, must be what the patch recorded
            try:
                readers[-1].file_data(f)
            except InputError:
                bad.append(f"{readers[-1].name}: file {f['name']}")
    finally:
        for r in readers:
            r.close()
    return {"ok": not bad, "changed": changed, "mismatched": bad, "result": result}


def info(patch: str | os.PathLike) -> dict:
    """The patch's header summary: hashes, tensors, sizes and the encodings chosen."""
    with PatchReader(patch) as r:
        h = r.header
        enc_p: dict[str, int] = {}
        enc_v: dict[str, int] = {}
        changed = numel = 0
        for t in h["tensors"]:
            changed += t["changed"]
            numel += int(np.prod(t["shape"])) if t["shape"] else 1
            for c in t["chunks"]:
                k = c["positions"]["enc"] if c["positions"] else "all"
                enc_p[k] = enc_p.get(k, 0) + 1
                v = c["values"]["enc"] + ("+planes" if c["values"]["planes"] else "")
                enc_v[v] = enc_v.get(v, 0) + 1
        return {"path": str(patch), "format": h["format"], "digest": r.digest, "parent": h["parent"], "result": h["result"]["hash"],
                "chunk": h["chunk"], "tensors": len(h["tensors"]), "numel": numel, "changed": changed,
                "files": [f["name"] for f in h["files"]], "sizes": {**h["sizes"], "total": r.size},
                "files_left_out": [f for f in h.get("files_left_out", []) if isinstance(f, str)],
                "tuned_checkpoint_bytes": h.get("tuned_checkpoint_bytes") if type(h.get("tuned_checkpoint_bytes")) is int else None,
                "encodings": {"positions": enc_p, "values": enc_v},
                "source": h.get("source") if isinstance(h.get("source"), dict) else None}
