"""Inference passes over evaluation images: every image of a loader embedded once over all ranks
(each reads a disjoint shard, :class:`~selfdistill.data.sampler.ShardedEvalSampler`), then gathered
in dataset order, or summed over all ranks, without gradients. The training loop's sibling, on the
evaluation side (it reads frozen weights, so it imports nothing of the engine): evaluation protocols
and the training tasks' validation hooks iterate batches only through here."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from selfdistill.console import interactive

__all__ = ["extract_features", "sum_over_batches"]


def _infer_device(feature_fn: Callable) -> torch.device | None:
    """Device of ``feature_fn``'s parameters when it is a module, else ``None`` (leave as is)."""
    if isinstance(feature_fn, torch.nn.Module):
        param = next(feature_fn.parameters(), None)
        if param is not None:
            return param.device
    return None


def _batch_field(batch: Mapping[str, Any], key: str) -> Any:
    try:
        return batch[key]
    except (KeyError, TypeError):
        raise ValueError(
            f"the loader must yield dicts with keys 'image', 'label' and 'index'; missing {key!r}"
        ) from None


def _as_long_vector(values: Any) -> torch.Tensor:
    return torch.as_tensor(values).to("cpu", torch.long).reshape(-1)


def _gather_from_all_ranks(
    accelerator: Any, features: torch.Tensor | None, labels: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All ranks' (features, labels, indices) concatenated; every rank gets the same tensors.

    Shards may have unequal (even zero) length, so tensors are padded to the longest shard and
    the padding, marked by index -1, dropped after the gather. Every rank runs the same
    collectives in the same order, including ranks with an empty shard.
    """
    device = accelerator.device
    local_dim = torch.tensor([-1 if features is None else features.shape[1]], device=device)
    dims = accelerator.gather(local_dim).cpu()
    dim = int(dims.max())
    if dim < 0:
        raise ValueError("the loader yielded no samples on any process")
    if ((dims >= 0) & (dims != dim)).any():
        raise ValueError(f"feature dimensions differ across processes: {dims.tolist()}")
    if features is None:
        features = torch.empty(0, dim)

    features = accelerator.pad_across_processes(features.to(device), dim=0, pad_index=0)
    labels = accelerator.pad_across_processes(labels.to(device), dim=0, pad_index=-1)
    indices = accelerator.pad_across_processes(indices.to(device), dim=0, pad_index=-1)
    features, labels, indices = (accelerator.gather(t).cpu() for t in (features, labels, indices))
    real = indices >= 0
    return features[real], labels[real], indices[real]


def _sort_and_dedupe(
    features: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order by dataset index and keep one row per index.

    Duplicates come from samplers that pad shards to equal length (``DistributedSampler``,
    Accelerate's ``even_batches``); counting a sample twice would bias the evaluation.
    """
    indices, order = torch.sort(indices, stable=True)
    first = torch.ones_like(indices, dtype=torch.bool)
    first[1:] = indices[1:] != indices[:-1]
    order = order[first]
    return features[order], labels[order], indices[first]


def extract_features(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device | str | None = None,
    accelerator: Any = None,
    normalize: bool = True,
    desc: str = "features",
    show_progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embed every image of ``loader`` with ``feature_fn`` (no gradients), in dataset order.

    ``feature_fn`` is called as-is: put a module in eval mode (and wrap it in autocast) yourself.
    Gradients are disabled with ``torch.no_grad`` rather than ``inference_mode`` so the function
    can be a live, training model (online kNN) whose outputs must not become inference tensors.

    Args:
        feature_fn: maps images [B, 3, H, W] to embeddings [B, D].
        loader: yields dicts with ``"image"``, ``"label"`` (int64 [B]) and ``"index"`` (int64 [B],
            the dataset index of each sample).
        device: where images go; defaults to ``accelerator.device``, else the device of
            ``feature_fn``'s parameters when it is a module, else images are not moved.
        accelerator: HF Accelerate ``Accelerator``. With several processes each must read a
            disjoint shard (e.g. :class:`ShardedEvalSampler`); results are gathered so every rank
            returns the identical full set.
        normalize: L2-normalise the features (in float32), as the kNN protocol expects.
        desc: progress bar label.
        show_progress: show a tqdm bar (on the main process only).

    Returns:
        ``(features [N, D] float32, labels [N] int64, indices [N] int64)`` on the CPU, sorted by
        dataset index, with one row per index (repeated indices are dropped).
    """
    if accelerator is not None:
        device = accelerator.device
    elif device is None:
        device = _infer_device(feature_fn)
    distributed = accelerator is not None and accelerator.num_processes > 1
    is_main = accelerator is None or accelerator.is_main_process

    feats, labels, indices = [], [], []
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, disable=not (show_progress and is_main and interactive()), dynamic_ncols=True):
            images = _batch_field(batch, "image")
            if device is not None:
                images = images.to(device, non_blocking=True)
            out = feature_fn(images)
            if out.ndim != 2 or out.shape[0] != images.shape[0]:
                raise ValueError(
                    f"feature_fn must return [B, D] = [{images.shape[0]}, D] features, got {tuple(out.shape)}"
                )
            out = out.float()
            if normalize:
                out = F.normalize(out, dim=1)
            feats.append(out.cpu())
            labels.append(_as_long_vector(_batch_field(batch, "label")))
            indices.append(_as_long_vector(_batch_field(batch, "index")))

    local_feats = torch.cat(feats) if feats else None
    local_labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    local_indices = torch.cat(indices) if indices else torch.empty(0, dtype=torch.long)
    n_images = 0 if local_feats is None else local_feats.shape[0]
    if not n_images == local_labels.shape[0] == local_indices.shape[0]:
        raise ValueError(
            f"loader yielded {n_images} images but {local_labels.shape[0]} labels "
            f"and {local_indices.shape[0]} indices"
        )
    if local_indices.numel() and local_indices.min() < 0:
        raise ValueError("dataset indices must be >= 0")

    if distributed:
        all_feats, all_labels, all_indices = _gather_from_all_ranks(
            accelerator, local_feats, local_labels, local_indices
        )
    elif local_feats is None:
        raise ValueError("the loader yielded no samples")
    else:
        all_feats, all_labels, all_indices = local_feats, local_labels, local_indices
    return _sort_and_dedupe(all_feats, all_labels, all_indices)


@torch.no_grad()
def sum_over_batches(fn: Callable[[Any], torch.Tensor], batches: Iterable[Any], accelerator: Any,
                     initial: torch.Tensor, desc: str = "", show_progress: bool = True) -> torch.Tensor:
    """``initial + sum of fn(batch)`` over every batch of every rank (all-reduced): counts, sums of
    losses, hits. ``initial`` fixes the shape, so a rank without a batch still joins the reduction."""
    total = initial.clone()
    is_main = accelerator is None or accelerator.is_main_process
    for batch in tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, disable=not (show_progress and is_main and interactive())):
        total += fn(batch).to(total.device, total.dtype)
    if accelerator is not None and accelerator.num_processes > 1:
        total = accelerator.reduce(total.to(accelerator.device), reduction="sum")
    return total
