"""Pictures of a backbone: what people look at besides the numbers.

* DINO's attention maps: the last block's CLS attention per head, and the patches holding 60 % of
  its mass overlaid on the image (:func:`attention_picture`).
* Patch matching (Patch-Wise DINO's figures): lines between mutual nearest-neighbour patch tokens
  of two random crops of one image, or of two images (:func:`matching_picture`); for two crops the
  crop geometry says how far each match lands from the true position.
* FD's attention diagnostics: average attention distance per head vs layer, diagonality, and the
  image-averaged patch-to-patch maps (:func:`diagnostics_pictures`).
* Evaluation curves of a run: online kNN / linear rows of ``log.jsonl``, and optionally kNN of
  every checkpoint (:func:`curve_series`, :func:`draw_curves`).

Every picture is a PNG written atomically into one directory, with a caption recorded in
``captions.json``; :func:`write_index` regenerates ``index.html`` listing every PNG there.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from selfdistill.atomic import atomic_path, write_json_atomic, write_text_atomic
from selfdistill.data.folder import IMAGE_EXTENSIONS
from selfdistill.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, sample_crop_box, token_centres
from selfdistill.eval.attention import AttentionStats, cls_attention, mass_threshold, vit_attention

__all__ = ["CAPTIONS", "INDEX", "Matches", "SECTIONS", "attention_picture", "curve_series", "diagnostics_pictures",
           "draw_curves", "find_images", "load_image", "matching_picture", "mutual_nearest_matches",
           "random_view", "register_picture", "write_index", "write_json"]

CAPTIONS = "captions.json"
INDEX = "index.html"
SECTIONS = ("attention", "matching", "attention diagnostics", "curves")


# --------------------------------------------------------------------------------------------
# Files: atomic PNG / JSON writes, captions and the HTML index
# --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: Path, dpi: int = 100) -> Path:
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return path


def write_json(path: str | Path, payload: Any) -> Path:
    return write_json_atomic(path, payload, indent=1)


def register_picture(out_dir: str | Path, png: str | Path, caption: str, section: str) -> None:
    """Record ``png``'s caption and section in ``out_dir/captions.json`` (read by :func:`write_index`)."""
    out_dir = Path(out_dir)
    path = out_dir / CAPTIONS
    captions = json.loads(path.read_text()) if path.is_file() else {}
    captions[Path(png).resolve().relative_to(out_dir.resolve()).as_posix()] = {"caption": caption,
                                                                             "section": section}
    write_json(path, captions)


