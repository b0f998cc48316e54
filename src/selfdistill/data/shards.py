"""Pack an image folder, a file list or a local HF dataset into webdataset tar shards, and check them.

Training from millions of small files is bound by file-system metadata; a few hundred tar files
read sequentially are not. The writer shuffles the sample order once (training reads shards in
order, so a class-sorted folder would otherwise yield single-class shards) and cuts the shuffled
list into shards up-front, so which sample lands in which shard is a pure function of the
arguments and the input listing.

The layout of the output directory is :mod:`selfdistill.data.shard_format` (what readers use);
``_progress.json`` also holds the plan and the shards completed so far while a run is unfinished.

``key`` is the sample's zero-padded position in the shuffled order. Tar headers carry a fixed
mtime, user and mode, so the same arguments give byte-identical shards.

Size planning: with ``max_shard_bytes`` every sample is prepared once (read, and re-encoded when it
will be) to measure its exact tar footprint before the cut; the plan is stored in
``_progress.json`` so a resumed run does not measure again. Without it the cut is by count only.

Crash safety: each shard is written to a ``.{name}.*.tmp`` file, fsynced and renamed, so a final shard name
always holds a complete shard. ``_progress.json`` (rewritten atomically after every shard) keeps
the records of an interrupted run; a shard file that exists but has no record (the run died
between the rename and the record) is complete by atomicity and is hashed and adopted. A recorded
shard whose file is missing or whose sha256 differs is written again.

Unreadable images are skipped with a warning and listed in their shard's ``"skipped"`` record, so
one corrupt file does not stop a day-long job; ``"samples"`` counts what was actually written.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import io
import json
import logging
import os
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from selfdistill.atomic import atomic_path, write_json_atomic
from selfdistill.data.folder import ImageFolderDataset
from selfdistill.data.hf import load_hf_split
from selfdistill.data.shard_format import (FORMAT, IMAGE_MEMBERS, INFO_NAME, PROGRESS_NAME, WIDS_INDEX_NAME, member_key,
                                           read_info)

__all__ = ["Sample", "ShardInput", "VerifyReport", "file_list_input", "folder_input", "hf_input", "verify_shards",
           "write_shards"]

logger = logging.getLogger(__name__)


#: Formats stored as they are (when neither resizing nor a quality asks for re-encoding).
PASS_THROUGH = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
DEFAULT_JPEG_QUALITY = 95
TAR_MTIME = 0  # fixed header fields make the shards reproducible byte for byte
TAR_USER = "selfdistill"
TAR_BLOCK = tarfile.BLOCKSIZE
TAR_RECORD = tarfile.RECORDSIZE


# --------------------------------------------------------------------------------------------
# Sources


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


# --------------------------------------------------------------------------------------------
# Preparing one sample


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    """How stored images are produced; ``None`` fields keep the original bytes where possible."""

    resize_shorter: int | None = None
    quality: int | None = None


def _read_raw(reader: ImageReader, sample: Sample) -> bytes:
    """The original encoded bytes of one sample."""
    if reader.kind == "files":
        with open(sample.source, "rb") as f:
            return f.read()
    cell = _hf_images(reader.location, reader.split, reader.image_column)[int(sample.source)][reader.image_column]
    if cell.get("bytes"):
        return cell["bytes"]
    with open(cell["path"], "rb") as f:
        return f.read()


def _target_size(size: tuple[int, int], shorter: int | None) -> tuple[int, int] | None:
    """Size with the shorter side equal to ``shorter``, or ``None`` when it is already that small."""
    w, h = size
    if shorter is None or min(w, h) <= shorter:
        return None
    if w <= h:
        return shorter, max(1, round(h * shorter / w))
    return max(1, round(w * shorter / h)), shorter


def _encode(img: Image.Image, target: tuple[int, int] | None, options: EncodeOptions) -> tuple[bytes, str]:
    """Resize (bicubic) and encode: JPEG when lossy output was asked for, else lossless PNG."""
    img = img.convert("RGB")
    if target is not None:
        img = img.resize(target, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    if target is not None or options.quality is not None:
        img.save(out, format="JPEG", quality=options.quality or DEFAULT_JPEG_QUALITY)
        return out.getvalue(), "jpg"
    img.save(out, format="PNG")
    return out.getvalue(), "png"


def prepare_image(raw: bytes, options: EncodeOptions) -> tuple[bytes, str]:
    """The bytes to store and their extension.

    JPEG/PNG/WEBP are kept as they are unless a resize happens or a quality is given; other
    formats (BMP, TIFF) become PNG without loss unless a quality asks for JPEG. Raises on
    undecodable data.
    """
    with Image.open(io.BytesIO(raw)) as img:
        target = _target_size(img.size, options.resize_shorter)
        if target is None and options.quality is None and img.format in PASS_THROUGH:
            img.verify()
            return raw, PASS_THROUGH[img.format]
        img.load()
        return _encode(img, target, options)


def _sample_members(key: str, sample: Sample, image: bytes, ext: str) -> dict[str, Any]:
    """The tar members of one sample, as TarWriter takes them."""
    members: dict[str, Any] = {"__key__": key, ext: image,
                               "json": json.dumps({"source": sample.source, "label": sample.label}).encode()}
    if sample.label >= 0:
        members["cls"] = str(sample.label).encode()
    return members


def _prepare_sample(reader: ImageReader, sample: Sample, key: str,
                    options: EncodeOptions) -> dict[str, Any] | None:
    """Tar members for one sample, or ``None`` (logged) when its image cannot be read."""
    try:
        image, ext = prepare_image(_read_raw(reader, sample), options)
    except Exception as err:  # noqa: BLE001 - PIL raises many types on bad data
        logger.warning("skipping unreadable image %s (%s: %s)", sample.source, type(err).__name__, err)
        return None
    return _sample_members(key, sample, image, ext)


def _padded(size: int, unit: int) -> int:
    return -(-size // unit) * unit


def _sample_tar_bytes(members: dict[str, Any]) -> int:
    """Bytes a sample adds to a tar: a header block per member plus its data padded to blocks."""
    return sum(TAR_BLOCK + _padded(len(v), TAR_BLOCK) for k, v in members.items() if not k.startswith("_"))


def _tar_file_bytes(samples_bytes: int) -> int:
    """Size of a tar file whose members take ``samples_bytes``: end marker, padded to a record."""
    return _padded(samples_bytes + 2 * TAR_BLOCK, TAR_RECORD)


# --------------------------------------------------------------------------------------------
# Planning


def _shuffled(n: int, seed: int | None) -> list[int]:
    """Positions ``0..n-1`` in the order they are written: shuffled once by ``seed`` (None: kept)."""
    order = list(range(n))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return order


def _key_width(n: int) -> int:
    return max(9, len(str(max(n - 1, 0))))


def _plan_by_count(n: int, per_shard: int) -> list[tuple[int, int]]:
    return [(start, min(start + per_shard, n)) for start in range(0, n, per_shard)]


def _plan_by_size(sizes: Sequence[int], per_shard: int | None, max_bytes: int) -> list[tuple[int, int]]:
    """Greedy cut: a shard closes when the next sample would push the file past ``max_bytes``
    (or the count limit is reached); every shard holds at least one sample."""
    plan, start, used = [], 0, 0
    for i, size in enumerate(sizes):
        full = per_shard is not None and i - start >= per_shard
        if i > start and (full or _tar_file_bytes(used + size) > max_bytes):
            plan.append((start, i))
            start, used = i, 0
        used += size
    if start < len(sizes):
        plan.append((start, len(sizes)))
    return plan


def _measure_chunk(reader: ImageReader, samples: Sequence[Sample], options: EncodeOptions) -> list[int]:
    """Tar footprint of each sample, as it will be written (0 for unreadable ones).

    The key only names the members (header size is fixed), so a placeholder serves.
    """
    sizes = []
    for sample in samples:
        members = _prepare_sample(reader, sample, "0", options)
        sizes.append(_sample_tar_bytes(members) if members is not None else 0)
    return sizes


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _measure(source: ShardInput, ordered: Sequence[Sample], options: EncodeOptions,
             workers: int, progress: bool) -> list[int]:
    """Sizes of all samples in write order, measured in parallel chunks."""
    chunks = _chunks(ordered, 256)
    sizes: list[int] = []
    with tqdm(total=len(ordered), desc="measuring", unit="img", disable=not progress) as bar:
        for chunk_sizes in _map(functools.partial(_measure_chunk, source.reader, options=options), chunks, workers):
            sizes.extend(chunk_sizes)
            bar.update(len(chunk_sizes))
    return sizes


def _map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> Iterator[Any]:
    """``map`` in order, in ``workers`` processes when more than one."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(items))) as pool:
        yield from pool.map(fn, items)


