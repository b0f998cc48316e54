"""Training throughput of a recipe through the real ``Trainer``: images/s, the step split into
phases, peak memory, and achieved FLOP/s against this machine's measured dense matmul FLOP/s.

Used by ``run_pretrain.py --benchmark N`` and by ``benchmarks/train_throughput.py`` (which also
runs an independent baseline with the same helpers, so both are measured the same way).
"""

from __future__ import annotations

import copy
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from PIL import Image

from selfdistill.data import finish_on_device
from selfdistill.engine.task import Hook, Task
from selfdistill.engine.trainer import Trainer
from selfdistill.params import unwrap

PHASES = ("data", "forward", "backward", "optimizer", "ema", "other")


class StepTimer(Hook):
    """Wall time per step phase. ``start()`` opens a step (what the previous step did after its
    last ``mark`` is charged to "other"); ``mark(phase)`` charges the time since the last mark to
    ``phase``. On a GPU each mark synchronises first, so a phase is charged its own kernels.
    The first ``skip`` steps (warm-up) are not kept. Process CPU time is kept per step too.

    ``gate``: called between steps (and once after the last), outside the timed span; the
    benchmark script uses it to run two implementations in lock-step (see :func:`gate_from_env`).
    """

    def __init__(self, device: torch.device | str = "cpu", skip: int = 0,
                 gate: Callable[[], None] | None = None) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.steps: list[dict[str, float]] = []
        self.cpu_s: list[float] = []
        self.skip = skip
        self.gate = gate
        self._last: float | None = None
        self._cpu0 = 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        now, cpu = self._close()
        if self.gate is not None:
            self.gate()  # waiting here is nobody's time
            now, cpu = self._now(), _cpu_seconds()
        self.steps.append(dict.fromkeys(PHASES, 0.0))
        self._last, self._cpu0 = now, cpu

    def _close(self) -> tuple[float, float]:
        now, cpu = self._now(), _cpu_seconds()
        if self.steps and self._last is not None:
            self.steps[-1]["other"] += now - self._last
            self.cpu_s.append(cpu - self._cpu0)
            if self.skip > 0:
                self.skip -= 1
                self.steps.pop()
                self.cpu_s.pop()
        self._last = None
        return now, cpu

    def mark(self, phase: str) -> None:
        now = self._now()
        if self.steps and self._last is not None:
            self.steps[-1][phase] += now - self._last
        self._last = now

    # -- as a hook of the training loop
    def on_step_start(self, loop: Any) -> None:
        self.start()

    def on_phase_end(self, loop: Any, phase: str) -> None:
        self.mark(phase)

    def stop(self) -> None:
        """Close the last step (its remainder goes to "other"), then pass the gate once more."""
        self._close()
        if self.gate is not None:
            self.gate()

    def summary(self) -> dict[str, Any]:
        totals = [sum(s.values()) for s in self.steps]
        return {"step_s": [round(t, 4) for t in totals], "cpu_s": sum(self.cpu_s),
                "step_cpu_s": [round(c, 4) for c in self.cpu_s],
                "phases_s": {p: statistics.fmean(s[p] for s in self.steps) for p in PHASES} if self.steps else {}}


GATE_ENV = "SELFDISTILL_BENCH_GATE"


def gate_from_env() -> Callable[[], None] | None:
    """Lock-step with a driving process: ``SELFDISTILL_BENCH_GATE="<read fd>,<write fd>"`` (pipes
    it passed down). At each gate the process writes one byte ("ready": the previous step is done)
    and blocks until it reads one ("go"). Two implementations driven alternately step by step see
    the same machine load, which is what makes their ratio fair on a shared machine."""
    import os

    spec = os.environ.get(GATE_ENV)
    if not spec:
        return None
    rfd, wfd = (int(x) for x in spec.split(","))

    def gate() -> None:
        os.write(wfd, b"r")
        if os.read(rfd, 1) != b"g":
            raise SystemExit("benchmark driver went away")

    return gate


