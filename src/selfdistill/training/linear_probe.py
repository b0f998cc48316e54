"""The linear probe's training: a linear head on frozen features as a task of the one loop.

The recipes (DINO's SGD, SMD's LARS), the head, its optimizer (from the one factory,
:mod:`selfdistill.engine.optim`), the per-epoch cosine, :class:`LinearTask` (the head is the student;
the frozen features are computed inside the step, since the crops change every epoch) and
:class:`LinearEpochEnd` (each epoch's loss, lr and validation; the head written at the end). A
killed probe resumes exactly from the loop's checkpoints. :mod:`selfdistill.training.linear` is the
protocol around it (images, features, options).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from selfdistill.atomic import write_safetensors_atomic
from selfdistill.config import TrainConfig
from selfdistill.configkit import Root
from selfdistill.data import collate_eval
from selfdistill.engine.optim import create_optimizer
from selfdistill.engine.task import Hook, Progress, StepOutput, Task
from selfdistill.engine.trainer import Trainer
from selfdistill.eval.inference import sum_over_batches
from selfdistill.params import unwrap

log = logging.getLogger(__name__)

__all__ = ["EpochCosine", "HEAD_FILE", "LinearEpochEnd", "LinearRunConfig", "LinearTask", "RECIPES", "Recipe",
           "build_optimizer", "evaluate_head", "linear_head", "train_linear_classifier"]

HEAD_FILE = "linear_head.safetensors"


@dataclass(frozen=True)
class Recipe:
    optimizer: str  # "sgd" or "lars"
    lr: float  # per 256 images (linear scaling rule)
    batch_size: int  # global
    epochs: int
    momentum: float
    weight_decay: float
    val_interpolation: str  # of the validation resize
    reference: str


RECIPES = {
    "dino": Recipe("sgd", 0.001, 1024, 100, 0.9, 0.0, "bicubic",
                   "DINO eval_linear.py: SGD momentum 0.9, wd 0, lr 0.001*batch/256, CosineAnnealingLR per epoch "
                   "(eta_min 0); RandomResizedCrop(scale 0.08-1)+flip; val Resize(256, bicubic)+CenterCrop(224)"),
    "smd": Recipe("lars", 0.1, 4096, 90, 0.9, 0.0, "bilinear",
                  "SMD/SimSiam main_lincls.py --lars: LARC(trust 0.001, no clip) over SGD momentum 0.9, wd 0, "
                  "lr 0.1*batch/256, cosine per epoch; RandomResizedCrop+flip; val Resize(256)+CenterCrop(224)"),
}


def linear_head(dim: int, num_classes: int, seed: int = 0) -> nn.Linear:
    """DINO's LinearClassifier: weights ~ N(0, 0.01), bias 0, no batch norm."""
    head = nn.Linear(dim, num_classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    return head


def build_optimizer(params: Iterable[torch.Tensor], recipe: Recipe, lr: float) -> torch.optim.Optimizer:
    """The recipe's optimizer from the one factory: ``sgd`` (plain momentum), or ``lars`` with
    ``always_adapt`` (the trust ratio applies with wd 0 too, as apex ``LARC(clip=False)`` does)."""
    extra = {"trust_coeff": 0.001, "trust_clip": False, "always_adapt": True} if recipe.optimizer == "lars" else {}
    return create_optimizer(list(params), recipe.optimizer, lr=lr, weight_decay=recipe.weight_decay,
                            momentum=recipe.momentum, kwargs=extra, key="recipe.optimizer")


def _topk_hits(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...]) -> list[int]:
    top = logits.topk(max(ks), dim=1).indices
    hit = top == target[:, None]
    return [int(hit[:, :k].any(dim=1).sum()) for k in ks]


def evaluate_head(head: nn.Module, feature_fn: Callable, batches: Iterable[dict], num_classes: int,
                  accelerator: Any, show_progress: bool = True) -> dict[str, float]:
    """Top-1 / top-5 (percent) over every validation sample of every rank."""
    ks = (1, 5) if num_classes >= 5 else (1,)

    def counts(batch: dict) -> torch.Tensor:  # hits at each k, samples
        x, y = batch["image"].to(accelerator.device), batch["label"].to(accelerator.device)
        return torch.tensor([*_topk_hits(head(feature_fn(x)).float(), y, ks), y.numel()], dtype=torch.float64)

    head.eval()
    total = sum_over_batches(counts, batches, accelerator, torch.zeros(len(ks) + 1, dtype=torch.float64),
                             "linear val", show_progress).cpu()
    if total[-1] == 0:
        raise ValueError("the validation set is empty")
    return {f"top{k}": 100.0 * float(total[i] / total[-1]) for i, k in enumerate(ks)}


