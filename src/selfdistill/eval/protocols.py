"""The registry of evaluation protocols: every ``run_eval.py`` sub-command and every step of
``run_eval.py summary`` is one registered function.

    @dataclass
    class MyOptions:
        val_path: str = field(default="", metadata={"help": "labelled images", "flags": ["--data.val_path"]})

    @register_protocol("mine", MyOptions, help="what it measures")
    def my_protocol(weights: Weights, options: MyOptions, ctx: EvalContext) -> dict:
        backbone = weights.backbone()          # loaded once, shared by every protocol of a summary
        ...
        return {"metrics": {"top1": 71.2}, "protocol": {"description": "...", "image_size": 224}}

A measuring protocol returns ``metrics`` (a flat mapping of numbers) and ``protocol`` (what produced
them: a one-line ``description`` plus every setting that changes the numbers); anything else it
returns (``details``, file paths) is kept in the result JSON. The options dataclass is at once the
sub-command's arguments (``--field-name``, or the ``flags`` in a field's metadata), the protocol's
section of a summary YAML and its Python API. Every sub-command also takes the same weights and
output options (:func:`add_weights_arguments`); what ``--out`` names is the protocol's ``output``:

``results``    the result JSON (default ``<name>_results.json`` beside the weights); the protocol's
               own files go to ``--output-dir`` (default: ``<name>/`` beside ``--out``)
``summary``    ``summary.json`` (``summary.md`` and each protocol's files beside it)
``directory``  the directory it fills (pictures)
``file``       the file it writes (export)
``run``        the run directory of a training task (fine-tuning)

Every module of ``selfdistill.eval`` and of the training wing ``selfdistill.training`` (the
protocols that train: ``finetune``, ``linear``) is imported before the registry is read, so a new
protocol needs no edits elsewhere. Protocols run split over the processes of ``accelerate launch``: each
embeds its share of the images once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import pkgutil
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from selfdistill.configkit import build_dataclass
from selfdistill.registry import Registry
from selfdistill.rundir import CONFIG, EXPORT_DIR

__all__ = [
    "EvalContext", "OUTPUTS", "Protocol", "Weights", "add_options_arguments", "add_weights_arguments",
    "expand_overrides", "get_protocol", "model_config", "override_keys", "model_config_from", "options_from_args", "options_from_dict", "protocol_names",
    "register_protocol", "run_protocol", "settings_from_run",
]

ProtocolFn = Callable[["Weights", Any, "EvalContext"], dict]

OUTPUTS = {
    "results": "the result JSON (default: <command>_results.json beside --weights, or ./)",
    "summary": "summary.json (summary.md and each protocol's files beside it; default: eval_summary/ beside "
               "--weights, or ./)",
    "directory": "the output directory (default: the run's pictures/ beside --weights)",
    "file": "the output file",
    "run": "the run directory (default: the recipe's train.output_dir)",
}


@dataclass(frozen=True)
class Protocol:
    name: str
    fn: ProtocolFn
    options: type
    help: str
    output: str = "results"  # what --out names (OUTPUTS)
    in_summary: bool = True  # can be a step of run_eval.py summary
    weights: tuple[str, ...] = ()  # --weights values it takes besides files, run / checkpoint dirs and 'random'


_PROTOCOLS = Registry("evaluation protocol")
_SCANNED = False


def register_protocol(name: str, options: type, help: str = "", *, output: str = "results", in_summary: bool = True,
                      weights: tuple[str, ...] = ()) -> Callable[[ProtocolFn], ProtocolFn]:
    """Register ``fn(weights, options, ctx) -> {"metrics", "protocol", ...}`` under ``name``."""
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"protocol {name!r}: options must be a dataclass, got {options!r}")
    if output not in OUTPUTS:
        raise ValueError(f"protocol {name!r}: output must be one of {sorted(OUTPUTS)}, got {output!r}")

    def wrap(fn: ProtocolFn) -> ProtocolFn:
        text = help or next(iter((fn.__doc__ or "").strip().splitlines()), "")
        _PROTOCOLS.add(name, Protocol(name, fn, options, text, output, in_summary and output == "results", weights),
                       same=lambda p: (p.fn.__module__, p.fn.__qualname__))
        return fn

    return wrap


# the packages whose modules register protocols: evaluation, and the training wing (by name: the
# wing imports this registry, never the reverse)
PROTOCOL_PACKAGES = (__package__, "selfdistill.training")


def _scan() -> None:
    """Import every module of the :data:`PROTOCOL_PACKAGES` once, so each registers its protocols."""
    global _SCANNED
    if _SCANNED:
        return
    for name in PROTOCOL_PACKAGES:
        package = importlib.import_module(name)
        for mod in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{name}.{mod.name}")
    _SCANNED = True


def protocol_names() -> list[str]:
    _scan()
    return _PROTOCOLS.names()


def get_protocol(name: str) -> Protocol:
    _scan()
    return _PROTOCOLS.lookup(name)


# --------------------------------------------------------------------------------------------
# What a protocol gets: the weights (loaded lazily, once) and the run context
# --------------------------------------------------------------------------------------------


@dataclass
class Weights:
    """The weights to evaluate, as the user named them; the backbone is built on first use and
    shared by every protocol of a summary (protocols must not modify it: copy it to fine-tune)."""

    spec: str | None  # an exported .safetensors, a weights file, a checkpoint/run directory, 'random'
    model: Any = None  # ModelConfig, needed for 'random' and for files without selfdistill metadata
    format: str = "timm"  # key layout of a bare weights file (selfdistill.models.weights formats)
    _loaded: Any = field(default=None, repr=False)

    def require(self) -> str:
        if not self.spec:
            raise ValueError("--weights is required: an exported .safetensors, a weights file (with --model.name), "
                             "a checkpoint or run directory, or 'random'")
        return self.spec

    def backbone(self) -> Any:
        """The frozen backbone (eval mode, no gradients), on the CPU until a protocol moves it."""
        if self._loaded is None:
            from selfdistill.models import load_backbone

            backbone, self.model = load_backbone(self.require(), self.model, fmt=self.format)
            self._loaded = backbone.eval().requires_grad_(False)
        return self._loaded

    def fingerprint(self) -> str:
        """A hash of the backbone's tensors: a checkpoint of a protocol run on other weights that
        happen to sit at the same path is not mistaken for this one."""
        h = hashlib.blake2b(digest_size=12)
        for key, value in sorted(self.backbone().state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def directory(self) -> Path:
        """Where outputs go by default: beside the weights (a run directory itself), else ``.``."""
        p = Path(self.spec or ".")
        return (p if p.is_dir() else p.parent) if p.exists() else Path(".")

    def run_config(self) -> tuple[Path | None, dict[str, Any]]:
        """The ``config.yaml`` of the run the weights come from (a run or checkpoint directory, or an
        export inside one: ``<run>/export/x.safetensors``), as ``(path, tree)``; ``(None, {})`` for
        weights from elsewhere. Protocols take the run's image size and normalisation from it."""
        import yaml

        if not self.spec or not Path(self.spec).exists():
            return None, {}
        p = Path(self.spec)
        candidates = [p / CONFIG] if p.is_dir() else [p.parent.parent / CONFIG] if p.parent.name == EXPORT_DIR else []
        for path in candidates:
            if path.is_file():
                tree = yaml.safe_load(path.read_text()) or {}
                return path, tree if isinstance(tree, dict) else {}
        return None, {}

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"weights": self.spec}
        if self.model is not None:
            info["model"] = {"name": self.model.name, "img_size": self.model.img_size,
                             "patch_size": self.model.patch_size, "kwargs": dict(self.model.kwargs)}
        return info


