"""Two real gloo ranks on CPU through the command users type: `accelerate launch --num_processes 2`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_image_folder, merged, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _launch(prefix: list[str], data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [*prefix, str(ROOT / "run_pretrain.py"), *merged(tiny_overrides(data, out), *extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(out.parent))


def _check_two_ranks(out: Path) -> None:
    summaries = [json.loads((out / f"rank_summary_{r}.json").read_text()) for r in (0, 1)]
    assert [s["rank"] for s in summaries] == [0, 1]
    assert all(s["world_size"] == 2 for s in summaries)
    # Each epoch deals disjoint shards: the first epoch's indices of the two ranks do not overlap.
    per_epoch = 2 * 8  # two steps x batch 8 per rank and epoch (32 images / (8 x 2 ranks))
    first0 = summaries[0]["indices_seen"][:per_epoch]
    first1 = summaries[1]["indices_seen"][:per_epoch]
    assert not set(first0) & set(first1)
    assert len(set(first0) | set(first1)) == 32
    assert summaries[0]["student_sha256"] == summaries[1]["student_sha256"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # global batch 16 -> 2 steps per epoch


def test_accelerate_launch_num_processes_2_runs_two_gloo_ranks(tmp_path):
    data = make_image_folder(tmp_path / "img")
    out = tmp_path / "run"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    result = _launch([accelerate, "launch", "--num_processes", "2"], data, out)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_two_ranks(out)
    assert "re-launching 2 gloo ranks" in result.stderr


def test_accelerate_config_file_for_two_cpu_processes(tmp_path):
    data = make_image_folder(tmp_path / "img")
    out = tmp_path / "run"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    val = make_image_folder(tmp_path / "val", n_per_class=5, seed=2)
    result = _launch([accelerate, "launch", "--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml")],
                     data, out, f"knn.val_path={val}", "knn.every_epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    _check_two_ranks(out)
    assert "re-launching" not in result.stderr
    # Online kNN with features sharded over the two ranks and gathered back: colour-coded classes.
    knn = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "knn/" in line]
    assert len(knn) == 1 and knn[0]["knn/top1_k1"] == 100.0
    # One rank with the same per-device batch halves the global batch: refused, with the ways on.
    single = _launch([sys.executable], data, out, "--resume", "auto")
    assert single.returncode == 1
    assert "trained with global batch 16 (8 per device x 2 ranks x 1 accumulation)" in single.stderr
    assert "train.batch_size_per_device=16 train.grad_accum_steps=1" in single.stderr
    assert "--resume-elastic" in single.stderr

    # Another way on: consolidated student weights start a new one-rank run.
    from safetensors.torch import load_file

    from selfdistill.cli.evaluate import main as eval_main
    from selfdistill.engine import checkpoint as ckpt

    student = tmp_path / "student.safetensors"
    assert eval_main(["export", "--checkpoint", str(out), "--part", "student", "--out", str(student)]) == 0
    trained = load_file(str(ckpt.latest_checkpoint(out) / "model.safetensors"))
    exported = load_file(str(student))
    assert exported.keys() == {k.removeprefix("backbone.model.") for k in trained if k.startswith("backbone.")}
    assert all(torch.equal(v, trained["backbone.model." + k]) for k, v in exported.items())
    restart = _launch([sys.executable], data, tmp_path / "restart", f"model.pretrained={student}", "train.max_steps=1")
    assert restart.returncode == 0, restart.stderr[-3000:]


def test_two_machines_on_one_host_train_together(tmp_path):
    """Multi-node launch: two `accelerate launch` processes, machine ranks 0 and 1, one rendezvous."""
    import socket

    data = make_image_folder(tmp_path / "img")
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    env.pop("WORLD_SIZE", None)
    procs = [subprocess.Popen(
        [accelerate, "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank",
         str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
         str(ROOT / "run_pretrain.py"), *tiny_overrides(data, out)],
        env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    _check_two_ranks(out)


def test_two_ranks_stream_shards_with_two_workers_each(tmp_path):
    """Resampled shards, 2 ranks x 2 workers: equal batches per rank, so no rank waits at an epoch end."""
    from selfdistill.data.shard_inputs import folder_input
    from selfdistill.data.shard_writer import write_shards

    data = make_image_folder(tmp_path / "img")
    write_shards(tmp_path / "shards", folder_input(data), samples_per_shard=6, progress=False)  # 6 shards
    out = tmp_path / "run"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    result = _launch([accelerate, "launch", "--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml")],
                     tmp_path / "shards", out, "data.format=wds", "data.num_workers=2")
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads((out / f"rank_summary_{r}.json").read_text()) for r in (0, 1)]
    assert [s["samples_seen"] for s in summaries] == [32, 32]  # 32 images / (8 x 2 ranks) x 2 epochs x 8
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def test_fsdp_is_refused_with_the_zero3_alternative(monkeypatch):
    from selfdistill.engine.distributed import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match=r"FSDP is not supported.*ZeRO-3.*gpu_8_zero3.yaml"):
        make_accelerator("fp32", 1, True, [], None)


def test_a_launcher_precision_that_disagrees_with_the_recipe_is_refused(monkeypatch):
    from selfdistill.engine.distributed import make_accelerator

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ValueError, match=r"mixed precision bf16 .* train.precision=fp32; .*train.precision=bf16"):
        make_accelerator("fp32", 1, True, [], None)


def test_both_accelerate_launch_entry_points_are_recognised():
    """`accelerate launch` and Accelerate's `accelerate-launch` start the same launcher: the CPU re-launch
    and the launcher-death signal see either as the process that started the run."""
    from selfdistill.engine.distributed import _accelerate_launch_args as launch_args

    assert launch_args(["/v/bin/python", "/v/bin/accelerate", "launch", "--num_processes", "2", "x.py"]) == [
        "--num_processes", "2", "x.py"]
    assert launch_args(["/v/bin/python", "/v/bin/accelerate-launch", "--cpu", "x.py", "launch=1"]) == [
        "--cpu", "x.py", "launch=1"]
    assert launch_args(["/v/bin/python", "-m", "torch.distributed.run", "x.py"]) is None
