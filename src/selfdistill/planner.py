"""Which distribution strategy, micro-batch and accumulation fit a recipe on given devices.

The planner predicts the peak memory of one rank as

    runtime + teacher + model/optimizer state + max(rise of forward + backward, optimizer step)

* **state** (student weights, gradients kept between steps, fp32 masters, optimizer moments, the
  strategy's persistent buffers) is *counted*, from the student's parameter tensors and DeepSpeed's
  own buffer rules (:func:`state_bytes`; the ZeRO paper's bytes per parameter where DeepSpeed
  follows it, its real buffers where it does not);
* **the rise** of forward + backward (activations, and the gradients as backward writes them) is
  *measured*: the recipe's real training step at two micro-batch sizes on the device at hand
  (:func:`profile_recipe`), so it holds for every method and crop set, EMA and frozen teachers
  included; what a strategy adds during a step is counted (:func:`step_transient_bytes`);
* **runtime** is what the process holds before the model exists (measured; on a GPU the allocator
  does not count the CUDA context, which the ``reserve`` covers).

:func:`plan` turns that into one row per strategy x activation checkpointing: the largest
micro-batch under the memory budget, the accumulation that reaches the global batch, and a step
time relative to pure compute (recomputation, communication volume per step from the ZeRO paper's
accounting, offload traffic). :func:`write_launch` writes the recommended row as ready-to-run files;
:func:`measure_run` runs real steps and measures them (``--verify``).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from selfdistill.atomic import write_json_atomic, write_text_atomic
from selfdistill.engine.distributed import uses_deepspeed

GIB = 2**30

__all__ = ["Profile", "Row", "STRATEGIES", "Strategy", "Target", "Timing", "choose", "deepspeed_config",
           "largest_micro_batch", "measure_run", "parse_bytes", "plan", "predict_peak", "profile_recipe", "render",
           "split_batch", "state_bytes", "step_transient_bytes", "verify", "write_launch"]


# -- strategies and their DeepSpeed configs ---------------------------------------------------------
@dataclass(frozen=True)
class Strategy:
    name: str
    stage: int  # 0: DDP
    offload: bool = False

    @property
    def deepspeed(self) -> bool:
        return self.stage > 0


STRATEGIES = {s.name: s for s in (Strategy("ddp", 0), Strategy("zero1", 1), Strategy("zero2", 2), Strategy("zero3", 3),
                                  Strategy("zero2_offload", 2, True), Strategy("zero3_offload", 3, True))}


def deepspeed_config(strategy: Strategy, clip_grad: float = 3.0) -> dict[str, Any]:
    """The DeepSpeed JSON of ``strategy`` (the files in ``ds_configs/`` are these for DINO's
    clipping, ``tests/test_planner.py`` checks it). Precision and batch sizes stay ``auto``: the
    recipe sets them."""
    zero: dict[str, Any] = {"stage": strategy.stage}
    if strategy.stage == 1:
        zero.update(reduce_bucket_size=50_000_000, allgather_bucket_size=50_000_000)
    elif strategy.stage == 2:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_scatter=True,
                    reduce_bucket_size=50_000_000, allgather_bucket_size=50_000_000)
    else:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=10_000_000,
                    stage3_prefetch_bucket_size=5_000_000, stage3_param_persistence_threshold=100_000,
                    stage3_max_live_parameters=100_000_000, stage3_max_reuse_distance=100_000_000,
                    stage3_gather_16bit_weights_on_model_save=True)
    if strategy.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if strategy.stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "zero_optimization": zero,
            "gradient_clipping": clip_grad, "gradient_accumulation_steps": "auto",
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "steps_per_print": 1_000_000_000, "wall_clock_breakdown": False}


# -- model + optimizer state ----------------------------------------------------------------------
# DeepSpeed 0.19.8's buffers, read from its source and checked byte for byte against the tensors of
# real 2-rank runs (tests/test_planner.py). Where they differ from the ZeRO paper's 2 + 2 + 12 bytes
# per parameter: ZeRO-1/2 keep the whole 16-bit (or fp32) flat model on every rank; the fp32 master
# partition is a separate copy even in fp32 training; ZeRO-3 keeps a 16-bit gradient partition and
# a reduce bucket between steps; offload adds fp32 gradient partitions and staging buffers.
ALIGNMENT = 2  # stage_1_and_2.py: nccl_start_alignment_factor (also for fp32)
DEFAULT_REDUCE_BUCKET = 500_000_000  # deepspeed.runtime.zero.config defaults
DEFAULT_SUB_GROUP = 1_000_000_000


def _zero(ds_config: dict[str, Any] | None) -> dict[str, Any]:
    return dict((ds_config or {}).get("zero_optimization", {}))


def _z12_partition(group: list[int], ranks: int) -> int:
    """Elements of one rank's partition of a flattened ZeRO-1/2 group (padded to alignment x ranks)."""
    align = ALIGNMENT * ranks
    return math.ceil(sum(group) / align) * align // ranks


def _z3_subgroups(group: list[int], ranks: int, sub_group_size: int) -> list[int]:
    """ZeRO-3 partition elements (ceil(numel / ranks) per tensor) summed per optimizer sub-group."""
    parts = [math.ceil(n / ranks) for n in group]
    if sub_group_size >= sum(parts):
        return [sum(parts)]
    out, current = [], 0
    for i, n in enumerate(parts):
        current += n
        if current >= sub_group_size or i == len(parts) - 1:
            out.append(current)
            current = 0
    return out


