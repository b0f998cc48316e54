"""The two entry points as users call them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from conftest import make_image_folder, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=str(cwd), timeout=600)


def test_pretrain_export_and_knn_commands(tmp_path):
    train = make_image_folder(tmp_path / "train")
    val = make_image_folder(tmp_path / "val", n_per_class=5, seed=3)
    out = tmp_path / "run"
    r = run(str(ROOT / "run_pretrain.py"), *tiny_overrides(train, out, **{"train.max_steps": 2}), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]

    exported = tmp_path / "teacher.safetensors"
    r = run(str(ROOT / "run_eval.py"), "export", "--checkpoint", str(out), "--out", str(exported), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    from safetensors.torch import load_file

    a = load_file(str(exported))
    b = load_file(str(out / "export" / "teacher_backbone.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    for weights in (str(exported), "pixels"):
        res = tmp_path / f"knn_{Path(weights).stem}.json"
        r = run(str(ROOT / "run_eval.py"), "knn", "--weights", weights, "--data.path", str(train),
                "--data.val_path", str(val), "--image-size", "16", "--k", "1", "3", "--num-workers", "0",
                "--out", str(res), cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        data = json.loads(res.read_text())
        assert data["protocol"]["temperature"] == 0.07 and data["protocol"]["n_test"] == 10
        assert set(data["results"]) == {"1", "3"}
    # Raw pixels of colour-coded classes are perfectly separable.
    assert json.loads((tmp_path / "knn_pixels.json").read_text())["results"]["1"]["top1"] == 100.0


def test_knn_refuses_unlabelled_folder(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    make_image_folder(tmp_path / "lab")
    for p in (tmp_path / "lab" / "a").iterdir():
        p.rename(flat / p.name)
    r = run(str(ROOT / "run_eval.py"), "knn", "--weights", "pixels", "--data.path", str(flat),
            "--data.val_path", str(tmp_path / "lab"), "--num-workers", "0", cwd=tmp_path)
    assert r.returncode == 2
    assert "no class sub-folders" in r.stderr
