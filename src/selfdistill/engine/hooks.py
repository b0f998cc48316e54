"""Hooks every run of a task can use: a per-rank summary (where each rank stands at the end, and
a sample of the images it trained on) and the training-curve picture."""

from __future__ import annotations

import hashlib
from typing import Any

from selfdistill.atomic import write_json_atomic
from selfdistill.engine.task import Hook
from selfdistill.params import full_parameters, unwrap
from selfdistill.plots import plot_training_curves
from selfdistill.rundir import LOG, LOSS_CURVE, rank_summary

__all__ = ["RankSummary", "TrainingCurves"]


class RankSummary(Hook):
    """``rank_summary_<rank>.json`` at the end: the step, the samples this rank saw (and the first
    ``audit_samples`` dataset indices), and a hash of the student per tensor, gathered under ZeRO-3,
    so ranks that drifted apart show. The summary is also the run's result (``loop.results``)."""

    def __init__(self, audit_samples: int = 10_000) -> None:
        self.audit_samples = audit_samples
        self.indices: list[int] = []

    def on_batch(self, loop: Any, batch: Any) -> None:
        if len(self.indices) < self.audit_samples:  # an audit sample, not the whole epoch
            self.indices.extend(batch["index"].tolist())  # still on the host: no device sync

    def on_final_checkpoint(self, loop: Any, path: Any) -> None:
        acc = loop.accelerator
        unwrapped = unwrap(acc, loop.student)
        names = [n for n, _ in unwrapped.named_parameters()]
        digest, per_tensor = hashlib.sha256(), {}
        for name, p in zip(names, full_parameters(unwrapped)):  # gathered under ZeRO-3 (collective)
            data = p.detach().float().cpu().numpy().tobytes()
            digest.update(data)
            per_tensor[name] = hashlib.sha256(data).hexdigest()
        summary = {"rank": acc.process_index, "world_size": acc.num_processes, "step": loop.state.step,
                   "samples_seen": loop.state.samples_seen, "student_sha256": digest.hexdigest(),
                   "student_tensor_sha256": per_tensor, "indices_seen": self.indices, "bad_images": loop.bad.n_bad}
        write_json_atomic(rank_summary(loop.run_dir, acc.process_index), summary, indent=None)
        loop.results.update(summary)


class TrainingCurves(Hook):
    """``loss_curve.png``: loss, collapse signals and online kNN against the optimizer step."""

    def on_final_checkpoint(self, loop: Any, path: Any) -> None:
        if loop.accelerator.is_main_process:
            plot_training_curves(loop.run_dir / LOG, loop.run_dir / LOSS_CURVE)
