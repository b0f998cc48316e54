"""The ZeRO planner: its state accounting against the tensors of real 2-rank runs, its batch split,
its recommendation, and the launch files it writes (which must start a run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, make_image_folder, tiny_overrides
from selfdistill import plan_probe, planner as P
from selfdistill import strategy_memory as S


def test_deepspeed_configs_are_the_repository_files():
    for name, strategy in S.STRATEGIES.items():
        if strategy.deepspeed:
            assert S.deepspeed_config(strategy) == json.loads((ROOT / f"ds_configs/{name}.json").read_text()), name


@pytest.mark.parametrize("global_batch,ranks,max_micro", [(1024, 16, 40), (1024, 8, 128), (96, 2, 7), (60, 4, 1),
                                                          (8, 2, 100), (30, 3, 4)])
def test_split_reaches_the_global_batch_with_the_largest_micro_batch(global_batch, ranks, max_micro):
    micro, accumulation = P.split_batch(global_batch, ranks, max_micro)
    assert micro * ranks * accumulation == global_batch
    assert 1 <= micro <= max_micro
    # no larger micro-batch that fits splits the per-rank batch
    per_rank = global_batch // ranks
    assert not any(per_rank % m == 0 for m in range(micro + 1, min(max_micro, per_rank) + 1))


def test_split_refuses_what_cannot_be_split():
    with pytest.raises(ValueError, match="does not split over 3 ranks"):
        P.split_batch(1024, 3, 64)
    assert P.split_batch(64, 2, 0) == (0, 0)


def test_parse_bytes():
    assert P.parse_bytes("80GiB") == 80 * 2**30 and P.parse_bytes("40 GB") == 40 * 10**9
    assert P.parse_bytes("512MiB") == 512 * 2**20 and P.parse_bytes(1000) == 1000
    with pytest.raises(ValueError, match="memory size"):
        P.parse_bytes("lots")


def test_the_probe_child_is_no_entry_point(tmp_path):
    """The planner's probe starts its own module, which imports no CLI (the CLI calls the planner,
    never the other way round)."""
    cmd = plan_probe.probe_command(tmp_path / "r.yaml", tmp_path / "out", 1, False)
    assert cmd[1:3] == ["-m", "selfdistill.plan_probe"]
    code = "import sys, selfdistill.plan_probe; print([m for m in sys.modules if m.startswith('selfdistill.cli')])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]


def fake_profile(**kw) -> P.Profile:
    """A ViT-B-sized student (86 M + a 65536-prototype head) with measured-looking activations."""
    groups = [[768 * 768] * 100 + [768 * 65536 // 4], [768] * 200, [65536 * 256]]
    base = dict(recipe="fake", precision="bf16", optimizer="adamw", device="cpu", groups=groups, frozen=[65536],
                teacher_bytes=4 * sum(map(sum, groups)), teacher_partitioned=False, task_bytes=2**20,
                runtime_bytes=0, batches=(2, 4),
                fwd_bwd={"off": [2 * 2**30, 3 * 2**30], "on": [int(1.2 * 2**30), int(1.4 * 2**30)]},
                forward={"off": [int(1.8 * 2**30), int(2.7 * 2**30)], "on": [int(0.2 * 2**30), int(0.3 * 2**30)]},
                flops_per_sample=3e11)
    base.update(kw)
    return P.Profile(**base)


def test_plan_recommends_a_row_that_fits_and_reaches_the_global_batch():
    profile = fake_profile()
    target = P.Target(memory=40 * 2**30, gpus=8, nodes=1, global_batch=1024)
    rows, best = P.plan(profile, target)
    assert len(rows) == 2 * len(S.STRATEGIES) and best is not None
    for r in rows:
        if r.fits:
            assert r.micro_batch * target.ranks * r.accumulation == target.global_batch
            assert r.peak <= target.budget
            # one more sample would not fit, or the split did not need it
            assert r.micro_batch <= r.max_micro_batch
        assert P.predict_peak(profile, S.STRATEGIES[r.strategy], r.ckpt, 8, r.max_micro_batch + 1) > target.budget
    # ZeRO-3 holds less state per rank than DDP; checkpointing lets a larger micro-batch fit
    by = {(r.strategy, r.ckpt): r for r in rows}
    assert by[("zero3", False)].state < by[("ddp", False)].state
    assert by[("ddp", True)].max_micro_batch > by[("ddp", False)].max_micro_batch
    table = P.render(rows, best, profile, target)
    assert "recommended" in table and table.count("\n| ") == len(rows) + 1


def test_nothing_fits_a_tiny_device():
    rows, best = P.plan(fake_profile(), P.Target(memory=2 * 2**30, gpus=8, global_batch=1024))
    assert best is None and not any(r.fits for r in rows)
    assert "no strategy fits" in P.render(rows, best, fake_profile(), P.Target(memory=2 * 2**30))


def test_choose_names_a_row():
    rows, _ = P.plan(fake_profile(), P.Target(memory=80 * 2**30, gpus=8, global_batch=1024))
    i = P.choose(rows, "zero3:ckpt")
    assert rows[i].strategy == "zero3" and rows[i].ckpt
    with pytest.raises(ValueError, match="STRATEGY or STRATEGY:ckpt"):
        P.choose(rows, "zero4")


# -- real runs (2 gloo ranks) ---------------------------------------------------------------------------
def _measure(cmd: list[str], env: dict | None = None) -> None:
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]


SWIN_GLSD = {"method.name": "glsd", "model.name": "swin_tiny_patch4_window7_224", "model.img_size": 64,
             "model.patch_size": "null", "data.global_crop_size": 64, "data.local_crop_size": 64,
             "model.kwargs": "{depths: [1, 1, 1, 1], embed_dim: 24, num_heads: [1, 1, 1, 1], window_size: 2}"}


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    """Tiny recipes as YAML files with their student's parameter groups and buffers (a single-process
    probe): a ViT for DINO, and a Swin for GLSD (relative-position buffers)."""
    from selfdistill.recipe import load_config

    root = tmp_path_factory.mktemp("plan")
    data = make_image_folder(root / "img")
    made: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in made:
            extra = SWIN_GLSD if name == "glsd_swin" else {}
            recipe = root / f"{name}.yaml"
            recipe.write_text(load_config(None, tiny_overrides(data, root / "run", **extra)).to_yaml())
            _measure(plan_probe.probe_command(recipe, root / f"probe_{name}", 1, False))
            probe = json.loads((root / f"probe_{name}" / "rank0.json").read_text())
            made[name] = {"root": root, "recipe": recipe, "groups": probe["groups"], "frozen": probe["frozen"],
                          "buffers": probe["buffers"]}
        return made[name]

    return get


@pytest.fixture(scope="module")
def tiny(recipes) -> dict:
    return recipes("vit")


# Every strategy once in fp32 on the ViT; bf16 (2-byte weights beside fp32 masters) and buffers (Swin's
# relative-position tables) on the Swin, under the two ZeRO stages that treat them differently.
@pytest.mark.slow
@pytest.mark.parametrize("recipe,strategy,precision", [
    ("vit", "ddp", "fp32"), ("vit", "zero1", "fp32"), ("vit", "zero2", "fp32"), ("vit", "zero3", "fp32"),
    ("vit", "zero2_offload", "fp32"), ("vit", "zero3_offload", "fp32"),
    ("glsd_swin", "zero2", "bf16"), ("glsd_swin", "zero3", "bf16")])
def test_state_accounting_equals_the_tensors_of_a_real_two_rank_run(recipes, recipe, strategy, precision):
    """The launch files for one row, started with --measure-memory: every rank's student state,
    counted tensor by tensor after a step, is what state_bytes says (DeepSpeed's buffers included)."""
    tiny = recipes(recipe)
    assert recipe != "glsd_swin" or tiny["buffers"]  # Swin's relative-position tables and masks
    row = P.Row(strategy=strategy, ckpt=False, state=0, teacher=0, transient=0, activation_per_sample=0,
                max_micro_batch=2, micro_batch=2, accumulation=1, peak=0, comm_bytes=0, relative_time=1)
    target = P.Target(memory=8 * 2**30, gpus=2, global_batch=4, cpu=True)
    out = tiny["root"] / f"{recipe}_{strategy}_{precision}"
    files = P.write_launch(out / "launch", row, target, str(tiny["recipe"]), [f"train.precision={precision}"],
                           precision, 3.0, cpu=True)
    env = dict(os.environ, ACCELERATE=str(Path(sys.executable).with_name("accelerate")))
    _measure(["bash", str(files["launch"]), "--measure-memory", str(out / "m"), "--measure-steps", "1"], env)
    predicted = S.state_bytes(tiny["groups"], tiny["frozen"], 2, precision, "adamw", S.STRATEGIES[strategy],
                              buffers=tiny["buffers"])
    for rank in (0, 1):
        measured = json.loads((out / "m" / f"rank{rank}.json").read_text())
        assert measured["world_size"] == 2
        # a few bytes of 0-d bookkeeping tensors may be alive on one rank only
        assert abs(measured["state"]["student"] - sum(predicted.values())) <= 64, (predicted, measured["state"])


@pytest.mark.slow
def test_written_plan_launches_a_run(tiny):
    """selfdistill-plan --write on the tiny recipe (2 CPU ranks), then its launch.sh trains one step."""
    out = tiny["root"] / "written"
    cmd = [sys.executable, "-m", "selfdistill.cli.plan", "--config", str(tiny["recipe"]), "--cpu", "--gpus", "2",
           "--gpu-memory", "4GiB", "--global-batch", "16", "--strategies", "ddp", "zero2", "zero3",
           "--probe-batches", "1", "2", "--write", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "recommended" in r.stdout and (out / "launch.sh").is_file() and (out / "plan.json").is_file()
    plan = json.loads((out / "plan.json").read_text())
    row = plan["rows"][plan["recommended"]]
    assert row["micro_batch"] * 2 * row["accumulation"] == 16
    overrides = (out / "overrides.txt").read_text().split()
    assert f"train.batch_size_per_device={row['micro_batch']}" in overrides
    env = dict(os.environ, ACCELERATE=str(Path(sys.executable).with_name("accelerate")))
    _measure(["bash", str(out / "launch.sh"), "train.max_steps=1", f"train.output_dir={out / 'run'}"], env)
    assert (out / "run" / "export" / "student_backbone.safetensors").is_file()
    lines = [json.loads(x) for x in (out / "run" / "log.jsonl").read_text().splitlines()]
    assert any("loss" in x for x in lines)


def test_plan_without_memory_on_a_cpu_is_a_one_line_error(capsys):
    from selfdistill.cli.plan import main

    assert main(["--config", str(ROOT / "configs/demo.yaml"), "--cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--gpu-memory" in err
