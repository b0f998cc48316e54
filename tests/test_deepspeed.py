"""DINO under DeepSpeed ZeRO-1/2/3 (and offload) on two CPU ranks (gloo), against the same run under DDP."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (DDP_2PROC, REPEATED_BATCH, accelerate_launch, make_image_folder, merged, tiny_overrides,
                      zero_launcher)
from selfdistill.engine import checkpoint as ckpt

pytest.importorskip("deepspeed")
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
LAST_LAYER = "head.last_layer.parametrizations.weight.original1"

# The repeated batch of conftest for 4 epochs = 4 optimizer steps (8 per rank x 2 ranks = one global
# batch); the last layer is frozen for the first epoch (= step).
REPEATED_4 = [*REPEATED_BATCH, "train.epochs=4"]


launch = accelerate_launch
zero = zero_launcher
DDP = DDP_2PROC


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]


def teacher(out: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_task_state(ckpt.latest_checkpoint(out))["teacher"]


def student(checkpoint: Path) -> dict[str, torch.Tensor]:
    return ckpt.student_state(checkpoint)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("ds") / "img")


@pytest.fixture(scope="module")
def ddp_run(data) -> Path:
    out = data.parent / "ddp"
    launch(DDP, data, out, *REPEATED_4)
    return out


@pytest.fixture(scope="module")
def initial_student(data) -> dict[str, torch.Tensor]:
    """The student every run starts from (the trainer seeds with train.seed before building)."""
    from accelerate.utils import set_seed

    from selfdistill.recipe import load_config
    from selfdistill.methods import build_method

    set_seed(0)
    config = load_config(None, merged(tiny_overrides(data, data.parent / "unused"), *REPEATED_4))
    return {k: v.clone() for k, v in build_method(config).student.state_dict().items()}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_like_ddp_and_resumes_exactly(stage, data, ddp_run, initial_student):
    """With activation checkpointing on (DDP's run has it off): the same losses, teacher, export."""
    out = data.parent / f"zero{stage}"
    launch(zero(stage), data, out, *REPEATED_4, "model.grad_checkpointing=true")
    summaries = [json.loads((out / f"rank_summary_{r}.json").read_text()) for r in (0, 1)]
    assert [s["world_size"] for s in summaries] == [2, 2]
    assert summaries[0]["student_sha256"] == summaries[1]["student_sha256"]

    # Finite, falling on the repeated batch, and DDP's values up to reduction order.
    got, want = losses(out), losses(ddp_run)
    assert len(got) == len(want) == 4 and all(torch.isfinite(torch.tensor(got)))
    assert all(b < a for a, b in zip(got, got[1:])), got
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)

    # The consolidated student export equals the student as gathered inside the run (ZeRO-3:
    # partitions merged by zero_to_fp32 vs GatheredParameters), tensor by tensor, bit for bit.
    exported = load_file(str(out / "export" / "student_backbone.safetensors"))
    gathered = summaries[0]["student_tensor_sha256"]
    backbone = {k.removeprefix("backbone.model."): h for k, h in gathered.items() if k.startswith("backbone.model.")}
    assert exported.keys() == backbone.keys()
    for k, v in exported.items():
        assert hashlib.sha256(v.float().numpy().tobytes()).hexdigest() == backbone[k], k

    # The EMA teacher tracks DDP's and moved from the initial weights towards the trained student.
    t, t_ddp, s = teacher(out), teacher(ddp_run), student(ckpt.latest_checkpoint(out))
    for k in t:
        assert torch.allclose(t[k], t_ddp[k], atol=1e-5), k
    for k in ("backbone.model.blocks.0.attn.qkv.weight", "head.mlp.0.weight"):
        assert not torch.equal(t[k], initial_student[k])
        assert (t[k] - s[k]).norm() < (initial_student[k] - s[k]).norm(), k

    # Stop after 1 step (the frozen epoch), resume: the same end state as the uninterrupted run.
    part = data.parent / f"zero{stage}_part"
    launch(zero(stage), data, part, *REPEATED_4, "model.grad_checkpointing=true", "train.max_steps=1")
    after_one = student(ckpt.latest_checkpoint(part))
    assert torch.equal(after_one[LAST_LAYER], initial_student[LAST_LAYER])  # frozen: lr=0 group
    assert not torch.equal(after_one["head.mlp.0.weight"], initial_student["head.mlp.0.weight"])
    assert not torch.equal(s[LAST_LAYER], initial_student[LAST_LAYER])  # and it trains afterwards
    launch(zero(stage), data, part, *REPEATED_4, "model.grad_checkpointing=true", "--resume", "auto")
    assert losses(part) == pytest.approx(got, rel=1e-6)
    for k, v in teacher(part).items():
        assert torch.allclose(v, t[k], atol=1e-6), k


