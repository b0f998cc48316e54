"""Resuming on another number of ranks: where a checkpoint written by one batch layout (ranks ×
per-device batch × accumulation) continues under another.

The data order does not depend on the layout: every epoch is one permutation, cut into global
batches of ``G = ranks × batch × accumulation`` images, optimizer step ``s`` of an epoch training
on images ``s·G … (s+1)·G`` of it, dealt to the ranks (:class:`~selfdistill.data.sampler.EpochShardSampler`).
So while ``G`` stays the same, steps per epoch, the schedules and the images of every step stay the
same, and only the micro-batch count of the position moves. A new ``G`` changes all of them; it is
refused unless asked for (``--resume-elastic``), and then the position and step are re-derived from
the images this epoch has trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Layout", "plan_resume"]


@dataclass(frozen=True)
class Layout:
    """How a global batch is made: ranks × images per rank per micro-batch × micro-batches per step."""

    world_size: int
    batch_size_per_device: int
    grad_accum_steps: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size_per_device * self.grad_accum_steps

    def __str__(self) -> str:
        return (f"global batch {self.global_batch} ({self.batch_size_per_device} per device x {self.world_size} "
                f"ranks x {self.grad_accum_steps} accumulation)")


def plan_resume(state: dict[str, Any], saved: Layout, now: Layout, steps_per_epoch: int,
                elastic: bool = False) -> tuple[dict[str, Any], str | None]:
    """The loop state ``state`` (saved under ``saved``) as it continues under ``now``, and a
    sentence saying what changed (None when nothing did). ``steps_per_epoch`` is under ``now``."""
    if saved == now:
        return state, None
    position = state["batch_in_epoch"]
    if position % saved.grad_accum_steps:
        raise ValueError(f"the checkpoint stands inside an accumulation window ({position} micro-batches of "
                         f"{saved.grad_accum_steps}); it cannot continue under another layout")
    steps_done = position // saved.grad_accum_steps  # optimizer steps of this epoch already trained
    if saved.global_batch == now.global_batch:
        new = {**state, "batch_in_epoch": steps_done * now.grad_accum_steps, "world_size": now.world_size}
        return new, (f"resuming a checkpoint of {saved} on {now}: the same images in every step, "
                     f"step {state['step']} (epoch {state['epoch']}, {steps_done} steps into it)")
    if not elastic:
        keep = _keeping(saved.global_batch, now)
        raise ValueError(
            f"the checkpoint was trained with {saved}; this run has {now}. Keep the global batch "
            f"({keep}) to continue exactly, or pass --resume-elastic to go on with global batch "
            f"{now.global_batch} (the position and every schedule are then re-derived from the images seen)")
    images_done = steps_done * saved.global_batch
    steps_now = images_done // now.global_batch
    again = images_done - steps_now * now.global_batch
    step = state["epoch"] * steps_per_epoch + steps_now
    new = {**state, "step": step, "batch_in_epoch": steps_now * now.grad_accum_steps, "world_size": now.world_size}
    return new, (f"--resume-elastic: a checkpoint of {saved} at step {state['step']} continues with {now} at "
                 f"step {step} of epoch {state['epoch']} ({images_done} of this epoch's images trained"
                 f"{f', the last {again} of them trained again' if again else ''}); the learning rate follows the "
                 f"new global batch and every schedule its step count")


def _keeping(global_batch: int, now: Layout) -> str:
    """Ways to reach ``global_batch`` on ``now.world_size`` ranks, in words."""
    per_rank, rest = divmod(global_batch, now.world_size)
    if rest:
        return f"{global_batch} images do not split over {now.world_size} ranks"
    options = [f"train.batch_size_per_device={per_rank // a} train.grad_accum_steps={a}"
               for a in (1, 2, 4, 8) if per_rank % a == 0][:2]
    return " or ".join(options)
