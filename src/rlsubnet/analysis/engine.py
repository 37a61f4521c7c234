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
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from ..io.checkpoint import Checkpoint, iter_chunks

DEFAULT_CHUNK = 1 << 18  # elements per chunk (cache-sized buffers) (a multiple of 8, so packed mask bits concatenate)


@dataclass
class Job:
    """One tensor to stream: where it lives in each checkpoint and how many leading elements to read."""

    name: str
    sources: Sequence[tuple[Checkpoint, str]]
    numel: int
    payload: Any = None  # anything the caller wants back with the results

    @property
    def nbytes(self) -> int:
        return sum(ck.tensors[n].dtype.itemsize for ck, n in self.sources) * self.numel


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def make_progress(enabled: bool = True) -> Progress:
    """A rich progress bar on stderr that measures bytes read."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=True,
    )


# -- process-parallel map over whole tensors ----------------------------------------------------------
# The probes are many short numpy calls; threads contend for the GIL on them, so tensor-level work is
# spread over forked worker processes instead (each reads its own chunks with pread; only small results
# travel back). ``_TASK`` is set in the parent right before forking and inherited by the workers.
_TASK: tuple | None = None


def _tune_malloc() -> None:
    """Keep freed chunk buffers in the heap (no mmap/munmap and page faults per temporary array)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 28)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 28)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def _run_task(i: int):
    jobs, fn, chunk = _TASK  # type: ignore[misc]
    job = jobs[i]
    return i, [fn(job, start, [ck.read(name, start, count) for ck, name in job.sources]) for start, count in iter_chunks(job.numel, chunk)]


def map_chunks(
    jobs: Sequence[Job],
    fn: Callable[[Job, int, list[np.ndarray]], Any],
    workers: int | None = None,
    chunk: int = DEFAULT_CHUNK,
    desc: str = "comparing",
    progress: bool = True,
) -> Iterator[tuple[Job, list]]:
    """Yield ``(job, [fn(job, start, raws) for each chunk])`` per job, jobs spread over processes.

    ``workers`` processes (default: CPU count) each take whole tensors, largest first. With one worker,
    or where ``fork`` is unavailable, everything runs in this process.
    """
    global _TASK
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if chunk <= 0 or chunk % 8:
        raise ValueError("chunk must be a positive multiple of 8")
    _tune_malloc()
    workers = workers or default_threads()
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i].nbytes)
    total = sum(j.nbytes for j in jobs)
    with make_progress(progress) as bar:
        task = bar.add_task(desc, total=total)
        if workers <= 1 or len(jobs) <= 1 or "fork" not in mp.get_all_start_methods():
            _TASK = (jobs, fn, chunk)
            try:
                for i in order:
                    _, res = _run_task(i)
                    bar.advance(task, jobs[i].nbytes)
                    yield jobs[i], res
            finally:
                _TASK = None
            return
        _TASK = (jobs, fn, chunk)
        try:
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
                futs = [pool.submit(_run_task, i) for i in order]
                for f in as_completed(futs):
                    i, res = f.result()
                    bar.advance(task, jobs[i].nbytes)
                    yield jobs[i], res
        finally:
            _TASK = None