def settings_from_run(options: Any, weights: Weights,
                      table: dict[str, tuple[tuple[str, ...], Any]]) -> tuple[Any, dict[str, str]]:
    """``options`` with each unset one (None or "") of ``table`` (option -> (the run's config keys,
    the default without a run)) taken from the config of the run that made the weights, the first
    key the run sets winning, else the default; and where each came from, for the result JSON."""
    config_path, run = weights.run_config()
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name, (keys, default) in table.items():
        given = getattr(options, name)
        if given not in (None, ""):
            values[name], origin[name] = given, "given"
            continue
        found = [k for k in keys if isinstance(run.get(k.split(".")[0]), dict) and
                 run[k.split(".")[0]].get(k.split(".")[1]) not in (None, "")]
        if found:
            section, key = found[0].split(".")
            values[name], origin[name] = run[section][key], f"{config_path}: {found[0]}"
        else:
            values[name], origin[name] = default, "default"
        if isinstance(default, tuple):
            values[name] = tuple(values[name])
    return dataclasses.replace(options, **values), origin


class EvalContext:
    """Where a protocol runs: the Accelerator (one process or several; made on first use when
    given as a factory, so a training task can make its own), the directory for the files it
    writes besides its metrics, and ``out``, the command's ``--out``."""

    def __init__(self, accelerator: Any, out_dir: str | Path | None, out: str | Path | None = None,
                 cpu: bool = False) -> None:
        self._accelerator = accelerator
        self.out_dir = Path(out_dir) if out_dir is not None else None  # None: the protocol decides (summary)
        self.out = Path(out) if out is not None else None
        self.cpu = cpu  # --cpu: for a protocol that makes its own Accelerator (fine-tuning)

    @property
    def accelerator(self) -> Any:
        if not hasattr(self._accelerator, "process_index"):  # a factory
            self._accelerator = self._accelerator()
        return self._accelerator

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def child(self, name: str) -> EvalContext:
        """The same processes, files under ``out_dir/name`` (a step of a summary)."""
        return EvalContext(self.accelerator, self.out_dir / name, cpu=self.cpu)

    def gather_counts(self, n: int) -> list[int]:
        """``n`` of every process, in rank order (e.g. how many images each embedded)."""
        acc = self.accelerator
        counts = acc.gather(torch.tensor([n], device=acc.device)) if acc.num_processes > 1 else torch.tensor([n])
        return [int(c) for c in counts.cpu()]


