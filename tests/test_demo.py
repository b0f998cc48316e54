"""The demo: Fashion-MNIST's IDX reader and the scikit-learn fallback, OpenClipart as a labelled set, and
the whole `make demo` job on a tiny plan."""

import dataclasses
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfdistill import demo
from selfdistill.models import load_backbone as demo_backbone


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_and_fashion_mnist_folders(tmp_path, monkeypatch):
    src = tmp_path / "fm"
    src.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        images = rng.integers(0, 256, size=(n, 28, 28))
        labels = np.arange(n) % 10
        _write_idx(src / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setattr(demo, "FASHION_MNIST_DIR", src)
    x, y = demo.load_fashion_mnist("train")
    assert x.shape == (40, 28, 28) and y.shape == (40,) and list(y[:3]) == [0, 1, 2]

    info = demo.prepare_demo_data(tmp_path / "data", n_train=20, n_test=10, size=32)
    assert info["source"].startswith("Fashion-MNIST") and info["n_train"] == 20 and info["n_test"] == 10
    train_dir = tmp_path / "data" / "train"
    assert sorted(p.name for p in train_dir.iterdir()) == sorted(demo.FASHION_CLASSES)
    files = sorted(train_dir.rglob("*.png"))
    assert len(files) == 20 and Image.open(files[0]).size == (32, 32)
    # Prepared once: a second call reads info.json and writes nothing.
    assert demo.prepare_demo_data(tmp_path / "data") == json.loads((tmp_path / "data" / "info.json").read_text())


def test_falls_back_to_digits_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "FASHION_MNIST_DIR", tmp_path / "missing")
    info = demo.prepare_demo_data(tmp_path / "data", n_train=100, n_test=50, size=16)
    assert "digits" in info["source"]
    assert "using scikit-learn's 8x8 digits" in capsys.readouterr().out
    assert len(list((tmp_path / "data" / "test").rglob("*.png"))) == 50


def _clipart_tree(root, per_class=(12, 12, 12, 3), size=20):
    """Category folders of RGBA drawings: a coloured disc on a transparent background, one colour per
    category; a fourth category too small to be a class, and a dropped one (``special``)."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for c, n in enumerate(per_class):
        d = root / f"cat{c}" / "sub"
        d.mkdir(parents=True)
        for i in range(n):
            img = Image.new("RGBA", (size + i, size), (0, 0, 0, 0))
            img.paste(Image.new("RGBA", (size // 2, size // 2), (*colours[c], 255)), ((size + i - size // 2) // 2, size // 4))
            img.save(d / f"{i}.png")
    (root / "special").mkdir()
    Image.new("RGBA", (8, 8), (0, 0, 0, 255)).save(root / "special" / "x.png")
    return root


def test_openclipart_classes_split_and_white_background(tmp_path, monkeypatch):
    root = _clipart_tree(tmp_path / "png")
    (root / "cat0" / "sub" / "broken.png").write_bytes(b"not a png")
    monkeypatch.setattr(demo, "OPENCLIPART_MAX_PIXELS", 30 * 20)  # drawings 31+ px wide are "too large"
    (tr_x, tr_y), (te_x, te_y), classes = demo.load_openclipart(16, min_per_class=5, max_per_class=10,
                                                                test_fraction=0.3, root=root)
    assert classes == ["cat0", "cat1", "cat2"]  # cat3 has too few, special is dropped
    assert tr_x.shape[1:] == (16, 16, 3) and tr_x.dtype == np.uint8
    assert len(te_y) == 9 and len(tr_y) == 21 and sorted(set(te_y)) == [0, 1, 2]  # 3 of 10 per class held out
    corners = np.concatenate([tr_x[:, 0, 0], te_x[:, -1, -1]])
    assert (corners == 255).all()  # transparency composited on white (not black), padding white too
    centre = tr_x[tr_y == 1][:, 8, 8]
    assert (centre[:, 1] > 150).all() and (centre[:, 0] < 100).all()  # the drawing itself is kept
    again = demo.load_openclipart(16, min_per_class=5, max_per_class=10, root=root)
    assert np.array_equal(again[0][0], tr_x)  # the same draw and split every time


def test_openclipart_demo_data_and_missing_package(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "OPENCLIPART_DIR", tmp_path / "missing")
    try:
        demo.prepare_demo_data(tmp_path / "d", dataset="openclipart")
    except FileNotFoundError as e:
        assert "apt-get install" in str(e) and "openclipart-png" in str(e)
    else:
        raise AssertionError("a missing openclipart-png must be a clear error")
    monkeypatch.setattr(demo, "OPENCLIPART_DIR", _clipart_tree(tmp_path / "png", per_class=(60, 45, 41, 3)))
    info = demo.prepare_demo_data(tmp_path / "d", size=24, dataset="openclipart")
    assert info["classes"] == ["cat0", "cat1", "cat2"] and info["n_train"] + info["n_test"] == 146
    img = Image.open(next((tmp_path / "d" / "train" / "cat1").iterdir()))
    assert img.mode == "RGB" and img.size == (24, 24)


@pytest.mark.slow
def test_make_demo_job_on_a_tiny_plan(tmp_path, monkeypatch):
    """``python -m selfdistill.demo``: writes the images, trains DINO and the FD student from the real
    EfficientNet-Lite0 (the demo's recipes, shortened), and keeps one readable row per representation."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.setattr(demo, "OPENCLIPART_DIR", _clipart_tree(tmp_path / "png", per_class=(40, 40, 40, 3)))
    short = ("train:\n  epochs: 1\n  batch_size_per_device: 14\n  progress_bar: false\n  trackers: []\n"
             "data:\n  num_workers: 0\n  global_crop_size: 16\n  local_crop_size: 8\n  n_local_crops: 1\n"
             "knn:\n  every_epochs: 1\n  image_size: 16\n")
    runs = {}
    for run, (name, recipe) in demo.DEMO_PLAN["openclipart"].runs.items():
        short_recipe = tmp_path / Path(recipe).name
        short_recipe.write_text(f"base: {root / recipe}\n" + short)
        runs[run] = (name, str(short_recipe))
    plan = dataclasses.replace(demo.DEMO_PLAN["openclipart"], image_size=32, student_size=16, ks=(3, 5), runs=runs)
    monkeypatch.setitem(demo.DEMO_PLAN, "openclipart", plan)
    monkeypatch.chdir(root)  # the recipes' bases and the pypi: teacher resolve from the repository
    out = tmp_path / "demo"
    assert demo.main(["--data", "openclipart", "--out", str(out), "--data-dir", str(tmp_path / "data")]) == 0
    rows = json.loads((out / "demo_results.json").read_text())
    names = list(rows)
    assert names[0] == "raw pixels (16 px)" and names[1] == "random init (resnet10t)"
    assert any("student distilled from EfficientNet-Lite0" in n for n in names)
    assert any(n.startswith("DINO") for n in names) and names[-1].startswith("EfficientNet-Lite0 teacher")
    for r in rows.values():
        assert set(r) >= {"top1_k3", "top1_k5"} and all(0 <= v <= 100 for v in r.values())
    info = json.loads((out / "demo_info.json").read_text())
    assert info["parameters"]["teacher"] == 3_371_008  # EfficientNet-Lite0 without its ImageNet classifier
    student, _ = demo_backbone(str(out / "student"))
    assert info["parameters"]["student"] == sum(p.numel() for p in student.parameters())
    assert (out / "demo_results.png").stat().st_size > 1000
    assert (out / "student" / "export" / "student_backbone.safetensors").is_file()
