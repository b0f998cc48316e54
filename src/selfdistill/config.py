"""The sections of the pretraining recipe (``configs/*.yaml``) and its root, :class:`Config`.

Sections are typed dataclasses checked by :mod:`selfdistill.configkit`; the ``method`` section
is typed by the method's own dataclass, looked up in the method registry when a recipe is loaded
(:func:`selfdistill.recipe.load_config`), so a new method adds its options without touching this
file. Fine-tuning reuses the ``data`` source keys (:class:`~selfdistill.data.SourceConfig`) and the
``train`` section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from selfdistill.configkit import (Root, check_kwargs_have_values, closest_names, fail, interval, non_negative, one_of,
                                   positive)
from selfdistill.data.images import SourceConfig
from selfdistill.data.multicrop import AUGMENT_ON, IMAGENET_MEAN, IMAGENET_STD
from selfdistill.models.backbone import ModelConfig
from selfdistill.tracker_schema import check_tracker_kwargs, check_trackers


PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")


@dataclass
class DataConfig(SourceConfig):
    """Training images (the source keys) and the multi-crop augmentation (DINO's ImageNet defaults)."""

    global_crop_size: int = 224
    local_crop_size: int = 96
    n_local_crops: int = 10
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    blur_radius: tuple[float, float] = (0.1, 2.0)  # PIL Gaussian blur radius range (px), DINO's for 224 px
    augment_on: str = "auto"  # workers | device (workers cut, the training device finishes) | auto: device on a GPU

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        positive(self, prefix, "global_crop_size", "local_crop_size")
        non_negative(self, prefix, "n_local_crops")
        interval(self, prefix, "global_crop_scale", 0.0, 1.0)
        interval(self, prefix, "local_crop_scale", 0.0, 1.0)
        interval(self, prefix, "blur_radius", 0.0, float("inf"), open_low=False)
        one_of(self, prefix, "augment_on", AUGMENT_ON)
        if any(s <= 0 for s in self.std):
            fail(f"{prefix}.std", f"must be positive, got {self.std}")


@dataclass
class OptimConfig:
    """Optimizer and the per-optimizer-step schedules shared by all methods."""

    name: str = "adamw"
    lr: float = 5e-4  # for a global batch of 256; scaled linearly with the real global batch
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum: float = 0.9  # optimizers with momentum (sgd, lars, ...)
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 3.0  # global L2 norm; 0 disables
    scale_lr_with_batch: bool = True
    fused: bool = True  # PyTorch's fused AdamW/SGD kernels (CPU and GPU); false: PyTorch's default loop
    kwargs: dict[str, Any] = field(default_factory=dict)  # more keywords for the optimizer (e.g. lars: trust_clip)

    def validate(self, prefix: str) -> None:
        from timm.optim import list_optimizers

        names = sorted({*list_optimizers(), "sgd"})
        if self.name not in names:
            fail(f"{prefix}.name", f"unknown optimizer {self.name!r}"
                                   + closest_names(self.name, names, "timm.optim.list_optimizers()"))
        check_kwargs_have_values(f"{prefix}.kwargs", self.kwargs, example="trust_clip: true")
        non_negative(self, prefix, "lr", "min_lr", "weight_decay", "weight_decay_end", "warmup_epochs", "clip_grad")
        if self.lr == 0:
            fail(f"{prefix}.lr", "must be > 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            fail(f"{prefix}.betas", f"must be in [0, 1), got {self.betas}")


@dataclass
class TrainConfig:
    """The run itself, as the one training loop reads it: length, batch, precision, logging and checkpoints."""

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
    checkpoint_every_epochs: int = 0  # also checkpoint after every N epochs (0: only train.checkpoint_every)
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 5  # stop after this many non-finite losses in a row
    overfit_batches: int = 0  # >0: train on epoch 0's first N global batches, same augmentation, again and again
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # any of Accelerate's trackers
    # project, name, entity, tags, and per-tracker init keywords ({wandb: {mode: offline}}); see tracker_schema.py
    tracker_kwargs: dict[str, Any] = field(default_factory=dict)
    progress_bar: bool = True
    compile: bool = False  # torch.compile the backbones (student and teacher) in place; slow first steps
    keep_freed_memory: bool = True  # CPU: glibc keeps freed activations for the next step (no page faults)
    # on these signals every rank finishes its optimizer step, a checkpoint is written, exit code 75 ([]: none)
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    checkpoint_every_minutes: float = 0.0  # also a checkpoint when this long has passed since the last (0: off)

    def validate(self, prefix: str) -> None:
        for name in self.preempt_signals:
            if name not in PREEMPT_SIGNALS:
                fail(f"{prefix}.preempt_signals", f"unknown signal {name!r} (use {', '.join(PREEMPT_SIGNALS)})")
        non_negative(self, prefix, "checkpoint_every_minutes")
        positive(self, prefix, "epochs", "batch_size_per_device", "grad_accum_steps", "log_every", "checkpoint_every",
                 "keep_checkpoints", "max_nonfinite_steps")
        non_negative(self, prefix, "max_steps", "overfit_batches", "checkpoint_every_epochs")
        one_of(self, prefix, "precision", ("fp32", "bf16", "fp16"))
        check_trackers(f"{prefix}.trackers", self.trackers)
        check_tracker_kwargs(f"{prefix}.tracker_kwargs", self.tracker_kwargs)
        if not self.output_dir:
            fail(f"{prefix}.output_dir", "must not be empty")


@dataclass
class KnnConfig:
    """Weighted kNN (DINO eval_knn), online every N epochs of pretraining."""

    train_path: str = ""  # labelled images for the feature bank (defaults to data.path when labelled)
    val_path: str = ""  # labelled images of queries; online kNN runs only when this is set
    every_epochs: int = 1
    k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07
    image_size: int = 224
    batch_size: int = 128
    max_train_samples: int = 0  # 0: all; otherwise a fixed random subset for the online bank

    def validate(self, prefix: str) -> None:
        positive(self, prefix, "every_epochs", "temperature", "image_size", "batch_size")
        if not self.k or any(k <= 0 for k in self.k):
            fail(f"{prefix}.k", f"must be a non-empty list of positive integers, got {self.k}")


@dataclass
class MethodConfig:
    """Base of every method's section; a method subclasses it and registers the subclass."""

    name: str = "dino"

    def validate(self, prefix: str) -> None:  # pragma: no cover - overridden
        pass


@dataclass
class Config(Root):
    """A pretraining recipe."""

    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