def state_bytes(groups: list[list[int]], frozen: list[int], ranks: int, precision: str, optimizer: str,
                strategy: Strategy, ds_config: dict[str, Any] | None = None,
                buffers: list[list[int]] | None = None) -> dict[str, int]:
    """Bytes per rank the student's training state holds between optimizer steps, by kind.

    ``groups``: the trainable parameters' element counts per optimizer group, in order (DeepSpeed
    flattens and pads per group; lr = 0 groups are ordinary ones for memory); ``frozen``: the
    student's ``requires_grad=False`` tensors; ``buffers``: its buffers as ``[elements, bytes per
    element, floating point]`` (whole on every rank; DeepSpeed casts floating ones to 16 bits). DDP
    keeps fp32 weights in every precision (autocast)."""
    groups = [g for g in groups if g]
    ds_config = ds_config if ds_config is not None else deepspeed_config(strategy)
    trainable = sum(map(sum, groups))
    adam = optimizer == "adamw" or strategy.offload  # Accelerate maps any optimizer to CPU Adam when offloading
    step_scalars = optimizer == "adamw" and not strategy.offload  # torch keeps a 0-d fp32 step per tensor/group
    out = dict.fromkeys(("weights", "frozen_weights", "grads", "master", "optimizer", "buffers", "scalars"), 0)
    lp = 4 if precision == "fp32" else 2  # the engine casts the module (frozen tensors too) to 16 bits
    out["module_buffers"] = sum(n * (lp if floating and strategy.deepspeed else size) for n, size, floating in buffers or [])
    if strategy.stage == 0:
        out["weights"], out["frozen_weights"] = 4 * trainable, 4 * sum(frozen)
        out["buffers"] = 4 * trainable  # the reducer's gradient buckets (the .grad are freed after the step)
        out["optimizer"] = (8 * trainable + 4 * sum(map(len, groups))) if optimizer == "adamw" else 4 * trainable
        return out
    z = _zero(ds_config)
    if strategy.stage in (1, 2):
        parts = [_z12_partition(g, ranks) for g in groups]
        p = sum(parts)
        out["weights"] = lp * p * ranks  # bit16_groups_flat: the whole padded model on every rank
        out["frozen_weights"] = lp * sum(frozen)
        out["master"] = 4 * p  # single_partition_of_fp32_groups, a copy even in fp32
        out["optimizer"] = (8 if adam else 4) * p + (4 * len(groups) if step_scalars else 0)
        out["scalars"] = 4  # the global gradient norm
        if strategy.offload:
            out["grads"] = 4 * p  # the fp32 partition's .grad, kept for the CPU optimizer
            biggest = max((n for g in groups for n in g), default=0)
            out["buffers"] = lp * p + 2 * lp * biggest  # bit16 staging partition + temporary gradient buffers
        return out
    subgroups = [n for g in groups for n in _z3_subgroups(g, ranks, int(z.get("sub_group_size", DEFAULT_SUB_GROUP)))]
    p = sum(subgroups)
    out["weights"] = lp * p  # this rank's partition of every parameter
    out["frozen_weights"] = lp * sum(math.ceil(n / ranks) for n in frozen)
    out["grads"] = lp * p + (4 * p if strategy.offload else 0)  # 16-bit gradient partition (+ fp32 for offload)
    out["master"] = 4 * p
    out["optimizer"] = (8 if adam else 4) * p + (4 * len(subgroups) if step_scalars else 0)
    out["buffers"] = lp * int(float(z.get("reduce_bucket_size", DEFAULT_REDUCE_BUCKET)))  # the reduce bucket, kept
    out["scalars"] = (4 if strategy.offload else 8) + 1  # gradient norm, inf/nan flag
    return out


