"""One rank of the memory benchmark: the real training loop for a few DINO steps, with the final
checkpoint and export replaced by a measurement. Launched by ``benchmarks/memory.py``.

    memory_worker.py RESULT_DIR [section.key=value ...]

Writes ``RESULT_DIR/rank{N}.json``. On CPU it reads the resident set size (start it with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go back to the OS and RSS follows live memory);
on a GPU, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import gc
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


def gpu() -> bool:
    return torch.cuda.is_available()


def reset_peak() -> int:
    """Reset the high-water mark (Linux ``clear_refs`` 5 / CUDA peak stats); return current usage."""
    if gpu():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return rss_bytes()


def peak_since_reset() -> int:
    if gpu():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as fh:
        hwm = next(line for line in fh if line.startswith("VmHWM:"))
    return int(hwm.split()[1]) * 1024


def live_tensor_bytes(exclude: set[int]) -> int:
    """Bytes of every tensor storage reachable from Python, each storage once, minus ``exclude``
    (storage pointers). Misses only what C++ holds alone (DDP's gradient buckets: added apart)."""
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                st = obj.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse, functional)
            continue
    return sum(n for ptr, n in storages.items() if ptr not in exclude and ptr != 0)


def ddp_bucket_bytes(model: torch.nn.Module) -> int:
    """The gradient buckets DDP's C++ reducer holds (a second copy of the gradients)."""
    if not hasattr(model, "_get_ddp_logging_data"):
        return 0
    sizes = str(model._get_ddp_logging_data().get("bucket_sizes", ""))
    return sum(int(x) for x in sizes.split(",") if x.strip())


class MeasuringTrainer(Trainer):
    """The real loop; only the end-of-run checkpoint/export become measurements."""

    def _build(self) -> None:
        self.before_build = torch.cuda.memory_allocated() if gpu() else rss_bytes()
        super()._build()
        # Forward + backward alone (no optimizer step): the activation (and gradient) high-water mark.
        self.fwd_bwd_bytes = 0
        step, backward = self.method.training_step, self.accelerator.backward
        start = {}

        self.peak_before_resets = 0

        def training_step(*args, **kwargs):
            # Resetting the high-water mark loses the run's peak so far: keep it.
            self.peak_before_resets = max(self.peak_before_resets, peak_since_reset())
            start["bytes"] = reset_peak()
            return step(*args, **kwargs)

        def measured_backward(loss, **kwargs):
            backward(loss, **kwargs)
            self.fwd_bwd_bytes = max(self.fwd_bwd_bytes, peak_since_reset() - start["bytes"])

        self.method.training_step = training_step
        self.accelerator.backward = measured_backward

    def _save(self) -> None:  # called once, right after the last optimizer step
        if gpu():
            torch.cuda.synchronize()
            self.after_steps = torch.cuda.memory_allocated()
            self.peak = max(self.peak_before_resets, torch.cuda.max_memory_allocated())
        else:
            self.after_steps, self.peak = rss_bytes(), max(self.peak_before_resets, peak_since_reset())
        teacher = getattr(self.method, "teacher", None)
        exclude = {t.untyped_storage().data_ptr() for t in teacher.state_dict().values()} if teacher else set()
        # Model + optimizer state, tensor by tensor: student weights, gradients, optimizer state and
        # the strategy's gradient / communication buffers (not the EMA teacher, the same everywhere).
        self.tensor_state = live_tensor_bytes(exclude) + ddp_bucket_bytes(self.student)

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
            "tensor_state_bytes": self.tensor_state,
            # What a step adds on top: activations (and transient gradients).
            "step_bytes": self.peak - self.after_steps,
            "fwd_bwd_bytes": self.fwd_bwd_bytes,
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
