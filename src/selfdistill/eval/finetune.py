"""Full fine-tuning of pretrained weights with a fresh classifier: the BEiT / Feature Distillation
recipe, as a task of the one training loop.

    python run_eval.py finetune --config configs/finetune_fd_vit_base16.yaml \\
        --weights runs/fd/export/student_backbone.safetensors data.path=IN/train data.val_path=IN/val

What timm already does is taken from timm: ``create_transform`` (RandAugment, random erasing),
``Mixup`` + ``SoftTargetCrossEntropy``, ``param_groups_layer_decay`` + ``create_optimizer_v2``
(layer-wise lr decay as each group's ``lr_scale``), ``CosineLRScheduler`` (per step), ``ModelEmaV3``,
drop path in the models. This module adds what no library does for this project: the weights
through the project's weights door (and FD's shared relative position bias, copied into every
block: :func:`unshare_rel_pos_bias`), the task the loop runs (training step = mixup + criterion,
after each step the weight EMA), validation at epoch ends (a hook), and safetensors + JSON out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from selfdistill.atomic import write_json_atomic
from selfdistill.config import TrainConfig
from selfdistill.configkit import (Root, check_kwargs_have_values, fail, fraction, interval, non_negative, one_of,
                                   positive, read_recipe, root_from_tree)
from selfdistill.data import SourceConfig, collate_eval, detect_format, open_images, sample_seed
from selfdistill.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from selfdistill.engine.inference import sum_over_batches
from selfdistill.engine.optim import create_optimizer
from selfdistill.engine.task import Export, Hook, Progress, StepOutput, Task
from selfdistill.engine.trainer import Trainer
from selfdistill.eval.protocols import EvalContext, Weights, register_protocol
from selfdistill.models.networks import create_timm_model
from selfdistill.models.weights import load_strict, read_weights

log = logging.getLogger("selfdistill")

__all__ = [
    "FinetuneConfig", "FinetuneOptions", "FinetuneTask", "build_model", "build_optimizer", "build_scheduler", "evaluate", "finetuning",
    "load_finetune_config", "param_groups", "unshare_rel_pos_bias",
]

SHARED_RPB = "rel_pos_bias.relative_position_bias_table"
WEIGHTS_FILE = "finetuned.safetensors"
EMA_WEIGHTS_FILE = "finetuned_ema.safetensors"
RESULTS_FILE = "finetune_results.json"


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


# --------------------------------------------------------------------------------------------
# The network: the weights' architecture, FD's shared relative position bias, a fresh classifier
# --------------------------------------------------------------------------------------------


def unshare_rel_pos_bias(state: Mapping[str, torch.Tensor], depth: int | None = None) -> dict[str, torch.Tensor]:
    """Copy a shared relative position bias table into every block (BEiT/FD fine-tuning).

    FD (like BEiT pretraining) learns one table ``rel_pos_bias.relative_position_bias_table``
    [(2H-1)(2W-1)+3, heads] for all blocks; fine-tuning gives each block its own copy
    (``blocks.{i}.attn.relative_position_bias_table``, timm ``Beit(use_rel_pos_bias=True)``), so
    the converted network computes exactly the same function. Index buffers are dropped (timm
    regenerates them for the model's grid). A state without a shared table is returned as is.
    """
    if SHARED_RPB not in state:
        return dict(state)
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if depth is None:
        if not blocks:
            raise ValueError("the weights hold a shared relative position bias but no blocks.N.* tensors")
        depth = max(blocks) + 1
    per_block = sorted(k for k in state if k.startswith("blocks.") and k.endswith("attn.relative_position_bias_table"))
    if per_block:
        raise ValueError(f"the weights hold both a shared relative position bias ({SHARED_RPB}) and per-block "
                         f"tables ({per_block[0]}, ...); which one to use is ambiguous")
    table = state[SHARED_RPB]
    out = {k: v for k, v in state.items()
           if not k.startswith("rel_pos_bias.") and not k.endswith("relative_position_index")}
    for i in range(depth):
        out[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
    return out


def init_head(model: nn.Module, scale: float) -> None:
    """A fresh classifier: trunc_normal(std 0.02) times ``scale``, bias 0 (BEiT's ``head_init_scale``)."""
    from timm.layers import trunc_normal_

    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        return
    trunc_normal_(head.weight, std=0.02)
    with torch.no_grad():
        head.weight.mul_(scale)
        if head.bias is not None:
            head.bias.zero_()


def _classifier_prefix(model: nn.Module) -> str:
    return (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"


class BuiltModel(NamedTuple):
    model: nn.Module
    info: dict[str, Any]  # timm_name, img_size, patch_size, kwargs: enough to rebuild it (export metadata)
    report: dict[str, Any]  # what the load did: converted, new tensors, unused tensors


def build_model(cfg: FinetuneModelConfig, num_classes: int, input_size: int) -> BuiltModel:
    """The classifier to fine-tune: the weights' architecture (its recorded timm keywords, then
    ``cfg``'s fields, then ``cfg.kwargs`` win), the weights loaded (FD's shared relative position
    bias copied into every block), a fresh head."""
    state, src = read_weights(cfg.weights) if cfg.weights != "random" else (None, {})
    name = cfg.name or src.get("timm_name", "")
    if not name:
        raise ValueError(f"model.weights {cfg.weights} does not say which timm model it is: set model.name")
    same_arch = not cfg.name or cfg.name == src.get("timm_name")
    arch: dict[str, Any] = dict(src.get("kwargs") or {}) if same_arch else {}
    if cfg.global_pool:
        arch["global_pool"] = cfg.global_pool
    arch.update(cfg.kwargs)
    converted = False
    if state is not None and SHARED_RPB in state and cfg.unshare_rel_pos_bias \
            and not cfg.kwargs.get("use_shared_rel_pos_bias", False):
        state = unshare_rel_pos_bias(state)
        arch.update(use_shared_rel_pos_bias=False, use_rel_pos_bias=True)
        converted = True
    used: dict[str, Any] = {}
    model = create_timm_model(name, cfg.img_size or input_size,
                              cfg.patch_size or (src.get("patch_size") if same_arch else None), cfg.drop_path_rate,
                              any_size=False, img_size_optional=cfg.img_size is None, used=used,
                              num_classes=num_classes, drop_rate=cfg.drop_rate, **arch)
    init_head(model, cfg.head_init_scale)
    report: dict[str, Any] = {"weights": cfg.weights, "rel_pos_bias_unshared": converted, "new": [], "unused": []}
    if state is not None:
        report.update(_load_into(model, state, cfg.weights))
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    info = {"timm_name": name, "img_size": used.get("img_size"), "patch_size": used.get("patch_size"), "kwargs": arch}
    return BuiltModel(model, info, report)


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> dict[str, list[str]]:
    """Load the pretrained tensors strictly, except what fine-tuning replaces on purpose.

    New (not in the file): the classifier and final norms (``fc_norm`` for mean pooling, or ``norm``).
    Unused (in the file, not in the model): a classifier, ``norm``/``fc_norm`` the chosen pooling
    does not have (FD: the final ``norm`` is unused under mean pooling), a masked-image-modelling
    ``mask_token``. Anything else is an error.
    """
    head = _classifier_prefix(model)
    state = {k: v for k, v in state.items() if not k.endswith("relative_position_index")}
    dropped_head = sorted(k for k in state if k.startswith(head + "."))
    state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:  # timm's own resizing of position embeddings / bias tables to the model's grid
        state = filter_fn(state, model)
    replaceable = (head + ".", "fc_norm.", "norm.")
    try:
        new, unused = load_strict(model, state, f"model.weights: {what}", may_miss=replaceable,
                                  may_leave=(*replaceable, "mask_token"))  # BEiT / SimMIM's mask token
    except ValueError as e:
        raise ValueError(f"{e}; check model.name / model.kwargs / model.global_pool") from None
    return {"new": new, "unused": sorted(unused + dropped_head)}


# --------------------------------------------------------------------------------------------
# Optimisation: layer-wise lr decay groups, optimizer, schedule
# --------------------------------------------------------------------------------------------


def param_groups(model: nn.Module, cfg: FinetuneOptimConfig) -> list[dict[str, Any]]:
    """timm's layer-decay groups: ``lr_scale = layer_decay ** (L + 1 - layer_id)`` with layer_id 0
    for the embeddings, i + 1 for block i and L + 1 (scale 1) for the final norm and classifier.
    No weight decay on 1-D tensors and ``model.no_weight_decay()`` names; with
    ``decay_rel_pos_bias`` the relative position bias tables are decayed (FD)."""
    from timm.optim import param_groups_layer_decay

    no_wd = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if cfg.decay_rel_pos_bias:
        no_wd = {n for n in no_wd if "relative_position_bias_table" not in n}
    return param_groups_layer_decay(model, weight_decay=cfg.weight_decay, no_weight_decay_list=sorted(no_wd),
                                    layer_decay=cfg.layer_decay)


def build_optimizer(model: nn.Module, cfg: FinetuneOptimConfig, lr: float) -> torch.optim.Optimizer:
    """``optim.name`` over the layer-decay groups, from the one factory (``sgd``: plain momentum)."""
    return create_optimizer(param_groups(model, cfg), cfg.name, lr=lr, weight_decay=cfg.weight_decay,
                            momentum=cfg.momentum, betas=cfg.betas, eps=cfg.eps)


def build_scheduler(optimizer: Any, total_steps: int, warmup_steps: int, min_lr: float, warmup_lr: float):
    """timm's cosine with a linear warm-up prefix, stepped per optimizer step (FD's schedule);
    each group's lr is the schedule times its ``lr_scale``."""
    from timm.scheduler import CosineLRScheduler

    warmup_steps = min(warmup_steps, total_steps - 1) if total_steps > 1 else 0
    return CosineLRScheduler(optimizer, t_initial=max(total_steps - warmup_steps, 1), lr_min=min_lr,
                             warmup_t=warmup_steps, warmup_lr_init=warmup_lr, warmup_prefix=True,
                             t_in_epochs=False)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def numpy_seeded(seed: int) -> Iterator[None]:
    """Seed numpy's global RNG for a block and restore it after (timm's Mixup and RandAugment
    draw from it)."""
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


class NumpySeeded:
    """Runs a transform with numpy seeded from Python's ``random``: the datasets seed Python and
    torch per (epoch, image), and this carries that seed over to RandAugment's numpy draws, so the
    augmentation of an image does not depend on workers or resumption."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, img: Any) -> Any:
        with numpy_seeded(random.getrandbits(32)):
            return self.transform(img)

    def __repr__(self) -> str:
        return f"NumpySeeded({self.transform!r})"


def train_transform(d: FinetuneDataConfig) -> NumpySeeded:
    from timm.data import create_transform

    return NumpySeeded(create_transform(
        d.input_size, is_training=True, scale=tuple(d.scale), ratio=tuple(d.ratio), hflip=d.hflip,
        color_jitter=d.color_jitter, auto_augment=d.auto_augment or None, interpolation=d.interpolation,
        mean=tuple(d.mean), std=tuple(d.std), re_prob=d.reprob, re_mode=d.remode, re_count=d.recount))


def eval_transform(d: FinetuneDataConfig) -> Any:
    from timm.data import create_transform

    interpolation = "bicubic" if d.interpolation == "random" else d.interpolation
    return create_transform(d.input_size, is_training=False, interpolation=interpolation, crop_pct=d.crop_pct,
                            mean=tuple(d.eval_mean or d.mean), std=tuple(d.eval_std or d.std))


def open_training_images(config: FinetuneConfig) -> Any:
    """The labelled training images with the fine-tuning augmentation; refused when unlabelled
    (shards without class names pass when ``model.num_classes`` says how many)."""
    images = open_images(config.data, train_transform(config.data), seed=config.train.seed)
    if not images.labelled and not (images.source.format == "wds" and config.model.num_classes):
        raise ValueError(f"data.path: {config.data.path} is unlabelled (no class sub-folders, no label column, or "
                         "shards without class names); fine-tuning needs labelled training images (or, for "
                         "shards, model.num_classes)")
    return images


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluate(model: nn.Module, loader: Any, accelerator: Any, desc: str = "val", show: bool = True,
             autocast: Any = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and cross-entropy over the whole validation set, every image
    counted once over all ranks (each rank reads its own shard of it)."""
    device = accelerator.device

    def sums(batch: dict[str, Any]) -> torch.Tensor:  # loss, top-1 hits, top-5 hits, images
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        with (autocast or accelerator.autocast)():
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(labels[:, None])
        return torch.stack([nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
                            hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                            torch.tensor(float(labels.numel()), dtype=torch.float64, device=device)])

    was_training = model.training
    model.eval()
    try:
        total = sum_over_batches(sums, loader, accelerator, torch.zeros(4, dtype=torch.float64, device=device),
                                 desc, show)
    finally:
        model.train(was_training)
    loss, top1, top5, n = total.tolist()
    if n == 0:
        raise ValueError("the validation set is empty")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n, "n": int(n)}


# --------------------------------------------------------------------------------------------
# The task the loop runs, and its validation
# --------------------------------------------------------------------------------------------


class _LayerDecaySchedule:
    """timm's per-step scheduler in the loop's terms: every group runs at the schedule times its
    ``lr_scale``; the largest and smallest group rates are logged."""

    def __init__(self, scheduler: Any, optimizer: Any) -> None:
        self.scheduler, self.optimizer = scheduler, optimizer

    def step_update(self, step: int) -> dict[str, float]:
        self.scheduler.step_update(step)
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        return {"lr": max(lrs), "lr_min_group": min(lrs)}


class FinetuneTask(Task):
    """A classifier trained on labelled images: the step is mixup + criterion, after each optimizer
    step the weight EMA; validation at epoch ends (:class:`FinetuneValidation`)."""

    name = "finetune"
    tracker_project = "selfdistill-finetune"

    def __init__(self, config: FinetuneConfig) -> None:
        from accelerate.state import AcceleratorState
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        plugin = AcceleratorState().deepspeed_plugin
        if plugin is not None and plugin.zero_stage == 3:
            raise ValueError("fine-tuning runs under DDP or DeepSpeed ZeRO-1/2; ZeRO-3 partitions the weights that "
                             "evaluation and the EMA read (use ds_configs/finetune_zero2.json)")
        self.config = cfg = config
        self.images = open_training_images(cfg)
        self.val_images = open_images(cfg.data.validation_source(), eval_transform(cfg.data), labelled=True,
                                      role="data.val_path")
        self.classes = list(self.images.classes)
        val_classes = list(self.val_images.classes)
        if self.classes and val_classes and self.classes != val_classes:
            raise ValueError(f"data.path and data.val_path have different classes: {self.classes[:5]}... vs "
                             f"{val_classes[:5]}...")
        self.num_classes = cfg.model.num_classes or len(self.classes) or len(val_classes)
        if self.num_classes < max(len(self.classes), 1):
            raise ValueError(f"model.num_classes={cfg.model.num_classes} is fewer than the {len(self.classes)} "
                             "classes of data.path" if self.classes else
                             "the number of classes is unknown: set model.num_classes")
        built = build_model(cfg.model, self.num_classes, cfg.data.input_size)
        self.student, self.model_info, self.load_report = built.model, built.info, built.report
        self.ema = None
        if cfg.ema.enabled:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.student, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup)
        m = cfg.mixup
        self.mixup = Mixup(mixup_alpha=m.mixup, cutmix_alpha=m.cutmix, cutmix_minmax=m.cutmix_minmax, prob=m.prob,
                           switch_prob=m.switch_prob, mode=m.mode, label_smoothing=m.label_smoothing,
                           num_classes=self.num_classes) if m.active else None
        if self.mixup is not None:
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif m.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=m.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.history: list[dict[str, Any]] = []  # one row per validation
        self._accelerator: Any = None

    # -- set-up ---------------------------------------------------------------------------------
    def train_data(self) -> Any:
        return self.images

    def collate_fn(self):
        return collate_eval

    def build_optimizer(self, global_batch: int, device: torch.device) -> torch.optim.Optimizer:
        o = self.config.optim
        factor = global_batch / o.lr_base_batch if o.scale_lr_with_batch else 1.0
        self.lr, self.min_lr, self.warmup_lr = o.lr * factor, o.min_lr * factor, o.warmup_lr * factor
        return build_optimizer(self.student, o, self.lr)

    def build_scheduler(self, optimizer: Any, steps_per_epoch: int, total_steps: int,
                        global_batch: int) -> _LayerDecaySchedule:
        warmup_steps = int(round(self.config.optim.warmup_epochs * steps_per_epoch))
        return _LayerDecaySchedule(build_scheduler(optimizer, total_steps, warmup_steps, self.min_lr,
                                                   self.warmup_lr), optimizer)

    def setup(self, accelerator: Any, steps_per_epoch: int, total_steps: int) -> None:
        self._accelerator = accelerator
        self._deepspeed = getattr(accelerator.state, "deepspeed_plugin", None) is not None
        if self.ema is not None:
            self.ema.module.to(accelerator.device)
        if accelerator.is_main_process:
            log.info("fine-tuning %s (%s) on %d classes: %d steps, lr %.3g (head; block i: x %.3g^(L-i))",
                     self.model_info["timm_name"], self.config.model.weights, self.num_classes, total_steps, self.lr,
                     self.config.optim.layer_decay)
            notice = self.config.data.normalisation_notice()
            if notice:
                log.warning("%s", notice)

    def hooks(self) -> list[Hook]:
        return [FinetuneValidation(self)]

    # -- per step -------------------------------------------------------------------------------
    def training_step(self, student: nn.Module, batch: Any, progress: Progress) -> StepOutput:
        images, targets = batch["image"], batch["label"]
        if self.mixup is not None:
            # Mixup's randomness is fixed by (seed, rank, micro-batch), so a resumed run mixes exactly
            # as the uninterrupted one.
            rank = self._accelerator.process_index if self._accelerator else 0
            with numpy_seeded(sample_seed(self.config.train.seed, 1_000_003 * rank + 17, progress.micro_batch)):
                images, targets = self.mixup(images, targets)
        loss = self.criterion(student(images).float(), targets)
        return StepOutput(loss, {}, images.shape[0])

    def after_optimizer_step(self, student: nn.Module, progress: Progress) -> None:
        if self.ema is None:
            return
        step = progress.step + 1
        unwrapped = self._accelerator.unwrap_model(student) if self._accelerator else student
        if self._deepspeed:  # the module may hold bf16 copies: read DeepSpeed's fp32 masters
            from selfdistill.params import ema_update

            ema_update(self.ema.module, unwrapped, self.ema.get_decay(step))
        else:
            self.ema.update(unwrapped, step=step)

    # -- state and outputs ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"history": self.history}
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError("--resume: the checkpoint has no EMA weights but ema.enabled=true")
            self.ema.module.load_state_dict(state["ema"])

    def exports(self) -> dict[str, Export]:
        meta = {**self.model_info, "num_classes": self.num_classes, "classes": self.classes}
        out = {WEIGHTS_FILE: Export(self.student, meta)}
        if self.ema is not None:
            out[EMA_WEIGHTS_FILE] = Export(self.ema.module, meta)
        return out


class FinetuneValidation(Hook):
    """Top-1 / top-5 on the validation images every ``eval.every_epochs`` epochs and at the end
    (EMA weights too); ``finetune_results.json`` when the run is over."""

    def __init__(self, task: FinetuneTask) -> None:
        self.task = task

    def on_epoch_end(self, loop: Any) -> None:
        done = loop.state.epoch
        if done % self.task.config.eval.every_epochs == 0 or loop.state.step >= loop.last_step:
            self.validate(loop, done)

    def on_train_end(self, loop: Any) -> None:
        history = self.task.history
        if not history or history[-1]["step"] != loop.state.step:
            self.validate(loop, loop.state.epoch)

    def validate(self, loop: Any, epoch: int) -> None:
        task, acc = self.task, loop.accelerator
        cfg = task.config
        show = acc.is_main_process and cfg.train.progress_bar

        def loader() -> Any:
            return task.val_images.eval_loader(cfg.eval.batch_size, acc.process_index, acc.num_processes,
                                               num_workers=min(cfg.data.num_workers, 4))

        row: dict[str, Any] = {"step": loop.state.step, "epoch": epoch}
        res = evaluate(acc.unwrap_model(loop.student), loader(), acc, "val", show, loop.autocast)
        row.update({f"val/{k}": v for k, v in res.items()})
        if task.ema is not None:
            res = evaluate(task.ema.module, loader(), acc, "val (EMA)", show, loop.autocast)
            row.update({f"val_ema/{k}": v for k, v in res.items()})
        task.history.append(row)
        loop.logger.write(row, loop.state.step)
        if acc.is_main_process:
            ema = f", EMA top-1 {row['val_ema/top1']:.2f}" if task.ema is not None else ""
            log.info("epoch %d step %d: val top-1 %.2f top-5 %.2f loss %.4f%s", epoch, loop.state.step,
                     row["val/top1"], row["val/top5"], row["val/loss"], ema)

    def on_final_checkpoint(self, loop: Any, path: Any) -> None:
        task, acc = self.task, loop.accelerator
        final = task.history[-1]
        best = max(task.history, key=lambda r: r["val/top1"])
        results = {
            "weights": task.config.model.weights, "model": task.model_info, "num_classes": task.num_classes,
            "classes": task.classes, "world_size": acc.num_processes, "global_batch": loop.global_batch,
            "steps": loop.state.step, "epochs": loop.state.step / loop.steps_per_epoch,
            "final": {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("val/")},
            "best": {"epoch": best["epoch"], "step": best["step"], "top1": best["val/top1"], "top5": best["val/top5"]},
            "history": task.history, "load": task.load_report, "skipped_steps": loop.state.skipped_steps,
            "weights_file": str(loop.run_dir / WEIGHTS_FILE),
        }
        if task.ema is not None:
            results["final_ema"] = {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("val_ema/")}
            results["weights_file_ema"] = str(loop.run_dir / EMA_WEIGHTS_FILE)
        if acc.is_main_process:
            write_json_atomic(loop.run_dir / RESULTS_FILE, results, indent=1)
            log.info("final val top-1 %.2f top-5 %.2f (best top-1 %.2f at epoch %d); wrote %s and %s",
                     results["final"]["top1"], results["final"]["top5"], results["best"]["top1"],
                     results["best"]["epoch"], loop.run_dir / WEIGHTS_FILE, loop.run_dir / RESULTS_FILE)
        loop.results.update(results)


def finetuning(config: FinetuneConfig, resume: str | None = None, hooks: tuple[Hook, ...] = (),
               resume_elastic: bool = False) -> Trainer:
    """The loop for a fine-tuning recipe; ``fit()`` returns the results (also ``finetune_results.json``)."""
    return Trainer(config, lambda: FinetuneTask(config), resume=resume, hooks=hooks, resume_elastic=resume_elastic)


# --------------------------------------------------------------------------------------------
# run_eval.py finetune
# --------------------------------------------------------------------------------------------


@dataclass
class FinetuneOptions:
    config: str = field(default="", metadata={"help": "fine-tuning recipe (configs/finetune_*.yaml)"})
    overrides: list[str] = field(default_factory=list, metadata={
        "help": "dotted overrides, e.g. data.path=... data.val_path=... optim.lr=1e-3", "positional": True,
        "metavar": "section.key=value"})
    resume: str = field(default="", metadata={
        "help": "'auto' continues the latest checkpoint in train.output_dir; or a checkpoint/run directory"})
    resume_elastic: bool = field(default=False, metadata={
        "help": "let the resumed run use another global batch than the checkpoint (position and schedules "
                "re-derived from the images seen)", "switch": True})
    print_config: bool = field(default=False, metadata={"help": "print the resolved config as YAML and exit",
                                                        "switch": True})


@register_protocol("finetune", FinetuneOptions, output="run",
                   help="full fine-tuning with a fresh classifier (BEiT / FD recipe: layer decay, RandAugment, "
                        "mixup/cutmix, drop path)")
def finetune_protocol(weights: Weights, options: FinetuneOptions, ctx: EvalContext) -> dict[str, Any]:
    """The recipe's ``model.weights`` / ``model.*`` / ``train.output_dir`` / ``train.cpu`` come from
    ``--weights`` / ``--model.*`` / ``--out`` / ``--cpu`` when given; the loop makes its own Accelerator."""
    if weights.format != "timm":
        raise ValueError(f"finetune reads exports, run directories and timm-format files; convert a "
                         f"{weights.format} file first: run_eval.py export --weights FILE --weights-format "
                         f"{weights.format} --model.name NAME --out export.safetensors")
    overrides = list(options.overrides)
    if weights.spec:
        overrides.append(f"model.weights={weights.spec}")
    if weights.model is not None:
        m = weights.model
        overrides += [f"model.name={m.name}", f"model.kwargs={json.dumps(m.kwargs)}"]
        overrides += [f"model.{k}={getattr(m, k)}" for k in ("img_size", "patch_size") if getattr(m, k) is not None]
    if ctx.out is not None:
        overrides.append(f"train.output_dir={ctx.out}")
    if ctx.cpu:
        overrides.append("train.cpu=true")
    config = load_finetune_config(options.config or None, overrides)
    if options.print_config:
        print(config.to_yaml(), end="")
        return {}
    return finetuning(config, resume=options.resume or None, resume_elastic=options.resume_elastic).fit()
