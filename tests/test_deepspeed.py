"""DINO under DeepSpeed ZeRO-1/2/3 on two CPU ranks (gloo), against the same run under DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_image_folder, tiny_overrides
from selfdistill.engine import checkpoint as ckpt

pytest.importorskip("deepspeed")
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def launch(launcher: list[str], data: Path, out: Path, *extra: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([ACCELERATE, "launch", *launcher, str(ROOT / "run_pretrain.py"), *tiny_overrides(data, out),
                        *extra], capture_output=True, text=True, timeout=600, env=env, cwd=str(out.parent))
    assert r.returncode == 0, r.stderr[-4000:]


def zero(stage: int) -> list[str]:
    return ["--use_deepspeed", "--deepspeed_config_file", str(ROOT / f"ds_configs/zero{stage}.json"),
            "--num_processes", "2"]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]


def teacher(out: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_method_state(ckpt.latest_checkpoint(out))["teacher"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("ds") / "img")


@pytest.fixture(scope="module")
def ddp_run(data) -> Path:
    out = data.parent / "ddp"
    launch(["--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml")], data, out)
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_ddp_and_resumes_exactly(stage, data, ddp_run):
    out = data.parent / f"zero{stage}"
    launch(zero(stage), data, out)
    summaries = [json.loads((out / f"rank_summary_{r}.json").read_text()) for r in (0, 1)]
    assert [s["world_size"] for s in summaries] == [2, 2]
    assert summaries[0]["student_sha256"] == summaries[1]["student_sha256"]

    # Same initialisation, data and schedules as DDP: the same losses, up to reduction order.
    got, want = losses(out), losses(ddp_run)
    assert len(got) == len(want) == 4 and all(map(lambda x: torch.isfinite(torch.tensor(x)), got))
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)

    # The EMA teacher moved and tracks DDP's; the last layer (frozen for epoch 0 = 2 steps) moved after.
    t, t_ddp = teacher(out), teacher(ddp_run)
    for k in t:
        assert torch.allclose(t[k], t_ddp[k], atol=1e-5), k

    # Stop after 1 step, resume: the same end state as the uninterrupted run.
    part = data.parent / f"zero{stage}_part"
    launch(zero(stage), data, part, "train.max_steps=1")
    launch(zero(stage), data, part, "--resume", "auto")
    assert losses(part) == pytest.approx(got, rel=1e-6)
    for k, v in teacher(part).items():
        assert torch.allclose(v, t[k], atol=1e-6), k


def test_last_layer_frozen_under_zero2(data):
    """Under DeepSpeed the optimizer steps inside backward(): freezing must be an lr=0 group."""
    from accelerate.utils import set_seed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from selfdistill.config import load_config
    from selfdistill.methods import build_method

    out = data.parent / "zero2_frozen"
    launch(zero(2), data, out, "train.max_steps=2", "optim.warmup_epochs=0")  # epoch 0 = 2 steps, all frozen
    student = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.latest_checkpoint(out)), tag="pytorch_model")
    set_seed(0)
    init = build_method(load_config(None, tiny_overrides(data, out))).student.state_dict()
    key = "head.last_layer.parametrizations.weight.original1"
    assert torch.equal(student[key], init[key])
    assert (student["head.mlp.0.weight"] - init["head.mlp.0.weight"]).abs().max() > 1e-5  # 2 Adam steps of lr 3e-5


@pytest.mark.parametrize("config", ["zero2_offload", "zero3_offload"])
def test_offload_configs_match_ddp(config, data, ddp_run):
    out = data.parent / config
    launch(["--use_deepspeed", "--deepspeed_config_file", str(ROOT / f"ds_configs/{config}.json"),
            "--num_processes", "2"], data, out, "train.max_steps=2")
    assert losses(out) == pytest.approx(losses(ddp_run)[:2], rel=1e-4, abs=1e-5)
