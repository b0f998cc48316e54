"""Typed configuration: dataclasses, YAML recipes and dotted command-line overrides.

A recipe is a YAML file whose sections mirror the dataclasses below. The ``method`` section is
typed by the method's own dataclass (looked up in the method registry by ``method.name``), so a
new method adds its options without touching this file. Every key is checked before any work
starts: an unknown key, a wrong type or an impossible value is a one-line ``ConfigError`` that
names the key (and the closest valid key).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message is one line and names the key."""


def _fail(key: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"config error: {key}: {message}")


def check_kwargs_have_values(key: str, kwargs: dict[str, typing.Any], example: str = "depth: 2") -> None:
    """YAML reads ``{depth:2}`` (no space) as ``{"depth:2": None}`` and timm drops None keywords
    silently: refuse it with the fix."""
    for name, value in kwargs.items():
        if value is None:
            _fail(key, f"{name!r} has no value (write {{{example}}}, with a space after ':')")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The student backbone, built by timm name. The teacher is a copy of it."""

    name: str = "vit_small_patch16_224"
    img_size: int | None = 224  # None keeps timm's default; ViTs interpolate for other crop sizes
    patch_size: int | None = None  # override timm's patch size (tiny demo models)
    drop_path_rate: float = 0.1  # student only; the teacher always uses 0
    grad_checkpointing: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)  # any other timm.create_model keyword
    pretrained: str = ""  # a local timm-format weights file (e.g. a selfdistill export) to start from
    channels_last: bool = True  # CNN backbones (ResNet...): NHWC weights and inputs, faster convolutions

    def validate(self, prefix: str) -> None:
        if not self.name:
            _fail(f"{prefix}.name", "a timm model name is required")
        if self.img_size is not None and self.img_size <= 0:
            _fail(f"{prefix}.img_size", f"must be positive, got {self.img_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            _fail(f"{prefix}.drop_path_rate", f"must be in [0, 1), got {self.drop_path_rate}")
        check_kwargs_have_values(f"{prefix}.kwargs", self.kwargs)


@dataclass
class DataConfig:
    """Training images and the multi-crop augmentation (DINO's ImageNet defaults)."""

    path: str = ""  # folder | HF dataset directory | shard dir, brace pattern(s) joined by '::', pipe:, http(s), s3://
    format: str = "folder"  # folder | hf | wds
    global_crop_size: int = 224
    local_crop_size: int = 96
    n_local_crops: int = 10
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    blur_radius: tuple[float, float] = (0.1, 2.0)  # PIL Gaussian blur radius range (px), DINO's for 224 px
    num_workers: int = 8
    max_bad_fraction: float = 0.01  # fail when more than this fraction of images cannot be read
    decode_size: int = 0  # >0: decode JPEGs at a reduced DCT scale whose sides stay >= this (faster); 0: full size
    samples_per_epoch: int = 0  # wds: samples in an epoch over all ranks (0: the shards' _info.json total)
    shuffle_buffer: int = 1000  # wds: samples shuffled in memory per loader worker
    shard_retries: int = 2  # wds: re-opening attempts for an unreadable shard before it is skipped
    max_missing_shards: float = 0.1  # wds: fail when more than this fraction of shards cannot be read
    hf_split: str = "train"
    hf_image_column: str = "image"
    hf_label_column: str = "label"  # optional: no such column means unlabelled

    def validate(self, prefix: str) -> None:
        if self.format not in ("folder", "hf", "wds"):
            _fail(f"{prefix}.format", f"must be one of ['folder', 'hf', 'wds'], got {self.format!r}")
        for name in ("decode_size", "samples_per_epoch", "shuffle_buffer", "shard_retries"):
            if getattr(self, name) < 0:
                _fail(f"{prefix}.{name}", f"must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.max_missing_shards <= 1.0:
            _fail(f"{prefix}.max_missing_shards", f"must be in [0, 1], got {self.max_missing_shards}")
        for name in ("global_crop_size", "local_crop_size"):
            if getattr(self, name) <= 0:
                _fail(f"{prefix}.{name}", f"must be positive, got {getattr(self, name)}")
        if self.n_local_crops < 0:
            _fail(f"{prefix}.n_local_crops", f"must be >= 0, got {self.n_local_crops}")
        for name in ("global_crop_scale", "local_crop_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                _fail(f"{prefix}.{name}", f"must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
        if not 0.0 <= self.blur_radius[0] <= self.blur_radius[1]:
            _fail(f"{prefix}.blur_radius", f"must satisfy 0 <= min <= max, got {self.blur_radius}")
        if any(s <= 0 for s in self.std):
            _fail(f"{prefix}.std", f"must be positive, got {self.std}")
        if self.num_workers < 0:
            _fail(f"{prefix}.num_workers", f"must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            _fail(f"{prefix}.max_bad_fraction", f"must be in [0, 1], got {self.max_bad_fraction}")


@dataclass
class OptimConfig:
    """Optimizer and the per-optimizer-step schedules shared by all methods."""

    name: str = "adamw"
    lr: float = 5e-4  # for a global batch of 256; scaled linearly with the real global batch
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum: float = 0.9  # SGD only
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 3.0  # global L2 norm; 0 disables
    scale_lr_with_batch: bool = True
    fused: bool = True  # PyTorch's fused AdamW/SGD kernels (CPU and GPU); false: PyTorch's default loop

    def validate(self, prefix: str) -> None:
        if self.name not in ("adamw", "sgd"):
            _fail(f"{prefix}.name", f"must be one of ['adamw', 'sgd'], got {self.name!r}")
        for name in ("lr", "min_lr", "weight_decay", "weight_decay_end", "warmup_epochs", "clip_grad"):
            if getattr(self, name) < 0:
                _fail(f"{prefix}.{name}", f"must be >= 0, got {getattr(self, name)}")
        if self.lr == 0:
            _fail(f"{prefix}.lr", "must be > 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            _fail(f"{prefix}.betas", f"must be in [0, 1), got {self.betas}")


@dataclass
class TrainConfig:
    """The run itself: length, batch, precision, logging and checkpoints."""

    output_dir: str = "runs/dino"
    seed: int = 0
    epochs: int = 100
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    batch_size_per_device: int = 64
    grad_accum_steps: int = 1
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 needs a GPU)
    cpu: bool = False  # force CPU even when a GPU is present
    log_every: int = 10  # optimizer steps
    checkpoint_every: int = 1000  # optimizer steps; a checkpoint is also written at the end
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 5  # stop after this many non-finite losses in a row
    overfit_batches: int = 0  # >0: train on epoch 0's first N global batches, same augmentation, again and again
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    progress_bar: bool = True
    compile: bool = False  # torch.compile the backbones (student and teacher) in place; slow first steps
    keep_freed_memory: bool = True  # CPU: glibc keeps freed activations for the next step (no page faults)

    def validate(self, prefix: str) -> None:
        for name in ("epochs", "batch_size_per_device", "grad_accum_steps", "log_every",
                     "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps"):
            if getattr(self, name) <= 0:
                _fail(f"{prefix}.{name}", f"must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "overfit_batches"):
            if getattr(self, name) < 0:
                _fail(f"{prefix}.{name}", f"must be >= 0, got {getattr(self, name)}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            _fail(f"{prefix}.precision", f"must be one of ['fp32', 'bf16', 'fp16'], got {self.precision!r}")
        for tracker in self.trackers:
            if tracker not in ("tensorboard", "wandb"):
                _fail(f"{prefix}.trackers", f"unknown tracker {tracker!r} (use tensorboard and/or wandb)")
        if not self.output_dir:
            _fail(f"{prefix}.output_dir", "must not be empty")


@dataclass
class KnnConfig:
    """Weighted kNN (DINO eval_knn): offline with run_eval.py, online every N epochs."""

    train_path: str = ""  # labelled folder for the feature bank (defaults to data.path when labelled)
    val_path: str = ""  # labelled folder of queries; online kNN runs only when this is set
    every_epochs: int = 1
    k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07
    image_size: int = 224
    batch_size: int = 128
    max_train_samples: int = 0  # 0: all; otherwise a fixed random subset for the online bank

    def validate(self, prefix: str) -> None:
        if self.every_epochs <= 0:
            _fail(f"{prefix}.every_epochs", f"must be positive, got {self.every_epochs}")
        if not self.k or any(k <= 0 for k in self.k):
            _fail(f"{prefix}.k", f"must be a non-empty list of positive integers, got {self.k}")
        if self.temperature <= 0:
            _fail(f"{prefix}.temperature", f"must be positive, got {self.temperature}")
        for name in ("image_size", "batch_size"):
            if getattr(self, name) <= 0:
                _fail(f"{prefix}.{name}", f"must be positive, got {getattr(self, name)}")


@dataclass
class MethodConfig:
    """Base of every method's section; a method subclasses it and registers the subclass."""

    name: str = "dino"

    def validate(self, prefix: str) -> None:  # pragma: no cover - overridden
        pass


@dataclass
class Config:
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with checks
# --------------------------------------------------------------------------------------------


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _closest(key: str, options: list[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    if match:
        return f" (did you mean {prefix + match[0]!r}?)"
    return f" (valid keys: {', '.join(options)})"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        _fail(key, f"expected {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        _fail(key, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _fail(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        _fail(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # e.g. output_dir=2024
            return str(value)
        _fail(key, f"expected a string, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            _fail(key, f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            _fail(key, f"expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, f"expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in a dataclass


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    names = [getattr(a, "__name__", str(a)) for a in args]
    return " or ".join(names) + " or null"


def build_dataclass(cls: type, data: dict[str, Any] | None, prefix: str) -> Any:
    """Instantiate ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        _fail(prefix, f"expected a mapping of options, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"config error: unknown key {full!r}{_closest(str(key), names, prefix + '.' if prefix else '')}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value, full)
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"config error: {dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``optim.lr=5e-4`` -> (``optim.lr``, 5e-4); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"config error: override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"config error: override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe, apply dotted overrides, type-check and validate everything."""
    return config_from_dict(read_recipe(path, overrides))


def read_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The plain tree of a YAML recipe with dotted overrides applied (not yet type-checked)."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config error: recipe file {str(path)!r} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config error: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config error: {path} must hold a mapping of sections")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return tree


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Build and validate a Config from nested plain data (a parsed recipe or ``Config.to_dict()``)."""
    from selfdistill.methods import method_config_class  # the registry imports this module

    hints = typing.get_type_hints(Config)
    for key in tree:
        if key not in hints:
            raise ConfigError(f"config error: unknown section {key!r}{_closest(str(key), list(hints))}")
    method_tree = tree.get("method") or {}
    if not isinstance(method_tree, dict):
        _fail("method", f"expected a mapping with at least 'name', got {method_tree!r}")
    method_cls = method_config_class(method_tree.get("name", MethodConfig.name))

    kwargs = {"method": build_dataclass(method_cls, method_tree, "method")}
    for name, tp in hints.items():
        if name != "method":
            kwargs[name] = build_dataclass(tp, tree.get(name), name)
    config = Config(**kwargs)
    config.validate()
    return config