# -- what the machine can do ---------------------------------------------------------------------
def matmul_flops_per_s(precision: str = "fp32", device: torch.device | str = "cpu", size: int = 2048,
                       repeats: int = 5) -> dict[str, float]:
    """Measured dense ``[n, n] @ [n, n]`` FLOP/s at the precision of the run (bf16/fp16: operands of
    that type, as autocast feeds the matmuls); the median of ``repeats`` timed products, by wall
    time and by process CPU time (the second is robust to other processes sharing the cores)."""
    device = torch.device(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    flops = 2.0 * size**3
    a @ b  # warm-up (library initialisation, packing buffers)
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = _cpu_seconds(), _sync_time(device)
        a @ b
        t1 = _sync_time(device)
        walls.append(t1 - t0)
        cpus.append(_cpu_seconds() - c0)
    return {"flops_per_s": flops / statistics.median(walls),
            "flops_per_cpu_s": flops / max(statistics.median(cpus), 1e-9), "size": size}


def _sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


_FORMULAS_ADDED = False


def _add_cpu_attention_formulas() -> None:
    """``torch.utils.flop_counter`` knows the CUDA fused-attention kernels but not the CPU flash
    kernel that ``scaled_dot_product_attention`` runs on a CPU; count it with the same formulas."""
    global _FORMULAS_ADDED
    if _FORMULAS_ADDED:
        return
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in fc.flop_registry:
        @fc.register_flop_formula(fwd)
        def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)
    if bwd is not None and bwd not in fc.flop_registry:
        @fc.register_flop_formula(bwd)
        def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)
    _FORMULAS_ADDED = True


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Model FLOPs of ``fn()`` (matmuls, convolutions, attention; forward and backward) counted by
    ``torch.utils.flop_counter``; elementwise work and the optimizer count as zero."""
    from torch.utils.flop_counter import FlopCounterMode

    _add_cpu_attention_formulas()
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, int(counter.get_total_flops())


# -- memory --------------------------------------------------------------------------------------
def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak RSS on a CPU (all its tensors and runtime)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# -- data ----------------------------------------------------------------------------------------
def random_images(n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> list[Image.Image]:
    """ImageNet-sized RGB images of smooth random colour fields (what a crop pipeline sees)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        images.append(Image.fromarray(small).resize(size, Image.BICUBIC))
    return images


class SyntheticImages:
    """Stands in for a task's training images: one synthetic batch (:class:`SyntheticSource`)."""

    def __init__(self, transform: Callable, seed: int = 0) -> None:
        self.transform, self.seed = transform, seed

    def train_source(self, batch_size: int, rank: int, world_size: int, collate_fn: Callable, repeat_batches: int = 0,
                     pin_memory: bool = False) -> SyntheticSource:
        return SyntheticSource(self.transform, collate_fn, batch_size, seed=self.seed)

    def finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        return finish_on_device(self.transform, batch)


class SyntheticSource:
    """One batch made by the method's own augmentation and collation from random images, served
    again and again: the benchmark then measures the model, not the loader. Same interface as the
    training sources (``batches_per_epoch``, ``loader(epoch, start_batch)``)."""

    def __init__(self, transform: Callable, collate_fn: Callable, batch_size: int, seed: int = 0,
                 batches_per_epoch: int = 1_000_000) -> None:
        torch.manual_seed(seed)
        samples = [{"image": transform(img), "label": 0, "index": i, "bad": []}
                   for i, img in enumerate(random_images(batch_size, seed=seed))]
        self.batch = collate_fn(samples)
        self._batches = batches_per_epoch

    @property
    def batches_per_epoch(self) -> int:
        return self._batches

    def loader(self, epoch: int, start_batch: int = 0) -> Iterable[Any]:
        return _Repeat(self.batch, self._batches - start_batch)


class _Repeat:
    def __init__(self, item: Any, n: int) -> None:
        self.item, self.n = item, n

    def __iter__(self):
        for _ in range(self.n):
            yield self.item


# -- the benchmark of the project's own loop -------------------------------------------------------
def crops_label(config: Any) -> str:
    """The DINO-family multi-crop of the config (what the lightly baseline builds)."""
    d = config.data
    return f"2x{d.global_crop_size}+{d.n_local_crops}x{d.local_crop_size}"


def batch_crops_label(batch: Any) -> str:
    """The views a method's batch really holds, e.g. ``2x224+10x96`` (multi-crop) or ``1x224`` (one image):
    SimSiam, SMD and FD ignore ``data.n_local_crops``."""
    views = batch["crops"] if isinstance(batch, dict) and "crops" in batch else [batch["image"]]
    counts: dict[int, int] = {}
    for v in views:
        counts[v.shape[-1]] = counts.get(v.shape[-1], 0) + 1
    return "+".join(f"{n}x{size}" for size, n in counts.items())


def benchmark_config(config: Any, run_dir: str) -> Any:
    """The recipe as given, minus what a throughput run must not do: checkpoints, trackers,
    online kNN, progress bars; logs go to a scratch directory."""
    c = copy.deepcopy(config)
    c.train.output_dir = run_dir
    c.train.checkpoint_every = 10**9
    c.train.log_every = 10**9
    c.train.trackers = []
    c.train.progress_bar = False
    c.train.max_steps = 0
    c.knn.val_path = ""
    return c


