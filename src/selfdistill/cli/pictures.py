"""``run_eval.py`` picture sub-commands: attention, matching, attn-diagnostics, curves, pictures.

Each writes PNGs (and JSON numbers) into one directory, by default the run's ``pictures/``, and
regenerates ``index.html`` there, which shows every PNG of the directory with its caption.

    python run_eval.py attention --weights runs/dino --images photo.jpg --image-size 480
    python run_eval.py matching --weights runs/dino --images photo.jpg --pair a.jpg b.jpg
    python run_eval.py attn-diagnostics --weights runs/dino --images /data/val --max-images 64
    python run_eval.py curves --run runs/dino [--knn-each-checkpoint]
    python run_eval.py pictures --weights runs/dino --images photo.jpg other.jpg
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_COMMANDS = ("attention", "matching", "attn-diagnostics", "curves", "pictures")


# --------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------


def _weights_args(p: argparse.ArgumentParser, images: bool = True) -> None:
    p.add_argument("--weights", required=True,
                   help="exported .safetensors, a checkpoint or run directory, a local timm weights file "
                        "(with --model.name) or 'random' (with --model.name)")
    p.add_argument("--model.name", dest="model_name", help="timm name (for 'random' or files without metadata)")
    p.add_argument("--model.img_size", dest="img_size", type=int)
    p.add_argument("--model.patch_size", dest="patch_size", type=int)
    p.add_argument("--model.kwargs", dest="model_kwargs", default="{}",
                   help="JSON dict of extra timm kwargs, e.g. '{\"depth\": 2}'")
    if images:
        p.add_argument("--images", nargs="+", default=[], help="image files and/or folders (searched recursively)")
        p.add_argument("--image-size", type=int,
                       help="square input side (short side resized, centre crop); default: the model's size")
    p.add_argument("--out", help="output directory (default: the run's pictures/ beside --weights)")
    p.add_argument("--cpu", action="store_true")


def _attention_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threshold", type=float, default=0.6, help="DINO's mass kept by the masks (0.6 in the paper)")
    p.add_argument("--max-images", type=int, default=8, help="attention pictures for at most this many images")


def _matching_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="match two different images (repeatable)")
    p.add_argument("--top-k", type=int, default=20, help="lines for the most similar mutual nearest neighbours")
    p.add_argument("--seed", type=int, default=0, help="seed of the two random crops of each image")
    p.add_argument("--scale", type=float, nargs=2, default=(0.4, 1.0), help="crop area range (global crops)")
    p.add_argument("--max-views", type=int, default=4, help="two-view pictures for at most this many images")
    p.add_argument("--foreground", type=float, default=0.0,
                   help="ViT: match only patches holding this mass of the CLS attention (e.g. 0.6; 0: all)")


def _diagnostics_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-diagnostic-images", type=int, default=64, help="images averaged over")
    p.add_argument("--radius", type=int, nargs="+", default=[0, 1], help="diagonality neighbourhoods (patches)")
    p.add_argument("--batch-size", type=int, default=16)


def _curves_args(p: argparse.ArgumentParser, run_required: bool) -> None:
    p.add_argument("--run", required=run_required, help="run directory (its log.jsonl and checkpoints/)")
    p.add_argument("--knn-each-checkpoint", action="store_true",
                   help="also run kNN on every checkpoint's evaluation backbone (cached in checkpoint_knn.json)")
    p.add_argument("--data.path", dest="train_path", help="kNN bank (default: the run's knn.train_path/data.path)")
    p.add_argument("--data.val_path", dest="val_path", help="kNN queries (default: the run's knn.val_path)")
    p.add_argument("--k", type=int, nargs="+", help="default: the run's knn.k")
    p.add_argument("--knn-image-size", type=int, help="default: the run's knn.image_size")
    p.add_argument("--num-workers", type=int, default=2)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attention", help="DINO attention pictures: last-block CLS attention per head, 60%% masks")
    _weights_args(p)
    _attention_args(p)
    p = sub.add_parser("matching", help="lines between mutual-nearest patch tokens of two views / two images")
    _weights_args(p)
    _matching_args(p)
    p = sub.add_parser("attn-diagnostics", help="FD diagnostics: attention distance per head/layer, diagonality")
    _weights_args(p)
    _diagnostics_args(p)
    p = sub.add_parser("curves", help="kNN / linear curves of a run (optionally kNN of every checkpoint)")
    _curves_args(p, run_required=True)
    p.add_argument("--out", help="output directory (default: RUN/pictures)")
    p.add_argument("--cpu", action="store_true")
    p = sub.add_parser("pictures", help="all pictures of a backbone (and its run's curves) plus index.html")
    _weights_args(p)
    _attention_args(p)
    _matching_args(p)
    _diagnostics_args(p)
    _curves_args(p, run_required=False)


# --------------------------------------------------------------------------------------------
# Shared set-up
# --------------------------------------------------------------------------------------------


def _run_dir_of(weights: str) -> Path | None:
    """The run directory ``weights`` belongs to, if any (a run, a checkpoint, or run/export/x.safetensors)."""
    p = Path(weights)
    for cand in (p, p.parent.parent):
        if cand.is_dir() and ((cand / "log.jsonl").is_file() or (cand / "checkpoints").is_dir()):
            return cand
    return None


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    run = Path(args.run) if getattr(args, "run", None) else _run_dir_of(args.weights)
    if run is not None:
        return run / "pictures"
    p = Path(args.weights)
    return (p if p.is_dir() else p.parent) / "pictures" if p.exists() else Path("pictures")


def _device(args: argparse.Namespace):
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")


def _load(args: argparse.Namespace) -> tuple[Any, Any, tuple, tuple]:
    """The backbone (eval mode, on the device), its model config and the normalisation of its run."""
    from selfdistill.config import ModelConfig
    from selfdistill.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
    from selfdistill.export import load_backbone

    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model.kwargs is not JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model.kwargs must be a JSON object, got {args.model_kwargs!r}")
    cfg = (ModelConfig(name=args.model_name, img_size=args.img_size, patch_size=args.patch_size, drop_path_rate=0.0,
                       kwargs=kwargs) if args.model_name else None)
    backbone, model_cfg = load_backbone(args.weights, cfg)
    backbone.to(_device(args)).eval()
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    run = _run_dir_of(args.weights)
    if run is not None and (run / "config.yaml").is_file():
        from selfdistill.config import load_config

        data = load_config(run / "config.yaml").data
        mean, std = tuple(data.mean), tuple(data.std)
    return backbone, model_cfg, mean, std


def _image_size(args: argparse.Namespace, backbone: Any, model_cfg: Any) -> int:
    if args.image_size:
        return args.image_size
    if model_cfg.img_size:
        return int(model_cfg.img_size)
    size = getattr(getattr(backbone.model, "patch_embed", None), "img_size", None)
    return int(size[0] if isinstance(size, (tuple, list)) else size) if size else 224


def _has_attention(backbone: Any) -> bool:
    """A ViT-like model: timm attention blocks over all tokens (not Swin's windows)."""
    model = backbone.model
    return hasattr(model, "patch_embed") and any(n.endswith("attn.attn_drop") for n, _ in model.named_modules()) \
        and not any("window" in type(m).__name__.lower() for m in model.modules())


def _finish(args: argparse.Namespace, out: Path, written: list[Path]) -> None:
    from selfdistill.eval.pictures import write_index

    what = getattr(args, "weights", None) or args.run
    index = write_index(out, title=f"selfdistill pictures: {what}")
    for w in written:
        print(f"wrote {w}")
    print(f"index: {index}")


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _attention(args, backbone, model_cfg, mean, std, out: Path) -> list[Path]:
    from selfdistill.eval.pictures import attention_picture, find_images, register_picture, write_json

    size = _image_size(args, backbone, model_cfg)
    written, summary = [], {}
    for i, img in enumerate(find_images(args.images, args.max_images)):
        png = out / f"attention_{i:02d}_{img.stem}.png"
        res = attention_picture(backbone, img, png, size, args.threshold, _device(args), mean, std)
        register_picture(out, png, f"{img.name}: last-block CLS attention of each head (top) and the patches "
                                   f"holding {args.threshold:.0%} of each head's attention mass (bottom), "
                                   f"{size} px input", "attention")
        summary[img.name] = {"picture": png.name, "kept_fraction_per_head": res["kept_fraction"]}
        written.append(png)
    written.append(write_json(out / "attention.json", {"weights": args.weights, "image_size": size,
                                                        "threshold": args.threshold, "images": summary}))
    return written


def _matching(args, backbone, model_cfg, mean, std, out: Path) -> list[Path]:
    from selfdistill.eval.pictures import (
        _open_rgb,
        find_images,
        load_image,
        matching_picture,
        random_view,
        register_picture,
        write_json,
    )

    size = _image_size(args, backbone, model_cfg)
    written, summary = [], {}
    images = find_images(args.images, args.max_views) if args.images else []
    for i, img in enumerate(images):
        src = _open_rgb(img)
        v1, box1, f1 = random_view(src, size, args.seed + 2 * i, args.scale)
        v2, box2, f2 = random_view(src, size, args.seed + 2 * i + 1, args.scale)
        png = out / f"matching_{i:02d}_{img.stem}.png"
        res = matching_picture(backbone, v1, v2, png, args.top_k, _device(args), title=f"{img.name}: two random crops",
                               geometry=(box1, f1, box2, f2), foreground=args.foreground, mean=mean, std=std)
        st = res["stats"]
        extra = (f"; mean distance between matched positions {st['mean_error_src_px']:.1f} source px, "
                 f"{st['fraction_within_cell']:.0%} within one patch cell ({st['cell_src_px']:.1f} px)"
                 if st["n_matches"] else "")
        register_picture(out, png, f"{img.name}: two random crops (boxes {box1}{' flipped' if f1 else ''} and {box2}"
                                   f"{' flipped' if f2 else ''}, top/left/height/width); lines join the "
                                   f"{st['n_matches']} most similar mutually nearest patch tokens{extra}", "matching")
        summary[png.name] = st
        written.append(png)
    for j, (a, b) in enumerate(args.pair):
        png = out / f"matching_pair_{j:02d}_{Path(a).stem}_{Path(b).stem}.png"
        res = matching_picture(backbone, load_image(a, size)[0], load_image(b, size)[0], png, args.top_k,
                               _device(args), title=f"{Path(a).name} vs {Path(b).name}", foreground=args.foreground,
                               mean=mean, std=std)
        register_picture(out, png, f"{Path(a).name} vs {Path(b).name}: lines join the {res['stats']['n_matches']} "
                                   "most similar mutually nearest patch tokens", "matching")
        summary[png.name] = res["stats"]
        written.append(png)
    if not written:
        raise ValueError("matching needs --images (two random crops of each) and/or --pair A B")
    written.append(write_json(out / "matching.json", {"weights": args.weights, "image_size": size,
                                                       "top_k": args.top_k, "pictures": summary}))
    return written


def _diagnostics(args, backbone, model_cfg, mean, std, out: Path) -> list[Path]:
    from selfdistill.eval.pictures import diagnostics_pictures, find_images, register_picture

    size = _image_size(args, backbone, model_cfg)
    images = find_images(args.images, args.max_diagnostic_images)
    res = diagnostics_pictures(backbone, images, out, size, args.batch_size, args.radius, _device(args), mean, std)
    n = res["n_images"]
    register_picture(out, out / "attn_distance.png",
                     f"Average attention distance (px, between patch centres, CLS excluded) of every head against "
                     f"layer, and the attention mass on the diagonal / within {max(args.radius)} patch(es), over {n} "
                     f"images at {size} px", "attention diagnostics")
    register_picture(out, out / "attn_mean_maps.png",
                     f"Patch-to-patch attention averaged over {n} images, per layer (rows) and head (columns): "
                     "a bright diagonal means local, position-driven attention", "attention diagnostics")
    return [out / "attn_distance.png", out / "attn_mean_maps.png", out / "attn_diagnostics.json"]


def _checkpoint_knn(args, run: Path, out: Path) -> dict[str, list[tuple[float, float]]]:
    """kNN top-1 of every checkpoint's evaluation backbone; results cached per checkpoint."""
    from tqdm import tqdm

    from selfdistill.config import load_config
    from selfdistill.engine.checkpoint import CONFIG, PREFIX, list_checkpoints
    from selfdistill.eval.knn_eval import KnnSetup
    from selfdistill.eval.pictures import write_json
    from selfdistill.export import load_backbone

    ckpts = list_checkpoints(run)
    if not ckpts:
        raise ValueError(f"--knn-each-checkpoint: {run} has no checkpoints")
    config = load_config(ckpts[-1] / CONFIG)
    k = config.knn
    k.train_path = args.train_path or k.train_path or config.data.path
    k.val_path = args.val_path or k.val_path
    if not k.val_path:
        raise ValueError("--knn-each-checkpoint needs --data.val_path (the run has no knn.val_path)")
    k.k = args.k or k.k
    k.image_size = args.knn_image_size or k.image_size
    config.data.num_workers = args.num_workers
    setup = KnnSetup.from_config(config)
    cache_path = out / "checkpoint_knn.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    protocol = {"train_path": k.train_path, "val_path": k.val_path, "k": list(k.k), "image_size": k.image_size,
                "temperature": k.temperature}
    if cache.get("protocol") != protocol:
        cache = {"protocol": protocol, "checkpoints": {}}
    device = _device(args)
    for ckpt in tqdm(ckpts, desc="checkpoint kNN"):
        if ckpt.name in cache["checkpoints"]:
            continue
        backbone, _ = load_backbone(str(ckpt))
        results = setup.evaluate(backbone.to(device), device)
        cache["checkpoints"][ckpt.name] = {"step": int(ckpt.name[len(PREFIX):]), **results}
        write_json(cache_path, cache)
    series: dict[str, list[tuple[float, float]]] = {}
    for row in cache["checkpoints"].values():
        for key, v in row.items():
            if key.startswith("top1"):
                series.setdefault(f"checkpoint knn/{key}", []).append((float(row["step"]), float(v)))
    return series


