"""Full fine-tuning of pretrained weights with a fresh classifier: the BEiT / Feature Distillation
recipe, as a task of the one training loop.

    python run_eval.py finetune --config configs/finetune_fd_vit_base16.yaml \\
        --weights runs/fd/export/student_backbone.safetensors data.path=IN/train data.val_path=IN/val

What timm already does is taken from timm: ``create_transform`` (RandAugment, random erasing),
``Mixup`` + ``SoftTargetCrossEntropy``, ``param_groups_layer_decay`` + ``create_optimizer_v2``
(layer-wise lr decay as each group's ``lr_scale``), ``CosineLRScheduler`` (per step), ``ModelEmaV3``,
drop path in the models. This package adds what no library does for this project: the weights
through the project's weights door (and FD's shared relative position bias, copied into every
block: :func:`~selfdistill.training.finetune_model.unshare_rel_pos_bias`), the task the loop runs
(training step = mixup + criterion, after each step the weight EMA), validation at epoch ends (a
hook), and safetensors + JSON out.

The recipe's sections are :mod:`selfdistill.training.finetune_config`; the network, optimizer,
augmentation and validation pass are :mod:`selfdistill.training.finetune_model`. This module is
the task, its validation hook and the ``run_eval.py finetune`` protocol.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from selfdistill.atomic import write_json_atomic
from selfdistill.data import collate_eval, open_images, sample_seed
from selfdistill.engine.task import Export, Hook, Progress, StepOutput, Task
from selfdistill.engine.trainer import Trainer
from selfdistill.eval.protocols import EvalContext, Weights, register_protocol
from selfdistill.params import ema_update, unwrap
from selfdistill.rundir import FINETUNED, FINETUNED_EMA, eval_results
from selfdistill.training.finetune_config import FinetuneConfig, load_finetune_config
from selfdistill.training.finetune_model import (build_model, build_optimizer, build_scheduler, eval_transform,
                                                 evaluate, numpy_seeded, open_training_images)

log = logging.getLogger("selfdistill")

__all__ = ["FinetuneOptions", "FinetuneTask", "FinetuneValidation", "finetune_protocol", "finetuning"]


# --------------------------------------------------------------------------------------------
# The task the loop runs, and its validation
# --------------------------------------------------------------------------------------------


class _LayerDecaySchedule:
    """timm's per-step scheduler in the loop's terms: every group runs at the schedule times its
    ``lr_scale``; the largest and smallest group rates are logged."""

    def __init__(self, scheduler: Any, optimizer: Any) -> None:
        self.scheduler, self.optimizer = scheduler, optimizer

    def step_update(self, step: int) -> dict[str, float]:
        self.scheduler.step_update(step)
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        return {"lr": max(lrs), "lr_min_group": min(lrs)}


class FinetuneTask(Task):
    """A classifier trained on labelled images: the step is mixup + criterion, after each optimizer
    step the weight EMA; validation at epoch ends (:class:`FinetuneValidation`)."""

    name = "finetune"
    tracker_project = "selfdistill-finetune"

    def __init__(self, config: FinetuneConfig) -> None:
        from accelerate.state import AcceleratorState
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        plugin = AcceleratorState().deepspeed_plugin
        if plugin is not None and plugin.zero_stage == 3:
            raise ValueError("fine-tuning runs under DDP or DeepSpeed ZeRO-1/2; ZeRO-3 partitions the weights that "
                             "evaluation and the EMA read (use ds_configs/finetune_zero2.json)")
        self.config = cfg = config
        self.images = open_training_images(cfg)
        self.val_images = open_images(cfg.data.validation_source(), eval_transform(cfg.data), labelled=True,
                                      role="data.val_path")
        self.classes = list(self.images.classes)
        val_classes = list(self.val_images.classes)
        if self.classes and val_classes and self.classes != val_classes:
            raise ValueError(f"data.path and data.val_path have different classes: {self.classes[:5]}... vs "
                             f"{val_classes[:5]}...")
        self.num_classes = cfg.model.num_classes or len(self.classes) or len(val_classes)
        if self.num_classes < max(len(self.classes), 1):
            raise ValueError(f"model.num_classes={cfg.model.num_classes} is fewer than the {len(self.classes)} "
                             "classes of data.path" if self.classes else
                             "the number of classes is unknown: set model.num_classes")
        built = build_model(cfg.model, self.num_classes, cfg.data.input_size)
        self.student, self.model_info, self.load_report = built.model, built.info, built.report
        self.ema = None
        if cfg.ema.enabled:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.student, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup)
        m = cfg.mixup
        self.mixup = Mixup(mixup_alpha=m.mixup, cutmix_alpha=m.cutmix, cutmix_minmax=m.cutmix_minmax, prob=m.prob,
                           switch_prob=m.switch_prob, mode=m.mode, label_smoothing=m.label_smoothing,
                           num_classes=self.num_classes) if m.active else None
        if self.mixup is not None:
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif m.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=m.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.history: list[dict[str, Any]] = []  # one row per validation
        self._accelerator: Any = None

    # -- set-up ---------------------------------------------------------------------------------
    def train_data(self) -> Any:
        return self.images

    def collate_fn(self):
        return collate_eval

    def build_optimizer(self, global_batch: int, device: torch.device) -> torch.optim.Optimizer:
        o = self.config.optim
        factor = global_batch / o.lr_base_batch if o.scale_lr_with_batch else 1.0
        self.lr, self.min_lr, self.warmup_lr = o.lr * factor, o.min_lr * factor, o.warmup_lr * factor
        return build_optimizer(self.student, o, self.lr)

    def build_scheduler(self, optimizer: Any, steps_per_epoch: int, total_steps: int,
                        global_batch: int) -> _LayerDecaySchedule:
        warmup_steps = int(round(self.config.optim.warmup_epochs * steps_per_epoch))
        return _LayerDecaySchedule(build_scheduler(optimizer, total_steps, warmup_steps, self.min_lr,
                                                   self.warmup_lr), optimizer)

    def setup(self, accelerator: Any, steps_per_epoch: int, total_steps: int) -> None:
        self._accelerator = accelerator
        self._deepspeed = getattr(accelerator.state, "deepspeed_plugin", None) is not None
        if self.ema is not None:
            self.ema.module.to(accelerator.device)
        if accelerator.is_main_process:
            log.info("fine-tuning %s (%s) on %d classes: %d steps, lr %.3g (head; block i: x %.3g^(L-i))",
                     self.model_info["timm_name"], self.config.model.weights, self.num_classes, total_steps, self.lr,
                     self.config.optim.layer_decay)
            notice = self.config.data.normalisation_notice()
            if notice:
                log.warning("%s", notice)

    def hooks(self) -> list[Hook]:
        return [FinetuneValidation(self)]

    # -- per step -------------------------------------------------------------------------------
    def training_step(self, student: nn.Module, batch: Any, progress: Progress) -> StepOutput:
        images, targets = batch["image"], batch["label"]
        if self.mixup is not None:
            # Mixup's randomness is fixed by (seed, rank, micro-batch), so a resumed run mixes exactly
            # as the uninterrupted one.
            rank = self._accelerator.process_index if self._accelerator else 0
            with numpy_seeded(sample_seed(self.config.train.seed, 1_000_003 * rank + 17, progress.micro_batch)):
                images, targets = self.mixup(images, targets)
        loss = self.criterion(student(images).float(), targets)
        return StepOutput(loss, {}, images.shape[0])

    def after_optimizer_step(self, student: nn.Module, progress: Progress) -> None:
        if self.ema is None:
            return
        step = progress.step + 1
        unwrapped = unwrap(self._accelerator, student)
        if self._deepspeed:  # the module may hold bf16 copies: read DeepSpeed's fp32 masters
            ema_update(self.ema.module, unwrapped, self.ema.get_decay(step))
        else:
            self.ema.update(unwrapped, step=step)

    # -- state and outputs ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"history": self.history}
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError("--resume: the checkpoint has no EMA weights but ema.enabled=true")
            self.ema.module.load_state_dict(state["ema"])

    def exports(self) -> dict[str, Export]:
        meta = {**self.model_info, "num_classes": self.num_classes, "classes": self.classes}
        out = {FINETUNED: Export(self.student, meta)}
        if self.ema is not None:
            out[FINETUNED_EMA] = Export(self.ema.module, meta)
        return out


class FinetuneValidation(Hook):
    """Top-1 / top-5 on the validation images every ``eval.every_epochs`` epochs and at the end
    (EMA weights too); ``finetune_results.json`` when the run is over."""

    def __init__(self, task: FinetuneTask) -> None:
        self.task = task

    def on_epoch_end(self, loop: Any) -> None:
        done = loop.state.epoch
        if done % self.task.config.eval.every_epochs == 0 or loop.state.step >= loop.last_step:
            self.validate(loop, done)

    def on_train_end(self, loop: Any) -> None:
        history = self.task.history
        if not history or history[-1]["step"] != loop.state.step:
            self.validate(loop, loop.state.epoch)

    def validate(self, loop: Any, epoch: int) -> None:
        task, acc = self.task, loop.accelerator
        cfg = task.config
        show = acc.is_main_process and cfg.train.progress_bar

        def loader() -> Any:
            return task.val_images.eval_loader(cfg.eval.batch_size, acc.process_index, acc.num_processes,
                                               num_workers=min(cfg.data.num_workers, 4))

        row: dict[str, Any] = {"step": loop.state.step, "epoch": epoch}
        res = evaluate(unwrap(acc, loop.student), loader(), acc, "val", show, loop.autocast)
        row.update({f"val/{k}": v for k, v in res.items()})
        if task.ema is not None:
            res = evaluate(task.ema.module, loader(), acc, "val (EMA)", show, loop.autocast)
            row.update({f"val_ema/{k}": v for k, v in res.items()})
        task.history.append(row)
        loop.logger.write(row, loop.state.step)
        if acc.is_main_process:
            ema = f", EMA top-1 {row['val_ema/top1']:.2f}" if task.ema is not None else ""
            log.info("epoch %d step %d: val top-1 %.2f top-5 %.2f loss %.4f%s", epoch, loop.state.step,
                     row["val/top1"], row["val/top5"], row["val/loss"], ema)

    def on_final_checkpoint(self, loop: Any, path: Any) -> None:
        task, acc = self.task, loop.accelerator
        final = task.history[-1]
        best = max(task.history, key=lambda r: r["val/top1"])
        results = {
            "weights": task.config.model.weights, "model": task.model_info, "num_classes": task.num_classes,
            "classes": task.classes, "world_size": acc.num_processes, "global_batch": loop.global_batch,
            "steps": loop.state.step, "epochs": loop.state.step / loop.steps_per_epoch,
            "final": {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("val/")},
            "best": {"epoch": best["epoch"], "step": best["step"], "top1": best["val/top1"], "top5": best["val/top5"]},
            "history": task.history, "load": task.load_report, "skipped_steps": loop.state.skipped_steps,
            "weights_file": str(loop.run_dir / FINETUNED),
        }
        if task.ema is not None:
            results["final_ema"] = {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("val_ema/")}
            results["weights_file_ema"] = str(loop.run_dir / FINETUNED_EMA)
        if acc.is_main_process:
            write_json_atomic(eval_results(loop.run_dir, "finetune"), results, indent=1)
            log.info("final val top-1 %.2f top-5 %.2f (best top-1 %.2f at epoch %d); wrote %s and %s",
                     results["final"]["top1"], results["final"]["top5"], results["best"]["top1"],
                     results["best"]["epoch"], loop.run_dir / FINETUNED, eval_results(loop.run_dir, "finetune"))
        loop.results.update(results)


def finetuning(config: FinetuneConfig, resume: str | None = None, hooks: tuple[Hook, ...] = (),
               resume_elastic: bool = False) -> Trainer:
    """The loop for a fine-tuning recipe; ``fit()`` returns the results (also ``finetune_results.json``)."""
    return Trainer(config, lambda: FinetuneTask(config), resume=resume, hooks=hooks, resume_elastic=resume_elastic)


# --------------------------------------------------------------------------------------------
# run_eval.py finetune
# --------------------------------------------------------------------------------------------


@dataclass
class FinetuneOptions:
    config: str = field(default="", metadata={"help": "fine-tuning recipe (configs/finetune_*.yaml)"})
    overrides: list[str] = field(default_factory=list, metadata={
        "help": "dotted overrides, e.g. data.path=... data.val_path=... optim.lr=1e-3", "positional": True,
        "metavar": "section.key=value"})
    resume: str = field(default="", metadata={
        "help": "'auto' continues the latest checkpoint in train.output_dir; or a checkpoint/run directory"})
    resume_elastic: bool = field(default=False, metadata={
        "help": "let the resumed run use another global batch than the checkpoint (position and schedules "
                "re-derived from the images seen)", "switch": True})
    print_config: bool = field(default=False, metadata={"help": "print the resolved config as YAML and exit",
                                                        "switch": True})


@register_protocol("finetune", FinetuneOptions, output="run",
                   help="full fine-tuning with a fresh classifier (BEiT / FD recipe: layer decay, RandAugment, "
                        "mixup/cutmix, drop path)")
def finetune_protocol(weights: Weights, options: FinetuneOptions, ctx: EvalContext) -> dict[str, Any]:
    """The recipe's ``model.weights`` / ``model.*`` / ``train.output_dir`` / ``train.cpu`` come from
    ``--weights`` / ``--model.*`` / ``--out`` / ``--cpu`` when given; the loop makes its own Accelerator."""
    if weights.format != "timm":
        raise ValueError(f"finetune reads exports, run directories and timm-format files; convert a "
                         f"{weights.format} file first: run_eval.py export --weights FILE --weights-format "
                         f"{weights.format} --model.name NAME --out export.safetensors")
    overrides = list(options.overrides)
    if weights.spec:
        overrides.append(f"model.weights={weights.spec}")
    if weights.model is not None:
        m = weights.model
        overrides += [f"model.name={m.name}", f"model.kwargs={json.dumps(m.kwargs)}"]
        overrides += [f"model.{k}={getattr(m, k)}" for k in ("img_size", "patch_size") if getattr(m, k) is not None]
    if ctx.out is not None:
        overrides.append(f"train.output_dir={ctx.out}")
    if ctx.cpu:
        overrides.append("train.cpu=true")
    config = load_finetune_config(options.config or None, overrides)
    if options.print_config:
        print(config.to_yaml(), end="")
        return {}
    return finetuning(config, resume=options.resume or None, resume_elastic=options.resume_elastic).fit()
