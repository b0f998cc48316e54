"""Experiment trackers (offline): the names and tracker_kwargs a recipe may give, the missing-package
error, the per-tracker init keywords, and a resumed run continuing the same wandb / mlflow run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_training
from selfdistill.configkit import ConfigError
from selfdistill.engine.trackers import check_installed, init_kwargs
from selfdistill.recipe import load_config
from selfdistill.rundir import TRACKER_IDS
from selfdistill.tracker_schema import tracker_names


# -- configuration ----------------------------------------------------------------------------------

def test_tracker_names_are_accelerates():
    from accelerate.utils import LoggerType

    assert set(tracker_names()) >= {t.value for t in LoggerType} - {"all"}
    assert "all" not in tracker_names()


@pytest.mark.parametrize("override,message", [
    ("train.trackers=[wandbb]", r"train\.trackers: unknown tracker 'wandbb' \(did you mean 'wandb'\?\); "
                                r"Accelerate's trackers: aim, .*mlflow, .*tensorboard"),
    ("train.trackers=[xyz]", r"unknown tracker 'xyz'; Accelerate's trackers: aim, "),
    ("train.trackers=[all]", r"train\.trackers: 'all' starts whichever trackers are installed; name them"),
    ("train.trackers=[wandb, wandb]", r"named twice"),
    ("train.tracker_kwargs={tags: a}", r"train\.tracker_kwargs\.tags: expected a list of non-empty strings"),
    ("train.tracker_kwargs={name: 3}", r"train\.tracker_kwargs\.name: expected a non-empty string, got 3"),
    ("train.tracker_kwargs={wandbb: {}}", r"train\.tracker_kwargs\.wandbb: unknown key \(did you mean 'wandb'\?\)"),
    ("train.tracker_kwargs={wandb: offline}", r"tracker_kwargs\.wandb: expected a mapping of wandb's init keywords"),
    ("train.tracker_kwargs={wandb: {mode:offline}}", r"tracker_kwargs\.wandb: 'mode:offline' has no value"),
    ("train.tracker_kwargs=[a]", r"train\.tracker_kwargs: expected a mapping"),
])
def test_bad_trackers_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_fine_tuning_checks_the_same_keys():
    from selfdistill.configkit import build_dataclass
    from selfdistill.training.finetune_config import FinetuneTrainConfig

    with pytest.raises(ConfigError, match=r"train\.tracker_kwargs\.tags: expected a list"):
        build_dataclass(FinetuneTrainConfig, {"tracker_kwargs": {"tags": 1}}, "train").validate("train")


def test_dotted_overrides_reach_into_tracker_kwargs():
    cfg = load_config(None, ["train.trackers=[wandb, mlflow]", "train.tracker_kwargs.name=run-1",
                             "train.tracker_kwargs.tags=[a, b]", "train.tracker_kwargs.wandb={mode: offline}"])
    assert cfg.train.tracker_kwargs == {"name": "run-1", "tags": ["a", "b"], "wandb": {"mode": "offline"}}


def test_common_keys_in_each_trackers_words_and_own_keywords_win():
    kw = {"project": "p", "name": "n", "entity": "e", "tags": ["a", "b"], "wandb": {"mode": "offline", "name": "w"}}
    got = init_kwargs(["wandb", "mlflow", "clearml", "comet_ml", "tensorboard"], kw, {"wandb": "id1", "mlflow": "r1"})
    assert got == {
        "wandb": {"name": "w", "entity": "e", "tags": ["a", "b"], "id": "id1", "resume": "allow", "mode": "offline"},
        "mlflow": {"run_name": "n", "tags": {"a": "", "b": ""}, "run_id": "r1"},
        "clearml": {"task_name": "n", "tags": ["a", "b"]},
        "comet_ml": {"workspace": "e"},
    }  # tensorboard has no run name, entity nor tags: nothing (its own mapping would be SummaryWriter's)
    assert init_kwargs(["wandb"], {}) == {}


def test_missing_tracker_package_names_the_pip_command(monkeypatch):
    import accelerate.utils.imports as imports

    monkeypatch.setattr(imports, "is_mlflow_available", lambda: False)
    with pytest.raises(ValueError, match=r"train.trackers includes mlflow, which is not installed: pip install mlflow"):
        check_installed(["tensorboard", "mlflow"])
    check_installed(["tensorboard", "wandb"])


# -- runs -------------------------------------------------------------------------------------------

def _stop_then_resume(data: Path, out: Path, *extra: str) -> None:
    """Three steps, then `--resume auto` to the end (8 steps): two launches of one run."""
    run_training(data, out, *extra, "train.max_steps=3")
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    run_training(data, out, *extra, resume="auto")


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_wandb_resume_continues_the_same_run(image_folder, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    calls = []
    real_init = wandb.init
    monkeypatch.setattr(wandb, "init", lambda **kw: calls.append(kw) or real_init(**kw))
    out = tmp_path / "run"
    _stop_then_resume(image_folder, out, "train.trackers=[wandb]",
                      "train.tracker_kwargs={project: tiny, name: first, tags: [a, b]}")

    run_id = json.loads((out / TRACKER_IDS).read_text())["wandb"]
    assert [c.get("id") for c in calls] == [None, run_id] and calls[1]["resume"] == "allow"
    assert all(c["project"] == "tiny" and c["name"] == "first" and c["tags"] == ["a", "b"] for c in calls)
    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)  # one wandb run, two launches


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_mlflow_logs_losses_name_and_tags_and_resume_continues_the_run(image_folder, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store only on request
    out = tmp_path / "run"
    _stop_then_resume(image_folder, out, "train.trackers=[mlflow]",
                      "train.tracker_kwargs={project: tiny-exp, name: first, tags: [a]}")

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny-exp").experiment_id])
    assert len(runs) == 1  # the resume reopened the run
    run = runs[0]
    assert run.info.run_id == json.loads((out / TRACKER_IDS).read_text())["mlflow"]
    assert run.data.tags["mlflow.runName"] == "first" and run.data.tags["a"] == ""
    assert run.data.params["train.max_steps"] == "3"  # write-once: the first launch's value stays
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 9))
    assert [m.value for m in history] == pytest.approx(losses)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_tensorboard_writes_to_run_tensorboard_whatever_the_project_name(image_folder, tmp_path):
    out = tmp_path / "run"
    run_training(image_folder, out, "train.trackers=tensorboard", "train.tracker_kwargs={project: mine}",
                 "train.max_steps=2")
    assert list((out / "tensorboard").glob("events.out.tfevents*")) and not (out / "mine").exists()
    assert not (out / TRACKER_IDS).exists()  # tensorboard has no run id to keep
