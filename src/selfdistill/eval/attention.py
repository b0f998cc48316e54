"""Self-attention of timm ViTs and the numbers read from it.

* DINO's attention pictures (``visualize_attention.py``): the last block's CLS row per head, and
  the patches that hold 60 % of that row's mass (:func:`cls_attention`, :func:`mass_threshold`).
* Feature Distillation's diagnostics (Wei et al., 2022): the average attention distance per head
  and layer (ViT paper definition) and how diagonal (local) the patch-to-patch maps are
  (:func:`attention_distance`, :func:`diagonality`, :class:`AttentionStats`).

The attention weights come from timm itself: :class:`timm.utils.AttentionExtract` hooks each
block's ``attn.attn_drop`` (identity in eval mode, so its output is the softmax), with timm's fused
``scaled_dot_product_attention`` switched off for the one forward so the matrix is materialised.
Nothing of timm is copied or patched permanently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["AttentionMaps", "AttentionStats", "attention_distance", "cls_attention", "diagonality",
           "mass_threshold", "patch_centres", "vit_attention"]

_ATTN_DROP = "attn.attn_drop"


class AttentionMaps(NamedTuple):
    maps: list[torch.Tensor]  # one [B, heads, N, N] per kept layer (softmax rows; N = prefix + rows*cols)
    layers: list[int]  # block index of each map
    grid: tuple[int, int]  # (rows, cols) of the patch grid
    num_prefix_tokens: int  # CLS (+ register / distillation) tokens before the patches
    patch_size: int


def _timm_model(model: nn.Module) -> nn.Module:
    return getattr(model, "model", model)  # a selfdistill Backbone wraps the timm model


def _patch_size(model: nn.Module) -> int:
    pe = getattr(model, "patch_embed", None)
    p = getattr(pe, "patch_size", None)
    if p is None:
        raise ValueError(f"{type(model).__name__} has no patch_embed.patch_size: attention pictures need a ViT")
    p = tuple(p) if isinstance(p, Sequence) else (int(p), int(p))
    if p[0] != p[1]:
        raise ValueError(f"non-square patches {p} are not supported")
    return int(p[0])


def vit_attention(model: nn.Module, images: torch.Tensor, layers: Sequence[int] | None = None) -> AttentionMaps:
    """Softmax attention of a timm ViT's blocks for ``images`` ``[B, 3, H, W]`` (no gradients).

    ``layers``: block indices to keep (negative counts from the end; ``None``: all). Only those
    blocks are hooked, so asking for the last one costs one [B, heads, N, N] tensor, not L of them.
    Raises ``ValueError`` for models without global token self-attention (ResNet, Swin's windows).
    """
    from timm.utils import AttentionExtract

    model = _timm_model(model)
    names = [n for n, _ in model.named_modules() if n.endswith(_ATTN_DROP)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no timm attention blocks ('*.{_ATTN_DROP}'): "
                         "attention pictures need a ViT")
    idx = list(range(len(names))) if layers is None else sorted({i % len(names) for i in layers})
    patch = _patch_size(model)
    h, w = images.shape[-2:]
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    grid = (h // patch, w // patch)
    prefix = int(getattr(model, "num_prefix_tokens", 1))

    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    was_training = model.training
    extractor = None
    try:
        for m, _ in fused:
            m.fused_attn = False
        extractor = AttentionExtract(model, names=[names[i] for i in idx], method="hook")  # sets eval()
        with torch.no_grad():
            out = extractor(images)
    finally:
        for m, flag in fused:
            m.fused_attn = flag
        for handle in getattr(getattr(extractor, "hooks", None), "_handles", []):
            handle.remove()
        model.train(was_training)
    maps = [out[names[i]].float() for i in idx]
    n = prefix + grid[0] * grid[1]
    for i, a in zip(idx, maps):
        if a.ndim != 4 or a.shape[0] != images.shape[0] or a.shape[-1] != n or a.shape[-2] != n:
            raise ValueError(f"block {i}: attention of shape {tuple(a.shape)} is not global self-attention over "
                             f"{prefix} prefix + {grid[0]}x{grid[1]} patch tokens (windowed attention?)")
    return AttentionMaps(maps, idx, grid, prefix, patch)


def cls_attention(attn: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """The CLS query's attention to the patches, ``[B, heads, N, N] -> [B, heads, rows, cols]``
    (DINO's ``attn[:, :, 0, 1:]``; prefix keys such as registers are dropped too)."""
    return attn[:, :, 0, num_prefix_tokens:].reshape(*attn.shape[:2], *grid)


def mass_threshold(maps: torch.Tensor, mass: float = 0.6) -> torch.Tensor:
    """DINO's attention threshold: per map, keep the largest patches that together hold ``mass``.

    ``maps`` is ``[..., rows, cols]``; each map is first normalised to sum 1 (the CLS row without
    the CLS key does not). As in DINO: sort ascending, cumulative sum, keep entries whose cumulative
    sum exceeds ``1 - mass``, i.e. the smallest top set whose mass reaches ``mass``. Returns a bool
    mask of the same shape.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"threshold mass must be in (0, 1], got {mass}")
    flat = maps.flatten(-2).float()
    flat = flat / flat.sum(-1, keepdim=True).clamp_min(1e-12)
    values, order = torch.sort(flat, dim=-1)
    keep_sorted = torch.cumsum(values, dim=-1) > (1.0 - mass)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(maps.shape)


def patch_centres(grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Pixel ``(x, y)`` centre of every patch, row-major, ``[rows*cols, 2]``."""
    rows, cols = grid
    y, x = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32),
                          indexing="ij")
    return (torch.stack([x, y], -1).reshape(-1, 2) + 0.5) * patch_size