def run_benchmark(config: Any, make_task: Callable[[Any], Task], steps: int, warmup: int = 1,
                  data: str = "synthetic", flops: bool = True, matmul: bool = True) -> dict[str, Any]:
    """``warmup`` optimizer steps, then ``steps`` timed ones of the recipe through the real loop (its
    optimizer, precision, EMA and logging; ``make_task(config)`` builds the method), then one more
    under the FLOP counter."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"--benchmark needs at least 1 step (got {steps}) and warm-up >= 0 (got {warmup})")
    if data not in ("synthetic", "real"):
        raise ValueError(f"benchmark data must be 'synthetic' or 'real', got {data!r}")
    if config.train.grad_accum_steps != 1:
        raise ValueError("the throughput benchmark times optimizer steps of one micro-batch: "
                         "set train.grad_accum_steps=1")

    with tempfile.TemporaryDirectory(prefix="selfdistill-bench-") as tmp:
        bench = benchmark_config(config, tmp)
        synthetic = None if data == "real" else (lambda task: SyntheticImages(task.train_transform(), bench.train.seed))
        trainer = Trainer(bench, lambda: make_task(bench), data=synthetic)
        trainer.build()
        crops = batch_crops_label(next(iter(trainer.source.loader(0)))) if data == "synthetic" else None
        device = trainer.accelerator.device
        # One pass, warm-up included, so a real-data loader is not restarted before the timed steps.
        timer = StepTimer(device, skip=warmup, gate=gate_from_env())
        trainer.hooks.append(timer)
        trainer.run_until(warmup + steps)
        timer.stop()
        trainer.hooks.remove(timer)
        peak = peak_memory_gib(device)
        n_params = sum(p.numel() for p in unwrap(trainer.accelerator, trainer.student).parameters())
        flops_per_step = count_flops(lambda: trainer.run_until(warmup + steps + 1))[1] if flops else 0
        report = make_report(
            impl="selfdistill", config=config, summary=timer.summary(), peak_gib=peak,
            flops_per_step=flops_per_step, device=device, data=data, student_parameters=n_params, crops=crops,
            matmul=matmul_flops_per_s(config.train.precision, device) if matmul else None)
        trainer.accelerator.end_training()
    return report


def make_report(impl: str, config: Any, summary: dict[str, Any], peak_gib: float,
                flops_per_step: int, device: torch.device, data: str, student_parameters: int,
                matmul: dict[str, float] | None, crops: str | None = None) -> dict[str, Any]:
    """One implementation's numbers, in the schema both the project and the baseline report."""
    step_times, cpu_s = summary["step_s"], summary["cpu_s"]
    batch = config.train.batch_size_per_device
    total = sum(step_times)
    steps = len(step_times)
    report: dict[str, Any] = {
        "impl": impl, "method": config.method.name, "model": config.model.name, "crops": crops or crops_label(config),
        "batch": batch, "precision": config.train.precision, "threads": torch.get_num_threads(),
        "device": str(device), "data": data, "steps": steps, "student_parameters": student_parameters,
        "images_per_s": batch * steps / total, "step_s_median": statistics.median(step_times),
        "step_s": step_times, "step_cpu_s": summary["step_cpu_s"], "phases_s": summary["phases_s"],
        "cpu_s_per_step": cpu_s / steps, "images_per_cpu_s": batch * steps / max(cpu_s, 1e-9),
        "peak_memory_gib": peak_gib, "flops_per_step": flops_per_step,
        "achieved_flops_per_s": flops_per_step * steps / total,
    }
    if matmul:
        report["matmul_flops_per_s"] = matmul["flops_per_s"]
        report["matmul_flops_per_cpu_s"] = matmul["flops_per_cpu_s"]
        report["flops_fraction"] = report["achieved_flops_per_s"] / matmul["flops_per_s"]
        report["flops_fraction_cpu"] = (flops_per_step * steps / max(cpu_s, 1e-9)) / matmul["flops_per_cpu_s"]
    return report


def format_report(r: dict[str, Any]) -> str:
    """A few human-readable lines."""
    phases = "  ".join(f"{p} {r['phases_s'].get(p, 0.0) * 1000:.0f}" for p in PHASES)
    lines = [
        f"{r['impl']}: {r['method']} {r['model']} {r['crops']} batch {r['batch']} {r['precision']} "
        f"{r['threads']} thread(s) on {r['device']}, {r['data']} data, {r['steps']} timed step(s)",
        f"  images/s {r['images_per_s']:.3f}   step {r['step_s_median']:.3f} s (median)   "
        f"images per CPU-second {r['images_per_cpu_s']:.3f}",
        f"  per step (ms): {phases}",
        f"  peak memory {r['peak_memory_gib']:.2f} GiB   model FLOPs/step {r['flops_per_step'] / 1e9:.1f} G   "
        f"achieved {r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s",
    ]
    if "flops_fraction" in r:
        lines.append(f"  dense matmul {r['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s ({r['precision']}): achieved "
                     f"{100 * r['flops_fraction']:.0f}% of it (by CPU time: {100 * r['flops_fraction_cpu']:.0f}%)")
    return "\n".join(lines)
