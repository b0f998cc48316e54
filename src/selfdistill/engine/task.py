"""What the one training loop runs (:class:`Task`) and what may listen to it (:class:`Hook`).

A pretraining method and fine-tuning are tasks: the task owns the networks, the data it trains
on, the loss of a batch, its optimizer and schedule, and what happens after an optimizer step;
the loop owns the order of batches, precision, accumulation, finiteness checks on all ranks,
logging, checkpoints and resume. Hooks (a step timer, online kNN, validation, a rank summary)
attach from outside and see the loop only through its public attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import nn

__all__ = ["Export", "Hook", "ParamGroup", "Progress", "Scheduler", "StepOutput", "Task"]


@dataclass
class Progress:
    """Where training stands, counted in optimizer steps (never micro-batches)."""

    step: int  # index of the optimizer step being computed (0-based)
    epoch: int
    steps_per_epoch: int
    total_steps: int
    micro_batch: int = 0  # micro-batches consumed since the start of training: seeds per-batch randomness


@dataclass
class ParamGroup:
    """A named optimizer group. The loop addresses groups by name, never by position."""

    name: str
    params: list[nn.Parameter]
    weight_decay: bool = True  # follows the weight-decay schedule, else 0
    frozen_epochs: float = 0  # learning rate is 0 for this many epochs (counted in optimizer steps)
    fixed_lr: bool = False  # learning rate stays at the peak (no warm-up, no decay): SimSiam's predictor
    lr_scale: float = 1.0  # the scheduled rate times this: DINOv2's layer-wise decay and patch-embed multiplier


@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)  # read only at log steps
    batch_size: int = 0


@dataclass
class Export:
    """A network the run publishes as safetensors, in every checkpoint and in the run directory:
    ``module`` (gathered under ZeRO-3, DeepSpeed's fp32 masters where they exist) and the metadata
    that rebuilds it (``timm_name``, ``img_size``, ``patch_size``, ``kwargs``...)."""

    module: nn.Module
    meta: dict[str, Any]


class Scheduler(Protocol):
    def step_update(self, step: int) -> dict[str, float]:
        """Set every group's learning rate (and weight decay) for optimizer step ``step``; return
        the values to log."""


class Task:
    """Base class of what the loop trains. ``student`` is prepared by Accelerate (DDP / DeepSpeed);
    any other network is a plain module the task keeps itself."""

    name = "train"  # progress-bar label
    tracker_project = "selfdistill"  # Accelerate trackers' project name
    student: nn.Module

    # -- set-up ---------------------------------------------------------------------------------
    def train_data(self) -> Any:
        """The training images (:func:`selfdistill.data.open_images`) with the task's transform."""
        raise NotImplementedError

    def collate_fn(self) -> Callable[[list[Any]], Any]:
        raise NotImplementedError

    def build_optimizer(self, global_batch: int, device: torch.device) -> torch.optim.Optimizer:
        raise NotImplementedError

    def build_scheduler(self, optimizer: Any, steps_per_epoch: int, total_steps: int, global_batch: int) -> Scheduler:
        raise NotImplementedError

    def setup(self, accelerator: Any, steps_per_epoch: int, total_steps: int) -> None:
        """Called once after ``accelerator.prepare``; move private modules to the device here."""

    def hooks(self) -> list[Hook]:
        """Hooks the task brings itself (fine-tuning: validation at epoch end)."""
        return []

    # -- per step -------------------------------------------------------------------------------
    def training_step(self, student: nn.Module, batch: Any, progress: Progress) -> StepOutput:
        raise NotImplementedError

    def after_optimizer_step(self, student: nn.Module, progress: Progress) -> None:
        """Called after every real optimizer step (EMA teacher, centers, weight EMA)."""

    def skip_step(self) -> None:
        """Called instead of ``after_optimizer_step`` when a step was skipped (non-finite loss)."""

    def schedule_values(self, progress: Progress) -> dict[str, float]:
        """The task's own schedules to log (teacher temperature, EMA momentum...)."""
        return {}

    # -- state and outputs ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the student and optimizer (plain tensors and values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def exports(self) -> dict[str, Export]:
        """Networks published in every checkpoint and in the run directory, by relative file name."""
        return {}


class Hook:
    """Listens to the loop; every method is optional. ``loop`` is the
    :class:`~selfdistill.engine.trainer.Trainer` (its public attributes)."""

    def on_train_start(self, loop: Any) -> None:
        """After set-up and resume, before the first batch."""

    def on_step_start(self, loop: Any) -> None:
        """Before a micro-batch is fetched."""

    def on_batch(self, loop: Any, batch: Any) -> None:
        """A micro-batch as the loader gave it (still on the host)."""

    def on_phase_end(self, loop: Any, phase: str) -> None:
        """``data``, ``forward``, ``backward`` (DeepSpeed's optimizer step included), ``optimizer``, ``ema``."""

    def on_epoch_end(self, loop: Any) -> None:
        """After a whole epoch (``loop.state.epoch`` epochs are done), before its checkpoint."""

    def on_train_end(self, loop: Any) -> None:
        """Training is over, before the final checkpoint (task state may still change)."""

    def on_final_checkpoint(self, loop: Any, path: Any) -> None:
        """The final checkpoint ``path`` is written and its exports copied to the run directory."""
