"""Memory of a training process, measured: what the ZeRO planner predicts against, and what the
memory benchmark records.

On a GPU the numbers are the caching allocator's (``memory_allocated`` / ``max_memory_allocated``).
On a CPU they are the process's resident set (``/proc/self/statm``) and its high-water mark, reset
through ``/proc/self/clear_refs``; :func:`tune_cpu_allocator` first makes glibc give freed tensors
back to the system (``mmap`` for blocks >= 64 KiB, as ``MALLOC_MMAP_THRESHOLD_=65536`` would), so
the resident set follows the live tensors instead of the allocator's high tide.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
from typing import Any

import torch

from selfdistill.engine.task import Hook

__all__ = ["MemoryMeter", "StepMemory", "ddp_bucket_bytes", "keep_freed_memory", "live_tensor_bytes", "mallopt",
           "tune_cpu_allocator"]

_MALLOPT = {"trim_threshold": -1, "top_pad": -2, "mmap_threshold": -3}  # glibc's mallopt parameters


def mallopt(**settings: int) -> bool:
    """Set glibc's allocator parameters (``trim_threshold``, ``top_pad``, ``mmap_threshold``);
    returns whether all were accepted (False off glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return all(bool(libc.mallopt(_MALLOPT[k], v)) for k, v in settings.items())
    except (OSError, AttributeError):
        return False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process instead of returning it to the system.

    Activations are freed and allocated again every step; by default glibc serves large blocks
    with fresh ``mmap`` pages, so every step pays page faults and zeroing (5-8% of a CPU step
    here). Not done when the user set any ``MALLOC_*`` variable (e.g. to measure live memory).
    Returns whether the settings were applied.
    """
    if any(k.startswith("MALLOC_") for k in os.environ):
        return False
    # blocks up to 1 GiB from the heap (reusable), never shrink it, grow it in 256 MiB steps
    return mallopt(mmap_threshold=1 << 30, trim_threshold=1 << 62, top_pad=256 << 20)


def tune_cpu_allocator(threshold: int = 65536) -> bool:
    """The opposite, to measure: blocks of ``threshold`` bytes and more by ``mmap`` (returned to the
    system when freed) and an eagerly trimmed heap, so the resident set follows the live tensors."""
    return mallopt(mmap_threshold=threshold, trim_threshold=threshold)


class MemoryMeter:
    """Current use and the high-water mark since the last :meth:`reset` on ``device``."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.device = torch.device(device)

    def current(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        with open("/proc/self/status") as fh:
            hwm = next(line for line in fh if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) * 1024

    def reset(self) -> int:
        """Start a new high-water mark; returns the current use."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        return self.current()


class StepMemory(Hook):
    """The loop's memory per micro-batch: ``steps`` holds the largest rise above the memory at its
    start through forward and backward (activations, and gradients where they appear; DeepSpeed's
    optimizer step included, it runs inside backward), ``forward_steps`` the rise through forward
    alone (activations, no gradients yet); ``overall_peak()`` is the process's high-water mark over
    all steps (kept across the resets this hook makes)."""

    def __init__(self, meter: MemoryMeter) -> None:
        self.meter = meter
        self.steps: list[int] = []
        self.forward_steps: list[int] = []
        self.peak = 0
        self._start = 0

    @property
    def fwd_bwd(self) -> int:
        return max(self.steps, default=0)

    def on_phase_end(self, loop: Any, phase: str) -> None:
        if phase == "data":
            self.peak = max(self.peak, self.meter.peak())
            self._start = self.meter.reset()
        elif phase == "forward":
            self.forward_steps.append(self.meter.peak() - self._start)
        elif phase == "backward":
            self.steps.append(self.meter.peak() - self._start)

    def overall_peak(self) -> int:
        return max(self.peak, self.meter.peak())


def live_tensor_bytes(exclude: set[int] = frozenset()) -> int:
    """Bytes of every tensor storage reachable from Python, each storage once, minus ``exclude``
    (storage pointers). Misses only what C++ holds alone (DDP's gradient buckets: :func:`ddp_bucket_bytes`).
    Garbage is collected first: an unreachable tensor in a reference cycle (the byte tensor of an
    object collective, say) would otherwise be counted until the collector happened to run."""
    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                st = obj.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, functional)
            continue
    return sum(n for ptr, n in storages.items() if ptr not in exclude and ptr != 0)


def ddp_bucket_bytes(model: torch.nn.Module) -> int:
    """The gradient buckets DDP's C++ reducer holds (a second copy of the gradients)."""
    if not hasattr(model, "_get_ddp_logging_data"):
        return 0
    sizes = str(model._get_ddp_logging_data().get("bucket_sizes", ""))
    return sum(int(x) for x in sizes.split(",") if x.strip())