def step_transient_bytes(groups: list[list[int]], frozen: list[int], ranks: int, precision: str,
                         strategy: Strategy, ds_config: dict[str, Any] | None = None,
                         host: bool = False) -> dict[str, int]:
    """What a step adds to the state besides activations: ``early`` (from backward's start, beside
    the most activations), ``late`` (by backward's end) and ``step`` (the optimizer step, after them). DDP's are the full fp32 gradients; ZeRO-1/2 allocate
    (1 + overlap_comm) reduce buckets whole at the first gradient hook and keep one bucket of
    gradients pending; ZeRO-3 gathers the small persistent parameters for the whole step and the
    others module by module (bounded by max_live_parameters + prefetch: an upper bound). ``host``:
    on CPU ranks the resident set holds only the pages of a bucket that gradients were written to."""
    groups = [g for g in groups if g]
    ds_config = ds_config if ds_config is not None else deepspeed_config(strategy)
    trainable = sum(map(sum, groups))
    if strategy.stage == 0:
        return {"early": 0, "late": 4 * trainable, "step": 4 * trainable}
    z = _zero(ds_config)
    lp = 4 if precision == "fp32" else 2
    biggest = max((n for g in groups for n in g), default=0)
    bucket = int(float(z.get("reduce_bucket_size", DEFAULT_REDUCE_BUCKET)))
    pending = lp * min(trainable, max(bucket, biggest))
    if strategy.stage in (1, 2):
        parts = [_z12_partition(g, ranks) for g in groups]
        overlap = bool(z.get("overlap_comm", False))
        n_buckets = (2 if overlap else 1) if (z.get("contiguous_gradients", True) or strategy.offload) else 0
        buckets = lp * (min(trainable, n_buckets * bucket) if host else n_buckets * bucket)
        partition = 0 if strategy.offload else lp * sum(parts)  # the reduced gradients, filled during backward
        step = 0 if strategy.offload else partition + 4 * max(parts, default=0)
        return {"early": buckets, "late": buckets + pending + partition, "step": step}
    subgroups = [n for g in groups for n in _z3_subgroups(g, ranks, int(z.get("sub_group_size", DEFAULT_SUB_GROUP)))]
    persist = int(float(z.get("stage3_param_persistence_threshold", 100_000)))
    every = [n for g in groups for n in g] + list(frozen)
    persistent = sum(n for n in every if n <= persist)
    live = int(float(z.get("stage3_max_live_parameters", 1_000_000_000))) + \
        int(float(z.get("stage3_prefetch_bucket_size", 50_000_000)))
    gathered = lp * persistent + lp * min(sum(every) - persistent, live)
    step = 0 if strategy.offload else 4 * max(subgroups, default=0)
    return {"early": gathered, "late": gathered + pending, "step": max(lp * persistent, step)}


# -- what the planner is given and what it measures ----------------------------------------------
def parse_bytes(text: str | int | float, option: str = "") -> int:
    """``80GiB``, ``40 GB``, ``512MiB`` or a number of bytes; given ``option`` (a command-line
    flag), a bare number other than 0 is refused: ``--gpu-memory 40`` means 40 GiB to a person."""
    if isinstance(text, (int, float)):
        return int(text)
    if option and text.strip().replace(".", "", 1).isdigit() and float(text) != 0:
        raise ValueError(f"{option} {text}: give a unit, e.g. {option} {text.strip()}GiB (or GB, MiB)")
    units = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    s = str(text).strip().lower().replace(" ", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 80GiB, 40GB, 512MiB)") from None
    if unit not in units or value < 0:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 80GiB, 40GB, 512MiB)")
    return int(value * units[unit])


@dataclass
class Target:
    """Where the recipe will run: device memory per rank, ranks, the global batch, and what of the
    memory is not planned: ``margin`` (a fraction, for fragmentation and measurement noise) and
    ``reserve`` (bytes outside the allocator: CUDA context, NCCL buffers)."""

    memory: int
    gpus: int = 8
    nodes: int = 1
    global_batch: int = 1024
    margin: float = 0.10
    reserve: int = int(1.5 * GIB)
    cpu: bool = False  # CPU ranks (gloo): memory is the resident set, the runtime counts

    @property
    def ranks(self) -> int:
        return self.gpus * self.nodes

    @property
    def budget(self) -> int:
        return int(self.memory * (1 - self.margin)) - self.reserve


@dataclass
class Timing:
    """The figures the step-time estimate assumes (per rank); ratios between rows depend on them
    only through communication against compute."""

    tflops: float = 125.0  # achieved training FLOP/s, in 1e12 (A100-class bf16 at ~40 % of peak)
    bandwidth_gbs: float = 150.0  # collective bus bandwidth inside a node, GB/s (NVLink)
    inter_node_gbs: float = 25.0  # per GPU between nodes, GB/s (200 Gb/s InfiniBand per GPU)
    pcie_gbs: float = 16.0  # host <-> device for offload, GB/s
    cpu_adam_params_per_s: float = 1.0e9  # DeepSpeed's CPU Adam, parameters per second per rank


@dataclass
class Profile:
    """The recipe, measured on the device at hand by :func:`profile_recipe`."""

    recipe: str
    precision: str
    optimizer: str
    device: str
    groups: list[list[int]]  # the student's trainable tensors' element counts per optimizer group
    frozen: list[int]  # the student's requires_grad=False tensors
    teacher_bytes: int  # EMA or frozen teacher, as held on a rank without ZeRO-3
    teacher_partitioned: bool  # a frozen teacher is partitioned over the ranks under ZeRO-3
    task_bytes: int  # the method's own tensors (DINO's centers)
    runtime_bytes: int
    batches: tuple[int, int]
    fwd_bwd: dict[str, list[int]] = field(default_factory=dict)  # "off"/"on" -> rise through backward, 2 batches
    forward: dict[str, list[int]] = field(default_factory=dict)  # "off"/"on" -> rise through forward alone
    flops_per_sample: float = 0.0
    buffers: list[list[int]] = field(default_factory=list)  # the student's: [elements, bytes each, floating point]

    @property
    def parameters(self) -> int:
        return sum(map(sum, self.groups))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        return cls(**{**d, "batches": tuple(d["batches"])})

    def line(self, kind: str, ckpt: bool) -> tuple[float, float]:
        """``(intercept, bytes per sample)`` of a measured rise (``fwd_bwd`` or ``forward``)."""
        lo, hi = getattr(self, kind)["on" if ckpt else "off"]
        b1, b2 = self.batches
        slope = max((hi - lo) / (b2 - b1), 0.0)
        return lo - slope * b1, slope

    def rise(self, ckpt: bool, micro_batch: int, early: int, late: int) -> float:
        """Forward + backward's rise under a strategy whose backward adds ``early`` bytes from its
        start (ZeRO's buckets, gathered weights) and ``late`` bytes by its end (DDP's full gradients).

        The probe ran without a strategy: its backward wrote full fp32 gradients (4 bytes per
        parameter), which a strategy replaces by its own. Where activations dominate, the rise peaks
        at backward's start (the forward rise, plus what a strategy allocates early); where they do
        not, at its end (the probe's rise minus its gradients, plus what the strategy holds then)."""
        a, s = self.line("forward", ckpt)
        f, g = self.line("fwd_bwd", ckpt)
        forward = a + s * micro_batch
        whole = f + g * micro_batch
        return max(forward + early, whole - 4 * self.parameters + late)


