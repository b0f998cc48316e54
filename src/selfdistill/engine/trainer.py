"""The one training loop. It knows nothing about any method: a ``Method`` supplies the student,
the loss on a batch and what happens after an optimizer step; the loop owns data order,
precision, accumulation, schedules, logging, checkpoints and evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from selfdistill.config import Config
from selfdistill.data import BadSampleTracker
from selfdistill.data.sources import build_train_source
from selfdistill.engine import checkpoint as ckpt
from selfdistill.engine.distributed import configure_deepspeed, make_accelerator
from selfdistill.engine.logger import RunLogger
from selfdistill.methods import Method, Progress, build_method
from selfdistill.params import full_parameters
from selfdistill.schedules import cosine_schedule

log = logging.getLogger("selfdistill")


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class LoopState:
    """Where the loop stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    nonfinite_in_a_row: int = 0
    skipped_steps: int = 0
    samples_seen: int = 0  # on this rank
    world_size: int = 1
    bad: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Trainer:
    def __init__(self, config: Config, resume: str | None = None) -> None:
        self.config = config
        self.resume = resume
        self.run_dir = Path(config.train.output_dir)
        # Optional phase timer (benchmarks): anything with start() and mark(phase). None costs one
        # attribute test per phase boundary.
        self.step_timer: Any = None

    # ------------------------------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.config
        t = cfg.train
        self.accelerator = acc = make_accelerator(t.precision, t.grad_accum_steps, t.cpu, t.trackers, str(self.run_dir))
        if acc.device.type == "cpu" and t.keep_freed_memory:
            keep_freed_memory()
        from accelerate.utils import set_seed

        set_seed(t.seed)  # identical initialisation on every rank
        self.method: Method = build_method(cfg)
        set_seed(t.seed + acc.process_index)  # then per-rank randomness (drop path)

        self.source = self._make_source()
        self.steps_per_epoch = self.source.batches_per_epoch // t.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(f"one epoch has {self.source.batches_per_epoch} batches per device, fewer than "
                             f"train.grad_accum_steps={t.grad_accum_steps}")
        self.total_steps = t.epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, t.max_steps) if t.max_steps else self.total_steps
        self.global_batch = t.batch_size_per_device * acc.num_processes * t.grad_accum_steps
        o = cfg.optim
        self.base_lr = o.lr * self.global_batch / 256 if o.scale_lr_with_batch else o.lr
        self.warmup_steps = int(round(o.warmup_epochs * self.steps_per_epoch))

        groups = []
        for g in self.method.param_groups():
            if not g.params:
                continue  # DeepSpeed drops empty groups; we never rely on positions anyway
            groups.append({"name": g.name, "params": g.params, "lr": 0.0, "weight_decay": 0.0,
                           "apply_wd": g.weight_decay, "fixed_lr": g.fixed_lr,
                           "frozen_steps": int(round(g.frozen_epochs * self.steps_per_epoch))})
        optimizer = build_optimizer(o, groups, acc.device)
        if t.compile:
            compile_backbones(self.method)
        configure_deepspeed(acc, t.batch_size_per_device, o.clip_grad, t.precision)
        self.student, self.optimizer = acc.prepare(self.method.student, optimizer)
        self.deepspeed = getattr(acc.state, "deepspeed_plugin", None) is not None
        self.method.setup(acc, self.steps_per_epoch, self.total_steps)
        self.bad = BadSampleTracker()
        self.state = LoopState(world_size=acc.num_processes)

    def _make_source(self) -> Any:
        """The training data (a benchmark substitutes a synthetic source here)."""
        acc = self.accelerator
        return build_train_source(self.config, self.method.train_transform(), self.method.collate_fn(),
                                  acc.process_index, acc.num_processes, acc.device.type == "cuda")

    # ------------------------------------------------------------------------------------------
    def _set_schedules(self, step: int) -> tuple[float, float]:
        o = self.config.optim
        lr = cosine_schedule(step, self.total_steps, self.base_lr, o.min_lr, self.warmup_steps)
        wd = cosine_schedule(step, self.total_steps, o.weight_decay, o.weight_decay_end)
        for group in self.optimizer.param_groups:
            peak_or_lr = self.base_lr if group.get("fixed_lr") else lr
            group["lr"] = 0.0 if step < group.get("frozen_steps", 0) else peak_or_lr
            group["weight_decay"] = wd if group.get("apply_wd", True) else 0.0
        return lr, wd

    def _progress(self) -> Progress:
        return Progress(self.state.step, self.state.epoch, self.steps_per_epoch, self.total_steps)

    def _save(self) -> None:
        self.state.bad = self.bad.state_dict()
        ckpt.save_checkpoint(self.accelerator, self.run_dir, self.state.step, self.method.state_dict(),
                             self.state.to_dict(), self.config.to_yaml(), self.config.train.keep_checkpoints)

    def _restore(self, path: Path) -> None:
        method_state, loop_state = ckpt.load_checkpoint(self.accelerator, path)
        self.method.load_state_dict(method_state)
        self.state = LoopState(**loop_state)
        self.bad.load_state_dict(self.state.bad)
        if self.accelerator.is_main_process:
            log.info("resumed from %s (step %d, epoch %d)", path, self.state.step, self.state.epoch)

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        self._build()
        acc, cfg = self.accelerator, self.config
        resume_from = ckpt.resolve_resume(self.resume, self.run_dir)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        acc.wait_for_everyone()
        if resume_from is not None:
            self._restore(resume_from)
        elif self.resume == "auto" and acc.is_main_process:
            log.info("--resume auto: no checkpoint in %s, starting fresh", self.run_dir)
        if cfg.train.trackers:
            acc.init_trackers("selfdistill", config=_flat_config(cfg.to_dict()))

        self.logger = RunLogger(acc, self.run_dir)
        evaluator = None
        if cfg.knn.val_path:
            from selfdistill.eval.knn_eval import KnnSetup

            evaluator = KnnSetup.from_config(cfg, acc)
        bar = tqdm(total=self.last_step, initial=self.state.step, desc="pretrain", dynamic_ncols=True,
                   disable=not (acc.is_main_process and cfg.train.progress_bar))
        seen_indices: list[int] = []
        try:
            while self.state.step < self.last_step:
                self._train_epoch(bar, seen_indices)
                if self.state.step >= self.last_step and self.state.batch_in_epoch:
                    break
                finished_epoch = self.state.epoch - 1
                if evaluator and (finished_epoch + 1) % cfg.knn.every_epochs == 0:
                    self.logger.log_eval(evaluator.evaluate(self.method.eval_backbone()), self.state.step,
                                         finished_epoch)
        finally:
            bar.close()
        if not ckpt.checkpoint_dir(self.run_dir, self.state.step).exists():
            self._save()
        self._check_bad_images(final=True)
        summary = self._finish(seen_indices)
        acc.end_training()
        return summary

    def _train_epoch(self, bar: tqdm, seen_indices: list[int]) -> None:
        acc, t = self.accelerator, self.config.train
        st = self.state
        micro_per_epoch = self.steps_per_epoch * t.grad_accum_steps
        step_ok = True
        grad_norm = None
        data_iter = iter(self.source.loader(st.epoch, st.batch_in_epoch))
        timer = self.step_timer
        while st.batch_in_epoch < micro_per_epoch and st.step < self.last_step:
            t0 = time.perf_counter()
            if timer:
                timer.start()
            batch = next(data_iter)
            t_data = time.perf_counter() - t0
            indices = batch["index"]  # still on the host: the audit sample below needs no device sync
            batch = _to_device(batch, acc.device)
            if timer:
                timer.mark("data")
            lr, wd = self._set_schedules(st.step)
            progress = self._progress()
            with acc.accumulate(self.student):
                with self._autocast():
                    out = self.method.training_step(self.student, batch, progress)
                finite = self._all_finite(out.loss)
                step_ok &= finite
                if timer:
                    timer.mark("forward")
                if self.deepspeed:
                    # DeepSpeed steps inside backward() at the window's end and keeps its own gradient
                    # accumulators, so a bad micro-batch cannot simply be left out: its non-finite
                    # gradients go in, and DeepSpeed's overflow check skips the step and clears them.
                    acc.backward(out.loss)
                    if timer:
                        timer.mark("backward")  # DeepSpeed's optimizer step included
                    if acc.sync_gradients and step_ok:
                        grad_norm = self.student.get_global_grad_norm()  # before clipping, as DDP logs it
                    elif acc.sync_gradients and self.student.was_step_applied():
                        raise NonFiniteLossError("DeepSpeed applied an optimizer step although a loss was "
                                                 "non-finite; keep bf16.check_grad_overflow enabled")
                else:
                    if finite:
                        acc.backward(out.loss)
                    if timer:
                        timer.mark("backward")
                    if acc.sync_gradients and step_ok:
                        if self.config.optim.clip_grad > 0:
                            grad_norm = acc.clip_grad_norm_(self.student.parameters(), self.config.optim.clip_grad)
                        self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if timer:
                        timer.mark("optimizer")
            st.batch_in_epoch += 1
            st.samples_seen += out.batch_size
            if len(seen_indices) < 10_000:  # an audit sample, not the whole epoch
                seen_indices.extend(indices.tolist())
            self.bad.update(batch.get("bad", []), out.batch_size)
            self.logger.accumulate(out, t_data, time.perf_counter() - t0, finite)
            if not acc.sync_gradients:
                continue
            stepped, step_ok = step_ok, True
            if stepped:
                self.method.after_optimizer_step(self.student, progress)
                if timer:
                    timer.mark("ema")
                st.nonfinite_in_a_row = 0
                st.step += 1
                bar.update(1)
            else:
                self._on_nonfinite()
            epoch_done = st.batch_in_epoch >= micro_per_epoch
            if epoch_done:
                st.epoch += 1
                st.batch_in_epoch = 0
            if stepped and (st.step % t.log_every == 0 or st.step == self.last_step):
                values = {"lr": lr, "wd": wd, **self.method.schedule_values(progress),
                          "skipped_steps": st.skipped_steps, "bad_images": self.bad.n_bad}
                if grad_norm is not None:
                    values["grad_norm"] = grad_norm
                row = self.logger.flush(st.step, st.step / self.steps_per_epoch, values)
                if row:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
                self._check_bad_images(final=False)
            if stepped and st.step % t.checkpoint_every == 0 and st.step < self.last_step:
                self._save()
            if epoch_done:
                return

    def _autocast(self):
        """Accelerate's autocast, except under DeepSpeed, where Accelerate gives none: the engine holds
        bf16/fp16 weights and the plain fp32 teacher shares the inputs, so both run under torch's."""
        precision = self.config.train.precision
        if self.deepspeed and precision != "fp32":
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            return torch.autocast(device_type=self.accelerator.device.type, dtype=dtype)
        return self.accelerator.autocast()

    def _check_bad_images(self, final: bool) -> None:
        """Collective: the unreadable-image fraction over all ranks against data.max_bad_fraction."""
        counts = torch.tensor([float(self.bad.n_bad), float(self.bad.n_seen)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        total = BadSampleTracker()
        total.load_state_dict({**self.bad.state_dict(), "n_bad": int(counts[0]), "n_seen": int(counts[1])})
        total.check(self.config.data.max_bad_fraction, final=final)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """One host sync per micro-batch, agreed by all ranks so no rank steps alone."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        return bool(bad.item() == 0)

    def _on_nonfinite(self) -> None:
        st = self.state
        st.nonfinite_in_a_row += 1
        st.skipped_steps += 1
        self.method.skip_step()
        if self.accelerator.is_main_process:
            log.warning("non-finite loss at step %d: step and EMA skipped (%d in a row)", st.step,
                        st.nonfinite_in_a_row)
        if st.nonfinite_in_a_row >= self.config.train.max_nonfinite_steps:
            last = ckpt.latest_checkpoint(self.run_dir)
            raise NonFiniteLossError(
                f"{st.nonfinite_in_a_row} non-finite losses in a row at step {st.step} "
                f"(train.max_nonfinite_steps={self.config.train.max_nonfinite_steps}); stopping. "
                f"Last good checkpoint: {last or 'none yet'}. Lower optim.lr or raise optim.warmup_epochs.")

    def _finish(self, seen_indices: list[int]) -> dict[str, Any]:
        acc = self.accelerator
        unwrapped = acc.unwrap_model(self.student)
        names = [n for n, _ in unwrapped.named_parameters()]
        digest, per_tensor = hashlib.sha256(), {}
        for name, p in zip(names, full_parameters(unwrapped)):  # gathered under ZeRO-3
            data = p.detach().float().cpu().numpy().tobytes()
            digest.update(data)
            per_tensor[name] = hashlib.sha256(data).hexdigest()
        summary = {"rank": acc.process_index, "world_size": acc.num_processes, "step": self.state.step,
                   "samples_seen": self.state.samples_seen, "student_sha256": digest.hexdigest(),
                   "student_tensor_sha256": per_tensor, "indices_seen": seen_indices, "bad_images": self.bad.n_bad}
        (self.run_dir / f"rank_summary_{acc.process_index}.json").write_text(json.dumps(summary))
        acc.wait_for_everyone()
        if acc.is_main_process:
            from selfdistill.export import export_backbone, export_from_checkpoint
            from selfdistill.plots import plot_training_curves

            export = self.run_dir / "export"
            final = ckpt.checkpoint_dir(self.run_dir, self.state.step)
            if self.method.eval_backbone() is self.method.student_backbone():  # SimSiam, SMD: the student
                export_from_checkpoint(final, export / "teacher_backbone.safetensors", part="eval")
            else:
                export_backbone(self.method.eval_backbone(), self.config.model, export / "teacher_backbone.safetensors")
            # From the final checkpoint, so ZeRO partitions are consolidated to full fp32 weights.
            export_from_checkpoint(final, export / "student_backbone.safetensors", part="student")
            plot_training_curves(self.run_dir / "log.jsonl", self.run_dir / "loss_curve.png")
        acc.wait_for_everyone()
        return summary


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [_to_device(v, device) for v in batch]
    return batch


def _flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TensorBoard hparams accept only scalars: flatten and stringify the rest."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(_flat_config(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            flat[key] = v
        else:
            flat[key] = str(v)
    return flat


def build_optimizer(o: Any, groups: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    """AdamW or SGD over named groups. ``optim.fused`` uses PyTorch's fused kernels (one pass over
    each tensor on CPU and GPU) instead of the default (a Python loop over tensors on CPU)."""
    kw: dict[str, Any] = {"fused": True} if o.fused and device.type in ("cpu", "cuda") else {}
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=o.betas, **kw)
    return torch.optim.SGD(groups, lr=0.0, momentum=o.momentum, **kw)


def compile_backbones(method: Method) -> int:
    """``torch.compile`` every timm model inside the method's networks, in place (``Module.compile``:
    parameter names, checkpoints and exports stay as they are). Returns how many were compiled."""
    from selfdistill.models import Backbone

    seen: set[int] = set()
    for value in vars(method).values():
        if not isinstance(value, torch.nn.Module):
            continue
        for module in value.modules():
            if isinstance(module, Backbone) and id(module) not in seen:
                seen.add(id(module))
                module.compile()  # the Backbone's own call (forward_features + pooling), as methods call it
    return len(seen)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process instead of returning it to the system.

    Activations are freed and allocated again every step; by default glibc serves large blocks
    with fresh ``mmap`` pages, so every step pays page faults and zeroing (5-8% of a CPU step
    here). Not done when the user set any ``MALLOC_*`` variable (e.g. to measure live memory) or
    the C library is not glibc. Returns whether the settings were applied.
    """
    import ctypes
    import ctypes.util
    import os

    if any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = mallopt(m_mmap_threshold, 1 << 30)  # blocks up to 1 GiB come from the heap (reusable)
    ok &= mallopt(m_trim_threshold, 1 << 62)  # never shrink the heap
    ok &= mallopt(m_top_pad, 256 << 20)  # grow it in 256 MiB steps
    return bool(ok)
