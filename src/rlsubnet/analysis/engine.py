"""The streaming engine: runs a function over chunks of aligned tensors, in parallel threads.

Each job is one tensor present in several checkpoints (two for a diff, three for closeness). Jobs are cut
into chunks of ``chunk`` elements; a pool of threads reads each chunk from every checkpoint and calls the
probe function (numpy releases the GIL, so chunks run truly in parallel). At most ``2 × threads`` chunks
are in flight, so memory stays bounded by the chunk size whatever the size of the model.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from ..io.checkpoint import Checkpoint, iter_chunks

DEFAULT_CHUNK = 1 << 20  # elements per chunk (a multiple of 8, so packed mask bits concatenate)


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


def stream(
    jobs: Sequence[Job],
    fn: Callable[[Job, int, list[np.ndarray]], Any],
    threads: int | None = None,
    chunk: int = DEFAULT_CHUNK,
    desc: str = "comparing",
    progress: bool = True,
) -> Iterator[tuple[Job, int, Any]]:
    """Yield ``(job, start, fn(job, start, raw_chunks))`` for every chunk of every job.

    Results come back in submission order. ``raw_chunks`` holds the raw storage bits of the chunk in
    each of the job's sources.
    """
    if chunk <= 0 or chunk % 8:
        raise ValueError("chunk must be a positive multiple of 8")
    threads = threads or default_threads()

    def work(job: Job, start: int, count: int) -> Any:
        raws = [ck.read(name, start, count) for ck, name in job.sources]
        return fn(job, start, raws)

    total = sum(j.nbytes for j in jobs)
    with make_progress(progress) as bar, ThreadPoolExecutor(max_workers=threads) as pool:
        task = bar.add_task(desc, total=total)
        pending: deque = deque()
        per_elem = {id(j): j.nbytes // max(j.numel, 1) for j in jobs}

        def drain_one() -> tuple[Job, int, Any]:
            job, start, count, fut = pending.popleft()
            res = fut.result()
            bar.advance(task, per_elem[id(job)] * count)
            return job, start, res

        for job in jobs:
            for start, count in iter_chunks(job.numel, chunk):
                pending.append((job, start, count, pool.submit(work, job, start, count)))
                if len(pending) >= 2 * threads:
                    yield drain_one()
        while pending:
            yield drain_one()
