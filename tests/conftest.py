"""Shared fixtures: tiny labelled image folders and a tiny DINO recipe that trains in seconds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Under pytest-xdist (`make test`: two workers on two cores, whole files per worker, so a module's
# fixtures are built once and the SLURM cluster of test_slurm_cluster.py has one owner) each worker
# takes one core's threads.
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")

# Every process the tests start finds this environment's tools first, as in an activated venv. DeepSpeed
# JIT-builds its CPU ops with whichever `ninja` is on PATH; the venv's (pip, 1.13) and Debian's (1.11) hash
# their build logs differently, so processes that alternated between them rebuilt the same op again and
# again (seen: eight rebuilds of shm_comm in one suite, about a minute each).
_VENV_BIN = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _VENV_BIN:
    os.environ["PATH"] = os.pathsep.join([_VENV_BIN, os.environ.get("PATH", "")])


def make_image_folder(root: Path, n_per_class: int = 16, classes=("a", "b"), size: int = 24, seed: int = 0) -> Path:
    """Class folders of small RGB images whose colour depends on the class (so kNN can work)."""
    rng = np.random.default_rng(seed)
    for c_idx, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            base = np.zeros((size, size, 3), dtype=np.float32)
            base[..., c_idx % 3] = 180
            img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / c / f"{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


def tiny_overrides(data_path: Path, output_dir: Path, **extra) -> list[str]:
    """A 2-block ViT with 16 px global / 8 px local crops: a few steps take a second or two."""
    cfg = {
        "model.name": "vit_tiny_patch16_224",
        "model.img_size": 16,
        "model.patch_size": 4,
        "model.drop_path_rate": 0.1,
        "model.kwargs": "{depth: 2, embed_dim: 32, num_heads: 2}",
        "method.out_dim": 64,
        "method.head_hidden_dim": 32,
        "method.head_bottleneck_dim": 16,
        "method.warmup_teacher_temp_epochs": 2,
        "data.path": str(data_path),
        "data.global_crop_size": 16,
        "data.local_crop_size": 8,
        "data.n_local_crops": 2,
        "data.num_workers": 0,
        "optim.warmup_epochs": 1,
        "train.output_dir": str(output_dir),
        "train.epochs": 2,
        "train.batch_size_per_device": 8,
        "train.log_every": 1,
        "train.checkpoint_every": 1000,
        "train.trackers": "[]",
        "train.progress_bar": "false",
        "knn.image_size": 16,
        "knn.k": "[1, 3]",
    }
    cfg.update({k: v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in cfg.items()]


# One global batch with epoch 0's augmentation every step, a constant teacher temperature and a fixed
# center: the student fits a slowly moving EMA teacher, so the loss must fall (train.epochs sets steps).
REPEATED_BATCH = ["train.overfit_batches=1", "method.teacher_temp=0.04", "method.warmup_teacher_temp=0.04",
                  "method.center_momentum=1.0", "model.drop_path_rate=0.0", "optim.warmup_epochs=0"]


@pytest.fixture
def fresh_accelerate_state():
    """In-process training builds Accelerate singletons; reset them so each test starts clean."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_training(data: Path, out: Path, *extra: str, resume: str | None = None, **overrides):
    """Train the tiny recipe in this process (``extra``: more dotted overrides, applied last)."""
    from selfdistill.recipe import load_config
    from selfdistill.pretrain import pretraining

    return pretraining(load_config(None, merged(tiny_overrides(data, out, **overrides), *extra)), resume=resume).fit()


def merged(*overrides: str | list[str]) -> list[str]:
    """Dotted overrides with later ones replacing earlier ones of the same key (the command line
    refuses a key given twice; the tests build on the tiny recipe)."""
    flat = [o for item in overrides for o in ([item] if isinstance(item, str) else item)]
    options = [o for o in flat if o.startswith("-") or "=" not in o]  # command-line flags and their values
    dotted = dict(o.split("=", 1) for o in flat if o not in options)
    return [f"{k}={v}" for k, v in dotted.items()] + options


def logged_losses(out: Path) -> list[float]:
    import json

    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


# -- two gloo ranks through `accelerate launch` (slow tests) --------------------------------------
ROOT = Path(__file__).resolve().parents[1]
DDP_2PROC = ["--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml")]


# Accelerate's own `accelerate-launch` entry point: the code of `accelerate launch` without the `accelerate`
# CLI's other sub-commands, whose imports (timm, W&B) cost about 4 s a launch. The documented lines run
# `accelerate launch` as written (test_docs_commands.py, test_distributed.py, test_cluster.py).
ACCELERATE_LAUNCH = str(Path(sys.executable).with_name("accelerate-launch"))


def zero_launcher(stage: int | str) -> list[str]:
    """`accelerate launch` arguments for 2 ranks under ``ds_configs/zero{stage}.json`` (or a named config)."""
    name = f"zero{stage}" if isinstance(stage, int) else stage
    return ["--use_deepspeed", "--deepspeed_config_file", str(ROOT / f"ds_configs/{name}.json"), "--num_processes", "2"]


def accelerate_launch(launcher: list[str], data: Path, out: Path, *extra: str, script: Path | None = None,
                      check: bool = True):
    """Run ``run_pretrain.py`` (or ``script``) on the tiny recipe under ``accelerate launch``."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([ACCELERATE_LAUNCH, *launcher, str(script or ROOT / "run_pretrain.py"),
                        *merged(tiny_overrides(data, out), *extra)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=str(out.parent))
    if check:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory) -> tuple[Path, Path]:
    """The uninterrupted 2-rank run (torchrun, one machine) every cluster run must end equal to:
    (images, run dir)."""
    from cluster_runs import STEPS, finish, logged_step, torchrun

    root = tmp_path_factory.mktemp("two_ranks")
    images = make_image_folder(root / "img", n_per_class=32)
    out = root / "uninterrupted"
    rc, output = finish(torchrun(images, out))
    assert rc == 0, output[-4000:]
    assert logged_step(out) == STEPS
    return images, out


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real two-node SLURM cluster (tests/slurm_cluster.py) for the whole session, stopped by PID
    at the end; its teardown fails if a daemon, a job process, a namespace or a link is left."""
    from slurm_cluster import Cluster, unavailable

    why = unavailable()
    if why and os.environ.get("CI"):  # CI runs as root with apt-get (make test installs SLURM): never skipped there
        pytest.fail(f"the SLURM cluster tests cannot run in CI: {why}")
    if why:
        pytest.skip(why)
    cluster = Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()
    assert cluster.leftovers() == []
