"""FD: Feature Distillation (Wei et al., 2022, "Contrastive Learning Rivals Masked Image Modeling in
Fine-tuning via Feature Distillation"; SwinTransformer/Feature-Distillation).

A frozen, already-trained teacher (CLIP, DINO, DeiT, EsViT) and a fresh student see the same
augmented view. The student's output tokens (CLS included for ViTs) go through a 1x1 projector
(a linear map over channels) and regress the teacher's output tokens, taken after the teacher's
own final norm and "whitened" by a LayerNorm without affine parameters (``losses.fd_loss``,
Smooth-L1 with beta 2). The projector is discarded afterwards: the student backbone is what is
evaluated, exported and fine-tuned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from selfdistill.config import Config
from selfdistill.configkit import fail, positive
from selfdistill.data import SingleViewAugmentation, collate_eval
from selfdistill.losses import fd_loss
from selfdistill.methods.base import Method, ParamGroup, Progress, StepOutput, TeacherConfig, load_frozen_teacher, register_method
from selfdistill.models import Backbone, create_timm_model
from selfdistill.models.networks import feature_tokens

# The input normalisation CLIP was trained with (FD re-normalises the ImageNet-normalised view for it).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class FdConfig(TeacherConfig):
    name: str = "fd"
    # The normalisation the teacher expects, when it differs from data.mean/std (CLIP's own constants).
    teacher_mean: tuple[float, float, float] | None = None
    teacher_std: tuple[float, float, float] | None = None
    smooth_l1_beta: float = 2.0
    # Student parameters (name substrings) without weight decay, besides 1-D tensors, biases,
    # pos_embed, cls_token and absolute_pos_embed; FD's Swin recipe adds relative_position_bias_table.
    no_decay_keywords: list[str] = field(default_factory=list)
    # Different token layouts (a ViT student's CLS + 4x4 patches, a CNN teacher's 2x2 map): average-pool
    # the finer grid to the coarser one (a multiple of it); the side without a CLS token (the CNN) gets
    # its mean token in its place. False: FD as published, token for token; different layouts are an error.
    match_grid: bool = False

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if (self.teacher_mean is None) != (self.teacher_std is None):
            fail(f"{prefix}.teacher_mean", "set teacher_mean and teacher_std together (or neither)")
        if self.teacher_std is not None and any(s <= 0 for s in self.teacher_std):
            fail(f"{prefix}.teacher_std", f"must be positive, got {self.teacher_std}")
        positive(self, prefix, "smooth_l1_beta")


@dataclass(frozen=True)
class TokenMatch:
    """How one side's tokens are brought to the tokens both regress: the grid its patch tokens are
    average-pooled to (None: kept), and how many prefix tokens it is given, each the mean of its patch
    tokens (a CNN's global average pool), to stand for the other side's CLS token (0: none added)."""

    grid: tuple[int, int] | None = None
    mean_prefix: int = 0

    def __call__(self, tokens: torch.Tensor, grid: tuple[int, int], n_prefix: int) -> torch.Tensor:
        if (self.grid is None or tuple(grid) == self.grid) and not self.mean_prefix:
            return tokens
        prefix, patches = tokens[:, :n_prefix], tokens[:, n_prefix:]
        if self.mean_prefix:
            prefix = patches.mean(dim=1, keepdim=True).expand(-1, self.mean_prefix, -1)
        if self.grid is not None and tuple(grid) != self.grid:
            b, _, c = patches.shape
            fine = patches.transpose(1, 2).reshape(b, c, *grid)
            patches = F.adaptive_avg_pool2d(fine, self.grid).flatten(2).transpose(1, 2)
        return torch.cat([prefix, patches], dim=1)


def match_tokens(student: tuple[int, tuple[int, int]], teacher: tuple[int, tuple[int, int]]
                 ) -> tuple[TokenMatch, TokenMatch]:
    """``(student, teacher)`` token matches for ``(prefix tokens, grid)`` layouts: the finer grid is
    average-pooled to the coarser one, which must divide it; a side without prefix tokens (a CNN)
    gets its mean token as the other's CLS (a ViT student's CLS, its evaluated embedding, learns
    the CNN teacher's pooled feature). ``ValueError`` where no such match exists."""
    (s_prefix, s_grid), (t_prefix, t_grid) = student, teacher
    if s_prefix != t_prefix and min(s_prefix, t_prefix) > 0:
        raise ValueError(f"the teacher has {t_prefix} prefix tokens and the student {s_prefix}: only a side "
                         "without any can be matched (its mean token stands for the other's)")
    coarse = (min(s_grid[0], t_grid[0]), min(s_grid[1], t_grid[1]))
    for side, grid in (("student", s_grid), ("teacher", t_grid)):
        if grid[0] % coarse[0] or grid[1] % coarse[1]:
            raise ValueError(f"the {side}'s {grid[0]}x{grid[1]} token grid is not a multiple of the coarser "
                             f"{coarse[0]}x{coarse[1]}, so it cannot be average-pooled to it")
    return (TokenMatch(coarse if s_grid != coarse else None, t_prefix if not s_prefix else 0),
            TokenMatch(coarse if t_grid != coarse else None, s_prefix if not t_prefix else 0))


class FDStudent(nn.Module):
    """Student backbone + FD's projector (``Conv1d(C_s, C_t, 1)`` = a linear map over channels);
    ``match`` pools its tokens to the teacher's grid (``method.match_grid``) before the projector
    (a linear map: pooling before or after it is the same)."""

    def __init__(self, backbone: Backbone, teacher_dim: int, match: TokenMatch | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Linear(backbone.embed_dim, teacher_dim)
        self.match = match or TokenMatch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.match(*self.backbone.all_tokens(x)))


class TeacherTokens(nn.Module):
    """A timm teacher returning all its output tokens after its own final norm ``[B, P + T, C]``
    (CLIP: ``ln_post`` = timm ``norm``; DINO/DeiT: ``norm``; Swin: ``norm`` of the last stage; a CNN:
    its last feature map), pooled to the student's grid by ``match`` where that one is coarser."""

    def __init__(self, model: nn.Module, match: TokenMatch | None = None) -> None:
        super().__init__()
        self.model = model
        self.match = match or TokenMatch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.match(*feature_tokens(self.model, self.model.forward_features(x)))


def _token_layout(model: nn.Module, size: int) -> tuple[int, tuple[int, int], int]:
    """``(prefix tokens, grid, channels)`` of a model (on the meta device: no memory, no compute)."""
    with torch.device("meta"):
        _, grid, n_prefix = feature_tokens(model, model.eval().forward_features(torch.zeros(1, 3, size, size)))
    return n_prefix, grid, int(model.num_features)


def _check_final_norm(backbone: Backbone) -> None:
    """FD regresses tokens after the student's final norm: a timm model that normalises only the
    pooled vector (BEiT with average pooling: ``norm`` = Identity, ``fc_norm``) would skip it."""
    model = backbone.model
    pooled_norm_only = not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity)
    if isinstance(getattr(model, "norm", None), nn.Identity) and pooled_norm_only:
        raise ValueError(f"FD regresses the student's tokens after its final norm, but {backbone.name} normalises only "
                         f"the pooled vector (fc_norm); add global_pool: token (or use_fc_norm: false) to model.kwargs")


