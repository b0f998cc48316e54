"""Frozen external teachers from local files (SMD, FD): a timm model plus a key converter per
checkpoint format, so a SimSiam, CLIP, DINO, DeiT or EsViT file becomes the same timm network.

Every format converts the file's tensors to the timm model's own keys; ``load_teacher`` then
loads them strictly and says which keys it used and which it left out (a projector, a classifier,
the other network of a self-distillation checkpoint). A file that does not fit is refused with the
missing keys named. Nothing is downloaded: ``path`` is always a local file or run directory.

A format is one function registered with ``@register_teacher_format(name)``: it takes the loaded
tensors and the timm model and returns ``(state_dict_in_timm_keys, dropped_keys)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

Converter = Callable[[dict[str, torch.Tensor], nn.Module], tuple[dict[str, torch.Tensor], list[str]]]
_FORMATS: dict[str, Converter] = {}


def register_teacher_format(name: str) -> Callable[[Converter], Converter]:
    def wrap(fn: Converter) -> Converter:
        if name in _FORMATS:
            raise ValueError(f"teacher format {name!r} is registered twice")
        _FORMATS[name] = fn
        return fn

    return wrap


def teacher_formats() -> list[str]:
    return sorted(_FORMATS)


@dataclass
class TeacherReport:
    """What ``load_teacher`` did with the file, printed at start-up and kept in the run's log."""

    path: str
    format: str
    model: str
    used: int = 0  # tensors loaded into the teacher
    dropped: list[str] = field(default_factory=list)  # tensors in the file the teacher does not use

    def __str__(self) -> str:
        left = f"; left out {len(self.dropped)} ({', '.join(self.dropped[:5])}{', ...' if len(self.dropped) > 5 else ''})" \
            if self.dropped else ""
        return f"teacher {self.model} from {self.path} ({self.format} format): {self.used} tensors{left}"


def read_tensors(path: str | Path) -> dict[str, Any]:
    """A local safetensors or torch file, the latter read with ``weights_only=True`` (never pickle code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights: no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import argparse

    try:  # DINO / EsViT checkpoints carry their argparse ``args``: plain values, safe to rebuild
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except RuntimeError as e:
        if "TorchScript" not in str(e):
            raise
        raise ValueError(f"teacher weights: {path} is a TorchScript archive (e.g. OpenAI's CLIP release), which "
                         f"cannot be read without running its code; save its state dict once and pass that file: "
                         f"torch.save(torch.jit.load(path, map_location='cpu').state_dict(), 'clip.pt')") from None


def unwrap(obj: dict[str, Any], *candidates: str) -> dict[str, Any]:
    """The first nested dict named in ``candidates`` (``state_dict``, ``model``, ``teacher``...), else ``obj``."""
    for key in candidates:
        if isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def strip_prefix(state: dict[str, Any], prefix: str) -> tuple[dict[str, Any], list[str]]:
    """Keys under ``prefix`` without it, and the keys that were not under it."""
    kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return kept, [k for k in state if not k.startswith(prefix)]


def load_converted(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Strict load with a message naming what is missing, unexpected or of the wrong shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {', '.join(unexpected[:6])}"
                         f"{' ...' if len(unexpected) > 6 else ''}")
        if wrong:
            parts.append(f"wrong shapes: {'; '.join(wrong[:4])}")
        raise ValueError(f"{what} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state)


@register_teacher_format("timm")
def _timm(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A timm state dict (optionally under ``state_dict``/``model``); its classifier is left out."""
    state = unwrap(obj, "state_dict", "model")
    own = model.state_dict()
    dropped = [k for k in state if k not in own and k.split(".")[0] in ("head", "fc", "classifier")]
    return {k: v for k, v in state.items() if k not in dropped}, dropped