def write_index(out_dir: str | Path, title: str = "selfdistill pictures") -> Path:
    """(Re)write ``out_dir/index.html``: every PNG under ``out_dir`` with its caption, by section,
    then links to the JSON files beside them. PNGs without a recorded caption are listed too."""
    out_dir = Path(out_dir)
    path = out_dir / CAPTIONS
    captions = json.loads(path.read_text()) if path.is_file() else {}
    pngs = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*.png") if not p.name.startswith("."))
    order = {s: i for i, s in enumerate(SECTIONS)}
    by_section: dict[str, list[str]] = {}
    for rel in pngs:
        by_section.setdefault(captions.get(rel, {}).get("section", "other"), []).append(rel)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:110em}figure{margin:0 0 2em 0}"
        "img{max-width:100%;border:1px solid #ccc}figcaption{color:#333;margin-top:.3em}</style>",
        "</head><body>", f"<h1>{html.escape(title)}</h1>",
    ]
    for section in sorted(by_section, key=lambda s: (order.get(s, len(order)), s)):
        parts.append(f"<h2>{html.escape(section)}</h2>")
        for rel in by_section[section]:
            caption = captions.get(rel, {}).get("caption") or rel
            src = quote(rel)
            name = html.escape(rel)
            parts.append(f'<figure><a href="{src}"><img src="{src}" alt="{name}" loading="lazy"></a>'
                         f"<figcaption>{html.escape(caption)} <small>({name})</small></figcaption></figure>")
    jsons = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*.json")
                   if p.name != CAPTIONS and not p.name.startswith("."))
    if jsons:
        parts.append("<h2>numbers</h2><ul>")
        parts += [f'<li><a href="{quote(j)}">{html.escape(j)}</a></li>' for j in jsons]
        parts.append("</ul>")
    if not pngs:
        parts.append("<p>No pictures yet.</p>")
    parts.append("</body></html>")
    return write_text_atomic(out_dir / INDEX, "\n".join(parts) + "\n")


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def find_images(paths: Iterable[str | Path], limit: int = 0) -> list[Path]:
    """Image files named directly, or found (sorted, recursively) in the folders named."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                            and not f.name.startswith("."))
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"--images {p}: no such file or folder")
    if not found:
        raise ValueError(f"no images found in {[str(p) for p in paths]}")
    return found[:limit] if limit > 0 else found


def open_rgb(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def _to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = F.to_dtype(F.to_image(img), torch.float32, scale=True)
    return F.normalize(x, mean=list(mean), std=list(std)).as_subclass(torch.Tensor)


def load_image(path: str | Path, size: int, mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD) -> tuple[Image.Image, torch.Tensor]:
    """Short side resized to ``size`` (bicubic), centre crop ``size x size``: the shown image and
    the normalised input tensor ``[3, size, size]``."""
    img = open_rgb(path)
    img = F.center_crop(F.resize(img, [size], interpolation=InterpolationMode.BICUBIC, antialias=True), [size, size])
    return img, _to_tensor(img, mean, std)


def _check_size(size: int, patch: int) -> int:
    if size < patch or size % patch:
        raise ValueError(f"--image-size {size} must be a positive multiple of the patch size {patch}")
    return size


# --------------------------------------------------------------------------------------------
# DINO attention maps
# --------------------------------------------------------------------------------------------


def _upsample(maps: torch.Tensor, factor: int) -> np.ndarray:
    """``[..., r, c] -> [..., r*f, c*f]`` by nearest neighbour (DINO's ×patch upsampling)."""
    return maps.repeat_interleave(factor, -2).repeat_interleave(factor, -1).cpu().numpy()


def attention_picture(backbone: torch.nn.Module, image: str | Path, out_path: str | Path, size: int,
                      threshold: float = 0.6, device: torch.device | str = "cpu",
                      mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> dict[str, Any]:
    """The last block's CLS attention per head for one image (DINO ``visualize_attention``).

    Top row: the image, then each head's map (nearest-upsampled ×patch). Bottom row: the heads'
    mean map, then each head's :func:`mass_threshold` mask (the patches holding ``threshold`` of
    the mass) overlaid on the image. Returns the maps, masks and the kept fraction per head.
    """
    pil, x = load_image(image, size, mean, std)
    att = vit_attention(backbone, x[None].to(device), layers=[-1])
    maps = cls_attention(att.maps[0], att.grid, att.num_prefix_tokens)[0].cpu()  # [H, r, c]
    masks = mass_threshold(maps, threshold)
    heads, p = maps.shape[0], att.patch_size
    up_maps, up_masks = _upsample(maps, p), _upsample(masks.float(), p)
    rgb = np.asarray(pil, dtype=np.float32) / 255.0

    plt = _pyplot()
    cols = heads + 1
    fig, axes = plt.subplots(2, cols, figsize=(1.9 * cols, 4.2), squeeze=False)
    axes[0][0].imshow(rgb)
    axes[0][0].set_title("image", fontsize=8)
    axes[1][0].imshow(_upsample(maps.mean(0), p), cmap="inferno")
    axes[1][0].set_title("mean of heads", fontsize=8)
    for h in range(heads):
        axes[0][h + 1].imshow(up_maps[h], cmap="inferno")
        axes[0][h + 1].set_title(f"head {h}", fontsize=8)
        keep = up_masks[h][..., None]
        tint = np.array([1.0, 0.85, 0.1], dtype=np.float32)
        axes[1][h + 1].imshow(rgb * (0.25 + 0.75 * keep) * (1 - 0.35 * keep) + 0.35 * keep * tint)
        axes[1][h + 1].set_title(f"{threshold:.0%} mass: {masks[h].float().mean():.0%} of patches", fontsize=7)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle(f"{Path(image).name}: last-block CLS attention ({heads} heads, {att.grid[0]}x{att.grid[1]} patches "
                 f"of {p} px)", fontsize=9)
    _save_figure(fig, Path(out_path))
    return {"path": str(out_path), "maps": maps, "masks": masks, "grid": att.grid, "patch_size": p,
            "kept_fraction": masks.flatten(1).float().mean(1).tolist()}


# --------------------------------------------------------------------------------------------
# Patch matching
# --------------------------------------------------------------------------------------------


class Matches(NamedTuple):
    idx1: torch.Tensor  # [M] patch index (row-major) in the first picture
    idx2: torch.Tensor  # [M] its mutual nearest neighbour in the second
    similarity: torch.Tensor  # [M] cosine similarity, descending


def mutual_nearest_matches(tokens1: torch.Tensor, tokens2: torch.Tensor, top_k: int = 0,
                           mask1: torch.Tensor | None = None, mask2: torch.Tensor | None = None) -> Matches:
    """Patch pairs that are each other's nearest neighbour by cosine similarity of their tokens
    ``[T1, D]``, ``[T2, D]``, most similar first; ``top_k > 0`` keeps that many. ``mask1`` /
    ``mask2`` (bool ``[T1]`` / ``[T2]``) restrict both the candidates and the neighbours."""
    if tokens1.ndim != 2 or tokens2.ndim != 2 or tokens1.shape[1] != tokens2.shape[1]:
        raise ValueError(f"tokens must be [T1, D] and [T2, D], got {tuple(tokens1.shape)}, {tuple(tokens2.shape)}")
    a = torch.nn.functional.normalize(tokens1.float(), dim=-1)
    b = torch.nn.functional.normalize(tokens2.float(), dim=-1)
    sim = a @ b.T
    m1 = torch.ones(len(a), dtype=torch.bool, device=sim.device) if mask1 is None else mask1.to(sim.device).bool()
    m2 = torch.ones(len(b), dtype=torch.bool, device=sim.device) if mask2 is None else mask2.to(sim.device).bool()
    excluded = ~(m1[:, None] & m2[None, :])
    masked = sim.masked_fill(excluded, float("-inf"))
    nn12 = masked.argmax(1)
    nn21 = masked.argmax(0)
    mutual = (nn21[nn12] == torch.arange(len(a), device=sim.device)) & m1 & m2[nn12]
    idx1 = torch.nonzero(mutual).flatten()
    idx2 = nn12[idx1]
    s = sim[idx1, idx2]
    order = torch.argsort(s, descending=True, stable=True)
    if top_k > 0:
        order = order[:top_k]
    return Matches(idx1[order].cpu(), idx2[order].cpu(), s[order].cpu())


def random_view(img: Image.Image, size: int, seed: int, scale: Sequence[float] = (0.4, 1.0),
                ratio: Sequence[float] = (3 / 4, 4 / 3), flip_p: float = 0.5
                ) -> tuple[Image.Image, tuple[int, int, int, int], bool]:
    """One crop with the training geometry (``RandomResizedCrop`` box as in ``MultiCropAugmentation``,
    bicubic resize, horizontal flip), reproducible from ``seed``; no colour augmentation so the
    picture shows the geometry. Returns the view, its ``(top, left, height, width)`` box and flip."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        box = sample_crop_box(img.height, img.width, tuple(scale), tuple(ratio))
        flip = bool(torch.rand(1).item() < flip_p)
    view = F.resized_crop(img, *box, size=[size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return (F.horizontal_flip(view) if flip else view), box, flip


def _cell_centres(grid: tuple[int, int], size: int) -> torch.Tensor:
    """Pixel ``(x, y)`` of every token cell's centre in a ``size x size`` picture, ``[T, 2]``."""
    rows, cols = grid
    y, x = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32),
                          indexing="ij")
    return torch.stack([(x + 0.5) * size / cols, (y + 0.5) * size / rows], -1).reshape(-1, 2)


