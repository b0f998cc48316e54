"""Weighted k-nearest-neighbour evaluation of frozen features (the DINO ``eval_knn`` protocol).

Every test image votes with its ``k`` most similar training images (cosine similarity of
L2-normalised features); a neighbour with similarity ``s`` votes for its class with weight
``exp(s / T)``. The class with the largest summed weight is the prediction. Reported numbers are
top-1 and top-5 accuracy in percent for each ``k``.

Differences from the reference implementation (facebookresearch/dino ``eval_knn.py``), all of
which only matter in corner cases and never change a non-degenerate result:

* any number of test images works (the reference divides the test set into 100 chunks and fails
  with fewer than 100 images); chunking is by a fixed ``chunk_size`` and changes no result;
* ``k`` larger than the training set is clipped to its size (with a warning) instead of failing;
* a class that none of the ``k`` neighbours belongs to can never count as a top-5 hit (the
  reference ranks such zero-score classes in arbitrary order, so a lucky tie could count);
* ties between classes with equal scores go to the lower class index, so results are
  deterministic;
* votes are computed relative to the nearest neighbour, ``exp((s - s_1) / T)``, which leaves the
  ranking unchanged but cannot overflow for small temperatures.

Features come from :func:`selfdistill.eval.inference.extract_features` (every image once over
all ranks, gathered in dataset order).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from selfdistill.atomic import write_json_atomic

__all__ = [
    "DEFAULT_K_VALUES",
    "format_knn_results",
    "knn_classify",
    "save_knn_results",
    "weighted_vote",
]

DEFAULT_K_VALUES = (10, 20, 100, 200)
KNN_METHOD = "weighted kNN (DINO eval_knn)"
_TOPK = 5  # the "top-5" in top-5 accuracy


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


def _check_features(name: str, features: torch.Tensor) -> None:
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"{name} must be a 2-D [N, D] tensor, got {shape}")
    if not features.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {features.dtype}")
    if features.shape[0] == 0:
        raise ValueError(f"{name} is empty: kNN needs at least one sample")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or Inf values")


def _check_labels(name: str, labels: torch.Tensor, num_samples: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{name} must be a 1-D [N] tensor, got {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.shape[0] != num_samples:
        raise ValueError(f"{name} has {labels.shape[0]} entries but there are {num_samples} feature rows")
    if labels.min().item() < 0:
        raise ValueError(
            f"{name} contains negative labels (unlabelled samples, e.g. -1); "
            "kNN evaluation needs a labelled train and test set"
        )


def _check_k_values(k_values: Iterable[int]) -> list[int]:
    ks = list(k_values)
    if not ks:
        raise ValueError("k_values must not be empty")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"k_values must be positive integers, got {k!r}")
    return ks


def weighted_vote(
    neighbour_sims: torch.Tensor,
    neighbour_labels: torch.Tensor,
    num_classes: int,
    temperature: float,
) -> torch.Tensor:
    """Per-class vote of each query's neighbours, DINO style.

    Args:
        neighbour_sims: [B, k] similarities to the neighbours, nearest first.
        neighbour_labels: [B, k] class of each neighbour.
        num_classes: number of classes C.
        temperature: softmax-like temperature T of the weights ``exp(s / T)``.

    Returns:
        [B, C] float32 scores ``sum_i exp((s_i - s_1) / T)`` over the neighbours ``i`` of each
        class: DINO's ``sum_i exp(s_i / T)`` divided by the nearest neighbour's weight, which keeps
        the ranking but cannot overflow at small ``T``. Classes without a neighbour score ``-inf``
        so they are never predicted, even when the weights of distant neighbours underflow to 0.
    """
    sims = neighbour_sims.float()
    weights = ((sims - sims[:, :1]) / temperature).exp()
    scores = sims.new_zeros(sims.shape[0], num_classes).scatter_add_(1, neighbour_labels, weights)
    voted = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, neighbour_labels, True)
    return scores.masked_fill_(~voted, -math.inf)


def _rank_of_target(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target class, ties broken towards the lower class index.

    Counting the classes ranked ahead (instead of sorting) makes the result independent of the
    sort implementation; a class nobody voted for gets rank C, i.e. it is never a hit.
    """
    target_scores = scores.gather(1, targets[:, None])
    class_ids = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores > target_scores) | ((scores == target_scores) & (class_ids < targets[:, None]))
    rank = ahead.sum(dim=1)
    return rank.masked_fill_(target_scores[:, 0] == -math.inf, scores.shape[1])


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k_values: Iterable[int] = DEFAULT_K_VALUES,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict[int, dict[str, float]]:
    """Weighted kNN top-1 / top-5 accuracy (percent) of ``test`` against the ``train`` bank.

    Features must already be L2-normalised (so the dot product is the cosine similarity). The
    computation runs on ``train_features.device``; test rows are processed ``chunk_size`` at a
    time, so peak memory is about ``chunk_size * N_train`` similarities. Neighbours are found
    once for the largest ``k`` and sliced for the smaller ones.

    Args:
        train_features: [N_train, D] feature bank.
        train_labels: [N_train] integer class labels (>= 0).
        test_features: [N_test, D] query features.
        test_labels: [N_test] integer class labels (>= 0).
        k_values: numbers of neighbours to evaluate; a ``k`` above ``N_train`` is clipped to it.
        temperature: T of the vote weights ``exp(sim / T)`` (DINO: 0.07).
        num_classes: number of classes; defaults to the largest label (train or test) + 1.
        chunk_size: test rows per similarity matrix; does not change the result.

    Returns:
        ``{k: {"top1": acc, "top5": acc}}`` for each requested ``k`` (keyed by the requested,
        not the clipped, value); ``"top5"`` is present only when ``num_classes >= 5``.
    """
    _check_features("train_features", train_features)
    _check_features("test_features", test_features)
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"feature dimensions differ: train {train_features.shape[1]}, test {test_features.shape[1]}"
        )
    n_train, n_test = train_features.shape[0], test_features.shape[0]
    _check_labels("train_labels", train_labels, n_train)
    _check_labels("test_labels", test_labels, n_test)
    ks = _check_k_values(k_values)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")

    max_label = max(int(train_labels.max()), int(test_labels.max()))
    if num_classes is None:
        num_classes = max_label + 1
    elif num_classes <= max_label:
        raise ValueError(f"num_classes={num_classes} but the labels go up to {max_label}")

    clipped = sorted({k for k in ks if k > n_train})
    if clipped:
        warnings.warn(
            f"k values {clipped} exceed the {n_train} training samples; using k={n_train} for them",
            stacklevel=2,
        )
    effective_k = {k: min(k, n_train) for k in ks}
    max_k = max(effective_k.values())
    top_n = [1, _TOPK] if num_classes >= _TOPK else [1]

    device = train_features.device
    train_labels = train_labels.to(device=device, dtype=torch.long)
    test_features = test_features.to(device=device, dtype=train_features.dtype)
    test_labels = test_labels.to(device=device, dtype=torch.long)
    unique_ks = sorted(set(effective_k.values()))
    # Hits are accumulated on the device so the loop never waits for a host sync.
    hits = {(k, n): torch.zeros((), dtype=torch.long, device=device) for k in unique_ks for n in top_n}

    for start in range(0, n_test, chunk_size):
        queries = test_features[start : start + chunk_size]
        targets = test_labels[start : start + chunk_size]
        sims, neighbours = (queries @ train_features.T).topk(max_k, dim=1, largest=True, sorted=True)
        neighbour_labels = train_labels[neighbours]
        for k in unique_ks:
            scores = weighted_vote(sims[:, :k], neighbour_labels[:, :k], num_classes, temperature)
            rank = _rank_of_target(scores, targets)
            for n in top_n:
                hits[k, n] += (rank < n).sum()

    results: dict[int, dict[str, float]] = {}
    for k in ks:
        row = {"top1": 100.0 * hits[effective_k[k], 1].item() / n_test}
        if num_classes >= _TOPK:
            row["top5"] = 100.0 * hits[effective_k[k], _TOPK].item() / n_test
        results[k] = row
    return results


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def format_knn_results(results: Mapping[int, Mapping[str, float]]) -> str:
    """Aligned ``k / top1 / top5`` table for logs; a missing top-5 prints as ``-``."""
    lines = [f"{'k':>6}  {'top1':>6}  {'top5':>6}"]
    for k, row in results.items():
        top5 = row.get("top5")
        top5_str = f"{top5:6.2f}" if top5 is not None else f"{'-':>6}"
        lines.append(f"{k:>6}  {row['top1']:6.2f}  {top5_str}")
    return "\n".join(lines)


