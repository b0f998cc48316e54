"""Schedules evaluated per optimizer step, with the exact values of DINO's ``cosine_scheduler``."""

from __future__ import annotations

import math


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
