"""kNN evaluation of a backbone on labelled folders: the glue used by run_eval.py and online kNN."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from selfdistill.data import EvalTransform, ImageFolderDataset, collate_eval
from selfdistill.eval.knn import ShardedEvalSampler, extract_features, knn_classify
from selfdistill.eval.protocols import EvalContext, Weights, register_protocol


@dataclass
class EvalShards:
    """Labelled webdataset shards for evaluation: each rank reads its own shards once, so every
    sample is embedded exactly once over all ranks (``extract_features`` gathers them)."""

    urls: list[str]
    classes: list[str]
    transform: Callable[[Any], Any]
    n_samples: int = 0  # from _info.json; 0 when unknown (bare shard URLs)

    def __len__(self) -> int:
        return self.n_samples

    def loader(self, batch_size: int, num_workers: int, rank: int, world: int) -> DataLoader:
        from selfdistill.data.sources import ShardStream

        stream = ShardStream(self.urls, self.transform, rank, world, seed=0, resampled=False)
        mine = len(self.urls[rank::world])
        return DataLoader(stream, batch_size=batch_size, num_workers=min(num_workers, mine), collate_fn=collate_eval)


def is_shards(path: str) -> bool:
    from selfdistill.data.shards import INFO_NAME

    return os.path.isfile(os.path.join(path, INFO_NAME)) or ".tar" in path or path.startswith(("pipe:", "s3://"))


def is_hf_dataset(path: str) -> bool:
    """An HF ``datasets`` directory (``save_to_disk`` output, or parquet / arrow files)."""
    root = Path(path)
    if not root.is_dir():
        return False
    if any((root / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        return True
    return any(root.glob("*.parquet")) or any(root.glob("*.arrow")) or any(root.glob("*/*.parquet"))


def labelled_images(path: str, image_size: int, mean, std, role: str,
                    transform: Callable[[Any], Any] | None = None) -> Dataset | EvalShards:
    """A labelled folder, labelled shards (a ``selfdistill-shards`` directory or shard URLs), or an
    HF ``datasets`` directory (``DIR@split`` picks a split; default ``train``). ``transform``
    defaults to DINO's evaluation transform at ``image_size``."""
    transform = transform or EvalTransform(size=image_size, mean=mean, std=std)
    if is_shards(path):
        from selfdistill.data.sources import expand_urls, shard_info

        info = shard_info(path) or {}
        classes = info.get("class_names")
        if not classes:
            raise ValueError(f"{role} shards {path} have no class names (an _info.json from a labelled input); "
                             "this evaluation needs labelled images")
        return EvalShards(expand_urls(path), list(classes), transform, int(info.get("total_samples", 0)))
    hf_path, _, split = path.rpartition("@") if "@" in path and not os.path.exists(path) else (path, "", "train")
    if is_hf_dataset(hf_path):
        from selfdistill.data.sources import HFImageDataset

        hf = HFImageDataset(hf_path, transform=transform, split=split)
        if not hf.labelled:
            raise ValueError(f"{role} HF dataset {path} has no label column; this evaluation needs labelled images")
        return hf
    ds = ImageFolderDataset(path, transform=transform)
    if not ds.labelled:
        raise ValueError(f"{role} folder {path} has no class sub-folders; this evaluation needs labelled images")
    return ds


def eval_loader(ds: Dataset | EvalShards, batch_size: int, num_workers: int, rank: int = 0, world: int = 1,
                collate_fn: Callable = collate_eval) -> DataLoader:
    """Every sample exactly once over all ranks (no padding), for feature extraction / validation."""
    if isinstance(ds, EvalShards):
        return ds.loader(batch_size, num_workers, rank, world)
    return DataLoader(ds, batch_size=batch_size, sampler=ShardedEvalSampler(len(ds), rank, world),
                      num_workers=num_workers, collate_fn=collate_fn)


