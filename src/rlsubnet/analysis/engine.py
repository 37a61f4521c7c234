"""The streaming engine: runs a function over chunks of aligned tensors, in parallel worker processes.

Each job is one tensor present in several checkpoints (two for a diff, three for closeness). Workers take
whole tensors, cut them into chunks of ``chunk`` elements, read each chunk from every checkpoint with
``pread`` and call the probe function on it, so memory stays bounded by the chunk size whatever the size
of the model; only the small per-chunk results travel back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..io.checkpoint import Checkpoint, iter_chunks
from ..io.display import make_progress
from ..io.errors import InputError

DEFAULT_CHUNK = 1 << 20  # elements per chunk (2 MiB a bf16 source: fewer calls, same copy speed as smaller buffers) (a multiple of 8, so packed mask bits concatenate)


@dataclass
class Job:
    """One tensor to stream: where it lives in each checkpoint and how many leading elements to read."""

    name: str
    sources: Sequence[tuple[Checkpoint, str]]
    numel: int
    payload: Any = None  # anything the caller wants back with the results
    read: bool = True  # False: the function reads its chunks itself (it gets None for the raws)
    whole: bool = False  # True: every chunk of the job in one work unit, in order (state carried across chunks)
    chunk: int | None = None  # elements per chunk for this job (a multiple of 8; default: the map's)

    @property
    def nbytes(self) -> int:
        return sum(ck.tensors[n].dtype.itemsize for ck, n in self.sources) * self.numel


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# -- process-parallel map over whole tensors ----------------------------------------------------------
# The probes are many short numpy calls; threads contend for the GIL on them, so tensor-level work is
# spread over forked worker processes instead (each reads its own chunks with pread; only small results
# travel back). The task reaches the workers as the initializer's arguments, which ``fork`` hands over by
# copying memory (nothing is pickled); only the workers keep it, in their own copy of this module.
_WORKER_TASK: tuple | None = None  # set in worker processes only


def _worker_init(task: tuple, parent: int) -> None:
    """In each worker: die with the parent, keep freed chunk buffers in the heap, hold the task."""
    global _WORKER_TASK
    import signal

    _WORKER_TASK = task
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and shuts the pool down
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: killed when the parent dies, however it dies
        # no mmap/munmap (and page faults) per temporary array; these are our own processes
        libc.mallopt(-3, 1 << 28)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 28)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not Linux/glibc
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _run(task: tuple, i: int):
    jobs, fn, chunk, sink = task
    job = jobs[i]
    res = [fn(job, start, [ck.read(name, start, count) for ck, name in job.sources] if job.read else count)
           for start, count in iter_chunks(job.numel, job.chunk or chunk)]
    return i, (sink(job, 0, res) if sink is not None else res)


def _run_in_worker(i: int):
    return _run(_WORKER_TASK, i)  # type: ignore[arg-type]


ENGINES = ("local", "ray")


def _set_page_cache_policy(jobs: list[Job]) -> list:
    """Pairs larger than memory are read without keeping them in the page cache (see ``page_cache_policy``).
    Returns the checkpoints to drop from the cache once the map is done (none when the pair is kept)."""
    from ..io.checkpoint import page_cache_policy

    cks = list({id(ck): ck for j in jobs for ck, _ in j.sources}.values())
    drop = page_cache_policy(cks)
    readers = []
    for ck in cks:
        for c in (ck, getattr(ck, "storage", None)):  # a quantized checkpoint reads through its storage
            if c is not None and hasattr(c, "drop_cache"):
                c.drop_cache = drop
                readers.append(c)
    return readers if drop else []


def map_chunks(
    jobs: Sequence[Job],
    fn: Callable[[Job, int, list[np.ndarray]], Any],
    workers: int | None = None,
    chunk: int = DEFAULT_CHUNK,
    desc: str = "comparing",
    progress: bool = True,
    engine: str = "local",
    ray_address: str | None = None,
    sink: Callable | None = None,
) -> Iterator[tuple[Job, list]]:
    """Yield ``(job, [fn(job, start, raws) for each chunk])`` per job, jobs spread over processes.

    ``engine="local"``: ``workers`` processes (default: CPU count, never more than there are jobs) each take
    whole tensors, largest first. With one worker, or where ``fork`` is unavailable, everything runs in this
    process. ``engine="ray"``: the same work as Ray tasks on a cluster (:func:`_map_ray`). On the first error (or
    an interruption) the pending jobs are cancelled and the workers stopped. ``sink(job, start, results)``, where
    given, is called where each work unit ran (a job, or a Ray task's run of its chunks from ``start``) and its
    return value travels back instead of the results (e.g. mask bits written to a part file where they were made).
    """
    if chunk <= 0 or chunk % 8:
        raise ValueError("chunk must be a positive multiple of 8")
    if engine not in ENGINES:
        raise InputError(f"--engine: {engine!r} is not one of {', '.join(ENGINES)}.")
    if engine == "ray":
        yield from _map_ray(jobs, fn, chunk, desc, progress, ray_address, sink)
        return
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise InputError(f"--workers: {workers!r} must be a positive integer.")
    workers = min(workers or default_workers(), max(1, len(jobs)))
    dropped = _set_page_cache_policy(jobs)
    try:
        yield from _map_local(jobs, fn, workers, chunk, desc, progress, sink)
    finally:
        for ck in dropped:
            ck.drop_from_cache()


def _map_local(jobs, fn, workers: int, chunk: int, desc: str, progress: bool, sink=None):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    order = sorted(range(len(jobs)), key=lambda i: -jobs[i].nbytes)
    total = sum(j.nbytes for j in jobs)
    task = (jobs, fn, chunk, sink)
    with make_progress(progress) as bar:
        bar_task = bar.add_task(desc, total=total)
        if workers <= 1 or "fork" not in mp.get_all_start_methods():
            for i in order:
                _, res = _run(task, i)
                bar.advance(bar_task, jobs[i].nbytes)
                yield jobs[i], res
            return
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"),
                                   initializer=_worker_init, initargs=(task, os.getpid()))
        ok = False
        try:
            futs = [pool.submit(_run_in_worker, i) for i in order]
            for f in as_completed(futs):
                i, res = f.result()
                bar.advance(bar_task, jobs[i].nbytes)
                yield jobs[i], res
            ok = True
        finally:
            if not ok:  # an error, an interruption or an abandoned generator: stop now, not after the queue
                procs = list((getattr(pool, "_processes", None) or {}).values())
                pool.shutdown(wait=False, cancel_futures=True)
                for p in procs:
                    if p.is_alive():
                        p.kill()
                for p in procs:
                    p.join(timeout=10)
            pool.shutdown(wait=True, cancel_futures=True)


# -- Ray: the same map on a cluster ---------------------------------------------------------------------------
UNIT_BYTES = 64 << 20  # a Ray task reads about this many bytes (whole chunks of one tensor)


def _pieces(jobs: Sequence[Job], chunk: int) -> list[tuple[int, list[tuple[int, int]], int]]:
    """(job index, consecutive chunk ranges of that tensor, bytes read): each at most about UNIT_BYTES."""
    out = []
    for i, job in enumerate(jobs):
        itemsize = job.nbytes // job.numel if job.numel else 1  # bytes read per element, over all sources
        size = job.chunk or chunk
        per = max(1, UNIT_BYTES // (size * max(1, itemsize)))  # chunks per piece
        ranges = list(iter_chunks(job.numel, size))
        if job.whole:
            per = max(len(ranges), 1)
        for k in range(0, max(len(ranges), 1), per):
            rs = ranges[k : k + per]
            out.append((i, rs, sum(c for _, c in rs) * itemsize))
    return out


def _units(jobs: Sequence[Job], chunk: int) -> list[list[tuple[int, list[tuple[int, int]]]]]:
    """Work units, each a Ray task: pieces of tensors (consecutive chunks of one tensor) packed in order until a unit
    reads about UNIT_BYTES, so a model of many small tensors (experts) is not one task per tensor."""
    units: list[list] = []
    size = UNIT_BYTES
    for i, ranges, nbytes in _pieces(jobs, chunk):
        if not units or size + nbytes > UNIT_BYTES:
            units.append([])
            size = 0
        units[-1].append((i, ranges))
        size += nbytes
    return units


# per Ray worker process: the run's (fn, jobs), deserialized once per run rather than once per task (both hold the
# checkpoints' indexes, so a task that deserialized them again would cost O(model) and a run O(model²))
_SHARED: dict = {}


def ray_shared(refs: list):
    """Inside a Ray task: the objects behind ``refs`` (a list of object references, passed unresolved), deserialized
    once per worker process and run."""
    import ray

    key = tuple(r.hex() for r in refs)
    if key not in _SHARED:
        _SHARED.clear()  # one run at a time per worker: the previous run's objects are released
        _SHARED[key] = ray.get(list(refs))
    return _SHARED[key]


def _run_ray_unit(shared: list, pieces, sink=None):
    """One Ray task: ``shared`` holds the references of the run's ``fn`` and ``jobs`` (in a list, so Ray passes
    them unresolved and this worker deserializes them once per run)."""
    fn, jobs = ray_shared(shared)
    return _run_unit(fn, jobs, pieces, sink)


def _run_unit(fn, jobs, pieces, sink=None):
    """Every piece of a unit, each piece's results (through ``sink`` where given)."""
    out = []
    for i, ranges in pieces:
        job = jobs[i]
        res = [fn(job, start, [ck.read(name, start, count) for ck, name in job.sources] if job.read else count) for start, count in ranges]
        out.append(sink(job, ranges[0][0] if ranges else 0, res) if sink is not None else res)
    return out