# --------------------------------------------------------------------------------------------
# Writing one shard


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to write one shard."""

    out_dir: str
    name: str
    start: int
    stop: int
    keys: tuple[str, ...]
    samples: tuple[Sample, ...]
    reader: ImageReader
    options: EncodeOptions


class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.f.write(data)


def _write_tar(path: str, task: ShardTask) -> tuple[dict[str, Any], list[str | int]]:
    """Write the shard's samples to ``path``; return size/hash/count and the skipped sources."""
    import webdataset as wds

    skipped: list[str | int] = []
    written = 0
    with open(path, "wb") as f:
        hashing = _HashingFile(f)
        with wds.TarWriter(hashing, user=TAR_USER, group=TAR_USER, mtime=TAR_MTIME, encoder=False,
                           compress=False) as writer:
            for key, sample in zip(task.keys, task.samples):
                members = _prepare_sample(task.reader, sample, key, task.options)
                if members is None:
                    skipped.append(sample.source)
                    continue
                writer.write(members)
                written += 1
    return {"samples": written, "bytes": hashing.bytes, "sha256": hashing.sha256.hexdigest()}, skipped


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Write one shard atomically (a ``.{name}.*.tmp`` file, fsynced, then renamed) and return its record."""
    with atomic_path(os.path.join(task.out_dir, task.name)) as tmp:
        stats, skipped = _write_tar(str(tmp), task)
    return {"name": task.name, **stats, "start": task.start, "stop": task.stop, "skipped": skipped}


# --------------------------------------------------------------------------------------------
# State files


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _file_sha256(path: str) -> tuple[str, int]:
    """Hex sha256 and size of a file, read in 1 MiB blocks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _listing_sha256(source: ShardInput) -> str:
    """Fingerprint of the input listing: a folder that gained or lost files is a different input."""
    digest = hashlib.sha256()
    for sample in source.samples:
        digest.update(f"{sample.source}\t{sample.label}\n".encode())
    return digest.hexdigest()


