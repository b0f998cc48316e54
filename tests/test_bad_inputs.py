"""Every bad input is one line that names the file or key and the fix, with exit code 1 (2 for a
usage or config error), no traceback, and no run directory left behind by the failed launch."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, merged, tiny_overrides
from s3_server import s3_bucket, s3_server  # noqa: F401 - fixtures

PYTHON = sys.executable


def cli(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(ROOT / script), *args], capture_output=True, text=True, timeout=timeout)


def one_line(r: subprocess.CompletedProcess | tuple[int, str], code: int, *named: str) -> str:
    """The error line of a failed command: exit ``code``, no traceback, naming each of ``named``."""
    rc, err = (r.returncode, r.stderr + r.stdout) if isinstance(r, subprocess.CompletedProcess) else r
    assert rc == code, err[-3000:]
    assert "Traceback" not in err and "killed" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    last = lines[-1]
    for name in named:
        assert name in last, last
    return last


def unreadable_folder(root: Path) -> Path:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            (root / c / f"{i}.png").write_bytes(b"not an image")
    return root


def corrupt(path: Path) -> Path:
    path.write_bytes(b"\xff" * 64)  # an 8-byte header length no file holds: "header too large"
    return path


# -- weights files ---------------------------------------------------------------------------------
def test_corrupt_model_pretrained_is_one_line(image_folder, tmp_path):
    bad = corrupt(tmp_path / "start.safetensors")
    out = tmp_path / "run"
    r = cli("run_pretrain.py", *merged(tiny_overrides(image_folder, out), f"model.pretrained={bad}"))
    line = one_line(r, 1, "model.pretrained", str(bad), "not a readable safetensors file")
    assert "header too large" in line
    assert not out.exists()


def test_corrupt_eval_weights_is_one_line(image_folder, tmp_path, capsys):
    from selfdistill.cli.evaluate import main

    bad = corrupt(tmp_path / "teacher.safetensors")
    rc = main(["knn", "--weights", str(bad), "--data.path", str(image_folder), "--data.val_path", str(image_folder),
               "--out", str(tmp_path / "knn.json")])
    one_line((rc, capsys.readouterr().err), 2, str(bad), "not a readable safetensors file")
    assert not (tmp_path / "knn.json").exists()


def test_weights_of_another_architecture_is_one_line(tmp_path):
    from selfdistill.models import ModelConfig
    from selfdistill.models.backbone import Backbone, export_backbone, load_backbone

    small = ModelConfig(name="vit_tiny_patch16_224", img_size=16, patch_size=4, kwargs={"depth": 2, "embed_dim": 32,
                                                                                         "num_heads": 2})
    path = export_backbone(Backbone(small.name, 16, 4, 0.0, False, **small.kwargs), tmp_path / "w.safetensors")
    wider = ModelConfig(name=small.name, img_size=16, patch_size=4, kwargs={"depth": 3, "embed_dim": 48, "num_heads": 2})
    with pytest.raises(ValueError) as e:
        load_backbone(str(path), wider)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    assert "missing 12 keys: blocks.2." in message and "wrong shapes: cls_token (1, 1, 32) != (1, 1, 48)" in message


# -- resume ----------------------------------------------------------------------------------------
def test_resume_with_another_recipe_names_the_keys(image_folder, tmp_path, caplog):
    from selfdistill.cli.pretrain import main
    from selfdistill.recipe import load_config

    # A run's checkpoint as the loop leaves it, without training one: the refusal comes before any of
    # its tensors are read (test_train resumes real checkpoints).
    out = tmp_path / "run"
    trained = load_config(None, merged(tiny_overrides(image_folder, out), "train.epochs=1")).to_yaml()
    step = out / "checkpoints" / "step_000000004"
    step.mkdir(parents=True)
    (step / "loop_state.json").write_text('{"step": 4, "epoch": 1}')
    (step / "config.yaml").write_text(trained)
    (out / "config.yaml").write_text(trained)
    config_before = (out / "config.yaml").read_text()
    rc = main(merged(tiny_overrides(image_folder, out), "train.epochs=1", "method.out_dim=128", "optim.name=sgd",
                     "model.grad_checkpointing=true", "--resume", "auto"))
    line = one_line((rc, caplog.text), 2, "--resume", "another recipe", "method.out_dim: 64 there, 128 now",
                    "optim.name: 'adamw' there, 'sgd' now", "train.output_dir")
    assert "grad_checkpointing" not in line  # how the step is computed may change
    assert (out / "config.yaml").read_text() == config_before  # nothing overwritten


def test_same_recipe_resumes_with_other_operational_keys(tmp_path):
    from selfdistill.engine.checkpoint import check_same_recipe
    from selfdistill.recipe import load_config

    tiny = tiny_overrides(tmp_path / "data", tmp_path / "run")
    (tmp_path / "config.yaml").write_text(load_config(None, tiny).to_yaml())
    changed = load_config(None, merged(tiny, "train.epochs=5", "data.path=/elsewhere", "optim.lr=1e-3",
                                       "model.channels_last=false", "train.output_dir=/moved"))
    check_same_recipe(tmp_path, changed.to_dict())  # accepted
    with pytest.raises(ValueError, match=r"model.kwargs.depth: 2 there, 3 now"):
        check_same_recipe(tmp_path, load_config(None, merged(tiny, "model.kwargs={depth: 3, embed_dim: 32, "
                                                                   "num_heads: 2}")).to_dict())


# -- data ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("check_data", [False, True])
def test_a_folder_of_unreadable_images_is_one_line(check_data, tmp_path):
    data = unreadable_folder(tmp_path / "bad")
    out = tmp_path / "run"
    r = cli("run_pretrain.py", *merged(tiny_overrides(data, out), "data.num_workers=2",
                                       *(["--check-data"] if check_data else [])))
    one_line(r, 1, "none of the 16 images", str(data), "data.path")
    assert "skipping unreadable" not in r.stderr  # no warning per file before the error
    assert not out.exists()


def test_missing_knn_val_path_is_refused_before_anything_is_written(image_folder, tmp_path, capsys):
    from selfdistill.cli.pretrain import main

    out = tmp_path / "run"
    rc = main(["--config", str(ROOT / "configs/demo.yaml"), f"data.path={image_folder}", f"train.output_dir={out}"])
    one_line((rc, capsys.readouterr().err), 2, "knn.val_path", "runs/demo_data/test", "knn.val_path=''")
    assert not out.exists()


# -- YAML ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,where,what", [
    ("optim:\n  lr: [1, 2\n  min_lr: 3\n", ":3:9:", "expected ',' or ']'"),
    ("optim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", ":3:3:", "key 'lr' is given twice (line 2, then line 3)"),
    ("optim: {lr: 1}\noptim: {min_lr: 0}\n", ":2:1:", "key 'optim' is given twice"),
])
def test_yaml_errors_keep_line_and_column(text, where, what, tmp_path, capsys):
    from selfdistill.cli.pretrain import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    out = tmp_path / "run"
    rc = main(["--config", str(recipe), f"train.output_dir={out}"])
    one_line((rc, capsys.readouterr().err), 2, f"{recipe}{where}", what)
    assert not out.exists()


def test_repeated_key_in_a_base_recipe_is_refused(tmp_path):
    from selfdistill.configkit import ConfigError, read_recipe

    (tmp_path / "base.yaml").write_text("train:\n  epochs: 1\n  seed: 2\n  epochs: 3\n")
    (tmp_path / "mine.yaml").write_text("base: base.yaml\ntrain:\n  seed: 4\n")
    with pytest.raises(ConfigError, match=r"base.yaml:4:3: key 'epochs' is given twice"):
        read_recipe(tmp_path / "mine.yaml")
    assert yaml.safe_load("a: 1\na: 2\n") == {"a": 2}  # (what PyYAML alone does)


# -- object storage --------------------------------------------------------------------------------
def test_s3_without_a_reachable_endpoint_is_named_first_and_fast(tmp_path, monkeypatch, caplog,
                                                                 fresh_accelerate_state):
    from s3_server import free_port

    from selfdistill.cli.pretrain import main
    from selfdistill.data import object_store

    for name in object_store.ENDPOINT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "dummy")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "dummy")
    # AWS S3 itself, as this machine (offline) or a firewalled cluster node sees it
    monkeypatch.setattr(object_store, "AWS_ENDPOINT", f"https://127.0.0.1:{free_port()}")
    out = tmp_path / "run"
    for path in ("s3://bucket/train/", "s3://bucket/train/shard-{000000..000003}.tar"):
        caplog.clear()
        start = time.monotonic()
        assert main(tiny_overrides(path, out)) == 1
        assert time.monotonic() - start < 20  # (the clients retried for 108 s)
        error = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(error) == 1 and "neither S3_ENDPOINT_URL nor AWS_ENDPOINT_URL is set" in error[0]
        assert "S3_ENDPOINT_URL=http://HOST:PORT" in error[0] and "_info.json" not in error[0]
        assert not out.exists()


def test_s3_without_credentials_is_named_first(s3_bucket, tmp_path, monkeypatch):  # noqa: F811
    from selfdistill.data import object_store
    from selfdistill.data.sources import expand_urls

    for name in (*object_store.CREDENTIAL_VARIABLES, "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws
    for path in (f"s3://{s3_bucket.name}/train/", f"s3://{s3_bucket.name}/train/shard-{{000000..000001}}.tar"):
        start = time.monotonic()
        with pytest.raises(object_store.ObjectStoreError, match=r"^s3://: no credentials found: set AWS_ACCESS_KEY_ID"):
            expand_urls(path)
        assert time.monotonic() - start < 5


@pytest.mark.parametrize("client_says", [
    'ERROR "cat s3://b/train/_info.json": InvalidAccessKeyId: The AWS Access Key Id you provided does not exist '
    'in our records. status code: 403',  # s5cmd
    "An error occurred (403) when calling the HeadObject operation: Forbidden",  # aws
])
def test_s3_credentials_the_store_refuses_are_named_as_such(client_says, monkeypatch):
    """(moto accepts any credentials, so the clients' own words for a refusal stand in for a store.)"""
    from selfdistill.data import object_store

    def refused(url):
        raise object_store.ObjectStoreError(f"{url}: s5cmd failed (exit 1): {client_says}")

    monkeypatch.setattr(object_store, "check_endpoint", lambda: None)
    monkeypatch.setattr(object_store, "read_object", refused)
    with pytest.raises(object_store.ObjectStoreError) as e:
        object_store.read_remote_info("s3://b/train/")
    assert str(e.value).startswith("data.path: s3://b/train/: the object store refuses these credentials (check "
                                   "AWS_ACCESS_KEY_ID") and "_info.json" in str(e.value)  # (the client's words last)
    assert "needs its" not in str(e.value)


# -- selfdistill-plan ------------------------------------------------------------------------------
def test_plan_memory_without_a_unit_is_refused(capsys):
    from selfdistill.cli.plan import main

    rc = main(["--config", str(ROOT / "configs/demo.yaml"), "--cpu", "--gpus", "2", "--gpu-memory", "40"])
    one_line((rc, capsys.readouterr().err), 2, "--gpu-memory 40: give a unit", "40GiB")


def test_impossible_plan_is_refused_before_measuring(tmp_path, capsys):
    from selfdistill.cli.plan import main

    start = time.monotonic()
    rc = main(["--config", str(ROOT / "configs/demo.yaml"), "--cpu", "--gpus", "2", "--global-batch", "64",
               "--gpu-memory", "4MiB", "--write", str(tmp_path / "plan")])
    err = capsys.readouterr().err
    line = one_line((rc, err), 1, "--gpu-memory 4.0MiB cannot hold this recipe on 2 ranks", "at least")
    assert "measuring" not in err and time.monotonic() - start < 30
    assert not (tmp_path / "plan").exists()
    needed = float(line.split("at least ")[1].split("MiB")[0])
    assert 10 < needed < 1024  # demo's ViT: a few M parameters, its state in tens of MiB


def test_nothing_fits_names_the_smallest_memory_that_does():
    from selfdistill import planner as P
    from test_planner import fake_profile

    profile, target = fake_profile(), P.Target(memory=2 * P.GIB, gpus=8, global_batch=1024)
    memory, row = P.smallest_fitting_memory(profile, target)
    assert P.plan(profile, target)[1] is None
    target.memory = memory
    rows, best = P.plan(profile, target)
    assert best is not None and rows[best].micro_batch >= 1 and row in {f"{r.strategy}{':ckpt' * r.ckpt}"
                                                                         for r in rows if r.fits}
    target.memory = memory - 2**20
    assert P.plan(profile, target)[1] is None


# -- normalisation ---------------------------------------------------------------------------------
def test_train_and_eval_normalisation_that_differ_are_said():
    from selfdistill.training.finetune_config import FinetuneDataConfig

    clip = (0.48145466, 0.4578275, 0.40821073)
    assert FinetuneDataConfig().normalisation_notice() == ""
    assert FinetuneDataConfig(eval_mean=FinetuneDataConfig().mean).normalisation_notice() == ""
    notice = FinetuneDataConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), eval_mean=clip,
                                eval_std=(0.26862954, 0.26130258, 0.27577711)).normalisation_notice()
    assert "\n" not in notice and "data.eval_mean [0.48145466" in notice and "data.mean [0.5, 0.5, 0.5]" in notice
    assert "data.eval_std" in notice and "data.eval_mean=null data.eval_std=null" in notice


def test_launch_check_reads_paths_as_the_data_door_does(tmp_path: Path) -> None:
    """Only a path that must exist here is refused: an HF directory's `DIR@SPLIT` names DIR, and URLs
    and shard patterns are left to their readers."""
    from selfdistill.cli.pretrain import check_launch
    from selfdistill.configkit import ConfigError
    from selfdistill.recipe import load_config

    (tmp_path / "hf").mkdir()
    for path in (f"{tmp_path / 'hf'}@validation", "s3://bucket/train/", "shards/shard-{000000..000003}.tar"):
        check_launch(load_config(None, merged(tiny_overrides(path, tmp_path / "run"), "knn.val_path=")))
    with pytest.raises(ConfigError, match=r"data.path: .*missing@validation' does not exist"):
        check_launch(load_config(None, merged(tiny_overrides(f"{tmp_path / 'missing'}@validation", tmp_path / "run"),
                                              "knn.val_path=")))
