"""Image retrieval on the revisited Oxford / Paris protocol (DINO ``eval_image_retrieval.py``;
Radenović et al. 2018, "Revisiting Oxford and Paris").

Data: a ground-truth pickle ``gnd_<name>.pkl`` (``imlist`` and ``qimlist``: image names without
extension; ``gnd``: one dict per query with ``bbx``, ``easy``, ``hard``, ``junk`` indices into
``imlist``) and the images, by default in ``jpg/`` beside it. Any dataset in this format works.

Features (as DINO): every image is shrunk with ``PIL.Image.thumbnail((size, size))`` (aspect kept,
batch 1, no crop), embedded by the backbone (CLS for a ViT, average pool otherwise) and
L2-normalised; with ``multiscale`` the embeddings at scales 1, 1/√2 and 1/2 (bilinear) are
averaged and renormalised (no GeM). DINO does not crop the queries to their ``bbx``; the official
revisited protocol does (``crop_queries``). Database images are ranked by cosine similarity.

Scores: mean average precision over the queries for the three settings of the revisited protocol
(a query without positives is left out of the mean):

* Easy:   positives = easy,        junk = junk + hard
* Medium: positives = easy + hard, junk = junk
* Hard:   positives = hard,        junk = junk + easy

Junk images are removed from the ranking before AP is computed; AP is the trapezoidal area under
the precision-recall curve (:func:`average_precision`), as in the revisited evaluation code.
"""

from __future__ import annotations

import io
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from selfdistill.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from selfdistill.eval.protocols import EvalContext, Weights, register_protocol

SETTINGS = ("easy", "medium", "hard")
SCALES = (1.0, 1 / math.sqrt(2), 0.5)  # DINO's multi-scale set


# --------------------------------------------------------------------------------------------
# Ground truth (untrusted pickle: only plain data may come out of it)
# --------------------------------------------------------------------------------------------


_SAFE_GLOBALS = {
    ("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str",
                              "bytes", "bytearray", "bool")
} | {
    # numpy arrays (data only): how numpy pickles an ndarray; the bytes of a protocol-2 pickle
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _DataOnlyUnpickler(pickle.Unpickler):
    """Refuses every global but plain containers, numbers, strings and numpy arrays, so a crafted
    pickle cannot call anything (``pickle.load`` would run whatever the file names)."""

    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins"}.get(module, module)
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a ground-truth pickle holds only "
                                         "lists, dicts, numbers, strings and numpy arrays")
        return super().find_class(module, name)


def _int_list(value: Any, what: str) -> list[int]:
    arr = np.asarray(value if value is not None else [], dtype=np.float64).reshape(-1)
    if arr.size and (not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))):
        raise ValueError(f"{what} must hold integer image indices")
    return [int(v) for v in arr]


