"""The one training loop. It knows no method and no evaluation: a :class:`~selfdistill.engine.task.Task`
supplies the networks, the data, the loss of a batch, its optimizer and schedule; hooks listen from
outside. The loop owns data order, precision, accumulation, finiteness on all ranks, logging,
checkpoints and resume, for pretraining and fine-tuning alike.

    trainer = Trainer(config, lambda: MyTask(config), resume="auto", hooks=[...])
    trainer.fit()

``config`` is a recipe root with a ``train`` section (:class:`~selfdistill.config.TrainConfig`),
``data.max_bad_fraction``, ``optim.clip_grad`` and ``to_yaml()`` / ``to_dict()``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from selfdistill.atomic import write_json_atomic, write_text_atomic
from selfdistill.data import BadSampleTracker
from selfdistill.engine import bad_images
from selfdistill.engine import checkpoint as ckpt
from selfdistill.engine import provenance
from selfdistill.engine.distributed import configure_deepspeed, gather_objects, make_accelerator, uses_deepspeed
from selfdistill.engine.elastic import Layout, plan_resume
from selfdistill.engine.logger import RunLogger, progress_bar
from selfdistill.engine.memory import keep_freed_memory
from selfdistill.engine.preemption import Preempted, StopFlag, watch_signals
from selfdistill.engine.prefetch import DeviceBatches
from selfdistill.engine.task import Hook, Progress, Task
from selfdistill.engine.trackers import start_trackers
from selfdistill.rundir import CONFIG, LOOP_STATE, SUMMARY

log = logging.getLogger("selfdistill")

__all__ = ["LoopState", "NonFiniteLossError", "Preempted", "Trainer", "compile_backbones"]


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
    world_size: int = 1  # the batch layout the state belongs to (resuming on another one: engine.elastic)
    batch_size_per_device: int = 0
    grad_accum_steps: int = 0
    bad: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Trainer:
    """The loop. ``make_task`` is called once the Accelerator exists and every rank is seeded
    alike (identical initial weights); ``data(task)``, when given, replaces the task's training
    images (``train_source`` and ``finish`` as :class:`~selfdistill.data.ImageSet`; a benchmark
    serves one synthetic batch); ``check_data`` decodes every training image once
    before the first step; ``resume_elastic`` lets a resume change the global batch;
    ``keep_process_group`` leaves the ranks' process group up when the run ends. A config root may
    name the sections a resume must match (``recipe_sections``, default ``model`` and ``method``)."""

    def __init__(self, config: Any, make_task: Callable[[], Task], resume: str | None = None,
                 hooks: Sequence[Hook] = (), data: Callable[[Task], Any] | None = None,
                 check_data: bool = False, resume_elastic: bool = False, keep_process_group: bool = False) -> None:
        self.config = config
        self.make_task = make_task
        self.resume = resume
        self.run_dir = Path(config.train.output_dir)
        self.extra_hooks = list(hooks)
        self.data = data
        self.check_data = check_data
        self.resume_elastic = resume_elastic
        self.keep_process_group = keep_process_group
        self.results: dict[str, Any] = {}  # what hooks report at the end (fit's return value)

    # ------------------------------------------------------------------------------------------
    def build(self) -> None:
        """Accelerator, task, data, optimizer and schedule; the student prepared by Accelerate."""
        from accelerate.utils import set_seed

        t = self.config.train
        # Known before anything is built or written: the checkpoint to continue, and that it was
        # trained with this recipe. A DeepSpeed checkpoint of another rank count is read in
        # DeepSpeed's universal format, which the engine must be configured for (below).
        self.resume_from = ckpt.resolve_resume(self.resume, self.run_dir)
        if self.resume_from is not None:
            ckpt.check_same_recipe(self.resume_from, self.config.to_dict(),
                                   getattr(self.config, "recipe_sections", ckpt.RECIPE_SECTIONS))
        self.accelerator = acc = make_accelerator(t.precision, t.grad_accum_steps, t.cpu, t.trackers, str(self.run_dir))
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if acc.device.type == "cpu" and t.keep_freed_memory:
            keep_freed_memory()
        set_seed(t.seed)  # identical initialisation on every rank
        self.task = task = self.make_task()
        set_seed(t.seed + acc.process_index)  # then per-rank randomness (drop path)

        self.images = images = self.data(task) if self.data is not None else task.train_data()
        self.source = images.train_source(t.batch_size_per_device, acc.process_index, acc.num_processes,
                                          task.collate_fn(), t.overfit_batches, acc.device.type == "cuda")
        self.steps_per_epoch = self.source.batches_per_epoch // t.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(f"one epoch has {self.source.batches_per_epoch} batches per device, fewer than "
                             f"train.grad_accum_steps={t.grad_accum_steps}")
        self.total_steps = t.epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, t.max_steps) if t.max_steps else self.total_steps
        self.layout = Layout(acc.num_processes, t.batch_size_per_device, t.grad_accum_steps)
        self.global_batch = self.layout.global_batch

        optimizer = task.build_optimizer(self.global_batch, acc.device)
        if t.compile:
            compile_backbones(task)
        self.universal = uses_deepspeed() and self.resume_from is not None and \
            ckpt.is_deepspeed_checkpoint(self.resume_from) and \
            ckpt.saved_layout(self.resume_from).world_size != self.layout.world_size
        configure_deepspeed(acc, t.batch_size_per_device, self.config.optim.clip_grad, t.precision, self.universal)
        self.student, self.optimizer = acc.prepare(task.student, optimizer)
        self.deepspeed = getattr(acc.state, "deepspeed_plugin", None) is not None
        self.scheduler = task.build_scheduler(self.optimizer, self.steps_per_epoch, self.total_steps, self.global_batch)
        task.setup(acc, self.steps_per_epoch, self.total_steps)
        self.hooks = [*task.hooks(), *self.extra_hooks]
        self.bad = BadSampleTracker()
        self.state = LoopState(**asdict(self.layout))
        self.logger = RunLogger(acc, self.run_dir)
        self.stop = StopFlag()  # raised by train.preempt_signals while fit() runs
        self._saved_at: tuple[int, int, int] | None = None  # the loop position of the last checkpoint
        self._last_save_time = time.monotonic()

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Build, resume, train to the last step, write the final checkpoint and its exports;
        returns what the hooks reported (``results``). On a ``train.preempt_signals`` signal: the
        step finished on every rank, a checkpoint, then :class:`Preempted` (exit code 75)."""
        self._started = time.monotonic()
        self.build()
        acc, cfg = self.accelerator, self.config
        with watch_signals(cfg.train.preempt_signals, self.stop):
            try:
                self._fit()
            except Preempted:
                acc.end_training()
                raise
        return self.results

    def _fit(self) -> None:
        acc, cfg = self.accelerator, self.config
        resume_from = self.resume_from
        if acc.is_main_process:
            write_text_atomic(self.run_dir / CONFIG, cfg.to_yaml())
        acc.wait_for_everyone()
        if self.check_data:
            bad_images.check_images(acc, self.images, cfg.data.max_bad_fraction, cfg.train.progress_bar)
        if resume_from is not None:
            self._restore(resume_from)
        elif self.resume == "auto" and acc.is_main_process:
            log.info("--resume auto: no checkpoint in %s, starting fresh", self.run_dir)
        if resume_from is not None and self.state.step >= self.last_step and acc.is_main_process:
            log.info("%s is already finished (step %d of %d): nothing to train; raise train.epochs (or "
                     "train.max_steps) to train further", self.run_dir, self.state.step, self.last_step)
        self._record_provenance(resume_from)
        # one door for every tracker: tracker_kwargs mapped, a resumed run continues its tracker runs
        start_trackers(acc, self.run_dir, cfg.train, self.task.tracker_project, flat_config(cfg.to_dict()),
                       resuming=resume_from is not None)
        self._last_save_time = time.monotonic()
        self._emit("on_train_start")
        self.run_until(self.last_step)
        self._emit("on_train_end")
        final = ckpt.checkpoint_dir(self.run_dir, self.state.step)
        if not all((final / name).is_file() for name in [LOOP_STATE, *self.task.exports()]):
            self.save()  # (also a checkpoint written before checkpoints held their exports)
        self._bad_images().check(cfg.data.max_bad_fraction, cfg.data.bad_check_after,
                                 whole=self.state.batch_in_epoch == 0)
        if acc.is_main_process:
            ckpt.publish_exports(final, self.run_dir, list(self.task.exports()))
        acc.wait_for_everyone()
        self._emit("on_final_checkpoint", final)
        if acc.is_main_process:
            self._report_end()
        if self.keep_process_group:  # more work follows in this process (the linear probe inside an evaluation)
            for tracker in acc.trackers:
                tracker.finish()
        else:
            acc.end_training()

    def _report_end(self) -> dict[str, Any]:
        """``<run>/summary.json`` and one line on stdout: steps, final loss, the last evaluation's top-1
        (online kNN, fine-tuning validation), the exports and this launch's wall time."""
        rows = [json.loads(line) for line in (self.logger.path.read_text().splitlines()
                                              if self.logger.path.is_file() else []) if line.strip()]
        train_rows = [r for r in rows if "loss" in r and "event" not in r]
        evals = [r for r in rows if any("/top1" in k for k in r)]
        top1 = {k: v for k, v in evals[-1].items() if "/top1" in k} if evals else {}
        shown = next((k for k in ("knn/top1_k20", "val/top1") if k in top1), next(iter(sorted(top1)), None))
        exports = [str(self.run_dir / name) for name in self.task.exports()]
        seconds = time.monotonic() - self._started
        summary = {"task": self.task.name, "run_dir": str(self.run_dir), "steps": self.state.step,
                   "epochs": round(self.state.step / self.steps_per_epoch, 4),
                   "final_loss": train_rows[-1]["loss"] if train_rows else None,
                   "final_loss_step": train_rows[-1]["step"] if train_rows else None,
                   "last_eval": ({"step": evals[-1]["step"], "epoch": evals[-1].get("epoch"), **top1}
                                 if evals else None),
                   "exports": exports, "wall_time_s": round(seconds, 3)}
        write_json_atomic(self.run_dir / SUMMARY, summary, indent=1)
        parts = [f"{self.task.name} done: {self.state.step} steps ({summary['epochs']:g} epochs)"]
        if summary["final_loss"] is not None:
            parts.append(f"final loss {summary['final_loss']:.4f}")
        if shown is not None:
            parts.append(f"{shown} {top1[shown]:.2f}")
        if exports:
            parts.append(f"export {exports[0]}")
        parts.append(f"wall time {time.strftime('%H:%M:%S', time.gmtime(seconds))}")
        print(", ".join(parts) + f" (summary: {self.run_dir / SUMMARY})", flush=True)
        return summary

    def run_until(self, last_step: int) -> None:
        """Train epoch after epoch until ``last_step`` optimizer steps are done; at each whole
        epoch's end the hooks run, then the epoch checkpoint (``train.checkpoint_every_epochs``)."""
        t = self.config.train
        if self.state.step >= last_step:  # a finished run resumed: said once by _fit, no full bar
            return
        bar = progress_bar(last_step, self.task.name, self.accelerator.is_main_process and t.progress_bar,
                           initial=self.state.step)
        try:
            while self.state.step < last_step:
                self._train_epoch(bar, last_step)
                if self.state.batch_in_epoch:  # stopped inside an epoch
                    break
                self._bad_images().check(self.config.data.max_bad_fraction, whole=True)  # exact over whole epochs
                self._emit("on_epoch_end")
                every = t.checkpoint_every_epochs
                if every and self.state.epoch % every == 0 and \
                        not ckpt.checkpoint_dir(self.run_dir, self.state.step).exists():
                    self.save()
        finally:
            bar.close()

    # ------------------------------------------------------------------------------------------
    def _train_epoch(self, bar: Any, last_step: int) -> None:
        acc, t, st = self.accelerator, self.config.train, self.state
        micro_per_epoch = self.steps_per_epoch * t.grad_accum_steps
        step_ok, stop, due, grad_norm = True, False, False, None
        data_iter = DeviceBatches(self.source.loader(st.epoch, st.batch_in_epoch), acc.device, self.images.finish)
        while st.batch_in_epoch < micro_per_epoch and st.step < last_step:
            self._emit("on_step_start")
            t0 = time.perf_counter()
            host, batch = next(data_iter)
            t_data = time.perf_counter() - t0
            self._emit("on_batch", host)
            self._emit("on_phase_end", "data")
            values = self.scheduler.step_update(st.step)
            progress = Progress(st.step, st.epoch, self.steps_per_epoch, self.total_steps,
                                st.epoch * micro_per_epoch + st.batch_in_epoch)
            with acc.accumulate(self.student):
                with self.autocast():
                    out = self.task.training_step(self.student, batch, progress)
                finite, stop_now, due_now = self._agree(out.loss)
                step_ok &= finite
                stop, due = stop or stop_now, due or due_now
                self._emit("on_phase_end", "forward")
                norm = self._backward_and_step(out.loss, finite, step_ok)
                grad_norm = norm if norm is not None else grad_norm
            st.batch_in_epoch += 1
            st.samples_seen += out.batch_size
            self.bad.update(batch.get("bad", []), batch.get("draws", out.batch_size), batch.get("bad_draws", 0))
            self.logger.accumulate(out, t_data, time.perf_counter() - t0, finite)
            if not acc.sync_gradients:
                continue
            stepped, step_ok = step_ok, True
            if stepped:
                self.task.after_optimizer_step(self.student, progress)
                self._emit("on_phase_end", "ema")
                st.nonfinite_in_a_row = 0
                st.step += 1
                bar.update(1)
            else:
                self._on_nonfinite()
            epoch_done = st.batch_in_epoch >= micro_per_epoch
            if epoch_done:
                st.epoch += 1
                st.batch_in_epoch = 0
            if stepped and (st.step % t.log_every == 0 or st.step == last_step):
                self._log(values, progress, grad_norm, bar)
            if stepped and st.step % t.checkpoint_every == 0 and st.step < last_step:
                self.save()
            if stop and st.step < last_step:  # (at the last step the run simply finishes)
                self._preempt()
            if due and stepped and st.step < last_step:  # train.checkpoint_every_minutes
                self.save()
                due = False
            if epoch_done:
                return

    def _backward_and_step(self, loss: torch.Tensor, finite: bool, step_ok: bool) -> Any:
        """Backward, and at the end of an accumulation window the optimizer step (skipped when a
        loss of the window was non-finite); returns the pre-clipping gradient norm of a step."""
        acc, grad_norm = self.accelerator, None
        if self.deepspeed:
            # DeepSpeed steps inside backward() at the window's end and keeps its own gradient
            # accumulators, so a bad micro-batch cannot simply be left out: its non-finite
            # gradients go in, and DeepSpeed's overflow check skips the step and clears them.
            acc.backward(loss)
            self._emit("on_phase_end", "backward")  # DeepSpeed's optimizer step included
            if acc.sync_gradients and step_ok:
                grad_norm = self.student.get_global_grad_norm()  # before clipping, as DDP logs it
            elif acc.sync_gradients and self.student.was_step_applied():
                raise NonFiniteLossError("DeepSpeed applied an optimizer step although a loss was "
                                         "non-finite; keep bf16.check_grad_overflow enabled")
            return grad_norm
        if finite:
            acc.backward(loss)
        self._emit("on_phase_end", "backward")
        if acc.sync_gradients and step_ok:
            if self.config.optim.clip_grad > 0:
                grad_norm = acc.clip_grad_norm_(self.student.parameters(), self.config.optim.clip_grad)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._emit("on_phase_end", "optimizer")
        return grad_norm

    def _log(self, values: dict[str, float], progress: Progress, grad_norm: Any, bar: Any) -> None:
        st = self.state
        bad = self._bad_images()
        row_values = {**values, **self.task.schedule_values(progress), "skipped_steps": st.skipped_steps,
                      "bad_images": bad.n_bad}
        if grad_norm is not None:
            row_values["grad_norm"] = grad_norm
        row = self.logger.flush(st.step, st.step / self.steps_per_epoch, row_values)
        if row:
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{values.get('lr', 0.0):.2e}")
        bad.check(self.config.data.max_bad_fraction, self.config.data.bad_check_after)

    def _emit(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    # ------------------------------------------------------------------------------------------
    def autocast(self) -> Any:
        """Accelerate's autocast, except under DeepSpeed, where Accelerate gives none: the engine holds
        bf16/fp16 weights and plain fp32 modules (a teacher) share the inputs, so both run under torch's."""
        precision = self.config.train.precision
        if self.deepspeed and precision != "fp32":
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            return torch.autocast(device_type=self.accelerator.device.type, dtype=dtype)
        return self.accelerator.autocast()

    def _agree(self, loss: torch.Tensor) -> tuple[bool, bool, bool]:
        """One host sync per micro-batch, agreed by all ranks so no rank acts alone: is the loss
        finite everywhere, has any rank been asked to stop (a signal may reach one node only), is a
        timed checkpoint due (rank 0's clock decides)."""
        minutes = self.config.train.checkpoint_every_minutes
        due = self.accelerator.is_main_process and minutes > 0 and \
            time.monotonic() - self._last_save_time >= 60 * minutes
        flags = torch.cat([(~torch.isfinite(loss.detach())).float().reshape(1),
                           torch.tensor([float(bool(self.stop)), float(due)], device=loss.device)])
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        nonfinite, stop, due_anywhere = flags.tolist()
        return nonfinite == 0, stop > 0, due_anywhere > 0

    def _preempt(self) -> None:
        """Collective: the checkpoint of this step (unless just written), then :class:`Preempted`."""
        st = self.state
        path = self.save()
        heard = gather_objects(self.accelerator,
                               (self.stop.name, time.monotonic() - self.stop.at) if self.stop else None)
        name, seconds = max((h for h in heard if h), key=lambda h: h[1])  # from the first rank to hear it
        self.logger.write({"event": "preempted", "signal": name, "step": st.step, "epoch": st.epoch,
                           "checkpoint_seconds_after_signal": round(seconds, 3)}, st.step, track=False)
        raise Preempted(name, st.step, path, seconds)

    def _on_nonfinite(self) -> None:
        st = self.state
        st.nonfinite_in_a_row += 1
        st.skipped_steps += 1
        self.task.skip_step()
        if self.accelerator.is_main_process:
            log.warning("non-finite loss at step %d: the step (and the task's updates after it) skipped, %d in a "
                        "row", st.step, st.nonfinite_in_a_row)
        if st.nonfinite_in_a_row >= self.config.train.max_nonfinite_steps:
            last = ckpt.latest_checkpoint(self.run_dir)
            raise NonFiniteLossError(
                f"{st.nonfinite_in_a_row} non-finite losses in a row at step {st.step} "
                f"(train.max_nonfinite_steps={self.config.train.max_nonfinite_steps}); stopping. "
                f"Last good checkpoint: {last or 'none yet'}. Lower optim.lr or raise optim.warmup_epochs.")

    def _record_provenance(self, resumed_from: Path | None) -> None:
        """Collective: this launch's code, packages, command lines and hosts, appended to the run's
        ``provenance.json`` (the run directory says what produced it)."""
        acc = self.accelerator
        ranks = gather_objects(self.accelerator, provenance.rank_record())
        if acc.is_main_process:
            if self.deepspeed:
                stage = acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
                distributed = f"deepspeed zero-{stage}"
            else:
                distributed = "ddp" if acc.num_processes > 1 else "single process"
            provenance.record_launch(self.run_dir, provenance.launch_record(
                acc, ranks, str(resumed_from) if resumed_from else None, self.state.step, distributed))

    def _bad_images(self) -> BadSampleTracker:
        """Collective: every rank's unreadable images, each file once."""
        return bad_images.all_ranks(self.accelerator, self.bad)

    # ------------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Collective: a checkpoint at the current step (student, optimizer, RNG, task state,
        loop position, exports); none again at a position already saved."""
        st = self.state
        self._last_save_time = time.monotonic()
        if self._saved_at == (st.step, st.epoch, st.batch_in_epoch):
            return ckpt.checkpoint_dir(self.run_dir, st.step)
        st.bad = self._bad_images().state_dict()  # every rank's, so any rank count can resume it
        path = ckpt.save_checkpoint(self.accelerator, self.run_dir, st.step, self.task.state_dict(), st.to_dict(),
                                    self.config.to_yaml(), self.config.train.keep_checkpoints, self.task.exports())
        self._saved_at = (st.step, st.epoch, st.batch_in_epoch)
        return path

    def _say_schedule_change(self, path: Path) -> None:
        """One line when the recipe's length differs from the checkpoint's: another ``train.epochs``
        re-derives the schedules (learning rate, weight decay, teacher momentum and temperature) for
        the new length; another ``train.max_steps`` only moves the end."""
        t, saved = self.config.train, ckpt.saved_train_config(path)
        changed = [k for k in ("epochs", "max_steps") if k in saved and saved[k] != getattr(t, k)]
        if changed and self.accelerator.is_main_process:
            what = "the schedules are re-derived for" if "epochs" in changed else "the schedules still span"
            log.warning("resuming with %s (checkpoint %s): %s %d steps; the run now ends at step %d",
                        ", ".join(f"train.{k} {saved[k]} -> {getattr(t, k)}" for k in changed), path.name, what,
                        self.total_steps, self.last_step)

    def _restore(self, path: Path) -> None:
        """Collective: continue from checkpoint ``path``, on this batch layout (refused before
        anything is loaded when the global batch changed without ``resume_elastic``)."""
        state, change = plan_resume(ckpt.read_loop_state(path), ckpt.saved_layout(path), self.layout,
                                    self.steps_per_epoch, self.resume_elastic)
        self._say_schedule_change(path)
        self.task.load_state_dict(ckpt.load_checkpoint(self.accelerator, path, self.universal))
        self.state = LoopState(**{**state, **asdict(self.layout)})
        if self.accelerator.is_main_process:  # the saved counts are every rank's already
            self.bad.load_state_dict(self.state.bad)
        dropped = self.logger.truncate_after(self.state.step)
        self.logger.write({"event": "resumed", "step": self.state.step, "epoch": self.state.epoch,
                           "checkpoint": str(path), "world_size": self.accelerator.num_processes,
                           "dropped_log_rows": dropped, **({"layout_change": change} if change else {})},
                          self.state.step, track=False)
        if self.accelerator.is_main_process:
            log.info("resumed from %s (step %d, epoch %d)%s", path, self.state.step, self.state.epoch,
                     f"; {dropped} log rows past it (trained again now) dropped" if dropped else "")
            if change:
                log.warning("%s", change)


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TensorBoard hparams accept only scalars: flatten and stringify the rest."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(flat_config(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            flat[key] = v
        else:
            flat[key] = str(v)
    return flat


def compile_backbones(task: Task) -> int:
    """``torch.compile`` every timm backbone inside the task's networks, in place (``Module.compile``:
    parameter names, checkpoints and exports stay as they are). Returns how many were compiled."""
    from selfdistill.models import Backbone

    seen: set[int] = set()
    for value in vars(task).values():
        if not isinstance(value, torch.nn.Module):
            continue
        for module in value.modules():
            if isinstance(module, Backbone) and id(module) not in seen:
                seen.add(id(module))
                module.compile()  # the Backbone's own call (forward_features + pooling), as methods call it
    return len(seen)
