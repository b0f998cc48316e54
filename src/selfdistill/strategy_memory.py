"""What each distribution strategy (DDP, ZeRO-1/2/3, with or without CPU offload) keeps per rank.

The planner's counted half: the student's training state between optimizer steps
(:func:`state_bytes`) and what a step adds besides activations (:func:`step_transient_bytes`),
from the parameters' element counts alone, by DeepSpeed's own buffer rules; and the DeepSpeed
JSON of each strategy (:func:`deepspeed_config`). Pure arithmetic: no tensor, no process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["STRATEGIES", "Strategy", "deepspeed_config", "state_bytes", "step_transient_bytes"]


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
