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
    return torch.load(str(path), map_location="cpu", weights_only=True)


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
    state, dropped = _FORMATS[fmt](read_tensors(path), model)
    load_converted(model, state, f"teacher weights {path} ({fmt} format)")
    model.eval().requires_grad_(False)
    return model, TeacherReport(str(path), fmt, model_name, used=len(state), dropped=sorted(dropped))
