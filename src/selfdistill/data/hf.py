"""HF ``datasets`` directories on local disk: what counts as one, how a split is loaded, and a
map-style dataset over it read like :class:`~selfdistill.data.folder.ImageFolderDataset`.

Training, evaluation and the shard writer all load through :func:`load_hf_split`, so a directory
is accepted or refused the same way everywhere.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from selfdistill.data.folder import decode_rgb, sample_seed, seeded_rng

log = logging.getLogger(__name__)

__all__ = ["HFImageDataset", "is_hf_directory", "load_hf_split"]

SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")  # save_to_disk output


def _data_files(root: Path, suffix: str) -> bool:
    """Files of a ``datasets`` builder (parquet, arrow) in the directory or one level below."""
    return any(root.glob(f"*{suffix}")) or any(root.glob(f"*/*{suffix}"))


def is_hf_directory(path: str | Path) -> bool:
    """A ``save_to_disk`` directory, or one holding parquet / arrow files (at most one level down)."""
    root = Path(path)
    if not root.is_dir():
        return False
    return any((root / m).is_file() for m in SAVED_MARKERS) or _data_files(root, ".parquet") \
        or _data_files(root, ".arrow")


def _require_datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("HF datasets directories need the `datasets` package: pip install 'selfdistill[hf]'") from e
    return datasets


def load_hf_split(path: str | Path, split: str | None = "train") -> Any:
    """One split of a local HF dataset: ``load_from_disk`` for a saved dataset, the ``parquet`` or
    ``arrow`` builder for those files, else the ``imagefolder`` builder (class sub-folders)."""
    datasets = _require_datasets()
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"HF dataset directory {str(root)!r} does not exist")
    if any((root / m).is_file() for m in SAVED_MARKERS):
        loaded = datasets.load_from_disk(str(root))
    else:
        builder = "parquet" if _data_files(root, ".parquet") else "arrow" if _data_files(root, ".arrow") \
            else "imagefolder"
        loaded = datasets.load_dataset(builder, data_dir=str(root))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"HF dataset {str(root)!r} has splits {sorted(loaded)}, not {split!r}")
        loaded = loaded[split]
    return loaded


class HFImageDataset(Dataset):
    """An HF ``datasets`` directory read like :class:`ImageFolderDataset`: same sample dicts, same
    per-(epoch, index) seeded augmentation, unreadable images replaced by the next one."""

    def __init__(self, path: str, transform: Callable[[Image.Image], Any] | None = None, seed: int = 0,
                 split: str = "train", image_column: str = "image", label_column: str = "label",
                 draft_size: int = 0) -> None:
        datasets = _require_datasets()
        self.data = load_hf_split(path, split)
        if image_column not in self.data.column_names:
            raise ValueError(f"{path} has no image column {image_column!r} (columns: {self.data.column_names})")
        self.image_column, self.transform, self.seed, self.draft_size = image_column, transform, seed, draft_size
        self.label_column = label_column if label_column in self.data.column_names else None
        feature = self.data.features.get(self.label_column) if self.label_column else None
        self.classes: list[str] = list(getattr(feature, "names", None) or [])
        self.labelled = self.label_column is not None
        # Decode ourselves, so a corrupt image is one bad sample instead of an exception in datasets.
        self.data = self.data.cast_column(image_column, datasets.Image(decode=False))
        if len(self.data) == 0:
            raise ValueError(f"HF dataset {path} is empty")

    def __len__(self) -> int:
        return len(self.data)

    @property
    def targets(self) -> list[int]:
        if not self.label_column:
            return [-1] * len(self)
        return [int(x) for x in self.data[self.label_column]]

    def _read(self, index: int, seed: int = 0) -> tuple[Image.Image, int]:
        """One Arrow row read: the decoded image and its label."""
        row = self.data[index]
        value = row[self.image_column]
        img = decode_rgb(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"], self.draft_size,
                         getattr(self.transform, "plan", None), seed)
        return img, int(row[self.label_column]) if self.label_column else -1

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        seed = sample_seed(self.seed, epoch, index)
        bad: list[str] = []
        for offset in range(len(self)):
            current = (index + offset) % len(self)
            try:
                img, label = self._read(current, seed)
                break
            except Exception as err:  # noqa: BLE001 - PIL raises many types on bad data
                log.warning("skipping unreadable image %s[%d] (%s)", self.image_column, current, err)
                bad.append(f"hf:{current}")
        else:
            raise RuntimeError("no image of the HF dataset could be read")
        if self.transform is not None:
            with seeded_rng(seed):
                img = self.transform(img)
        return {"image": img, "label": label, "index": current, "bad": bad, "draws": 1, "bad_draws": int(current != index)}
