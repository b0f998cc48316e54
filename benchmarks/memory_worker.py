"""One rank of the memory benchmark: the real training loop for a few DINO steps, with the final
checkpoint and export replaced by a measurement. Launched by ``benchmarks/memory.py``.

    memory_worker.py RESULT_DIR [section.key=value ...]

Writes ``RESULT_DIR/rank{N}.json``. On CPU it reads the resident set size (start it with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go back to the OS and RSS follows live memory);
on a GPU, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from selfdistill.config import load_config
from selfdistill.engine.trainer import Trainer


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def gpu() -> bool:
    return torch.cuda.is_available()


class MeasuringTrainer(Trainer):
    """The real loop; only the end-of-run checkpoint/export become measurements."""

    def _build(self) -> None:
        self.before_build = torch.cuda.memory_allocated() if gpu() else rss_bytes()
        super()._build()

    def _save(self) -> None:  # called once, right after the last optimizer step
        if gpu():
            torch.cuda.synchronize()
            self.after_steps, self.peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
        else:
            self.after_steps, self.peak = rss_bytes(), peak_rss_bytes()

    def _finish(self, seen_indices):
        acc = self.accelerator
        teacher = getattr(self.method, "teacher", None)
        teacher_bytes = sum(t.numel() * t.element_size() for t in teacher.state_dict().values()) if teacher else 0
        student = acc.unwrap_model(self.student)
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in student.parameters())
        result = {
            "rank": acc.process_index, "world_size": acc.num_processes, "device": "cuda" if gpu() else "cpu",
            "student_parameters": n_params, "teacher_bytes": teacher_bytes,
            "before_build_bytes": self.before_build, "after_steps_bytes": self.after_steps, "peak_bytes": self.peak,
            # What the student costs between steps: weights, optimizer state, gradient/comm buffers.
            "state_bytes": self.after_steps - self.before_build - teacher_bytes,
            # What a step adds on top: activations (and transient gradients).
            "step_bytes": self.peak - self.after_steps,
            "steps": self.state.step,
        }
        out = Path(RESULT_DIR) / f"rank{acc.process_index}.json"
        out.write_text(json.dumps(result))
        acc.wait_for_everyone()
        return result


RESULT_DIR = ""

if __name__ == "__main__":
    RESULT_DIR = sys.argv[1]
    config = load_config(None, sys.argv[2:])
    MeasuringTrainer(config).fit()
