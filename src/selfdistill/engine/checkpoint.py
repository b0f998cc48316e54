"""Checkpoints: one directory per optimizer step, written atomically (temporary name + rename).

Accelerate's ``save_state`` holds the student, optimizer and every rank's RNG state (and, under
DeepSpeed, the ZeRO partitions). The method's own state (EMA teacher, centers) and the loop's
position are written beside it as plain tensors/JSON and read back with ``weights_only=True``;
Accelerate's ``register_for_checkpointing`` would unpickle them with ``weights_only=False``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"
PREFIX = "step_"
METHOD_STATE = "method_state.pt"
LOOP_STATE = "loop_state.json"
CONFIG = "config.yaml"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{PREFIX}{step:09d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / LOOP_STATE).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(accelerator: Any, run_dir: str | Path, step: int, method_state: dict[str, Any],
                    loop_state: dict[str, Any], config_yaml: str, keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank's shards and RNG file are in tmp before it is renamed
    if accelerator.is_main_process:
        torch.save(method_state, tmp / METHOD_STATE)
        (tmp / CONFIG).write_text(config_yaml)
        _write_atomic(tmp / LOOP_STATE, json.dumps(loop_state, indent=1).encode())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_loop_state(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / LOOP_STATE).read_text())


def load_checkpoint(accelerator: Any, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore Accelerate's state in place; return (method_state, loop_state).

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
            f"`run_eval.py export --checkpoint {path} --part student --out student.safetensors`, then "
            "`run_pretrain.py ... model.pretrained=student.safetensors` (heads, optimizer state and "
            "schedules start afresh). DeepSpeed's universal checkpoint (ds_to_universal) is not supported.")
    accelerator.load_state(str(path))
    for model in accelerator._models:  # ZeRO-3: drop parameters the load left gathered (stale fetch trace)
        if hasattr(model, "empty_partition_cache") and getattr(model, "zero_optimization_stage", lambda: 0)() == 3:
            model.empty_partition_cache()
    return load_method_state(path), loop_state


def load_method_state(path: str | Path) -> dict[str, Any]:
    """The method state of a checkpoint (for export / evaluation), loaded with ``weights_only=True``."""
    return torch.load(Path(path) / METHOD_STATE, map_location="cpu", weights_only=True)
