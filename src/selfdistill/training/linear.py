"""Linear probe: a linear classifier trained on frozen features (DINO ``eval_linear.py``; SMD's
``main_lincls.py --lars``).

Features (no batch norm, as DINO): for a ViT, the final-norm CLS tokens of the last
``n_last_blocks`` blocks concatenated (DINO: 4 for ViT-S, 1 for ViT-B), optionally followed by the
average of the last block's patch tokens; for Swin / ResNet, the backbone's average pool. The
classifier is ``nn.Linear`` with weights ~ N(0, 0.01) and zero bias, trained with cross-entropy on
RandomResizedCrop + flip views (recomputed every epoch, since the crops change), validated on
Resize(size·256/224) + CenterCrop(size). The reported top-1 is the best over the validations, as
DINO reports it.

Recipes (``RECIPES``): ``dino`` = SGD, momentum 0.9, wd 0, lr 0.001·batch/256, batch 1024, 100
epochs, cosine per epoch to 0; ``smd`` = LARS (LARC with trust 0.001, no clipping, via
``timm.optim.Lars(always_adapt=True)``) over SGD momentum 0.9, wd 0, lr 0.1·batch/256, batch 4096,
90 epochs, cosine per epoch.

The training is a task of the one loop (:mod:`selfdistill.training.linear_probe`); a killed probe
resumes exactly from the loop's checkpoints. The protocol sits in the training wing because it
trains the head; evaluation proper only reads frozen weights.

One difference from DINO: with ``avgpool_patchtokens`` DINO interleaves the CLS and average
vectors element by element (and so only works with ``n_last_blocks=1``); here they are
concatenated, which is the same features in another order (a linear layer learns the same
function) and also works with ``n_last_blocks > 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from selfdistill.data import SourceConfig, open_images
from selfdistill.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from selfdistill.eval.protocols import EvalContext, Weights, register_protocol, settings_from_run
from selfdistill.training.linear_probe import RECIPES, train_linear_classifier


# option -> (the run's config keys, the default without a run): a run is probed as it was evaluated
RUN_SETTINGS: dict[str, tuple[tuple[str, ...], Any]] = {
    "image_size": (("knn.image_size",), 224),
    "mean": (("data.mean",), IMAGENET_MEAN),
    "std": (("data.std",), IMAGENET_STD),
}


@dataclass
class LinearOptions:
    train_path: str = field(metadata={"help": "labelled training images (folder, shard directory or HF directory)",
                                      "flags": ["--data.path"]})
    val_path: str = field(metadata={"help": "labelled validation images", "flags": ["--data.val_path"]})
    recipe: str = field(default="dino", metadata={"help": "dino (SGD) or smd (LARS)", "choices": sorted(RECIPES)})
    epochs: int | None = field(default=None, metadata={"help": "epochs (default: the recipe's, 100 / 90)"})
    batch_size: int | None = field(default=None, metadata={
        "help": "global batch over all processes (default: the recipe's, 1024 / 4096)"})
    lr: float | None = field(default=None, metadata={
        "help": "learning rate per 256 images, scaled by batch/256 (default: the recipe's, 0.001 / 0.1)"})
    n_last_blocks: int = field(default=4, metadata={
        "help": "ViT: concatenate the CLS tokens of the last n blocks (DINO: 4 for ViT-S, 1 for ViT-B)"})
    avgpool_patchtokens: bool = field(default=False, metadata={
        "help": "ViT: also concatenate the average of the last block's patch tokens (DINO: on for ViT-B)"})
    image_size: int | None = field(default=None, metadata={
        "help": "crop size (default: the run's knn.image_size, else 224)"})
    mean: tuple[float, float, float] | None = field(default=None, metadata={
        "help": "normalisation mean (default: the run's data.mean, else ImageNet's)"})
    std: tuple[float, float, float] | None = field(default=None, metadata={
        "help": "normalisation std (default: the run's data.std, else ImageNet's)"})
    num_workers: int = field(default=4, metadata={"help": "data loading workers per process"})
    val_every: int = field(default=1, metadata={"help": "validate every N epochs (and after the last)"})
    seed: int = field(default=0, metadata={"help": "seed of the data order, the augmentation and the head"})
    resume: bool = field(default=True, metadata={
        "help": "continue from the checkpoint in the output directory when its settings match"})

    def validate(self, prefix: str) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"{prefix}.recipe: {self.recipe!r} is not one of {sorted(RECIPES)}")
        for name in ("epochs", "batch_size", "lr"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{prefix}.{name}: must be positive, got {v}")
        for name in ("n_last_blocks", "image_size", "val_every"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{prefix}.{name}: must be positive, got {getattr(self, name)}")


# --------------------------------------------------------------------------------------------
# Features and head
# --------------------------------------------------------------------------------------------


def has_cls_token(model: nn.Module) -> bool:
    return getattr(model, "cls_token", None) is not None and hasattr(model, "forward_intermediates")


class LinearFeatures:
    """The frozen features the classifier sees (call under ``torch.no_grad``)."""

    def __init__(self, backbone: nn.Module, n_last_blocks: int = 4, avgpool_patchtokens: bool = False) -> None:
        self.backbone = backbone
        self.vit = has_cls_token(backbone.model)
        depth = len(getattr(backbone.model, "blocks", [])) if self.vit else 0
        if self.vit and n_last_blocks > depth:
            raise ValueError(f"--n-last-blocks {n_last_blocks}: the model has only {depth} blocks")
        self.n, self.avgpool = n_last_blocks, avgpool_patchtokens

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.vit:
            return self.backbone(x).pooled
        outs = self.backbone.model.forward_intermediates(
            x, indices=self.n, norm=True, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True)
        feats = [prefix[:, 0] for _, prefix in outs]
        if self.avgpool:
            feats.append(outs[-1][0].mean(dim=1))
        return torch.cat(feats, dim=-1)

    def describe(self) -> str:
        if not self.vit:
            return "average-pooled final features (no CLS token)"
        s = f"final-norm CLS tokens of the last {self.n} block(s), concatenated"
        return s + (" + average of the last block's patch tokens" if self.avgpool else "")


# --------------------------------------------------------------------------------------------
# The protocol: images -> features -> head
# --------------------------------------------------------------------------------------------


def linear_transforms(image_size: int, val_interpolation: str, mean, std):
    """(train, val): RandomResizedCrop(scale 0.08-1, bilinear) + flip; Resize(size·256/224) + CenterCrop."""
    from torchvision.transforms import InterpolationMode, v2

    from selfdistill.data import to_normalized_tensor

    def rgb(img):
        return img.convert("RGB")

    train = v2.Compose([rgb, v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), antialias=True),
                        v2.RandomHorizontalFlip(), to_normalized_tensor(mean, std)])
    val = v2.Compose([rgb, v2.Resize(int(image_size * 256 / 224 + 1e-6), antialias=True,
                                     interpolation=InterpolationMode(val_interpolation)),
                      v2.CenterCrop(image_size), to_normalized_tensor(mean, std)])
    return train, val


def _num_classes(ds: Any) -> tuple[int, list[str]]:
    classes = list(getattr(ds, "classes", []) or [])
    if classes:
        return len(classes), classes
    targets = getattr(ds, "targets", None)
    if targets is None:
        raise ValueError("cannot tell the number of classes of the training set")
    return max(targets) + 1, []


@register_protocol("linear", LinearOptions,
                   help="linear classifier on frozen features (DINO eval_linear SGD, or SMD's LARS)")
def linear_protocol(weights: Weights, options: LinearOptions, ctx: EvalContext) -> dict[str, Any]:
    """Linear probe of the frozen backbone; writes the head (safetensors) and a checkpoint to ctx.out_dir."""
    acc = ctx.accelerator
    recipe = RECIPES[options.recipe]
    options, origin = settings_from_run(options, weights, RUN_SETTINGS)  # the run's evaluation size, normalisation
    batch_size = options.batch_size or recipe.batch_size
    if batch_size % acc.num_processes:
        raise ValueError(f"linear: the global batch {batch_size} must divide by the {acc.num_processes} processes")
    per_device = batch_size // acc.num_processes
    train_tf, val_tf = linear_transforms(options.image_size, recipe.val_interpolation, options.mean, options.std)
    train = open_images(SourceConfig(path=options.train_path, num_workers=options.num_workers), train_tf,
                        labelled=True, seed=options.seed, role="--data.path")
    val = open_images(SourceConfig(path=options.val_path, num_workers=options.num_workers), val_tf, labelled=True,
                      role="--data.val_path")
    if train.classes != val.classes:
        raise ValueError(f"linear: train and validation sets have different classes: {train.classes[:5]}... vs "
                         f"{val.classes[:5]}...")
    num_classes, classes = _num_classes(train)
    if train.dataset is not None and batch_size > len(train):
        raise ValueError(f"linear: --batch-size {batch_size} is larger than the {len(train)} training images")

    backbone = weights.backbone().to(ctx.device)
    features = LinearFeatures(backbone, options.n_last_blocks, options.avgpool_patchtokens)
    with torch.no_grad():
        dim = features(torch.zeros(1, 3, options.image_size, options.image_size, device=ctx.device)).shape[-1]
    settings = {"weights": weights.spec, "weights_hash": weights.fingerprint(), "train_path": options.train_path, "val_path": options.val_path,
                "image_size": options.image_size, "mean": list(options.mean), "std": list(options.std),
                "feature": features.describe()}
    out = train_linear_classifier(
        features, dim, num_classes, train,
        lambda: val.eval_loader(per_device, acc.process_index, acc.num_processes),
        options.recipe, ctx.out_dir, options.epochs, batch_size, options.lr, options.val_every, options.seed,
        options.resume, settings, cpu=ctx.cpu)
    protocol = {
        "description": f"linear probe ({options.recipe} recipe): {recipe.reference}",
        "recipe": options.recipe, "optimizer": recipe.optimizer, "epochs": out["epochs"],
        "batch_size": out["batch_size"], "lr": out["lr"], "momentum": recipe.momentum,
        "weight_decay": recipe.weight_decay, "schedule": "cosine per epoch to 0",
        "feature": features.describe(), "feature_dim": int(dim), "n_last_blocks": options.n_last_blocks,
        "avgpool_patchtokens": options.avgpool_patchtokens, "image_size": options.image_size,
        "mean": list(options.mean), "std": list(options.std), "settings_from": origin,
        "num_classes": num_classes, "n_train": len(train), "n_val": len(val), "reported": "best top-1 over epochs",
        "train_path": options.train_path, "val_path": options.val_path, "processes": acc.num_processes,
    }
    return {"metrics": out["metrics"], "protocol": protocol, "history": out["history"], "head": out["head"],
            "classes": classes}


__all__ = ["LinearFeatures", "LinearOptions", "linear_protocol", "linear_transforms"]
