"""Training-throughput benchmark (ours vs lightly) and the speed options of the loop: each option
must leave the losses as they were."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import logged_losses, make_image_folder, run_training

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.name=vit_tiny_patch16_224", "model.img_size=16", "model.patch_size=4",
        "model.kwargs={depth: 2, embed_dim: 32, num_heads: 2}", "method.out_dim=64", "method.head_hidden_dim=32",
        "method.head_bottleneck_dim=16", "data.global_crop_size=16", "data.local_crop_size=8", "data.n_local_crops=2"]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lightly_installed() -> bool:
    return _load_script("train_throughput").lightly_available()


def _bench_args(out: Path, *extra: str) -> list[str]:
    return ["--config", "configs/dino_vit_small16.yaml", "--name", "tiny", "--batch", "2", "--precision", "fp32",
            "--steps", "2", "--warmup", "1", "--repeats", "1", "--threads", "1", "--out", str(out), *extra, *TINY]


# -- the benchmark script ------------------------------------------------------------------------
def test_benchmark_script_ours_against_lightly(tmp_path):
    """Two steps of the tiny recipe through the script: ours (run_pretrain.py --benchmark) and, when
    lightly is installed (make bench-env), both lightly steps, which must do the same model FLOPs."""
    out = tmp_path / "train.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/train_throughput.py"), *_bench_args(out)],
                       capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["impl"]: row for row in json.loads(out.read_text())["rows"]}
    ours = rows["selfdistill"]
    assert ours["crops"] == "2x16+2x8" and ours["batch"] == 2 and ours["threads"] == 1 and ours["repeats"] == 1
    assert ours["images_per_s"] > 0 and ours["images_per_cpu_s"] > 0 and ours["peak_memory_gib"] > 0
    assert set(ours["phases_s"]) == {"data", "forward", "backward", "optimizer", "ema", "other"}
    assert ours["phases_s"]["forward"] > 0 and ours["phases_s"]["backward"] > 0 and ours["phases_s"]["ema"] > 0
    assert ours["flops_per_step"] > 0 and 0 < ours["flops_fraction"] and ours["matmul_flops_per_s"] > 0
    assert "| tiny | 2x16+2x8 | 2 | fp32 | selfdistill |" in r.stdout
    if not _lightly_installed():
        assert set(rows) == {"selfdistill"} and "lightly is not installed" in r.stderr
        return
    assert set(rows) == {"selfdistill", "lightly-docs", "lightly-batched"}
    for name in ("lightly-docs", "lightly-batched"):
        base = rows[name]
        assert base["ours_over_this"] > 0 and base["ours_over_this_cpu"] > 0
        # Same backbone, head, crops and batch: the same model FLOPs (lightly's loss adds one small einsum).
        assert base["flops_per_step"] == pytest.approx(ours["flops_per_step"], rel=0.01)
        assert base["student_parameters"] == ours["student_parameters"]
    assert f"| tiny | 2x16+2x8 | 2 | fp32 | lightly-docs | {rows['lightly-docs']['images_per_s']:.3f} |" in r.stdout


def test_benchmark_script_without_lightly_reports_ours_alone(tmp_path, monkeypatch, capsys):
    script = _load_script("train_throughput")
    monkeypatch.setattr(script, "lightly_available", lambda: False)
    out = tmp_path / "train.json"
    assert script.main(_bench_args(out)) == 0
    assert [row["impl"] for row in json.loads(out.read_text())["rows"]] == ["selfdistill"]
    assert "lightly is not installed" in capsys.readouterr().err


def test_lightly_baseline_refuses_cleanly_without_lightly(tmp_path):
    code = ("import sys, runpy; sys.modules['lightly'] = None; sys.argv = ['lightly_dino.py', '--steps', '1']; "
            f"runpy.run_path({str(ROOT / 'benchmarks/lightly_dino.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 3 and "make bench-env" in r.stderr


def test_cli_benchmark_flag_prints_the_report(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(ROOT / "run_pretrain.py"), *TINY, "train.batch_size_per_device=2",
                        "--benchmark", "2", "--benchmark-json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["steps"] == 2 and len(report["step_s"]) == 2 and report["data"] == "synthetic"
    assert "images/s" in r.stdout and "per step (ms): data" in r.stdout and "% of it" in r.stdout
    assert not list(tmp_path.glob("runs")), "a benchmark must not write a run directory"


# -- measuring ---------------------------------------------------------------------------------------
def test_step_timer_charges_phases_and_skips_warmup(monkeypatch):
    from selfdistill.engine import throughput

    clock = iter([0.0, 1.0, 3.0,  # warm-up step: data 1, forward 2, then 0.5 more (skipped)
                  3.5, 3.75, 4.0, 7.0, 8.0, 9.0])  # data .25, forward .25, backward 3, ema 1, other 1
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    timer = throughput.StepTimer("cpu", skip=1)
    timer.start(); timer.mark("data"); timer.mark("forward")
    timer.start(); timer.mark("data"); timer.mark("forward"); timer.mark("backward"); timer.mark("ema")
    timer.stop()
    s = timer.summary()
    assert s["step_s"] == [5.5]
    assert s["phases_s"] == {"data": 0.25, "forward": 0.25, "backward": 3.0, "optimizer": 0.0, "ema": 1.0, "other": 1.0}


def test_flop_counter_counts_linear_and_cpu_attention():
    from selfdistill.engine.throughput import count_flops

    lin = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    _, fwd = count_flops(lambda: lin(x))
    assert fwd == 2 * 4 * 16 * 8
    _, both = count_flops(lambda: lin(x).sum().backward())
    assert both == 2 * fwd  # weight gradient only: the input needs none

    q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))
    _, att = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert att == 2 * (2 * 2 * 8 * 8 * 4)  # QK^T and PV, 2 heads, 8 tokens, head dim 4
    _, att_both = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward())
    assert att_both == att + 5 * att // 2  # backward: recomputed scores + 4 products


def test_matmul_rate_is_measured():
    from selfdistill.engine.throughput import matmul_flops_per_s

    r = matmul_flops_per_s("fp32", "cpu", size=128, repeats=3)
    assert r["flops_per_s"] > 1e6 and r["flops_per_cpu_s"] > 1e6


# -- optimisations leave the loss unchanged ----------------------------------------------------------
pytestmark_train = pytest.mark.usefixtures("fresh_accelerate_state")


@pytestmark_train
def test_fused_optimizer_gives_the_same_training(tmp_path):
    data = make_image_folder(tmp_path / "img")
    run_training(data, tmp_path / "fused", "train.max_steps=4", "optim.fused=true")
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True), GradientState._reset_state(), PartialState._reset_state()
    run_training(data, tmp_path / "loop", "train.max_steps=4", "optim.fused=false")
    fused, loop = logged_losses(tmp_path / "fused"), logged_losses(tmp_path / "loop")
    assert len(fused) == 4 and fused == pytest.approx(loop, rel=1e-5, abs=1e-6)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "fused/export/student_backbone.safetensors"))
    b = load_file(str(tmp_path / "loop/export/student_backbone.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_ema_update_is_the_momentum_average():
    from selfdistill.params import ema_update

    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t0, t1, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * s.detach(), atol=1e-7)
    ema_update(teacher, student, 1.0)  # momentum 1 keeps the teacher exactly
    ema_update(teacher, student, 0.0)  # momentum 0 copies the student exactly
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))


def test_channels_last_resnet_same_outputs_and_names():
    from selfdistill.models import Backbone

    torch.manual_seed(0)
    kw = dict(channels=(8, 16, 16, 16), stem_width=8)
    a = Backbone("resnet18", None, None, channels_last=False, **kw)
    b = Backbone("resnet18", None, None, channels_last=True, **kw)
    b.load_state_dict(a.state_dict())
    assert b.channels_last and b.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert list(a.state_dict()) == list(b.state_dict())
    # 8 images of 64 px: training-mode BatchNorm over 2 values of a 1x1 map would amplify rounding.
    x = torch.randn(8, 3, 64, 64)
    ya, yb = a(x), b(x)
    assert torch.allclose(ya.pooled, yb.pooled, atol=1e-5) and torch.allclose(ya.tokens, yb.tokens, atol=1e-5)
    ya.pooled.sum().backward(), yb.pooled.sum().backward()
    assert torch.allclose(a.model.conv1.weight.grad, b.model.conv1.weight.grad, atol=1e-4)
    vit = Backbone("vit_tiny_patch16_224", 16, 4, channels_last=True, depth=1, embed_dim=32, num_heads=2)
    assert not vit.channels_last  # a patch-embedding convolution alone is not a CNN


@pytestmark_train
def test_channels_last_resnet_trains_checkpoints_and_exports(tmp_path):
    data = make_image_folder(tmp_path / "img")
    out = tmp_path / "run"
    run_training(data, out, "train.max_steps=2", "model.name=resnet18", "model.img_size=null",
                 "model.kwargs={channels: [8, 16, 16, 16], stem_width: 8}", "model.patch_size=null")
    assert len(logged_losses(out)) == 2 and all(torch.isfinite(torch.tensor(logged_losses(out))))
    assert (out / "export/student_backbone.safetensors").is_file()


def test_keep_freed_memory_respects_malloc_variables(monkeypatch):
    from selfdistill.engine.memory import keep_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # e.g. the memory benchmark measuring live memory
    assert keep_freed_memory() is False


@pytest.mark.slow
@pytestmark_train
def test_compiled_backbones_train_like_eager_ones(tmp_path):
    """train.compile on a CPU: torch.compile (inductor, C++) on a 2-block ViT, same losses."""
    data = make_image_folder(tmp_path / "img")
    run_training(data, tmp_path / "eager", "train.max_steps=3")
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True), GradientState._reset_state(), PartialState._reset_state()
    run_training(data, tmp_path / "compiled", "train.max_steps=3", "train.compile=true")
    assert logged_losses(tmp_path / "compiled") == pytest.approx(logged_losses(tmp_path / "eager"), rel=1e-4)


def test_crops_label_reads_the_views_of_the_batch():
    from selfdistill.engine.throughput import batch_crops_label

    multicrop = {"crops": [torch.zeros(2, 3, 16, 16)] * 2 + [torch.zeros(2, 3, 8, 8)] * 3}
    assert batch_crops_label(multicrop) == "2x16+3x8"
    assert batch_crops_label({"image": torch.zeros(2, 3, 224, 224)}) == "1x224"  # FD: one view, no local crops