def _patch_rows(attn: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Patch queries x patch keys, rows renormalised to sum 1 over the patch keys."""
    a = attn[..., num_prefix_tokens:, num_prefix_tokens:].float()
    return a / a.sum(-1, keepdim=True).clamp_min(1e-12)


def attention_distance(attn: torch.Tensor, grid: tuple[int, int], patch_size: int,
                       num_prefix_tokens: int = 1) -> torch.Tensor:
    """Average attention distance in pixels per image and head, ``[B, heads, N, N] -> [B, heads]``.

    ``D = mean_i sum_j A[i, j] * ||p_i - p_j||_2`` over patch queries ``i`` and patch keys ``j``
    (prefix tokens such as CLS excluded), ``p`` = patch centre in input pixels. ``A``'s rows are
    renormalised over the patch keys after dropping the prefix keys, so ``D`` is where a query
    looks among the patches, whatever mass it puts on CLS. A head that only attends to its own
    patch has ``D = 0``; uniform attention over a 14x14 grid of 16 px patches gives 116.5 px.
    """
    a = _patch_rows(attn, num_prefix_tokens)
    p = patch_centres(grid, patch_size).to(a.device)
    dist = torch.cdist(p, p)
    return (a * dist).sum(-1).mean(-1)


def diagonality(attn: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1,
                radius: int = 0) -> torch.Tensor:
    """Attention-map diagonality per image and head, ``[B, heads, N, N] -> [B, heads]``, in [0, 1].

    The mean over patch queries ``i`` of the attention mass on keys ``j`` within ``radius`` patches
    of ``i`` on the grid (Chebyshev distance ``max(|dr|, |dc|) <= radius``), with rows renormalised
    over the patch keys as in :func:`attention_distance`. ``radius=0`` is the mass on the diagonal
    of the patch-to-patch map (identity attention: 1, uniform: ``1 / (rows*cols)``); ``radius=1``
    is the mass on the 3x3 neighbourhood, FD's "near-diagonal" band in row-major order. Averaging
    this over images equals computing it on the image-averaged map (it is linear in ``A``).
    """
    a = _patch_rows(attn, num_prefix_tokens)
    rows, cols = grid
    r = torch.arange(rows * cols, device=a.device) // cols
    c = torch.arange(rows * cols, device=a.device) % cols
    near = ((r[:, None] - r[None, :]).abs() <= radius) & ((c[:, None] - c[None, :]).abs() <= radius)
    return (a * near).sum(-1).mean(-1)


class AttentionStats:
    """Running FD diagnostics over batches of images: per (layer, head) the average attention
    distance, the diagonality at each radius and the image-averaged patch-to-patch map."""

    def __init__(self, radii: Sequence[int] = (0, 1), keep_maps: bool = True) -> None:
        self.radii = list(radii)
        self.keep_maps = keep_maps
        self.n = 0
        self.distance: torch.Tensor | None = None  # [L, H] sums over images
        self.diag: dict[int, torch.Tensor] = {}
        self.maps: torch.Tensor | None = None  # [L, H, T, T] sums over images
        self.grid: tuple[int, int] | None = None
        self.patch_size = 0
        self.layers: list[int] = []

    def update(self, att: AttentionMaps) -> None:
        if self.grid is not None and att.grid != self.grid:
            raise ValueError(f"all images must give the same grid: {att.grid} != {self.grid}")
        self.grid, self.patch_size, self.layers = att.grid, att.patch_size, att.layers
        pre = att.num_prefix_tokens
        dist = torch.stack([attention_distance(a, att.grid, att.patch_size, pre).sum(0) for a in att.maps]).cpu()
        self.distance = dist if self.distance is None else self.distance + dist
        for rad in self.radii:
            d = torch.stack([diagonality(a, att.grid, pre, rad).sum(0) for a in att.maps]).cpu()
            self.diag[rad] = d if rad not in self.diag else self.diag[rad] + d
        if self.keep_maps:
            m = torch.stack([_patch_rows(a, pre).sum(0) for a in att.maps]).cpu()
            self.maps = m if self.maps is None else self.maps + m
        self.n += att.maps[0].shape[0]

    def result(self) -> dict:
        """Means over images, as plain lists ``[layer][head]`` for JSON."""
        if not self.n or self.distance is None:
            raise ValueError("no images were added")
        dist = self.distance / self.n
        return {
            "n_images": self.n,
            "grid": list(self.grid or ()),
            "patch_size": self.patch_size,
            "layers": self.layers,
            "attention_distance_px": dist.tolist(),
            "attention_distance_mean_px": dist.mean(1).tolist(),
            "head_diversity_std_px": dist.std(1, unbiased=False).tolist(),
            "diagonality": {f"radius_{r}": (d / self.n).tolist() for r, d in self.diag.items()},
        }

    def mean_maps(self) -> torch.Tensor:
        if self.maps is None:
            raise ValueError("maps were not kept")
        return self.maps / self.n
