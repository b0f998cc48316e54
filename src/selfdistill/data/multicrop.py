"""DINO multi-crop augmentation that also records where every crop came from.

The photometric recipe is DINO's ``DataAugmentationDINO`` (Caron et al., 2021): two global crops
and ``n_local_crops`` small local crops, each flipped, colour-jittered, converted to grayscale,
blurred and (second global crop only) solarized with DINO's probabilities. On top of that every
crop's box and flip are returned, so dense methods can match patches across views without
re-deriving the geometry: :func:`crop_pixel_centres` maps each crop pixel back to the source image
and :func:`token_centres` each backbone token's cell.

All randomness comes from Python's :mod:`random` and torch's global CPU generator, in the same
order as the original torchvision pipeline, so seeding both (as ``ImageFolderDataset`` does per
sample) makes the augmentation reproducible.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["EvalTransform", "MultiCropAugmentation", "crop_pixel_centres", "sample_crop_box", "to_normalized_tensor",
           "token_centres"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_crop_box(
    height: int, width: int, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int, int, int]:
    """Sample a ``(top, left, height, width)`` box exactly as ``RandomResizedCrop`` does.

    Ten tries of a uniform area fraction and a log-uniform aspect ratio, then a central crop of
    the clamped aspect ratio. Written out (rather than calling torchvision's private helper) so
    the box is known to us and the draws from torch's global RNG stay identical across
    torchvision versions.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item())).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w

    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_pixel_centres(
    box: torch.Tensor | Sequence[float], flipped: torch.Tensor | bool, size: int | Sequence[int]
) -> torch.Tensor:
    """Source-image coordinates of every crop pixel's centre, shape ``[..., 2, S_h, S_w]``.

    Channel 0 is x (column) and channel 1 is y (row), in source pixels where pixel ``(i, j)``
    has its centre at ``(j, i)``. This is the half-pixel-aligned mapping used by PIL and
    torchvision resizing: output pixel ``r`` of ``S`` samples ``top + (r + 0.5) * height / S - 0.5``.
    A flipped crop reads its columns right to left. ``box`` is ``(top, left, height, width)`` with
    any leading batch dimensions, ``flipped`` broadcasts against them.
    """
    box = torch.as_tensor(box, dtype=torch.float32)
    flipped = torch.as_tensor(flipped, dtype=torch.bool, device=box.device)
    size_h, size_w = (size, size) if isinstance(size, int) else size
    top, left, height, width = (box[..., k, None, None] for k in range(4))

    rows = torch.arange(size_h, dtype=torch.float32, device=box.device)[:, None]
    cols = torch.arange(size_w, dtype=torch.float32, device=box.device)[None, :]
    cols = torch.where(flipped[..., None, None], size_w - 1 - cols, cols)

    x = left + (cols + 0.5) * (width / size_w) - 0.5
    y = top + (rows + 0.5) * (height / size_h) - 0.5
    x, y = torch.broadcast_tensors(x, y)
    return torch.stack([x, y], dim=-3)


def token_centres(
    boxes: torch.Tensor | Sequence[Sequence[float]], flips: torch.Tensor | Sequence[bool], grid: int | Sequence[int]
) -> torch.Tensor:
    """Source-pixel ``(x, y)`` centre of every backbone token's cell, shape ``[B, 2, rows, cols]``.

    GLSD's distance matching needs, per token, the mean source coordinate of the crop pixels the
    token covers (``AvgPool2d(stride)`` of the position map). The crop-to-source map is affine per
    axis, so that mean is the centre of the cell and equals :func:`crop_pixel_centres` evaluated
    on a ``rows x cols`` grid over the same box; this holds for any stride as long as the grid
    tiles the crop (crop side = grid x stride: 224/32, 96/32, 224/16, 96/16). A flipped crop's
    first token column sits at the right of its box. Every sample keeps its own box and flip
    (the Patch-Wise DINO repo shares one geometry per batch; we do not).

    Args:
        boxes: ``[B, 4]`` crop boxes ``(top, left, height, width)`` in source pixels.
        flips: ``[B]`` bool, whether each crop was mirrored after resizing.
        grid: ``(rows, cols)`` of the backbone's token grid (an int for a square grid).

    Returns:
        float32 ``[B, 2, rows, cols]``; channel 0 is x (column), channel 1 is y (row), tokens in
        the backbone's row-major order.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [B, 4] (top, left, height, width), got {tuple(boxes.shape)}")
    flips = torch.as_tensor(flips, dtype=torch.bool, device=boxes.device)
    if flips.shape != boxes.shape[:1]:
        raise ValueError(f"flips must be [B] = [{boxes.shape[0]}], got {tuple(flips.shape)}")
    rows, cols = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be positive, got {(rows, cols)}")
    return crop_pixel_centres(boxes, flips, (rows, cols))


class _GaussianBlur:
    """PIL Gaussian blur with a random radius, applied when ``random.random() <= p`` (as DINO)."""

    def __init__(self, p: float, radius: tuple[float, float]) -> None:
        self.p = p
        self.radius = radius

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.radius)))


class _Solarize:
    """PIL solarization at threshold 128, applied when ``random.random() < p`` (as DINO)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() < self.p:
            return ImageOps.solarize(img, threshold=128)
        return img


