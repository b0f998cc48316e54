"""timm networks as this project builds and reads them: classifier-less creation at any crop size,
their pooled width and their output tokens, for every family (ViT, Swin, ResNet...)."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

__all__ = ["check_timm_name", "create_timm_model", "feature_tokens", "is_convnet", "pooled_width"]

# Keywords that only some timm families accept; dropped (in this order) when a family rejects them.
_OPTIONAL_KWARGS = ("dynamic_img_size", "strict_img_size", "img_size", "patch_size")


def check_timm_name(key: str, name: str, weights_key: str, accepts_tag: bool = False) -> None:
    """A one-line config error unless ``name`` is a timm architecture: an unknown name gets the
    closest ones timm knows; a pretrained tag (``vit_small_patch16_224.dino``) is refused, because
    the name builds random weights and the weights come from ``weights_key`` (a local file, or the
    tag itself where ``accepts_tag``: read from the local Hugging Face cache)."""
    from timm.models import split_model_name_tag

    from selfdistill.configkit import closest_names, fail

    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        fail(key, f"unknown timm model {name!r}" + closest_names(arch, timm.list_models(), "timm.list_models()"))
    if tag:
        where = (f"{weights_key}={name} (read from the local Hugging Face cache) or a local file in {weights_key}"
                 if accepts_tag else f"the weights as a local file in {weights_key}")
        fail(key, f"{name!r} is timm's architecture {arch!r} with its pretrained tag {tag!r}; the name builds "
                  f"random weights, so give {key}={arch} and {where}")


def create_timm_model(name: str, img_size: int | None = None, patch_size: int | None = None,
                      drop_path_rate: float = 0.0, *, any_size: bool = True, img_size_optional: bool = False,
                      used: dict[str, Any] | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` without a classifier (``num_classes`` in ``kwargs`` adds one), random weights.

    ``any_size``: ViTs get ``dynamic_img_size`` (position embeddings interpolated for 96 px local
    crops), Swin ``strict_img_size=False``; families without these keywords (ResNet) drop them.
    ``img_size_optional``: ``img_size`` is dropped too for a family without one (a fine-tuning input
    size a CNN ignores); otherwise asking a family for a size it cannot take is an error.
    ``used``, when given, receives the keywords the model was created with.
    """
    kw: dict[str, Any] = dict(num_classes=0, drop_path_rate=drop_path_rate)
    if any_size:
        kw.update(dynamic_img_size=True, strict_img_size=False)
    if img_size is not None:
        kw["img_size"] = img_size
    if patch_size is not None:
        kw["patch_size"] = patch_size
    kw.update(kwargs)
    required = {k for k in ("img_size", "patch_size") if k in kw} - ({"img_size"} if img_size_optional else set())
    while True:
        try:
            model = timm.create_model(name, pretrained=False, **kw)
            if used is not None:
                used.update(kw)
            return model
        except TypeError as e:
            bad = next((k for k in _OPTIONAL_KWARGS if k in kw and f"'{k}'" in str(e)), None)
            if bad is None:
                raise ValueError(f"model: timm model {name!r} refuses these arguments: {e}") from None
            if bad in required:
                raise ValueError(f"model.{bad} is not supported by timm model {name!r}") from None
            del kw[bad]
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ValueError(f"model.name: unknown timm model {name!r}") from None
            raise


def pooled_width(model: nn.Module) -> int:
    """Width of a classifier-less timm model's output (``forward_head(pre_logits=True)``): the
    hidden head width where the family has one (MobileNetV3: 1280 after ``conv_head``, while
    ``num_features`` is 960), else ``num_features``."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def feature_tokens(model: nn.Module, feats: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], int]:
    """A timm ``forward_features`` output as tokens ``[B, P + T, D]`` (the ``P`` prefix tokens
    first, then the grid row-major), the ``(rows, cols)`` grid and ``P``, for any family."""
    if feats.ndim == 3:  # ViT-like: [B, prefix + T, D]
        n_prefix = int(getattr(model, "num_prefix_tokens", 0))
        n = feats.shape[1] - n_prefix
        side = int(round(n ** 0.5))
        return feats, (side, n // max(side, 1)), n_prefix
    if feats.ndim == 4 and getattr(model, "output_fmt", "NCHW") == "NHWC":  # Swin
        return feats.flatten(1, 2), (feats.shape[1], feats.shape[2]), 0
    if feats.ndim == 4:  # NCHW (ResNet)
        return feats.flatten(2).transpose(1, 2), (feats.shape[2], feats.shape[3]), 0
    raise RuntimeError(f"unexpected feature shape {tuple(feats.shape)} from {type(model).__name__}")


def is_convnet(model: nn.Module) -> bool:
    """More than one 2-D convolution: a CNN, not a transformer with a convolutional patch embedding."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1
