"""kNN evaluation of a backbone on labelled images: the ``knn`` protocol (``run_eval.py knn``),
the set-up the online kNN of pretraining scores with (its hook: :mod:`selfdistill.training.knn_hook`),
and the demo's comparison.

Images come through the data door (:func:`selfdistill.data.open_images`: folders, shards, HF
directories); under several processes each embeds its share once and the features are gathered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from selfdistill.data import EvalTransform, ImageSet, open_images
from selfdistill.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from selfdistill.eval.inference import extract_features
from selfdistill.eval.knn import KNN_METHOD, knn_classify
from selfdistill.eval.protocols import EvalContext, Weights, register_protocol, settings_from_run

__all__ = ["KnnOptions", "KnnSetup", "flatten_results", "knn_protocol", "pixel_features"]


@dataclass
class KnnSetup:
    """The feature bank and the queries of a kNN evaluation, and how to score features on them."""

    train_set: ImageSet
    val_set: ImageSet
    k: list[int]
    temperature: float
    batch_size: int
    num_workers: int = 4
    accelerator: Any = None
    embedded: int = 0  # images this process embedded (the last evaluation)

    @classmethod
    def open(cls, train_path: str, val_path: str, k: list[int], temperature: float = 0.07, image_size: int = 224,
             batch_size: int = 128, num_workers: int = 4, max_train_samples: int = 0, seed: int = 0,
             mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
             accelerator: Any = None, roles: tuple[str, str] = ("--data.path", "--data.val_path")) -> KnnSetup:
        """Open both labelled sets with DINO's evaluation transform (resize size*256/224, centre crop)."""
        transform = EvalTransform(size=image_size, mean=mean, std=std)
        train = open_images(train_path, transform, labelled=True, role=roles[0])
        val = open_images(val_path, transform, labelled=True, role=roles[1])
        if train.classes != val.classes:
            raise ValueError(f"kNN train and validation images have different classes: {train.classes[:5]}... vs "
                             f"{val.classes[:5]}...")
        if max_train_samples:
            train = train.subset(max_train_samples, seed)
        return cls(train, val, list(k), temperature, batch_size, num_workers, accelerator)

    @classmethod
    def from_config(cls, config: Any, accelerator: Any = None) -> KnnSetup:
        """The online kNN of a pretraining recipe (``knn`` section; the bank defaults to ``data.path``)."""
        k, d = config.knn, config.data
        return cls.open(k.train_path or d.path, k.val_path, k.k, k.temperature, k.image_size, k.batch_size,
                        min(d.num_workers, 4), k.max_train_samples, config.train.seed, d.mean, d.std, accelerator,
                        roles=("knn.train_path", "knn.val_path"))

    def _loader(self, images: ImageSet) -> Any:
        rank = self.accelerator.process_index if self.accelerator else 0
        world = self.accelerator.num_processes if self.accelerator else 1
        return images.eval_loader(self.batch_size, rank, world, num_workers=self.num_workers)

    def features(self, feature_fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device | None = None):
        """Bank and query features (every image embedded once over all processes, gathered)."""
        self.embedded = 0

        def counted(x: torch.Tensor) -> torch.Tensor:
            self.embedded += x.shape[0]
            return feature_fn(x)

        kw = dict(accelerator=self.accelerator) if self.accelerator else dict(device=device)
        train = extract_features(counted, self._loader(self.train_set), desc="kNN bank", **kw)
        val = extract_features(counted, self._loader(self.val_set), desc="kNN queries", **kw)
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


# -- the kNN protocol: run_eval.py knn and summary ------------------------------------------------

