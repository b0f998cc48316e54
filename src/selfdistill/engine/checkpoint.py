"""Checkpoints: one directory per optimizer step, written under a temporary name and renamed.

Accelerate's ``save_state`` holds the student, optimizer and every rank's RNG state (and, under
DeepSpeed, the ZeRO partitions). Beside it: the task's own state (EMA teacher, centers, history)
and the loop's position as plain tensors / JSON, read back with ``weights_only=True`` (Accelerate's
``register_for_checkpointing`` would unpickle them), and the task's exports (the networks the run
publishes, full fp32 weights whatever the backend), so reading a checkpoint's weights never needs
the method that wrote it. A DeepSpeed checkpoint resumed on another rank count is read through
DeepSpeed's universal checkpoint, converted once into the checkpoint's ``universal/``.

Where checkpoints lie and what their files are called is :mod:`selfdistill.rundir`'s; its
finders (``checkpoint_dir``, ``latest_checkpoint``...) are offered here too, beside the readers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from selfdistill.atomic import atomic_path, torch_save_atomic, write_json_atomic, write_text_atomic
from selfdistill.configkit import ConfigError
from selfdistill.engine.elastic import Layout
from selfdistill.models.weights import read_meta, save_weights, write_sidecar
from selfdistill.params import full_state_dict
from selfdistill.rundir import (CONFIG, DEEPSPEED_TAG, LOOP_STATE, OLD_TASK_STATE, TASK_STATE, UNIVERSAL,
                                checkpoint_dir, checkpoint_step, latest_checkpoint, list_checkpoints)

__all__ = ["FREE_KEYS", "RECIPE_KEYS", "RECIPE_SECTIONS", "check_same_recipe", "checkpoint_dir", "checkpoint_step",
           "is_deepspeed_checkpoint", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "load_task_state",
           "publish_exports", "read_loop_state", "resolve_resume", "save_checkpoint", "saved_layout",
           "saved_train_config", "student_state", "universal_checkpoint"]

log = logging.getLogger(__name__)


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """``auto`` -> latest checkpoint of the run (or None); a path -> that checkpoint (must exist)."""
    if resume in (None, "", "none", "no"):
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if path.is_dir() and (path / LOOP_STATE).is_file():
        return path
    if path.is_dir() and latest_checkpoint(path) is not None:  # a run directory
        return latest_checkpoint(path)
    raise FileNotFoundError(f"--resume {resume}: not a checkpoint directory (no {LOOP_STATE}) nor a run directory")


# What a checkpoint's networks and optimizer state are made of: resuming it with other values would
# fail deep inside Accelerate (a size mismatch) or, worse, quietly train another recipe. The rest
# (data, schedule lengths, logging, precision, the batch layout: engine.elastic) may change.
RECIPE_SECTIONS = ("model", "method")
RECIPE_KEYS = ("optim.name",)
FREE_KEYS = ("model.grad_checkpointing", "model.channels_last", "model.pretrained", "model.pretrained_format")


def check_same_recipe(path: str | Path, config: dict[str, Any], sections: tuple[str, ...] = RECIPE_SECTIONS) -> None:
    """Refuse to resume checkpoint ``path`` under ``config`` (a recipe's ``to_dict()``) when they
    differ in what the checkpoint's tensors are made of (its ``sections``, ``optim.name``); one
    :class:`ConfigError` naming the keys."""
    file = Path(path) / CONFIG
    if not file.is_file():  # (a checkpoint written before checkpoints held their recipe)
        return
    import yaml

    saved, now = _flat(yaml.safe_load(file.read_text()) or {}), _flat(config)
    differ = [k for k in sorted(set(saved) | set(now))
              if (k.split(".", 1)[0] in sections or k in RECIPE_KEYS) and k not in FREE_KEYS
              and not k.startswith(tuple(f + "." for f in FREE_KEYS)) and saved.get(k) != now.get(k)]
    if differ:
        shown = "; ".join(f"{k}: {saved.get(k, 'unset')!r} there, {now.get(k, 'unset')!r} now" for k in differ[:5])
        more = f" (and {len(differ) - 5} more)" if len(differ) > 5 else ""
        raise ConfigError(f"config error: --resume: {path} was trained with another recipe: {shown}{more}; resume with the "
                         f"checkpoint's values ({file}) or start a fresh run in another train.output_dir")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"section.key.sub": leaf}``; tuples as lists, as YAML reads them back."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def save_checkpoint(accelerator: Any, run_dir: str | Path, step: int, task_state: dict[str, Any],
                    loop_state: dict[str, Any], config_yaml: str, keep: int, exports: dict[str, Any]) -> Path:
    """Collective: every rank calls it (ZeRO shards, and exports gathered under ZeRO-3). Returns the
    final checkpoint directory."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    for name, export in exports.items():
        state = full_state_dict(export.module)  # collective under ZeRO-3
        if accelerator.is_main_process:
            save_weights(state, tmp / name, export.meta)
    accelerator.wait_for_everyone()  # every rank's shards and RNG file are in tmp before it is renamed
    if accelerator.is_main_process:
        torch_save_atomic(task_state, tmp / TASK_STATE)
        write_text_atomic(tmp / CONFIG, config_yaml)
        write_json_atomic(tmp / LOOP_STATE, loop_state, indent=1)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def publish_exports(checkpoint: str | Path, run_dir: str | Path, names: list[str]) -> list[Path]:
    """Copy a checkpoint's exports into the run directory (main process only)."""
    written = []
    for name in names:
        src, dst = Path(checkpoint) / name, Path(run_dir) / name
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        write_sidecar(dst, read_meta(dst))
        written.append(dst)
    return written


def read_loop_state(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / LOOP_STATE).read_text())