def load_ground_truth(path: str | Path) -> dict[str, Any]:
    """Read and check ``gnd_*.pkl``: ``{"imlist", "qimlist", "gnd": [{"bbx", "easy", "hard", "junk"}]}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"retrieval ground truth {path} does not exist")
    try:
        cfg = _DataOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a readable ground-truth pickle ({e})") from None
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise ValueError(f"{path}: expected a dict with 'imlist', 'qimlist' and 'gnd'")
    imlist, qimlist, gnd = [str(x) for x in cfg["imlist"]], [str(x) for x in cfg["qimlist"]], list(cfg["gnd"])
    if len(gnd) != len(qimlist):
        raise ValueError(f"{path}: {len(gnd)} ground-truth entries for {len(qimlist)} queries")
    out = []
    for i, g in enumerate(gnd):
        if not isinstance(g, dict):
            raise ValueError(f"{path}: gnd[{i}] is not a dict")
        entry = {k: _int_list(g.get(k), f"{path}: gnd[{i}][{k!r}]") for k in ("easy", "hard", "junk")}
        for k, idx in entry.items():
            bad = [j for j in idx if not 0 <= j < len(imlist)]
            if bad:
                raise ValueError(f"{path}: gnd[{i}][{k!r}] has indices outside the {len(imlist)} database images: "
                                 f"{bad[:5]}")
        bbx = g.get("bbx")
        entry["bbx"] = None if bbx is None else [float(v) for v in np.asarray(bbx, dtype=np.float64).reshape(-1)]
        out.append(entry)
    return {"imlist": imlist, "qimlist": qimlist, "gnd": out}


def setting_ground_truth(gnd: Sequence[dict], setting: str) -> list[dict[str, list[int]]]:
    """Positives (``ok``) and ignored images (``junk``) of each query for one protocol setting."""
    rules = {
        "easy": (("easy",), ("junk", "hard")),
        "medium": (("easy", "hard"), ("junk",)),
        "hard": (("hard",), ("junk", "easy")),
    }
    if setting not in rules:
        raise ValueError(f"unknown setting {setting!r}; use one of {SETTINGS}")
    ok_keys, junk_keys = rules[setting]
    return [{"ok": [j for k in ok_keys for j in g[k]], "junk": [j for k in junk_keys for j in g[k]]} for g in gnd]


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def average_precision(ranks: Sequence[int], n_positives: int) -> float:
    """AP of one query from the 0-based ranks of its retrieved positives (ascending), by trapezoids.

    Between the (k-1)-th and k-th positive, recall grows by ``1 / n_positives``; the area of that
    step is the mean of the precision just before the k-th positive (``(k-1) / rank``, or 1 at
    rank 0) and at it (``k / (rank + 1)``). Positives that were never retrieved add nothing.
    """
    if n_positives <= 0:
        raise ValueError("average_precision needs at least one positive")
    ap = 0.0
    for k, rank in enumerate(ranks):  # k positives ranked before this one
        before = 1.0 if rank == 0 else k / rank
        at = (k + 1) / (rank + 1)
        ap += (before + at) / 2.0 / n_positives
    return ap


def query_ranks(order: np.ndarray, ok: Sequence[int], junk: Sequence[int]) -> np.ndarray:
    """Ranks of the positives in ``order`` (database indices, best first) once junk is dropped."""
    pos = np.flatnonzero(np.isin(order, np.asarray(ok, dtype=np.int64)))
    junk_pos = np.flatnonzero(np.isin(order, np.asarray(junk, dtype=np.int64)))
    # a positive moves up by the number of junk images ranked strictly above it
    return pos - np.searchsorted(junk_pos, pos, side="left")


def mean_average_precision(ranking: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = (1, 5, 10)
                           ) -> dict[str, Any]:
    """mAP and mean precision@k over queries with positives (``None`` when no query has one).

    ``ranking``: [n_queries, n_database] database indices sorted by decreasing similarity.
    ``gnd``: per query ``{"ok": [...], "junk": [...]}`` (see :func:`setting_ground_truth`).
    Precision@k follows the revisited code: with the first ``k`` non-junk results, divided by
    ``min(k, rank of the last positive)``, so a query with fewer than ``k`` positives can reach 1.
    """
    if ranking.shape[0] != len(gnd):
        raise ValueError(f"{ranking.shape[0]} rankings for {len(gnd)} queries")
    aps, prs = [], []
    for order, g in zip(ranking, gnd):
        if not len(g["ok"]):
            aps.append(float("nan"))
            prs.append([float("nan")] * len(kappas))
            continue
        ranks = query_ranks(order, g["ok"], g["junk"])
        aps.append(average_precision(ranks.tolist(), len(g["ok"])))
        one_based = ranks + 1
        row = []
        for k in kappas:
            kq = min(int(one_based.max()), k) if one_based.size else k
            row.append(float((one_based <= kq).sum()) / kq)
        prs.append(row)
    aps_arr, prs_arr = np.asarray(aps), np.asarray(prs, dtype=np.float64).reshape(len(gnd), len(kappas))
    valid = ~np.isnan(aps_arr)
    if not valid.any():  # e.g. a dataset without hard positives: no score for this setting
        return {"map": None, "aps": [None] * len(aps), "mp": {int(k): None for k in kappas}, "n_queries": 0}
    return {"map": float(aps_arr[valid].mean()), "aps": [None if math.isnan(a) else a for a in aps_arr.tolist()],
            "mp": {int(k): float(prs_arr[valid, i].mean()) for i, k in enumerate(kappas)},
            "n_queries": int(valid.sum())}


def revisited_scores(similarity: torch.Tensor, gnd: Sequence[dict], kappas: Sequence[int] = (1, 5, 10)
                     ) -> dict[str, dict[str, Any]]:
    """Easy / Medium / Hard scores from a [n_queries, n_database] similarity matrix."""
    ranking = torch.argsort(-similarity.float(), dim=1, stable=True).cpu().numpy()
    return {s: mean_average_precision(ranking, setting_ground_truth(gnd, s), kappas) for s in SETTINGS}


# --------------------------------------------------------------------------------------------
# Images and features
# --------------------------------------------------------------------------------------------


class ThumbnailImages(Dataset):
    """Images shrunk to fit ``size`` x ``size`` (aspect kept, never enlarged), optionally cropped
    to a box first; samples look like the project's eval samples (label -1)."""

    def __init__(self, paths: Sequence[str | Path], size: int, boxes: Sequence[Sequence[float] | None] | None = None,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        from selfdistill.data import to_normalized_tensor

        missing = [str(p) for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) missing, e.g. {missing[0]}")
        self.paths, self.size, self.boxes = [str(p) for p in paths], size, boxes
        self.to_tensor = to_normalized_tensor(mean, std)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from selfdistill.data.folder import decode_rgb

        img = decode_rgb(self.paths[i])
        box = self.boxes[i] if self.boxes is not None else None
        if box is not None:
            img = img.crop(tuple(int(round(v)) for v in box))
        img.thumbnail((self.size, self.size), Image.Resampling.LANCZOS)
        return {"image": self.to_tensor(img), "label": -1, "index": i, "bad": []}


def patch_multiple(backbone: torch.nn.Module) -> int:
    """A ViT's patch size (its convolution drops the remainder pixels; timm asks for a multiple)."""
    pe = getattr(backbone.model, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    if ps is None:
        return 1
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


def crop_to_multiple(x: torch.Tensor, m: int) -> torch.Tensor:
    """Drop the bottom / right pixels a stride-``m`` patch embedding would ignore (as DINO's conv)."""
    if m <= 1:
        return x
    h, w = x.shape[-2] - x.shape[-2] % m, x.shape[-1] - x.shape[-1] % m
    if h == 0 or w == 0:
        raise ValueError(f"image of {tuple(x.shape[-2:])} px is smaller than one {m} px patch")
    return x[..., :h, :w]


def retrieval_embedding(backbone: torch.nn.Module, multiscale: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The pooled embedding (CLS for a ViT), optionally averaged over DINO's three scales."""
    m = patch_multiple(backbone)

    def embed(x: torch.Tensor) -> torch.Tensor:
        return backbone(crop_to_multiple(x, m)).pooled.float()

    def fn(x: torch.Tensor) -> torch.Tensor:
        if not multiscale:
            return embed(x)
        v = sum(embed(x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False))
                for s in SCALES) / len(SCALES)
        return F.normalize(v, dim=-1)

    return fn


def embed_images(feature_fn: Callable, dataset: Dataset, ctx: EvalContext, num_workers: int, batch_size: int = 1,
                 normalize: bool = True, desc: str = "features") -> torch.Tensor:
    """Features of every image of ``dataset`` in order, each process embedding its share."""
    from selfdistill.data import collate_eval
    from selfdistill.data.sampler import ShardedEvalSampler
    from selfdistill.eval.inference import extract_features

    acc = ctx.accelerator
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_eval,
                        sampler=ShardedEvalSampler(len(dataset), acc.process_index, acc.num_processes))
    feats, _, idx = extract_features(feature_fn, loader, accelerator=acc, normalize=normalize, desc=desc)
    if idx.numel() != len(dataset) or not torch.equal(idx, torch.arange(len(dataset))):
        raise RuntimeError(f"{desc}: embedded {idx.numel()} of {len(dataset)} images")
    return feats


# --------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------


@dataclass
class RetrievalOptions:
    gnd: str = field(metadata={"help": "ground-truth pickle gnd_<name>.pkl (revisited Oxford / Paris format)"})
    images: str = field(default="", metadata={"help": "image directory (default: jpg/ beside the pickle)"})
    ext: str = field(default=".jpg", metadata={"help": "image file extension added to the names in the pickle"})
    image_size: int = field(default=224, metadata={
        "help": "longest side after PIL thumbnail (DINO: 224 for rOxford, 512 for rParis)"})
    multiscale: bool = field(default=False, metadata={
        "help": "average over scales 1, 1/sqrt2, 1/2 (DINO: off for rOxford, on for rParis)"})
    crop_queries: bool = field(default=False, metadata={
        "help": "crop queries to their bbx (the official revisited protocol; DINO does not)"})
    kappas: list[int] = field(default_factory=lambda: [1, 5, 10], metadata={"help": "k of the mean precision@k"})
    num_workers: int = field(default=4, metadata={"help": "data loading workers per process"})

    def validate(self, prefix: str) -> None:
        if self.image_size <= 0:
            raise ValueError(f"{prefix}.image_size: must be positive, got {self.image_size}")
        if not self.kappas or any(k <= 0 for k in self.kappas):
            raise ValueError(f"{prefix}.kappas: must be positive integers, got {self.kappas}")


@register_protocol("retrieval", RetrievalOptions,
                   help="revisited Oxford/Paris image retrieval mAP, Easy/Medium/Hard (DINO eval_image_retrieval)")
def retrieval_protocol(weights: Weights, options: RetrievalOptions, ctx: EvalContext) -> dict[str, Any]:
    """mAP (percent) on Easy / Medium / Hard of a dataset in the revisited Oxford / Paris format."""
    cfg = load_ground_truth(options.gnd)
    images = Path(options.images) if options.images else Path(options.gnd).parent / "jpg"
    backbone = weights.backbone().to(ctx.device)
    fn = retrieval_embedding(backbone, options.multiscale)
    db = ThumbnailImages([images / f"{n}{options.ext}" for n in cfg["imlist"]], options.image_size)
    boxes = [g["bbx"] for g in cfg["gnd"]] if options.crop_queries else None
    if boxes is not None and any(b is None or len(b) != 4 for b in boxes):
        raise ValueError(f"--crop-queries: {options.gnd} lacks a 4-number bbx for some queries")
    queries = ThumbnailImages([images / f"{n}{options.ext}" for n in cfg["qimlist"]], options.image_size, boxes)
    db_f = embed_images(fn, db, ctx, options.num_workers, desc="retrieval database")
    q_f = embed_images(fn, queries, ctx, options.num_workers, desc="retrieval queries")
    scores = revisited_scores(q_f @ db_f.T, cfg["gnd"], options.kappas)
    metrics: dict[str, float] = {}
    for s in SETTINGS:
        if scores[s]["map"] is None:
            continue  # no query has a positive in this setting (details say n_queries 0)
        metrics[f"map_{s}"] = 100.0 * scores[s]["map"]
        for k, v in scores[s]["mp"].items():
            metrics[f"mp@{k}_{s}"] = 100.0 * v
    protocol = {
        "description": "revisited Oxford/Paris retrieval as DINO eval_image_retrieval: PIL thumbnail, pooled "
                       "embedding (CLS for ViT), L2-normalised, cosine ranking; revisited mAP (trapezoidal AP, "
                       "junk removed) for Easy (ok=easy, junk=junk+hard), Medium (ok=easy+hard, junk=junk), "
                       "Hard (ok=hard, junk=junk+easy)",
        "gnd": options.gnd, "images": str(images), "image_size": options.image_size,
        "multiscale": options.multiscale, "scales": list(SCALES) if options.multiscale else [1.0],
        "crop_queries": options.crop_queries, "n_database": len(db), "n_queries": len(queries),
        "kappas": list(options.kappas), "units": "percent",
    }
    details = {s: {"n_queries": scores[s]["n_queries"], "ap_per_query": scores[s]["aps"]} for s in SETTINGS}
    return {"metrics": metrics, "protocol": protocol, "details": details}


__all__ = ["RetrievalOptions", "ThumbnailImages", "average_precision", "crop_to_multiple", "embed_images",
           "load_ground_truth", "mean_average_precision", "query_ranks", "retrieval_embedding",
           "retrieval_protocol", "revisited_scores", "setting_ground_truth"]