@dataclass
class Row:
    """One strategy x checkpointing setting on the target (bytes per rank; ``micro_batch`` 0: does not fit)."""

    strategy: str
    ckpt: bool
    state: int
    teacher: int
    transient: int
    activation_per_sample: float
    max_micro_batch: int
    micro_batch: int
    accumulation: int
    peak: int
    comm_bytes: float
    relative_time: float

    @property
    def fits(self) -> bool:
        return self.micro_batch > 0


def teacher_bytes_per_rank(profile: Profile, strategy: Strategy, ranks: int) -> int:
    if profile.teacher_partitioned and strategy.stage == 3:
        return math.ceil(profile.teacher_bytes / ranks)
    return profile.teacher_bytes


def predict_peak(profile: Profile, strategy: Strategy, ckpt: bool, ranks: int, micro_batch: int,
                 host: bool = False) -> int:
    """Bytes at one rank's high-water mark (not the reserve or margin): the larger of backward
    (activations + the strategy's backward transients) and the optimizer step. ``host``: CPU ranks,
    whose resident set includes the runtime; a GPU's allocator does not count it."""
    transient = step_transient_bytes(profile.groups, profile.frozen, ranks, profile.precision, strategy, host=host)
    fixed = ((profile.runtime_bytes if host else 0) + teacher_bytes_per_rank(profile, strategy, ranks)
             + profile.task_bytes + state_total(profile, strategy, ranks))
    rise = profile.rise(ckpt, micro_batch, transient["early"], transient["late"])
    return int(fixed + max(rise, transient["step"]))


def state_total(profile: Profile, strategy: Strategy, ranks: int) -> int:
    return sum(state_bytes(profile.groups, profile.frozen, ranks, profile.precision, profile.optimizer,
                           strategy, buffers=profile.buffers).values())


def comm_bytes_per_step(profile: Profile, strategy: Strategy, ranks: int, accumulation: int) -> float:
    """Bytes each rank sends per optimizer step (ring collectives, (N-1)/N of the volume): DDP
    all-reduces the gradients once (2 psi); ZeRO-1 reduce-scatters them and all-gathers the updated
    weights once (2 psi); ZeRO-2 reduce-scatters every micro-batch (psi each) and all-gathers once;
    ZeRO-3 gathers the weights for forward and backward and reduce-scatters every micro-batch (3 psi
    each). psi: parameters x bytes of the 16-bit or fp32 copy that travels."""
    if ranks == 1:
        return 0.0
    # DDP's gradients are fp32 (autocast keeps fp32 weights); DeepSpeed sends its 16-bit copies in bf16 / fp16
    psi = profile.parameters * (2 if profile.precision in ("bf16", "fp16") and strategy.deepspeed else 4)
    ring = (ranks - 1) / ranks
    if strategy.stage in (0, 1):
        volume = 2 * psi
    elif strategy.stage == 2:
        volume = psi * accumulation + psi
    else:
        volume = 3 * psi * accumulation
    return volume * ring


def relative_step_time(profile: Profile, strategy: Strategy, ckpt: bool, target: Target, accumulation: int,
                       timing: Timing) -> tuple[float, float]:
    """``(step time / pure compute time, bytes sent per step)``: compute x 4/3 with checkpointing (one
    more forward), communication at the bus bandwidth (none of it assumed hidden, so an upper bound),
    offload's host transfers and CPU Adam."""
    samples = target.global_batch / target.ranks
    compute = max(profile.flops_per_sample, 1.0) * samples / (timing.tflops * 1e12)
    comm = comm_bytes_per_step(profile, strategy, target.ranks, accumulation)
    bandwidth = (timing.inter_node_gbs if target.nodes > 1 else timing.bandwidth_gbs) * 1e9
    total = compute * (4 / 3 if ckpt else 1.0) + comm / bandwidth
    if strategy.offload:
        part = profile.parameters / target.ranks
        total += part * (2 + 2) / (timing.pcie_gbs * 1e9) + part / timing.cpu_adam_params_per_s
        if strategy.stage == 3:  # weights come up from the host for forward and backward
            total += 2 * accumulation * profile.parameters * 2 / target.ranks / (timing.pcie_gbs * 1e9)
    return total / compute, comm


