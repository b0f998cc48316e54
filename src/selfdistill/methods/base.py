"""What a method supplies to the one training loop, and the registry that finds it by name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from selfdistill.config import Config, ConfigError, MethodConfig


@dataclass
class Progress:
    """Where training stands, counted in optimizer steps (never micro-batches)."""

    step: int  # index of the optimizer step being computed (0-based)
    epoch: int
    steps_per_epoch: int
    total_steps: int


@dataclass
class ParamGroup:
    """A named optimizer group. The loop addresses groups by name, never by position."""

    name: str
    params: list[nn.Parameter]
    weight_decay: bool = True  # follows the weight-decay schedule, else 0
    frozen_epochs: float = 0  # learning rate is 0 for this many epochs (counted in optimizer steps)
    fixed_lr: bool = False  # learning rate stays at the peak (no warm-up, no decay): SimSiam's predictor


@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)  # read only at log steps
    batch_size: int = 0


class Method:
    """Base class of a self-supervised method.

    The loop owns the optimizer, precision, accumulation, logging and checkpoints; the method owns
    the networks and the loss. ``student`` is trained and prepared by Accelerate; any teacher is a
    plain module the method keeps itself.
    """

    config_class: type[MethodConfig] = MethodConfig

    def __init__(self, config: Config) -> None:
        self.config = config
        self.student: nn.Module

    # -- set-up ---------------------------------------------------------------------------------
    def param_groups(self) -> list[ParamGroup]:
        raise NotImplementedError

    def train_transform(self) -> Callable[[Any], Any]:
        raise NotImplementedError

    def collate_fn(self) -> Callable[[list[Any]], Any]:
        raise NotImplementedError

    def setup(self, accelerator: Any, steps_per_epoch: int, total_steps: int) -> None:
        """Called once after ``accelerator.prepare``; move private modules to the device here."""

    # -- per step -------------------------------------------------------------------------------
    def training_step(self, student: nn.Module, batch: Any, progress: Progress) -> StepOutput:
        raise NotImplementedError

    def after_optimizer_step(self, student: nn.Module, progress: Progress) -> None:
        """Called after every real optimizer step (EMA teacher, centers)."""

    def skip_step(self) -> None:
        """Called instead of ``after_optimizer_step`` when a step was skipped (non-finite loss)."""

    def schedule_values(self, progress: Progress) -> dict[str, float]:
        """Method schedules to log (teacher temperature, EMA momentum...)."""
        return {}

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def student_backbone(self) -> nn.Module:
        """The student's backbone, on the unwrapped ``self.student`` (exported as the student)."""
        return self.student.backbone  # type: ignore[return-value]

    def eval_backbone(self) -> nn.Module:
        """The backbone whose features are evaluated and exported (the teacher for DINO)."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = cls
        return cls

    return wrap


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        import difflib

        match = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" (did you mean {match[0]!r}?)" if match else f" (available: {', '.join(method_names())})"
        raise ConfigError(f"config error: method.name: unknown method {name!r}{hint}")
    return _REGISTRY[name]


def method_config_class(name: str) -> type[MethodConfig]:
    return method_class(name).config_class


def build_method(config: Config) -> Method:
    return method_class(config.method.name)(config)
