"""Checkpoints: one directory per optimizer step, written under a temporary name and renamed.

Accelerate's ``save_state`` holds the student, optimizer and every rank's RNG state (and, under
DeepSpeed, the ZeRO partitions). Beside it: the task's own state (EMA teacher, centers, history)
and the loop's position as plain tensors / JSON, read back with ``weights_only=True`` (Accelerate's
``register_for_checkpointing`` would unpickle them), and the task's exports (the networks the run
publishes, full fp32 weights whatever the backend), so reading a checkpoint's weights never needs
the method that wrote it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from selfdistill.atomic import atomic_path, torch_save_atomic, write_json_atomic, write_text_atomic
from selfdistill.models.weights import read_meta, save_weights, write_sidecar
from selfdistill.params import full_state_dict

CHECKPOINTS = "checkpoints"
PREFIX = "step_"
TASK_STATE = "task_state.pt"
LOOP_STATE = "loop_state.json"
CONFIG = "config.yaml"
DEEPSPEED_TAG = "pytorch_model"  # the directory Accelerate's save_state gives the ZeRO files


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{PREFIX}{step:09d}"


def checkpoint_step(path: str | Path) -> int:
    return int(Path(path).name[len(PREFIX):])


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / LOOP_STATE).is_file()]
    return sorted(done, key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


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


def load_checkpoint(accelerator: Any, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore Accelerate's state in place; return (task_state, loop_state).

    Refused before anything is loaded when the checkpoint was written by another number of ranks:
    the position inside the epoch and the global batch (so every schedule) depend on it.
    """
    loop_state = read_loop_state(path)
    written_by = loop_state.get("world_size", 1)
    if written_by != accelerator.num_processes:
        raise ValueError(
            f"checkpoint {path} was written by {written_by} ranks but this run has {accelerator.num_processes}. "
            "An exact resume needs the same rank count (the position inside the epoch, the global batch and "
            "so every schedule depend on it, and ZeRO shards optimizer state per rank). To go on with "
            f"{accelerator.num_processes} ranks instead, start a new run from the consolidated weights: "
            f"`run_eval.py export --weights {path} --part student --out student.safetensors`, then "
            "`run_pretrain.py ... model.pretrained=student.safetensors` (heads, optimizer state and "
            "schedules start afresh). DeepSpeed's universal checkpoint (ds_to_universal) is not supported.")
    accelerator.load_state(str(path))
    for model in accelerator._models:  # ZeRO-3: drop parameters the load left gathered (stale fetch trace)
        if hasattr(model, "empty_partition_cache") and getattr(model, "zero_optimization_stage", lambda: 0)() == 3:
            model.empty_partition_cache()
    return load_task_state(path), loop_state


def load_task_state(path: str | Path) -> dict[str, Any]:
    """The task state of a checkpoint (EMA teacher, centers...), loaded with ``weights_only=True``
    (``method_state.pt``: the name pretraining checkpoints had before the one-loop redesign)."""
    file = Path(path) / TASK_STATE
    if not file.is_file() and (Path(path) / "method_state.pt").is_file():
        file = Path(path) / "method_state.pt"
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
