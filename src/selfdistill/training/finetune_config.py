"""The fine-tuning recipe (``configs/finetune_*.yaml``): its sections as dataclasses, each checked
when the recipe is read, so a wrong key or value fails before a model is built. Read through
:mod:`selfdistill.configkit` (a YAML recipe + dotted overrides) by :func:`load_finetune_config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfdistill.config import TrainConfig
from selfdistill.configkit import (Root, check_kwargs_have_values, fail, fraction, interval, non_negative, one_of,
                                   positive, read_recipe, root_from_tree)
from selfdistill.data import SourceConfig, detect_format
from selfdistill.data.multicrop import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "EmaConfig", "FinetuneConfig", "FinetuneDataConfig", "FinetuneEvalConfig", "FinetuneModelConfig",
    "FinetuneOptimConfig", "FinetuneTrainConfig", "MixupConfig",
    "load_finetune_config",
]



# --------------------------------------------------------------------------------------------
# Configuration (a YAML recipe + dotted overrides, through selfdistill.configkit)
# --------------------------------------------------------------------------------------------


@dataclass
class FinetuneModelConfig:
    """The network: timm model + pretrained weights + a fresh classifier."""

    weights: str = ""  # exported .safetensors | checkpoint/run dir | timm-format file (.safetensors/.pth) | random
    name: str = ""  # timm name; "" = the one recorded in the weights
    img_size: int | None = None  # None: data.input_size
    patch_size: int | None = None  # None: from the weights, else timm's default
    num_classes: int = 0  # 0: the number of classes of data.path
    global_pool: str = ""  # "" keeps timm's default (token for ViT); avg = mean of patch tokens + fc_norm
    drop_path_rate: float = 0.1
    drop_rate: float = 0.0  # dropout before the classifier
    head_init_scale: float = 0.001  # classifier ~ trunc_normal(0.02) * scale, bias 0 (BEiT/FD); 1.0: plain
    unshare_rel_pos_bias: bool = True  # a shared relative position bias (FD, BEiT pretraining) -> one per block
    grad_checkpointing: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)  # timm.create_model keywords, over the weights' own

    def validate(self, prefix: str) -> None:
        if not self.weights:
            fail(f"{prefix}.weights", "required: an exported .safetensors, a checkpoint/run directory, "
                                      "a timm-format weights file, or 'random'")
        if self.weights == "random" and not self.name:
            fail(f"{prefix}.name", "model.weights=random needs a timm model name")
        for name in ("img_size", "patch_size"):
            if getattr(self, name) is not None:
                positive(self, prefix, name)
        non_negative(self, prefix, "num_classes")
        for name in ("drop_path_rate", "drop_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(f"{prefix}.{name}", f"must be in [0, 1), got {getattr(self, name)}")
        positive(self, prefix, "head_init_scale")
        check_kwargs_have_values(f"{prefix}.kwargs", self.kwargs)


@dataclass
class FinetuneDataConfig(SourceConfig):
    """Labelled training images (the source keys), validation images and timm's fine-tuning augmentation."""

    val_path: str = ""  # labelled validation images (any format; an HF dataset: defaults to path + hf_val_split)
    hf_val_split: str = "validation"
    input_size: int = 224
    crop_pct: float = 0.875  # validation: resize to input_size / crop_pct, centre crop input_size
    interpolation: str = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip: float = 0.5
    color_jitter: float = 0.4  # inactive while auto_augment is set (timm)
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec; "" disables
    reprob: float = 0.25  # random erasing probability
    remode: str = "pixel"
    recount: int = 1
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    eval_mean: tuple[float, float, float] | None = None  # None: mean (FD's recipe uses CLIP's constants here)
    eval_std: tuple[float, float, float] | None = None

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if not self.path:
            fail(f"{prefix}.path", "required: the labelled training images")
        if not self.val_path and self.train_format() != "hf":
            fail(f"{prefix}.val_path", "required: the labelled validation images (folder, shards or HF directory)")
        positive(self, prefix, "input_size")
        if not 0.0 < self.crop_pct <= 1.0:
            fail(f"{prefix}.crop_pct", f"must be in (0, 1], got {self.crop_pct}")
        one_of(self, prefix, "interpolation", ("bicubic", "bilinear", "nearest", "random"))
        interval(self, prefix, "scale", 0.0, 1.0)
        interval(self, prefix, "ratio", 0.0, float("inf"))
        fraction(self, prefix, "hflip", "reprob")
        one_of(self, prefix, "remode", ("pixel", "rand", "const"))
        if self.auto_augment and not self.auto_augment.startswith(("rand", "augmix", "original", "v0", "3a")):
            fail(f"{prefix}.auto_augment", f"not a timm augmentation spec: {self.auto_augment!r} "
                                           "(e.g. rand-m9-mstd0.5-inc1; '' disables)")
        for name in ("std", "eval_std"):
            value = getattr(self, name)
            if value is not None and any(s <= 0 for s in value):
                fail(f"{prefix}.{name}", f"must be positive, got {value}")
        non_negative(self, prefix, "recount")

    def normalisation_notice(self, prefix: str = "data") -> str:
        """One line when validation images are normalised with other constants than training images
        (FD's recipes keep CLIP's for parity; with another backbone's ``mean``/``std`` it costs
        accuracy without a word), else ``""``."""
        pairs = [(name, getattr(self, name), getattr(self, f"eval_{name}")) for name in ("mean", "std")]
        differ = [(n, train, val) for n, train, val in pairs
                  if val is not None and any(abs(a - b) > 1e-6 for a, b in zip(train, val))]
        if not differ:
            return ""
        said = "; ".join(f"{prefix}.eval_{n} {list(val)} vs {prefix}.{n} {list(train)}" for n, train, val in differ)
        return (f"validation images are normalised unlike training images ({said}); set "
                f"{prefix}.eval_mean=null {prefix}.eval_std=null to use the training constants, unless the "
                f"difference is meant")

    def train_format(self) -> str:
        return detect_format(self.path) if self.format == "auto" else self.format

    def validation_source(self) -> SourceConfig:
        """The validation images: ``val_path``, or for an HF dataset its ``hf_val_split``."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(SourceConfig)}
        fields["hf_split"] = self.hf_val_split
        if self.val_path:
            fields.update(path=self.val_path, format="auto")
        return SourceConfig(**fields)


@dataclass
class MixupConfig:
    """timm ``Mixup`` (label smoothing folded into the soft targets); all 0 disables mixing."""

    mixup: float = 0.8  # Beta(alpha, alpha) for mixup; 0 disables
    cutmix: float = 1.0  # Beta(alpha, alpha) for cutmix; 0 disables
    cutmix_minmax: tuple[float, float] | None = None
    prob: float = 1.0  # probability of mixing a batch
    switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    mode: str = "batch"  # batch | pair | elem
    label_smoothing: float = 0.1

    def validate(self, prefix: str) -> None:
        non_negative(self, prefix, "mixup", "cutmix")
        fraction(self, prefix, "prob", "switch_prob")
        if not 0.0 <= self.label_smoothing < 1.0:
            fail(f"{prefix}.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        one_of(self, prefix, "mode", ("batch", "pair", "elem"))

    @property
    def active(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None) and self.prob > 0


@dataclass
class FinetuneOptimConfig:
    """AdamW with layer-wise lr decay and a per-step cosine schedule with linear warm-up."""

    name: str = "adamw"  # any timm optimizer name (engine.optim.create_optimizer; sgd: plain momentum)
    lr: float = 5e-4  # for a global batch of lr_base_batch images
    lr_base_batch: int = 256  # lr (and min_lr, warmup_lr) scale with global batch / this (FD: 512)
    scale_lr_with_batch: bool = True
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6  # the warm-up starts here
    warmup_epochs: float = 5
    weight_decay: float = 0.05  # never on 1-D parameters or the model's no_weight_decay() names
    layer_decay: float = 0.75  # block i of L gets lr * layer_decay ** (L + 1 - (i + 1)); 1.0 disables
    decay_rel_pos_bias: bool = False  # weight-decay per-block relative position bias tables (FD: true)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9  # SGD only
    clip_grad: float = 5.0  # global L2 norm; 0 disables

    def validate(self, prefix: str) -> None:
        non_negative(self, prefix, "lr", "min_lr", "warmup_lr", "warmup_epochs", "weight_decay", "clip_grad", "eps")
        if self.lr == 0:
            fail(f"{prefix}.lr", "must be > 0")
        positive(self, prefix, "lr_base_batch")
        if not 0.0 < self.layer_decay <= 1.0:
            fail(f"{prefix}.layer_decay", f"must be in (0, 1], got {self.layer_decay}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            fail(f"{prefix}.betas", f"must be in [0, 1), got {self.betas}")


@dataclass
class EmaConfig:
    """Optional EMA of the weights (timm ``ModelEmaV3``), evaluated beside the model."""

    enabled: bool = False
    decay: float = 0.9999
    warmup: bool = False  # timm's decay warm-up: 1 - (1 + step) ** -2/3, capped at decay

    def validate(self, prefix: str) -> None:
        if not 0.0 <= self.decay < 1.0:
            fail(f"{prefix}.decay", f"must be in [0, 1), got {self.decay}")


@dataclass
class FinetuneEvalConfig:
    every_epochs: int = 1  # top-1/top-5 on data.val_path after every N epochs (and always at the end)
    batch_size: int = 128

    def validate(self, prefix: str) -> None:
        positive(self, prefix, "every_epochs", "batch_size")


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """The loop's ``train`` section, with fine-tuning's defaults (a checkpoint at every epoch end)."""

    output_dir: str = "runs/finetune"
    batch_size_per_device: int = 128
    checkpoint_every_epochs: int = 1


@dataclass
class FinetuneConfig(Root):
    """A fine-tuning recipe (``configs/finetune_*.yaml``)."""

    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)

    def validate(self) -> None:
        super().validate()
        if self.mixup.active and self.mixup.mode != "elem" and self.train.batch_size_per_device % 2:
            fail("train.batch_size_per_device", f"mixup/cutmix mode {self.mixup.mode!r} needs an even batch, "
                                                f"got {self.train.batch_size_per_device}")


def load_finetune_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FinetuneConfig:
    """A fine-tuning recipe (YAML) with ``section.key=value`` overrides, type-checked and validated."""
    return root_from_tree(FinetuneConfig, read_recipe(path, overrides))
