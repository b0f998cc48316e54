"""The one door to image data: a source config every recipe embeds, one rule that tells a path's
format, and :func:`open_images`, which opens a folder, an HF ``datasets`` directory or webdataset
shards for training (multi-crop batches, resampled shards) or evaluation (every image once over
all ranks).

    images = open_images(config.data, transform)                 # a recipe's data section
    images = open_images("/data/val", transform, labelled=True)  # a bare path, format detected
    source = images.train_source(batch_size, rank, world, collate_fn)
    loader = images.eval_loader(batch_size, rank, world)

Nothing outside ``data/`` decides formats.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from selfdistill.configkit import fail, fraction, non_negative, one_of
from selfdistill.data.collate import collate_eval
from selfdistill.data.folder import ImageFolderDataset
from selfdistill.data.hf import HFImageDataset, is_hf_directory
from selfdistill.data.multicrop import augment_on_device
from selfdistill.data.sampler import ShardedEvalSampler
from selfdistill.data.shard_format import has_info
from selfdistill.data.sources import MapSource, ShardSource, ShardStream, expand_urls, loader_worker_init, shard_info

__all__ = ["FORMATS", "ImageSet", "SourceConfig", "detect_format", "finish_on_device", "local_root", "open_images"]

FORMATS = ("auto", "folder", "hf", "wds")
STREAM_PREFIXES = ("pipe:", "s3://", "http://", "https://", "gs://")


@dataclass
class SourceConfig:
    """Where images come from; embedded (as a base class) by every section that reads images."""

    path: str = ""  # folder | HF dataset directory | shard dir, brace pattern(s) joined by '::', pipe:, http(s), s3://
    format: str = "auto"  # auto (detect_format) | folder | hf | wds
    num_workers: int = 8
    max_bad_fraction: float = 0.01  # fail when more than this fraction of images cannot be read (distinct files)
    bad_check_after: int = 1000  # images met over all ranks before that fraction is checked (always at the end)
    decode_size: int = 0  # >0: decode JPEGs at a reduced DCT scale whose sides stay >= this (faster); 0: full size
    samples_per_epoch: int = 0  # wds: samples in an epoch over all ranks (0: the shards' _info.json total)
    shuffle_buffer: int = 1000  # wds: samples shuffled in memory per loader worker
    shard_retries: int = 2  # wds: re-opening attempts for an unreadable shard before it is skipped
    max_missing_shards: float = 0.1  # wds: fail when more than this fraction of shards cannot be read
    hf_split: str = "train"
    hf_image_column: str = "image"
    hf_label_column: str = "label"  # optional: no such column means unlabelled

    def validate(self, prefix: str) -> None:
        one_of(self, prefix, "format", FORMATS)
        non_negative(self, prefix, "num_workers", "decode_size", "samples_per_epoch", "shuffle_buffer",
                     "shard_retries", "bad_check_after")
        fraction(self, prefix, "max_missing_shards", "max_bad_fraction")
        if self.path and self.format != "auto":  # at load time: refused before a run directory exists
            _checked_format(_split_suffix(self.path, self.hf_split)[0], self.format, f"{prefix}.path")


def detect_format(path: str) -> str:
    """The format of ``path``, by one rule used by training, evaluation and the shard writer:
    a stream or ``.tar`` pattern, or a directory with ``_info.json`` or only ``.tar`` files: ``wds``;
    a ``save_to_disk`` directory or one with parquet / arrow files: ``hf``; any other directory:
    ``folder``."""
    if path.startswith(STREAM_PREFIXES) or ".tar" in path or "::" in path:
        return "wds"
    root = Path(path)
    if root.is_dir():
        if has_info(root):
            return "wds"
        if is_hf_directory(root):
            return "hf"
        if any(root.glob("*.tar")) and not any(p.is_dir() for p in root.iterdir()):
            return "wds"
    return "folder"


def _checked_format(path: str, given: str, role: str) -> str:
    """``given`` unless it is ``auto`` (then the detected format); an explicit format that contradicts
    what the path surely is (a URL, a pattern, a shard or HF directory) is refused in one line, since
    reading a URL as a folder mangles it and reading shards as a folder finds no images."""
    detected = detect_format(path)
    if given == "auto":
        return detected
    if detected != "folder" and given != detected:  # "folder" is the fallback: an explicit format may know better
        key = role.rpartition(".")[0] + ".format" if "." in role else "format"
        fail(key, f"{given!r} but {role} {path!r} is {detected!r} by detection; leave {key} at 'auto' "
                  f"(the default) or set it to {detected!r}")
    return given


def _split_suffix(path: str, split: str) -> tuple[str, str]:
    """``DIR@SPLIT`` names a split of an HF dataset (when no file of that name exists)."""
    if "@" in path and not os.path.exists(path):
        path, _, split = path.rpartition("@")
    return path, split


def local_root(path: str) -> Path | None:
    """The file or directory ``path`` must name on this machine, or None where it names none (a URL or
    ``pipe:`` stream, a brace or glob pattern, ``::``-joined patterns); ``DIR@SPLIT`` names ``DIR``."""
    if not path or "://" in path or path.startswith(STREAM_PREFIXES) or "::" in path \
            or any(c in path for c in "{}*?["):
        return None
    return Path(_split_suffix(path, "")[0])


@dataclass
class ImageSet:
    """Images opened by :func:`open_images`: a map-style dataset (folder, HF) or shard URLs."""

    source: SourceConfig  # with a concrete format and split
    transform: Callable[[Any], Any] | None
    seed: int
    dataset: Dataset | None  # folder / hf
    urls: list[str]  # wds
    classes: list[str]
    n_samples: int  # 0 when unknown (bare shard URLs)
    labelled: bool

    def __len__(self) -> int:
        return self.n_samples

    @property
    def targets(self) -> list[int]:
        return list(getattr(self.dataset, "targets", []))

    def subset(self, n: int, seed: int) -> ImageSet:
        """A fixed random subset of ``n`` images (map-style only)."""
        if self.dataset is None:
            raise ValueError(f"{self.source.path}: a random subset needs a folder or HF dataset (shards are read whole)")
        if n >= self.n_samples:
            return self
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(self.n_samples, generator=g)[:n].sort().values
        return dataclasses.replace(self, dataset=Subset(self.dataset, idx.tolist()), n_samples=n)

    def finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A training batch where it trains: the device half of the augmentation when the
        transform cut its crops for it (``data.augment_on: device``), else the batch as it is."""
        return finish_on_device(self.transform, batch)

    def train_source(self, batch_size: int, rank: int, world_size: int, collate_fn: Callable,
                     repeat_batches: int = 0, pin_memory: bool = False) -> MapSource | ShardSource:
        """Training batches for one rank: an epoch-seeded permutation (map-style, exact resume) or
        shards drawn with replacement; the same number of batches on every rank."""
        s = self.source
        if self.dataset is None:
            if repeat_batches:
                raise ValueError("train.overfit_batches needs a map-style source (data.format folder or hf)")
            return ShardSource(s.path, self.transform, batch_size, rank, world_size, self.seed, s.num_workers,
                               collate_fn, s.samples_per_epoch, s.shuffle_buffer, s.shard_retries,
                               s.max_missing_shards, pin_memory, s.decode_size)
        return MapSource(self.dataset, batch_size, rank, world_size, self.seed, s.num_workers, collate_fn,
                         repeat_batches, pin_memory)

    def eval_loader(self, batch_size: int, rank: int = 0, world_size: int = 1, collate_fn: Callable = collate_eval,
                    num_workers: int | None = None) -> DataLoader:
        """Every image exactly once over all ranks (no padding), in a stable order."""
        workers = self.source.num_workers if num_workers is None else num_workers
        if self.dataset is None:
            stream = ShardStream(self.urls, self.transform, rank, world_size, seed=0, resampled=False,
                                 draft_size=self.source.decode_size)
            return DataLoader(stream, batch_size=batch_size, collate_fn=collate_fn, worker_init_fn=loader_worker_init,
                              num_workers=min(workers, len(self.urls[rank::world_size])))
        return DataLoader(self.dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_fn,
                          sampler=ShardedEvalSampler(len(self.dataset), rank, world_size),
                          worker_init_fn=loader_worker_init,
                          generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone

    def check_loader(self, rank: int = 0, world_size: int = 1, batch_size: int = 64) -> DataLoader:
        """This rank's share of the images, each decoded once without augmentation, in batches of
        ``{"bad", "draws", "bad_draws"}`` (the images themselves dropped): the unreadable files of a
        folder or HF dataset before a long run meets them (shards: ``selfdistill-shards verify``)."""
        if self.dataset is None:
            raise ValueError(f"{self.source.path}: checking every image first reads folder and HF data; check "
                             "shards with `selfdistill-shards verify --dir DIR`")
        plain = copy.copy(self.dataset)
        plain.transform = None
        return DataLoader(plain, batch_size=batch_size, num_workers=self.source.num_workers, collate_fn=_draws_only,
                          sampler=ShardedEvalSampler(len(plain), rank, world_size), worker_init_fn=loader_worker_init)


def finish_on_device(transform: Any, batch: dict[str, Any]) -> dict[str, Any]:
    return transform.finish(batch) if getattr(transform, "on_device", False) else batch


def _draws_only(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {"bad": [path for s in samples for path in s["bad"]], "draws": len(samples),
            "bad_draws": sum(s["bad_draws"] for s in samples)}


def open_images(source: SourceConfig | str, transform: Callable[[Any], Any] | None = None, *,
                labelled: bool = False, seed: int = 0, role: str = "data.path", cpu: bool = False) -> ImageSet:
    """Open ``source`` (a recipe's source section, or a bare path with default options).

    ``labelled=True`` refuses images without labels (no class sub-folders, no label column,
    shards without class names), naming ``role`` (the option the path came from). Where the
    augmentation runs is decided here: a source with ``augment_on`` (a recipe's data section) splits
    a transform that has a device half (``on_device``) into what the loader workers do and what
    :meth:`ImageSet.finish` does on the training device (``cpu``: the run is forced onto the CPU).
    """
    s = SourceConfig(path=source) if isinstance(source, str) else source
    if hasattr(transform, "on_device") and hasattr(s, "augment_on"):
        transform.on_device = augment_on_device(s.augment_on, cpu)
    path, split = _split_suffix(s.path, s.hf_split)
    if not path:
        fail(role, "no images given (an image folder, HF dataset directory or shard directory / pattern)")
    fmt = _checked_format(path, s.format, role)
    s = dataclasses.replace(s, path=path, format=fmt, hf_split=split)
    if fmt == "wds":
        info = shard_info(path) or {}
        classes = list(info.get("class_names") or [])
        images = ImageSet(s, transform, seed, None, expand_urls(path), classes, int(info.get("total_samples", 0)),
                          bool(classes))
        what = "shards have no class names (an _info.json written from labelled images)"
    else:
        if fmt == "hf":
            dataset: Any = HFImageDataset(path, transform, seed, split, s.hf_image_column, s.hf_label_column,
                                          s.decode_size)
            what = f"HF dataset has no label column {s.hf_label_column!r}"
        else:
            dataset = ImageFolderDataset(path, transform=transform, seed=seed, draft_size=s.decode_size)
            what = "folder has no class sub-folders"
        images = ImageSet(s, transform, seed, dataset, [], list(dataset.classes or []), len(dataset),
                          dataset.labelled)
    if labelled and not images.labelled:
        raise ValueError(f"{role}: {path}: {what}; labelled images are needed here")
    return images