def _load_state(out_dir: str) -> dict[str, Any] | None:
    """The newest record of an earlier run: ``_progress.json`` (unfinished) before ``_info.json``."""
    progress = _read_json(os.path.join(out_dir, PROGRESS_NAME))
    if progress is not None:
        return progress
    info = _read_json(os.path.join(out_dir, INFO_NAME))
    if info is None:
        return None
    kept = {k: info.get(k) for k in ("format", "args", "listing_sha256", "class_names")}
    plan = [[s["start"], s["stop"]] for s in info["shards"]]
    return {**kept, "plan": plan, "done": {s["name"]: s for s in info["shards"]}}


def _check_same_run(state: dict[str, Any], args: dict[str, Any], listing: str, out_dir: str) -> None:
    """Refuse to mix shards written from different arguments or a different input listing."""
    old = state.get("args", {})
    changed = sorted(k for k in set(old) | set(args) if old.get(k) != args.get(k))
    if changed:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {args.get(k)!r}" for k in changed)
        raise ValueError(f"{out_dir} was written with different arguments ({detail}); "
                         "use a new --out directory or the original arguments")
    if state.get("listing_sha256") != listing:
        raise ValueError(f"{out_dir} was written from a different set of input images; "
                         "use a new --out directory")


def _stray_shards(out_dir: str, prefix: str) -> list[str]:
    return sorted(n for n in os.listdir(out_dir) if n.startswith(f"{prefix}-") and n.endswith(".tar"))


# --------------------------------------------------------------------------------------------
# The write driver


def _shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def _run_args(source: ShardInput, prefix: str, samples_per_shard: int | None, max_shard_bytes: int | None,
              options: EncodeOptions, shuffle_seed: int | None) -> dict[str, Any]:
    """The arguments that decide the output bytes (not ``workers``, not the output path)."""
    return {"input": source.describe, "prefix": prefix, "samples_per_shard": samples_per_shard,
            "max_shard_bytes": max_shard_bytes, "resize_shorter": options.resize_shorter,
            "quality": options.quality, "shuffle_seed": shuffle_seed}


