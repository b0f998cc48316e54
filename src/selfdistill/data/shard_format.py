"""The on-disk format of a shard directory written by ``selfdistill-shards``: what a reader needs.

::

    shard-000000.tar ...   samples ``{key}.jpg|png|webp``, ``{key}.cls`` (labelled only), ``{key}.json``
    _info.json             written last: shard names, sample counts, sizes, sha256, class names, arguments;
                           also timm's webdataset reader schema (``name``, ``splits``: the directory's
                           name is the split, e.g. ``train``)
    wids-index.json        the same shards as a ``wids`` index (``wids.ShardListDataset``), relative URLs
    _progress.json         only while a write is unfinished

The writer (:mod:`selfdistill.data.shard_writer`), the verifier (:mod:`selfdistill.data.shard_verify`)
and the readers (training, evaluation) all use these names; readers never import the writer.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

__all__ = ["FORMAT", "IMAGE_MEMBERS", "INFO_NAME", "PROGRESS_NAME", "WIDS_INDEX_NAME", "file_sha256", "has_info",
           "member_key", "progress_name", "read_info", "shard_file_index", "shard_file_name", "shard_urls"]

FORMAT = "selfdistill-shards/1"
INFO_NAME = "_info.json"
WIDS_INDEX_NAME = "wids-index.json"
PROGRESS_NAME = "_progress.json"
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")  # what the writer stores; readers also accept ppm, bmp


def has_info(directory: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(directory), INFO_NAME))


def read_info(directory: str | os.PathLike) -> dict[str, Any]:
    """``_info.json`` of a finished shard directory (absent while a write is unfinished)."""
    path = os.path.join(os.fspath(directory), INFO_NAME)
    if not os.path.isfile(path):
        hint = " (a write is unfinished: rerun it)" if os.path.exists(
            os.path.join(os.fspath(directory), PROGRESS_NAME)) else ""
        raise FileNotFoundError(f"no {INFO_NAME} in {os.fspath(directory)!r}{hint}")
    with open(path) as f:
        info = json.load(f)
    if info.get("format") != FORMAT:
        raise ValueError(f"{path} has format {info.get('format')!r}, expected {FORMAT!r}")
    return info


def shard_urls(directory: str | os.PathLike) -> list[str]:
    """Paths of the shards listed in ``_info.json``, in write order."""
    return [os.path.join(os.fspath(directory), s["name"]) for s in read_info(directory)["shards"]]


def member_key(name: str) -> str:
    """webdataset's grouping: the key is the member's path up to the first dot of its basename."""
    folder, _, base = name.rpartition("/")
    return (folder + "/" if folder else "") + base.split(".", 1)[0]


def shard_file_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def shard_file_index(name: str) -> int:
    return int(name.rsplit("-", 1)[1].split(".", 1)[0])


def progress_name(num_nodes: int, node_rank: int) -> str:
    """``_progress.json`` for a single-node write; one file per node otherwise (nodes never share one)."""
    return PROGRESS_NAME if num_nodes == 1 else f"_progress-node{node_rank}-of-{num_nodes}.json"


def file_sha256(path: str) -> tuple[str, int]:
    """Hex sha256 (as ``_info.json`` records it) and size of a file, read in 1 MiB blocks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size
