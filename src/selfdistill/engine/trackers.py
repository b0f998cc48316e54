"""The experiment trackers, one door for pretraining and fine-tuning: whether their package is
installed, what each tracker's init gets from ``train.tracker_kwargs``, and the tracker run ids
kept in ``<run>/trackers.json`` so that a resumed run continues the same wandb / mlflow / aim run
instead of opening a new one. Which names and keys a recipe may hold is
:mod:`selfdistill.tracker_schema`'s (the recipe checks them without importing the engine).

    check_installed(["wandb"])                        # before any work: the pip command if missing
    start_trackers(acc, run_dir, train_cfg, "selfdistill", flat_config, resuming=True)

Common ``tracker_kwargs`` keys are mapped onto each tracker's own words (``name`` is wandb's
``name``, mlflow's ``run_name``, clearml's ``task_name``...); a key named after a tracker is that
tracker's init keywords, passed verbatim and applied last (they win).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from selfdistill.atomic import write_json_atomic
from selfdistill.rundir import TENSORBOARD, TRACKER_IDS

__all__ = ["check_installed", "init_kwargs", "start_trackers"]

log = logging.getLogger(__name__)


def check_installed(trackers: Iterable[str]) -> None:
    """Accelerate drops a tracker whose package is missing with a debug message only: refuse it
    before any work, with the pip command."""
    import accelerate.utils.imports as imports

    for tracker in trackers:
        available = getattr(imports, f"is_{tracker}_available", None)  # None: a registered custom tracker
        if available is not None and not available():
            raise ValueError(f"train.trackers includes {tracker}, which is not installed: pip install {_pip(tracker)}")


def _pip(tracker: str) -> str:
    """``'selfdistill[wandb]'`` where the package has that extra, else the tracker's package name."""
    try:
        extras = importlib.metadata.metadata("selfdistill").get_all("Provides-Extra") or []
    except importlib.metadata.PackageNotFoundError:
        extras = []
    return f"'selfdistill[{tracker}]'" if tracker in extras else tracker


# --------------------------------------------------------------------------------------------
# tracker_kwargs -> init_trackers(init_kwargs=...)
# --------------------------------------------------------------------------------------------

def _mlflow_tags(tags: list[str]) -> dict[str, str]:
    return {t: "" for t in tags}  # mlflow tags are key: value; a bare tag is a key with no value


# common key -> (the tracker's init keyword, conversion); absent: the tracker has no such notion at init
_COMMON: dict[str, dict[str, tuple[str, Callable[[Any], Any]]]] = {
    "wandb": {"name": ("name", str), "entity": ("entity", str), "tags": ("tags", list)},
    "mlflow": {"name": ("run_name", str), "tags": ("tags", _mlflow_tags)},
    "comet_ml": {"entity": ("workspace", str)},  # name, tags: set once started (_after_start)
    "clearml": {"name": ("task_name", str), "tags": ("tags", list)},
    "swanlab": {"name": ("experiment_name", str), "entity": ("workspace", str), "tags": ("tags", list)},
    "trackio": {"name": ("name", str)},
}

# a saved run id -> the init keywords that reopen that run
_RESUME: dict[str, Callable[[str], dict[str, Any]]] = {
    "wandb": lambda run_id: {"id": run_id, "resume": "allow"},
    "mlflow": lambda run_id: {"run_id": run_id},
    "aim": lambda run_id: {"run_hash": run_id},
}

# the started tracker (Accelerate's wrapper) -> its run id
_RUN_ID: dict[str, Callable[[Any], str]] = {
    "wandb": lambda t: t.run.id,
    "mlflow": lambda t: t.active_run.info.run_id,
    "aim": lambda t: t.writer.hash,
}