def run_protocol(name: str, weights: Weights, options: Any, ctx: EvalContext) -> dict[str, Any]:
    """Run one measuring protocol and return its result with the protocol's name and the weights recorded."""
    proto = get_protocol(name)
    if not isinstance(options, proto.options):
        raise TypeError(f"protocol {name!r} takes {proto.options.__name__}, got {type(options).__name__}")
    validate = getattr(options, "validate", None)
    if validate is not None:
        validate(name)
    special = {w for p in _PROTOCOLS.values() for w in p.weights} - set(proto.weights)
    if weights.spec in special and not Path(weights.spec).exists():
        raise ValueError(f"--weights {weights.spec}: not something {name} can evaluate (it needs a network)")
    made = ctx.out_dir is not None and not ctx.out_dir.exists()
    if ctx.out_dir is not None:
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = dict(proto.fn(weights, options, ctx))
    finally:  # a protocol that wrote nothing there (kNN, or one that failed) leaves no empty folder
        if made and ctx.out_dir.is_dir() and not any(ctx.out_dir.iterdir()):
            with contextlib.suppress(OSError):  # another process may have removed it (or written) first
                ctx.out_dir.rmdir()
    if proto.output != "results":
        return result
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
# Command line: the weights / output options every sub-command shares, and the options dataclass
# --------------------------------------------------------------------------------------------


