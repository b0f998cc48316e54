"""The benchmark scripts keep working: a tiny memory benchmark end to end (two ranks, DDP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_memory_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "memory.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/memory.py"), "--models", "vit_tiny_patch16_224",
                        "--strategies", "ddp", "--local-crops", "1", "--steps", "1", "--batch", "1",
                        "--slope-batches", "1", "2", "--state-precision", "", "--workdir", str(tmp_path / "w"),
                        "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {(row["strategy"], row["checkpointing"]) for row in report["rows"]} == {("ddp", False), ("ddp", True)}
    for row in report["rows"]:
        # Weights (4 bytes) + DDP's gradient buckets (4) + AdamW state (8) per trainable parameter; the
        # frozen weight-norm gain of the DINO head (65536 values) has neither gradient nor Adam state.
        bytes_per_param = row["state_gib"] * 2**30 / row["student_parameters"]
        assert 15.5 < bytes_per_param < 17.0, bytes_per_param
        assert row["peak_gib"] > row["resident_gib"] > 0
    assert "| vit_tiny_patch16_224 | ddp | off |" in r.stdout


@pytest.mark.slow
def test_data_throughput_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "data.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/data_throughput.py"), "--images", "16", "--batch", "4",
                        "--batches", "1", "--workers", "1", "--formats", "folder", "wds", "--train-batch", "1",
                        "--train-steps", "1", "--workdir", str(tmp_path / "w"), "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {(row["format"], row["decode_size"], row["augment_on"]) for row in report["rows"]} == {
        (f, d, a) for f in ("folder", "wds") for d in (0, 160) for a in ("workers", "device")}
    assert all(row["images_per_s"] > 0 for row in report["rows"]) and report["train_vit_s16_images_per_s"] > 0
    assert all((row["device_ms_per_image"] > 0) == (row["augment_on"] == "device") for row in report["rows"])
    assert "| wds | 1 | full | device |" in r.stdout


@pytest.mark.slow
def test_gpu_check_script_runs_its_cpu_dry_mode(tmp_path):
    """benchmarks/gpu_check.sh is what a GPU machine runs; here its dry mode (CPU, tiny shapes)."""
    r = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry"], capture_output=True, text=True,
                       timeout=900, env=dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path)))
    assert r.returncode == 0, r.stderr[-3000:]
    train = json.loads((tmp_path / "gpu_check_train_dry.json").read_text())
    data = json.loads((tmp_path / "gpu_check_data_dry.json").read_text())
    assert train["rows"] and all(row["images_per_s"] > 0 for row in train["rows"])
    assert {row["augment_on"] for row in data["rows"]} == {"workers", "device"}
    assert all(row["device_ms_per_image"] > 0 for row in data["rows"] if row["augment_on"] == "device")