def _curves(args, out: Path) -> list[Path]:
    from selfdistill.eval.pictures import curve_series, draw_curves, register_picture
    from selfdistill.plots import plot_training_curves, read_log

    run = Path(args.run)
    if not run.is_dir():
        raise FileNotFoundError(f"--run {run}: no such run directory")
    rows = read_log(run / "log.jsonl")
    series = curve_series(rows)
    if args.knn_each_checkpoint:
        series.update(_checkpoint_knn(args, run, out))
    written = []
    png = draw_curves(series, out / "eval_curves.png", title=f"{run.name}: evaluation during training")
    if png is not None:
        register_picture(out, png, "Top-1 accuracy against optimizer step: online kNN / linear rows of log.jsonl"
                                   + (" and kNN of every checkpoint" if args.knn_each_checkpoint else ""), "curves")
        written.append(png)
    train = plot_training_curves(run / "log.jsonl", out / "training_curves.png")
    if train is not None:
        register_picture(out, train, "Training loss, collapse signals and online kNN against optimizer step",
                         "curves")
        written.append(train)
    if not written:
        log.warning("%s: no log rows to plot", run / "log.jsonl")
    return written


def run_picture_command(args: argparse.Namespace) -> int:
    out = _out_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if args.command == "curves":
        written = _curves(args, out)
        _finish(args, out, written)
        return 0
    backbone, model_cfg, mean, std = _load(args)
    if args.command != "matching" and not args.images:
        raise ValueError(f"{args.command} needs --images (files or folders)")
    attention = args.command != "pictures" or _has_attention(backbone)
    if not attention:
        log.warning("%s has no global self-attention blocks: attention pictures skipped", model_cfg.name)
    if args.command in ("attention", "pictures") and attention:
        written += _attention(args, backbone, model_cfg, mean, std, out)
    if args.command in ("matching", "pictures"):
        written += _matching(args, backbone, model_cfg, mean, std, out)
    if args.command in ("attn-diagnostics", "pictures") and attention:
        written += _diagnostics(args, backbone, model_cfg, mean, std, out)
    if args.command == "pictures":
        args.run = args.run or (str(_run_dir_of(args.weights)) if _run_dir_of(args.weights) else None)
        if args.run:
            written += _curves(args, out)
    _finish(args, out, written)
    return 0


HANDLERS = {name: run_picture_command for name in _COMMANDS}
