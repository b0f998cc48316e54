"""What fine-tuning trains and on what: the network (the weights' architecture through the project's
weights door, FD's shared relative position bias copied into every block, a fresh classifier),
timm's layer-wise lr decay groups, optimizer and per-step cosine, the augmentation (RandAugment
seeded per image), and top-1/top-5 validation over all ranks.
"""

from __future__ import annotations

import contextlib
import random
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from selfdistill.data import open_images
from selfdistill.engine.optim import create_optimizer
from selfdistill.eval.inference import sum_over_batches
from selfdistill.models.networks import create_timm_model
from selfdistill.models.weights import load_strict, read_weights
from selfdistill.training.finetune_config import FinetuneConfig, FinetuneDataConfig, FinetuneModelConfig, FinetuneOptimConfig

__all__ = [
    "BuiltModel", "NumpySeeded", "SHARED_RPB", "build_model", "build_optimizer", "build_scheduler", "eval_transform",
    "evaluate", "init_head", "numpy_seeded", "open_training_images", "param_groups", "train_transform",
    "unshare_rel_pos_bias",
]

SHARED_RPB = "rel_pos_bias.relative_position_bias_table"


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
