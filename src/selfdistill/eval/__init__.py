"""Evaluation of frozen features: weighted kNN (DINO protocol)."""

from .knn import (
    DEFAULT_K_VALUES,
    ShardedEvalSampler,
    extract_features,
    format_knn_results,
    knn_classify,
    save_knn_results,
    weighted_vote,
)

__all__ = [
    "DEFAULT_K_VALUES",
    "ShardedEvalSampler",
    "extract_features",
    "format_knn_results",
    "knn_classify",
    "save_knn_results",
    "weighted_vote",
]
