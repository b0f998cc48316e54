"""Pack an image folder, a file list or a local HF dataset into webdataset tar shards, and check them.

Training from millions of small files is bound by file-system metadata; a few hundred tar files
read sequentially are not. The writer shuffles the sample order once (training reads shards in
order, so a class-sorted folder would otherwise yield single-class shards) and cuts the shuffled
list into shards by a rule, so which sample lands in which shard is a pure function of the
arguments and the input listing.

The layout of the output directory is :mod:`selfdistill.data.shard_format` (what readers use);
``_progress.json`` also holds the plan and the shards completed so far while a run is unfinished.

``key`` is the sample's zero-padded position in the shuffled order. Tar headers carry a fixed
mtime, user and mode, so the same arguments give byte-identical shards.

Size planning: with ``max_shard_bytes`` the cut is made while writing, in order: a shard closes
when the next prepared sample would push it past the limit, so each image is read and encoded once.
Such a plan is known only as far as it was written; a count plan is known up-front, which is what
lets ``num_nodes`` writers each take a contiguous block of shards (:func:`node_shards`) and
:func:`finalize_shards` join them into the same directory a single writer makes.

Work is spread over ``workers`` processes that read and encode a few samples per task, a bounded
window ahead; the parent writes the tar files in order, so the output does not depend on
``workers``. Workers end themselves when the parent is gone (``kill -9`` included).

Crash safety: each shard is written to a ``.{name}.*.tmp`` file, fsynced and renamed, so a final shard name
always holds a complete shard. ``_progress.json`` (rewritten atomically after every shard) keeps
the records of an interrupted run; a resume trusts a recorded shard whose file has the recorded
size (``rehash=True`` also compares sha256), adopts a complete unrecorded one (the run died between
the rename and the record), and writes the others again.

Object storage: with an ``s3://`` output, shards are written in a local staging directory and each
finished one is uploaded (and optionally deleted locally); uploads are recorded so a resume skips
them, and ``_info.json`` is uploaded last, so a reader never sees a half-written data set.

Every image is decoded whole (:func:`decode_all`): unreadable ones are skipped with a warning naming
the file and listed in their shard's ``"skipped"`` record, so one corrupt file does not stop a
day-long job; ``"samples"`` counts what was actually written. More than ``max_bad_fraction`` of
them unreadable, or none readable, refuses the input and removes what was written.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import io
import itertools
import json
import logging
import os
import random
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from selfdistill.atomic import atomic_path, write_json_atomic
from selfdistill.data import object_store
from selfdistill.data.folder import BadDataError, ImageFolderDataset
from selfdistill.data.hf import load_hf_split
from selfdistill.data.shard_format import (FORMAT, IMAGE_MEMBERS, INFO_NAME, PROGRESS_NAME, WIDS_INDEX_NAME, member_key,
                                           read_info)

__all__ = ["DEFAULT_MAX_BAD_FRACTION", "Sample", "ShardInput", "VerifyReport", "decode_all", "default_workers",
           "file_list_input", "finalize_shards", "folder_input", "hf_input", "verify_shards", "write_shards"]

logger = logging.getLogger(__name__)


#: Formats stored as they are (when neither resizing nor a quality asks for re-encoding).
PASS_THROUGH = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
DEFAULT_JPEG_QUALITY = 95
TAR_MTIME = 0  # fixed header fields make the shards reproducible byte for byte
TAR_USER = "selfdistill"
TAR_MODE = 0o444
TAR_BLOCK = tarfile.BLOCKSIZE
TAR_RECORD = tarfile.RECORDSIZE
#: Unreadable images tolerated before a write is refused, as in training (``data.max_bad_fraction``).
DEFAULT_MAX_BAD_FRACTION = 0.01


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
    #: ``decode``: every image decoded whole; ``headers``: PIL's header check only for the images stored
    #: as they are (a truncated JPEG passes), for input that was verified before and must go fast.
    check: str = "decode"


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


def decode_all(img: Image.Image) -> None:
    """Decode all of an image's data, raising on a truncated or corrupt file.

    ``Image.verify()`` checks a JPEG's headers only, so a file cut short passes it; ``load()`` runs
    the decoder over every byte. A JPEG is decoded at 1/8 scale (``draft``): the entropy-coded data,
    where damage shows, is still read to its end, only the inverse DCT is smaller (about 2x faster).
    """
    if img.format == "JPEG":
        img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
    img.load()


def prepare_image(raw: bytes, options: EncodeOptions) -> tuple[bytes, str]:
    """The bytes to store and their extension.

    JPEG/PNG/WEBP are kept as they are unless a resize happens or a quality is given; other
    formats (BMP, TIFF) become PNG without loss unless a quality asks for JPEG. Every image is
    decoded whole, so undecodable data raises here instead of in training.
    """
    with Image.open(io.BytesIO(raw)) as img:
        target = _target_size(img.size, options.resize_shorter)
        if target is None and options.quality is None and img.format in PASS_THROUGH:
            if options.check == "headers":
                img.verify()
            else:
                decode_all(img)
            return raw, PASS_THROUGH[img.format]
        img.load()
        return _encode(img, target, options)


def unreadable_reason(err: BaseException) -> str:
    """Why an image could not be read, without PIL's ``<_io.BytesIO object at 0x...>``."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image format PIL can read"
    return f"{type(err).__name__}: {err}"


