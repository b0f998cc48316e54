"""timm backbones seen as self-supervised encoders: a pooled embedding plus patch tokens."""

from __future__ import annotations

from typing import Any, NamedTuple

import timm
import torch
from torch import nn

# Keywords that only some timm families accept; dropped (in this order) when a family rejects them.
_OPTIONAL_KWARGS = ("dynamic_img_size", "strict_img_size", "img_size", "patch_size")


class BackboneOutput(NamedTuple):
    pooled: torch.Tensor  # [B, D]: CLS token for ViTs, average pool for Swin / ResNet
    tokens: torch.Tensor  # [B, T, D]: patch tokens (no prefix tokens), row-major over the grid
    grid: tuple[int, int]  # (rows, cols) of the token grid


def create_timm_model(
    name: str,
    img_size: int | None = None,
    patch_size: int | None = None,
    drop_path_rate: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` without a classifier, accepting any crop size where the family can.

    ViTs get ``dynamic_img_size`` (position embeddings are interpolated for 96 px local crops);
    Swin gets ``strict_img_size=False``; ResNets need neither.
    """
    kw: dict[str, Any] = dict(num_classes=0, drop_path_rate=drop_path_rate, dynamic_img_size=True,
                              strict_img_size=False)
    if img_size is not None:
        kw["img_size"] = img_size
    if patch_size is not None:
        kw["patch_size"] = patch_size
    kw.update(kwargs)
    requested = {k for k in ("img_size", "patch_size") if k in kw}
    while True:
        try:
            return timm.create_model(name, pretrained=False, **kw)
        except TypeError as e:
            bad = next((k for k in _OPTIONAL_KWARGS if k in kw and f"'{k}'" in str(e)), None)
            if bad is None:
                raise
            if bad in requested:
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


def load_timm_weights(model: nn.Module, path: str, what: str = "model.pretrained") -> None:
    """Load a local timm-format state dict (safetensors, or a torch file read with
    ``weights_only=True``) strictly: every backbone tensor must be in the file. A classifier in the
    file is ignored (our backbones have none); anything else that does not fit is refused."""
    from pathlib import Path

    from timm.models import load_state_dict

    if not Path(path).is_file():
        raise FileNotFoundError(f"{what}: no such file: {path}")
    state = load_state_dict(path, weights_only=True)
    own = model.state_dict()
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    for key in [k for k in state if k not in own and k.split(".")[0] in (classifier, classifier.split(".")[0])]:
        del state[key]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{what}: {path} does not fit {type(model).__name__}: missing {missing[:4]} "
                         f"({len(missing)}), unexpected {unexpected[:4]} ({len(unexpected)}), shapes {wrong[:3]}")
    model.load_state_dict(state)


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


def _packed_state(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and not value.is_contiguous():
            state[key] = value.contiguous()  # safetensors stores packed tensors only


class Backbone(nn.Module):
    """A timm model returning ``BackboneOutput`` for any input resolution it supports."""

    def __init__(self, name: str, img_size: int | None = None, patch_size: int | None = None,
                 drop_path_rate: float = 0.0, grad_checkpointing: bool = False, pretrained: str = "",
                 channels_last: bool = False, **kwargs: Any) -> None:
        super().__init__()
        self.model = create_timm_model(name, img_size, patch_size, drop_path_rate, **kwargs)
        if pretrained:
            load_timm_weights(self.model, str(pretrained))
        self.name = name
        self.embed_dim: int = pooled_width(self.model)
        self.num_prefix_tokens: int = getattr(self.model, "num_prefix_tokens", 0)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        # Convolutional networks (more than a patch-embedding convolution) run faster with NHWC
        # weights and inputs (oneDNN on CPU, cuDNN on GPU); parameter values and names are unchanged.
        # Not under DeepSpeed: ZeRO flattens parameters into packed buffers and refuses strided ones.
        from selfdistill.engine.distributed import uses_deepspeed

        self.channels_last = channels_last and is_convnet(self.model) and not uses_deepspeed()
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.register_state_dict_post_hook(_packed_state)  # checkpoints and exports stay NCHW

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.model.forward_features(x)
        pooled = self.model.forward_head(feats, pre_logits=True)
        tokens, grid, n_prefix = feature_tokens(self.model, feats)
        return BackboneOutput(pooled, tokens[:, n_prefix:], grid)

    def all_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], int]:
        """Every output token after the final norm, prefix (CLS) tokens included: ``[B, P + T, D]``,
        the grid and ``P`` (Feature Distillation regresses the CLS token too)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return feature_tokens(self.model, self.model.forward_features(x))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding used by kNN / linear evaluation."""
        return self.forward(x).pooled