def to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """PIL -> float tensor in [0, 1] -> normalized plain tensor (v2 spelling of ToTensor+Normalize)."""
    return v2.Compose([
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
        v2.ToPureTensor(),
    ])


class MultiCropAugmentation:
    """DINO's multi-crop augmentation, returning crops plus their boxes and flips.

    ``blur_p`` and ``solarize_p`` are ``(global crop 1, global crop 2, every local crop)``; the
    defaults are the DINO paper's ImageNet recipe. Calling it on a PIL image returns a dict:

    - ``"crops"``: ``2 + n_local_crops`` float tensors ``[3, S, S]``: global 1, global 2, locals.
    - ``"boxes"``: float32 ``[V, 4]``, each ``(top, left, height, width)`` in source pixels.
    - ``"flips"``: bool ``[V]``, whether the crop was mirrored after resizing.
    - ``"image_size"``: int64 ``[2]``, the source ``(H, W)``.
    """

    n_global_crops = 2

    def __init__(
        self,
        *,
        global_size: int = 224,
        local_size: int = 96,
        n_local_crops: int = 10,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        flip_p: float = 0.5,
        color_jitter_p: float = 0.8,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        grayscale_p: float = 0.2,
        blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5),
        solarize_p: tuple[float, float, float] = (0.0, 0.2, 0.0),
        blur_radius: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        if n_local_crops < 0:
            raise ValueError(f"n_local_crops must be >= 0, got {n_local_crops}")
        if len(blur_p) != 3 or len(solarize_p) != 3:
            raise ValueError("blur_p and solarize_p need 3 values: (global 1, global 2, local)")
        self.global_size = global_size
        self.local_size = local_size
        self.n_local_crops = n_local_crops
        self.global_scale = tuple(global_scale)
        self.local_scale = tuple(local_scale)
        self.ratio = tuple(ratio)
        self.flip_p = flip_p

        brightness, contrast, saturation, hue = color_jitter
        self.color = v2.Compose([
            v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=color_jitter_p),
            v2.RandomGrayscale(p=grayscale_p),
        ])
        # One blur + solarize stage per crop kind: global 1, global 2, local.
        self.finish = [
            v2.Compose([_GaussianBlur(blur_p[k], blur_radius), _Solarize(solarize_p[k])])
            for k in range(3)
        ]
        self.to_tensor = to_normalized_tensor(mean, std)

    @property
    def n_crops(self) -> int:
        return self.n_global_crops + self.n_local_crops

    @property
    def crop_sizes(self) -> list[int]:
        """Output side length of each crop, in the order they are returned."""
        return [self.global_size] * self.n_global_crops + [self.local_size] * self.n_local_crops

    def _crop(
        self, img: Image.Image, size: int, scale: tuple[float, float], finish: v2.Compose
    ) -> tuple[torch.Tensor, tuple[int, int, int, int], bool]:
        """One view: random resized crop, flip, colour, blur/solarize, normalize."""
        box = sample_crop_box(img.height, img.width, scale, self.ratio)
        view = F.resized_crop(img, *box, size=[size, size], interpolation=InterpolationMode.BICUBIC)
        flipped = bool(torch.rand(1).item() < self.flip_p)
        if flipped:
            view = F.horizontal_flip(view)
        view = finish(self.color(view))
        return self.to_tensor(view), box, flipped

    def __call__(self, img: Image.Image) -> dict[str, Any]:
        img = img.convert("RGB")
        kinds = [(self.global_size, self.global_scale, self.finish[0]),
                 (self.global_size, self.global_scale, self.finish[1])]
        kinds += [(self.local_size, self.local_scale, self.finish[2])] * self.n_local_crops

        crops, boxes, flips = [], [], []
        for size, scale, finish in kinds:
            crop, box, flipped = self._crop(img, size, scale, finish)
            crops.append(crop)
            boxes.append(box)
            flips.append(flipped)
        return {
            "crops": crops,
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "flips": torch.tensor(flips, dtype=torch.bool),
            "image_size": torch.tensor([img.height, img.width], dtype=torch.int64),
        }

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(global_size={self.global_size}, local_size={self.local_size}, "
                f"n_local_crops={self.n_local_crops}, global_scale={self.global_scale}, "
                f"local_scale={self.local_scale})")


class EvalTransform:
    """DINO's kNN / linear-probe transform: bicubic resize of the short side, centre crop, normalize.

    The short side is resized to ``int(size * resize_ratio)`` (256 for 224) so the centre crop
    keeps the usual 87.5 % of the image.
    """

    def __init__(
        self,
        size: int = 224,
        resize_ratio: float = 256 / 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.size = size
        # The epsilon keeps e.g. 224 * (256 / 224) from flooring to 255 through rounding error.
        self.resize_size = int(size * resize_ratio + 1e-6)
        self.transform = v2.Compose([
            v2.Resize(self.resize_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
            to_normalized_tensor(mean, std),
        ])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.transform(img.convert("RGB"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, resize_size={self.resize_size})"
