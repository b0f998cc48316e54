"""Metrics: running sums between log steps (no host sync per step), a JSON-lines file in the run
directory, and Accelerate's trackers (TensorBoard by default; any other: :mod:`selfdistill.engine.trackers`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from selfdistill.atomic import write_text_atomic


class RunLogger:
    def __init__(self, accelerator: Any, run_dir: Path) -> None:
        self.acc = accelerator
        self.path = run_dir / "log.jsonl"
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

    def log_eval(self, prefix: str, results: dict[str, Any], step: int, epoch: int) -> dict[str, Any]:
        """One evaluation row (``knn/top1_k20``, ``val/top1``...) beside the training rows."""
        row = {"step": step, "epoch": epoch, **{f"{prefix}/{k}": v for k, v in results.items()}}
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
