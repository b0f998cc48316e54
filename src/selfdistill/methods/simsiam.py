"""SimSiam: exploring simple Siamese representation learning (Chen & He, 2021; facebookresearch/simsiam).

Two augmented views go through one network (backbone -> 3-layer BN projector -> 2-layer predictor);
each view's prediction is pulled towards the other view's projection, which gets no gradient.
No negatives, no momentum encoder: the stop-gradient and the predictor prevent collapse. Here it
also trains the ResNet-50 teachers that SMD distils (``configs/simsiam_resnet50.yaml``).

Differences from the reference, on purpose: the cosine learning rate is evaluated per optimizer
step instead of per epoch, crops are resized bicubically (the project's crop sampler) instead of
bilinearly, and SyncBatchNorm is applied only where PyTorch supports it (several GPU ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selfdistill.config import Config, DataConfig, MethodConfig
from selfdistill.configkit import non_negative, positive
from selfdistill.data import MultiCropAugmentation, collate_multicrop
from selfdistill.losses import simsiam_loss
from selfdistill.methods.base import Method, ParamGroup, Progress, StepOutput, register_method
from selfdistill.models import Backbone


@dataclass
class SimSiamConfig(MethodConfig):
    name: str = "simsiam"
    proj_dim: int = 2048  # projector output (SimSiam's ``dim``)
    proj_hidden_dim: int = 0  # projector hidden width; 0: the backbone's width, as SimSiam does
    pred_dim: int = 512  # predictor bottleneck
    fix_pred_lr: bool = True  # the predictor keeps the peak learning rate (SimSiam's --fix-pred-lr)
    sync_bn: bool = True  # BatchNorm statistics over all GPU ranks (SyncBatchNorm)

    def validate(self, prefix: str) -> None:
        positive(self, prefix, "proj_dim", "pred_dim")
        non_negative(self, prefix, "proj_hidden_dim")  # 0: the backbone width


# -- pieces shared with SMD ------------------------------------------------------------------------


def two_view_augmentation(d: DataConfig) -> MultiCropAugmentation:
    """The SimSiam / MoCo-v2 augmentation, twice per image: random resized crop (``data.global_crop_size``,
    scale ``data.global_crop_scale``, 0.2-1 in the recipes), colour jitter (0.4, 0.4, 0.4, 0.1) with
    p 0.8, grayscale p 0.2, Gaussian blur p 0.5 (radius ``data.blur_radius``), flip p 0.5, no solarize.
    Local crops (``data.n_local_crops``) are not used."""
    return MultiCropAugmentation(
        global_size=d.global_crop_size, n_local_crops=0, global_scale=d.global_crop_scale, mean=d.mean, std=d.std,
        color_jitter=(0.4, 0.4, 0.4, 0.1), blur_p=(0.5, 0.5, 0.5), solarize_p=(0.0, 0.0, 0.0),
        blur_radius=d.blur_radius)


@torch.no_grad()
def output_std(z: torch.Tensor) -> torch.Tensor:
    """SimSiam's collapse signal: per-dimension std of the L2-normalised outputs, times sqrt(dim):
    about 1 for outputs spread over the sphere, 0 when every image maps to one point."""
    z = F.normalize(z.detach().float(), dim=-1)
    return z.std(dim=0).mean() * z.shape[1] ** 0.5


def maybe_sync_batchnorm(module: nn.Module, enabled: bool, config: Config) -> nn.Module:
    """SyncBatchNorm when several GPU ranks train: SimSiam and SMD normalise over the global batch.
    PyTorch's SyncBatchNorm has no CPU kernel, so gloo (CPU) ranks keep per-rank statistics."""
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if enabled and world > 1 and torch.cuda.is_available() and not config.train.cpu:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


class TwoViewMethod(Method):
    """What SimSiam and SMD share: the two-view augmentation, a SyncBatchNorm student and the
    student as the evaluated backbone."""

    def set_student(self, student: nn.Module, sync_bn: bool) -> None:
        self.student = maybe_sync_batchnorm(student, sync_bn, self.config)

    def train_transform(self) -> MultiCropAugmentation:
        return two_view_augmentation(self.config.data)

    def collate_fn(self):
        return collate_multicrop

    def eval_backbone(self) -> Backbone:
        return self.student.backbone


# -- SimSiam ---------------------------------------------------------------------------------------


def simsiam_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """SimSiam's 3-layer projector: (Linear-BN-ReLU) x 2, Linear, BN without affine. The last Linear
    has no bias: SimSiam freezes it, and a constant shift is removed by the following BN anyway."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False))


def simsiam_predictor(dim: int, pred_dim: int) -> nn.Sequential:
    """SimSiam's bottleneck predictor: Linear-BN-ReLU to ``pred_dim``, Linear back to ``dim``."""
    return nn.Sequential(nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
                         nn.Linear(pred_dim, dim))


class SimSiamNetwork(nn.Module):
    """Backbone + projector + predictor over a list of views, one backbone call per view (so
    BatchNorm normalises each view on its own, as SimSiam does). Returns ``[(p, z)]`` per view."""

    def __init__(self, backbone: Backbone, cfg: SimSiamConfig) -> None:
        super().__init__()
        self.backbone = backbone
        hidden = cfg.proj_hidden_dim or backbone.embed_dim
        self.projector = simsiam_projector(backbone.embed_dim, hidden, cfg.proj_dim)
        self.predictor = simsiam_predictor(cfg.proj_dim, cfg.pred_dim)

    def forward(self, views: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for view in views:
            z = self.projector(self.backbone(view).pooled)
            out.append((self.predictor(z), z))
        return out


@register_method("simsiam")
class SimSiam(TwoViewMethod):
    config_class = SimSiamConfig

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        cfg: SimSiamConfig = config.method  # type: ignore[assignment]
        self.cfg = cfg
        self.set_student(SimSiamNetwork(self.build_backbone(), cfg), cfg.sync_bn)

    def param_groups(self) -> list[ParamGroup]:
        """Weight decay on every parameter (BN and biases included), as SimSiam's SGD applies it."""
        encoder = [p for n, p in self.student.named_parameters() if not n.startswith("predictor.")]
        predictor = list(self.student.predictor.parameters())
        return [ParamGroup("encoder", encoder, weight_decay=True),
                ParamGroup("predictor", predictor, weight_decay=True, fixed_lr=self.cfg.fix_pred_lr)]

    def training_step(self, student: nn.Module, batch: dict[str, Any], progress: Progress) -> StepOutput:
        (p1, z1), (p2, z2) = student(list(batch["crops"]))
        loss = simsiam_loss(p1, p2, z1, z2)
        return StepOutput(loss=loss, metrics={"output_std": output_std(z1)}, batch_size=z1.shape[0])