def add_weights_arguments(parser: argparse.ArgumentParser, proto: Protocol) -> None:
    """The options every sub-command takes, with the same meaning everywhere."""
    extra = f", or {' / '.join(repr(w) for w in proto.weights)}" if proto.weights else ""
    parser.add_argument("--weights", help="exported .safetensors, a weights file (with --model.name unless it is an "
                                          f"export), a checkpoint or run directory, or 'random'{extra}")
    parser.add_argument("--weights-format", default="timm",
                        help="key layout of a bare weights file (selfdistill.models.weights formats; default timm)")
    parser.add_argument("--model.name", dest="model_name", help="timm name (for 'random' and bare weight files)")
    parser.add_argument("--model.img_size", dest="model_img_size", type=int)
    parser.add_argument("--model.patch_size", dest="model_patch_size", type=int)
    parser.add_argument("--model.kwargs", dest="model_kwargs",
                        help="other timm.create_model keywords, as YAML: '{depth: 2, embed_dim: 32}'")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    parser.add_argument("--out", help=OUTPUTS[proto.output])
    if proto.output in ("results", "summary"):
        parser.add_argument("--output-dir", help="directory for the protocol's own files (a trained head, "
                                                 "checkpoints); default: beside --out")


def model_config(tree: dict[str, Any]) -> Any:
    """The ``ModelConfig`` of an evaluated network (no drop path; sizes default to timm's), or None."""
    from selfdistill.models import ModelConfig

    if not tree:
        return None
    if "name" not in tree:
        raise ValueError("the model needs a timm name (--model.name or model.name in the YAML)")
    config = build_dataclass(ModelConfig, {"img_size": None, **tree, "drop_path_rate": 0.0}, "model")
    config.validate("model")
    return config


