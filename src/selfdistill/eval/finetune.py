"""Full fine-tuning of pretrained weights with a fresh classifier: the BEiT / Feature Distillation recipe.

    python run_eval.py finetune --config configs/finetune_fd_vit_base16.yaml \\
        model.weights=runs/fd/export/student_backbone.safetensors data.path=IN/train data.val_path=IN/val

What timm already does is taken from timm: ``create_transform`` (RandAugment, random erasing),
``Mixup`` + ``SoftTargetCrossEntropy``, ``param_groups_layer_decay`` + ``create_optimizer_v2``
(layer-wise lr decay), ``CosineLRScheduler`` (per step), ``ModelEmaV3``, drop path in the models.
This module adds what no library does for this project: loading its exports / checkpoints (and
FD's shared relative position bias, copied into every block: :func:`unshare_rel_pos_bias`), a
resumable multi-process loop under Accelerate (DDP or DeepSpeed ZeRO-1/2) with the project's data
sources and checkpoints, top-1/top-5 on the validation set each epoch, and safetensors + JSON out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import time
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from selfdistill.config import (ConfigError, TrainConfig, _closest, _fail, _to_plain, build_dataclass,
                                check_kwargs_have_values, read_recipe)
from selfdistill.data import collate_eval

log = logging.getLogger("selfdistill")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHARED_RPB = "rel_pos_bias.relative_position_bias_table"
WEIGHTS_FILE = "finetuned.safetensors"
EMA_WEIGHTS_FILE = "finetuned_ema.safetensors"
RESULTS_FILE = "finetune_results.json"


# --------------------------------------------------------------------------------------------
# Configuration (YAML recipe + dotted overrides, through config.py's machinery)
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
            _fail(f"{prefix}.weights", "required: an exported .safetensors, a checkpoint/run directory, "
                                       "a timm-format weights file, or 'random'")
        if self.weights == "random" and not self.name:
            _fail(f"{prefix}.name", "model.weights=random needs a timm model name")
        for name in ("img_size", "patch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                _fail(f"{prefix}.{name}", f"must be positive, got {value}")
        if self.num_classes < 0:
            _fail(f"{prefix}.num_classes", f"must be >= 0, got {self.num_classes}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            _fail(f"{prefix}.drop_path_rate", f"must be in [0, 1), got {self.drop_path_rate}")
        if not 0.0 <= self.drop_rate < 1.0:
            _fail(f"{prefix}.drop_rate", f"must be in [0, 1), got {self.drop_rate}")
        if self.head_init_scale <= 0:
            _fail(f"{prefix}.head_init_scale", f"must be > 0, got {self.head_init_scale}")
        check_kwargs_have_values(f"{prefix}.kwargs", self.kwargs)


@dataclass
class FinetuneDataConfig:
    """Labelled training and validation images and timm's fine-tuning augmentation."""

    path: str = ""  # labelled training images: folder | HF dataset directory | labelled shard dir / URLs
    val_path: str = ""  # labelled validation images (folder or shards; hf: defaults to path + hf_val_split)
    format: str = "folder"  # folder | hf | wds (training source; validation: hf, shards or folder by path)
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
    num_workers: int = 8
    max_bad_fraction: float = 0.01
    decode_size: int = 0
    samples_per_epoch: int = 0  # wds
    shuffle_buffer: int = 1000  # wds
    shard_retries: int = 2  # wds
    max_missing_shards: float = 0.1  # wds
    hf_split: str = "train"
    hf_val_split: str = "validation"
    hf_image_column: str = "image"
    hf_label_column: str = "label"

    def validate(self, prefix: str) -> None:
        if not self.path:
            _fail(f"{prefix}.path", "required: the labelled training images")
        if not self.val_path and self.format != "hf":
            _fail(f"{prefix}.val_path", "required: the labelled validation images (folder or shard directory)")
        if self.format not in ("folder", "hf", "wds"):
            _fail(f"{prefix}.format", f"must be one of ['folder', 'hf', 'wds'], got {self.format!r}")
        if self.input_size <= 0:
            _fail(f"{prefix}.input_size", f"must be positive, got {self.input_size}")
        if not 0.0 < self.crop_pct <= 1.0:
            _fail(f"{prefix}.crop_pct", f"must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in ("bicubic", "bilinear", "nearest", "random"):
            _fail(f"{prefix}.interpolation", f"must be bicubic, bilinear, nearest or random, got {self.interpolation!r}")
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            _fail(f"{prefix}.scale", f"must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            _fail(f"{prefix}.ratio", f"must satisfy 0 < min <= max, got {self.ratio}")
        for name in ("hflip", "reprob", "max_bad_fraction", "max_missing_shards"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                _fail(f"{prefix}.{name}", f"must be in [0, 1], got {getattr(self, name)}")
        if self.remode not in ("pixel", "rand", "const"):
            _fail(f"{prefix}.remode", f"must be pixel, rand or const, got {self.remode!r}")
        if self.auto_augment and not self.auto_augment.startswith(("rand", "augmix", "original", "v0", "3a")):
            _fail(f"{prefix}.auto_augment", f"not a timm augmentation spec: {self.auto_augment!r} "
                                            "(e.g. rand-m9-mstd0.5-inc1; '' disables)")
        for name in ("std", "eval_std"):
            value = getattr(self, name)
            if value is not None and any(s <= 0 for s in value):
                _fail(f"{prefix}.{name}", f"must be positive, got {value}")
        for name in ("num_workers", "recount", "decode_size", "samples_per_epoch", "shuffle_buffer", "shard_retries"):
            if getattr(self, name) < 0:
                _fail(f"{prefix}.{name}", f"must be >= 0, got {getattr(self, name)}")


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
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                _fail(f"{prefix}.{name}", f"must be >= 0, got {getattr(self, name)}")
        for name in ("prob", "switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                _fail(f"{prefix}.{name}", f"must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            _fail(f"{prefix}.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        if self.mode not in ("batch", "pair", "elem"):
            _fail(f"{prefix}.mode", f"must be batch, pair or elem, got {self.mode!r}")

    @property
    def active(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None) and self.prob > 0


@dataclass
class FinetuneOptimConfig:
    """AdamW with layer-wise lr decay and a per-step cosine schedule with linear warm-up."""

    name: str = "adamw"  # any timm optimizer name (create_optimizer_v2)
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
        for name in ("lr", "min_lr", "warmup_lr", "warmup_epochs", "weight_decay", "clip_grad", "eps"):
            if getattr(self, name) < 0:
                _fail(f"{prefix}.{name}", f"must be >= 0, got {getattr(self, name)}")
        if self.lr == 0:
            _fail(f"{prefix}.lr", "must be > 0")
        if self.lr_base_batch <= 0:
            _fail(f"{prefix}.lr_base_batch", f"must be positive, got {self.lr_base_batch}")
        if not 0.0 < self.layer_decay <= 1.0:
            _fail(f"{prefix}.layer_decay", f"must be in (0, 1], got {self.layer_decay}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            _fail(f"{prefix}.betas", f"must be in [0, 1), got {self.betas}")


@dataclass
class EmaConfig:
    """Optional EMA of the weights (timm ``ModelEmaV3``), evaluated beside the model."""

    enabled: bool = False
    decay: float = 0.9999
    warmup: bool = False  # timm's decay warm-up: 1 - (1 + step) ** -2/3, capped at decay

    def validate(self, prefix: str) -> None:
        if not 0.0 <= self.decay < 1.0:
            _fail(f"{prefix}.decay", f"must be in [0, 1), got {self.decay}")


@dataclass
class FinetuneEvalConfig:
    every_epochs: int = 1  # top-1/top-5 on data.val_path after every N epochs (and always at the end)
    batch_size: int = 128

    def validate(self, prefix: str) -> None:
        for name in ("every_epochs", "batch_size"):
            if getattr(self, name) <= 0:
                _fail(f"{prefix}.{name}", f"must be positive, got {getattr(self, name)}")


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """The pretraining ``train`` section plus a checkpoint at every N-th epoch end."""

    output_dir: str = "runs/finetune"
    batch_size_per_device: int = 128
    checkpoint_every_epochs: int = 1  # also checkpoint after every N epochs (0: only train.checkpoint_every)

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.checkpoint_every_epochs < 0:
            _fail(f"{prefix}.checkpoint_every_epochs", f"must be >= 0, got {self.checkpoint_every_epochs}")


@dataclass
class FinetuneConfig:
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        if self.mixup.active and self.mixup.mode != "elem" and self.train.batch_size_per_device % 2:
            _fail("train.batch_size_per_device", f"mixup/cutmix mode {self.mixup.mode!r} needs an even batch, "
                                                 f"got {self.train.batch_size_per_device}")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def finetune_config_from_dict(tree: dict[str, Any]) -> FinetuneConfig:
    hints = typing.get_type_hints(FinetuneConfig)
    for key in tree:
        if key not in hints:
            raise ConfigError(f"config error: unknown section {key!r}{_closest(str(key), list(hints))}")
    config = FinetuneConfig(**{name: build_dataclass(tp, tree.get(name), name) for name, tp in hints.items()})
    config.validate()
    return config


def load_finetune_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FinetuneConfig:
    """A fine-tuning recipe (YAML) with ``section.key=value`` overrides, type-checked and validated."""
    return finetune_config_from_dict(read_recipe(path, overrides))


# --------------------------------------------------------------------------------------------
# Weights: reading them, FD's shared relative position bias, building the classifier
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


def _strip_encoder_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FD / SimMIM checkpoints keep the backbone under ``encoder.`` (beside a ``decoder.``)."""
    if any(k.startswith("encoder.") for k in state) and not any(k.startswith(("blocks.", "layers.")) for k in state):
        return {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    return state


def read_weights(weights: str) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """``(state_dict, info)`` of ``weights``; ``info`` holds what the source records about the model
    (``timm_name``, ``img_size``, ``patch_size``, ``kwargs``), empty for a bare timm-format file."""
    if weights == "random":
        return None, {}
    path = Path(weights)
    if path.is_dir():
        from selfdistill.export import load_backbone

        backbone, model_cfg = load_backbone(str(path))  # the checkpoint's evaluation backbone
        recorded = {"timm_name": model_cfg.name, "img_size": model_cfg.img_size, "patch_size": model_cfg.patch_size,
                    "kwargs": dict(model_cfg.kwargs)}
        return {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}, recorded
    if not path.is_file():
        raise FileNotFoundError(f"model.weights: {weights!r} is neither a file, a checkpoint/run directory nor 'random'")
    from timm.models import load_state_dict

    info: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from selfdistill.export import read_export_info

        try:
            info = read_export_info(path)
        except ValueError:
            info = {}  # a plain timm safetensors file: model.name must say what it is
    state = load_state_dict(str(path), weights_only=True)  # also unwraps 'model' / 'state_dict' / 'module.'
    return _strip_encoder_prefix(dict(state)), info


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


def _create_model(name: str, kw: dict[str, Any], size: dict[str, Any],
                  img_size_requested: bool) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model``; ``img_size`` is dropped for families without one (CNNs) unless asked for."""
    import timm

    size = dict(size)
    while True:
        try:
            return timm.create_model(name, pretrained=False, **kw, **size), size
        except TypeError as e:
            if "'img_size'" in str(e) and "img_size" in size and not img_size_requested:
                del size["img_size"]
                continue
            raise ValueError(f"model: timm model {name!r} refuses these arguments: {e}") from None
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ValueError(f"model.name: unknown timm model {name!r}") from None
            raise


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
    state, src = read_weights(cfg.weights)
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
    size: dict[str, Any] = {"img_size": cfg.img_size or input_size}
    patch_size = cfg.patch_size or (src.get("patch_size") if same_arch else None)
    if patch_size:
        size["patch_size"] = patch_size
    model, size = _create_model(name, dict(num_classes=num_classes, drop_path_rate=cfg.drop_path_rate,
                                           drop_rate=cfg.drop_rate, **arch), size, cfg.img_size is not None)
    init_head(model, cfg.head_init_scale)
    report: dict[str, Any] = {"weights": cfg.weights, "rel_pos_bias_unshared": converted, "new": [], "unused": []}
    if state is not None:
        report.update(_load_into(model, state, cfg.weights))
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    info = {"timm_name": name, "img_size": size.get("img_size"), "patch_size": size.get("patch_size"), "kwargs": arch}
    return BuiltModel(model, info, report)


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> dict[str, list[str]]:
    """Load the pretrained tensors strictly, except what fine-tuning replaces on purpose.

    New (not in the file): the classifier and final norms (``fc_norm`` for mean pooling, or ``norm``).
    Unused (in the file, not in the model): a classifier, ``norm``/``fc_norm`` the chosen pooling
    does not have (FD: the final ``norm`` is unused under mean pooling), a masked-image-modelling
    ``mask_token``. Anything else is an error.
    """
    import sys

    head = _classifier_prefix(model)
    state = {k: v for k, v in state.items() if not k.endswith("relative_position_index")}
    dropped_head = sorted(k for k in state if k.startswith(head + "."))
    state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:  # timm's own resizing of position embeddings / bias tables to the model's grid
        state = filter_fn(state, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    replaceable = (head + ".", "fc_norm.", "norm.")
    bad_missing = [k for k in missing if not k.startswith(replaceable)]
    bad_unexpected = [k for k in unexpected if not k.startswith(replaceable) and k != "mask_token"]  # BEiT/SimMIM
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if bad_missing or bad_unexpected or wrong:
        raise ValueError(f"model.weights: {what} does not fit {type(model).__name__}: missing {bad_missing[:4]} "
                         f"({len(bad_missing)}), unexpected {bad_unexpected[:4]} ({len(bad_unexpected)}), "
                         f"shapes {wrong[:3]}; check model.name / model.kwargs / model.global_pool")
    model.load_state_dict(state, strict=False)
    return {"new": missing, "unused": sorted(unexpected + dropped_head)}


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
    from timm.optim import create_optimizer_v2

    extra: dict[str, Any] = {}
    if "adam" in cfg.name or "lamb" in cfg.name:
        extra = {"betas": tuple(cfg.betas), "eps": cfg.eps}
    try:
        return create_optimizer_v2(param_groups(model, cfg), opt=cfg.name, lr=lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum, **extra)
    except (ValueError, AssertionError) as e:
        raise ValueError(f"optim.name: timm cannot build optimizer {cfg.name!r}: {e}") from None


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


def build_val_set(d: FinetuneDataConfig) -> Any:
    """Validation images with the evaluation transform: HF split, labelled shards or a folder."""
    from selfdistill.data import ImageFolderDataset
    from selfdistill.eval.knn_eval import EvalShards, is_shards

    transform = eval_transform(d)
    if d.format == "hf":
        from selfdistill.data.sources import HFImageDataset

        ds = HFImageDataset(d.val_path or d.path, transform, 0, d.hf_val_split, d.hf_image_column,
                            d.hf_label_column, d.decode_size)
        if not ds.labelled:
            raise ValueError(f"data.val_path: HF dataset has no label column {d.hf_label_column!r}")
        return ds
    if is_shards(d.val_path):
        from selfdistill.data.sources import expand_urls, shard_info

        info = shard_info(d.val_path) or {}
        if not info.get("class_names"):
            raise ValueError(f"data.val_path: shards {d.val_path} have no class names (an _info.json written "
                             "from labelled images); fine-tuning needs labelled validation images")
        return EvalShards(expand_urls(d.val_path), list(info["class_names"]), transform,
                          int(info.get("total_samples", 0)))
    ds = ImageFolderDataset(d.val_path, transform=transform, draft_size=d.decode_size)
    if not ds.labelled:
        raise ValueError(f"data.val_path: folder {d.val_path} has no class sub-folders; fine-tuning needs "
                         "labelled validation images")
    return ds


def train_classes(config: FinetuneConfig, source: Any) -> list[str]:
    """Class names of the training source; an error if it is unlabelled."""
    d = config.data
    if d.format == "wds":
        from selfdistill.data.sources import shard_info

        names = (shard_info(d.path) or {}).get("class_names")
        if not names and not config.model.num_classes:
            raise ValueError(f"data.path: shards {d.path} have no class names (_info.json from labelled images); "
                             "label them or set model.num_classes")
        return list(names or [])
    ds = source.dataset
    if not ds.labelled:
        raise ValueError(f"data.path: {d.path} is unlabelled (no class sub-folders / no label column); "
                         "fine-tuning needs labelled training images")
    return list(ds.classes or [])


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, accelerator: Any, desc: str = "val", show: bool = True,
             autocast: Any = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and cross-entropy over the whole validation set, every image
    counted once over all ranks (each rank reads its own shard of it)."""
    was_training = model.training
    model.eval()
    device = accelerator.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
    try:
        for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not show):
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            with (autocast or accelerator.autocast)():
                logits = model(images)
            logits = logits.float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hits = top.eq(labels[:, None])
            sums += torch.stack([nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
                                 hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                                 torch.tensor(float(labels.numel()), dtype=torch.float64, device=device)])
    finally:
        model.train(was_training)
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    loss, top1, top5, n = sums.tolist()
    if n == 0:
        raise ValueError("the validation set is empty")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n, "n": int(n)}


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


class StepOut(NamedTuple):
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    batch_size: int


@dataclass
class FinetuneState:
    """Where the run stands; saved in every checkpoint (``loop_state.json``)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    nonfinite_in_a_row: int = 0
    skipped_steps: int = 0
    world_size: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per validation
    bad: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class FineTuner:
    def __init__(self, config: FinetuneConfig, resume: str | None = None) -> None:
        self.config = config
        self.resume = resume
        self.run_dir = Path(config.train.output_dir)

    # ------------------------------------------------------------------------------------------
    def _build(self) -> None:
        from accelerate.utils import set_seed
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        from selfdistill.data import BadSampleTracker
        from selfdistill.data.sources import build_train_source
        from selfdistill.engine.distributed import configure_deepspeed, make_accelerator

        cfg, t, o = self.config, self.config.train, self.config.optim
        self.accelerator = acc = make_accelerator(t.precision, t.grad_accum_steps, t.cpu, t.trackers, str(self.run_dir))
        self.deepspeed = getattr(acc.state, "deepspeed_plugin", None) is not None
        if self.deepspeed and acc.state.deepspeed_plugin.zero_stage == 3:
            raise ValueError("fine-tuning runs under DDP or DeepSpeed ZeRO-1/2; ZeRO-3 partitions the weights that "
                             "evaluation and the EMA read (use ds_configs/finetune_zero2.json)")
        self.source = build_train_source(cfg, train_transform(cfg.data), collate_eval, acc.process_index,
                                         acc.num_processes, acc.device.type == "cuda")
        self.classes = train_classes(cfg, self.source)
        self.val_set = build_val_set(cfg.data)
        val_classes = list(self.val_set.classes or [])
        if self.classes and val_classes and self.classes != val_classes:
            raise ValueError(f"data.path and data.val_path have different classes: {self.classes[:5]}... vs "
                             f"{val_classes[:5]}...")
        self.num_classes = cfg.model.num_classes or len(self.classes) or len(val_classes)
        if self.num_classes < max(len(self.classes), 1):
            raise ValueError(f"model.num_classes={cfg.model.num_classes} is fewer than the {len(self.classes)} "
                             "classes of data.path" if self.classes else
                             "the number of classes is unknown: set model.num_classes")

        set_seed(t.seed)  # the same fresh head on every rank
        built = build_model(cfg.model, self.num_classes, cfg.data.input_size)
        self.model_info, self.load_report = built.info, built.report
        model = built.model
        self.steps_per_epoch = self.source.batches_per_epoch // t.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(f"one epoch has {self.source.batches_per_epoch} batches per device, fewer than "
                             f"train.grad_accum_steps={t.grad_accum_steps}")
        self.total_steps = t.epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, t.max_steps) if t.max_steps else self.total_steps
        self.global_batch = t.batch_size_per_device * acc.num_processes * t.grad_accum_steps
        factor = self.global_batch / o.lr_base_batch if o.scale_lr_with_batch else 1.0
        self.lr, self.min_lr, self.warmup_lr = o.lr * factor, o.min_lr * factor, o.warmup_lr * factor
        self.warmup_steps = int(round(o.warmup_epochs * self.steps_per_epoch))

        optimizer = build_optimizer(model, o, self.lr)
        self.ema = None
        if cfg.ema.enabled:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup)
            self.ema.module.to(acc.device)
        configure_deepspeed(acc, t.batch_size_per_device, o.clip_grad, t.precision)
        set_seed(t.seed + acc.process_index)  # per-rank randomness (drop path)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, self.warmup_steps, self.min_lr,
                                         self.warmup_lr)
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
        self.bad = BadSampleTracker()
        self.state = FinetuneState(world_size=acc.num_processes)

    def _autocast(self) -> Any:
        """Accelerate's autocast, except under DeepSpeed, where Accelerate gives none although the
        engine may hold bf16/fp16 weights (as in the pretraining loop)."""
        precision = self.config.train.precision
        if self.deepspeed and precision != "fp32":
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            return torch.autocast(device_type=self.accelerator.device.type, dtype=dtype)
        return self.accelerator.autocast()

    def _val_loader(self) -> Any:
        from torch.utils.data import DataLoader

        from selfdistill.eval.knn import ShardedEvalSampler
        from selfdistill.eval.knn_eval import EvalShards

        acc, e = self.accelerator, self.config.eval
        workers = min(self.config.data.num_workers, 4)
        if isinstance(self.val_set, EvalShards):
            return self.val_set.loader(e.batch_size, workers, acc.process_index, acc.num_processes)
        return DataLoader(self.val_set, batch_size=e.batch_size, num_workers=workers, collate_fn=collate_eval,
                          sampler=ShardedEvalSampler(len(self.val_set), acc.process_index, acc.num_processes),
                          generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone

    # ------------------------------------------------------------------------------------------
    def _save(self) -> None:
        from selfdistill.engine import checkpoint as ckpt

        self.state.bad = self.bad.state_dict()
        extra = {"ema": self.ema.module.state_dict()} if self.ema is not None else {}
        ckpt.save_checkpoint(self.accelerator, self.run_dir, self.state.step, extra, self.state.to_dict(),
                             self.config.to_yaml(), self.config.train.keep_checkpoints)

    def _restore(self, path: Path) -> None:
        from selfdistill.engine import checkpoint as ckpt

        extra, loop_state = ckpt.load_checkpoint(self.accelerator, path)
        self.state = FinetuneState(**loop_state)
        self.bad.load_state_dict(self.state.bad)
        if self.ema is not None:
            if "ema" not in extra:
                raise ValueError(f"--resume {path}: the checkpoint has no EMA weights but ema.enabled=true")
            self.ema.module.load_state_dict(extra["ema"])
        if self.accelerator.is_main_process:
            log.info("resumed from %s (step %d, epoch %d)", path, self.state.step, self.state.epoch)

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        from selfdistill.engine import checkpoint as ckpt
        from selfdistill.engine.logger import RunLogger
        from selfdistill.engine.trainer import _flat_config

        self._build()
        acc, cfg = self.accelerator, self.config
        resume_from = ckpt.resolve_resume(self.resume, self.run_dir)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
            log.info("fine-tuning %s (%s) on %d classes: %d steps of %d images, lr %.3g (head; block i: x %.3g^(L-i))",
                     self.model_info["timm_name"], cfg.model.weights, self.num_classes, self.total_steps,
                     self.global_batch, self.lr, cfg.optim.layer_decay)
        acc.wait_for_everyone()
        if resume_from is not None:
            self._restore(resume_from)
        elif self.resume == "auto" and acc.is_main_process:
            log.info("--resume auto: no checkpoint in %s, starting fresh", self.run_dir)
        if cfg.train.trackers:
            acc.init_trackers("selfdistill-finetune", config=_flat_config(cfg.to_dict()))
        self.logger = RunLogger(acc, self.run_dir)
        bar = tqdm(total=self.last_step, initial=self.state.step, desc="finetune", dynamic_ncols=True,
                   disable=not (acc.is_main_process and cfg.train.progress_bar))
        t = cfg.train
        try:
            while self.state.step < self.last_step:
                self._train_epoch(bar)
                if self.state.batch_in_epoch:  # stopped inside an epoch (train.max_steps)
                    break
                done = self.state.epoch
                if done % cfg.eval.every_epochs == 0 or self.state.step >= self.last_step:
                    self._validate(done)
                if t.checkpoint_every_epochs and done % t.checkpoint_every_epochs == 0 \
                        and not ckpt.checkpoint_dir(self.run_dir, self.state.step).exists():
                    self._save()
        finally:
            bar.close()
        if not self.state.history or self.state.history[-1]["step"] != self.state.step:
            self._validate(self.state.epoch)
        if not ckpt.checkpoint_dir(self.run_dir, self.state.step).exists():
            self._save()
        self._check_bad_images(final=True)
        results = self._finish()
        acc.end_training()
        return results

    def _micro_seed(self) -> int:
        """Mixup's randomness for this micro-batch: fixed by (seed, rank, position), so a resumed run
        mixes exactly as the uninterrupted one."""
        from selfdistill.data import sample_seed

        st, t = self.state, self.config.train
        position = st.epoch * self.steps_per_epoch * t.grad_accum_steps + st.batch_in_epoch
        return sample_seed(t.seed, 1_000_003 * self.accelerator.process_index + 17, position)

    def _train_epoch(self, bar: tqdm) -> None:
        from selfdistill.engine.trainer import _to_device

        acc, t = self.accelerator, self.config.train
        st = self.state
        micro_per_epoch = self.steps_per_epoch * t.grad_accum_steps
        step_ok, grad_norm = True, None
        data_iter = iter(self.source.loader(st.epoch, st.batch_in_epoch))
        while st.batch_in_epoch < micro_per_epoch and st.step < self.last_step:
            t0 = time.perf_counter()
            batch = next(data_iter)
            t_data = time.perf_counter() - t0
            batch = _to_device(batch, acc.device)
            images, targets = batch["image"], batch["label"]
            if self.mixup is not None:
                with numpy_seeded(self._micro_seed()):
                    images, targets = self.mixup(images, targets)
            self.scheduler.step_update(st.step)
            with acc.accumulate(self.model):
                with self._autocast():
                    logits = self.model(images)
                loss = self.criterion(logits.float(), targets)
                finite = self._all_finite(loss)
                step_ok &= finite
                if self.deepspeed:  # DeepSpeed steps inside backward; its overflow check skips a bad step
                    acc.backward(loss)
                    if acc.sync_gradients and step_ok:
                        grad_norm = self.model.get_global_grad_norm()
                else:
                    if finite:
                        acc.backward(loss)
                    if acc.sync_gradients and step_ok:
                        if self.config.optim.clip_grad > 0:
                            grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.config.optim.clip_grad)
                        self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            st.batch_in_epoch += 1
            self.bad.update(batch.get("bad", []), images.shape[0])
            self.logger.accumulate(StepOut(loss.detach(), {}, images.shape[0]), t_data, time.perf_counter() - t0, finite)
            if not acc.sync_gradients:
                continue
            stepped, step_ok = step_ok, True
            if stepped:
                st.nonfinite_in_a_row = 0
                st.step += 1
                bar.update(1)
                if self.ema is not None:
                    self._update_ema(st.step)
            else:
                self._on_nonfinite()
            epoch_done = st.batch_in_epoch >= micro_per_epoch
            if epoch_done:
                st.epoch += 1
                st.batch_in_epoch = 0
            if stepped and (st.step % t.log_every == 0 or st.step == self.last_step):
                lrs = [g["lr"] for g in self.optimizer.param_groups]
                values = {"lr": max(lrs), "lr_min_group": min(lrs), "skipped_steps": st.skipped_steps,
                          "bad_images": self.bad.n_bad}
                if grad_norm is not None:
                    values["grad_norm"] = float(grad_norm)
                row = self.logger.flush(st.step, st.step / self.steps_per_epoch, values)
                if row:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{max(lrs):.2e}")
                self._check_bad_images(final=False)
            if stepped and st.step % t.checkpoint_every == 0 and st.step < self.last_step:
                self._save()
            if epoch_done:
                return

    def _update_ema(self, step: int) -> None:
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.deepspeed:  # the module may hold bf16 copies: read DeepSpeed's fp32 masters
            from selfdistill.params import ema_update

            ema_update(self.ema.module, unwrapped, self.ema.get_decay(step))
        else:
            self.ema.update(unwrapped, step=step)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        return bool(bad.item() == 0)

    def _on_nonfinite(self) -> None:
        from selfdistill.engine import checkpoint as ckpt
        from selfdistill.engine.trainer import NonFiniteLossError

        st = self.state
        st.nonfinite_in_a_row += 1
        st.skipped_steps += 1
        if self.accelerator.is_main_process:
            log.warning("non-finite loss at step %d: step skipped (%d in a row)", st.step, st.nonfinite_in_a_row)
        if st.nonfinite_in_a_row >= self.config.train.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{st.nonfinite_in_a_row} non-finite losses in a row at step {st.step}; stopping. Last good "
                f"checkpoint: {ckpt.latest_checkpoint(self.run_dir) or 'none yet'}. Lower optim.lr.")

    def _check_bad_images(self, final: bool) -> None:
        from selfdistill.data import BadSampleTracker

        counts = torch.tensor([float(self.bad.n_bad), float(self.bad.n_seen)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        total = BadSampleTracker()
        total.load_state_dict({**self.bad.state_dict(), "n_bad": int(counts[0]), "n_seen": int(counts[1])})
        total.check(self.config.data.max_bad_fraction, final=final)

    def _validate(self, epoch: int) -> None:
        acc = self.accelerator
        show = acc.is_main_process and self.config.train.progress_bar
        row: dict[str, Any] = {"step": self.state.step, "epoch": epoch}
        res = evaluate(acc.unwrap_model(self.model), self._val_loader(), acc, "val", show, self._autocast)
        row.update({f"val/{k}": v for k, v in res.items()})
        if self.ema is not None:
            res = evaluate(self.ema.module, self._val_loader(), acc, "val (EMA)", show, self._autocast)
            row.update({f"val_ema/{k}": v for k, v in res.items()})
        self.state.history.append(row)
        self.logger._write(row, self.state.step)
        if acc.is_main_process:
            ema = f", EMA top-1 {row['val_ema/top1']:.2f}" if self.ema is not None else ""
            log.info("epoch %d step %d: val top-1 %.2f top-5 %.2f loss %.4f%s", epoch, self.state.step,
                     row["val/top1"], row["val/top5"], row["val/loss"], ema)

    def _finish(self) -> dict[str, Any]:
        from selfdistill.engine import checkpoint as ckpt
        from selfdistill.export import student_state_from_checkpoint

        acc = self.accelerator
        final = self.state.history[-1]
        best = max(self.state.history, key=lambda r: r["val/top1"])
        results = {
            "weights": self.config.model.weights, "model": self.model_info, "num_classes": self.num_classes,
            "classes": self.classes, "world_size": acc.num_processes, "global_batch": self.global_batch,
            "steps": self.state.step, "epochs": self.state.step / self.steps_per_epoch,
            "final": {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("val/")},
            "best": {"epoch": best["epoch"], "step": best["step"], "top1": best["val/top1"], "top5": best["val/top5"]},
            "history": self.state.history, "load": self.load_report, "skipped_steps": self.state.skipped_steps,
            "weights_file": str(self.run_dir / WEIGHTS_FILE),
        }
        if self.ema is not None:
            results["final_ema"] = {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("val_ema/")}
            results["weights_file_ema"] = str(self.run_dir / EMA_WEIGHTS_FILE)
        acc.wait_for_everyone()
        if acc.is_main_process:
            meta = {**self.model_info, "num_classes": self.num_classes, "classes": self.classes}
            # From the final checkpoint: full fp32 weights whatever the backend (ZeRO partitions merged).
            state = student_state_from_checkpoint(ckpt.checkpoint_dir(self.run_dir, self.state.step))
            save_classifier(state, self.run_dir / WEIGHTS_FILE, meta)
            if self.ema is not None:
                save_classifier(self.ema.module.state_dict(), self.run_dir / EMA_WEIGHTS_FILE, meta)
            _write_atomic_text(self.run_dir / RESULTS_FILE, json.dumps(results, indent=1) + "\n")
            log.info("final val top-1 %.2f top-5 %.2f (best top-1 %.2f at epoch %d); wrote %s and %s",
                     results["final"]["top1"], results["final"]["top5"], results["best"]["top1"],
                     results["best"]["epoch"], self.run_dir / WEIGHTS_FILE, self.run_dir / RESULTS_FILE)
        acc.wait_for_everyone()
        return results


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_classifier(state: Mapping[str, torch.Tensor], path: Path, meta: dict[str, Any]) -> Path:
    """The fine-tuned classifier as safetensors (atomically) with the export metadata, so
    ``run_eval.py knn --weights`` and :func:`selfdistill.export.load_backbone` read it too."""
    from safetensors.torch import save_file

    from selfdistill.export import METADATA_KEY

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    os.replace(tmp, path)
    kw = {k: meta[k] for k in ("img_size", "patch_size") if meta.get(k) is not None}
    kw.update(meta.get("kwargs") or {})
    load_with = (f"m = timm.create_model({meta['timm_name']!r}, num_classes={meta['num_classes']}"
                 + "".join(f", {k}={v!r}" for k, v in kw.items())
                 + f"); m.load_state_dict(safetensors.torch.load_file({str(path)!r}))")
    _write_atomic_text(path.with_suffix(".json"), json.dumps({**meta, "load_with": load_with}, indent=1) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Command line (run_eval.py finetune)
# --------------------------------------------------------------------------------------------


def add_arguments(p: Any) -> None:
    p.add_argument("--config", help="fine-tuning recipe (configs/finetune_*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted overrides, e.g. model.weights=teacher.safetensors data.path=... data.val_path=...")
    p.add_argument("--resume", default=None,
                   help="'auto' continues the latest checkpoint in train.output_dir; or a checkpoint/run directory")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")


def run_command(args: Any) -> int:
    import sys

    try:
        config = load_finetune_config(args.config, args.overrides)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    from selfdistill.engine.distributed import relaunch_if_needed
    from selfdistill.engine.trainer import NonFiniteLossError

    relaunch_if_needed()
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        FineTuner(config, resume=args.resume).fit()
    except NonFiniteLossError as e:
        log.error("%s", e)
        return 1
    return 0


__all__ = [
    "FineTuner", "FinetuneConfig", "build_model", "build_optimizer", "build_scheduler", "evaluate",
    "load_finetune_config", "param_groups", "read_weights", "unshare_rel_pos_bias",
]