def save_knn_results(
    results: Mapping[int, Mapping[str, float]],
    path: str | os.PathLike,
    extra: Mapping[str, Any] | None = None,
    *,
    temperature: float = 0.07,
    feature: str = "unspecified",
    n_train: int | None = None,
    n_test: int | None = None,
) -> Path:
    """Write results and the protocol that produced them to a JSON file, atomically.

    The file is written next to ``path`` and moved into place with ``os.replace``, so a reader
    (or a crash) never sees a half-written file.

    Args:
        results: output of :func:`knn_classify`.
        path: destination ``.json`` file; parent directories are created.
        extra: additional top-level keys (e.g. checkpoint, epoch); may not be ``protocol`` or
            ``results``.
        temperature: the T used for the vote weights.
        feature: which embedding was evaluated (e.g. ``"teacher backbone CLS"``).
        n_train: size of the feature bank (``null`` when unknown).
        n_test: number of test images (``null`` when unknown).

    Returns:
        The path written.
    """
    extra = dict(extra or {})
    clash = {"protocol", "results"} & extra.keys()
    if clash:
        raise ValueError(f"extra may not override {sorted(clash)}")
    payload = {
        "protocol": {
            "method": KNN_METHOD,
            "temperature": float(temperature),
            "k": [int(k) for k in results],
            "feature": feature,
            "n_train": None if n_train is None else int(n_train),
            "n_test": None if n_test is None else int(n_test),
        },
        "results": {str(k): {name: float(v) for name, v in row.items()} for k, row in results.items()},
        **extra,
    }

    return write_json_atomic(path, payload)
