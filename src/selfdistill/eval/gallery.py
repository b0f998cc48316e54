"""The picture protocols: ``attention``, ``matching``, ``attn-diagnostics``, ``curves`` and ``pictures``.

Each writes PNGs (and JSON numbers) into one directory (``--out``, by default the run's
``pictures/``) and regenerates ``index.html`` there, which shows every PNG of the directory with
its caption. Pictures are drawn by the main process; the kNN of every checkpoint (``curves
--knn-each-checkpoint``) is split over the processes like every kNN.

    python run_eval.py attention --weights runs/dino --images photo.jpg --image-size 480
    python run_eval.py matching --weights runs/dino --images photo.jpg --pair a.jpg b.jpg
    python run_eval.py attn-diagnostics --weights runs/dino --images /data/val --max-diagnostic-images 64
    python run_eval.py curves --run runs/dino [--knn-each-checkpoint]
    python run_eval.py pictures --weights runs/dino --images photo.jpg other.jpg
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from selfdistill.configkit import read_recipe
from selfdistill.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from selfdistill.console import interactive
from selfdistill.rundir import CONFIG, LOG, PICTURES, checkpoint_step, is_run_dir, list_checkpoints
from selfdistill.eval.knn_eval import KnnSetup
from selfdistill.eval.pictures import (
    attention_picture,
    curve_series,
    diagnostics_pictures,
    draw_curves,
    find_images,
    load_image,
    matching_picture,
    open_rgb,
    random_view,
    register_picture,
    write_index,
    write_json,
)
from selfdistill.eval.protocols import EvalContext, Weights, register_protocol
from selfdistill.models import load_backbone
from selfdistill.plots import plot_all_curves, read_log

log = logging.getLogger(__name__)

__all__ = ["AttentionOptions", "CurvesOptions", "DiagnosticsOptions", "MatchingOptions", "PicturesOptions"]


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


@dataclass
class ImagesOptions:
    images: list[str] = field(default_factory=list, metadata={"help": "image files and/or folders (searched "
                                                                      "recursively)"})
    image_size: int = field(default=0, metadata={
        "help": "square input side (short side resized, centre crop); 0: the model's size"})


@dataclass
class AttentionOptions(ImagesOptions):
    threshold: float = field(default=0.6, metadata={"help": "DINO's mass kept by the masks (0.6 in the paper)"})
    max_images: int = field(default=8, metadata={"help": "attention pictures for at most this many images"})


@dataclass
class MatchingOptions(ImagesOptions):
    pair: list[tuple[str, str]] = field(default_factory=list, metadata={
        "help": "match two different images (repeatable)", "action": "append", "metavar": ("A", "B")})
    top_k: int = field(default=20, metadata={"help": "lines for the most similar mutual nearest neighbours"})
    seed: int = field(default=0, metadata={"help": "seed of the two random crops of each image"})
    scale: tuple[float, float] = field(default=(0.4, 1.0), metadata={"help": "crop area range (global crops)"})
    max_views: int = field(default=4, metadata={"help": "two-view pictures for at most this many images"})
    foreground: float = field(default=0.0, metadata={
        "help": "ViT: match only patches holding this mass of the CLS attention (e.g. 0.6; 0: all)"})


@dataclass
class DiagnosticsOptions(ImagesOptions):
    max_diagnostic_images: int = field(default=64, metadata={"help": "images averaged over"})
    radius: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "diagonality neighbourhoods "
                                                                                "(patches)"})
    batch_size: int = field(default=16, metadata={"help": "images per forward"})


@dataclass
class CurvesOptions:
    run: str = field(default="", metadata={"help": "run directory (its log.jsonl and checkpoints/); default: "
                                                   "--weights when it is one"})
    knn_each_checkpoint: bool = field(default=False, metadata={
        "help": "also run kNN on every checkpoint's evaluation backbone (cached in checkpoint_knn.json)",
        "switch": True})
    train_path: str = field(default="", metadata={"help": "kNN bank (default: the run's knn.train_path/data.path)",
                                                  "flags": ["--data.path"]})
    val_path: str = field(default="", metadata={"help": "kNN queries (default: the run's knn.val_path)",
                                                "flags": ["--data.val_path"]})
    k: list[int] = field(default_factory=list, metadata={"help": "neighbours (default: the run's knn.k)"})
    knn_image_size: int = field(default=0, metadata={"help": "kNN crop size (default: the run's knn.image_size)"})
    num_workers: int = field(default=2, metadata={"help": "data loading workers per process"})


@dataclass
class PicturesOptions(AttentionOptions, MatchingOptions, DiagnosticsOptions, CurvesOptions):
    pass


@dataclass
class _Sheet:
    """One picture command's context: the network, its normalisation, where the files go."""

    options: Any
    weights: str
    backbone: Any
    model_cfg: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    out: Path
    device: Any

    @property
    def image_size(self) -> int:
        if self.options.image_size:
            return self.options.image_size
        if self.model_cfg.img_size:
            return int(self.model_cfg.img_size)
        size = getattr(getattr(self.backbone.model, "patch_embed", None), "img_size", None)
        return int(size[0] if isinstance(size, (tuple, list)) else size) if size else 224