@pytest.mark.parametrize("config", ["zero2_offload", "zero3_offload"])
def test_offload_configs_match_ddp(config, data, ddp_run):
    out = data.parent / config
    launch(zero(config), data, out, *REPEATED_4, "train.max_steps=2")
    assert losses(out) == pytest.approx(losses(ddp_run)[:2], rel=1e-4, abs=1e-5)


def test_nonfinite_micro_batch_is_skipped_like_ddp_with_accumulation(data):
    """DeepSpeed steps inside backward(); a NaN micro-batch in a 2-micro-batch window must skip the
    whole step and leave no stale gradients behind, exactly as under DDP (grad checkpointing on)."""
    script = ROOT / "tests/scripts/poisoned_pretrain.py"
    extra = ["train.grad_accum_steps=2", "model.grad_checkpointing=true"]
    runs = {}
    for name, launcher in (("ddp", DDP), ("zero2", zero(2))):
        out = data.parent / f"nan_{name}"
        launch(launcher, data, out, *extra, script=script)
        rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
        runs[name] = (out, rows)
    for name, (out, rows) in runs.items():
        assert [r["step"] for r in rows] == [1, 2], name  # step 1 was retried on the next window
        assert rows[-1]["skipped_steps"] == 1, name
    assert [r["loss"] for r in runs["zero2"][1]] == pytest.approx([r["loss"] for r in runs["ddp"][1]], rel=1e-4)
    s_ddp, s_ds = student(ckpt.latest_checkpoint(runs["ddp"][0])), student(ckpt.latest_checkpoint(runs["zero2"][0]))
    for k in s_ddp:
        assert torch.allclose(s_ds[k], s_ddp[k], atol=1e-5), k


def test_frozen_teacher_is_partitioned_under_zero3(data, tmp_path):
    """A frozen external teacher (SMD/FD) under ZeRO-3: each rank holds half, outputs are unchanged."""
    config = json.loads((ROOT / "ds_configs/zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny tensors
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([ACCELERATE, "launch", "--use_deepspeed", "--deepspeed_config_file", str(tmp_path / "zero3.json"),
                        "--num_processes", "2", str(ROOT / "tests/scripts/frozen_teacher.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["partitioned"] and not res["requires_grad"] and not res["training"]
        assert res["numel_per_rank"] <= res["numel"] / 2 + 64  # partitions are padded to the rank count
        assert res["max_abs_diff"] < 1e-5


def test_accelerate_yaml_repeating_deepspeed_keys_is_one_clear_error(data, tmp_path):
    yaml_path = tmp_path / "bad.yaml"
    yaml_path.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {ROOT / 'ds_configs/zero2.json'}\n  gradient_clipping: 1.0\n"
        "num_machines: 1\nnum_processes: 2\n")
    r = launch(["--config_file", str(yaml_path)], data, tmp_path / "run", check=False)
    assert r.returncode != 0
    assert "the accelerate config repeats gradient_clipping, which the DeepSpeed JSON" in r.stderr


def test_bf16_under_zero2_and_zero3_tracks_ddp_bf16(data):
    """DeepSpeed holds bf16 weights (the fp32 teacher shares the inputs, so the step runs under
    torch autocast) and the EMA reads DeepSpeed's fp32 master weights: DDP's bf16 run, closely."""
    runs = {}
    for name, launcher in (("ddp", DDP), ("zero2", zero(2)), ("zero3", zero(3))):
        out = data.parent / f"bf16_{name}"
        launch(launcher, data, out, "train.precision=bf16", "train.max_steps=2")
        runs[name] = (losses(out), teacher(out))
    for name in ("zero2", "zero3"):
        assert runs[name][0] == pytest.approx(runs["ddp"][0], rel=1e-2)
        for k, v in runs[name][1].items():
            assert torch.allclose(v, runs["ddp"][1][k], atol=5e-5), (name, k)
