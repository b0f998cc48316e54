"""One rank of the memory benchmark: the real training loop for a few DINO steps, then a
measurement instead of the final checkpoint and export. Launched by ``benchmarks/memory.py``.

    memory_worker.py RESULT_DIR [section.key=value ...]

Writes ``RESULT_DIR/rank{N}.json``. On CPU it reads the resident set size (start it with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go back to the OS and RSS follows live memory);
on a GPU, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import gc
import resource
import sys
from pathlib import Path

import torch

from selfdistill.atomic import write_json_atomic
from selfdistill.engine.trainer import Trainer
from selfdistill.methods import build_method
from selfdistill.recipe import load_config


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


def measure(config) -> dict:
    """Build the loop, run its steps with forward + backward measured, then measure the state."""
    trainer = Trainer(config, lambda: build_method(config))
    before_build = torch.cuda.memory_allocated() if gpu() else rss_bytes()
    trainer.build()
    task, acc = trainer.task, trainer.accelerator
    # Forward + backward alone (no optimizer step): the activation (and gradient) high-water mark.
    fwd_bwd = {"bytes": 0, "start": 0, "peak_before_resets": 0}
    step, backward = task.training_step, acc.backward

    def training_step(*args, **kwargs):
        # Resetting the high-water mark loses the run's peak so far: keep it.
        fwd_bwd["peak_before_resets"] = max(fwd_bwd["peak_before_resets"], peak_since_reset())
        fwd_bwd["start"] = reset_peak()
        return step(*args, **kwargs)

    def measured_backward(loss, **kwargs):
        backward(loss, **kwargs)
        fwd_bwd["bytes"] = max(fwd_bwd["bytes"], peak_since_reset() - fwd_bwd["start"])

    task.training_step, acc.backward = training_step, measured_backward
    trainer.run_until(trainer.last_step)

    if gpu():
        torch.cuda.synchronize()
        after_steps, peak = torch.cuda.memory_allocated(), max(fwd_bwd["peak_before_resets"], torch.cuda.max_memory_allocated())
    else:
        after_steps, peak = rss_bytes(), max(fwd_bwd["peak_before_resets"], peak_since_reset())
    teacher = getattr(task, "teacher", None)
    exclude = {t.untyped_storage().data_ptr() for t in teacher.state_dict().values()} if teacher else set()
    # Model + optimizer state, tensor by tensor: student weights, gradients, optimizer state and
    # the strategy's gradient / communication buffers (not the EMA teacher, the same everywhere).
    tensor_state = live_tensor_bytes(exclude) + ddp_bucket_bytes(trainer.student)
    teacher_bytes = sum(t.numel() * t.element_size() for t in teacher.state_dict().values()) if teacher else 0
    student = acc.unwrap_model(trainer.student)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in student.parameters())
    result = {
        "rank": acc.process_index, "world_size": acc.num_processes, "device": "cuda" if gpu() else "cpu",
        "student_parameters": n_params, "teacher_bytes": teacher_bytes,
        "before_build_bytes": before_build, "after_steps_bytes": after_steps, "peak_bytes": peak,
        # What the student costs between steps: weights, optimizer state, gradient/comm buffers.
        "state_bytes": after_steps - before_build - teacher_bytes,
        "tensor_state_bytes": tensor_state,
        # What a step adds on top: activations (and transient gradients).
        "step_bytes": peak - after_steps,
        "fwd_bwd_bytes": fwd_bwd["bytes"],
        "steps": trainer.state.step,
    }
    write_json_atomic(Path(sys.argv[1]) / f"rank{acc.process_index}.json", result, indent=None)
    acc.wait_for_everyone()
    acc.end_training()
    return result


if __name__ == "__main__":
    measure(load_config(None, sys.argv[2:]))