def matching_picture(backbone: torch.nn.Module, img1: Image.Image, img2: Image.Image, out_path: str | Path,
                     top_k: int = 20, device: torch.device | str = "cpu", title: str = "",
                     geometry: tuple[Sequence[float], bool, Sequence[float], bool] | None = None,
                     foreground: float = 0.0,
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> dict[str, Any]:
    """Side by side, lines between the ``top_k`` most similar mutual-nearest-neighbour patches.

    ``img1`` and ``img2`` are square pictures of one size. ``geometry = (box1, flip1, box2, flip2)``
    (source-pixel crop boxes of two views of one image) adds the source-pixel distance between the
    two ends of each match (0 = the same place in the image) and the fraction within one token
    cell. ``foreground > 0`` (ViTs) matches only patches inside each picture's DINO mask: those
    holding that mass of the heads' mean last-block CLS attention; the rest is shown dimmed.
    Returns the matches, the drawn segments ``[M, 4]`` (x1, y1, x2, y2 on the canvas, the second
    picture starting at x = size + gap) and those statistics.
    """
    if img1.size != img2.size or img1.width != img1.height:
        raise ValueError(f"matching needs two square pictures of one size, got {img1.size} and {img2.size}")
    size = img1.width
    x = torch.stack([_to_tensor(img1, mean, std), _to_tensor(img2, mean, std)]).to(device)
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        out = backbone(x)
    backbone.train(was_training)
    grid = tuple(out.grid)
    fg = None
    if foreground > 0:
        att = vit_attention(backbone, x, layers=[-1])
        if att.grid != grid:
            raise ValueError(f"attention grid {att.grid} differs from the token grid {grid}")
        fg = mass_threshold(cls_attention(att.maps[0], att.grid, att.num_prefix_tokens).mean(1), foreground)
        fg = fg.flatten(1).cpu()  # [2, T]
    m = mutual_nearest_matches(out.tokens[0], out.tokens[1], top_k, *(fg if fg is not None else (None, None)))
    centres = _cell_centres(grid, size)
    gap = max(4, size // 32)
    p1, p2 = centres[m.idx1], centres[m.idx2]
    segments = torch.cat([p1, p2 + torch.tensor([size + gap, 0.0])], 1)
    stats: dict[str, Any] = {"grid": list(grid), "n_matches": len(m.idx1),
                             "mean_similarity": float(m.similarity.mean()) if len(m.idx1) else None}
    if fg is not None:
        stats.update({"foreground_mass": foreground, "foreground_patches": fg.sum(1).tolist()})
    if geometry is not None:
        from selfdistill.losses import patch_correspondences

        box1, flip1, box2, flip2 = geometry
        src = token_centres([list(box1), list(box2)], [flip1, flip2], grid).flatten(2).transpose(1, 2)  # [2, T, 2]
        err = (src[0][m.idx1] - src[1][m.idx2]).norm(dim=-1)
        cell = max(box1[2] / grid[0], box1[3] / grid[1], box2[2] / grid[0], box2[3] / grid[1])
        overlap, _ = patch_correspondences(box1, flip1, grid, box2, flip2, grid)
        stats.update({"error_src_px": err.tolist(), "mean_error_src_px": float(err.mean()) if len(err) else None,
                      "fraction_within_cell": float((err <= cell).float().mean()) if len(err) else None,
                      "cell_src_px": cell, "overlapping_patch_pairs": len(overlap) - 1,
                      "box1": list(box1), "flip1": bool(flip1), "box2": list(box2), "flip2": bool(flip2)})

    plt = _pyplot()
    canvas = np.ones((size, 2 * size + gap, 3), dtype=np.float32)
    canvas[:, :size] = np.asarray(img1, dtype=np.float32) / 255.0
    canvas[:, size + gap:] = np.asarray(img2, dtype=np.float32) / 255.0
    if fg is not None:  # dim what was left out of the matching
        cell = size // grid[1]
        for k, left in enumerate((0, size + gap)):
            keep = _upsample(fg[k].reshape(grid).float(), cell)[..., None]
            canvas[:, left:left + size] *= 0.35 + 0.65 * keep
    fig, ax = plt.subplots(figsize=(9, 9 * size / (2 * size + gap) + 0.6))
    ax.imshow(canvas)
    colours = plt.get_cmap("viridis")(np.linspace(0, 1, max(len(segments), 1)))
    for (x1, y1, x2, y2), c in zip(segments.tolist(), colours):
        ax.plot([x1, x2], [y1, y2], color=c, lw=1.2)
        ax.scatter([x1, x2], [y1, y2], color=c, s=10)
    ax.set_xlim(-0.5, 2 * size + gap - 0.5)
    ax.set_ylim(size - 0.5, -0.5)
    ax.set_axis_off()
    sub = f"{len(m.idx1)} mutual nearest patches (top {top_k}), grid {grid[0]}x{grid[1]}"
    if fg is not None:
        sub += f", within the {foreground:.0%}-attention foreground"
    if geometry is not None and len(m.idx1):
        sub += f"; {stats['fraction_within_cell']:.0%} within one cell of the true position"
    ax.set_title(f"{title}\n{sub}" if title else sub, fontsize=9)
    _save_figure(fig, Path(out_path))
    return {"path": str(out_path), "matches": m, "segments": segments, "stats": stats}


# --------------------------------------------------------------------------------------------
# FD attention diagnostics
# --------------------------------------------------------------------------------------------


def diagnostics_pictures(backbone: torch.nn.Module, images: Sequence[str | Path], out_dir: str | Path, size: int,
                         batch_size: int = 16, radii: Sequence[int] = (0, 1), device: torch.device | str = "cpu",
                         mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                         prefix: str = "attn_") -> dict[str, Any]:
    """Average attention distance and diagonality per (layer, head) over ``images``.

    Writes ``{prefix}distance.png`` (distance vs layer, one dot per head; diagonality vs layer),
    ``{prefix}mean_maps.png`` (image-averaged patch-to-patch maps, rows = layers, columns = heads)
    and ``{prefix}diagnostics.json``; returns the JSON payload.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    stats = AttentionStats(radii)
    for start in tqdm(range(0, len(images), batch_size), desc="attention", leave=False):
        x = torch.stack([load_image(p, size, mean, std)[1] for p in images[start:start + batch_size]]).to(device)
        stats.update(vit_attention(backbone, x))
    result = stats.result()
    result["image_size"] = size
    result["definitions"] = {
        "attention_distance_px": "mean over images and patch queries i of sum_j A[i,j] * ||p_i - p_j||_2 "
                                 "(p = patch centre in input pixels; CLS/prefix tokens dropped, rows renormalised "
                                 "over patch keys)",
        "diagonality.radius_r": "mean over images and patch queries i of the (renormalised) attention mass on "
                                "patch keys j with max(|row_i-row_j|, |col_i-col_j|) <= r; identity attention = 1",
        "head_diversity_std_px": "std over heads of attention_distance_px, per layer",
    }
    write_json(out_dir / f"{prefix}diagnostics.json", result)

    plt = _pyplot()
    dist = np.asarray(result["attention_distance_px"])  # [L, H]
    layers = np.asarray(result["layers"]) + 1
    panels = 1 + len(radii)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.8), squeeze=False)
    ax = axes[0][0]
    for h in range(dist.shape[1]):
        ax.scatter(layers, dist[:, h], s=14, alpha=0.8)
    ax.plot(layers, dist.mean(1), color="k", lw=1, label="mean of heads")
    ax.set(xlabel="layer", ylabel="attention distance (px)", title="average attention distance, dot = head",
           ylim=(0, None))
    ax.legend(fontsize=8)
    for k, r in enumerate(radii):
        d = np.asarray(result["diagonality"][f"radius_{r}"])
        ax = axes[0][k + 1]
        for h in range(d.shape[1]):
            ax.scatter(layers, d[:, h], s=14, alpha=0.8)
        ax.plot(layers, d.mean(1), color="k", lw=1)
        ax.set(xlabel="layer", ylabel="attention mass", ylim=(0, 1.02),
               title="diagonal mass" if r == 0 else f"mass within {r} patch{'es' if r > 1 else ''}")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.set_xticks(layers)
    fig.suptitle(f"{result['n_images']} images at {size} px, grid {result['grid'][0]}x{result['grid'][1]}",
                 fontsize=9)
    fig.tight_layout()
    _save_figure(fig, out_dir / f"{prefix}distance.png")

    maps = stats.mean_maps().numpy()  # [L, H, T, T]
    n_l, n_h = maps.shape[:2]
    fig, axes = plt.subplots(n_l, n_h, figsize=(1.3 * n_h + 0.6, 1.3 * n_l + 0.4), squeeze=False)
    for li in range(n_l):
        for h in range(n_h):
            ax = axes[li][h]
            ax.imshow(maps[li, h], cmap="viridis", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if h == 0:
                ax.set_ylabel(f"layer {layers[li]}", fontsize=7)
            if li == 0:
                ax.set_title(f"head {h}", fontsize=7)
    fig.suptitle("image-averaged patch-to-patch attention (query rows x key columns, row-major)", fontsize=9)
    _save_figure(fig, out_dir / f"{prefix}mean_maps.png", dpi=80)
    return result


# --------------------------------------------------------------------------------------------
# Evaluation curves
# --------------------------------------------------------------------------------------------


def curve_series(rows: Iterable[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """``{"knn/top1_k20": [(step, value), ...], "linear/top1": ...}`` from log rows: every top-1
    key under ``knn/`` or ``linear/``."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        for key, value in r.items():
            group, _, name = key.partition("/")
            if group in ("knn", "linear") and name.startswith("top1") and isinstance(value, (int, float)):
                series.setdefault(key, []).append((float(r.get("step", len(series.get(key, [])))), float(value)))
    return series


def draw_curves(series: dict[str, list[tuple[float, float]]], out_path: str | Path, title: str = "") -> Path | None:
    """Top-1 accuracy against optimizer step, one line per series; ``None`` when there is nothing."""
    series = {k: sorted(v) for k, v in series.items() if v}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))

    def natural(name: str) -> tuple:
        return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))

    for name, pts in sorted(series.items(), key=lambda kv: natural(kv[0])):
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", ms=3, label=name)
    ax.set(xlabel="optimizer step", ylabel="top-1 (%)", title=title or "evaluation during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, Path(out_path))