@register_method("fd")
class Fd(Method):
    config_class = FdConfig

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        cfg: FdConfig = config.method  # type: ignore[assignment]
        m = config.model
        self.cfg = cfg
        backbone = self.build_backbone()
        _check_final_norm(backbone)
        size = config.data.global_crop_size
        with torch.device("meta"):
            student_meta = create_timm_model(m.name, m.img_size, m.patch_size, 0.0, **m.kwargs)
            teacher_meta = create_timm_model(cfg.teacher_model, **cfg.teacher_kwargs)
        s_prefix, s_grid, _ = _token_layout(student_meta, size)
        t_prefix, t_grid, self.teacher_dim = _token_layout(teacher_meta, cfg.teacher_img_size or size)
        layouts = (f"at data.global_crop_size={size} the student {m.name} gives {s_prefix} prefix + "
                   f"{s_grid[0]}x{s_grid[1]} tokens, the teacher {cfg.teacher_model} {t_prefix} prefix + "
                   f"{t_grid[0]}x{t_grid[1]}")
        student_match = self.teacher_match = TokenMatch()
        if (s_prefix, s_grid) != (t_prefix, t_grid):
            if not cfg.match_grid:
                raise ValueError(f"FD regresses the teacher's tokens one to one, so both token grids must be equal: "
                                 f"{layouts}; change model.patch_size / model.img_size or method.teacher_kwargs, or "
                                 f"set method.match_grid: true to pool the finer grid to the coarser")
            try:
                student_match, self.teacher_match = match_tokens((s_prefix, s_grid), (t_prefix, t_grid))
            except ValueError as e:
                raise ValueError(f"method.match_grid: {e} ({layouts})") from None
        self.student = FDStudent(backbone, self.teacher_dim, student_match)
        self.teacher: nn.Module | None = None  # loaded in setup(): exports and evaluation never need it
        self._input_scale: torch.Tensor | None = None
        self._input_shift: torch.Tensor | None = None

    # -- set-up ---------------------------------------------------------------------------------
    def param_groups(self) -> list[ParamGroup]:
        """FD's AdamW groups: no decay for 1-D tensors (norms, layer scale), biases, position
        embeddings, the CLS token and ``method.no_decay_keywords``; decay for the rest, including
        the projector and a ViT's shared relative position bias table (2-D)."""
        plain = ("pos_embed", "cls_token", "absolute_pos_embed")
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            if (p.ndim <= 1 or name.endswith(".bias") or name.rsplit(".", 1)[-1] in plain
                    or any(k in name for k in self.cfg.no_decay_keywords)):
                no_decay.append(p)
            else:
                decay.append(p)
        return [ParamGroup("decay", decay, weight_decay=True), ParamGroup("no_decay", no_decay, weight_decay=False)]

    def train_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        d = self.config.data
        return SingleViewAugmentation(d.global_crop_size, d.global_crop_scale, mean=d.mean, std=d.std)

    def collate_fn(self):
        return collate_eval

    def setup(self, accelerator: Any, steps_per_epoch: int, total_steps: int) -> None:
        cfg = self.cfg
        self.teacher = load_frozen_teacher(cfg, accelerator, wrap=lambda model: TeacherTokens(model, self.teacher_match))
        if cfg.teacher_mean is not None:
            # x_t = (x * std_d + mean_d - mean_t) / std_t: undo the data normalisation, apply the teacher's.
            d = self.config.data
            std_d, mean_d = torch.tensor(d.std), torch.tensor(d.mean)
            std_t, mean_t = torch.tensor(cfg.teacher_std), torch.tensor(cfg.teacher_mean)
            self._input_scale = (std_d / std_t).view(1, 3, 1, 1).to(accelerator.device)
            self._input_shift = ((mean_d - mean_t) / std_t).view(1, 3, 1, 1).to(accelerator.device)

    # -- per step -------------------------------------------------------------------------------
    def teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        if self._input_scale is None:
            return x
        return x * self._input_scale + self._input_shift

    def training_step(self, student: nn.Module, batch: dict[str, Any], progress: Progress) -> StepOutput:
        if self.teacher is None:
            raise RuntimeError("FD's teacher is loaded in setup(); call method.setup(accelerator, ...) first")
        x = batch["image"]
        with torch.no_grad():
            target = self.teacher(self.teacher_input(x))
        pred = student(x)
        if pred.shape[:2] != target.shape[:2]:
            raise ValueError(f"FD: the student gives {pred.shape[1]} tokens but the teacher {target.shape[1]} for "
                             f"{tuple(x.shape[-2:])} px inputs; both token grids must be equal")
        loss = fd_loss(pred, target, self.cfg.smooth_l1_beta)
        with torch.no_grad():
            whitened = F.layer_norm(target.float(), target.shape[-1:], eps=1e-5)
            cos = F.cosine_similarity(pred.detach().float(), whitened, dim=-1).mean()
        return StepOutput(loss=loss, metrics={"cos_to_target": cos}, batch_size=x.shape[0])

    # -- state ----------------------------------------------------------------------------------
    def eval_backbone(self) -> Backbone:
        return self.student.backbone
