"""What every pretraining method shares as a task of the one loop, and the registry that finds a
method by name.

A method subclasses :class:`Method` and supplies the networks (built with :meth:`Method.build_backbone`,
the one place a configured backbone is made), its augmentation and collation, its parameter groups,
the loss of a batch and what happens after an optimizer step. Data, optimizer, schedules and exports
are the same for every method and live here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from selfdistill.config import Config, MethodConfig
from selfdistill.configkit import ConfigError, check_kwargs_have_values, fail
from selfdistill.data import open_images
from selfdistill.engine.distributed import uses_deepspeed
from selfdistill.engine.optim import create_optimizer
from selfdistill.engine.task import Export, ParamGroup, Progress, StepOutput, Task
from selfdistill.models import Backbone
from selfdistill.models.frozen import FrozenTeacher
from selfdistill.models.networks import check_timm_name, is_convnet
from selfdistill.models.weights import load_teacher, weight_formats
from selfdistill.registry import Registry
from selfdistill.rundir import EXPORTS
from selfdistill.schedules import GroupCosineScheduler

__all__ = ["Method", "ParamGroup", "Progress", "StepOutput", "TeacherConfig", "build_method",
           "load_frozen_teacher", "method_class", "method_config_class", "method_names", "register_method"]

log = logging.getLogger("selfdistill")


class Method(Task):
    """Base class of a self-supervised method: the student is trained and prepared by Accelerate;
    any teacher is a plain module the method keeps itself."""

    name = "pretrain"
    config_class: type[MethodConfig] = MethodConfig

    def __init__(self, config: Config) -> None:
        self.config = config
        self.student: nn.Module

    # -- what a method supplies -----------------------------------------------------------------
    def param_groups(self) -> list[ParamGroup]:
        raise NotImplementedError

    def train_transform(self) -> Callable[[Any], Any]:
        raise NotImplementedError

    def student_backbone(self) -> Backbone:
        """The student's backbone (exported as the student)."""
        return self.student.backbone  # type: ignore[return-value]

    def eval_backbone(self) -> Backbone:
        """The backbone whose features are evaluated and exported (the teacher for DINO)."""
        raise NotImplementedError

    # -- what every method shares ---------------------------------------------------------------
    def build_backbone(self, student: bool = True, start_weights: bool = True) -> Backbone:
        """The configured backbone: the student with drop path, activation checkpointing and its
        start weights (``model.pretrained``, unless not ``start_weights``: a method restoring a
        whole training checkpoint); a teacher copy without them. Channels-last CNNs, except under
        DeepSpeed (ZeRO flattens parameters and refuses strided ones)."""
        m = self.config.model
        channels_last = m.channels_last and not uses_deepspeed()
        if student:
            return Backbone(m.name, m.img_size, m.patch_size, m.drop_path_rate, m.grad_checkpointing,
                            pretrained=m.pretrained if start_weights else "", channels_last=channels_last,
                            pretrained_format=m.pretrained_format, **m.kwargs)
        return Backbone(m.name, m.img_size, m.patch_size, 0.0, False, channels_last=channels_last, **m.kwargs)

    def train_data(self) -> Any:
        """The training images; the data door decides where the augmentation runs (``data.augment_on``)."""
        return open_images(self.config.data, self.train_transform(), seed=self.config.train.seed,
                           cpu=self.config.train.cpu)

    def build_optimizer(self, global_batch: int, device: torch.device) -> torch.optim.Optimizer:
        groups = [{"name": g.name, "params": g.params, "lr": 0.0, "weight_decay": 0.0, "apply_wd": g.weight_decay,
                   "fixed_lr": g.fixed_lr, "frozen_epochs": g.frozen_epochs, "lr_scale": g.lr_scale}
                  for g in self.param_groups() if g.params]  # DeepSpeed drops empty groups; names, not positions
        o = self.config.optim
        return create_optimizer(groups, o.name, momentum=o.momentum, betas=o.betas, fused=o.fused, device=device,
                                kwargs=o.kwargs)

    def build_scheduler(self, optimizer: Any, steps_per_epoch: int, total_steps: int,
                        global_batch: int) -> GroupCosineScheduler:
        o = self.config.optim
        base_lr = o.lr * global_batch / 256 if o.scale_lr_with_batch else o.lr
        return GroupCosineScheduler(optimizer, base_lr, o.min_lr, int(round(o.warmup_epochs * steps_per_epoch)),
                                    total_steps, o.weight_decay, o.weight_decay_end, steps_per_epoch)

    def exports(self) -> dict[str, Export]:
        """The evaluated backbone (DINO: the EMA teacher; SimSiam, SMD, FD: the student) and the
        student's, in every checkpoint."""
        evaluated, student = self.eval_backbone(), self.student_backbone()
        return {EXPORTS["eval"]: Export(evaluated.model, evaluated.meta),
                EXPORTS["student"]: Export(student.model, student.meta)}


