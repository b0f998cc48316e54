"""``run_eval.py`` / ``selfdistill-eval``: evaluate or export trained weights.

    python run_eval.py knn --weights runs/dino/export/teacher_backbone.safetensors \\
        --data.path /data/imagenet/train --data.val_path /data/imagenet/val
    python run_eval.py export --checkpoint runs/dino --out teacher.safetensors
    python run_eval.py pictures --weights runs/dino --images photo.jpg   (see selfdistill.cli.pictures)
    python run_eval.py finetune --config configs/finetune_fd_vit_base16.yaml model.weights=W data.path=T data.val_path=V
    python run_eval.py linear --weights W --data.path TRAIN --data.val_path VAL [--recipe dino|smd]
    python run_eval.py retrieval --weights W --gnd /data/roxford5k/gnd_roxford5k.pkl
    python run_eval.py copydetect --weights W --data.path /data/copydays [--whitening-path DIR]
    python run_eval.py summary --weights W --protocols knn,linear --data.path TRAIN --data.val_path VAL
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from selfdistill.cli import dispatch
from selfdistill.config import ModelConfig

PROTOCOL_COMMANDS = ("linear", "retrieval", "copydetect")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_eval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    knn = sub.add_parser("knn", help="weighted kNN (DINO eval_knn) of a frozen backbone on labelled folders")
    knn.add_argument("--weights", required=True,
                     help="exported .safetensors, a checkpoint or run directory, 'random' (random init) "
                          "or 'pixels' (raw-pixel baseline)")
    knn.add_argument("--data.path", dest="train_path", required=True, help="labelled folder: the feature bank")
    knn.add_argument("--data.val_path", dest="val_path", required=True, help="labelled folder: the queries")
    knn.add_argument("--model.name", dest="model_name", help="timm name (needed for 'random'/'pixels' or bare files)")
    knn.add_argument("--model.img_size", dest="img_size", type=int)
    knn.add_argument("--model.patch_size", dest="patch_size", type=int)
    knn.add_argument("--image-size", type=int, default=224, help="center-crop size (resize to size*256/224 first)")
    knn.add_argument("--batch-size", type=int, default=128)
    knn.add_argument("--num-workers", type=int, default=4)
    knn.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200])
    knn.add_argument("--temperature", type=float, default=0.07)
    knn.add_argument("--max-train-samples", type=int, default=0, help="random subset of the bank (0: all)")
    knn.add_argument("--out", help="JSON results file (default: knn_results.json beside --weights or ./)")
    knn.add_argument("--cpu", action="store_true")

    exp = sub.add_parser("export", help="write a checkpoint's backbone (DINO: teacher, or the student) as safetensors")
    exp.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (latest)")
    exp.add_argument("--part", choices=["eval", "student"], default="eval",
                     help="eval: the evaluation backbone (DINO: the EMA teacher); student: the student, "
                          "consolidated from ZeRO partitions for a DeepSpeed checkpoint")
    exp.add_argument("--out", required=True, help="output .safetensors path")

    # Registered protocols (selfdistill.eval.protocols): their options dataclasses give the arguments.
    from selfdistill.cli.eval_protocols import add_protocol_command, add_summary_command

    for name in PROTOCOL_COMMANDS:
        add_protocol_command(sub, name)
    add_summary_command(sub)

    from selfdistill.cli import pictures  # attention, matching, attn-diagnostics, curves, pictures

    pictures.add_parsers(sub)

    from selfdistill.eval.finetune import add_arguments as finetune_arguments

    finetune_arguments(sub.add_parser("finetune", help="full fine-tuning with a fresh classifier (BEiT / FD recipe: "
                                                       "layer decay, RandAugment, mixup/cutmix, drop path)"))
    return p


def _model_cfg(args: argparse.Namespace) -> ModelConfig | None:
    if not args.model_name:
        return None
    return ModelConfig(name=args.model_name, img_size=args.img_size, patch_size=args.patch_size, drop_path_rate=0.0)


def run_knn(args: argparse.Namespace) -> int:
    import torch

    from selfdistill.config import Config, KnnConfig
    from selfdistill.eval.knn import format_knn_results, save_knn_results
    from selfdistill.eval.knn_eval import KnnSetup, pixel_features
    from selfdistill.export import load_backbone

    config = Config(knn=KnnConfig(train_path=args.train_path, val_path=args.val_path, k=args.k,
                                  temperature=args.temperature, image_size=args.image_size,
                                  batch_size=args.batch_size, max_train_samples=args.max_train_samples))
    config.data.num_workers = args.num_workers
    setup = KnnSetup.from_config(config)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if args.weights == "pixels":
        feature = "raw pixels"
        results = setup.evaluate_features(pixel_features, device)
    else:
        backbone, model_cfg = load_backbone(args.weights, _model_cfg(args))
        backbone.to(device).eval()
        feature = f"{model_cfg.name} pooled embedding (CLS for ViT, average pool otherwise)"
        results = setup.evaluate_features(lambda x: backbone(x).pooled, device)
    print(format_knn_results(results))
    out = Path(args.out) if args.out else (Path(args.weights).parent if Path(args.weights).exists() else Path(".")) / "knn_results.json"
    save_knn_results(results, out, temperature=args.temperature, feature=feature,
                     n_train=len(setup.train_set), n_test=len(setup.val_set),
                     extra={"weights": args.weights, "train_path": args.train_path, "val_path": args.val_path,
                            "image_size": args.image_size})
    print(f"results written to {out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from selfdistill.export import export_from_checkpoint

    path = export_from_checkpoint(args.checkpoint, args.out, args.part)
    print(f"wrote {path} (+ {path.with_suffix('.json').name})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from selfdistill.cli.eval_protocols import protocol_handlers, run_summary_command
    from selfdistill.cli.pictures import HANDLERS as picture_handlers
    from selfdistill.eval.finetune import run_command as run_finetune

    return dispatch({"knn": run_knn, "export": run_export, **protocol_handlers(PROTOCOL_COMMANDS),
                     "summary": run_summary_command, "finetune": run_finetune, **picture_handlers}, args)


if __name__ == "__main__":
    sys.exit(main())
