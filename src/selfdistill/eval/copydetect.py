"""Copy detection on Copydays (DINO ``eval_copy_detection.py``).

Layout of ``path`` (the Copydays archive unpacked): ``original/`` (the 157 database images),
``strong/`` (229 strongly attacked copies), optionally ``jpegqual/<q>/`` and ``crops/<c>/``. Each
directory of these present is one query block; a query's positives are the originals whose file
name starts with the same ``prefix_len`` (4) characters (Copydays names copies ``XXXXnn.jpg`` after
their original ``XXXX00.jpg``; for the 1:1 blocks this is DINO's index mapping).

Feature (as DINO): images resized to a ``image_size`` square (bicubic), the last block's output
(after the final norm) taken as ``cat(CLS, GeM_p(patch tokens))`` with p = 4 (a model without a
CLS token uses its average pool in its place). Optional **distractors** (DINO: 10k YFCC100M images)
join the database. Optional **whitening** is learned on a separate set (DINO: 20k YFCC100M
images): the mean of its features is subtracted from database and queries, then PCA whitening
``diag(λ^-1/2) Vᵀ`` of the covariance (eigenvalues floored at 1e-5·max, all dimensions kept);
then L2 normalisation, cosine similarity and the top ``topk`` (20) results of each query. AP is
the trapezoidal AP over the positives found in those results divided by all positives; mAP is the
mean over a block's queries. The headline number is the ``strong`` block.

One difference from DINO, on purpose: DINO takes the eigenvectors of the *uncentred* second
moment ``XᵀX/N`` of the whitening features while it subtracts their mean from the data; here the
covariance is centred (so whitened features of the fitting set have identity covariance).
``dino_whitening`` restores DINO's matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from selfdistill.data.folder import IMAGE_EXTENSIONS
from selfdistill.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from selfdistill.eval.protocols import EvalContext, Weights, register_protocol
from selfdistill.eval.retrieval import average_precision, crop_to_multiple, embed_images, patch_multiple

BLOCKS = (["original", "strong"] + [f"jpegqual/{q}" for q in (3, 5, 8, 10, 15, 20, 30, 50, 75)]
          + [f"crops/{c}" for c in (10, 15, 20, 30, 40, 50, 60, 70, 80)])


def list_images(folder: str | Path, limit: int = 0) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (the first ``limit`` when > 0)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image directory {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not p.name.startswith("."))
    if not files:
        raise ValueError(f"no images in {folder}")
    return files[:limit] if limit > 0 else files


class ImageList(Dataset):
    def __init__(self, paths: Sequence[Path], transform: Callable) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from selfdistill.data.folder import decode_rgb

        return {"image": self.transform(decode_rgb(self.paths[i])), "label": -1, "index": i, "bad": []}


def square_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    from torchvision.transforms import InterpolationMode, v2

    from selfdistill.data import to_normalized_tensor

    return v2.Compose([v2.Resize((size, size), interpolation=InterpolationMode.BICUBIC, antialias=True),
                       to_normalized_tensor(mean, std)])


def gem(tokens: torch.Tensor, p: float = 4.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean over the tokens ``[B, T, D] -> [B, D]``: ``mean(clamp(x, eps)^p)^(1/p)``."""
    return tokens.clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


