"""The on-disk format of a shard directory written by ``selfdistill-shards``: what a reader needs.

::

    shard-000000.tar ...   samples ``{key}.jpg|png|webp``, ``{key}.cls`` (labelled only), ``{key}.json``
    _info.json             written last: shard names, sample counts, sizes, sha256, class names, arguments;
                           also timm's webdataset reader schema (``name``, ``splits``: the directory's
                           name is the split, e.g. ``train``)
    wids-index.json        the same shards as a ``wids`` index (``wids.ShardListDataset``), relative URLs
    _progress.json         only while a write is unfinished

The writer (:mod:`selfdistill.data.shards`) and the readers (training, evaluation) both use these
names; readers never import the writer.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["FORMAT", "IMAGE_MEMBERS", "INFO_NAME", "PROGRESS_NAME", "WIDS_INDEX_NAME", "has_info", "member_key",
           "read_info", "shard_urls"]

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
