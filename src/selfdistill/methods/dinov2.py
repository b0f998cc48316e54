"""DINOv2: learning robust visual features without supervision (Oquab et al., 2023; facebookresearch/dinov2).

One training step, as the paper's Section 4 and its ``SSLMetaArch.forward_backward``::

    masks   <- block masks of the global crops (a fraction mask_sample_probability of them,
               each hiding mask_ratio_min_max of its patches; drawn with the augmentation)
    teacher <- global crops, unmasked: CLS -> DINO head, the patches the student lost -> iBOT head
    student <- global crops with a learned mask token in place of the masked patch embeddings,
               local crops as they are: CLS -> DINO head, masked patches -> iBOT head
    q       <- teacher probabilities: centred softmax (DINO) or Sinkhorn-Knopp (DINOv2's choice)
    L = w_dino * DINO(CLS of every student crop vs the teacher's other global crop)
      + w_ibot * iBOT(masked patches of the student vs the teacher's same patches)
      + w_koleo * sum over global crops of KoLeo(student backbone CLS)

Schedules are DINOv2's: teacher temperature warm-up, cosine weight decay and EMA momentum, layer-wise
learning-rate decay with a smaller rate for the patch embedding, last layers frozen for the first
epoch. The teacher is the student's EMA; with ``method.teacher_weights`` it is instead a frozen
pretrained network (DINOv2's distillation of ViT-g into ViT-S/B/L), and the student's EMA is still
kept and exported, as DINOv2 does. Everything DINO already has (centres, EMA, restore, exports) is
inherited from :class:`~selfdistill.methods.dino.Dino`; this file overrides the network, the
parameter groups and the step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from selfdistill.config import Config
from selfdistill.configkit import check_kwargs_have_values, fail, fraction, non_negative, one_of, positive
from selfdistill.data.masking import BlockMasking, MaskedMultiCrop
from selfdistill.losses import dino_cross_entropy, ibot_patch_loss, koleo_loss, sinkhorn_knopp
from selfdistill.methods.base import ParamGroup, Progress, StepOutput, register_method
from selfdistill.methods.dino import Dino, DinoConfig, same_size_runs
from selfdistill.models import Backbone, DINOHead
from selfdistill.models.frozen import FrozenTeacher
from selfdistill.models.hub import is_hub_name
from selfdistill.models.networks import check_timm_name
from selfdistill.models.weights import resolve_weights, weight_formats

log = logging.getLogger("selfdistill")

CENTERING = ("sinkhorn_knopp", "centering")


@dataclass
class Dinov2Config(DinoConfig):
    name: str = "dinov2"
    norm_last_layer: bool = False  # DINOv2's heads train the weight-norm gain
    momentum_teacher: float = 0.992  # DINOv2's default (cosine to 1)
    centering: str = "sinkhorn_knopp"  # sinkhorn_knopp (DINOv2's ViT-L/g recipes) | centering (DINO's EMA centre)
    sinkhorn_iterations: int = 3
    dino_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1  # on the student's backbone CLS of each global crop
    ibot_loss_weight: float = 1.0
    ibot_separate_head: bool = False  # False: the DINO head also scores the patches (DINOv2's default)
    ibot_out_dim: int = 65536  # separate iBOT head only
    ibot_head_hidden_dim: int = 2048
    ibot_head_bottleneck_dim: int = 256
    ibot_head_nlayers: int = 3
    mask_sample_probability: float = 0.5  # fraction of global crops that are masked
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)  # fraction of a masked crop's patches
    layerwise_decay: float = 0.9  # lr of block i: decay ** (depth + 1 - (i + 1)); embeddings decay ** (depth + 1)
    patch_embed_lr_mult: float = 0.2
    # Distillation: a frozen pretrained teacher (any weights the weights door reads: a local file, a run
    # directory, a timm pretrained tag or hf-hub name in the local cache) instead of the student's EMA.
    teacher_model: str = ""  # timm name of the teacher (e.g. vit_large_patch14_dinov2); "" = EMA teacher
    teacher_weights: str = ""
    teacher_format: str = "auto"  # models.weights.weight_formats()
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)  # more timm.create_model keywords for the teacher

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        one_of(self, prefix, "centering", CENTERING)
        positive(self, prefix, "sinkhorn_iterations", "ibot_out_dim", "ibot_head_hidden_dim",
                 "ibot_head_bottleneck_dim", "ibot_head_nlayers", "patch_embed_lr_mult")
        non_negative(self, prefix, "dino_loss_weight", "koleo_loss_weight", "ibot_loss_weight")
        fraction(self, prefix, "mask_sample_probability", "layerwise_decay")
        low, high = self.mask_ratio_min_max
        if not 0.0 <= low <= high <= 1.0:
            fail(f"{prefix}.mask_ratio_min_max", f"needs 0 <= min <= max <= 1, got {list(self.mask_ratio_min_max)}")
        if bool(self.teacher_model) != bool(self.teacher_weights):
            fail(f"{prefix}.teacher_weights" if self.teacher_model else f"{prefix}.teacher_model",
                 "distillation needs both teacher_model (timm name) and teacher_weights; give neither for the EMA "
                 "teacher")
        if self.teacher_model:
            check_timm_name(f"{prefix}.teacher_model", self.teacher_model, f"{prefix}.teacher_weights")
        if self.teacher_format not in weight_formats():
            fail(f"{prefix}.teacher_format", f"unknown format {self.teacher_format!r} "
                                             f"(available: {', '.join(weight_formats())})")
        check_kwargs_have_values(f"{prefix}.teacher_kwargs", self.teacher_kwargs)


def _patch_size(backbone: Backbone) -> tuple[int, int]:
    size = backbone.model.patch_embed.patch_size
    return tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))  # type: ignore[return-value]


def _mask_token_hook(mask_token: torch.Tensor, masks: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A forward hook on timm's ``patch_embed``: masked patch embeddings become the mask token
    (before position embeddings are added, as in DINOv2's ``prepare_tokens_with_masks``)."""
    def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        where = masks.reshape(out.shape[:-1]).unsqueeze(-1)
        return torch.where(where, mask_token.to(out.dtype), out)
    return hook


