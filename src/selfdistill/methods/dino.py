"""DINO: self-distillation with no labels (Caron et al., 2021; facebookresearch/dino).

A student sees all crops, an EMA teacher sees the two global crops, and the student learns to
predict the teacher's centred, sharpened distribution over prototypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from selfdistill.config import Config, MethodConfig, ModelConfig, _fail
from selfdistill.data import MultiCropAugmentation, collate_multicrop
from selfdistill.losses import dino_loss, ema_center
from selfdistill.methods.base import Method, ParamGroup, Progress, StepOutput, register_method
from selfdistill.models import Backbone, DINOHead
from selfdistill.params import ema_update
from selfdistill.schedules import cosine_schedule, linear_warmup_then_constant


@dataclass
class DinoConfig(MethodConfig):
    name: str = "dino"
    out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    n_global_crops: int = 2
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996  # cosine schedule to momentum_teacher_end over training
    momentum_teacher_end: float = 1.0
    freeze_last_layer_epochs: float = 1  # last layer learning rate is 0 for these epochs

    def validate(self, prefix: str) -> None:
        for key in ("out_dim", "head_hidden_dim", "head_bottleneck_dim", "head_nlayers"):
            if getattr(self, key) <= 0:
                _fail(f"{prefix}.{key}", f"must be positive, got {getattr(self, key)}")
        if self.n_global_crops != 2:
            _fail(f"{prefix}.n_global_crops", f"DINO uses exactly 2 global crops, got {self.n_global_crops}")
        for key in ("student_temp", "warmup_teacher_temp", "teacher_temp"):
            if getattr(self, key) <= 0:
                _fail(f"{prefix}.{key}", f"must be positive, got {getattr(self, key)}")
        if self.warmup_teacher_temp_epochs < 0:
            _fail(f"{prefix}.warmup_teacher_temp_epochs", "must be >= 0")
        for key in ("center_momentum", "momentum_teacher", "momentum_teacher_end"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                _fail(f"{prefix}.{key}", f"must be in [0, 1], got {getattr(self, key)}")
        if self.freeze_last_layer_epochs < 0:
            _fail(f"{prefix}.freeze_last_layer_epochs", "must be >= 0")


def same_size_runs(crops: list[torch.Tensor]) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each run of consecutive crops with one resolution: one backbone call each."""
    start = 0
    while start < len(crops):
        end = start + 1
        while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
            end += 1
        yield start, end
        start = end


class MultiCropNetwork(nn.Module):
    """Backbone + head over a list of crops, one backbone call per run of same-size crops."""

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = [self.backbone(torch.cat(crops[start:end])).pooled for start, end in same_size_runs(crops)]
        embedding = torch.cat(pooled)
        return self.head(embedding), embedding


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def build_backbones(m: ModelConfig) -> tuple[Backbone, Backbone]:
    """The student backbone (drop path, checkpointing, start weights) and the teacher's (neither)."""
    student = Backbone(m.name, m.img_size, m.patch_size, m.drop_path_rate, m.grad_checkpointing,
                       pretrained=m.pretrained, channels_last=m.channels_last, **m.kwargs)
    teacher = Backbone(m.name, m.img_size, m.patch_size, 0.0, False, channels_last=m.channels_last, **m.kwargs)
    return student, teacher


def dino_head(cfg: DinoConfig, embed_dim: int, norm_last_layer: bool) -> DINOHead:
    return DINOHead(embed_dim, cfg.out_dim, cfg.use_bn_in_head, norm_last_layer, cfg.head_nlayers,
                    cfg.head_hidden_dim, cfg.head_bottleneck_dim)


def init_teacher(teacher: nn.Module, student: nn.Module) -> nn.Module:
    """The EMA teacher starts as a frozen copy of the student. A BatchNorm teacher normalises with
    its own batch statistics, as in DINO; otherwise it runs in eval mode."""
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    teacher.train(_has_batchnorm(teacher))
    return teacher