@dataclass
class KnnSetup:
    train_set: Dataset | EvalShards
    val_set: Dataset | EvalShards
    k: list[int]
    temperature: float
    batch_size: int
    num_workers: int
    accelerator: Any = None

    @classmethod
    def from_config(cls, config: Any, accelerator: Any = None) -> "KnnSetup":
        k, d = config.knn, config.data
        train = labelled_images(k.train_path or d.path, k.image_size, d.mean, d.std, "kNN train (feature bank)")
        val = labelled_images(k.val_path, k.image_size, d.mean, d.std, "kNN validation")
        if train.classes != val.classes:
            raise ValueError(f"kNN train and validation folders have different classes: {train.classes[:5]}... vs "
                             f"{val.classes[:5]}...")
        train_set: Dataset | EvalShards = train
        if k.max_train_samples and isinstance(train, EvalShards):
            raise ValueError("knn.max_train_samples needs a folder feature bank (shards are read whole)")
        if k.max_train_samples and k.max_train_samples < len(train):
            g = torch.Generator().manual_seed(config.train.seed)
            idx = torch.randperm(len(train), generator=g)[: k.max_train_samples].sort().values
            train_set = Subset(train, idx.tolist())
        return cls(train_set, val, list(k.k), k.temperature, k.batch_size, min(d.num_workers, 4), accelerator)

    def _loader(self, ds: Dataset | EvalShards) -> DataLoader:
        rank = self.accelerator.process_index if self.accelerator else 0
        world = self.accelerator.num_processes if self.accelerator else 1
        return eval_loader(ds, self.batch_size, self.num_workers, rank, world)

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


# -- the kNN protocol for run_eval.py summary (run_eval.py knn keeps its own command) ----------------

@dataclass
class KnnOptions:
    train_path: str = field(metadata={"help": "labelled feature bank", "flags": ["--data.path"]})
    val_path: str = field(metadata={"help": "labelled queries", "flags": ["--data.val_path"]})
    k: list[int] = field(default_factory=lambda: [10, 20, 100, 200], metadata={"help": "neighbours"})
    temperature: float = field(default=0.07, metadata={"help": "vote temperature"})
    image_size: int = field(default=224, metadata={"help": "center-crop size"})
    batch_size: int = field(default=128, metadata={"help": "feature-extraction batch per process"})
    num_workers: int = field(default=4, metadata={"help": "data loading workers per process"})
    max_train_samples: int = field(default=0, metadata={"help": "random subset of the bank (0: all)"})


@register_protocol("knn", KnnOptions, help="weighted kNN (DINO eval_knn) on the pooled embedding")
def knn_protocol(weights: Weights, options: KnnOptions, ctx: EvalContext) -> dict[str, Any]:
    """Weighted kNN top-1 / top-5 for every k; ``--weights pixels`` scores raw pixels."""
    from selfdistill.config import Config, KnnConfig
    from selfdistill.eval.knn import KNN_METHOD

    config = Config(knn=KnnConfig(train_path=options.train_path, val_path=options.val_path, k=list(options.k),
                                  temperature=options.temperature, image_size=options.image_size,
                                  batch_size=options.batch_size, max_train_samples=options.max_train_samples))
    config.data.num_workers = options.num_workers
    setup = KnnSetup.from_config(config, ctx.accelerator)
    if weights.spec == "pixels":
        feature, fn = "raw pixels", pixel_features
    else:
        backbone = weights.backbone().to(ctx.device)
        feature = "pooled embedding (CLS for ViT, average pool otherwise), L2-normalised"

        def fn(x: torch.Tensor) -> torch.Tensor:
            return backbone(x).pooled
    results = setup.evaluate_features(fn)
    protocol = {"description": f"{KNN_METHOD}: Resize(size*256/224, bicubic)+CenterCrop, cosine similarity, "
                               "votes exp(s/T)", "feature": feature, "k": list(options.k),
                "temperature": options.temperature, "image_size": options.image_size,
                "n_train": len(setup.train_set), "n_test": len(setup.val_set),
                "train_path": options.train_path, "val_path": options.val_path, "units": "percent"}
    return {"metrics": flatten_results(results), "protocol": protocol}