def copy_detection_embedding(backbone: torch.nn.Module, p: float = 4.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """``cat(CLS, GeM_p(patch tokens))`` of the final-norm last block (pooled + GeM without a CLS)."""
    m = patch_multiple(backbone)

    def fn(x: torch.Tensor) -> torch.Tensor:
        out = backbone(crop_to_multiple(x, m))
        return torch.cat([out.pooled.float(), gem(out.tokens.float(), p)], dim=-1)

    return fn


class PCAWhitening:
    """PCA whitening ``x -> diag(λ^-1/2) Vᵀ (x - μ)`` learned on a separate feature set."""

    def __init__(self, mean: torch.Tensor, projection: torch.Tensor, eigenvalues: torch.Tensor) -> None:
        self.mean, self.projection, self.eigenvalues = mean, projection, eigenvalues

    @classmethod
    def fit(cls, features: torch.Tensor, centred: bool = True, floor: float = 1e-5) -> "PCAWhitening":
        """``centred=False`` takes DINO's uncentred second moment ``XᵀX/N`` (the mean is still
        subtracted when applying). Eigenvalues below ``floor·max`` are raised to it."""
        x = features.double()
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"whitening needs at least 2 feature vectors, got {tuple(features.shape)}")
        mean = x.mean(dim=0)
        xc = x - mean if centred else x
        cov = xc.T @ xc / x.shape[0]
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals = evals.clamp(min=float(evals.max()) * floor)
        order = torch.argsort(evals, descending=True)
        evals, evecs = evals[order], evecs[:, order]
        return cls(mean, evecs.T / evals.sqrt()[:, None], evals)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return ((features.double() - self.mean) @ self.projection.T).to(features.dtype)


def copydays_positives(query_names: Sequence[str], original_names: Sequence[str], prefix_len: int = 4
                       ) -> list[list[int]]:
    """For each query, the indices of the originals sharing its first ``prefix_len`` characters."""
    by_prefix: dict[str, list[int]] = {}
    for j, name in enumerate(original_names):
        by_prefix.setdefault(name[:prefix_len], []).append(j)
    return [by_prefix.get(q[:prefix_len], []) for q in query_names]


def copy_detection_ap(similarity: torch.Tensor, positives: Sequence[Sequence[int]], topk: int = 20) -> list[float | None]:
    """AP of each query from its top-``topk`` results (None for a query without positives)."""
    k = min(topk, similarity.shape[1])
    top = similarity.topk(k, dim=1, largest=True, sorted=True).indices.tolist()
    aps: list[float | None] = []
    for row, pos in zip(top, positives):
        if not pos:
            aps.append(None)
            continue
        wanted = set(pos)
        aps.append(average_precision([r for r, j in enumerate(row) if j in wanted], len(pos)))
    return aps


