"""The photometric half of multi-crop augmentation, on a whole batch where it trains
(``data.augment_on: device``).

Loader workers then only decode, cut and resize (uint8) and draw every parameter exactly as the
worker path does (:meth:`MultiCropAugmentation.draw`); this module applies flips, colour jitter in
each crop's drawn order, grayscale, Gaussian blur, solarize and normalisation to all crops of one
size at once, with per-crop parameters and no loop over samples. The operations are torchvision's
definitions on floats (PIL's on uint8 in the worker path); ``tests/test_device_augment.py`` states
and checks how far apart the two paths are, operation by operation, on real photos.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as nnf

__all__ = ["adjust_brightness", "adjust_contrast", "adjust_hue", "adjust_saturation", "finish_views",
           "gaussian_blur", "grayscale", "normalize", "solarize"]

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")


def _per_sample(factor: torch.Tensor) -> torch.Tensor:
    return factor.reshape(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] -> luma ``[N, 1, H, W]``."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_sample(factor)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` turns (in [-0.5, 0.5]) per sample, through HSV. The shift is
    truncated to 1/255 turn, as torchvision's PIL path applies it (to the 8-bit hue channel)."""
    shift = torch.trunc(shift * 255) / 255
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    h = torch.remainder(h + shift.reshape(-1, 1, 1), 1.0)
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    v = maxc
    i = torch.floor(h * 6)
    f = h * 6 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    # sector k takes (v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)
    table = torch.stack([torch.stack(c) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))])
    return table.gather(1, i.unsqueeze(0).unsqueeze(0).expand(3, 1, *i.shape)).squeeze(1).permute(1, 0, 2, 3)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """A Gaussian of standard deviation ``sigma`` (per sample, px) over ``3 max_sigma``; the edges
    extend the border pixels, as PIL does."""
    radius = max(1, math.ceil(3 * max_sigma))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    weights = torch.exp(-offsets[None] ** 2 / (2 * sigma.to(x.dtype)[:, None].clamp_min(1e-3) ** 2))
    weights = weights / weights.sum(dim=1, keepdim=True)  # [N, K]
    n, c, h, w = x.shape
    kernel = weights.repeat_interleave(c, dim=0)  # one per (sample, channel)
    flat = nnf.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
    flat = nnf.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    flat = nnf.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def solarize(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``solarize(threshold=128)`` on values that round to uint8 levels 128 and up."""
    return torch.where(x >= 127.5 / 255, 1 - x, x)


_JITTER = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _on(mask: torch.Tensor, x: torch.Tensor, op, *args: torch.Tensor) -> None:
    """``op`` on the samples of ``mask`` only (their parameters indexed alike), in place."""
    idx = mask.nonzero().squeeze(1)
    if idx.numel():
        x[idx] = op(x[idx], *(a[idx] for a in args))


def finish_group(x: torch.Tensor, flips: torch.Tensor, params: dict[str, torch.Tensor], mean: Sequence[float],
                 std: Sequence[float], max_sigma: float) -> torch.Tensor:
    """uint8 crops ``[N, 3, S, S]`` of one size and their ``[N]`` / ``[N, 4]`` parameters ->
    normalised float32 crops, in the worker path's order: flip, jitter, grayscale, blur, solarize."""
    x = x.float().div_(255)
    x = torch.where(flips.reshape(-1, 1, 1, 1), x.flip(-1), x)
    jitter, order, factors = params["jitter"], params["order"], params["factors"]
    for position in range(order.shape[1]):
        for k, op in enumerate(_JITTER):
            _on(jitter & (order[:, position] == k), x, op, factors[:, k])
    _on(params["gray"], x, lambda v: grayscale(v).expand(-1, 3, -1, -1))
    _on(params["sigma"] > 0, x, lambda v, s: gaussian_blur(v, s, max_sigma), params["sigma"])
    _on(params["solarize"], x, solarize)
    return normalize(x, mean, std)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``[N, 3, H, W]``: uint8 levels or floats in [0, 1] -> float32 normalised per channel."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).reshape(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).reshape(1, 3, 1, 1)
    return (x - m).div_(s)


def finish_views(crops: list[torch.Tensor], flips: torch.Tensor, params: dict[str, torch.Tensor],
                 mean: Sequence[float], std: Sequence[float], max_sigma: float) -> list[torch.Tensor]:
    """A collated multi-crop batch (``V`` uint8 views ``[B, 3, S_v, S_v]``, ``flips [B, V]``,
    parameters ``[B, V, ...]``) finished one resolution at a time: views of one size are
    concatenated and processed together."""
    out: list[torch.Tensor | None] = [None] * len(crops)
    for size in dict.fromkeys(c.shape[-1] for c in crops):
        views = [v for v, c in enumerate(crops) if c.shape[-1] == size]
        group = finish_group(torch.cat([crops[v] for v in views]), torch.cat([flips[:, v] for v in views]),
                             {k: torch.cat([p[:, v] for v in views]) for k, p in params.items()}, mean, std,
                             max_sigma)
        for v, chunk in zip(views, group.chunk(len(views))):
            out[v] = chunk
    return out  # type: ignore[return-value]