@register_method("dino")
class Dino(Method):
    config_class = DinoConfig
    last_layer_prefixes: tuple[str, ...] = ("head.last_layer.",)  # frozen for the first epoch(s)

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        cfg: DinoConfig = config.method  # type: ignore[assignment]
        self.cfg = cfg
        student_backbone, teacher_backbone = build_backbones(config.model)
        self.student = MultiCropNetwork(student_backbone, dino_head(cfg, student_backbone.embed_dim, cfg.norm_last_layer))
        self.teacher = init_teacher(MultiCropNetwork(teacher_backbone, dino_head(cfg, student_backbone.embed_dim, True)),
                                    self.student)
        self.center = torch.zeros(1, cfg.out_dim)
        self._center_sum = torch.zeros(1, cfg.out_dim)
        self._center_rows = 0
        self._accelerator: Any = None

    # -- set-up ---------------------------------------------------------------------------------
    def param_groups(self) -> list[ParamGroup]:
        regularized, not_regularized, last_layer = [], [], []
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith(self.last_layer_prefixes):
                last_layer.append(p)
            elif name.endswith(".bias") or p.ndim <= 1:
                not_regularized.append(p)
            else:
                regularized.append(p)
        # Both weight-norm tensors of the last layer are 2-D ([K, 256] and [K, 1]), so DINO's
        # "ndim > 1 -> decayed" rule puts both in the decayed group; we keep that.
        return [
            ParamGroup("regularized", regularized, weight_decay=True),
            ParamGroup("not_regularized", not_regularized, weight_decay=False),
            ParamGroup("last_layer", last_layer, weight_decay=True, frozen_epochs=self.cfg.freeze_last_layer_epochs),
        ]

    def train_transform(self) -> MultiCropAugmentation:
        d = self.config.data
        return MultiCropAugmentation(
            global_size=d.global_crop_size, local_size=d.local_crop_size, n_local_crops=d.n_local_crops,
            global_scale=d.global_crop_scale, local_scale=d.local_crop_scale, mean=d.mean, std=d.std,
            blur_radius=d.blur_radius)

    def collate_fn(self):
        return collate_multicrop

    def setup(self, accelerator: Any, steps_per_epoch: int, total_steps: int) -> None:
        self._accelerator = accelerator
        device = accelerator.device
        self.teacher.to(device)
        self.center = self.center.to(device)
        self._center_sum = self._center_sum.to(device)

    # -- schedules ------------------------------------------------------------------------------
    def teacher_temp(self, progress: Progress) -> float:
        c = self.cfg
        return linear_warmup_then_constant(progress.epoch, c.warmup_teacher_temp_epochs, c.warmup_teacher_temp,
                                           c.teacher_temp)

    def teacher_momentum(self, progress: Progress) -> float:
        return cosine_schedule(progress.step, progress.total_steps, self.cfg.momentum_teacher,
                               self.cfg.momentum_teacher_end)

    def schedule_values(self, progress: Progress) -> dict[str, float]:
        return {"teacher_temp": self.teacher_temp(progress), "teacher_momentum": self.teacher_momentum(progress)}

    # -- per step -------------------------------------------------------------------------------
    def training_step(self, student: nn.Module, batch: dict[str, Any], progress: Progress) -> StepOutput:
        crops = batch["crops"]
        n_global = self.cfg.n_global_crops
        temp = self.teacher_temp(progress)
        with torch.no_grad():
            teacher_logits, _ = self.teacher(crops[:n_global])
        student_logits, student_embedding = student(crops)
        loss = dino_loss(student_logits, teacher_logits, self.center, n_global, self.cfg.student_temp, temp)

        teacher_logits = teacher_logits.detach().float()
        self._center_sum += teacher_logits.sum(dim=0, keepdim=True)
        self._center_rows += teacher_logits.shape[0]
        metrics = self._collapse_signals(teacher_logits, student_embedding.detach(), temp)
        return StepOutput(loss=loss, metrics=metrics, batch_size=crops[0].shape[0])

    def _collapse_signals(self, teacher_logits: torch.Tensor, embedding: torch.Tensor, temp: float,
                          center: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Two failure modes of DINO: uniform teacher outputs (entropy -> log K) and one dominant
        prototype / constant outputs (KL to the center -> 0, embedding std -> 0). ``center``: the
        center matching ``teacher_logits`` (default: the view center)."""
        center = self.center if center is None else center
        with torch.no_grad():
            logp = F.log_softmax((teacher_logits - center) / temp, dim=-1)
            entropy = -(logp.exp() * logp).sum(-1).mean()
            logp_raw = F.log_softmax(teacher_logits / temp, dim=-1)
            logp_center = F.log_softmax(center / temp, dim=-1)
            kl_center = (logp_raw.exp() * (logp_raw - logp_center)).sum(-1).mean()
            emb_std = F.normalize(embedding.float(), dim=-1).std(dim=0).mean()
        return {"teacher_entropy": entropy, "teacher_kl_to_center": kl_center, "embedding_std": emb_std}

    def after_optimizer_step(self, student: nn.Module, progress: Progress) -> None:
        unwrapped = self._accelerator.unwrap_model(student) if self._accelerator else student
        ema_update(self.teacher, unwrapped, self.teacher_momentum(progress))
        self._update_center()

    def _update_center(self) -> None:
        """Center <- EMA of the mean teacher logit over the whole optimizer step and all ranks."""
        # torch.full, not torch.tensor: a fill kernel, no host-to-device copy in the step
        stats = torch.cat([self._center_sum.flatten(),
                           torch.full((1,), float(self._center_rows), device=self._center_sum.device)])
        if self._accelerator is not None and self._accelerator.num_processes > 1:
            stats = self._accelerator.reduce(stats, reduction="sum")
        batch_mean = (stats[:-1] / stats[-1].clamp_min(1)).view_as(self.center)
        self.center = ema_center(self.center, batch_mean, self.cfg.center_momentum)
        self._reset_center_stats()

    def skip_step(self) -> None:
        self._reset_center_stats()  # the skipped step's teacher outputs must not move the center

    def _reset_center_stats(self) -> None:
        self._center_sum.zero_()
        self._center_rows = 0

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict(), "center": self.center.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.center = state["center"].to(self._center_sum.device)

    def eval_backbone(self) -> Backbone:
        return self.teacher.backbone