def model_config_from(args: argparse.Namespace) -> Any:
    """The ``ModelConfig`` that ``--model.*`` describes, or None."""
    import yaml

    tree: dict[str, Any] = {}
    for key in ("name", "img_size", "patch_size"):
        value = getattr(args, f"model_{key}", None)
        if value is not None:
            tree[key] = value
    if getattr(args, "model_kwargs", None):
        kwargs = yaml.safe_load(args.model_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError(f"--model.kwargs must be a YAML mapping, got {args.model_kwargs!r}")
        tree["kwargs"] = kwargs
    return model_config(tree)


def _flags(f: dataclasses.Field) -> list[str]:
    return list(f.metadata.get("flags") or [f"--{f.name.replace('_', '-')}"])


def add_options_arguments(parser: argparse.ArgumentParser, options_cls: type) -> None:
    """One option per dataclass field; a field without a default is required. Field metadata:
    ``help``, ``flags``, ``choices``, ``metavar``, ``positional`` (a trailing list), ``action: append``
    (a repeatable option), ``switch`` (a boolean that is only ever turned on: no ``--no-`` form)."""
    hints = typing.get_type_hints(options_cls)
    for f in dataclasses.fields(options_cls):
        if f.name.startswith("_"):
            continue
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        base = inner[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp
        kw: dict[str, Any] = {"help": f.metadata.get("help", "")}
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="*", metavar=f.metadata.get("metavar", f.name), **kw)
            continue
        kw["dest"] = f.name
        if required:
            kw["required"] = True
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kw["default"] = default
            if kw["help"] and default not in ("", None, [], ()):
                kw["help"] += f" (default: {default})"
        origin = typing.get_origin(base)
        if base is bool:
            kw["action"] = "store_true" if f.metadata.get("switch") else argparse.BooleanOptionalAction
        elif f.metadata.get("action") == "append":  # a repeatable option of a fixed number of values
            element = typing.get_args(base)[0]
            kw.update(action="append", nargs=len(typing.get_args(element)), type=typing.get_args(element)[0])
        elif origin is list:
            kw.update(nargs="+", type=typing.get_args(base)[0])
        elif origin is tuple:
            kw.update(nargs=len(typing.get_args(base)), type=typing.get_args(base)[0])
        else:
            kw["type"] = base
        for key in ("choices", "metavar"):
            if key in f.metadata:
                kw[key] = f.metadata[key]
        parser.add_argument(*_flags(f), **kw)


WEIGHTS_KEYS = {"model.name": "--model.name", "model.img_size": "--model.img_size",
                "model.patch_size": "--model.patch_size", "model.kwargs": "--model.kwargs"}
_OVERRIDE = re.compile(r"^([A-Za-z_][\w-]*(?:\.[\w-]+)+)=(.*)$", re.S)


def override_keys(proto: Protocol) -> dict[str, tuple[str, dataclasses.Field | None]]:
    """``section.key`` -> (the option's flag, its field) for every option of a sub-command: each field
    as ``<protocol>.<field>`` (``knn.image_size``, ``knn.val_path``) and as its dotted flag
    (``data.path``), and the weights' ``model.*``."""
    keys: dict[str, tuple[str, dataclasses.Field | None]] = {k: (flag, None) for k, flag in WEIGHTS_KEYS.items()}
    for f in dataclasses.fields(proto.options):
        if f.name.startswith("_") or f.metadata.get("positional"):
            continue
        flag = _flags(f)[0]
        keys[f"{proto.name}.{f.name}"] = (flag, f)
        for alias in _flags(f):
            if "." in alias:
                keys[alias.lstrip("-")] = (flag, f)
    return keys


def expand_overrides(proto: Protocol, argv: list[str]) -> list[str]:
    """``section.key=value`` words as the sub-command's own options, so every sub-command takes the
    override grammar of ``run_pretrain.py`` (``knn.image_size=32 data.path=X``) besides its flags.
    A protocol that takes overrides itself (finetune: the recipe's keys; summary: each protocol's)
    keeps every word not addressed to it (``<protocol>.*``); elsewhere an unknown key is an error."""
    import yaml

    from selfdistill.configkit import closest_hint

    keys = override_keys(proto)
    own = any(f.metadata.get("positional") for f in dataclasses.fields(proto.options))
    out: list[str] = []
    for word in argv:
        m = _OVERRIDE.match(word)
        if not m or (own and not m.group(1).startswith(f"{proto.name}.")):
            out.append(word)
            continue
        key, text = m.groups()
        if key not in keys:
            raise ValueError(f"{proto.name}: unknown key {key!r}{closest_hint(key, sorted(keys))}; its keys: "
                             f"{', '.join(sorted(keys))}")
        flag, f = keys[key]
        value = yaml.safe_load(text) if text.strip() else ""
        if f is None or key == "model.kwargs":
            out += [flag, text]
        elif isinstance(value, bool) and f.metadata.get("switch"):
            out += [flag] if value else []
        elif isinstance(value, bool) and _base(proto.options, f) is bool:
            out.append(flag if value else f"--no-{flag[2:]}")
        elif f.metadata.get("action") == "append":  # a list of fixed-size lists: the option repeated
            for item in value if isinstance(value, list) else [value]:
                out += [flag, *(str(v) for v in (item if isinstance(item, list) else [item]))]
        elif isinstance(value, list):
            out += [flag, *(str(v) for v in value)]
        elif isinstance(value, str) and "," in value and typing.get_origin(_base(proto.options, f)) in (list, tuple):
            out += [flag, *(v.strip() for v in value.split(","))]
        else:
            out += [flag, text]
    return out


def _base(options_cls: type, f: dataclasses.Field) -> Any:
    tp = typing.get_type_hints(options_cls)[f.name]
    inner = [a for a in typing.get_args(tp) if a is not type(None)]
    return inner[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp


def options_from_args(options_cls: type, args: argparse.Namespace) -> Any:
    names = [f.name for f in dataclasses.fields(options_cls) if not f.name.startswith("_")]
    return options_cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})


def options_from_dict(options_cls: type, data: dict[str, Any] | None, prefix: str) -> Any:
    """Typed options from a YAML section: unknown keys and wrong types are one-line errors."""
    return build_dataclass(options_cls, data or {}, prefix)