# --------------------------------------------------------------------------------------------
# Shared set-up
# --------------------------------------------------------------------------------------------


def run_dir_of(weights: str | None) -> Path | None:
    """The run directory ``weights`` belongs to, if any (a run, a checkpoint, or run/export/x.safetensors)."""
    if not weights:
        return None
    p = Path(weights)
    for cand in (p, p.parent.parent):
        if is_run_dir(cand):
            return cand
    return None


def _out_dir(weights: Weights, ctx: EvalContext, run: str = "") -> Path:
    if ctx.out is not None:
        return ctx.out
    run_dir = Path(run) if run else run_dir_of(weights.spec)
    if run_dir is not None:
        return run_dir / PICTURES
    return weights.directory() / PICTURES if weights.spec else Path(PICTURES)


def _normalisation(weights: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean / std of the run the weights come from (ImageNet's otherwise)."""
    run = run_dir_of(weights)
    if run is not None and (run / CONFIG).is_file():
        data = read_recipe(run / CONFIG).get("data") or {}
        return tuple(data.get("mean", IMAGENET_MEAN)), tuple(data.get("std", IMAGENET_STD))
    return IMAGENET_MEAN, IMAGENET_STD


def _sheet(weights: Weights, options: Any, ctx: EvalContext) -> _Sheet:
    backbone = weights.backbone().to(ctx.device)
    mean, std = _normalisation(weights.require())
    out = _out_dir(weights, ctx, getattr(options, "run", ""))
    return _Sheet(options, weights.require(), backbone, weights.model, mean, std, out, ctx.device)


def has_attention(backbone: Any) -> bool:
    """A ViT-like model: timm attention blocks over all tokens (not Swin's windows)."""
    model = backbone.model
    return hasattr(model, "patch_embed") and any(n.endswith("attn.attn_drop") for n, _ in model.named_modules()) \
        and not any("window" in type(m).__name__.lower() for m in model.modules())


def _finish(what: str, out: Path, written: list[Path]) -> dict[str, Any]:
    index = write_index(out, title=f"selfdistill pictures: {what}")
    for w in written:
        print(f"wrote {w}")
    print(f"index: {index}")
    return {"out": str(out), "index": str(index), "files": [str(w) for w in written]}


# --------------------------------------------------------------------------------------------
# What each command draws
# --------------------------------------------------------------------------------------------


def _attention(s: _Sheet) -> list[Path]:
    o, size, out = s.options, s.image_size, s.out
    written, summary = [], {}
    for i, img in enumerate(find_images(o.images, o.max_images)):
        png = out / f"attention_{i:02d}_{img.stem}.png"
        res = attention_picture(s.backbone, img, png, size, o.threshold, s.device, s.mean, s.std)
        register_picture(out, png, f"{img.name}: last-block CLS attention of each head (top) and the patches "
                                   f"holding {o.threshold:.0%} of each head's attention mass (bottom), "
                                   f"{size} px input", "attention")
        summary[img.name] = {"picture": png.name, "kept_fraction_per_head": res["kept_fraction"]}
        written.append(png)
    written.append(write_json(out / "attention.json", {"weights": s.weights, "image_size": size,
                                                        "threshold": o.threshold, "images": summary}))
    return written


def _matching(s: _Sheet) -> list[Path]:
    o, size, out = s.options, s.image_size, s.out
    written, summary = [], {}
    images = find_images(o.images, o.max_views) if o.images else []
    for i, img in enumerate(images):
        src = open_rgb(img)
        v1, box1, f1 = random_view(src, size, o.seed + 2 * i, o.scale)
        v2, box2, f2 = random_view(src, size, o.seed + 2 * i + 1, o.scale)
        png = out / f"matching_{i:02d}_{img.stem}.png"
        res = matching_picture(s.backbone, v1, v2, png, o.top_k, s.device, title=f"{img.name}: two random crops",
                               geometry=(box1, f1, box2, f2), foreground=o.foreground, mean=s.mean, std=s.std)
        st = res["stats"]
        extra = (f"; mean distance between matched positions {st['mean_error_src_px']:.1f} source px, "
                 f"{st['fraction_within_cell']:.0%} within one patch cell ({st['cell_src_px']:.1f} px)"
                 if st["n_matches"] else "")
        register_picture(out, png, f"{img.name}: two random crops (boxes {box1}{' flipped' if f1 else ''} and {box2}"
                                   f"{' flipped' if f2 else ''}, top/left/height/width); lines join the "
                                   f"{st['n_matches']} most similar mutually nearest patch tokens{extra}", "matching")
        summary[png.name] = st
        written.append(png)
    for j, (a, b) in enumerate(o.pair):
        png = out / f"matching_pair_{j:02d}_{Path(a).stem}_{Path(b).stem}.png"
        res = matching_picture(s.backbone, load_image(a, size)[0], load_image(b, size)[0], png, o.top_k, s.device,
                               title=f"{Path(a).name} vs {Path(b).name}", foreground=o.foreground, mean=s.mean,
                               std=s.std)
        register_picture(out, png, f"{Path(a).name} vs {Path(b).name}: lines join the {res['stats']['n_matches']} "
                                   "most similar mutually nearest patch tokens", "matching")
        summary[png.name] = res["stats"]
        written.append(png)
    if not written:
        raise ValueError("matching needs --images (two random crops of each) and/or --pair A B")
    written.append(write_json(out / "matching.json", {"weights": s.weights, "image_size": size,
                                                       "top_k": o.top_k, "pictures": summary}))
    return written


def _diagnostics(s: _Sheet) -> list[Path]:
    o, size, out = s.options, s.image_size, s.out
    images = find_images(o.images, o.max_diagnostic_images)
    res = diagnostics_pictures(s.backbone, images, out, size, o.batch_size, o.radius, s.device, s.mean, s.std)
    n = res["n_images"]
    register_picture(out, out / "attn_distance.png",
                     f"Average attention distance (px, between patch centres, CLS excluded) of every head against "
                     f"layer, and the attention mass on the diagonal / within {max(o.radius)} patch(es), over {n} "
                     f"images at {size} px", "attention diagnostics")
    register_picture(out, out / "attn_mean_maps.png",
                     f"Patch-to-patch attention averaged over {n} images, per layer (rows) and head (columns): "
                     "a bright diagonal means local, position-driven attention", "attention diagnostics")
    return [out / "attn_distance.png", out / "attn_mean_maps.png", out / "attn_diagnostics.json"]


def _checkpoint_knn(o: CurvesOptions, run: Path, out: Path, ctx: EvalContext) -> dict[str, list[tuple[float, float]]]:
    """kNN top-1 of every checkpoint's evaluation backbone (its export); results cached per checkpoint."""
    from selfdistill.recipe import config_from_dict

    ckpts = list_checkpoints(run)
    if not ckpts:
        raise ValueError(f"--knn-each-checkpoint: {run} has no checkpoints")
    config = config_from_dict(read_recipe(ckpts[-1] / CONFIG))
    k, d = config.knn, config.data
    train_path = o.train_path or k.train_path or d.path
    val_path = o.val_path or k.val_path
    if not val_path:
        raise ValueError("--knn-each-checkpoint needs --data.val_path (the run has no knn.val_path)")
    ks, image_size = o.k or k.k, o.knn_image_size or k.image_size
    setup = KnnSetup.open(train_path, val_path, ks, k.temperature, image_size, k.batch_size, o.num_workers,
                          k.max_train_samples, config.train.seed, d.mean, d.std, ctx.accelerator)
    cache_path = out / "checkpoint_knn.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    protocol = {"train_path": train_path, "val_path": val_path, "k": list(ks), "image_size": image_size,
                "temperature": k.temperature}
    if cache.get("protocol") != protocol:
        cache = {"protocol": protocol, "checkpoints": {}}
    for ckpt in tqdm(ckpts, desc="checkpoint kNN", disable=not (ctx.is_main and interactive())):
        if ckpt.name in cache["checkpoints"]:
            continue
        backbone, _ = load_backbone(str(ckpt))
        results = setup.evaluate(backbone.to(ctx.device))
        cache["checkpoints"][ckpt.name] = {"step": checkpoint_step(ckpt), **results}
        if ctx.is_main:
            write_json(cache_path, cache)
    series: dict[str, list[tuple[float, float]]] = {}
    for row in cache["checkpoints"].values():
        for key, v in row.items():
            if key.startswith("top1"):
                series.setdefault(f"checkpoint knn/{key}", []).append((float(row["step"]), float(v)))
    return series


def _curves(o: CurvesOptions, run: Path, out: Path, ctx: EvalContext) -> list[Path]:
    if not run.is_dir():
        raise FileNotFoundError(f"--run {run}: no such run directory")
    series = curve_series(read_log(run / LOG))
    if o.knn_each_checkpoint:
        series.update(_checkpoint_knn(o, run, out, ctx))
    if not ctx.is_main:
        return []
    written = []
    png = draw_curves(series, out / "eval_curves.png", title=f"{run.name}: evaluation during training")
    if png is not None:
        register_picture(out, png, "Top-1 accuracy against optimizer step: online kNN / linear rows of log.jsonl"
                                   + (" and kNN of every checkpoint" if o.knn_each_checkpoint else ""), "curves")
        written.append(png)
    train = plot_all_curves(run / LOG, out / "training_curves.png")
    if train is not None:  # the run's loss_curve.png has loss, collapse signals and kNN; this has every column
        register_picture(out, train, "Every number of log.jsonl (loss, learning rate, gradient norm, teacher "
                                     "statistics, throughput, evaluations) against optimizer step", "curves")
        written.append(train)
    if not written:
        log.warning("%s: no log rows to plot", run / LOG)
    return written


# --------------------------------------------------------------------------------------------
# The protocols
# --------------------------------------------------------------------------------------------


def _draw(weights: Weights, options: Any, ctx: EvalContext, kinds: tuple[str, ...], curves: bool = False
          ) -> dict[str, Any]:
    """Draw ``kinds`` (the main process), and with ``curves`` the run's curves (kNN of every
    checkpoint split over the processes); then the index."""
    written: list[Path] = []
    out = _out_dir(weights, ctx, getattr(options, "run", ""))
    if ctx.is_main:
        s = _sheet(weights, options, ctx)
        if kinds != ("matching",) and not options.images:
            raise ValueError("--images is needed (files or folders)")
        attention = len(kinds) == 1 or has_attention(s.backbone)  # a lone attention command says why it cannot
        if not attention:
            log.warning("%s has no global self-attention blocks: attention pictures skipped", s.model_cfg.name)
        if "attention" in kinds and attention:
            written += _attention(s)
        if "matching" in kinds:
            written += _matching(s)
        if "diagnostics" in kinds and attention:
            written += _diagnostics(s)
    run = options.run or (str(run_dir_of(weights.spec)) if run_dir_of(weights.spec) else "") if curves else ""
    if run:
        written += _curves(options, Path(run), out, ctx)
    return _finish(weights.require(), out, written) if ctx.is_main else {}


@register_protocol("attention", AttentionOptions, output="directory",
                   help="DINO attention pictures: last-block CLS attention per head, masks keeping 0.6 of its mass")
def attention_protocol(weights: Weights, options: AttentionOptions, ctx: EvalContext) -> dict[str, Any]:
    return _draw(weights, options, ctx, ("attention",))


@register_protocol("matching", MatchingOptions, output="directory",
                   help="lines between mutual-nearest patch tokens of two views / two images")
def matching_protocol(weights: Weights, options: MatchingOptions, ctx: EvalContext) -> dict[str, Any]:
    return _draw(weights, options, ctx, ("matching",))


@register_protocol("attn-diagnostics", DiagnosticsOptions, output="directory",
                   help="FD diagnostics: attention distance per head/layer, diagonality")
def diagnostics_protocol(weights: Weights, options: DiagnosticsOptions, ctx: EvalContext) -> dict[str, Any]:
    return _draw(weights, options, ctx, ("diagnostics",))


@register_protocol("curves", CurvesOptions, output="directory",
                   help="kNN / linear curves of a run (optionally kNN of every checkpoint)")
def curves_protocol(weights: Weights, options: CurvesOptions, ctx: EvalContext) -> dict[str, Any]:
    run = options.run or weights.require()
    out = _out_dir(weights, ctx, run)
    out.mkdir(parents=True, exist_ok=True)
    written = _curves(options, Path(run), out, ctx)
    return _finish(run, out, written) if ctx.is_main else {}


@register_protocol("pictures", PicturesOptions, output="directory",
                   help="all pictures of a backbone (and its run's curves) plus index.html")
def pictures_protocol(weights: Weights, options: PicturesOptions, ctx: EvalContext) -> dict[str, Any]:
    return _draw(weights, options, ctx, ("attention", "matching", "diagnostics"), curves=True)