@dataclass
class CopyDetectOptions:
    path: str = field(metadata={"help": "Copydays directory (original/, strong/, optional jpegqual/*, crops/*)",
                                "flags": ["--data.path"]})
    image_size: int = field(default=320, metadata={"help": "square resize (DINO: 320 with ViT-B/8)"})
    whitening_path: str = field(default="", metadata={
        "help": "directory of images to learn the whitening on (DINO: 20k YFCC100M); empty: no whitening"})
    distractors_path: str = field(default="", metadata={
        "help": "directory of distractor images added to the database (DINO: 10k YFCC100M)"})
    max_whitening_images: int = field(default=0, metadata={"help": "use the first N whitening images (0: all)"})
    max_distractors: int = field(default=0, metadata={"help": "use the first N distractors (0: all)"})
    dino_whitening: bool = field(default=False, metadata={
        "help": "DINO's uncentred second moment for the whitening instead of the covariance"})
    topk: int = field(default=20, metadata={"help": "results per query scored by AP"})
    gem_p: float = field(default=4.0, metadata={"help": "GeM exponent of the patch-token pooling"})
    prefix_len: int = field(default=4, metadata={"help": "file-name prefix shared by a copy and its original"})
    batch_size: int = field(default=16, metadata={"help": "images per batch and process"})
    num_workers: int = field(default=4, metadata={"help": "data loading workers per process"})

    def validate(self, prefix: str) -> None:
        for name in ("image_size", "topk", "prefix_len", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{prefix}.{name}: must be positive, got {getattr(self, name)}")
        if self.gem_p <= 0:
            raise ValueError(f"{prefix}.gem_p: must be positive, got {self.gem_p}")


@register_protocol("copydetect", CopyDetectOptions,
                   help="Copydays copy detection mAP (DINO eval_copy_detection), strong subset headline")
def copydetect_protocol(weights: Weights, options: CopyDetectOptions, ctx: EvalContext) -> dict[str, Any]:
    """mAP (percent) per Copydays query block, with optional distractors and whitening."""
    root = Path(options.path)
    blocks = [b for b in BLOCKS if (root / b).is_dir()]
    if "original" not in blocks:
        raise FileNotFoundError(f"copydetect: {root} has no original/ directory (the Copydays database)")
    if len(blocks) < 2:
        raise ValueError(f"copydetect: {root} has no query block ({', '.join(BLOCKS[1:3])}, ...)")
    backbone = weights.backbone().to(ctx.device)
    fn = copy_detection_embedding(backbone, options.gem_p)
    tf = square_transform(options.image_size)

    def embed(paths: list[Path], desc: str) -> torch.Tensor:
        return embed_images(fn, ImageList(paths, tf), ctx, options.num_workers, options.batch_size,
                            normalize=False, desc=desc)

    originals = list_images(root / "original")
    block_files = {b: list_images(root / b) for b in blocks}
    queries = {b: embed(files, f"copydetect {b}") for b, files in block_files.items()}
    database = queries["original"]
    n_distractors = 0
    if options.distractors_path:
        distractors = embed(list_images(options.distractors_path, options.max_distractors), "distractors")
        n_distractors = distractors.shape[0]
        database = torch.cat([database, distractors])
    n_whitening = 0
    whiten = None
    if options.whitening_path:
        wfeats = embed(list_images(options.whitening_path, options.max_whitening_images), "whitening set")
        n_whitening = wfeats.shape[0]
        whiten = PCAWhitening.fit(wfeats, centred=not options.dino_whitening)
        database = whiten(database)
    database = F.normalize(database, dim=1)

    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    original_names = [p.name for p in originals]
    for b in blocks:
        q = queries[b] if whiten is None else whiten(queries[b])
        q = F.normalize(q, dim=1)
        positives = copydays_positives([p.name for p in block_files[b]], original_names, options.prefix_len)
        aps = copy_detection_ap(q @ database.T, positives, options.topk)
        scored = [a for a in aps if a is not None]
        if not scored:
            raise ValueError(f"copydetect: no query of {b}/ shares a {options.prefix_len}-character name prefix "
                             "with an original")
        metrics[f"map_{b.replace('/', '_')}"] = 100.0 * float(np.mean(scored))
        details[b] = {"n_queries": len(aps), "n_without_original": len(aps) - len(scored)}
    protocol = {
        "description": "Copydays copy detection as DINO eval_copy_detection: square bicubic resize, "
                       f"cat(CLS, GeM_p={options.gem_p:g}(patch tokens)) of the final-norm last block, "
                       + ("PCA whitening (mean removed, λ^-1/2, eigenvalues floored at 1e-5 max) learned on a "
                          "separate set, " if whiten is not None else "no whitening, ")
                       + f"L2-normalised cosine top-{options.topk}, trapezoidal AP per query, mAP per block",
        "path": str(root), "blocks": blocks, "image_size": options.image_size, "gem_p": options.gem_p,
        "topk": options.topk, "prefix_len": options.prefix_len, "n_database": database.shape[0],
        "n_originals": len(originals), "n_distractors": n_distractors, "distractors_path": options.distractors_path,
        "whitening_path": options.whitening_path, "n_whitening": n_whitening,
        "whitening_matrix": ("uncentred second moment (DINO)" if options.dino_whitening else "covariance")
        if whiten is not None else None,
        "headline": "map_strong", "units": "percent",
    }
    return {"metrics": metrics, "protocol": protocol, "details": details}


__all__ = ["BLOCKS", "CopyDetectOptions", "PCAWhitening", "copy_detection_ap", "copy_detection_embedding",
           "copydays_positives", "copydetect_protocol", "gem", "list_images", "square_transform"]