def largest_micro_batch(profile: Profile, strategy: Strategy, ckpt: bool, target: Target, limit: int = 1 << 16) -> int:
    """The largest micro-batch whose predicted peak stays within the budget (0: not even one)."""
    fits = lambda b: predict_peak(profile, strategy, ckpt, target.ranks, b, host=target.cpu) <= target.budget  # noqa: E731
    if not fits(1):
        return 0
    lo, hi = 1, limit
    while lo < hi:  # the peak grows with the micro-batch
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def split_batch(global_batch: int, ranks: int, max_micro: int) -> tuple[int, int]:
    """``(micro-batch, accumulation)`` with micro x ranks x accumulation == global batch, the
    micro-batch as large as fits (at most ``max_micro``); ``(0, 0)`` when nothing fits."""
    if global_batch % ranks:
        raise ValueError(f"the global batch {global_batch} does not split over {ranks} ranks; "
                         f"use a multiple of {ranks}")
    per_rank = global_batch // ranks
    for accumulation in range(1, per_rank + 1):
        if per_rank % accumulation == 0 and per_rank // accumulation <= max_micro:
            return per_rank // accumulation, accumulation
    return 0, 0


def plan(profile: Profile, target: Target, strategies: list[str] | None = None,
         timing: Timing | None = None) -> tuple[list[Row], int | None]:
    """Every strategy x checkpointing row and the index of the recommended one (the fastest
    estimated step among those that fit; within 2 %, the simpler strategy), or None."""
    timing = timing or Timing()
    rows = []
    for name in strategies or list(STRATEGIES):
        strategy = STRATEGIES[name]
        for ckpt in (False, True):
            max_micro = largest_micro_batch(profile, strategy, ckpt, target)
            micro, accumulation = split_batch(target.global_batch, target.ranks, max_micro)
            rel, comm = relative_step_time(profile, strategy, ckpt, target, max(accumulation, 1), timing)
            rows.append(Row(
                strategy=name, ckpt=ckpt, state=state_total(profile, strategy, target.ranks),
                teacher=teacher_bytes_per_rank(profile, strategy, target.ranks),
                transient=step_transient_bytes(profile.groups, profile.frozen, target.ranks, profile.precision,
                                               strategy, host=target.cpu)["late"],
                activation_per_sample=profile.line("fwd_bwd", ckpt)[1], max_micro_batch=max_micro,
                micro_batch=micro, accumulation=accumulation,
                peak=predict_peak(profile, strategy, ckpt, target.ranks, micro, host=target.cpu) if micro else 0,
                comm_bytes=comm, relative_time=rel))
    fitting = [i for i, r in enumerate(rows) if r.fits]
    if not fitting:
        return rows, None
    best = min(r.relative_time for r in (rows[i] for i in fitting))
    return rows, next(i for i in fitting if rows[i].relative_time <= best * 1.02)


def choose(rows: list[Row], spec: str) -> int:
    """The row named ``STRATEGY`` (checkpointing off) or ``STRATEGY:ckpt``."""
    name, _, flag = spec.partition(":")
    if name not in STRATEGIES or flag not in ("", "ckpt"):
        raise ValueError(f"--choose takes STRATEGY or STRATEGY:ckpt with a strategy of {', '.join(STRATEGIES)}; "
                         f"got {spec!r}")
    for i, r in enumerate(rows):
        if r.strategy == name and r.ckpt == (flag == "ckpt"):
            if not r.fits:
                raise ValueError(f"{spec} does not fit the target (see the table)")
            return i
    raise ValueError(f"{spec} was not planned (--strategies)")


