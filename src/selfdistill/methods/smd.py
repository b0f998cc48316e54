"""SMD: hard-aware metric distillation into a lightweight student (Liu & Ye, ECCV 2022; liuhao-lh/SMD).

A frozen self-supervised teacher (SimSiam ResNet-50 in the paper) embeds each view into its pooled
backbone feature; the student (backbone + one Linear to the teacher's width) sees the same view and
learns the teacher's *metric*: per anchor, the hardest positive and hardest negative of the local
batch are weighted by how far the student's distances stray from the teacher's
(:func:`selfdistill.losses.smd_loss`). For the first ``align_epochs`` epochs a direct cosine
alignment to the teacher is added. No SSL loss on the student, no queue, no gather.

The teacher is loaded with :func:`selfdistill.models.weights.load_teacher` (SimSiam/MoCo
checkpoints, timm files, or a run of this project) and wrapped in
:class:`selfdistill.models.frozen.FrozenTeacher` (partitioned over the ranks under ZeRO-3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selfdistill.config import Config
from selfdistill.configkit import non_negative, positive
from selfdistill.engine.distributed import uses_deepspeed
from selfdistill.losses import smd_loss
from selfdistill.methods.base import ParamGroup, Progress, StepOutput, TeacherConfig, load_frozen_teacher, register_method
from selfdistill.methods.simsiam import TwoViewMethod, output_std
from selfdistill.models import Backbone
from selfdistill.models.networks import create_timm_model, pooled_width


@dataclass
class SmdConfig(TeacherConfig):
    name: str = "smd"
    teacher_model: str = "resnet50"
    teacher_format: str = "simsiam"  # SimSiam's checkpoint_0099.pth.tar; moco | timm | selfdistill (a run directory)
    teacher_dim: int = 0  # width the student's Linear maps to; 0: the teacher's width (else it must equal it)
    tau: float = 0.04  # SMD's temperature; the paper uses 0.004 for MobileNetV3-L / EfficientNet-B0/B1 students
    align_epochs: int = 2  # epochs with the cosine alignment term added (SMD: 2)
    align_smd_weight: float = 1.0  # weight of the SMD term while aligning (SMD's --times)
    sync_bn: bool = True  # BatchNorm statistics over all GPU ranks (SyncBatchNorm), as SMD

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        non_negative(self, prefix, "teacher_dim", "align_epochs", "align_smd_weight")
        positive(self, prefix, "tau")


class SmdStudent(nn.Module):
    """Backbone + one Linear to the teacher's width (SMD's ``SimSiam_smd``: no MLP, no BN, no
    predictor), one backbone call per view. Returns one ``[B, teacher_dim]`` embedding per view."""

    def __init__(self, backbone: Backbone, teacher_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.embed_dim, teacher_dim)

    def forward(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.fc(self.backbone(view).pooled) for view in views]


def teacher_width(cfg: SmdConfig) -> int:
    """The teacher's pooled width, from its architecture alone (built on the meta device, no
    weights), so the student can be built, and a checkpoint exported, without the teacher file."""
    try:
        with torch.device("meta"):
            width = pooled_width(create_timm_model(cfg.teacher_model, **cfg.teacher_kwargs))
    except (RuntimeError, NotImplementedError):  # a family whose constructor reads tensor values
        width = pooled_width(create_timm_model(cfg.teacher_model, **cfg.teacher_kwargs))
    if cfg.teacher_dim and cfg.teacher_dim != width:
        raise ValueError(f"method.teacher_dim={cfg.teacher_dim} but teacher {cfg.teacher_model} gives {width}-d "
                         f"features; set method.teacher_dim={width} (or 0) or pick the matching teacher_model")
    return width


@register_method("smd")
class Smd(TwoViewMethod):
    config_class = SmdConfig

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        cfg: SmdConfig = config.method  # type: ignore[assignment]
        self.cfg = cfg
        self.teacher_dim = teacher_width(cfg)
        self.set_student(SmdStudent(self.build_backbone(), self.teacher_dim), cfg.sync_bn)
        self.teacher: nn.Module | None = None  # loaded in setup(): it needs the accelerator

    def param_groups(self) -> list[ParamGroup]:
        """One group, weight decay on everything (the student's Linear included), as SMD."""
        return [ParamGroup("student", [p for p in self.student.parameters() if p.requires_grad], weight_decay=True)]

    def setup(self, accelerator: Any, steps_per_epoch: int, total_steps: int) -> None:
        # A CNN teacher (SimSiam's ResNet-50) runs channels-last, whatever the student, except under DeepSpeed.
        self.teacher = load_frozen_teacher(self.cfg, accelerator, channels_last=not uses_deepspeed())

    def _embed_teacher(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.teacher is None:
            raise RuntimeError("SMD's teacher is loaded in setup(); call setup(accelerator, ...) first")
        out = [self.teacher(v).float() for v in views]
        if out[0].ndim != 2 or out[0].shape[1] != self.teacher_dim:
            raise ValueError(f"teacher {self.cfg.teacher_model} returned features of shape {tuple(out[0].shape)}; "
                             f"the student maps to [B, {self.teacher_dim}]")
        return out

    def training_step(self, student: nn.Module, batch: dict[str, Any], progress: Progress) -> StepOutput:
        views = list(batch["crops"])
        teacher = self._embed_teacher(views)
        embeddings = student(views)
        dist = sum(smd_loss(t, s, self.cfg.tau) for t, s in zip(teacher, embeddings)) / len(views)
        cosine = sum(F.cosine_similarity(t, s.float(), dim=1).mean() for t, s in zip(teacher, embeddings)) / len(views)
        if progress.epoch < self.cfg.align_epochs:
            loss = -cosine + self.cfg.align_smd_weight * dist
        else:
            loss = dist
        # output_std far below teacher_std: the student maps every image near the teacher's mean direction
        # (cos_teacher then still reads high), the collapse a student without BatchNorm can fall into.
        metrics = {"smd": dist.detach(), "cos_teacher": cosine.detach(), "output_std": output_std(embeddings[0]),
                   "teacher_std": output_std(teacher[0])}
        return StepOutput(loss=loss, metrics=metrics, batch_size=views[0].shape[0])
