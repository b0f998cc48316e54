"""DINO: self-distillation with no labels (Caron et al., 2021; facebookresearch/dino).

A student sees all crops, an EMA teacher sees the two global crops, and the student learns to
predict the teacher's centred, sharpened distribution over prototypes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from selfdistill.config import Config, MethodConfig
from selfdistill.configkit import fail, fraction, non_negative, positive
from selfdistill.data import MultiCropAugmentation, collate_multicrop
from selfdistill.losses import dino_loss, ema_center
from selfdistill.methods.base import Method, ParamGroup, Progress, StepOutput, register_method
from selfdistill.models import Backbone, DINOHead
from selfdistill.models.hub import is_hub_name
from selfdistill.models.training_checkpoint import TrainingCheckpoint, read_training_checkpoint
from selfdistill.models.weights import load_strict
from selfdistill.params import ema_update, unwrap
from selfdistill.schedules import cosine_schedule, linear_warmup_then_constant

log = logging.getLogger("selfdistill")


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
        positive(self, prefix, "out_dim", "head_hidden_dim", "head_bottleneck_dim", "head_nlayers", "student_temp",
                 "warmup_teacher_temp", "teacher_temp")
        if self.n_global_crops != 2:
            fail(f"{prefix}.n_global_crops", f"DINO uses exactly 2 global crops, got {self.n_global_crops}")
        non_negative(self, prefix, "warmup_teacher_temp_epochs", "freeze_last_layer_epochs")
        fraction(self, prefix, "center_momentum", "momentum_teacher", "momentum_teacher_end")


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


class Centers:
    """DINO's centering of the teacher's outputs: each center is an EMA of the mean teacher output
    over one optimizer step and all ranks (the batch mean of DINO's update, with every
    micro-batch of an accumulation window in it). Several centers (GLSD's view and token centers)
    share one all-reduce."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], momentum: float) -> None:
        self.momentum = momentum
        self.values = {name: torch.zeros(shape) for name, shape in shapes.items()}
        self._sums = {name: torch.zeros(shape) for name, shape in shapes.items()}
        self._rows = dict.fromkeys(shapes, 0)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[name]

    def to(self, device: torch.device) -> Centers:
        self.values = {n: v.to(device) for n, v in self.values.items()}
        self._sums = {n: v.to(device) for n, v in self._sums.items()}
        return self

    def add(self, name: str, teacher_outputs: torch.Tensor) -> None:
        """Rows of teacher outputs ``[N, ...]`` of one micro-batch (summed over the first dimension)."""
        outputs = teacher_outputs.detach().float()
        self._sums[name] += outputs.sum(dim=0, keepdim=True)
        self._rows[name] += outputs.shape[0]

    def update(self, accelerator: Any = None) -> None:
        """center <- m * center + (1 - m) * mean of the rows added since the last update, all ranks."""
        names = list(self.values)
        device = self._sums[names[0]].device
        # torch.full, not torch.tensor: a fill kernel, no host-to-device copy in the step
        stats = torch.cat([self._sums[n].flatten() for n in names]
                          + [torch.full((1,), float(self._rows[n]), device=device) for n in names])
        if accelerator is not None and accelerator.num_processes > 1:
            stats = accelerator.reduce(stats, reduction="sum")
        offset, rows = 0, stats[-len(names):]
        for i, n in enumerate(names):
            size = self.values[n].numel()
            mean = (stats[offset:offset + size] / rows[i].clamp_min(1)).view_as(self.values[n])
            self.values[n] = ema_center(self.values[n], mean, self.momentum)
            offset += size
        self.reset()

    def reset(self) -> None:
        """Forget the rows added since the last update (a skipped step must not move a center)."""
        for n in self._sums:
            self._sums[n].zero_()
            self._rows[n] = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: v.detach().cpu() for n, v in self.values.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = {n: state[n].to(self._sums[n].device) for n in self.values}


def start_checkpoint(config: Config) -> TrainingCheckpoint | None:
    """``model.pretrained`` read as a DINO / DINOv2 training checkpoint (format ``auto``), else None."""
    m = config.model
    if not m.pretrained or m.pretrained_format != "auto" or is_hub_name(m.pretrained):
        return None
    return read_training_checkpoint(m.pretrained)


def init_teacher(teacher: nn.Module, student: nn.Module) -> nn.Module:
    """The EMA teacher starts as a frozen copy of the student. A BatchNorm teacher normalises with
    its own batch statistics, as in DINO; otherwise it runs in eval mode."""
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    teacher.train(_has_batchnorm(teacher))
    return teacher


@register_method("dino")
class Dino(Method):
    """Student and EMA teacher share the architecture (backbone + DINO head); the loss pulls the
    student's distribution on every crop towards the teacher's centred, sharpened one on the
    other global crop. GLSD and Patch-Wise DINO override :meth:`network` and
    :meth:`center_shapes` (and their loss in :meth:`training_step`)."""

    config_class = DinoConfig
    last_layer_prefixes: tuple[str, ...] = ("head.last_layer.",)  # frozen for the first epoch(s)

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.cfg: DinoConfig = config.method  # type: ignore[assignment]
        checkpoint = start_checkpoint(config)
        student_backbone = self.build_backbone(start_weights=checkpoint is None)
        teacher_backbone = self.build_backbone(student=False)
        self.student = self.network(student_backbone, self.cfg.norm_last_layer)
        self.teacher = init_teacher(self.network(teacher_backbone, True), self.student)
        self.centers = Centers(self.center_shapes(student_backbone), self.cfg.center_momentum)
        self.start_report: dict[str, Any] = {}
        if checkpoint is not None:
            self.restore(checkpoint)
        self._accelerator: Any = None

    # -- what the DINO family varies ------------------------------------------------------------
    def head(self, embed_dim: int, norm_last_layer: bool) -> DINOHead:
        c = self.cfg
        return DINOHead(embed_dim, c.out_dim, c.use_bn_in_head, norm_last_layer, c.head_nlayers, c.head_hidden_dim,
                        c.head_bottleneck_dim)

    def network(self, backbone: Backbone, norm_last_layer: bool) -> nn.Module:
        """Backbone + head(s); called for the student, then for the teacher."""
        return MultiCropNetwork(backbone, self.head(backbone.embed_dim, norm_last_layer))

    def center_shapes(self, backbone: Backbone) -> dict[str, tuple[int, ...]]:
        return {"center": (1, self.cfg.out_dim)}

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
        self.teacher.to(accelerator.device)
        self.centers.to(accelerator.device)

    def restore(self, checkpoint: TrainingCheckpoint) -> None:
        """Continue another DINO run (``model.pretrained``: a DINO / DINOv2 training checkpoint):
        each network's backbone and heads loaded strictly, and the loss centres of this method's
        shapes. A file with the teacher only (DINOv2's ``teacher_checkpoint.pth``) starts the
        student from it too, as DINO starts its teacher from the student."""
        c, used, restored = checkpoint, set(), {}
        for name, network in (("student", self.student), ("teacher", self.teacher)):
            source = name if name in c.networks else "teacher"
            for part, module in network.named_children():
                key = f"{source}.{part}"
                if part not in c.networks[source]:
                    raise ValueError(f"model.pretrained: the {c.layout} checkpoint {c.path} has no {source} {part!r} "
                                     f"({', '.join(c.networks[source])}); give model.pretrained_format="
                                     f"{c.layout.lower()} to start from its teacher backbone only")
                try:
                    load_strict(module.model if isinstance(module, Backbone) else module, c.networks[source][part],
                                f"model.pretrained: {c.sources[key]} of {c.path}")
                except ValueError as e:
                    raise ValueError(f"{e} (give the head sizes of that run: method.out_dim, head_hidden_dim, "
                                     f"head_bottleneck_dim, head_nlayers, use_bn_in_head; or model.pretrained_format="
                                     f"{c.layout.lower()} for its teacher backbone only)") from None
                restored[f"{name}.{part}"] = f"{c.sources[key]} ({len(c.networks[source][part])} tensors)"
                used.add(key)
        ignored = list(c.ignored) + [src for key, src in c.sources.items() if key not in used]
        for key, value in c.centers.items():
            if key in self.centers.values and self.centers[key].shape == value.shape:
                self.centers.values[key] = value.detach().float().clone()
                restored[f"centers.{key}"] = f"{key} {tuple(value.shape)}"
            else:
                ignored.append(f"{key} {tuple(value.shape)}")
        self.start_report = {"path": c.path, "layout": c.layout, "restored": restored, "ignored": ignored}
        log.info("model.pretrained: %s training checkpoint %s: %s; left out: %s", c.layout, c.path,
                 ", ".join(f"{k} <- {v}" for k, v in restored.items()), ", ".join(ignored) or "nothing")

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
    def forward(self, student: nn.Module, crops: list[torch.Tensor]) -> tuple[Any, Any, torch.Tensor]:
        """The teacher on the global crops (no gradients), the student on all: ``(teacher outputs,
        student outputs, the student's pooled embeddings)`` as the networks give them."""
        with torch.no_grad():
            teacher_out, _ = self.teacher(crops[:self.cfg.n_global_crops])
        student_out, student_embedding = student(crops)
        return teacher_out, student_out, student_embedding

    def training_step(self, student: nn.Module, batch: dict[str, Any], progress: Progress) -> StepOutput:
        crops = batch["crops"]
        temp = self.teacher_temp(progress)
        teacher_logits, student_logits, student_embedding = self.forward(student, crops)
        loss = dino_loss(student_logits, teacher_logits, self.centers["center"], self.cfg.n_global_crops,
                         self.cfg.student_temp, temp)
        self.centers.add("center", teacher_logits)
        metrics = self.collapse_signals(teacher_logits.detach().float(), student_embedding.detach(), temp)
        return StepOutput(loss=loss, metrics=metrics, batch_size=crops[0].shape[0])

    def collapse_signals(self, teacher_logits: torch.Tensor, embedding: torch.Tensor, temp: float,
                         center: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Two failure modes of DINO: uniform teacher outputs (entropy -> log K) and one dominant
        prototype / constant outputs (KL to the center -> 0, embedding std -> 0). ``center``: the
        center matching ``teacher_logits`` (default: the view center)."""
        center = self.centers["center"] if center is None else center
        with torch.no_grad():
            logp = F.log_softmax((teacher_logits - center) / temp, dim=-1)
            entropy = -(logp.exp() * logp).sum(-1).mean()
            logp_raw = F.log_softmax(teacher_logits / temp, dim=-1)
            logp_center = F.log_softmax(center / temp, dim=-1)
            kl_center = (logp_raw.exp() * (logp_raw - logp_center)).sum(-1).mean()
            emb_std = F.normalize(embedding.float(), dim=-1).std(dim=0).mean()
        return {"teacher_entropy": entropy, "teacher_kl_to_center": kl_center, "embedding_std": emb_std}

    def after_optimizer_step(self, student: nn.Module, progress: Progress) -> None:
        unwrapped = unwrap(self._accelerator, student)
        ema_update(self.teacher, unwrapped, self.teacher_momentum(progress))
        self.centers.update(self._accelerator)

    def skip_step(self) -> None:
        self.centers.reset()  # the skipped step's teacher outputs must not move a center

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict(), **self.centers.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.centers.load_state_dict(state)

    def eval_backbone(self) -> Backbone:
        return self.teacher.backbone