def _validate_limits(samples_per_shard: int | None, max_shard_bytes: int | None,
                     options: EncodeOptions) -> None:
    if samples_per_shard is None and max_shard_bytes is None:
        raise ValueError("set samples_per_shard, max_shard_bytes or both")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    if options.resize_shorter is not None and options.resize_shorter < 1:
        raise ValueError(f"resize_shorter must be >= 1, got {options.resize_shorter}")
    if options.quality is not None and not 1 <= options.quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {options.quality}")


def _make_plan(source: ShardInput, ordered: Sequence[Sample], samples_per_shard: int | None,
               max_shard_bytes: int | None, options: EncodeOptions, workers: int,
               progress: bool) -> list[tuple[int, int]]:
    if max_shard_bytes is None:
        assert samples_per_shard is not None
        return _plan_by_count(len(ordered), samples_per_shard)
    sizes = _measure(source, ordered, options, workers, progress)
    return _plan_by_size(sizes, samples_per_shard, max_shard_bytes)


def _is_intact(out_dir: str, name: str, record: dict[str, Any] | None) -> bool:
    """A shard may be skipped if its file exists and, when recorded, still has its sha256."""
    path = os.path.join(out_dir, name)
    if not os.path.exists(path):
        return False
    return record is None or _file_sha256(path)[0] == record["sha256"]


def _adopt(task: ShardTask) -> dict[str, Any]:
    """Record a complete but unrecorded shard (the run died between rename and record)."""
    path = os.path.join(task.out_dir, task.name)
    sha, size = _file_sha256(path)
    keys = _tar_keys(path)
    skipped = [s.source for key, s in zip(task.keys, task.samples) if key not in keys]
    return {"name": task.name, "samples": len(keys), "bytes": size, "sha256": sha,
            "start": task.start, "stop": task.stop, "skipped": skipped}


def _tar_keys(path: str) -> set[str]:
    with tarfile.open(path) as tar:
        return {member_key(m.name) for m in tar.getmembers() if m.isfile()}


def _tasks(out_dir: str, prefix: str, plan: Sequence[Sequence[int]], ordered: Sequence[Sample],
           source: ShardInput, options: EncodeOptions) -> list[ShardTask]:
    width = _key_width(len(ordered))
    return [ShardTask(out_dir, _shard_name(prefix, i), start, stop,
                      tuple(f"{k:0{width}d}" for k in range(start, stop)), tuple(ordered[start:stop]),
                      source.reader, options)
            for i, (start, stop) in enumerate(plan)]


def _run_tasks(tasks: Sequence[ShardTask], workers: int, bar: Any) -> Iterator[dict[str, Any]]:
    """Write shards (one per task), yielding each record as it completes."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            record = write_shard(task)
            bar.update(task.stop - task.start)
            yield record
        return
    pool = concurrent.futures.ProcessPoolExecutor(min(workers, len(tasks)))
    try:
        futures = {pool.submit(write_shard, task): task for task in tasks}
        for future in concurrent.futures.as_completed(futures):
            task = futures[future]
            bar.update(task.stop - task.start)
            yield future.result()
    finally:
        # On an error or interrupt, queued shards are dropped instead of run to no purpose.
        pool.shutdown(wait=True, cancel_futures=True)


def _info(state: dict[str, Any], names: Sequence[str], split: str) -> dict[str, Any]:
    """The project's fields, plus timm's webdataset reader schema (``name``, ``splits``) so
    ``timm.data.create_dataset("wds/NAME", root=..., split=SPLIT)`` reads the directory."""
    shards = [state["done"][name] for name in names]
    total = sum(s["samples"] for s in shards)
    return {"format": FORMAT, "shards": shards, "total_samples": total,
            "class_names": state["class_names"], "args": state["args"],
            "listing_sha256": state["listing_sha256"],
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "name": split, "num_classes": len(state["class_names"] or []),
            "splits": {split: {"name": split, "num_samples": total, "filenames": [s["name"] for s in shards],
                               "shard_lengths": [s["samples"] for s in shards]}}}


def _wids_index(info: dict[str, Any], split: str) -> dict[str, Any]:
    """The shards as a ``wids`` index (URLs relative to the index, as wids resolves them)."""
    return {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": split,
            "shardlist": [{"url": s["name"], "nsamples": s["samples"], "filesize": s["bytes"]} for s in info["shards"]]}


def _start_state(out_dir: str, source: ShardInput, args: dict[str, Any], listing: str,
                 ordered: Sequence[Sample], limits: tuple[int | None, int | None], options: EncodeOptions,
                 workers: int, progress: bool) -> dict[str, Any]:
    """The earlier run's state when resuming (after checking it matches), else a fresh plan."""
    state = _load_state(out_dir)
    if state is not None:
        _check_same_run(state, args, listing, out_dir)
        return state
    stray = _stray_shards(out_dir, args["prefix"])
    if stray:
        raise ValueError(f"{out_dir} holds shards ({stray[0]} ...) but no {INFO_NAME} or {PROGRESS_NAME}; "
                         "use an empty --out directory")
    plan = _make_plan(source, ordered, *limits, options, workers, progress)
    return {"format": FORMAT, "args": args, "listing_sha256": listing,
            "class_names": list(source.class_names) if source.labelled else None,
            "plan": [list(p) for p in plan], "done": {}}


