"""``selfdistill-shards verify``: re-read a finished shard directory the way training will, so a
damaged copy is found before a long run meets it: every shard's existence, sha256 and sample count
against ``_info.json``, every image decoded whole, every label within the class names.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
from collections.abc import Sequence
from typing import Any

from PIL import Image

from selfdistill.data.shard_encode import decode_all, unreadable_reason
from selfdistill.data.shard_format import IMAGE_MEMBERS, INFO_NAME, file_sha256, member_key, read_info
from selfdistill.data.shard_workers import Progress, process_map

__all__ = ["VerifyReport", "verify_shards"]


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
    sha, size = file_sha256(path)
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
    bar = Progress(len(tasks), 0, progress, "verifying", unit="shards")
    try:
        for name, problems, count in process_map(_verify_task, tasks, workers):
            n_samples += count
            if problems:
                failures[name] = problems
            bar.update(1)
    finally:
        bar.close()
    return VerifyReport(len(tasks), n_samples, failures)
