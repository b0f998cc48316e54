"""The layout of a run directory, known here only: every other module asks this one for the name
or path of what a run keeps, so a file is renamed in one place and readers never guess.

    <run>/config.yaml  log.jsonl  provenance.json  summary.json  loss_curve.png  trackers.json
    <run>/tensorboard/  pictures/  eval_summary/summary.json  <protocol>_results.json  <protocol>/
    <run>/export/{teacher,student}_backbone.safetensors      (the run's final exports)
    <finetune run>/finetuned.safetensors  finetuned_ema.safetensors  finetune_results.json
    <run>/checkpoints/step_000001000/  (Accelerate's state, task_state.pt, loop_state.json,
                                        config.yaml, export/...; universal/ for DeepSpeed)

Nothing here reads or writes a file's contents; it imports nothing of the project.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CHECKPOINTS", "CONFIG", "DEEPSPEED_TAG", "EVAL_SUMMARY", "EXPORTS", "EXPORT_DIR", "FINETUNED", "FINETUNED_EMA",
    "LOG", "LOOP_STATE", "LOSS_CURVE", "OLD_TASK_STATE", "PICTURES", "PREFIX", "PROVENANCE", "SUMMARY", "TASK_STATE",
    "TENSORBOARD", "TRACKER_IDS", "UNIVERSAL", "checkpoint_dir", "checkpoint_step", "eval_dir", "eval_results",
    "eval_summary", "is_run_dir", "latest_checkpoint", "list_checkpoints", "rank_summary", "step_dirs",
]

# The run directory's own files
CONFIG = "config.yaml"  # the recipe (also in every checkpoint)
LOG = "log.jsonl"  # one JSON row per logged step or evaluation
PROVENANCE = "provenance.json"  # one record per launch
SUMMARY = "summary.json"  # the end-of-run summary
LOSS_CURVE = "loss_curve.png"
TRACKER_IDS = "trackers.json"  # the tracker run ids a resumed run continues
TENSORBOARD = "tensorboard"  # TensorBoard's event directory
PICTURES = "pictures"  # the picture protocols' default output directory
EVAL_SUMMARY = "eval_summary"  # the summary protocol's default output directory

# Exports: the networks a run (and each checkpoint) publishes
EXPORT_DIR = "export"
EXPORTS = {"eval": f"{EXPORT_DIR}/teacher_backbone.safetensors",  # the evaluated backbone (DINO's teacher)
           "student": f"{EXPORT_DIR}/student_backbone.safetensors"}
FINETUNED = "finetuned.safetensors"  # a fine-tuning run's network (its results: eval_results(run, "finetune"))
FINETUNED_EMA = "finetuned_ema.safetensors"  # ... and its EMA, where the recipe keeps one

# Checkpoints: one directory per optimizer step
CHECKPOINTS = "checkpoints"
PREFIX = "step_"
TASK_STATE = "task_state.pt"
OLD_TASK_STATE = "method_state.pt"  # the task state's name before the one-loop redesign
LOOP_STATE = "loop_state.json"  # written last: a checkpoint holding it is complete
DEEPSPEED_TAG = "pytorch_model"  # the directory Accelerate's save_state gives the ZeRO files
UNIVERSAL = "universal"  # a DeepSpeed checkpoint converted for another rank count


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{PREFIX}{step:09d}"


def checkpoint_step(path: str | Path) -> int:
    return int(Path(path).name[len(PREFIX):])


def step_dirs(run_dir: str | Path) -> list[Path]:
    """Every ``checkpoints/step_*`` directory of a run, complete or not, in step order."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run (their loop state written), in step order."""
    return sorted((p for p in step_dirs(run_dir) if (p / LOOP_STATE).is_file()), key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def is_run_dir(path: str | Path) -> bool:
    """``path`` is a run directory: it holds a training log or a checkpoints directory."""
    path = Path(path)
    return path.is_dir() and ((path / LOG).is_file() or (path / CHECKPOINTS).is_dir())


def rank_summary(run_dir: str | Path, rank: int) -> Path:
    """What one rank saw, written at the end of a run."""
    return Path(run_dir) / f"rank_summary_{rank}.json"


def eval_results(directory: str | Path, protocol: str) -> Path:
    """The default results file of an evaluation protocol, beside the weights it evaluated."""
    return Path(directory) / f"{protocol}_results.json"


def eval_dir(directory: str | Path, protocol: str) -> Path:
    """Where an evaluation protocol keeps its other files (``knn/``, ``linear/``...), beside its results file."""
    return Path(directory) / protocol


def eval_summary(directory: str | Path) -> Path:
    """The default results file of the summary protocol."""
    return Path(directory) / EVAL_SUMMARY / SUMMARY
