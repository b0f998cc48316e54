"""timm backbones seen as self-supervised encoders: a pooled embedding plus patch tokens, built
from a :class:`ModelConfig` or from exported weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from timm.models import split_model_name_tag

from selfdistill.configkit import check_kwargs_have_values, fail, positive
from selfdistill.models.networks import check_timm_name, create_timm_model, feature_tokens, is_convnet, pooled_width
from selfdistill.models.hub import HUB_PREFIX, hub_weights_file, is_hub_name
from selfdistill.models.weights import (LoadReport, load_file_into, read_meta, resolve_weights, save_weights,
                                        weight_formats)

__all__ = ["Backbone", "BackboneOutput", "ModelConfig", "export_backbone", "load_backbone", "load_pretrained"]

log = logging.getLogger("selfdistill")


@dataclass
class ModelConfig:
    """The student backbone, built by timm name. The teacher is a copy of it."""

    name: str = "vit_small_patch16_224"
    img_size: int | None = 224  # None keeps timm's default; ViTs interpolate for other crop sizes
    patch_size: int | None = None  # override timm's patch size (tiny demo models)
    drop_path_rate: float = 0.1  # student only; the teacher always uses 0
    grad_checkpointing: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)  # any other timm.create_model keyword
    # Start weights: a local weights file, a timm pretrained tag (vit_small_patch16_224.dino) or an
    # hf-hub:org/repo name read from the local Hugging Face cache, or a DINO / DINOv2 training
    # checkpoint (DINO-family methods restore student, teacher, heads and centre from it).
    pretrained: str = ""
    pretrained_format: str = "auto"  # how a local file lays out its tensors: models.weights.weight_formats()
    channels_last: bool = True  # CNN backbones (ResNet...): NHWC weights and inputs, faster convolutions

    def validate(self, prefix: str) -> None:
        if not self.name:
            fail(f"{prefix}.name", "a timm model name is required")
        check_timm_name(f"{prefix}.name", self.name, f"{prefix}.pretrained", accepts_tag=True)
        if self.pretrained_format not in weight_formats():
            fail(f"{prefix}.pretrained_format", f"unknown format {self.pretrained_format!r} "
                                                f"(available: {', '.join(weight_formats())})")
        if self.pretrained and not self.pretrained.startswith(HUB_PREFIX) and is_hub_name(self.pretrained):
            arch = split_model_name_tag(self.pretrained)[0]
            if arch != split_model_name_tag(self.name)[0]:
                fail(f"{prefix}.pretrained", f"{self.pretrained!r} holds weights of timm's {arch!r}, not of "
                                             f"{prefix}.name={self.name}; give {prefix}.name={arch}")
        if self.img_size is not None:
            positive(self, prefix, "img_size")
        if not 0.0 <= self.drop_path_rate < 1.0:
            fail(f"{prefix}.drop_path_rate", f"must be in [0, 1), got {self.drop_path_rate}")
        check_kwargs_have_values(f"{prefix}.kwargs", self.kwargs)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ModelConfig:
        """The config an export's metadata records (for evaluation: no drop path, no start weights)."""
        return cls(name=meta["timm_name"], img_size=meta.get("img_size"), patch_size=meta.get("patch_size"),
                   drop_path_rate=0.0, kwargs=dict(meta.get("kwargs") or {}))


class BackboneOutput(NamedTuple):
    pooled: torch.Tensor  # [B, D]: CLS token for ViTs, average pool for Swin / ResNet
    tokens: torch.Tensor  # [B, T, D]: patch tokens (no prefix tokens), row-major over the grid
    grid: tuple[int, int]  # (rows, cols) of the token grid


