"""What one training rank holds, counted by owner, and a measured run of the one loop.

The ZeRO planner predicts a rank's memory; this is what it is checked against: :class:`RankMemory`
is a hook that records the rise of every micro-batch (:class:`~selfdistill.engine.memory.StepMemory`)
and then counts the live tensors by owner (student state, teacher, the task's own tensors), and
:func:`measure_run` runs a recipe's real steps on one synthetic batch with it (what
``run_pretrain.py --measure-memory`` and the planner's probe run).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from selfdistill.atomic import write_json_atomic
from selfdistill.engine.distributed import uses_deepspeed
from selfdistill.engine.memory import MemoryMeter, StepMemory, ddp_bucket_bytes, live_tensor_bytes, tune_cpu_allocator
from selfdistill.engine.task import Task
from selfdistill.engine.throughput import SyntheticImages, benchmark_config, count_flops
from selfdistill.engine.trainer import Trainer
from selfdistill.models.frozen import FrozenTeacher
from selfdistill.params import unwrap

__all__ = ["RankMemory", "count_state", "held_tensors", "measure_run", "module_tensors", "storages", "teacher_bytes",
           "teacher_modules"]


class RankMemory(StepMemory):
    """:class:`StepMemory` (the rise through forward and forward + backward of every micro-batch)
    that, asked after the steps, also reports what the rank holds by owner (:meth:`report`);
    ``runtime`` is what the process held before the model existed."""

    def __init__(self, meter: MemoryMeter, runtime: int = 0) -> None:
        super().__init__(meter)
        self.runtime = runtime

    def report(self, loop: Any) -> dict[str, Any]:
        """This rank's memory after the steps: peak, the last step's rises, the state counted tensor
        by tensor, the teacher and task tensors, and the student's shapes the accounting needs."""
        acc, task = loop.accelerator, loop.task
        counted = count_state(loop)
        student = unwrap(acc, loop.student)
        teachers = teacher_modules(task)
        groups = None if loop.deepspeed else [[p.numel() for p in g["params"]] for g in loop.optimizer.param_groups]
        return {
            "rank": acc.process_index, "world_size": acc.num_processes, "device": str(self.meter.device),
            "runtime_bytes": self.runtime, "peak_bytes": self.overall_peak(),
            "fwd_bwd_bytes": self.steps[-1], "fwd_bwd_steps": self.steps,
            "forward_bytes": self.forward_steps[-1],
            "state": counted, "state_bytes": counted["student"],
            "teacher_bytes": teacher_bytes(task),
            # partitioned under ZeRO-3 only when every teacher is frozen (DINOv2's distillation also keeps an EMA copy)
            "teacher_frozen": all(isinstance(t, FrozenTeacher) for t in teachers) and bool(teachers),
            "groups": groups,
            "frozen": [p.numel() for p in student.parameters() if not p.requires_grad],
            "buffers": [[b.numel(), b.element_size(), int(b.is_floating_point())] for b in student.buffers()],
            "task_bytes": sum(held_tensors(task).values()),
        }


def measure_run(config: Any, make_task: Callable[[Any], Task], out_dir: str | os.PathLike, steps: int = 3,
                flops: bool = False) -> dict[str, Any]:
    """Run ``steps`` optimizer steps of ``config`` (``make_task(config)`` builds the method) on one
    synthetic batch through the real loop (its strategy as launched) and write this rank's memory to
    ``out_dir/rank{N}.json``: the runtime before the model, the peak, forward + backward per step,
    and the state counted tensor by tensor."""
    if uses_deepspeed() or importlib.util.find_spec("deepspeed") is not None:
        import deepspeed  # noqa: F401  (part of a ZeRO rank's runtime: the probe counts it too)
    with tempfile.TemporaryDirectory(prefix="selfdistill-measure-") as tmp:
        bench = benchmark_config(config, tmp)
        bench.train.keep_freed_memory = False
        cuda = torch.cuda.is_available() and not bench.train.cpu
        if not cuda:
            tune_cpu_allocator()
        meter = MemoryMeter(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
        runtime = meter.current()
        trainer = Trainer(bench, lambda: make_task(bench),
                          data=lambda task: SyntheticImages(task.train_transform(), bench.train.seed))
        trainer.build()
        memory = RankMemory(meter, runtime)
        trainer.hooks.append(memory)
        trainer.run_until(steps)
        trainer.hooks.remove(memory)
        result = {**memory.report(trainer), "micro_batch": bench.train.batch_size_per_device}
        if flops:
            _, n = count_flops(lambda: trainer.run_until(steps + 1))
            result["flops_per_sample"] = n / bench.train.batch_size_per_device
        acc = trainer.accelerator
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(out_dir) / f"rank{acc.process_index}.json", result, indent=1)
        acc.wait_for_everyone()
        acc.end_training()
    return result


