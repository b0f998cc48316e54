"""The registry of evaluation protocols, shared by ``run_eval.py <protocol>`` and ``run_eval.py summary``.

A protocol is one function registered with :func:`register_protocol`::

    @dataclass
    class MyOptions:
        val_path: str = field(default="", metadata={"help": "labelled images", "flags": ["--data.val_path"]})

    @register_protocol("mine", MyOptions, help="what it measures")
    def my_protocol(weights: Weights, options: MyOptions, ctx: EvalContext) -> dict:
        backbone = weights.backbone()          # loaded once, shared by every protocol of a summary
        ...
        return {"metrics": {"top1": 71.2}, "protocol": {"description": "...", "image_size": 224}}

It must return ``metrics`` (a flat mapping of numbers) and ``protocol`` (what produced them: a
one-line ``description`` plus every setting that changes the numbers); anything else it returns
(``details``, file paths) is kept in the result JSON. The options dataclass doubles as the
sub-command's arguments (``--field-name``, or the ``flags`` in a field's metadata) and as the
protocol's section of a summary YAML. Every module of ``selfdistill.eval`` is imported before the
registry is read, so a new protocol needs no edits elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import pkgutil
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "EvalContext", "Protocol", "Weights", "add_options_arguments", "get_protocol", "options_from_args",
    "options_from_dict", "protocol_names", "register_protocol", "run_protocol",
]

ProtocolFn = Callable[["Weights", Any, "EvalContext"], dict]


@dataclass(frozen=True)
class Protocol:
    name: str
    fn: ProtocolFn
    options: type
    help: str


_PROTOCOLS: dict[str, Protocol] = {}
_SCANNED = False


def register_protocol(name: str, options: type, help: str = "") -> Callable[[ProtocolFn], ProtocolFn]:
    """Register ``fn(weights, options, ctx) -> {"metrics", "protocol", ...}`` under ``name``."""
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"protocol {name!r}: options must be a dataclass, got {options!r}")

    def wrap(fn: ProtocolFn) -> ProtocolFn:
        old = _PROTOCOLS.get(name)
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"evaluation protocol {name!r} is registered twice ({old.fn.__module__}, {fn.__module__})")
        _PROTOCOLS[name] = Protocol(name, fn, options, help or (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return wrap


def _scan() -> None:
    """Import every module of ``selfdistill.eval`` once, so each registers its protocols."""
    global _SCANNED
    if _SCANNED:
        return
    import selfdistill.eval as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")
    _SCANNED = True


def protocol_names() -> list[str]:
    _scan()
    return sorted(_PROTOCOLS)


def get_protocol(name: str) -> Protocol:
    _scan()
    if name not in _PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name!r} (available: {', '.join(sorted(_PROTOCOLS))})")
    return _PROTOCOLS[name]


# --------------------------------------------------------------------------------------------
# What a protocol gets: the weights (loaded lazily, once) and the run context
# --------------------------------------------------------------------------------------------


@dataclass
class Weights:
    """The weights to evaluate, as the user named them; the backbone is built on first use and
    shared by every protocol of a summary (protocols must not modify it: copy it to fine-tune)."""

    spec: str  # an exported .safetensors, a timm weights file, a checkpoint/run directory, or 'random'
    model: Any = None  # ModelConfig, needed for 'random' and for files without selfdistill metadata
    format: str = "timm"  # key converter for a bare weights file (selfdistill.models.teachers formats)
    _loaded: Any = field(default=None, repr=False)

    def backbone(self):
        """The frozen backbone (eval mode, no gradients), on the CPU until a protocol moves it."""
        if self._loaded is None:
            from selfdistill.export import load_backbone

            backbone, self.model = load_backbone(self.spec, self.model, fmt=self.format)
            self._loaded = backbone.eval().requires_grad_(False)
        return self._loaded

    def fingerprint(self) -> str:
        """A hash of the backbone's tensors: a checkpoint of a protocol run on other weights that
        happen to sit at the same path is not mistaken for this one."""
        import hashlib

        import torch

        h = hashlib.blake2b(digest_size=12)
        for key, value in sorted(self.backbone().state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"weights": self.spec}
        if self.model is not None:
            info["model"] = {"name": self.model.name, "img_size": self.model.img_size,
                             "patch_size": self.model.patch_size, "kwargs": dict(self.model.kwargs)}
        return info


@dataclass
class EvalContext:
    """Where a protocol runs: the Accelerator (one process or several), and a directory for the
    files it writes besides its metrics (a trained head, checkpoints)."""

    accelerator: Any
    out_dir: Path

    @property
    def device(self):
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def run_protocol(name: str, weights: Weights, options: Any, ctx: EvalContext) -> dict[str, Any]:
    """Run one protocol and return its result with the protocol's name and the weights recorded."""
    proto = get_protocol(name)
    if not isinstance(options, proto.options):
        raise TypeError(f"protocol {name!r} takes {proto.options.__name__}, got {type(options).__name__}")
    validate = getattr(options, "validate", None)
    if validate is not None:
        validate(name)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    result = dict(proto.fn(weights, options, ctx))
    if not isinstance(result.get("metrics"), dict) or not isinstance(result.get("protocol"), dict):
        raise TypeError(f"protocol {name!r} must return a dict with 'metrics' and 'protocol' mappings")
    result["protocol"] = {"name": name, **result["protocol"]}
    result["metrics"] = {k: _plain_number(name, k, v) for k, v in result["metrics"].items()}
    return {"protocol": result.pop("protocol"), "metrics": result.pop("metrics"), **weights.describe(), **result}


def _plain_number(protocol: str, key: str, value: Any) -> int | float:
    """Metrics are JSON numbers: Python ints stay ints, every other real number becomes a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"protocol {protocol!r}: metric {key!r} must be a number, got {value!r}")
    return value if type(value) is int else float(value)


# --------------------------------------------------------------------------------------------
# Options dataclass <-> command line / YAML
# --------------------------------------------------------------------------------------------


def _flags(f: dataclasses.Field) -> list[str]:
    return list(f.metadata.get("flags") or [f"--{f.name.replace('_', '-')}"])


def add_options_arguments(parser: argparse.ArgumentParser, options_cls: type) -> None:
    """One option per dataclass field; a field without a default is required."""
    hints = typing.get_type_hints(options_cls)
    for f in dataclasses.fields(options_cls):
        if f.name.startswith("_"):
            continue
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        base = inner[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp
        kw: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help", "")}
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required:
            kw["required"] = True
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kw["default"] = default
            if kw["help"] and default not in ("", None, []):
                kw["help"] += f" (default: {default})"
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is list:
            kw["nargs"] = "+"
            kw["type"] = typing.get_args(base)[0]
        else:
            kw["type"] = base
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        parser.add_argument(*_flags(f), **kw)


def options_from_args(options_cls: type, args: argparse.Namespace) -> Any:
    names = [f.name for f in dataclasses.fields(options_cls) if not f.name.startswith("_")]
    return options_cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})


def options_from_dict(options_cls: type, data: dict[str, Any] | None, prefix: str) -> Any:
    """Typed options from a YAML section: unknown keys and wrong types are one-line errors."""
    from selfdistill.config import build_dataclass

    return build_dataclass(options_cls, data or {}, prefix)


# --------------------------------------------------------------------------------------------
# Results on disk
# --------------------------------------------------------------------------------------------


