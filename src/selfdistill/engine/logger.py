"""Metrics: running sums between log steps (no host sync per step), a JSON-lines file in the run
directory, and Accelerate's trackers (TensorBoard by default; any other: :mod:`selfdistill.engine.trackers`)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from selfdistill.atomic import write_text_atomic
from selfdistill.console import interactive
from selfdistill.rundir import LOG

log = logging.getLogger("selfdistill")


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "it",
                 min_interval: float = 0.0) -> Any:
    """tqdm on a terminal; otherwise :class:`LineProgress` (a line per ``set_postfix``, at most one per
    ``min_interval`` seconds): no carriage returns in a redirected log."""
    if interactive():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, disable=not enabled)
    return LineProgress(total, desc, enabled, initial, unit, min_interval)


class LineProgress:
    """tqdm's interface for a log file: one line per ``set_postfix`` (the loop calls it at every
    ``train.log_every``) with the position, rate and what remains; nothing in between."""

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "it",
                 min_interval: float = 0.0) -> None:
        self.total, self.desc, self.enabled, self.n, self.unit = total, desc, enabled, initial, unit
        self.min_interval = min_interval
        self._start, self._t0 = initial, time.perf_counter()
        self._last_line = float("-inf")

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: Any) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self._last_line < self.min_interval and self.n < self.total):
            return
        self._last_line = now
        elapsed = now - self._t0
        rate = (self.n - self._start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        shown = " ".join(f"{k} {v}" for k, v in values.items())
        log.info("%s %d/%d (%.0f%%) %s%s%.2f %s/s, %s left", self.desc, self.n, self.total,
                 100 * self.n / max(self.total, 1), shown, " " if shown else "", rate, self.unit,
                 time.strftime("%H:%M:%S", time.gmtime(eta)))

    def close(self) -> None:
        pass

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()



class RunLogger:
    def __init__(self, accelerator: Any, run_dir: Path) -> None:
        self.acc = accelerator
        self.path = run_dir / LOG
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0
        self.images = 0
        self.data_time = 0.0
        self.step_time = 0.0
        self.t_start = time.perf_counter()

    def accumulate(self, out: Any, data_time: float, step_time: float, finite: bool = True) -> None:
        """Add one micro-batch. A non-finite one (its step is skipped) counts as time, not in the means."""
        if finite:
            values = {"loss": out.loss.detach().float(), **{k: v for k, v in out.metrics.items()}}
            for k, v in values.items():
                v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.n += 1
        self.images += out.batch_size
        self.data_time += data_time
        self.step_time += step_time

    def flush(self, step: int, epoch: float, values: dict[str, Any]) -> dict[str, Any] | None:
        """Collective: average the running sums over micro-batches and ranks, then write a row."""
        if not self.n:
            return None
        keys = sorted(self.sums)
        stacked = torch.stack([self.sums[k].to(self.acc.device) for k in keys]) / self.n
        if self.acc.num_processes > 1:
            stacked = self.acc.reduce(stacked, reduction="mean")
        elapsed = max(time.perf_counter() - self.t_start, 1e-9)
        row: dict[str, Any] = {"step": step, "epoch": round(epoch, 4)}
        row.update({k: float(v) for k, v in zip(keys, stacked.tolist())})
        row.update({k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in values.items()})
        row["images_per_s"] = self.images * self.acc.num_processes / elapsed
        row["data_wait_fraction"] = self.data_time / max(self.step_time, 1e-9)
        self.write(row, step)
        self._reset()
        return row

    def log_eval(self, prefix: str, results: dict[str, Any], step: int, epoch: float) -> dict[str, Any]:
        """One evaluation row (``knn/top1_k20``, ``val/top1``...) beside the training rows, with the
        epochs done counted as theirs (``step / steps_per_epoch``)."""
        row = {"step": step, "epoch": round(epoch, 4), **{f"{prefix}/{k}": v for k, v in results.items()}}
        self.write(row, step)
        return row

    def truncate_after(self, step: int) -> int:
        """Collective: drop the rows after ``step`` (what a crashed or preempted attempt logged past
        the checkpoint a run resumes from, trained again now); returns how many were dropped."""
        dropped = 0
        if self.acc.is_main_process and self.path.is_file():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
            dropped = len([line for line in lines if line.strip()]) - len(kept)
            if dropped:
                write_text_atomic(self.path, "".join(f"{line}\n" for line in kept))
        self.acc.wait_for_everyone()
        return dropped

    def write(self, row: dict[str, Any], step: int, track: bool = True) -> None:
        """One row of ``log.jsonl`` (main process); also to the trackers unless an event row (``track``)."""
        if self.acc.is_main_process:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        if track and self.acc.trackers:
            self.acc.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=step)
