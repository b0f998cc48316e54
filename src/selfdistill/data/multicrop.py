"""DINO multi-crop augmentation that also records where every crop came from.

The photometric recipe is DINO's ``DataAugmentationDINO`` (Caron et al., 2021): two global crops
and ``n_local_crops`` small local crops, each flipped, colour-jittered, converted to grayscale,
blurred and (second global crop only) solarized with DINO's probabilities. On top of that every
crop's box and flip are returned, so dense methods can match patches across views without
re-deriving the geometry: :func:`crop_pixel_centres` maps each crop pixel back to the source image
and :func:`token_centres` each backbone token's cell.

All randomness comes from Python's :mod:`random` and torch's global CPU generator, in the same
order as the original torchvision pipeline, so seeding both (as ``ImageFolderDataset`` does per
sample) makes the augmentation reproducible. Every choice of a crop is drawn first
(:meth:`MultiCropAugmentation.draw`, a :class:`CropDraw`), then applied: on PIL crops in the loader
worker (``data.augment_on: workers``), or, with ``on_device``, the workers only cut and the
training process applies the same draws to the whole batch (:mod:`selfdistill.data.device_augment`).
:class:`SingleViewAugmentation` is the one-view transform (FD's), split the same way.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from selfdistill.data.device_augment import finish_views, normalize

__all__ = ["AUGMENT_ON", "CropDraw", "EvalTransform", "IMAGENET_MEAN", "IMAGENET_STD", "MultiCropAugmentation",
           "SingleViewAugmentation", "augment_on_device", "crop_pixel_centres", "sample_crop_box",
           "to_normalized_tensor", "token_centres"]

AUGMENT_ON = ("auto", "workers", "device")


def augment_on_device(setting: str, cpu: bool = False) -> bool:
    """``data.augment_on`` resolved: ``auto`` finishes crops on a GPU where there is one (unless the
    run is forced onto the CPU), in the loader workers otherwise."""
    if setting == "auto":
        return torch.cuda.is_available() and not cpu
    return setting == "device"


# ImageNet's per-channel mean and std: every default input normalisation of the project (recipes,
# evaluations, pictures) is these two, defined here only.
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


@dataclass(frozen=True)
class CropDraw:
    """One crop's random choices: the box ``(top, left, height, width)`` in source pixels, the output
    side, the flip, colour jitter (applied?, the order of brightness / contrast / saturation / hue,
    their factors), grayscale, the blur sigma (0: none) and solarize."""

    box: tuple[int, int, int, int]
    size: int
    flip: bool
    jitter: bool
    order: tuple[int, ...]
    factors: tuple[float, ...]
    gray: bool
    sigma: float
    solarize: bool

    @staticmethod
    def stack(draws: Sequence[CropDraw]) -> dict[str, torch.Tensor]:
        """The photometric parameters of a sample's crops as tensors (``[V]``, ``[V, 4]``)."""
        return {"jitter": torch.tensor([d.jitter for d in draws]),
                "order": torch.tensor([d.order for d in draws], dtype=torch.int64),
                "factors": torch.tensor([d.factors for d in draws], dtype=torch.float32),
                "gray": torch.tensor([d.gray for d in draws]),
                "sigma": torch.tensor([d.sigma for d in draws], dtype=torch.float32),
                "solarize": torch.tensor([d.solarize for d in draws])}


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

    With ``on_device`` the crops are uint8 (cut and resized, not flipped) and ``"params"`` holds the
    photometric draws (:meth:`CropDraw.stack`); :meth:`finish` completes a collated batch.
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

        self.color_jitter_p, self.grayscale_p = color_jitter_p, grayscale_p
        self.blur_p, self.solarize_p, self.blur_radius = tuple(blur_p), tuple(solarize_p), tuple(blur_radius)
        jitter = v2.ColorJitter(*color_jitter)  # its checked ranges; None where a factor cannot change
        self.jitter_ranges = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        self.mean, self.std = tuple(mean), tuple(std)
        self.to_tensor = to_normalized_tensor(mean, std)
        self.on_device = False  # set by data.augment_on: workers cut, the training process finishes

    @property
    def n_crops(self) -> int:
        return self.n_global_crops + self.n_local_crops

    @property
    def crop_sizes(self) -> list[int]:
        """Output side length of each crop, in the order they are returned."""
        return [self.global_size] * self.n_global_crops + [self.local_size] * self.n_local_crops

    def draw(self, height: int, width: int) -> list[CropDraw]:
        """Every random choice of every crop of a ``height x width`` image, drawn in the order of
        torchvision's ``RandomResizedCrop -> RandomHorizontalFlip -> RandomApply(ColorJitter) ->
        RandomGrayscale`` (torch's generator) and DINO's blur and solarize (Python's ``random``)."""
        kinds = [(self.global_size, self.global_scale, 0), (self.global_size, self.global_scale, 1)]
        kinds += [(self.local_size, self.local_scale, 2)] * self.n_local_crops
        return [self._draw_one(height, width, size, scale, k) for size, scale, k in kinds]

    def _draw_one(self, height: int, width: int, size: int, scale: tuple[float, float], kind: int) -> CropDraw:
        box = sample_crop_box(height, width, scale, self.ratio)
        flip = bool(torch.rand(1).item() < self.flip_p)
        order, factors, jitter = (0, 1, 2, 3), (1.0, 1.0, 1.0, 0.0), bool(torch.rand(1) < self.color_jitter_p)
        if jitter:
            order = tuple(torch.randperm(4).tolist())
            factors = tuple(float(torch.empty(1).uniform_(r[0], r[1]).item()) if r is not None else identity
                            for r, identity in zip(self.jitter_ranges, (1.0, 1.0, 1.0, 0.0)))
        gray = bool(torch.rand(1) < self.grayscale_p)
        sigma = random.uniform(*self.blur_radius) if random.random() <= self.blur_p[kind] else 0.0
        solarize = random.random() < self.solarize_p[kind]
        return CropDraw(box, size, flip, jitter, order, factors, gray, sigma, solarize)

    def _finish_pil(self, view: Image.Image, d: CropDraw) -> Image.Image:
        """The photometric chain on one PIL crop (the worker path)."""
        if d.flip:
            view = F.horizontal_flip(view)
        if d.jitter:
            ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
            for k in d.order:
                if self.jitter_ranges[k] is not None:
                    view = ops[k](view, d.factors[k])
        if d.gray:
            view = F.rgb_to_grayscale(view, num_output_channels=3)
        if d.sigma > 0:
            view = view.filter(ImageFilter.GaussianBlur(radius=d.sigma))
        if d.solarize:
            view = ImageOps.solarize(view, threshold=128)
        return view

    def plan(self, width: int, height: int) -> tuple[list[CropDraw], int] | None:
        """Cutting for the device: every crop drawn before the image is decoded (the decoder calls
        this under the sample's seeded RNG, so the draws are the ones ``__call__`` would make), and
        the largest JPEG DCT reduction (1, 2, 4, 8) that leaves every crop box at least its output
        size: a large photo is decoded at 1/2 or 1/4 scale without upsampling any crop."""
        if not self.on_device:
            return None
        draws = self.draw(height, width)
        fit = min(min(d.box[2], d.box[3]) / d.size for d in draws)
        reduction = 1
        while reduction < 8 and fit >= 2 * reduction:
            reduction *= 2
        return draws, reduction

    def _cut(self, img: Image.Image, d: CropDraw) -> Image.Image:
        """The worker path's crop: box ``d.box`` of the full-size image, bicubic-resized by PIL."""
        return F.resized_crop(img, *d.box, size=[d.size, d.size], interpolation=InterpolationMode.BICUBIC)

    @staticmethod
    def _cut_uint8(pixels: torch.Tensor, d: CropDraw, full: tuple[int, int]) -> tuple[torch.Tensor, list[float]]:
        """The device path's crop from ``pixels`` (``[1, 3, H, W]`` uint8, channels-last), which may
        have been decoded at a reduced scale, and the box actually cut in full-size pixels.

        torch's antialiased bicubic on channels-last uint8 computes PIL's filter (a = -0.5, support
        scaled with the reduction; within 4 levels, mean <= 0.14) about 6x faster than PIL, which made
        the resize the workers' floor. At a reduced decode the box is rounded to the decoded pixel
        grid (at most half a decoded pixel per edge) and the rounded box is what the sample records,
        so dense methods see the geometry that was cut."""
        top, left, h, w = d.box
        height, width = pixels.shape[-2:]
        sy, sx = height / full[1], width / full[0]
        if (height, width) != (full[1], full[0]):
            y0, x0 = round(top * sy), round(left * sx)
            y1, x1 = max(round((top + h) * sy), y0 + 1), max(round((left + w) * sx), x0 + 1)
            top, left, h, w = y0, x0, y1 - y0, x1 - x0
        crop = torch.nn.functional.interpolate(pixels[:, :, top:top + h, left:left + w], size=(d.size, d.size),
                                               mode="bicubic", antialias=True)
        return crop[0].contiguous(), [top / sy, left / sx, h / sy, w / sx]

    def __call__(self, img: Image.Image) -> dict[str, Any]:
        img = img.convert("RGB")
        full = img.info.get("full_size", img.size)  # (width, height) before a reduced decode
        draws = img.info.get("crop_draws") or self.draw(full[1], full[0])
        boxes = [d.box for d in draws]
        if self.on_device:  # uint8 crops and their parameters; flips and colour on the device
            pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]  # HWC memory: channels-last
            crops, boxes = zip(*(self._cut_uint8(pixels, d, full) for d in draws))
            crops = list(crops)
        else:
            crops = [self.to_tensor(self._finish_pil(self._cut(img, d), d)) for d in draws]
        sample = {
            "crops": crops,
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "flips": torch.tensor([d.flip for d in draws], dtype=torch.bool),
            "image_size": torch.tensor([full[1], full[0]], dtype=torch.int64),
        }
        if self.on_device:
            sample["params"] = CropDraw.stack(draws)
        return sample

    def finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The device half of ``on_device``: the collated uint8 crops of ``batch`` (on any device)
        flipped, jittered, grayed, blurred, solarized and normalised in place of the workers."""
        if "params" in batch:
            batch["crops"] = finish_views(batch["crops"], batch["flips"], batch.pop("params"), self.mean, self.std,
                                          self.blur_radius[1])
        return batch

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


class SingleViewAugmentation:
    """One view (FD's, which teacher and student both see): RandomResizedCrop (bilinear,
    torchvision's default, as FD) + horizontal flip + normalise. With ``on_device`` the workers
    return the uint8 view and :meth:`finish` normalises the collated batch where it trains."""

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), mean=(0.485, 0.456, 0.406),
                 std=(0.229, 0.224, 0.225)) -> None:
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.cut = v2.Compose([
            v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio),
                                 interpolation=InterpolationMode.BILINEAR, antialias=True),
            v2.RandomHorizontalFlip(),
        ])
        self.to_tensor = to_normalized_tensor(mean, std)
        self.on_device = False  # data.augment_on=device: uint8 views, normalised where they train

    def __call__(self, img: Image.Image) -> torch.Tensor:
        view = self.cut(img.convert("RGB"))
        return v2.functional.pil_to_tensor(view) if self.on_device else self.to_tensor(view)

    def finish(self, batch: dict) -> dict:
        batch["image"] = normalize(batch["image"], self.mean, self.std)
        return batch

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, {self.cut.transforms[0]})"