def storages(tensors: Any) -> dict[int, int]:
    """``{storage pointer: bytes}`` of the tensors in a (nested) dict / list / tuple."""
    out: dict[int, int] = {}
    if isinstance(tensors, torch.Tensor):
        part = getattr(tensors, "ds_tensor", None)  # a ZeRO-3 parameter's own partition
        for t in (tensors, part) if part is not None else (tensors,):
            out[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    elif isinstance(tensors, dict):
        for v in tensors.values():
            out.update(storages(v))
    elif isinstance(tensors, (list, tuple)):
        for v in tensors:
            out.update(storages(v))
    return out


def held_tensors(task: Any, depth: int = 3) -> dict[int, int]:
    """The tensors a task holds outside its networks (DINO's centers): its attributes, and those of
    the project's own objects it holds, followed ``depth`` levels; modules are not entered."""
    out: dict[int, int] = {}

    def visit(obj: Any, level: int) -> None:
        if isinstance(obj, torch.nn.Module) or level > depth:
            return
        if isinstance(obj, torch.Tensor):
            out.update(storages(obj))
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v, level + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v, level + 1)
        elif type(obj).__module__.startswith("selfdistill") and hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                visit(v, level + 1)

    visit(task, 0)
    return out


def count_state(trainer: Any) -> dict[str, int]:
    """This rank's live tensors after the steps, by owner: the teacher, the task's own tensors, and
    the rest, which is the student's training state (weights, gradients, optimizer, the strategy's
    buffers; DDP's C++ buckets added). The synthetic batch is left out."""
    teacher = storages({f"{i}.{k}": v for i, t in enumerate(teacher_modules(trainer.task))
                        for k, v in module_tensors(t).items()})
    task = {k: v for k, v in held_tensors(trainer.task).items() if k not in teacher}
    batch = storages(getattr(trainer.source, "batch", None))
    student = live_tensor_bytes(set(teacher) | set(task) | set(batch)) + ddp_bucket_bytes(trainer.student)
    return {"student": student, "teacher": sum(teacher.values()), "task": sum(task.values())}


def module_tensors(module: Any) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module``, non-persistent buffers (Swin's position index) included."""
    if module is None:
        return {}
    return {**dict(module.named_parameters()), **{f"buffer.{k}": v for k, v in module.named_buffers()}}


def teacher_modules(task: Any) -> list[torch.nn.Module]:
    """The task's teachers: ``teacher`` (an EMA copy or a frozen network) and any other frozen network
    it holds (DINOv2's distillation teacher, beside the student's EMA)."""
    others = [v for k, v in vars(task).items() if k != "teacher" and isinstance(v, FrozenTeacher)]
    return [t for t in [getattr(task, "teacher", None), *others] if t is not None]


def teacher_bytes(task: Any) -> int:
    """Bytes of the task's teachers (EMA copy, frozen networks) as this rank holds them."""
    return sum(storages({f"{i}.{k}": v for i, t in enumerate(teacher_modules(task))
                         for k, v in module_tensors(t).items()}).values())