@register_teacher_format("selfdistill")
def _selfdistill(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An export of this project (``run_eval.py export``): timm keys already."""
    return _timm(obj, model)



# -- Feature Distillation teachers: CLIP, DINO, DeiT, EsViT ------------------------------------------


def _drop_classifier(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    own = model.state_dict()
    dropped = [k for k in state if k not in own and k.split(".")[0] in ("head", "fc", "classifier")]
    return {k: v for k, v in state.items() if k not in dropped}, dropped


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


@register_teacher_format("openai_clip")
def _openai_clip(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """OpenAI CLIP (``clip.load(name, jit=False)[0].state_dict()``, or the JIT release's state dict):
    the ViT visual tower for timm ``vit_base_patch16_clip_quickgelu_224`` (OpenAI trained with QuickGELU)."""
    return _clip_visual(unwrap(obj, "state_dict"), model, "visual.")


@register_teacher_format("open_clip")
def _open_clip(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """OpenCLIP: a released ``open_clip_pytorch_model.bin`` or a training ``epoch_N.pt`` (``state_dict``
    with ``module.`` keys). Native towers use OpenAI's key layout (timm ``vit_base_patch16_clip_224``,
    GELU); a timm-trunk tower (``visual.trunk.``) holds timm keys already."""
    state = unwrap(obj, "state_dict")
    dropped_outer = [k for k in obj if k != "state_dict"] if state is not obj else []
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith("visual.trunk.") for k in state):
        kept, rest = strip_prefix(state, "visual.trunk.")
        kept, head = _drop_classifier(kept, model)
        return kept, rest + [f"visual.trunk.{k}" for k in head] + dropped_outer
    converted, dropped = _clip_visual(state, model, "visual.")
    return converted, dropped + dropped_outer


@register_teacher_format("dino")
def _dino(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """DINO ViT: the released backbone file (``dino_vitbase16_pretrain.pth``: timm keys already), or
    a training ``checkpoint.pth`` whose ``teacher`` (the EMA network DINO evaluates) is used."""
    if isinstance(obj.get("teacher"), dict):
        state, dropped = _network_backbone(obj, "teacher")
    else:
        state, dropped = unwrap(obj, "state_dict", "model"), []
    state, head = _drop_classifier(state, model)
    return state, dropped + head


@register_teacher_format("deit")
def _deit(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """DeiT ViT (``deit_base_patch16_224-b5f2ef4d.pth``: timm keys under ``model``); the classifier
    is left out. A distilled DeiT (``dist_token``, ``head_dist``) needs timm's ``*_distilled_*`` model."""
    if not isinstance(obj.get("model"), dict):
        raise ValueError(f"not a DeiT checkpoint: no 'model' dict (top-level keys: {', '.join(list(obj)[:4])})")
    state, head = _drop_classifier(obj["model"], model)
    return state, head + [k for k in obj if k != "model"]


@register_teacher_format("esvit")
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
    state, head = _drop_classifier(checkpoint_filter_fn(state, model), model)
    return state, dropped + buffers + head


# The encoder prefixes of SimSiam (``encoder``), MoCo v1/v2 (``encoder_q``) and MoCo v3
# (``base_encoder``), with DDP's ``module.`` (official files) or without (single-process saves).
_SIAMESE_ENCODERS = ("module.encoder.", "module.encoder_q.", "module.base_encoder.", "encoder.", "encoder_q.",
                     "base_encoder.")


@register_teacher_format("moco")
@register_teacher_format("simsiam")
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
    own = model.state_dict()
    heads = [k for k in encoder if k not in own and k.split(".")[0] in ("fc", "head", "classifier")]
    dropped += [prefix + k for k in heads]
    return {k: v for k, v in encoder.items() if k not in heads}, dropped


def load_teacher(model_name: str, path: str | Path, fmt: str = "timm", **timm_kwargs: Any
                 ) -> tuple[nn.Module, TeacherReport]:
    """A frozen timm ``model_name`` (no classifier, eval, no gradients) holding the weights in ``path``.

    ``path`` may also be a run directory or checkpoint of this project with ``fmt="selfdistill"``:
    its evaluated backbone is exported on the fly (``export_from_checkpoint``) and loaded.
    """
    from selfdistill.models.backbone import create_timm_model

    if fmt not in _FORMATS:
        raise ValueError(f"teacher format {fmt!r} is unknown (available: {', '.join(teacher_formats())})")
    path = Path(path)
    if fmt == "selfdistill" and path.is_dir():
        import tempfile

        from selfdistill.export import export_from_checkpoint

        tmp = Path(tempfile.mkdtemp(prefix="teacher_")) / "teacher.safetensors"
        path = export_from_checkpoint(path, tmp, part="eval")
    model = create_timm_model(model_name, **timm_kwargs)
    used, dropped = load_weights_in_format(model, path, fmt, what="teacher weights")
    model.eval().requires_grad_(False)
    return model, TeacherReport(str(path), fmt, model_name, used=used, dropped=dropped)


def load_weights_in_format(model: nn.Module, path: str | Path, fmt: str, what: str = "weights") -> tuple[int, list[str]]:
    """Convert the file's tensors from ``fmt`` to ``model``'s timm keys and load them strictly;
    returns how many tensors were loaded and the sorted keys of the file that were left out."""
    if fmt not in _FORMATS:
        raise ValueError(f"weights format {fmt!r} is unknown (available: {', '.join(teacher_formats())})")
    state, dropped = _FORMATS[fmt](read_tensors(path), model)
    load_converted(model, state, f"{what} {path} ({fmt} format)")
    return len(state), sorted(dropped)
