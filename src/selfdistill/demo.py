"""The embedded demo: DINO on real images that arrive inside a package, no download at run time.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` (``make demo`` installs it when it
can); otherwise scikit-learn's digits are used, and the demo says so. The images are written once
as an image folder, so the demo runs the same data path as an ImageNet folder would.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from selfdistill.atomic import write_json_atomic

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot"]


def _read_idx(path: Path) -> np.ndarray:
    """The original IDX format: a magic number giving dtype/rank, the dimensions, then uint8 data."""
    raw = gzip.open(path, "rb").read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    return images, labels


def load_digits_split() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    cut = int(len(order) * 0.8)
    tr, te = order[:cut], order[cut:]
    return (images[tr], d.target[tr]), (images[te], d.target[te])


def _balanced_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    if n <= 0 or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = n // len(classes)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return np.sort(np.concatenate(picked))


def _write_folder(images: np.ndarray, labels: np.ndarray, classes: list[str], root: Path, size: int) -> None:
    tmp = root.with_name(root.name + ".tmp")
    for c in classes:
        (tmp / c).mkdir(parents=True, exist_ok=True)
    for i, (img, y) in enumerate(zip(images, labels)):
        pil = Image.fromarray(img, mode="L")
        if pil.size != (size, size):
            pil = pil.resize((size, size), Image.BICUBIC)
        pil.save(tmp / classes[int(y)] / f"{i:06d}.png")
    tmp.rename(root)


def prepare_demo_data(root: str | Path, n_train: int = 10000, n_test: int = 2000, size: int = 32) -> dict[str, Any]:
    """Write ``root/train`` and ``root/test`` class folders once; return what was written."""
    root = Path(root)
    info_path = root / "info.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    root.mkdir(parents=True, exist_ok=True)
    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        source, classes = "Fashion-MNIST (Debian dataset-fashion-mnist)", FASHION_CLASSES
        (tr_x, tr_y), (te_x, te_y) = load_fashion_mnist("train"), load_fashion_mnist("test")
    else:
        print("selfdistill demo: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist); "
              "using scikit-learn's 8x8 digits instead, so numbers are not comparable with Fashion-MNIST.")
        source, classes = "scikit-learn digits (fallback)", [str(i) for i in range(10)]
        (tr_x, tr_y), (te_x, te_y) = load_digits_split()
    tr = _balanced_subset(tr_y, n_train, seed=0)
    te = _balanced_subset(te_y, n_test, seed=1)
    for name, (x, y) in {"train": (tr_x[tr], tr_y[tr]), "test": (te_x[te], te_y[te])}.items():
        if not (root / name).is_dir():
            _write_folder(x, y, classes, root / name, size)
    info = {"source": source, "classes": classes, "n_train": int(len(tr)), "n_test": int(len(te)), "size": size,
            "train": str(root / "train"), "test": str(root / "test")}
    write_json_atomic(info_path, info, indent=1)
    return info


def compare_representations(config: Any, run_dir: Path) -> dict[str, Any]:
    """kNN top-1 of the pretrained teacher, the same backbone at random init, and raw pixels."""
    import torch

    from selfdistill.eval.knn_eval import KnnSetup, flatten_results, pixel_features
    from selfdistill.models import load_backbone

    setup = KnnSetup.from_config(config)
    torch.manual_seed(config.train.seed)
    rows = {}
    pretrained, _ = load_backbone(str(run_dir / "export" / "teacher_backbone.safetensors"))
    random_init, _ = load_backbone("random", config.model)
    rows["pretrained (DINO teacher)"] = setup.evaluate(pretrained)
    rows["random init"] = setup.evaluate(random_init)
    rows["raw pixels"] = flatten_results(setup.evaluate_features(pixel_features))
    return rows