@dataclass
class KnnOptions:
    train_path: str = field(default="", metadata={
        "help": "labelled images: the feature bank (folder, shards, HF directory; default: the run's knn.train_path "
                "or data.path)", "flags": ["--data.path"]})
    val_path: str = field(default="", metadata={"help": "labelled images: the queries (default: the run's "
                                                        "knn.val_path)", "flags": ["--data.val_path"]})
    k: list[int] | None = field(default=None, metadata={"help": "neighbours (default: the run's knn.k, else "
                                                                "10 20 100 200)"})
    temperature: float | None = field(default=None, metadata={"help": "vote temperature (default: the run's, "
                                                                      "else 0.07)"})
    image_size: int | None = field(default=None, metadata={
        "help": "center-crop size, resized to size*256/224 first (default: the run's knn.image_size, else 224)"})
    mean: tuple[float, float, float] | None = field(default=None, metadata={
        "help": "normalisation mean (default: the run's data.mean, else ImageNet's)"})
    std: tuple[float, float, float] | None = field(default=None, metadata={
        "help": "normalisation std (default: the run's data.std, else ImageNet's)"})
    batch_size: int = field(default=128, metadata={"help": "feature-extraction batch per process"})
    num_workers: int = field(default=4, metadata={"help": "data loading workers per process"})
    max_train_samples: int = field(default=0, metadata={"help": "random subset of the bank (0: all)"})


# option -> (the run's config key(s), the default without a run); the first key the run sets wins
RUN_SETTINGS: dict[str, tuple[tuple[str, ...], Any]] = {
    "train_path": (("knn.train_path", "data.path"), ""),
    "val_path": (("knn.val_path",), ""),
    "k": (("knn.k",), [10, 20, 100, 200]),
    "temperature": (("knn.temperature",), 0.07),
    "image_size": (("knn.image_size",), 224),
    "mean": (("data.mean",), IMAGENET_MEAN),
    "std": (("data.std",), IMAGENET_STD),
}


def resolve_options(options: KnnOptions, weights: Weights) -> tuple[KnnOptions, dict[str, str]]:
    """The options as given, the unset ones as the run that made the weights had them (what its
    online kNN used), else the defaults; and where each came from."""
    resolved, origin = settings_from_run(options, weights, RUN_SETTINGS)
    for name in ("train_path", "val_path"):
        if not getattr(resolved, name):
            flag = "--data.path" if name == "train_path" else "--data.val_path"
            raise ValueError(f"knn needs {flag} (knn.{name}=...): the weights name no run whose config sets it")
    return resolved, origin


@register_protocol("knn", KnnOptions, help="weighted kNN (DINO eval_knn) on the pooled embedding",
                   weights=("pixels",))
def knn_protocol(weights: Weights, options: KnnOptions, ctx: EvalContext) -> dict[str, Any]:
    """Weighted kNN top-1 / top-5 for every k; ``--weights pixels`` scores raw pixels. Unset options
    (data paths, k, temperature, image size, normalisation) follow the run that made the weights,
    so ``--weights RUN`` repeats that run's online kNN."""
    options, origin = resolve_options(options, weights)
    setup = KnnSetup.open(options.train_path, options.val_path, options.k, options.temperature, options.image_size,
                          options.batch_size, options.num_workers, options.max_train_samples,
                          mean=options.mean, std=options.std, accelerator=ctx.accelerator)
    if weights.spec == "pixels":
        feature, fn = "raw pixels", pixel_features
    else:
        backbone = weights.backbone().to(ctx.device)
        feature = "pooled embedding (CLS for ViT, average pool otherwise), L2-normalised"

        def fn(x: torch.Tensor) -> torch.Tensor:
            return backbone(x).pooled
    results = setup.evaluate_features(fn)
    per_process = ctx.gather_counts(setup.embedded)
    protocol = {"description": f"{KNN_METHOD}: Resize(size*256/224, bicubic)+CenterCrop, cosine similarity, "
                               "votes exp(s/T)", "feature": feature, "k": list(options.k),
                "temperature": options.temperature, "image_size": options.image_size,
                "mean": list(options.mean), "std": list(options.std), "settings_from": origin,
                "n_train": len(setup.train_set), "n_test": len(setup.val_set),
                "train_path": options.train_path, "val_path": options.val_path, "units": "percent"}
    return {"metrics": flatten_results(results), "protocol": protocol,
            "results": {str(k): row for k, row in results.items()},
            "images_embedded_per_process": per_process}