@dataclass
class TeacherConfig(MethodConfig):
    """The keys of a method that distils a frozen teacher read from a local file (SMD, FD)."""

    teacher_model: str = ""  # timm name of the teacher network
    teacher_weights: str = ""  # local weights file of the teacher, or a run / checkpoint directory of this project
    teacher_format: str = "timm"  # how the file lays out its tensors: models.weights.weight_formats()
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)  # more timm.create_model keywords for the teacher
    # Square size each view is resized to (bilinear, antialiased) for the teacher only; 0: the view as it is.
    # A small student at 32 px can learn from an ImageNet teacher that needs 64 px to see well.
    teacher_img_size: int = 0

    def validate(self, prefix: str) -> None:
        if self.teacher_img_size < 0:
            fail(f"{prefix}.teacher_img_size", f"must be 0 (the view as it is) or a size, got {self.teacher_img_size}")
        if not self.teacher_model:
            fail(f"{prefix}.teacher_model", f"{self.name} needs the timm name of its frozen teacher network")
        check_timm_name(f"{prefix}.teacher_model", self.teacher_model, f"{prefix}.teacher_weights")
        if not self.teacher_weights:
            fail(f"{prefix}.teacher_weights", f"{self.name} needs a trained teacher: a local weights file or a run "
                                              "directory")
        if self.teacher_format not in weight_formats():
            fail(f"{prefix}.teacher_format", f"unknown format {self.teacher_format!r} "
                                             f"(available: {', '.join(weight_formats())})")
        check_kwargs_have_values(f"{prefix}.teacher_kwargs", self.teacher_kwargs)


class ResizedInput(nn.Module):
    """Calls ``network`` on its input resized to ``size`` x ``size`` (bilinear, antialiased)."""

    def __init__(self, network: nn.Module, size: int) -> None:
        super().__init__()
        self.network, self.size = network, size

    def forward(self, x: torch.Tensor) -> Any:
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return self.network(x)


def load_frozen_teacher(cfg: TeacherConfig, accelerator: Any, wrap: Callable[[nn.Module], nn.Module] | None = None,
                        channels_last: bool = False) -> FrozenTeacher:
    """The teacher of ``cfg`` loaded strictly (the report logged), frozen, on the device, partitioned
    over the ranks under ZeRO-3; ``wrap`` chooses what of it is called (FD: all output tokens);
    ``channels_last`` makes a CNN teacher channels-last."""
    network, report = load_teacher(cfg.teacher_model, cfg.teacher_weights, cfg.teacher_format, **cfg.teacher_kwargs)
    if channels_last and is_convnet(network):
        network.to(memory_format=torch.channels_last)
    total = sum(p.numel() for p in network.parameters())
    called = wrap(network) if wrap else network
    if cfg.teacher_img_size:
        called = ResizedInput(called, cfg.teacher_img_size)
    teacher = FrozenTeacher(called, accelerator)
    log.info("teacher %s; %s%d of %d teacher parameters on rank %d", report,
             "ZeRO-3 partitioned: " if teacher.partitioned else "", teacher.parameters_per_rank(), total,
             accelerator.process_index)
    return teacher


_METHODS = Registry("method")
register_method = _METHODS.register


def method_names() -> list[str]:
    return _METHODS.names()


def method_class(name: str) -> type[Method]:
    try:
        return _METHODS.lookup(name)
    except ValueError as e:
        raise ConfigError(f"config error: method.name: {e}") from None


def method_config_class(name: str) -> type[MethodConfig]:
    return method_class(name).config_class


def build_method(config: Config) -> Method:
    return method_class(config.method.name)(config)