def _sample_members(key: str, sample: Sample, image: bytes, ext: str) -> dict[str, Any]:
    """The tar members of one sample, as TarWriter takes them."""
    members: dict[str, Any] = {"__key__": key, ext: image,
                               "json": json.dumps({"source": sample.source, "label": sample.label}).encode()}
    if sample.label >= 0:
        members["cls"] = str(sample.label).encode()
    return members


Prepared = tuple[dict[str, Any] | None, str | None]  # (tar members, None) or (None, why it is unreadable)


def _prepare_sample(reader: ImageReader, sample: Sample, key: str, options: EncodeOptions) -> Prepared:
    try:
        image, ext = prepare_image(_read_raw(reader, sample), options)
    except Exception as err:  # noqa: BLE001 - PIL raises many types on bad data
        return None, unreadable_reason(err)
    return _sample_members(key, sample, image, ext), None


def _prepare_chunk(reader: ImageReader, options: EncodeOptions,
                   items: Sequence[tuple[str, Sample]]) -> list[Prepared]:
    """A worker's unit of work: a few consecutive samples (one task per image would cost more in
    inter-process messages than reading a JPEG)."""
    return [_prepare_sample(reader, sample, key, options) for key, sample in items]


def _padded(size: int, unit: int) -> int:
    return -(-size // unit) * unit


def _sample_tar_bytes(members: dict[str, Any]) -> int:
    """Bytes a sample adds to a tar: a header block per member plus its data padded to blocks."""
    return sum(TAR_BLOCK + _padded(len(v), TAR_BLOCK) for k, v in members.items() if not k.startswith("_"))


def _tar_file_bytes(samples_bytes: int) -> int:
    """Size of a tar file whose members take ``samples_bytes``: end marker, padded to a record."""
    return _padded(samples_bytes + 2 * TAR_BLOCK, TAR_RECORD)


# --------------------------------------------------------------------------------------------
# Workers


def default_workers() -> int:
    """The cores this process may run on (a SLURM or container CPU limit, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _exit_with_parent(parent: int) -> None:
    """Pool initializer: end this worker when the writer is gone. A ``kill -9`` of the writer runs
    no clean-up, and orphaned workers would go on reading and encoding for nothing."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


CHUNK = 16  # samples per worker task
AHEAD = 4  # tasks in flight per worker: enough to keep workers busy, bounded memory


class _PreparedStream:
    """Prepared samples in order; ``close`` ends the pool (on an error or interrupt, queued chunks
    are dropped instead of run to no purpose), also when the stream was never read."""

    def __init__(self, items: Iterator[Prepared], pool: concurrent.futures.ProcessPoolExecutor | None = None) -> None:
        self._items, self._pool = items, pool

    def __iter__(self) -> _PreparedStream:
        return self

    def __next__(self) -> Prepared:
        return next(self._items)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _prepared_stream(reader: ImageReader, options: EncodeOptions, items: Iterable[tuple[str, Sample]],
                     workers: int) -> _PreparedStream:
    """Every item prepared, in order; with ``workers > 1`` in a process pool, a bounded window ahead.
    The pool's workers are forked here, before the writer starts any upload thread."""
    chunks = _batched(items, CHUNK)
    if workers <= 1:
        return _PreparedStream(p for chunk in chunks for p in _prepare_chunk(reader, options, chunk))
    pool = concurrent.futures.ProcessPoolExecutor(workers, initializer=_exit_with_parent, initargs=(os.getpid(),))
    try:
        window = collections.deque(pool.submit(_prepare_chunk, reader, options, chunk)
                                   for chunk in itertools.islice(chunks, AHEAD * workers))
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    return _PreparedStream(_pooled(pool, window, reader, options, chunks), pool)


def _pooled(pool: concurrent.futures.ProcessPoolExecutor, window: collections.deque, reader: ImageReader,
            options: EncodeOptions, chunks: Iterator[list[tuple[str, Sample]]]) -> Iterator[Prepared]:
    for chunk in chunks:
        yield from window.popleft().result()
        window.append(pool.submit(_prepare_chunk, reader, options, chunk))
    while window:
        yield from window.popleft().result()


def _map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> Iterator[Any]:
    """``map`` in order, in ``workers`` processes when more than one."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(items)), initializer=_exit_with_parent,
                                                initargs=(os.getpid(),)) as pool:
        yield from pool.map(fn, items)


class _Progress:
    """Items done and items/s: a tqdm bar on a terminal, else a plain line every ``interval`` s
    (a redirected log, e.g. SLURM's, gets no carriage returns)."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str, unit: str = "images",
                 interval: float = 30.0) -> None:
        self.total, self.done, self.desc, self.unit, self.interval = total, initial, desc, unit, interval
        self.start = self.last = time.monotonic()
        self.initial = initial
        self.bar = None
        self.lines = enabled and not sys.stderr.isatty()
        if enabled and not self.lines:
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and time.monotonic() - self.last >= self.interval:
            self.last = time.monotonic()
            self._line()

    def _line(self) -> None:
        rate = (self.done - self.initial) / max(time.monotonic() - self.start, 1e-9)
        print(f"{self.desc}: {self.done}/{self.total} {self.unit}, {rate:.0f} {self.unit}/s", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.lines:
            self._line()


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


def node_shards(n_shards: int, num_nodes: int, node_rank: int) -> range:
    """The shard indices node ``node_rank`` of ``num_nodes`` writes: a contiguous block, sizes within one."""
    return range(node_rank * n_shards // num_nodes, (node_rank + 1) * n_shards // num_nodes)


# --------------------------------------------------------------------------------------------
# Writing shards


_USTAR_TAIL = (b"ustar\x0000" + TAR_USER.encode().ljust(32, b"\0") + TAR_USER.encode().ljust(32, b"\0")
               + b"\0" * 183)  # devmajor, devminor (empty for a regular file), prefix, padding


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte header tarfile writes for a regular file (PAX format, which is plain ustar for
    short ASCII names), with the fixed mode, owner and mtime: built directly, since tarfile's
    general path cost more per sample than copying the image (tested against ``TarInfo.tobuf``)."""
    encoded = name.encode()
    if len(encoded) >= 100 or not name.isascii() or size >= 8 ** 11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, TAR_MTIME, TAR_MODE, TAR_USER, TAR_USER
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    head = (encoded.ljust(100, b"\0") + b"%07o\0" % TAR_MODE + b"0000000\0" * 2 + b"%011o\0" % size
            + b"%011o\0" % TAR_MTIME)
    rest = b"0" + b"\0" * 100 + _USTAR_TAIL
    checksum = sum(head) + sum(rest) + 8 * ord(" ")
    return head + b"%06o\0 " % checksum + rest


class _ShardFile:
    """One shard being written: a temp file beside its final name, hashed as it is written, renamed
    into place (through :func:`atomic_path`) only when complete. The bytes are those of
    webdataset's ``TarWriter`` with our fixed header fields (members sorted by extension)."""

    def __init__(self, out_dir: str, name: str, index: int, start: int) -> None:
        self.name, self.index, self.start = name, index, start
        self.skipped: list[str | int] = []
        self.samples = 0
        self._atomic = atomic_path(os.path.join(out_dir, name))
        tmp = self._atomic.__enter__()
        self._file = open(tmp, "wb")  # noqa: SIM115 - closed in finish/abort
        self._sha256 = hashlib.sha256()
        self._bytes = 0

    def _write(self, data: bytes) -> None:
        self._sha256.update(data)
        self._bytes += len(data)
        self._file.write(data)

    def add(self, members: dict[str, Any]) -> None:
        key = members["__key__"]
        for ext in sorted(k for k in members if not k.startswith("_")):
            data = members[ext]
            self._write(tar_header(f"{key}.{ext}", len(data)))
            self._write(data)
            if len(data) % TAR_BLOCK:
                self._write(b"\0" * (TAR_BLOCK - len(data) % TAR_BLOCK))
        self.samples += 1

    def finish(self, stop: int) -> dict[str, Any]:
        end = _tar_file_bytes(self._bytes) - self._bytes  # two zero blocks, padded to a record
        self._write(b"\0" * end)
        self._file.close()
        self._atomic.__exit__(None, None, None)
        return {"name": self.name, "samples": self.samples, "bytes": self._bytes,
                "sha256": self._sha256.hexdigest(), "start": self.start, "stop": stop,
                "skipped": self.skipped}

    def abort(self, err: BaseException) -> None:
        with contextlib.suppress(Exception):
            self._file.close()
        with contextlib.suppress(BaseException):
            self._atomic.__exit__(type(err), err, err.__traceback__)


def open_shard(out_dir: str, name: str, index: int, start: int) -> _ShardFile:
    """A new shard file (a function of its own so that tests can interrupt a write here)."""
    return _ShardFile(out_dir, name, index, start)


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


def progress_name(num_nodes: int, node_rank: int) -> str:
    """``_progress.json`` for a single-node write; one file per node otherwise (nodes never share one)."""
    return PROGRESS_NAME if num_nodes == 1 else f"_progress-node{node_rank}-of-{num_nodes}.json"


def _load_state(out_dir: str, progress: str, remote: bool) -> dict[str, Any] | None:
    """The newest record of an earlier run: the progress file (unfinished) before ``_info.json``.
    ``_info.json`` of an upload is written after every shard is uploaded, so all of them were."""
    state = _read_json(os.path.join(out_dir, progress))
    if state is not None:
        return state
    info = _read_json(os.path.join(out_dir, INFO_NAME))
    if info is None:
        return None
    kept = {k: info.get(k) for k in ("format", "args", "listing_sha256", "class_names")}
    done = {s["name"]: s for s in info["shards"]}
    plan = [[s["start"], s["stop"]] for s in info["shards"]] if info["args"]["max_shard_bytes"] is None else None
    return {**kept, "plan": plan, "done": done, "uploaded": sorted(done) if remote else []}


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


def _shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def _shard_index(name: str) -> int:
    return int(name.rsplit("-", 1)[1].split(".", 1)[0])


def _run_args(source: ShardInput, prefix: str, samples_per_shard: int | None, max_shard_bytes: int | None,
              options: EncodeOptions, shuffle_seed: int | None) -> dict[str, Any]:
    """The arguments that decide the output bytes (not ``workers``, nodes or where the output goes)."""
    return {"input": source.describe, "prefix": prefix, "samples_per_shard": samples_per_shard,
            "max_shard_bytes": max_shard_bytes, "resize_shorter": options.resize_shorter,
            "quality": options.quality, "shuffle_seed": shuffle_seed}


def _validate(samples_per_shard: int | None, max_shard_bytes: int | None, options: EncodeOptions,
              max_bad_fraction: float, num_nodes: int, node_rank: int) -> None:
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
    if options.check not in ("decode", "headers"):
        raise ValueError(f"check must be 'decode' or 'headers', got {options.check!r}")
    if not 0 <= max_bad_fraction <= 1:
        raise ValueError(f"max_bad_fraction must be in 0..1, got {max_bad_fraction}")
    if num_nodes < 1 or not 0 <= node_rank < num_nodes:
        raise ValueError(f"node_rank must be in 0..num_nodes-1 and num_nodes >= 1, got {node_rank} of {num_nodes}")
    if num_nodes > 1 and max_shard_bytes is not None:
        raise ValueError("--num-nodes needs a plan known before writing: use --samples-per-shard without "
                         "--max-shard-bytes (a size cut depends on every earlier image)")


def _tar_keys(path: str) -> set[str]:
    with tarfile.open(path) as tar:
        return {member_key(m.name) for m in tar.getmembers() if m.isfile()}


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a write goes: ``local`` holds the shards as they are written; with ``remote``
    (``s3://bucket/prefix/``) each finished shard is uploaded there, and removed locally if
    ``delete_local``."""

    local: str
    remote: str | None = None
    delete_local: bool = False

    @staticmethod
    def of(out: str | os.PathLike, staging: str | os.PathLike | None, delete_local: bool) -> Target:
        out = os.fspath(out)
        if out.startswith("s3://"):
            if staging is None:
                raise ValueError(f"--out {out} needs --staging DIR: a local directory where shards are written "
                                 "before they are uploaded")
            return Target(_absolute(staging), out.rstrip("/") + "/", delete_local)
        if staging is not None or delete_local:
            raise ValueError("--staging and --delete-local only apply to an s3:// --out")
        return Target(_absolute(out))

    def url(self, name: str) -> str:
        assert self.remote is not None
        return self.remote + name

    @property
    def split(self) -> str:
        """The output directory's name (timm's schema reads it as the split)."""
        return os.path.basename(os.path.normpath(self.remote[5:] if self.remote else self.local))

    def publish(self, name: str) -> None:
        """Upload a finished bookkeeping file (``_info.json`` last of all)."""
        if self.remote is not None:
            object_store.upload_file(os.path.join(self.local, name), self.url(name))


UPLOADS_AHEAD = 2  # finished shards waiting for upload before writing waits for them


class _Writer:
    """Writes one node's shards in order from a stream of prepared samples, recording each finished
    (and uploaded) shard in the node's progress file and stopping when too much input is unreadable."""

    def __init__(self, target: Target, state: dict[str, Any], progress_path: str, prefix: str,
                 limits: tuple[int | None, int | None], node_total: int, max_bad_fraction: float,
                 describe: str) -> None:
        self.target, self.state, self.progress_path, self.prefix = target, state, progress_path, prefix
        self.samples_per_shard, self.max_shard_bytes = limits
        self.node_total, self.max_bad_fraction, self.describe = node_total, max_bad_fraction, describe
        self.bad = sum(len(r["skipped"]) for r in state["done"].values())
        self.first_bad: tuple[Any, str] | None = None
        self.written: list[str] = []  # shards this run wrote (removed if the input is refused)
        self.uploads: dict[str, concurrent.futures.Future] = {}
        self.uploader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="upload") if target.remote else None

    def save(self) -> None:
        write_json_atomic(self.progress_path, self.state, indent=1)

    def upload(self, name: str) -> None:
        if self.uploader is not None:
            self.uploads[name] = self.uploader.submit(object_store.upload_file, os.path.join(self.target.local, name),
                                                      self.target.url(name))

    def collect_uploads(self, wait: bool) -> None:
        """Record finished uploads (a failed one raises its one-line error); optionally wait for all."""
        for name, future in list(self.uploads.items()):
            if not (wait or future.done()):
                continue
            future.result()
            del self.uploads[name]
            self.state["uploaded"].append(name)
            if self.target.delete_local:
                os.remove(os.path.join(self.target.local, name))
            self.save()

    def close(self) -> None:
        """Let a running upload finish and record what did, also when the write stops on an error."""
        if self.uploader is None:
            return
        self.uploader.shutdown(wait=True)  # at most UPLOADS_AHEAD + 1 shards
        self.uploader = None
        finished = [n for n, f in self.uploads.items() if f.done() and not f.cancelled() and f.exception() is None]
        for name in finished:
            del self.uploads[name]
            self.state["uploaded"].append(name)
            if self.target.delete_local:
                os.remove(os.path.join(self.target.local, name))
        if finished:
            self.save()

    def _add(self, shard: _ShardFile, sample: Sample, prepared: Prepared, bar: _Progress) -> None:
        members, reason = prepared
        bar.update()
        if members is not None:
            shard.add(members)
            return
        logger.warning("skipping unreadable image %s (%s)", sample.source, reason)
        shard.skipped.append(sample.source)
        self.bad += 1
        self.first_bad = self.first_bad or (sample.source, reason or "")
        if self.bad > self.max_bad_fraction * self.node_total:
            where, why = self.first_bad
            raise BadDataError(f"at least {self.bad} of the {self.node_total} images of {self.describe} are "
                               f"unreadable, more than --max-bad-fraction {self.max_bad_fraction:g} allows "
                               f"(first: {where}: {why}); remove or fix them, or raise --max-bad-fraction")

    def _finish(self, shard: _ShardFile, stop: int) -> None:
        record = shard.finish(stop)
        self.written.append(record["name"])
        self.state["done"][record["name"]] = record
        self.save()
        self.upload(record["name"])
        self.collect_uploads(wait=False)
        while len(self.uploads) > UPLOADS_AHEAD:  # the staging disk holds a few shards, not the data set
            next(iter(self.uploads.values())).exception()
            self.collect_uploads(wait=False)

    def run(self, fixed: Sequence[tuple[int, int, int]], tail: tuple[int, int] | None, ordered: Sequence[Sample],
            stream: Iterator[Prepared], bar: _Progress) -> None:
        """Write the ``fixed`` shards ``(index, start, stop)``, then, for a size cut, the ``tail`` from
        ``(index, start)`` to the end, closing a shard when the next sample would not fit."""
        shard: _ShardFile | None = None
        try:
            for index, start, stop in fixed:
                shard = open_shard(self.target.local, _shard_name(self.prefix, index), index, start)
                for pos in range(start, stop):
                    self._add(shard, ordered[pos], next(stream), bar)
                self._finish(shard, stop)
                shard = None
            if tail is not None:
                self._run_tail(*tail, ordered, stream, bar)
        except BaseException as err:
            if shard is not None:
                shard.abort(err)
            raise

    def _run_tail(self, index: int, start: int, ordered: Sequence[Sample], stream: Iterator[Prepared],
                  bar: _Progress) -> None:
        assert self.max_shard_bytes is not None
        shard = open_shard(self.target.local, _shard_name(self.prefix, index), index, start)
        try:
            used = 0
            for pos in range(start, len(ordered)):
                prepared = next(stream)
                size = _sample_tar_bytes(prepared[0]) if prepared[0] is not None else 0
                full = self.samples_per_shard is not None and pos - shard.start >= self.samples_per_shard
                if pos > shard.start and (full or _tar_file_bytes(used + size) > self.max_shard_bytes):
                    self._finish(shard, pos)
                    index += 1
                    shard = open_shard(self.target.local, _shard_name(self.prefix, index), index, pos)
                    used = 0
                used += size
                self._add(shard, ordered[pos], prepared, bar)
            self._finish(shard, len(ordered))
        except BaseException as err:
            if shard.name not in self.state["done"]:
                shard.abort(err)
            raise


def _is_intact(path: str, record: dict[str, Any], rehash: bool) -> bool:
    """A finished shard is trusted by its size and record (a file that is there in full was renamed
    into place complete); ``rehash`` also compares its sha256."""
    if not os.path.isfile(path) or os.path.getsize(path) != record["bytes"]:
        return False
    return not rehash or _file_sha256(path)[0] == record["sha256"]


def _adopt(path: str, name: str, start: int, stop: int, keys: Sequence[str],
           samples: Sequence[Sample]) -> dict[str, Any]:
    """Record a complete but unrecorded shard (the run died between rename and record)."""
    sha, size = _file_sha256(path)
    found = _tar_keys(path)
    skipped = [s.source for key, s in zip(keys, samples) if key not in found]
    return {"name": name, "samples": len(found), "bytes": size, "sha256": sha, "start": start, "stop": stop,
            "skipped": skipped}


def _remove_tmp_files(out_dir: str, prefix: str) -> None:
    """Half-written files of an interrupted run (shards, progress records) are useless; they are
    written again from scratch."""
    for pattern in (f".{prefix}-*.tar.*.tmp", f".{prefix}-*.tar.tmp", "._*.json.*.tmp", f".{WIDS_INDEX_NAME}.*.tmp"):
        for tmp in Path(out_dir).glob(pattern):
            tmp.unlink(missing_ok=True)


def _sorted_done(state: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(state["done"].values(), key=lambda r: _shard_index(r["name"]))


def _count_jobs(target: Target, state: dict[str, Any], mine: range, prefix: str, keys: Callable[[int, int], list[str]],
                ordered: Sequence[Sample], rehash: bool) -> tuple[list[tuple[int, int, int]], list[str]]:
    """(shards to write, shards to upload) of a plan known in advance; complete unrecorded shards
    are adopted on the way."""
    fixed, upload = [], []
    uploaded = set(state["uploaded"])
    for index in mine:
        start, stop = state["plan"][index]
        name = _shard_name(prefix, index)
        if name in uploaded:
            continue
        path = os.path.join(target.local, name)
        record = state["done"].get(name)
        if record is None and os.path.isfile(path):
            state["done"][name] = _adopt(path, name, start, stop, keys(start, stop), ordered[start:stop])
        elif record is None or not _is_intact(path, record, rehash):
            state["done"].pop(name, None)
            fixed.append((index, start, stop))
            continue
        upload.append(name)
    return fixed, upload


def _size_jobs(target: Target, state: dict[str, Any], prefix: str, rehash: bool,
               n: int) -> tuple[list[tuple[int, int, int]], tuple[int, int] | None, list[str]]:
    """(recorded shards to rewrite, the rest from ``(index, start)``, shards to upload) of a size cut,
    whose shards are known only as far as they were written. Unrecorded shards past the last record
    are removed: the tail writes them again, identically."""
    fixed, upload = [], []
    uploaded = set(state["uploaded"])
    done = _sorted_done(state)
    for record in done:
        name = record["name"]
        if name in uploaded:
            continue
        if _is_intact(os.path.join(target.local, name), record, rehash):
            upload.append(name)
        else:
            fixed.append((_shard_index(name), record["start"], record["stop"]))
            del state["done"][name]
    index, start = len(done), done[-1]["stop"] if done else 0
    for name in _stray_shards(target.local, prefix):
        if _shard_index(name) >= index:
            os.remove(os.path.join(target.local, name))
    return fixed, (index, start) if start < n else None, upload


def _stray_shards(out_dir: str, prefix: str) -> list[str]:
    return sorted(n for n in os.listdir(out_dir) if n.startswith(f"{prefix}-") and n.endswith(".tar"))


def _info(state: dict[str, Any], records: Sequence[dict[str, Any]], split: str) -> dict[str, Any]:
    """The project's fields, plus timm's webdataset reader schema (``name``, ``splits``) so
    ``timm.data.create_dataset("wds/NAME", root=..., split=SPLIT)`` reads the directory."""
    shards = list(records)
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


def _publish(target: Target, state: dict[str, Any], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Write (and upload) ``wids-index.json``, then ``_info.json``: readers take a directory with
    ``_info.json`` as complete, so it comes last."""
    if not sum(r["samples"] for r in records):
        where, why = next(((s, "unreadable") for r in records for s in r["skipped"]), ("", ""))
        raise BadDataError(f"no readable image in {state['args']['input'].get('path')} "
                           f"({sum(len(r['skipped']) for r in records)} tried; first: {where}); nothing written")
    info = _info(state, records, target.split)
    write_json_atomic(os.path.join(target.local, WIDS_INDEX_NAME), _wids_index(info, target.split), indent=1)
    target.publish(WIDS_INDEX_NAME)
    write_json_atomic(os.path.join(target.local, INFO_NAME), info, indent=1)
    target.publish(INFO_NAME)
    return info


def _discard(target: Target, names: Iterable[str], progress_path: str, created: bool) -> None:
    """A refused input leaves nothing behind: this run's shards (local and uploaded), its progress
    file, and the output directory if this run made it."""
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(target.local, name))
        if target.remote is not None:
            with contextlib.suppress(object_store.ObjectStoreError):
                object_store.delete_object(target.url(name))
    with contextlib.suppress(FileNotFoundError):
        os.remove(progress_path)
    if created:
        with contextlib.suppress(OSError):
            os.rmdir(target.local)


def _start_state(target: Target, source: ShardInput, args: dict[str, Any], listing: str, ordered: Sequence[Sample],
                 created: bool, node: tuple[int, int], out_dir: str) -> dict[str, Any]:
    """The earlier run's state when resuming (after checking it matches), else a fresh plan: the
    shard cut by count, or ``None`` for a size cut (made while writing)."""
    num_nodes, node_rank = node
    state = _load_state(target.local, progress_name(num_nodes, node_rank), target.remote is not None)
    if state is not None:
        _check_same_run(state, args, listing, out_dir)
        state.setdefault("uploaded", [])
        return {**state, "finished": False}
    prefix, per_shard = args["prefix"], args["samples_per_shard"]
    plan = _plan_by_count(len(ordered), per_shard) if args["max_shard_bytes"] is None else None
    mine = node_shards(len(plan), num_nodes, node_rank) if plan is not None else range(0)
    stray = [] if created else [n for n in _stray_shards(target.local, prefix)
                                if plan is None or _shard_index(n) in mine]  # other nodes' shards are expected
    if stray:
        raise ValueError(f"{target.local} holds shards ({stray[0]} ...) but no {INFO_NAME} or "
                         f"{progress_name(num_nodes, node_rank)}; use an empty --out directory")
    return {"format": FORMAT, "args": args, "listing_sha256": listing,
            "class_names": list(source.class_names) if source.labelled else None,
            "plan": [list(p) for p in plan] if plan is not None else None, "done": {}, "uploaded": [],
            "finished": False}


def write_shards(
    out_dir: str | os.PathLike,
    source: ShardInput,
    *,
    prefix: str = "shard",
    samples_per_shard: int | None = 1000,
    max_shard_bytes: int | None = None,
    resize_shorter: int | None = None,
    quality: int | None = None,
    check: str = "decode",
    shuffle_seed: int | None = 0,
    workers: int | None = None,
    progress: bool = True,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    num_nodes: int = 1,
    node_rank: int = 0,
    staging: str | os.PathLike | None = None,
    delete_local: bool = False,
    rehash: bool = False,
) -> dict[str, Any] | None:
    """Write (or finish writing) ``source`` as tar shards in ``out_dir`` (a directory or an ``s3://``
    prefix, written through ``staging``); return ``_info.json``'s content.

    ``shuffle_seed=None`` keeps the input order. A rerun with the same arguments skips finished
    shards and writes the rest; different arguments raise ``ValueError``. With ``num_nodes > 1`` this
    call writes node ``node_rank``'s part of the plan and returns ``None``: :func:`finalize_shards`
    writes ``_info.json`` once every node is done. More than ``max_bad_fraction`` of the (node's)
    images unreadable, or none readable, raises :class:`BadDataError` and removes what was written.
    """
    options = EncodeOptions(resize_shorter, quality, check)
    _validate(samples_per_shard, max_shard_bytes, options, max_bad_fraction, num_nodes, node_rank)
    target = Target.of(out_dir, staging, delete_local)
    workers = default_workers() if workers is None else max(1, workers)
    created = not os.path.isdir(target.local)
    os.makedirs(target.local, exist_ok=True)
    args = _run_args(source, prefix, samples_per_shard, max_shard_bytes, options, shuffle_seed)
    listing = _listing_sha256(source)
    order = _shuffled(len(source.samples), shuffle_seed)
    ordered = [source.samples[i] for i in order]
    width = _key_width(len(ordered))

    def keys(start: int, stop: int) -> list[str]:
        return [f"{k:0{width}d}" for k in range(start, stop)]

    progress_path = os.path.join(target.local, progress_name(num_nodes, node_rank))
    state = _start_state(target, source, args, listing, ordered, created, (num_nodes, node_rank), os.fspath(out_dir))
    write_json_atomic(progress_path, state, indent=1)
    for name in (INFO_NAME, WIDS_INDEX_NAME):  # incomplete again until every shard is checked
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(target.local, name))
    _remove_tmp_files(target.local, prefix)

    if state["plan"] is not None:
        mine = node_shards(len(state["plan"]), num_nodes, node_rank)
        fixed, to_upload = _count_jobs(target, state, mine, prefix, keys, ordered, rehash)
        tail = None
        node_range = (state["plan"][mine[0]][0], state["plan"][mine[-1]][1]) if len(mine) else (0, 0)
    else:
        fixed, tail, to_upload = _size_jobs(target, state, prefix, rehash, len(ordered))
        node_range = (0, len(ordered))
    write_json_atomic(progress_path, state, indent=1)

    positions = [p for _, start, stop in fixed for p in range(start, stop)]
    if tail is not None:
        positions += range(tail[1], len(ordered))
    writer = _Writer(target, state, progress_path, prefix, (samples_per_shard, max_shard_bytes),
                     node_range[1] - node_range[0], max_bad_fraction, str(args["input"].get("path")))
    bar = _Progress(node_range[1] - node_range[0], node_range[1] - node_range[0] - len(positions), progress, "writing")
    items = ((f"{p:0{width}d}", ordered[p]) for p in positions)
    try:
        with contextlib.closing(_prepared_stream(source.reader, options, items, workers)) as stream:
            for name in to_upload:
                writer.upload(name)
            writer.run(fixed, tail, ordered, stream, bar)
        writer.collect_uploads(wait=True)
        if num_nodes == 1:
            info = _publish(target, state, _sorted_done(state))
    except BadDataError:
        writer.close()
        _discard(target, [*writer.written, *(state["done"] if created else [])], progress_path, created)
        raise
    finally:
        writer.close()
        bar.close()
    if num_nodes == 1:
        os.remove(progress_path)  # the local _info.json stays: a rerun reads the finished state from it
        return info
    state["finished"] = True
    write_json_atomic(progress_path, state, indent=1)
    target.publish(os.path.basename(progress_path))
    return None


def _node_state(target: Target, name: str) -> dict[str, Any]:
    """One node's progress file: local, or downloaded from the upload prefix."""
    if target.remote is not None:
        try:
            return json.loads(object_store.read_object(target.url(name)))
        except object_store.ObjectStoreError:
            raise ValueError(f"{target.url(name)} is missing: that node has not finished its part "
                             "(rerun it with the same arguments)") from None
    state = _read_json(os.path.join(target.local, name))
    if state is None:
        raise ValueError(f"{os.path.join(target.local, name)} is missing: that node has not started or finished "
                         "its part (rerun it with the same arguments)")
    return state


def finalize_shards(out_dir: str | os.PathLike, num_nodes: int, staging: str | os.PathLike | None = None
                    ) -> dict[str, Any]:
    """Join the parts of a ``num_nodes`` write: check that every node finished its shards with the
    same arguments and input, then write (upload) ``wids-index.json`` and ``_info.json`` and remove
    the nodes' progress files. The result equals a single-node write."""
    if num_nodes < 2:
        raise ValueError("finalize joins a write split with --num-nodes N > 1")
    remote = os.fspath(out_dir).startswith("s3://")
    with contextlib.ExitStack() as stack:
        if remote and staging is None:
            staging = stack.enter_context(tempfile.TemporaryDirectory(prefix="selfdistill-finalize-"))
        target = Target.of(out_dir, staging, False)
        names = [progress_name(num_nodes, r) for r in range(num_nodes)]
        states = [_node_state(target, name) for name in names]
        first = states[0]
        for rank, state in enumerate(states):
            _check_same_run(state, first["args"], first["listing_sha256"], os.fspath(out_dir))
            if not state.get("finished"):
                raise ValueError(f"node {rank} of {num_nodes} has not finished its part (rerun it with the same "
                                 "arguments), so the shard set is incomplete")
        merged = {**first, "done": {k: v for s in states for k, v in s["done"].items()}}
        records = [merged["done"].get(_shard_name(first["args"]["prefix"], i)) for i in range(len(first["plan"]))]
        missing = [_shard_name(first["args"]["prefix"], i) for i, r in enumerate(records) if r is None]
        if missing:
            raise ValueError(f"{len(missing)} shards ({missing[0]} ...) are not recorded by any node; was the write "
                             f"split with --num-nodes {num_nodes}?")
        if not remote:
            for record in records:
                if not _is_intact(os.path.join(target.local, record["name"]), record, rehash=False):
                    raise ValueError(f"{record['name']} is missing or not of its recorded size; rerun its node")
        info = _publish(target, merged, records)
        for name in names:
            if remote:
                object_store.delete_object(target.url(name))
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(target.local, name))
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
            decode_all(img)
    except Exception as err:  # noqa: BLE001 - PIL raises many types on bad data
        return f"image does not decode ({unreadable_reason(err)})"
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
    """Re-read every shard of ``_info.json``: existence, sha256, count, every image decoded, labels.
    A directory without a single sample is a failure too: there is nothing to train on."""
    directory = os.fspath(directory)
    info = read_info(directory)
    tasks = [(directory, record, info["class_names"]) for record in info["shards"]]
    failures: dict[str, list[str]] = {}
    if not info["total_samples"]:
        failures[INFO_NAME] = ["no samples: every input image was unreadable"]
    n_samples = 0
    bar = _Progress(len(tasks), 0, progress, "verifying", unit="shards")
    try:
        for name, problems, count in _map(_verify_task, tasks, workers):
            n_samples += count
            if problems:
                failures[name] = problems
            bar.update(1)
    finally:
        bar.close()
    return VerifyReport(len(tasks), n_samples, failures)