def _reachable(address: str | None, timeout: float = 5.0) -> None:
    """Refuse at once an address nothing listens on (``ray.init`` would retry it for minutes)."""
    import re
    import socket

    m = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)", address or "")
    if not m:
        return  # "auto", None (a local cluster, or RAY_ADDRESS): Ray resolves and reports those itself
    try:
        with socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout):
            pass
    except OSError as e:
        raise InputError(f"--ray-address: nothing answers at {address} ({e.strerror or e}); start a cluster with "
                         "`ray start --head` or give its address.") from None


def ray_connect(address: str | None):
    """The ``ray`` module, connected to the cluster at ``address`` (default: RAY_ADDRESS, else a local one), or one
    sentence saying why not."""
    from ..io.optional import need

    need("ray", what="--engine ray")
    import ray

    if not ray.is_initialized():
        _reachable(address)
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False,
                     logging_level="ERROR", configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise InputError(f"--ray-address: cannot connect to a Ray cluster at {address or 'the local default'} ({str(e).splitlines()[0][:160]}).") from None
    return ray


def ray_failure(e: Exception, names: str, doing: str) -> InputError:
    """One sentence for a Ray task that failed after its retries: the task's own InputError as it was, else what
    failed, naming the tensors."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, InputError):
        return InputError(cause.message)
    return InputError(f"{names}: the Ray task {doing} failed after its retries "
                      f"({type(cause or e).__name__}: {str(cause or e).splitlines()[0][:160]}).")


def _map_ray(jobs, fn, chunk, desc, progress, address, sink=None):
    """Units of chunks as Ray tasks that read their own byte ranges where they run (checkpoints travel as their
    index, never as data; local paths must be visible to every node, object storage always is). Results come back
    small (counts, histograms, packed mask bits) and are merged in chunk order, so the answer is the local
    engine's to the last count. A task that fails is retried by Ray (3 times); a failure that persists ends the
    run with one sentence naming the tensor."""
    ray = ray_connect(address)
    remote = ray.remote(max_retries=3, retry_exceptions=[OSError])(_run_ray_unit)
    shared = [ray.put(fn), ray.put(list(jobs))]
    units = _units(jobs, chunk)
    left: dict[int, int] = {}  # pieces per job
    for unit in units:
        for i, _ in unit:
            left[i] = left.get(i, 0) + 1
    parts: dict[int, dict[int, list]] = {}
    refs = {remote.remote(shared, unit, sink): u for u, unit in enumerate(units)}
    total = sum(j.nbytes for j in jobs)
    ok = False
    try:
        with make_progress(progress) as bar:
            task = bar.add_task(desc + " (ray)", total=total)
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ref = done[0]
                u = refs[ref]
                try:
                    got = ray.get(ref)
                except ray.exceptions.RayError as e:
                    names = ", ".join(dict.fromkeys(jobs[i].name for i, _ in units[u]))
                    raise ray_failure(e, names, "reading " + ("this tensor" if len(units[u]) == 1 else "these tensors")) from None
                for (i, ranges), res in zip(units[u], got):
                    parts.setdefault(i, {})[ranges[0][0] if ranges else 0] = res
                    bar.advance(task, jobs[i].nbytes / left[i] if left[i] else 0)
                    if len(parts[i]) == left[i]:
                        yield jobs[i], [r for kk in sorted(parts[i]) for r in parts[i][kk]]
                        del parts[i]
        ok = True
    finally:
        if not ok:
            for r in refs:
                ray.cancel(r, force=True)