def saved_train_config(path: str | Path) -> dict[str, Any]:
    """The ``train`` section a checkpoint was written with ({} when it has no config)."""
    import yaml

    file = Path(path) / CONFIG
    return (yaml.safe_load(file.read_text()) or {}).get("train", {}) if file.is_file() else {}


def saved_layout(path: str | Path) -> Layout:
    """The batch layout a checkpoint was trained with (from its own config for checkpoints written
    before the loop state recorded it)."""
    state = read_loop_state(Path(path))
    batch, accum = state.get("batch_size_per_device", 0), state.get("grad_accum_steps", 0)
    if not batch:
        train = saved_train_config(path)
        batch, accum = int(train.get("batch_size_per_device", 64)), int(train.get("grad_accum_steps", 1))
    return Layout(int(state.get("world_size", 1)), int(batch), int(accum or 1))


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    return (Path(path) / DEEPSPEED_TAG).is_dir()


def load_checkpoint(accelerator: Any, path: Path, universal: bool = False) -> dict[str, Any]:
    """Restore Accelerate's state in place; return the task state. ``universal``: a DeepSpeed
    checkpoint written by another rank count, read through DeepSpeed's universal checkpoint (the
    engine must have been built with ``checkpoint.load_universal``)."""
    if universal:
        groups = [g for opt in accelerator._optimizers for g in opt.param_groups]
        own = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        accelerator.load_state(str(universal_checkpoint(accelerator, path)))
        # Two slips of DeepSpeed's ZeRO-3 universal load (0.19), undone: every parameter group gets the
        # first group's settings (a frozen last layer would train, biases take weight decay), and every
        # parameter's Adam step counter is one shared tensor (each group's step advances it again).
        for group, settings in zip(groups, own):
            group.update(settings)
        for opt in accelerator._optimizers:
            while hasattr(opt, "optimizer"):  # Accelerate's wrapper -> DeepSpeed's -> torch's
                opt = opt.optimizer
            for state in opt.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
    else:
        accelerator.load_state(str(path))
    for model in accelerator._models:  # ZeRO-3: drop parameters the load left gathered (stale fetch trace)
        if hasattr(model, "empty_partition_cache") and getattr(model, "zero_optimization_stage", lambda: 0)() == 3:
            model.empty_partition_cache()
    return load_task_state(path)


def universal_checkpoint(accelerator: Any, path: str | Path) -> Path:
    """Collective: the DeepSpeed checkpoint ``path`` in DeepSpeed's universal format (any partition
    count), converted once by ``ds_to_universal`` into ``path/universal/`` (kept for the next resume)."""
    import subprocess
    import sys

    target = Path(path) / UNIVERSAL
    if accelerator.is_main_process and not (target / DEEPSPEED_TAG).is_dir():
        log.info("%s was written by another number of ranks: converting it to DeepSpeed's universal checkpoint "
                 "(once, into %s)", path, target)
        tmp = Path(path) / f".tmp-{UNIVERSAL}"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               str(Path(path) / DEEPSPEED_TAG), "--output_folder", str(tmp / DEEPSPEED_TAG),
               "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"ds_to_universal could not convert {path}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    accelerator.wait_for_everyone()
    return target


def load_task_state(path: str | Path) -> dict[str, Any]:
    """The task state of a checkpoint (EMA teacher, centers...), loaded with ``weights_only=True``
    (``method_state.pt``: the name pretraining checkpoints had before the one-loop redesign)."""
    file = Path(path) / TASK_STATE
    if not file.is_file() and (Path(path) / OLD_TASK_STATE).is_file():
        file = Path(path) / OLD_TASK_STATE
    return torch.load(file, map_location="cpu", weights_only=True)


def student_state(checkpoint: str | Path) -> dict[str, Any]:
    """The full fp32 student state dict of a checkpoint, whatever wrote it.

    DDP: Accelerate's ``model.safetensors``. DeepSpeed (any ZeRO stage, any rank count): the fp32
    master partitions merged by DeepSpeed's ``zero_to_fp32`` (which unpickles DeepSpeed's own
    files: only read checkpoints you trust, as for ``--resume``).
    """
    ckpt = Path(checkpoint)
    if (ckpt / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(ckpt / "model.safetensors"))
    if (ckpt / DEEPSPEED_TAG).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DEEPSPEED_TAG)
        # ZeRO-1 records no frozen parameters (e.g. DINO's weight-norm gain); ZeRO-1/2 keep the
        # whole module in the model-states file, so take them from there.
        states = ckpt / DEEPSPEED_TAG / "mp_rank_00_model_states.pt"  # ZeRO-1/2 only
        module = torch.load(states, map_location="cpu", weights_only=True)["module"] if states.is_file() else {}
        for key, value in module.items():
            if key not in state and value.numel() > 0:
                state[key] = value.float() if value.is_floating_point() else value
        return {k: v.contiguous() for k, v in state.items()}
    raise FileNotFoundError(f"{ckpt}: no student weights (neither model.safetensors nor a DeepSpeed "
                            f"{DEEPSPEED_TAG}/ directory)")
