"""How one input sample becomes bytes in a shard: the image checked (decoded whole) and stored as
it is or re-encoded, its tar members, and the tar file itself, written with fixed header fields
(mtime, user, mode) so the same arguments give byte-identical shards.

These run in the writer's worker processes (:func:`prepare_chunk`) and in its parent
(:class:`ShardFile`); :func:`decode_all` and :func:`unreadable_reason` also serve the verifier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from typing import Any

from PIL import Image, UnidentifiedImageError

from selfdistill.atomic import atomic_path
from selfdistill.data.shard_inputs import ImageReader, Sample, read_raw

__all__ = ["EncodeOptions", "Prepared", "ShardFile", "decode_all", "prepare_chunk", "prepare_image",
           "sample_tar_bytes", "tar_file_bytes", "tar_header", "unreadable_reason"]

#: Formats stored as they are (when neither resizing nor a quality asks for re-encoding).
PASS_THROUGH = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
DEFAULT_JPEG_QUALITY = 95
TAR_MTIME = 0  # fixed header fields make the shards reproducible byte for byte
TAR_USER = "selfdistill"
TAR_MODE = 0o444
TAR_BLOCK = tarfile.BLOCKSIZE
TAR_RECORD = tarfile.RECORDSIZE


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    """How stored images are produced; ``None`` fields keep the original bytes where possible."""

    resize_shorter: int | None = None
    quality: int | None = None
    #: ``decode``: every image decoded whole; ``headers``: PIL's header check only for the images stored
    #: as they are (a truncated JPEG passes), for input that was verified before and must go fast.
    check: str = "decode"


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
        image, ext = prepare_image(read_raw(reader, sample), options)
    except Exception as err:  # noqa: BLE001 - PIL raises many types on bad data
        return None, unreadable_reason(err)
    return _sample_members(key, sample, image, ext), None


def prepare_chunk(reader: ImageReader, options: EncodeOptions,
                   items: Sequence[tuple[str, Sample]]) -> list[Prepared]:
    """A worker's unit of work: a few consecutive samples (one task per image would cost more in
    inter-process messages than reading a JPEG)."""
    return [_prepare_sample(reader, sample, key, options) for key, sample in items]


def _padded(size: int, unit: int) -> int:
    return -(-size // unit) * unit


def sample_tar_bytes(members: dict[str, Any]) -> int:
    """Bytes a sample adds to a tar: a header block per member plus its data padded to blocks."""
    return sum(TAR_BLOCK + _padded(len(v), TAR_BLOCK) for k, v in members.items() if not k.startswith("_"))


def tar_file_bytes(samples_bytes: int) -> int:
    """Size of a tar file whose members take ``samples_bytes``: end marker, padded to a record."""
    return _padded(samples_bytes + 2 * TAR_BLOCK, TAR_RECORD)


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


class ShardFile:
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
        end = tar_file_bytes(self._bytes) - self._bytes  # two zero blocks, padded to a record
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
