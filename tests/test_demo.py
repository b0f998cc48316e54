"""The demo's data preparation: Fashion-MNIST's IDX reader and the scikit-learn fallback."""

import gzip
import json

import numpy as np
from PIL import Image

from selfdistill import demo


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
