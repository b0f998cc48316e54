"""DINOv2's block masking of the global crops for the iBOT loss (BEiT's ``MaskingGenerator``).

A global crop is masked with probability ``sample_probability``; a masked crop hides a fraction
drawn uniformly from ``ratio_min_max`` of its ``rows x cols`` patch grid, as rectangles of at least
``min_patches`` patches with aspect ratios in ``[min_aspect, 1/min_aspect]``, at most half the grid
per rectangle, added until the target count is reached (or no rectangle fits in 10 tries).

DINOv2 draws in its collate function: exactly ``int(p * n)`` crops of a batch are masked, with
ratios stratified over ``linspace(min, max)``. Here each crop draws for itself inside the per-sample
seeded augmentation (torch's CPU generator), so the masks of an image do not depend on the batch it
lands in, the number of ranks or workers, or a resume: the probability and the mean ratio are the
same, the per-batch count varies around ``p * n``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["BlockMasking", "MaskedMultiCrop"]


class BlockMasking:
    """Random rectangles on a ``grid`` of patches; ``__call__`` returns one crop's mask ``[rows*cols]``
    bool (row-major, the backbone's token order), all False when the crop is not masked."""

    def __init__(self, grid: tuple[int, int], sample_probability: float = 0.5,
                 ratio_min_max: tuple[float, float] = (0.1, 0.5), min_patches: int = 4, min_aspect: float = 0.3,
                 max_patches: int | None = None) -> None:
        if not 0.0 <= sample_probability <= 1.0:
            raise ValueError(f"sample_probability must be in [0, 1], got {sample_probability}")
        if not 0.0 <= ratio_min_max[0] <= ratio_min_max[1] <= 1.0:
            raise ValueError(f"ratio_min_max must satisfy 0 <= min <= max <= 1, got {tuple(ratio_min_max)}")
        self.rows, self.cols = grid
        self.n_patches = self.rows * self.cols
        self.sample_probability = sample_probability
        self.ratio_min_max = tuple(ratio_min_max)
        self.min_patches = min_patches
        self.max_patches = int(0.5 * self.n_patches) if max_patches is None else max_patches  # per rectangle
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand(()))

    def _add_rectangle(self, mask: torch.Tensor, budget: int) -> int:
        """One rectangle of new masked patches, at most ``budget`` of them; how many were added."""
        for _ in range(10):
            area = self._uniform(self.min_patches, budget)
            aspect = math.exp(self._uniform(*self.log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w >= self.cols or h >= self.rows:
                continue
            top = int(torch.randint(0, self.rows - h + 1, ()))
            left = int(torch.randint(0, self.cols - w + 1, ()))
            window = mask[top:top + h, left:left + w]
            new = h * w - int(window.sum())
            if 0 < new <= budget:
                window.fill_(True)
                return new
        return 0

    def block_mask(self, n_masked: int) -> torch.Tensor:
        """A ``[rows, cols]`` mask with up to ``n_masked`` patches in rectangles."""
        mask = torch.zeros(self.rows, self.cols, dtype=torch.bool)
        count = 0
        while count < n_masked:
            added = self._add_rectangle(mask, min(n_masked - count, self.max_patches))
            if added == 0:
                break
            count += added
        return mask

    def __call__(self) -> torch.Tensor:
        if float(torch.rand(())) >= self.sample_probability:
            return torch.zeros(self.n_patches, dtype=torch.bool)
        ratio = self._uniform(*self.ratio_min_max)
        return self.block_mask(int(self.n_patches * ratio)).flatten()


class MaskedMultiCrop:
    """A multi-crop augmentation whose samples also carry ``"masks"`` ``[n_global_crops, rows*cols]``
    (one :class:`BlockMasking` draw per global crop). Everything else, ``on_device`` and ``finish``
    included, is the wrapped augmentation's.

    The masks are drawn *before* the crops, in ``plan`` too: cutting for the device draws the crops
    at decode time and the masks again in the transform, each under the sample's freshly seeded RNG,
    so both paths see the same masks and the same crops."""

    def __init__(self, augmentation: Any, masking: BlockMasking) -> None:
        self.augmentation, self.masking = augmentation, masking

    @property
    def on_device(self) -> bool:
        return self.augmentation.on_device

    @on_device.setter
    def on_device(self, value: bool) -> None:
        self.augmentation.on_device = value

    def _masks(self) -> torch.Tensor:
        return torch.stack([self.masking() for _ in range(self.augmentation.n_global_crops)])

    def plan(self, width: int, height: int) -> Any:
        if self.on_device:
            self._masks()  # the draws __call__ makes first, so the crops are drawn from the same RNG state
        return self.augmentation.plan(width, height)

    def finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.augmentation.finish(batch)

    def __call__(self, img: Any) -> dict[str, Any]:
        masks = self._masks()
        sample = self.augmentation(img)
        sample["masks"] = masks
        return sample

    def __repr__(self) -> str:
        m = self.masking
        return (f"{type(self).__name__}({self.augmentation!r}, grid={m.rows}x{m.cols}, "
                f"p={m.sample_probability}, ratio={m.ratio_min_max})")