class Dinov2Network(nn.Module):
    """A ViT, its DINO head, optionally a separate iBOT head, and the learned mask token.

    ``forward(crops, masks, mask_inputs)`` (global crops first; ``masks [n_global * B, N]`` bool,
    crop-major) returns the CLS logits of all crops ``[V * B, K]``, the patch logits at the masked
    positions of the global crops ``[n_masked, K']`` (row-major over images, then patches) and the
    backbone CLS of the global crops ``[n_global * B, D]``. With ``mask_inputs`` the masked patches
    are replaced by the mask token (the student); without, the crops are seen whole (the teacher).
    """

    def __init__(self, backbone: Backbone, head: nn.Module, ibot_head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        if ibot_head is not None:
            self.ibot_head = ibot_head
        self.mask_token = nn.Parameter(torch.zeros(1, backbone.embed_dim))  # DINOv2 starts it at 0

    def encode(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> Any:
        if masks is None:
            return self.backbone(x)
        handle = self.backbone.model.patch_embed.register_forward_hook(_mask_token_hook(self.mask_token, masks))
        try:
            return self.backbone(x)
        finally:
            handle.remove()

    def forward(self, crops: list[torch.Tensor], masks: torch.Tensor, mask_inputs: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n_global = masks.shape[0] // crops[0].shape[0]
        glob = self.encode(torch.cat(crops[:n_global]), masks if mask_inputs else None)
        local = crops[n_global:]
        cls = [glob.pooled] + [self.backbone(torch.cat(local[a:b])).pooled for a, b in same_size_runs(local)]
        cls_tokens, patch_tokens = torch.cat(cls), glob.tokens[masks]
        if hasattr(self, "ibot_head"):
            return self.head(cls_tokens), self.ibot_head(patch_tokens), glob.pooled
        logits = self.head(torch.cat([cls_tokens, patch_tokens]))  # one head call, as DINOv2 when shared
        return logits[:cls_tokens.shape[0]], logits[cls_tokens.shape[0]:], glob.pooled


def padded_by_image(rows: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked rows ``[n_masked, K]`` (row-major over ``masks [B, N]``) laid out per masked image:
    ``([B_m, M, K], valid [B_m, M])`` for the ``B_m`` images with a masked patch, ``M`` the most any has."""
    counts = masks.sum(dim=1)
    has = counts > 0
    image = (has.cumsum(0) - 1)[masks.nonzero()[:, 0]]
    slot = (masks.cumsum(dim=1) - 1)[masks]
    width = int(counts.max()) if masks.numel() else 0
    padded = rows.new_zeros(int(has.sum()), width, rows.shape[-1])
    valid = torch.zeros(padded.shape[:2], dtype=torch.bool, device=rows.device)
    padded = padded.index_put((image, slot), rows)
    valid[image, slot] = True
    return padded, valid


@register_method("dinov2")
class Dinov2(Dino):
    config_class = Dinov2Config
    last_layer_prefixes = ("head.last_layer.", "ibot_head.last_layer.")  # frozen for the first epoch(s)

    def __init__(self, config: Config) -> None:
        self.cfg: Dinov2Config = config.method  # type: ignore[assignment]  (network() reads it)
        super().__init__(config)
        self.grid = self.patch_grid(self.student.backbone)
        self.distill_teacher: nn.Module | None = self.frozen_teacher() if self.cfg.teacher_model else None

    # -- networks -------------------------------------------------------------------------------
    def network(self, backbone: Backbone, norm_last_layer: bool) -> nn.Module:
        vit = backbone.model
        if not (hasattr(vit, "patch_embed") and getattr(vit, "cls_token", None) is not None
                and getattr(vit, "global_pool", None) == "token"):
            fail("model.name", f"dinov2 trains ViTs with a CLS token (timm's vit_*, register tokens welcome), "
                               f"got {backbone.name!r}")
        return self.heads(backbone, norm_last_layer)

    def heads(self, backbone: Backbone, norm_last_layer: bool) -> Dinov2Network:
        c = self.cfg
        ibot = (DINOHead(backbone.embed_dim, c.ibot_out_dim, c.use_bn_in_head, norm_last_layer, c.ibot_head_nlayers,
                         c.ibot_head_hidden_dim, c.ibot_head_bottleneck_dim) if c.ibot_separate_head else None)
        return Dinov2Network(backbone, self.head(backbone.embed_dim, norm_last_layer), ibot)

    def center_shapes(self, backbone: Backbone) -> dict[str, tuple[int, ...]]:
        k_ibot = self.cfg.ibot_out_dim if self.cfg.ibot_separate_head else self.cfg.out_dim
        return {"center": (1, self.cfg.out_dim), "ibot_center": (1, k_ibot)}

    def patch_grid(self, backbone: Backbone) -> tuple[int, int]:
        ph, pw = _patch_size(backbone)
        size = self.config.data.global_crop_size
        if size % ph or size % pw:
            fail("data.global_crop_size", f"{size} px is not a whole number of {ph}x{pw} patches")
        return size // ph, size // pw

    def frozen_teacher(self) -> Dinov2Network:
        """DINOv2's distillation teacher: ``teacher_model`` with ``teacher_weights`` read by the
        weights door, frozen, with its own heads. Without the teacher's trained heads (a released
        backbone holds none) they stay at a fixed initialisation seeded by ``train.seed``: frozen
        random prototypes over the teacher's features, balanced by Sinkhorn-Knopp."""
        c, m = self.cfg, self.config.model
        spec = c.teacher_weights if is_hub_name(c.teacher_weights) else str(resolve_weights(c.teacher_weights))
        kwargs = {"img_size": m.img_size, **c.teacher_kwargs}
        backbone = Backbone(c.teacher_model, pretrained=spec, pretrained_format=c.teacher_format, **kwargs)
        if _patch_size(backbone) != _patch_size(self.student.backbone):
            fail("method.teacher_model", f"the teacher's {_patch_size(backbone)} patches differ from the student's "
                                         f"{_patch_size(self.student.backbone)}: iBOT compares the same patches, so "
                                         "pick a teacher and student of one patch size")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.train.seed)
            teacher = self.network(backbone, True)
        return teacher.eval().requires_grad_(False)

    def setup(self, accelerator: Any, steps_per_epoch: int, total_steps: int) -> None:
        super().setup(accelerator, steps_per_epoch, total_steps)
        if isinstance(self.distill_teacher, Dinov2Network):
            self.distill_teacher = FrozenTeacher(self.distill_teacher, accelerator)

    # -- data -----------------------------------------------------------------------------------
    def train_transform(self) -> MaskedMultiCrop:
        c = self.cfg
        return MaskedMultiCrop(super().train_transform(),
                               BlockMasking(self.grid, c.mask_sample_probability, tuple(c.mask_ratio_min_max)))

    # -- optimisation ---------------------------------------------------------------------------
    def lr_scale(self, name: str, depth: int) -> float:
        """DINOv2's layer-wise decay: block ``i`` is layer ``i + 1``, the embeddings (patch, position,
        CLS, registers, mask token) layer 0, everything after the blocks (final norm, heads) layer
        ``depth + 1``; the rate is ``decay ** (depth + 1 - layer)``, times the multiplier in the patch
        embedding."""
        backbone = "backbone.model."
        if name.startswith(backbone + "blocks."):
            layer = int(name[len(backbone + "blocks."):].split(".")[0]) + 1
        elif name == "mask_token" or name.startswith(tuple(backbone + p for p in (
                "patch_embed", "pos_embed", "cls_token", "reg_token"))):
            layer = 0
        else:
            layer = depth + 1
        scale = self.cfg.layerwise_decay ** (depth + 1 - layer)
        return scale * (self.cfg.patch_embed_lr_mult if name.startswith(backbone + "patch_embed") else 1.0)

    def param_groups(self) -> list[ParamGroup]:
        """One group per (learning-rate scale, weight decay or not, last layer or not); biases and
        1-D tensors take no weight decay, as in DINO."""
        depth = len(self.student.backbone.model.blocks)
        groups: dict[tuple[float, bool, bool], list[nn.Parameter]] = {}
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            decayed = not (name.endswith(".bias") or p.ndim <= 1)
            key = (self.lr_scale(name, depth), decayed, name.startswith(self.last_layer_prefixes))
            groups.setdefault(key, []).append(p)
        return [ParamGroup(f"lr{scale:.6g}{'' if decayed else '_no_wd'}{'_last_layer' if last else ''}", params,
                           weight_decay=decayed, lr_scale=scale,
                           frozen_epochs=self.cfg.freeze_last_layer_epochs if last else 0)
                for (scale, decayed, last), params in sorted(groups.items(), key=lambda kv: kv[0])]

    # -- per step -------------------------------------------------------------------------------
    def teacher_probs(self, logits: torch.Tensor, center: str, temp: float) -> torch.Tensor:
        """Teacher logits to probabilities: Sinkhorn-Knopp, or softmax around the centre."""
        if self.cfg.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp, self.cfg.sinkhorn_iterations)
        return torch.softmax((logits.float() - self.centers[center]) / temp, dim=-1)

    def training_step(self, student: nn.Module, batch: dict[str, Any], progress: Progress) -> StepOutput:
        c, crops = self.cfg, batch["crops"]
        n_global, b = c.n_global_crops, crops[0].shape[0]
        masks = batch["masks"].transpose(0, 1).reshape(n_global * b, -1)  # crop-major, as the crops
        temp = self.teacher_temp(progress)
        teacher = self.distill_teacher if self.distill_teacher is not None else self.teacher
        with torch.no_grad():
            t_cls, t_patch, _ = teacher(crops[:n_global], masks, False)
        s_cls, s_patch, s_global_cls = student(crops, masks, True)

        dino = dino_cross_entropy(s_cls, self.teacher_probs(t_cls, "center", temp), n_global, c.student_temp)
        s_padded, valid = padded_by_image(s_patch, masks)
        t_padded, _ = padded_by_image(self.teacher_probs(t_patch, "ibot_center", temp), masks)
        # ibot_patch_loss averages over the masked images; the unmasked ones contribute 0 to the mean over all.
        ibot = (ibot_patch_loss(s_padded, t_padded, valid, c.student_temp) * (valid.shape[0] / masks.shape[0])
                if valid.shape[0] else s_patch.sum() * 0.0)
        koleo = sum(koleo_loss(x) for x in s_global_cls.chunk(n_global))
        loss = c.dino_loss_weight * dino + c.ibot_loss_weight * ibot + c.koleo_loss_weight * koleo

        self.centers.add("center", t_cls)
        self.centers.add("ibot_center", t_patch)
        metrics = self.collapse_signals(t_cls.detach().float(), s_global_cls.detach(), temp)
        metrics.update(dino_loss=dino.detach(), ibot_loss=ibot.detach(), koleo_loss=koleo.detach(),
                       masked_fraction=masks.float().mean())
        return StepOutput(loss=loss, metrics=metrics, batch_size=b)