def _packed_state(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and not value.is_contiguous():
            state[key] = value.contiguous()  # safetensors stores packed tensors only


class Backbone(nn.Module):
    """A timm model returning ``BackboneOutput`` for any input resolution it supports."""

    def __init__(self, name: str, img_size: int | None = None, patch_size: int | None = None,
                 drop_path_rate: float = 0.0, grad_checkpointing: bool = False, pretrained: str = "",
                 channels_last: bool = False, pretrained_format: str = "auto", **kwargs: Any) -> None:
        super().__init__()
        self.model = create_timm_model(name, img_size, patch_size, drop_path_rate, **kwargs)
        if pretrained:
            log.info("start weights: %s", load_pretrained(self.model, name, pretrained, pretrained_format))
        self.name = name
        # What rebuilds this network (the metadata of its exports); drop path is training-only.
        self.meta: dict[str, Any] = {"timm_name": name, "img_size": img_size, "patch_size": patch_size,
                                     "kwargs": dict(kwargs)}
        self.embed_dim: int = pooled_width(self.model)
        self.num_prefix_tokens: int = getattr(self.model, "num_prefix_tokens", 0)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        # Convolutional networks (more than a patch-embedding convolution) run faster with NHWC
        # weights and inputs (oneDNN on CPU, cuDNN on GPU); parameter values and names are unchanged.
        # (The caller turns it off under DeepSpeed: ZeRO flattens parameters and refuses strided ones.)
        self.channels_last = channels_last and is_convnet(self.model)
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


def load_pretrained(model: nn.Module, name: str, spec: str, fmt: str = "auto") -> LoadReport:
    """``model.pretrained`` loaded strictly into the timm ``model`` built from ``name``: a timm
    pretrained tag or ``hf-hub:`` name from the local Hugging Face cache (format ``auto`` reads it
    as ``timm.create_model(pretrained=True)`` does), or a local file in ``fmt``."""
    if not is_hub_name(spec):
        return load_file_into(model, spec, fmt, what="model.pretrained")
    path, arch = hub_weights_file(spec)
    if arch and arch != split_model_name_tag(name)[0]:
        raise ValueError(f"model.pretrained: {spec} holds weights of timm's {arch!r}, not of model.name={name}; "
                         f"give model.name={arch}")
    return load_file_into(model, path, "timm_hub" if fmt == "auto" else fmt, what=f"model.pretrained ({spec})")


def export_backbone(backbone: Backbone, path: str | Path) -> Path:
    """The backbone's timm state dict as safetensors with the metadata that rebuilds it. timm loads
    it with ``timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=path))``
    (or any other class count for a fresh classifier: the file holds none)."""
    return save_weights(backbone.model.state_dict(), path, backbone.meta)


def load_backbone(weights: str, model_cfg: ModelConfig | None = None, fmt: str = "timm", part: str = "eval"
                  ) -> tuple[Backbone, ModelConfig]:
    """A frozen backbone (eval mode) from ``weights``: an exported ``.safetensors`` (its metadata
    names the network), a bare weights file (timm keys, or another ``fmt``; needs ``model_cfg``), a
    checkpoint or run directory of this project (its exported ``part``: ``eval``, DINO's teacher,
    or ``student``), or ``random`` (needs ``model_cfg``): the random-initialisation baseline."""
    if weights == "random":
        if model_cfg is None:
            raise ValueError("--weights random needs the model (e.g. --model.name vit_small_patch16_224)")
        return _evaluation_backbone(model_cfg), model_cfg
    path = resolve_weights(weights, part)
    if model_cfg is None:
        meta = read_meta(path)
        if not meta:
            raise ValueError(f"--weights {weights}: a bare weights file; name its timm model with --model.name "
                             "(and --model.img_size / --model.patch_size where they differ from timm's)")
        model_cfg = ModelConfig.from_meta(meta)
    backbone = _evaluation_backbone(model_cfg)
    load_file_into(backbone.model, path, fmt, what=f"--weights ({model_cfg.name})")
    return backbone, model_cfg


def _evaluation_backbone(m: ModelConfig) -> Backbone:
    return Backbone(m.name, m.img_size, m.patch_size, 0.0, False, **m.kwargs).eval()
