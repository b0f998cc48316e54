"""One rank of the memory benchmark: the real training loop for a few DINO steps, then a
measurement instead of the final checkpoint and export. Launched by ``benchmarks/memory.py``.

    memory_worker.py RESULT_DIR [section.key=value ...]

Writes ``RESULT_DIR/rank{N}.json``. On CPU it reads the resident set size (start it with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go back to the OS and RSS follows live memory);
on a GPU, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from selfdistill.atomic import write_json_atomic
from selfdistill.engine.memory import MemoryMeter, StepMemory
from selfdistill.engine.rank_memory import count_state
from selfdistill.engine.trainer import Trainer
from selfdistill.methods import build_method
from selfdistill.recipe import load_config


def gpu() -> bool:
    return torch.cuda.is_available()


def measure(config) -> dict:
    """Build the loop, run its steps with forward + backward measured, then measure the state."""
    trainer = Trainer(config, lambda: build_method(config))
    meter = MemoryMeter("cuda" if gpu() else "cpu")
    before_build = meter.current()
    trainer.build()
    acc = trainer.accelerator
    # Forward + backward alone (DeepSpeed: its optimizer step included): the activation (and gradient) high-water mark.
    step_memory = StepMemory(meter)
    trainer.hooks.append(step_memory)
    trainer.run_until(trainer.last_step)
    after_steps, peak = meter.current(), step_memory.overall_peak()
    # Model + optimizer state, tensor by tensor: student weights, gradients, optimizer state and
    # the strategy's gradient / communication buffers; the teacher (EMA copy or frozen network,
    # non-persistent buffers included) and the task's own tensors are counted apart.
    counted = count_state(trainer)
    tensor_state, teacher_bytes = counted["student"], counted["teacher"]
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
        "fwd_bwd_bytes": step_memory.fwd_bwd,
        "steps": trainer.state.step,
    }
    write_json_atomic(Path(sys.argv[1]) / f"rank{acc.process_index}.json", result, indent=None)
    acc.wait_for_everyone()
    acc.end_training()
    return result


if __name__ == "__main__":
    measure(load_config(None, sys.argv[2:]))
