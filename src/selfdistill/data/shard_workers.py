"""The shard writer's processes and progress report: samples read and encoded in a pool of worker
processes, a few per task and a bounded window ahead, handed back in input order, so the output
does not depend on the number of workers; the verifier's ordered ``map``; the progress line or bar.

Workers end themselves when the parent is gone (``kill -9`` included).
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from selfdistill.data.shard_encode import EncodeOptions, Prepared, prepare_chunk
from selfdistill.data.shard_inputs import ImageReader, Sample

__all__ = ["PreparedStream", "Progress", "default_workers", "prepared_stream", "process_map"]


def default_workers() -> int:
    """The cores this process may run on (a SLURM or container CPU limit, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _exit_with_parent(parent: int) -> None:
    """Pool initializer: end this worker when the writer is gone. A ``kill -9`` of the writer runs
    no clean-up, and orphaned workers would go on reading and encoding for nothing."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


CHUNK = 16  # samples per worker task
AHEAD = 4  # tasks in flight per worker: enough to keep workers busy, bounded memory


class PreparedStream:
    """Prepared samples in order; ``close`` ends the pool (on an error or interrupt, queued chunks
    are dropped instead of run to no purpose), also when the stream was never read."""

    def __init__(self, items: Iterator[Prepared], pool: concurrent.futures.ProcessPoolExecutor | None = None) -> None:
        self._items, self._pool = items, pool

    def __iter__(self) -> PreparedStream:
        return self

    def __next__(self) -> Prepared:
        return next(self._items)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def prepared_stream(reader: ImageReader, options: EncodeOptions, items: Iterable[tuple[str, Sample]],
                     workers: int) -> PreparedStream:
    """Every item prepared, in order; with ``workers > 1`` in a process pool, a bounded window ahead.
    The pool's workers are forked here, before the writer starts any upload thread."""
    chunks = _batched(items, CHUNK)
    if workers <= 1:
        return PreparedStream(p for chunk in chunks for p in prepare_chunk(reader, options, chunk))
    pool = concurrent.futures.ProcessPoolExecutor(workers, initializer=_exit_with_parent, initargs=(os.getpid(),))
    try:
        window = collections.deque(pool.submit(prepare_chunk, reader, options, chunk)
                                   for chunk in itertools.islice(chunks, AHEAD * workers))
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    return PreparedStream(_pooled(pool, window, reader, options, chunks), pool)


def _pooled(pool: concurrent.futures.ProcessPoolExecutor, window: collections.deque, reader: ImageReader,
            options: EncodeOptions, chunks: Iterator[list[tuple[str, Sample]]]) -> Iterator[Prepared]:
    for chunk in chunks:
        yield from window.popleft().result()
        window.append(pool.submit(prepare_chunk, reader, options, chunk))
    while window:
        yield from window.popleft().result()


def process_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> Iterator[Any]:
    """``map`` in order, in ``workers`` processes when more than one."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(items)), initializer=_exit_with_parent,
                                                initargs=(os.getpid(),)) as pool:
        yield from pool.map(fn, items)


class Progress:
    """Items done and items/s: a tqdm bar on a terminal, else a plain line every ``interval`` s
    (a redirected log, e.g. SLURM's, gets no carriage returns)."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str, unit: str = "images",
                 interval: float = 30.0) -> None:
        self.total, self.done, self.desc, self.unit, self.interval = total, initial, desc, unit, interval
        self.start = self.last = time.monotonic()
        self.initial = initial
        self.bar = None
        self.lines = enabled and not sys.stderr.isatty()
        if enabled and not self.lines:
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and time.monotonic() - self.last >= self.interval:
            self.last = time.monotonic()
            self._line()

    def _line(self) -> None:
        rate = (self.done - self.initial) / max(time.monotonic() - self.start, 1e-9)
        print(f"{self.desc}: {self.done}/{self.total} {self.unit}, {rate:.0f} {self.unit}/s", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.lines:
            self._line()
