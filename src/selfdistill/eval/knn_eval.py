"""kNN evaluation of a backbone on labelled folders: the glue used by run_eval.py and online kNN."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from selfdistill.data import EvalTransform, ImageFolderDataset, collate_eval
from selfdistill.eval.knn import ShardedEvalSampler, extract_features, knn_classify


def labelled_folder(path: str, image_size: int, mean, std, role: str) -> ImageFolderDataset:
    ds = ImageFolderDataset(path, transform=EvalTransform(size=image_size, mean=mean, std=std))
    if not ds.labelled:
        raise ValueError(f"kNN {role} folder {path} has no class sub-folders; kNN needs labelled images")
    return ds


@dataclass
class KnnSetup:
    train_set: Dataset
    val_set: Dataset
    k: list[int]
    temperature: float
    batch_size: int
    num_workers: int
    accelerator: Any = None

    @classmethod
    def from_config(cls, config: Any, accelerator: Any = None) -> "KnnSetup":
        k, d = config.knn, config.data
        train = labelled_folder(k.train_path or d.path, k.image_size, d.mean, d.std, "train (feature bank)")
        val = labelled_folder(k.val_path, k.image_size, d.mean, d.std, "validation")
        if train.classes != val.classes:
            raise ValueError(f"kNN train and validation folders have different classes: {train.classes[:5]}... vs "
                             f"{val.classes[:5]}...")
        train_set: Dataset = train
        if k.max_train_samples and k.max_train_samples < len(train):
            g = torch.Generator().manual_seed(config.train.seed)
            idx = torch.randperm(len(train), generator=g)[: k.max_train_samples].sort().values
            train_set = Subset(train, idx.tolist())
        return cls(train_set, val, list(k.k), k.temperature, k.batch_size, min(d.num_workers, 4), accelerator)

    def _loader(self, ds: Dataset) -> DataLoader:
        rank = self.accelerator.process_index if self.accelerator else 0
        world = self.accelerator.num_processes if self.accelerator else 1
        return DataLoader(ds, batch_size=self.batch_size, sampler=ShardedEvalSampler(len(ds), rank, world),
                          num_workers=self.num_workers, collate_fn=collate_eval)

    def features(self, feature_fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device | None = None):
        kw = dict(accelerator=self.accelerator) if self.accelerator else dict(device=device)
        train = extract_features(feature_fn, self._loader(self.train_set), desc="kNN bank", **kw)
        val = extract_features(feature_fn, self._loader(self.val_set), desc="kNN queries", **kw)
        return train, val

    def evaluate_features(self, feature_fn: Callable[[torch.Tensor], torch.Tensor],
                          device: torch.device | None = None) -> dict[int, dict[str, float]]:
        (tr_f, tr_y, _), (va_f, va_y, _) = self.features(feature_fn, device)
        return knn_classify(tr_f, tr_y, va_f, va_y, k_values=self.k, temperature=self.temperature)

    def evaluate(self, backbone: torch.nn.Module, device: torch.device | None = None) -> dict[str, float]:
        """Flat ``{"top1_k20": ...}`` results for the backbone's pooled embedding (eval mode)."""
        was_training = backbone.training
        backbone.eval()
        try:
            results = self.evaluate_features(lambda x: backbone(x).pooled, device)
        finally:
            backbone.train(was_training)
        return flatten_results(results)


def flatten_results(results: dict[int, dict[str, float]]) -> dict[str, float]:
    return {f"{metric}_k{k}": v for k, row in results.items() for metric, v in row.items()}


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """Raw pixels as features: the floor every learned representation should beat."""
    return images.flatten(1)
