"""Batch collation for multi-crop training samples and single-image evaluation samples.

Both keep the ``"bad"`` paths of every sample (flattened) and the sums of ``"draws"`` /
``"bad_draws"``, so the training loop can count unreadable images without a side channel from the
workers.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["collate_multicrop", "collate_eval"]


def _collate_common(samples: list[dict[str, Any]]) -> dict[str, Any]:
    if not samples:
        raise ValueError("cannot collate an empty batch")
    return {
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "bad": [path for s in samples for path in s["bad"]],
        "draws": sum(s.get("draws", 1) for s in samples),
        "bad_draws": sum(s.get("bad_draws", 0) for s in samples),
    }


def collate_multicrop(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``MultiCropAugmentation`` samples view by view.

    Returns ``crops`` (list of ``V`` tensors ``[B, 3, S_v, S_v]``, one per view so global and local
    sizes can differ), ``boxes`` ``[B, V, 4]``, ``flips`` ``[B, V]``, ``image_size`` ``[B, 2]``,
    ``label`` and ``index`` ``[B]`` and the flattened ``bad`` paths; with crops cut for the device,
    their photometric ``params`` (each ``[B, V, ...]``); with iBOT masks, ``masks`` ``[B, 2, N]``.
    """
    batch = _collate_common(samples)
    views = [s["image"] for s in samples]
    n_views = len(views[0]["crops"])
    if any(len(v["crops"]) != n_views for v in views):
        raise ValueError(f"samples have different numbers of crops: {[len(v['crops']) for v in views]}")
    batch["crops"] = [torch.stack([v["crops"][k] for v in views]) for k in range(n_views)]
    batch["boxes"] = torch.stack([v["boxes"] for v in views])
    batch["flips"] = torch.stack([v["flips"] for v in views])
    batch["image_size"] = torch.stack([v["image_size"] for v in views])
    if "masks" in views[0]:  # DINOv2's iBOT masks of the global crops (data.masking.MaskedMultiCrop)
        batch["masks"] = torch.stack([v["masks"] for v in views])
    if "params" in views[0]:  # data.augment_on=device: uint8 crops, finished where the model trains
        batch["params"] = {k: torch.stack([v["params"][k] for v in views]) for k in views[0]["params"]}
    return batch


def collate_eval(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples whose ``"image"`` is one tensor (e.g. from ``EvalTransform``)."""
    batch = _collate_common(samples)
    batch["image"] = torch.stack([s["image"] for s in samples])
    return batch
