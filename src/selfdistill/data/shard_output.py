"""Where a shard write goes and how its shards are put there, one after another: :class:`Target`
(a directory, or a local staging directory uploaded to ``s3://``) and :class:`NodeWriter`, which
cuts one node's stream of prepared samples into shard files, skips and counts unreadable images
(refusing the input past ``max_bad_fraction``), uploads finished shards, and records each one in
the node's progress file, so an interrupted write resumes from the last recorded shard.

Each shard is written to a ``.{name}.*.tmp`` file, fsynced and renamed, so a final shard name
always holds a complete shard.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

from selfdistill.atomic import write_json_atomic
from selfdistill.data import object_store
from selfdistill.data.folder import BadDataError
from selfdistill.data.shard_encode import Prepared, ShardFile, sample_tar_bytes, tar_file_bytes
from selfdistill.data.shard_format import shard_file_name
from selfdistill.data.shard_inputs import Sample
from selfdistill.data.shard_workers import Progress

__all__ = ["NodeWriter", "Target", "open_shard"]

logger = logging.getLogger(__name__)


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
            return Target(os.path.abspath(os.fspath(staging)), out.rstrip("/") + "/", delete_local)
        if staging is not None or delete_local:
            raise ValueError("--staging and --delete-local only apply to an s3:// --out")
        return Target(os.path.abspath(out))

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


class NodeWriter:
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

    def _add(self, shard: ShardFile, sample: Sample, prepared: Prepared, bar: Progress) -> None:
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

    def _finish(self, shard: ShardFile, stop: int) -> None:
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
            stream: Iterator[Prepared], bar: Progress) -> None:
        """Write the ``fixed`` shards ``(index, start, stop)``, then, for a size cut, the ``tail`` from
        ``(index, start)`` to the end, closing a shard when the next sample would not fit."""
        shard: ShardFile | None = None
        try:
            for index, start, stop in fixed:
                shard = open_shard(self.target.local, shard_file_name(self.prefix, index), index, start)
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
                  bar: Progress) -> None:
        assert self.max_shard_bytes is not None
        shard = open_shard(self.target.local, shard_file_name(self.prefix, index), index, start)
        try:
            used = 0
            for pos in range(start, len(ordered)):
                prepared = next(stream)
                size = sample_tar_bytes(prepared[0]) if prepared[0] is not None else 0
                full = self.samples_per_shard is not None and pos - shard.start >= self.samples_per_shard
                if pos > shard.start and (full or tar_file_bytes(used + size) > self.max_shard_bytes):
                    self._finish(shard, pos)
                    index += 1
                    shard = open_shard(self.target.local, shard_file_name(self.prefix, index), index, pos)
                    used = 0
                used += size
                self._add(shard, ordered[pos], prepared, bar)
            self._finish(shard, len(ordered))
        except BaseException as err:
            if shard.name not in self.state["done"]:
                shard.abort(err)
            raise


def open_shard(out_dir: str, name: str, index: int, start: int) -> ShardFile:
    """A new shard file (a function of its own so that tests can interrupt a write here)."""
    return ShardFile(out_dir, name, index, start)
