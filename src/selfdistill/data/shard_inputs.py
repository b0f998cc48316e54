"""The shard writer's inputs: an image folder, a file list or a local HF dataset, listed as samples
in input order with their class names, and :func:`read_raw`, which reads one sample's original bytes.

A listing is made once, in the parent process; the :class:`ImageReader` travels to the worker
processes (it pickles cheaply), which read the bytes. The folder is scanned by training's
:class:`~selfdistill.data.folder.ImageFolderDataset` and the HF directory loaded by
:func:`~selfdistill.data.hf.load_hf_split`, so a folder or HF dataset is accepted the same way
by the writer as by training.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfdistill.data.folder import ImageFolderDataset
from selfdistill.data.hf import load_hf_split

__all__ = ["ImageReader", "Sample", "ShardInput", "file_list_input", "folder_input", "hf_input", "read_raw"]


@dataclasses.dataclass(frozen=True)
class Sample:
    """One input image: a file path, or a row index of an HF dataset; label ``-1`` if unlabelled."""

    source: str | int
    label: int


@dataclasses.dataclass(frozen=True)
class ImageReader:
    """What a worker process needs to read a sample's bytes: small, so it pickles cheaply.

    ``kind`` is ``"files"`` (``Sample.source`` is a path) or ``"hf"`` (``Sample.source`` is a row
    of the saved dataset or imagefolder at ``location``).
    """

    kind: str = "files"
    location: str = ""
    split: str | None = None
    image_column: str = "image"


@dataclasses.dataclass(frozen=True)
class ShardInput:
    """The input listing: samples in input order, class names (``None``: unlabelled), a reader.

    ``describe`` goes into the stored arguments, so a resume from a different input is refused.
    """

    samples: tuple[Sample, ...]
    class_names: tuple[str, ...] | None
    describe: dict[str, Any]
    reader: ImageReader = ImageReader()

    @property
    def labelled(self) -> bool:
        return self.class_names is not None


def _absolute(path: str | os.PathLike) -> str:
    return os.path.abspath(os.fspath(path))


def folder_input(root: str | os.PathLike) -> ShardInput:
    """An image folder, scanned by :class:`ImageFolderDataset` (its layout rules and ``IMAGE_EXTENSIONS``)."""
    dataset = ImageFolderDataset(_absolute(root))
    samples = tuple(Sample(path, label) for path, label in dataset.samples)
    class_names = tuple(dataset.classes) if dataset.labelled else None
    return ShardInput(samples, class_names, {"kind": "folder", "path": str(dataset.root)})


def _parse_list_line(line: str, base: Path, where: str) -> Sample:
    """``path`` or ``path<TAB>label``; relative paths are relative to the list file's folder."""
    path, _, label = line.partition("\t")
    full = str(base / path) if not os.path.isabs(path) else path
    if not label.strip():
        return Sample(full, -1)
    try:
        value = int(label)
    except ValueError:
        raise ValueError(f"{where}: label {label.strip()!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"{where}: label {value} is negative")
    return Sample(full, value)


def _read_file_list(list_path: Path) -> list[Sample]:
    """Parse the list, skipping blank lines and ``#`` comments."""
    samples = []
    for number, raw in enumerate(list_path.read_text().splitlines(), start=1):
        line = raw.rstrip("\r\n")
        if line.strip() and not line.lstrip().startswith("#"):
            samples.append(_parse_list_line(line, list_path.parent, f"{list_path}:{number}"))
    return samples


def _check_files_exist(samples: Sequence[Sample], origin: str) -> None:
    """Fail before any work when a listed file is missing; name a few of them."""
    missing = [s.source for s in samples if not os.path.isfile(s.source)]
    if missing:
        shown = ", ".join(map(str, missing[:3])) + (" ..." if len(missing) > 3 else "")
        raise FileNotFoundError(f"{len(missing)} files listed in {origin} do not exist: {shown}")


def _list_class_names(labels: Sequence[int], class_names: Sequence[str] | None, origin: str) -> tuple[str, ...]:
    """Given names must cover every label; without names, labels are named by their number."""
    top = max(labels)
    if class_names is None:
        return tuple(str(i) for i in range(top + 1))
    if top >= len(class_names):
        raise ValueError(f"{origin} has label {top} but only {len(class_names)} class names were given")
    return tuple(class_names)


def file_list_input(list_path: str | os.PathLike, class_names: Sequence[str] | None = None) -> ShardInput:
    """A text file of ``path`` or ``path<TAB>label`` lines: all lines labelled, or none.

    Labelled lists without ``class_names`` get names ``"0".."max"``, so ``class_names`` in
    ``_info.json`` is ``None`` exactly when the shards are unlabelled.
    """
    path = Path(_absolute(list_path))
    if not path.is_file():
        raise FileNotFoundError(f"file list {str(path)!r} does not exist")
    samples = _read_file_list(path)
    if not samples:
        raise ValueError(f"file list {str(path)!r} lists no images")
    n_labelled = sum(s.label >= 0 for s in samples)
    if 0 < n_labelled < len(samples):
        raise ValueError(f"file list {str(path)!r}: {n_labelled} of {len(samples)} lines have a label; "
                         "label all lines or none")
    _check_files_exist(samples, str(path))
    if n_labelled:
        names: tuple[str, ...] | None = _list_class_names([s.label for s in samples], class_names, str(path))
    elif class_names is not None:
        raise ValueError(f"class names were given but file list {str(path)!r} has no labels")
    else:
        names = None
    return ShardInput(tuple(samples), names,
                       {"kind": "file_list", "path": str(path),
                        "class_names": list(class_names) if class_names is not None else None})


@functools.lru_cache(maxsize=2)
def _hf_images(path: str, split: str | None, image_column: str) -> Any:
    """The image column only, undecoded (``{"bytes", "path"}``), cached per process for workers."""
    import datasets

    return load_hf_split(path, split).select_columns([image_column]).cast_column(
        image_column, datasets.Image(decode=False))


def _hf_labels(dataset: Any, label_column: str) -> tuple[list[int], tuple[str, ...]]:
    """Labels and class names: from a ClassLabel feature, else numbered ``"0".."max"``."""
    import datasets

    labels = [int(v) for v in dataset[label_column]]
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return labels, tuple(feature.names)
    if min(labels) < 0:
        raise ValueError(f"HF label column {label_column!r} holds negative labels")
    return labels, tuple(str(i) for i in range(max(labels) + 1))


def hf_input(path: str | os.PathLike, image_column: str = "image", label_column: str = "label",
              split: str = "train") -> ShardInput:
    """A local HF ``datasets`` directory (saved with ``save_to_disk``, or an imagefolder tree).

    A missing label column means unlabelled; a missing or non-image image column is an error.
    """
    location = _absolute(path)
    dataset = load_hf_split(location, split)
    if image_column not in dataset.column_names:
        raise ValueError(f"HF dataset {location!r} has no image column {image_column!r} "
                         f"(columns: {', '.join(dataset.column_names)}; use --image-column)")
    if len(dataset) == 0:
        raise ValueError(f"HF dataset {location!r} is empty")
    try:
        _hf_images(location, split, image_column)
    except Exception as err:  # noqa: BLE001 - datasets raises several types for a failed cast
        raise ValueError(f"HF column {image_column!r} of {location!r} is not an image column ({err})") from None
    if label_column in dataset.column_names:
        labels, names = _hf_labels(dataset, label_column)
        class_names: tuple[str, ...] | None = names
    else:
        labels, class_names = [-1] * len(dataset), None
    samples = tuple(Sample(i, label) for i, label in enumerate(labels))
    return ShardInput(samples, class_names,
                       {"kind": "hf", "path": location, "split": split, "image_column": image_column,
                        "label_column": label_column if class_names is not None else None},
                       ImageReader("hf", location, split, image_column))


def read_raw(reader: ImageReader, sample: Sample) -> bytes:
    """The original encoded bytes of one sample."""
    if reader.kind == "files":
        with open(sample.source, "rb") as f:
            return f.read()
    cell = _hf_images(reader.location, reader.split, reader.image_column)[int(sample.source)][reader.image_column]
    if cell.get("bytes"):
        return cell["bytes"]
    with open(cell["path"], "rb") as f:
        return f.read()