def _pending(out_dir: str, state: dict[str, Any], tasks: Sequence[ShardTask]) -> list[ShardTask]:
    """Tasks whose shard must be (re)written; unrecorded complete shards are adopted on the way."""
    todo = []
    for task in tasks:
        record = state["done"].get(task.name)
        if not _is_intact(out_dir, task.name, record):
            state["done"].pop(task.name, None)
            todo.append(task)
        elif record is None:
            state["done"][task.name] = _adopt(task)
    return todo


def _remove_tmp_files(out_dir: str, tasks: Iterable[ShardTask]) -> None:
    """Half-written shards of an interrupted run are useless; they are rewritten from scratch."""
    for task in tasks:
        for tmp in Path(out_dir).glob(f".{task.name}*.tmp"):
            tmp.unlink(missing_ok=True)


def write_shards(
    out_dir: str | os.PathLike,
    source: ShardInput,
    *,
    prefix: str = "shard",
    samples_per_shard: int | None = 1000,
    max_shard_bytes: int | None = None,
    resize_shorter: int | None = None,
    quality: int | None = None,
    shuffle_seed: int | None = 0,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Write (or finish writing) ``source`` as tar shards in ``out_dir``; return ``_info.json``'s content.

    ``shuffle_seed=None`` keeps the input order. A rerun with the same arguments skips intact
    shards and rewrites the rest; different arguments raise ``ValueError``.
    """
    options = EncodeOptions(resize_shorter, quality)
    _validate_limits(samples_per_shard, max_shard_bytes, options)
    out = _absolute(out_dir)
    os.makedirs(out, exist_ok=True)
    args = _run_args(source, prefix, samples_per_shard, max_shard_bytes, options, shuffle_seed)
    listing = _listing_sha256(source)
    ordered = [source.samples[i] for i in _shuffled(len(source.samples), shuffle_seed)]

    state = _start_state(out, source, args, listing, ordered, (samples_per_shard, max_shard_bytes), options,
                         workers, progress)
    progress_path = os.path.join(out, PROGRESS_NAME)
    write_json_atomic(progress_path, state, indent=1)
    for name in (INFO_NAME, WIDS_INDEX_NAME):  # incomplete again until every shard is checked
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, name))

    tasks = _tasks(out, prefix, state["plan"], ordered, source, options)
    _remove_tmp_files(out, tasks)
    todo = _pending(out, state, tasks)
    write_json_atomic(progress_path, state, indent=1)
    done_samples = len(ordered) - sum(t.stop - t.start for t in todo)
    with tqdm(total=len(ordered), initial=done_samples, desc="writing", unit="img", disable=not progress) as bar:
        for record in _run_tasks(todo, workers, bar):
            state["done"][record["name"]] = record
            write_json_atomic(progress_path, state, indent=1)

    split = os.path.basename(os.path.normpath(out))
    info = _info(state, [t.name for t in tasks], split)
    write_json_atomic(os.path.join(out, WIDS_INDEX_NAME), _wids_index(info, split), indent=1)
    write_json_atomic(os.path.join(out, INFO_NAME), info, indent=1)
    os.remove(progress_path)
    return info


# --------------------------------------------------------------------------------------------
# Reading back


@dataclasses.dataclass
class VerifyReport:
    """Outcome of :func:`verify_shards`: ``failures`` maps shard name to what is wrong with it."""

    n_shards: int
    n_samples: int
    failures: dict[str, list[str]]

    @property
    def ok(self) -> bool:
        return not self.failures


def _group_members(tar: tarfile.TarFile) -> dict[str, dict[str, bytes]]:
    """Members grouped webdataset-style: ``{key: {extension: data}}``."""
    samples: dict[str, dict[str, bytes]] = {}
    for member in tar:
        if not member.isfile():
            continue
        key = member_key(member.name)
        ext = member.name[len(key) + 1:]
        data = tar.extractfile(member)
        samples.setdefault(key, {})[ext] = data.read() if data is not None else b""
    return samples


def _check_image(members: dict[str, bytes]) -> str | None:
    image = next((members[e] for e in IMAGE_MEMBERS if e in members), None)
    if image is None:
        return f"no image member (has {sorted(members)})"
    try:
        with Image.open(io.BytesIO(image)) as img:
            img.verify()
    except Exception as err:  # noqa: BLE001 - PIL raises many types on bad data
        return f"image does not decode ({type(err).__name__}: {err})"
    return None


def _check_label(members: dict[str, bytes], class_names: Sequence[str] | None) -> str | None:
    if class_names is None:
        return "unexpected .cls in unlabelled shards" if "cls" in members else None
    if "cls" not in members:
        return "missing .cls"
    try:
        label = int(members["cls"])
    except ValueError:
        return f"label {members['cls'][:20]!r} is not an integer"
    if not 0 <= label < len(class_names):
        return f"label {label} outside 0..{len(class_names) - 1}"
    return None


def _check_samples(samples: dict[str, dict[str, bytes]], class_names: Sequence[str] | None) -> list[str]:
    problems = []
    for key, members in samples.items():
        for problem in (_check_image(members), _check_label(members, class_names)):
            if problem is not None:
                problems.append(f"sample {key}: {problem}")
    return problems


def _verify_one(directory: str, record: dict[str, Any], class_names: Sequence[str] | None) -> list[str]:
    """Problems with one shard (empty when it is fine)."""
    path = os.path.join(directory, record["name"])
    if not os.path.isfile(path):
        return ["missing"]
    problems = []
    sha, size = _file_sha256(path)
    if sha != record["sha256"]:
        problems.append(f"sha256 {sha[:12]}... != recorded {record['sha256'][:12]}... ({size} bytes)")
    try:
        with tarfile.open(path) as tar:
            samples = _group_members(tar)
    except (tarfile.TarError, OSError, EOFError) as err:
        return problems + [f"unreadable tar ({type(err).__name__}: {err})"]
    if len(samples) != record["samples"]:
        problems.append(f"{len(samples)} samples, recorded {record['samples']}")
    return problems + _check_samples(samples, class_names)


def _verify_task(task: tuple[str, dict[str, Any], Sequence[str] | None]) -> tuple[str, list[str], int]:
    directory, record, class_names = task
    return record["name"], _verify_one(directory, record, class_names), record["samples"]


def verify_shards(directory: str | os.PathLike, workers: int = 1, progress: bool = True) -> VerifyReport:
    """Re-read every shard of ``_info.json``: existence, sha256, count, decodable images, labels."""
    directory = os.fspath(directory)
    info = read_info(directory)
    tasks = [(directory, record, info["class_names"]) for record in info["shards"]]
    failures: dict[str, list[str]] = {}
    n_samples = 0
    with tqdm(total=len(tasks), desc="verifying", unit="shard", disable=not progress) as bar:
        for name, problems, count in _map(_verify_task, tasks, workers):
            n_samples += count
            if problems:
                failures[name] = problems
            bar.update(1)
    return VerifyReport(len(tasks), n_samples, failures)