@dataclass
class ProbeConfig:
    """What the head is trained on and how; a resume must match all of it (``recipe_sections``)."""

    recipe: str = "dino"
    epochs: int = 100
    batch_size: int = 1024  # global
    lr: float = 0.0  # after the linear scaling rule
    seed: int = 0
    dim: int = 0
    num_classes: int = 0
    val_every: int = 1
    settings: dict[str, Any] = field(default_factory=dict)  # weights, paths, image size, normalisation, feature

    def validate(self, prefix: str) -> None:
        pass


@dataclass
class ProbeOptimConfig:
    name: str = "sgd"
    clip_grad: float = 0.0  # the loop's; the recipes do not clip

    def validate(self, prefix: str) -> None:
        pass


@dataclass
class ProbeDataConfig:
    max_bad_fraction: float = 0.01
    bad_check_after: int = 1000

    def validate(self, prefix: str) -> None:
        pass


@dataclass
class LinearRunConfig(Root):
    """The linear probe as a recipe of the one loop (built from :class:`LinearOptions`, not read from YAML)."""

    recipe_sections: ClassVar[tuple[str, ...]] = ("probe", "optim")
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    optim: ProbeOptimConfig = field(default_factory=ProbeOptimConfig)
    data: ProbeDataConfig = field(default_factory=ProbeDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class EpochCosine:
    """timm's cosine over epochs to 0 (DINO's ``CosineAnnealingLR(T_max=epochs)`` stepped per epoch),
    in the loop's per-step terms: every step of epoch ``e`` runs at ``lr * (1 + cos(pi e / epochs)) / 2``
    (timm counts the epoch as its update index)."""

    def __init__(self, optimizer: Any, epochs: int, steps_per_epoch: int) -> None:
        from timm.scheduler import CosineLRScheduler

        self.optimizer, self.steps_per_epoch = optimizer, steps_per_epoch
        self.scheduler = CosineLRScheduler(optimizer, t_initial=epochs, lr_min=0.0, t_in_epochs=False)

    def lr_of_epoch(self, epoch: int) -> float:
        self.scheduler.step_update(epoch)
        return self.optimizer.param_groups[0]["lr"]

    def step_update(self, step: int) -> dict[str, float]:
        return {"lr": self.lr_of_epoch(step // self.steps_per_epoch)}


class LinearTask(Task):
    """A linear head on frozen features, computed inside the step (the crops change every epoch):
    the student is the head; ``features`` (the frozen backbone, already on the device) is called
    under ``no_grad``."""

    name = "linear"
    tracker_project = "selfdistill-linear"

    def __init__(self, config: LinearRunConfig, features: Callable[[torch.Tensor], torch.Tensor], images: Any,
                 val_batches: Callable[[], Iterable[dict]], show_progress: bool = True) -> None:
        self.config, self.features, self.images, self.val_batches = config, features, images, val_batches
        p = config.probe
        self.recipe = RECIPES[p.recipe]
        self.student = linear_head(p.dim, p.num_classes, p.seed)
        self.show_progress = show_progress
        self.history: list[dict[str, Any]] = []  # one row per epoch
        self.loss_sum = torch.zeros((), dtype=torch.float32)  # this epoch's, on this rank
        self.n_steps = 0

    def train_data(self) -> Any:
        return self.images

    def collate_fn(self) -> Callable[[list[Any]], Any]:
        return collate_eval

    def build_optimizer(self, global_batch: int, device: torch.device) -> torch.optim.Optimizer:
        return build_optimizer(self.student.parameters(), self.recipe, self.config.probe.lr)

    def build_scheduler(self, optimizer: Any, steps_per_epoch: int, total_steps: int, global_batch: int) -> EpochCosine:
        self.schedule = EpochCosine(optimizer, self.config.train.epochs, steps_per_epoch)
        return self.schedule

    def setup(self, accelerator: Any, steps_per_epoch: int, total_steps: int) -> None:
        self.accelerator = accelerator
        self.loss_sum = self.loss_sum.to(accelerator.device)

    def hooks(self) -> list[Hook]:
        return [LinearEpochEnd(self)]

    def training_step(self, student: nn.Module, batch: Any, progress: Progress) -> StepOutput:
        x, y = batch["image"], batch["label"]
        if (y < 0).any():
            raise ValueError("the linear probe needs labelled training images (got label -1)")
        with torch.no_grad():
            feats = self.features(x)
        loss = F.cross_entropy(student(feats.float()), y)
        self.loss_sum += loss.detach()
        self.n_steps += 1
        return StepOutput(loss, {}, x.shape[0])

    def state_dict(self) -> dict[str, Any]:
        return {"history": json.dumps(self.history), "loss_sum": self.loss_sum.detach().cpu(), "n_steps": self.n_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = json.loads(state["history"])
        self.loss_sum = state["loss_sum"].to(self.loss_sum.device)
        self.n_steps = int(state["n_steps"])


class LinearEpochEnd(Hook):
    """At every epoch's end: the epoch's mean training loss and learning rate, and every
    ``val_every`` epochs (and after the last) top-1/top-5 on the validation images; the head
    (safetensors) when the run is over."""

    def __init__(self, task: LinearTask) -> None:
        self.task = task

    def on_train_start(self, loop: Any) -> None:
        self.close_epoch(loop)  # a checkpoint written at an epoch's last step precedes that epoch's end

    def on_epoch_end(self, loop: Any) -> None:
        self.close_epoch(loop)

    def close_epoch(self, loop: Any) -> None:
        task, acc, epoch = self.task, loop.accelerator, loop.state.epoch
        if loop.state.batch_in_epoch or len(task.history) >= epoch:
            return
        p = task.config.probe
        row: dict[str, Any] = {"epoch": epoch, "lr": task.schedule.lr_of_epoch(epoch - 1),
                               "train_loss": float(acc.reduce(task.loss_sum, "mean")) / max(task.n_steps, 1)}
        task.loss_sum.zero_()
        task.n_steps = 0
        if epoch % p.val_every == 0 or epoch == task.config.train.epochs:
            row.update(evaluate_head(unwrap(acc, loop.student), task.features, task.val_batches(), p.num_classes,
                                     acc, task.show_progress))
            log.info("linear epoch %d: %s", epoch, {k: round(v, 3) for k, v in row.items()})
        task.history.append(row)
        loop.logger.write({"event": "linear_epoch", **row}, loop.state.step, track=False)

    def on_final_checkpoint(self, loop: Any, path: Any) -> None:
        acc = loop.accelerator
        if acc.is_main_process:
            weights = {k: v.detach().cpu().contiguous() for k, v in unwrap(acc, loop.student).state_dict().items()}
            write_safetensors_atomic(loop.run_dir / HEAD_FILE, weights,
                                     {"selfdistill_linear": json.dumps(self.task.config.to_dict()["probe"])})
        acc.wait_for_everyone()


def train_linear_classifier(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    num_classes: int,
    train_images: Any,
    val_batches: Callable[[], Iterable[dict]],
    recipe: str,
    out_dir: str | os.PathLike,
    epochs: int | None = None,
    batch_size: int | None = None,
    base_lr: float | None = None,
    val_every: int = 1,
    seed: int = 0,
    resume: bool = True,
    settings: dict[str, Any] | None = None,
    show_progress: bool = True,
    cpu: bool = False,
    checkpoint_every: int = 1000,
    hooks: Iterable[Hook] = (),
) -> dict[str, Any]:
    """Train a linear head on ``feature_fn`` features with the one loop and validate it; returns
    metrics and history.

    ``train_images`` has ``train_source`` and ``finish`` (:class:`~selfdistill.data.ImageSet`);
    ``val_batches()`` yields this process's share of the validation set. Checkpoints are the
    loop's (in ``out_dir/checkpoints``, every ``checkpoint_every`` steps and every epoch), and a
    run continues from the latest when ``resume`` (refused when its settings differ); the
    trained head goes to ``out_dir/linear_head.safetensors``.
    """
    from accelerate import PartialState

    rec = RECIPES[recipe]
    out_dir = Path(out_dir)
    epochs = epochs or rec.epochs
    batch_size = batch_size or rec.batch_size
    lr = (base_lr or rec.lr) * batch_size / 256
    world = PartialState().num_processes
    if batch_size % world:
        raise ValueError(f"linear: the global batch {batch_size} must divide by the {world} processes")
    config = LinearRunConfig(
        probe=ProbeConfig(recipe, epochs, batch_size, lr, seed, dim, num_classes, val_every, dict(settings or {})),
        optim=ProbeOptimConfig(rec.optimizer),
        train=TrainConfig(output_dir=str(out_dir), seed=seed, epochs=epochs, batch_size_per_device=batch_size // world,
                          cpu=cpu, checkpoint_every=checkpoint_every, checkpoint_every_epochs=1, keep_checkpoints=1,
                          trackers=[], progress_bar=show_progress))
    config.validate()
    trainer = Trainer(config, lambda: LinearTask(config, feature_fn, train_images, val_batches, show_progress),
                      resume="auto" if resume else None, hooks=list(hooks), keep_process_group=True)
    trainer.fit()
    history = trainer.task.history
    validated = [r for r in history if "top1" in r]
    if not validated:
        raise ValueError("no validation ran (epochs must be >= 1)")
    best = max(validated, key=lambda r: r["top1"])
    last = validated[-1]
    metrics = {"top1": best["top1"], "best_epoch": best["epoch"], "top1_last": last["top1"]}
    if "top5" in best:
        metrics.update(top5=best["top5"], top5_last=last["top5"])
    return {"metrics": metrics, "history": history, "head": str(out_dir / HEAD_FILE), "lr": lr,
            "epochs": epochs, "batch_size": batch_size}