def render(rows: list[Row], best: int | None, profile: Profile, target: Target) -> str:
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    lines = [f"recipe {profile.recipe}: {profile.parameters / 1e6:.1f} M trainable student parameters, teacher "
             f"{gib(profile.teacher_bytes)} GiB, {profile.precision}, {profile.optimizer}; activations measured on "
             f"{profile.device} at micro-batches {profile.batches[0]} and {profile.batches[1]}",
             f"target: {target.ranks} ranks ({target.nodes} x {target.gpus}), {gib(target.memory)} GiB each, "
             f"global batch {target.global_batch}; budget {gib(target.budget)} GiB per rank "
             f"({target.margin:.0%} margin, {gib(target.reserve)} GiB reserve)", "",
             "| strategy | ckpt | state GiB/rank | teacher GiB | act. GiB/sample | max micro | micro x ranks x accum "
             "| peak GiB | comm GB/step | rel. step time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        split = f"{r.micro_batch} x {target.ranks} x {r.accumulation}" if r.fits else "does not fit"
        mark = " **<- recommended**" if i == best else ""
        lines.append(f"| {r.strategy} | {'on' if r.ckpt else 'off'} | {gib(r.state)} | {gib(r.teacher)} | "
                     f"{r.activation_per_sample / GIB:.3f} | {r.max_micro_batch} | {split} | "
                     f"{gib(r.peak) if r.fits else '-'} | {r.comm_bytes / 1e9:.2f} | "
                     f"{r.relative_time:.2f}{mark} |")
    if best is None:
        lines.append("\nno strategy fits: use more ranks, a smaller model or crops, or a device with more memory")
    return "\n".join(lines)


# -- measuring: the probe of one recipe, and real steps of a launch ----------------------------------
def measure_run(config: Any, out_dir: str | os.PathLike, steps: int = 3, flops: bool = False) -> dict[str, Any]:
    """Run ``steps`` optimizer steps of ``config`` on one synthetic batch through the real loop (its
    strategy as launched) and write this rank's memory to ``out_dir/rank{N}.json``: the runtime before
    the model, the peak, forward + backward per step, and the state counted tensor by tensor."""
    from selfdistill.engine.memory import MemoryMeter, StepMemory, tune_cpu_allocator
    from selfdistill.engine.throughput import SyntheticImages, benchmark_config, count_flops
    from selfdistill.engine.trainer import Trainer
    from selfdistill.methods import build_method
    from selfdistill.models.frozen import FrozenTeacher

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
        trainer = Trainer(bench, lambda: build_method(bench),
                          data=lambda task: SyntheticImages(task.train_transform(), bench.train.seed))
        trainer.build()
        step_memory = StepMemory(meter)
        trainer.hooks.append(step_memory)
        trainer.run_until(steps)
        trainer.hooks.remove(step_memory)
        acc, task = trainer.accelerator, trainer.task
        counted = count_state(trainer)
        result = {
            "rank": acc.process_index, "world_size": acc.num_processes, "device": str(meter.device),
            "runtime_bytes": runtime, "peak_bytes": step_memory.overall_peak(),
            "fwd_bwd_bytes": step_memory.steps[-1], "fwd_bwd_steps": step_memory.steps,
            "forward_bytes": step_memory.forward_steps[-1],
            "state": counted, "state_bytes": counted["student"],
            "teacher_bytes": teacher_bytes(task),
            # partitioned under ZeRO-3 only when every teacher is frozen (DINOv2's distillation also keeps an EMA copy)
            "teacher_frozen": all(isinstance(t, FrozenTeacher) for t in teacher_modules(task)) and bool(teacher_modules(task)),
            "groups": None if trainer.deepspeed else [[p.numel() for p in g["params"]] for g in trainer.optimizer.param_groups],
            "frozen": [p.numel() for p in acc.unwrap_model(trainer.student).parameters() if not p.requires_grad],
            "buffers": [[b.numel(), b.element_size(), int(b.is_floating_point())]
                        for b in acc.unwrap_model(trainer.student).buffers()],
            "task_bytes": sum(held_tensors(task).values()),
            "micro_batch": bench.train.batch_size_per_device,
        }
        if flops:
            _, n = count_flops(lambda: trainer.run_until(steps + 1))
            result["flops_per_sample"] = n / bench.train.batch_size_per_device
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
    from selfdistill.engine.memory import ddp_bucket_bytes, live_tensor_bytes

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
    from selfdistill.models.frozen import FrozenTeacher

    others = [v for k, v in vars(task).items() if k != "teacher" and isinstance(v, FrozenTeacher)]
    return [t for t in [getattr(task, "teacher", None), *others] if t is not None]


def teacher_bytes(task: Any) -> int:
    """Bytes of the task's teachers (EMA copy, frozen networks) as this rank holds them."""
    return sum(storages({f"{i}.{k}": v for i, t in enumerate(teacher_modules(task))
                         for k, v in module_tensors(t).items()}).values())


def optimizer_kind(name: str) -> str:
    """How the state accounting counts an optimizer: ``adamw`` (two fp32 moments per parameter: the
    Adam family, LAMB, and, on the safe side, every optimizer with betas) or ``sgd`` (one: SGD,
    LARS and other momentum methods)."""
    from timm.optim import get_optimizer_info

    if name in ("adamw", "sgd"):
        return name
    return "adamw" if get_optimizer_info(name).has_betas else "sgd"


def unmeasured_profile(config: Any, recipe: str = "") -> Profile | None:
    """What the accounting needs of ``config`` without running a step: the method built on the meta
    device (no memory, no weights read) for its optimizer groups, frozen tensors, buffers, teacher
    and task tensors; no activations. None when the method cannot be built there (a teacher read
    from a file)."""
    from selfdistill.methods import build_method

    try:
        with torch.device("meta"):
            task = build_method(copy.deepcopy(config))
            optimizer = task.build_optimizer(config.train.batch_size_per_device, torch.device("meta"))
    except Exception:  # noqa: BLE001 - any failure only means: measure first, as before
        return None
    from selfdistill.models.frozen import FrozenTeacher

    student = task.student
    return Profile(recipe=recipe, precision=config.train.precision, optimizer=optimizer_kind(config.optim.name),
                   device="meta", groups=[[p.numel() for p in g["params"]] for g in optimizer.param_groups],
                   frozen=[p.numel() for p in student.parameters() if not p.requires_grad],
                   buffers=[[b.numel(), b.element_size(), int(b.is_floating_point())] for b in student.buffers()],
                   # meta tensors share one null pointer, so storages() cannot tell them apart: count each
                   # teacher tensor once; the method's own small tensors (centers) are left out of the bound
                   teacher_bytes=sum(t.nbytes for t in module_tensors(getattr(task, "teacher", None)).values()),
                   task_bytes=0,
                   teacher_partitioned=isinstance(getattr(task, "teacher", None), FrozenTeacher),
                   runtime_bytes=0, batches=(1, 2))


def state_floor(profile: Profile, target: Target, strategies: list[str] | None = None) -> tuple[int, str]:
    """``(bytes, strategy)``: the least any of ``strategies`` holds per rank before a single
    activation (training state, teacher, task tensors and the step's own transients); pure
    accounting, so an impossible budget is refused before anything is measured."""
    floors = []
    for name in strategies or list(STRATEGIES):
        strategy = STRATEGIES[name]
        transient = step_transient_bytes(profile.groups, profile.frozen, target.ranks, profile.precision, strategy,
                                         host=target.cpu)
        fixed = teacher_bytes_per_rank(profile, strategy, target.ranks) + profile.task_bytes + \
            state_total(profile, strategy, target.ranks)
        floors.append((int(fixed + max(transient["early"], transient["step"])), name))
    return min(floors)


def memory_for(peak: int, target: Target) -> int:
    """The device memory per rank whose budget (after ``target``'s margin and reserve) holds ``peak``."""
    return math.ceil((peak + target.reserve) / (1 - target.margin))


def smallest_fitting_memory(profile: Profile, target: Target, strategies: list[str] | None = None) -> tuple[int, str]:
    """``(memory per rank, row)``: the least device memory on which some row fits (micro-batch 1,
    the rest by accumulation), for the "no strategy fits" answer."""
    need = []
    for name in strategies or list(STRATEGIES):
        for ckpt in (False, True):
            peak = predict_peak(profile, STRATEGIES[name], ckpt, target.ranks, 1, host=target.cpu)
            need.append((memory_for(peak, target), name + (":ckpt" if ckpt else "")))
    return min(need)


def probe_command(config_path: Path, out_dir: Path, steps: int, flops: bool) -> list[str]:
    cmd = [sys.executable, "-m", "selfdistill.cli.pretrain", "--config", str(config_path),
           "--measure-memory", str(out_dir), "--measure-steps", str(steps)]
    return cmd + (["--measure-flops"] if flops else [])


def profile_recipe(config: Any, recipe: str = "", batches: tuple[int, int] = (2, 4), steps: int = 3,
                   progress: Callable[[str], None] | None = None) -> Profile:
    """Measure ``config``'s training step on this machine: one fresh process per micro-batch size and
    checkpointing setting (so each high-water mark is its own), single rank, no DeepSpeed."""
    from selfdistill.engine.throughput import benchmark_config

    if not 0 < batches[0] < batches[1]:
        raise ValueError(f"the probe needs two micro-batch sizes, smaller first (got {batches})")
    fwd_bwd: dict[str, list[int]] = {"off": [], "on": []}
    forward: dict[str, list[int]] = {"off": [], "on": []}
    first: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="selfdistill-plan-") as tmp:
        for ckpt in (False, True):
            for b in batches:
                c = benchmark_config(config, str(Path(tmp) / "run"))
                c.model.grad_checkpointing = ckpt
                c.train.batch_size_per_device, c.train.grad_accum_steps = b, 1
                path = Path(tmp) / f"probe_{int(ckpt)}_{b}.yaml"
                write_text_atomic(path, c.to_yaml())
                if progress:
                    progress(f"measuring forward + backward: micro-batch {b}, checkpointing {'on' if ckpt else 'off'}")
                out = Path(tmp) / f"probe_{int(ckpt)}_{b}"
                env = {k: v for k, v in os.environ.items()
                       if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_DEEPSPEED")}
                flops = not ckpt and b == batches[0]
                r = subprocess.run(probe_command(path, out, steps, flops), env=env, capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"the probe at micro-batch {b} failed:\n{r.stderr[-3000:]}")
                result = json.loads((out / "rank0.json").read_text())
                fwd_bwd["on" if ckpt else "off"].append(result["fwd_bwd_bytes"])
                forward["on" if ckpt else "off"].append(result["forward_bytes"])
                if flops:
                    first = result
    return Profile(recipe=recipe, precision=config.train.precision, optimizer=optimizer_kind(config.optim.name),
                   device=first["device"], groups=first["groups"], frozen=first["frozen"], buffers=first["buffers"],
                   teacher_bytes=first["teacher_bytes"], task_bytes=first["task_bytes"],
                   teacher_partitioned=first["teacher_frozen"],
                   runtime_bytes=first["runtime_bytes"], batches=tuple(batches), fwd_bwd=fwd_bwd, forward=forward,
                   flops_per_sample=first.get("flops_per_sample", 0.0))

# -- ready-to-run files, and checking them -------------------------------------------------------------
def accelerate_yaml(strategy: Strategy, ranks: int, nodes: int, cpu: bool, precision: str,
                    deepspeed_json: Path | None = None) -> str:
    """The Accelerate config of a launch (naming ``deepspeed_json`` for ZeRO)."""
    head = [f"# written by selfdistill-plan: {strategy.name}, {ranks} ranks on {nodes} machine(s)"]
    if nodes > 1:
        head.append("# on every machine: accelerate launch --config_file accelerate.yaml --machine_rank N "
                    "--main_process_ip HEAD_IP ...")
    lines = ["compute_environment: LOCAL_MACHINE"]
    if strategy.deepspeed:
        lines += ["distributed_type: DEEPSPEED", "deepspeed_config:",
                  f"  deepspeed_config_file: {json.dumps(str(deepspeed_json))}", "  zero3_init_flag: false"]
        if nodes > 1:
            lines.append("  deepspeed_multinode_launcher: standard")
    else:
        # MULTI_GPU with use_cpu starts the ranks with torchrun on a CPU-only machine (gloo)
        mixed = {"bf16": "bf16", "fp16": "fp16"}.get(precision, "no")
        lines += ["distributed_type: MULTI_GPU", f'mixed_precision: "{mixed}"', "gpu_ids: all"]
    lines += [f"num_machines: {nodes}", f"num_processes: {ranks}", "machine_rank: 0"]
    if nodes > 1:
        lines += ["main_process_ip: 127.0.0.1", "main_process_port: 29500"]
    lines += ["rdzv_backend: static", "same_network: true", f"use_cpu: {str(cpu).lower()}"]
    return "\n".join(head + lines) + "\n"


def launch_overrides(row: Row) -> list[str]:
    return [f"train.batch_size_per_device={row.micro_batch}", f"train.grad_accum_steps={row.accumulation}",
            f"model.grad_checkpointing={str(row.ckpt).lower()}"]


def write_launch(out: str | os.PathLike, row: Row, target: Target, recipe: str | list[str] | None, overrides: list[str],
                 precision: str, clip_grad: float, cpu: bool = False) -> dict[str, Path]:
    """``accelerate.yaml`` (+ ``deepspeed.json``), ``overrides.txt`` and ``launch.sh`` for ``row``:
    ``launch.sh [more overrides]`` starts the run from any directory."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    strategy = STRATEGIES[row.strategy]
    files = {"accelerate": out / "accelerate.yaml", "overrides": out / "overrides.txt", "launch": out / "launch.sh"}
    write_text_atomic(files["accelerate"], accelerate_yaml(strategy, target.ranks, target.nodes, cpu, precision,
                                                           out / "deepspeed.json"))
    if strategy.deepspeed:
        files["deepspeed"] = out / "deepspeed.json"
        write_json_atomic(files["deepspeed"], deepspeed_config(strategy, clip_grad), indent=2)
    planned = launch_overrides(row)
    keys = {o.split("=", 1)[0] for o in planned}
    every = [o for o in overrides if o.split("=", 1)[0] not in keys] + planned  # the plan's values win
    write_text_atomic(files["overrides"], "".join(f"{o}\n" for o in every))
    recipes = [recipe] if isinstance(recipe, str) else list(recipe or [])
    config_arg = "".join(f" --config {shlex.quote(str(Path(r).resolve()))}" for r in recipes)
    script = (f"#!/usr/bin/env bash\n# {row.strategy}, activation checkpointing {'on' if row.ckpt else 'off'}: "
              f"micro-batch {row.micro_batch} x {target.ranks} ranks x {row.accumulation} accumulation = global "
              f"batch {target.global_batch}; predicted peak {row.peak / GIB:.2f} GiB per rank\n"
              'here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"\n'
              f'exec "${{ACCELERATE:-accelerate}}" launch --config_file "$here/accelerate.yaml" -m selfdistill.cli.pretrain{config_arg} '
              + " ".join(shlex.quote(o) for o in every) + ' "$@"\n')
    write_text_atomic(files["launch"], script)
    files["launch"].chmod(0o755)
    return files


def verify(profile: Profile, row: Row, target: Target, recipe: str | list[str] | None, overrides: list[str],
           precision: str, clip_grad: float, out: Path, micro_cap: int = 0, steps: int = 3) -> dict[str, Any]:
    """One real run of ``row``'s setting scaled to this machine (its GPUs, or 2 gloo ranks on a CPU;
    the micro-batch at most ``micro_cap`` when given): the launch files written, started with
    ``--measure-memory``, and the measured peak per rank against the prediction."""
    cuda = torch.cuda.device_count()
    ranks = min(target.ranks, cuda) if cuda else 2
    micro = row.micro_batch if not micro_cap else min(row.micro_batch, micro_cap)
    strategy = STRATEGIES[row.strategy]
    local = Target(memory=target.memory, gpus=ranks, nodes=1, global_batch=micro * ranks, margin=target.margin,
                   reserve=target.reserve, cpu=not cuda)
    local_row = copy.copy(row)
    local_row.micro_batch, local_row.accumulation = micro, 1
    local_row.peak = predict_peak(profile, strategy, row.ckpt, ranks, micro, host=local.cpu)
    files = write_launch(out / "launch", local_row, local, recipe, overrides, precision, clip_grad, cpu=not cuda)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["ACCELERATE"] = str(Path(sys.executable).with_name("accelerate"))  # this environment's launcher
    cmd = ["bash", str(files["launch"]), "--measure-memory", str(out / "measured"), "--measure-steps", str(steps)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"the verification run failed ({shlex.join(cmd)}):\n{r.stderr[-3000:]}")
    measured = [json.loads((out / "measured" / f"rank{i}.json").read_text()) for i in range(ranks)]
    worst = max(m["peak_bytes"] for m in measured)
    predicted_state = state_total(profile, strategy, ranks)
    return {"strategy": row.strategy, "ckpt": row.ckpt, "ranks": ranks, "micro_batch": micro,
            "predicted_peak": local_row.peak, "measured_peak": worst, "error": local_row.peak / worst - 1,
            "predicted_state": predicted_state, "measured_state": max(m["state_bytes"] for m in measured),
            "ranks_measured": measured}
