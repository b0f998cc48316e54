"""Schedules evaluated per optimizer step, with the exact values of DINO's ``cosine_scheduler``."""

from __future__ import annotations

import math
from typing import Any


def cosine_schedule(
    step: int,
    total_steps: int,
    base: float,
    final: float,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> float:
    """Value at ``step`` of a linear warm-up followed by a half-cosine from ``base`` to ``final``.

    It reproduces ``utils.cosine_scheduler`` of facebookresearch/dino entry by entry: the warm-up
    is ``linspace(warmup_start, base, warmup_steps)`` (so it reaches ``base`` on its last step),
    then ``final + (base - final) * (1 + cos(pi * i / n)) / 2`` over the ``n`` remaining steps.
    Steps past the end keep the last value.
    """
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    step = min(max(int(step), 0), total_steps - 1)
    if step < warmup_steps:
        if warmup_steps == 1:
            return float(warmup_start)
        return warmup_start + (base - warmup_start) * step / (warmup_steps - 1)
    i = step - warmup_steps
    n = total_steps - warmup_steps
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * i / n))


def linear_warmup_then_constant(epoch: int, warmup_epochs: int, start: float, end: float) -> float:
    """DINO's teacher temperature: ``linspace(start, end, warmup_epochs)`` then ``end``, per epoch."""
    if epoch >= warmup_epochs:
        return float(end)
    if warmup_epochs == 1:
        return float(start)
    return start + (end - start) * epoch / (warmup_epochs - 1)


class GroupCosineScheduler:
    """DINO's per-optimizer-step schedules applied to named parameter groups: the learning rate
    warms up linearly from 0 and follows a cosine to ``min_lr``, weight decay a cosine from
    ``weight_decay`` to ``weight_decay_end``. A group may keep the peak rate (``fixed_lr``), stay
    at rate 0 for its first ``frozen_epochs``, take no weight decay (``apply_wd`` false) or scale
    its rate (``lr_scale``: DINOv2's layer-wise decay)."""

    def __init__(self, optimizer: Any, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
                 weight_decay: float, weight_decay_end: float, steps_per_epoch: int) -> None:
        self.optimizer, self.base_lr, self.min_lr = optimizer, base_lr, min_lr
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.weight_decay, self.weight_decay_end = weight_decay, weight_decay_end
        for group in optimizer.param_groups:
            group["frozen_steps"] = int(round(group.get("frozen_epochs", 0) * steps_per_epoch))

    def step_update(self, step: int) -> dict[str, float]:
        """Set every group for optimizer step ``step``; returns the scheduled ``lr`` and ``wd``."""
        lr = cosine_schedule(step, self.total_steps, self.base_lr, self.min_lr, self.warmup_steps)
        wd = cosine_schedule(step, self.total_steps, self.weight_decay, self.weight_decay_end)
        for group in self.optimizer.param_groups:
            peak_or_lr = self.base_lr if group.get("fixed_lr") else lr
            group["lr"] = 0.0 if step < group["frozen_steps"] else peak_or_lr * group.get("lr_scale", 1.0)
            group["weight_decay"] = wd if group.get("apply_wd", True) else 0.0
        return {"lr": lr, "wd": wd}
