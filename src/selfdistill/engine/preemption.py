"""Preemption: a signal asks the run to stop; every rank finishes the optimizer step it is in, the
run writes a checkpoint at exactly that step and exits with :data:`EXIT_CODE`, which a launcher
script turns into a requeue (``accelerate_configs/slurm_multinode.sh``); the requeued job goes on
with ``--resume auto``.

A signal may reach only some ranks (one node's launcher), so the handler only raises a flag; the
loop folds it into the all-reduce it already does on every micro-batch (the finiteness check), and
all ranks stop at the same step.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

__all__ = ["EXIT_CODE", "Preempted", "StopFlag", "watch_signals"]

EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; the SLURM script requeues on it


class Preempted(Exception):
    """The run stopped on a signal after writing ``checkpoint`` (exit with :data:`EXIT_CODE`)."""

    exit_code = EXIT_CODE

    def __init__(self, signal_name: str, step: int, checkpoint: Path, seconds: float) -> None:
        self.signal_name, self.step, self.checkpoint, self.seconds = signal_name, step, checkpoint, seconds
        super().__init__(f"{signal_name}: stopped after step {step}, checkpoint {checkpoint} written "
                         f"{seconds:.1f} s after the signal; continue with --resume auto")


class StopFlag:
    """Raised by a signal handler: which signal (``name``) and when (``time.monotonic()``)."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.at = 0.0

    def __bool__(self) -> bool:
        return self.name is not None

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.name is None:  # the first signal is the one reported
            self.name, self.at = signal.Signals(signum).name, time.monotonic()
            # logging from a handler is safe enough here: the main thread runs it between bytecodes
            log.warning("%s received: finishing this optimizer step, then a checkpoint and exit %d", self.name,
                        EXIT_CODE)


@contextlib.contextmanager
def watch_signals(names: Sequence[str], flag: StopFlag) -> Iterator[StopFlag]:
    """``flag`` raised by the signals ``names`` while the block runs (the previous handlers restored
    after); outside the main thread (a notebook's worker thread) no handler can be installed."""
    previous: dict[int, object] = {}
    try:
        for name in names:
            signum = getattr(signal, name)
            try:
                previous[signum] = signal.signal(signum, flag.handler)
            except ValueError:  # not the main thread
                break
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