def init_kwargs(trackers: Iterable[str], tracker_kwargs: dict[str, Any],
                run_ids: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Accelerate's ``init_kwargs``: the common keys in each tracker's words, then the saved run id
    (resume), then the tracker's own mapping verbatim."""
    out: dict[str, dict[str, Any]] = {}
    for tracker in trackers:
        kw = {word: convert(tracker_kwargs[k]) for k, (word, convert) in _COMMON.get(tracker, {}).items()
              if k in tracker_kwargs}
        if run_ids and tracker in run_ids and tracker in _RESUME:
            kw.update(_RESUME[tracker](run_ids[tracker]))
        kw.update(tracker_kwargs.get(tracker, {}))
        if kw:
            out[tracker] = kw
    return out


def _after_start(tracker: Any, tracker_kwargs: dict[str, Any]) -> None:
    """Run name and tags for trackers that take them only once started (aim names the run after the
    project; comet reads them from an ExperimentConfig a recipe cannot write)."""
    name, tags = tracker_kwargs.get("name"), tracker_kwargs.get("tags", [])
    if tracker.name == "aim":
        if name:
            tracker.writer.name = name
        for tag in tags:
            tracker.writer.add_tag(tag)
    elif tracker.name == "comet_ml":
        if name:
            tracker.writer.set_name(name)
        if tags:
            tracker.writer.add_tags(tags)


def start_trackers(acc: Any, run_dir: Path, train: Any, project: str, config: dict[str, Any],
                   resuming: bool) -> None:
    """``acc.init_trackers`` with ``train.tracker_kwargs``; a resumed run reopens the tracker runs
    named in ``<run_dir>/trackers.json``, and a fresh one records its own there (main process)."""
    if not train.trackers or not acc.is_main_process:  # Accelerate starts trackers on the main process only
        return
    kwargs = train.tracker_kwargs
    ids_file = Path(run_dir) / TRACKER_IDS
    run_ids = json.loads(ids_file.read_text()) if resuming and ids_file.is_file() else {}
    inits = init_kwargs(train.trackers, kwargs, run_ids)
    acc.log_with = [_tensorboard(Path(run_dir), inits.get("tensorboard", {})) if str(t) == "tensorboard" else t
                    for t in acc.log_with]
    acc.init_trackers(kwargs.get("project", project), init_kwargs=inits)
    for tracker in acc.trackers:
        _after_start(tracker, kwargs)
        values = config
        if tracker.name == "mlflow" and tracker.name in run_ids:
            values = _new_mlflow_params(tracker, config)
        tracker.store_init_configuration(values)
    started = {t.name: _RUN_ID[t.name](t) for t in acc.trackers if t.name in _RUN_ID}
    if started != run_ids:
        write_json_atomic(ids_file, {**run_ids, **started})
    if run_ids:
        log.info("trackers: continuing %s", ", ".join(f"{k} run {v}" for k, v in run_ids.items() if k in started))


def _tensorboard(run_dir: Path, writer_kwargs: dict[str, Any]) -> Any:
    """Accelerate's TensorBoard tracker writing to ``<run>/tensorboard/`` itself: Accelerate's own
    puts the events under ``<logging_dir>/<project>/`` and the hyperparameters in a sub-directory
    named by a float timestamp, so a run's curves were split over paths nobody would guess."""
    from accelerate.tracking import TensorBoardTracker

    from selfdistill.atomic import write_text_atomic

    class RunTensorBoard(TensorBoardTracker):
        def start(self) -> None:
            from torch.utils import tensorboard

            self.logging_dir = str(run_dir / TENSORBOARD)
            self.writer = tensorboard.SummaryWriter(self.logging_dir, **self.init_kwargs)

        def store_init_configuration(self, values: dict) -> None:
            import yaml

            self.writer.add_hparams(values, metric_dict={}, run_name=".")  # beside the curves, not a new folder
            self.writer.flush()
            write_text_atomic(Path(self.logging_dir) / "hparams.yml", yaml.safe_dump(values, sort_keys=True))

    return RunTensorBoard("tensorboard", str(run_dir), **writer_kwargs)


def _new_mlflow_params(tracker: Any, config: dict[str, Any]) -> dict[str, Any]:
    """MLflow params are write-once: a resumed run logs only the keys it has not logged yet (a
    changed value stays in the run's ``config.yaml``)."""
    import mlflow

    logged = mlflow.get_run(tracker.active_run.info.run_id).data.params
    return {k: v for k, v in config.items() if k not in logged}
