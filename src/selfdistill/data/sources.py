"""How opened images (:func:`selfdistill.data.open_images`) become per-rank batches: a map-style
dataset (image folder, HF ``datasets`` directory) dealt by an epoch-seeded permutation, or
webdataset tar shards streamed from disk, a ``pipe:`` command, http(s) or object storage.

Every source gives the loop the same thing: ``batches_per_epoch`` (equal on every rank, so DDP and
DeepSpeed never wait at an epoch end for a rank that ran dry) and ``loader(epoch, start_batch)``,
an iterable of collated batches of samples ``{"image", "label", "index", "bad"}`` whose augmentation
is seeded per (epoch, sample).

Map-style sources (folder, hf) deal each epoch's permutation to the ranks and resume exactly.
Shards are read as streams: each (rank, worker) draws shards at random with replacement from a
seed of (seed, epoch, start batch, rank, worker), so a resumed epoch has the right length and
statistics but not the same samples as the uninterrupted one.
"""

from __future__ import annotations

import atexit
import io
import logging
import multiprocessing
import multiprocessing.util  # its exit function is registered first, so ours below runs before it
import os
import random
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from selfdistill.data import object_store
from selfdistill.data.folder import BadDataError, decode_rgb, sample_seed, seeded_rng
from selfdistill.data.sampler import EpochShardSampler
from selfdistill.data.shard_format import INFO_NAME, has_info, read_info, shard_urls

log = logging.getLogger(__name__)


def _ignore_stop(signum: int, frame: Any) -> None:
    pass


def loader_worker_init(worker_id: int) -> None:
    """Loader workers leave stopping to the training process: a SIGTERM / SIGUSR1 sent to every
    process of a job (SLURM does) would otherwise kill them (PyTorch's worker handler dies on a
    SIGTERM not sent by its parent) and the training process would fail in the very step it must
    finish to write its preemption checkpoint. They still exit with their parent. A Python handler,
    not SIG_IGN, so programs a worker starts (``pipe:`` shards) get the default back on exec."""
    import signal

    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT"):
        signal.signal(getattr(signal, name), _ignore_stop)


@atexit.register
def _stop_loader_workers() -> None:
    """A process that exits without closing its loaders (an exception: a peer rank died) kills its
    workers itself: multiprocessing's exit would SIGTERM them, which they ignore (above), and then
    wait for them forever, which under torchrun means until its shutdown timeout kills the rank."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


# -- map-style sources: folders and HF datasets ------------------------------------------------
class MapSource:
    """A map-style dataset dealt to ranks by an epoch-seeded permutation (exact resume)."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int, collate_fn: Callable, repeat_batches: int = 0, pin_memory: bool = False) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.num_workers, self.collate_fn, self.pin_memory = num_workers, collate_fn, pin_memory
        self.sampler = EpochShardSampler(len(dataset), batch_size, rank, world_size, seed=seed,
                                         repeat_batches=repeat_batches)

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def loader(self, epoch: int, start_batch: int = 0) -> Iterable[Any]:
        self.sampler.set_epoch(epoch, start_batch)
        return DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=True,
            num_workers=self.num_workers, collate_fn=self.collate_fn, pin_memory=self.pin_memory,
            # A private generator: creating the loader must not consume the global RNG (exact resume).
            generator=torch.Generator().manual_seed(self.seed), persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None, worker_init_fn=loader_worker_init)


# -- webdataset shards -------------------------------------------------------------------------
def expand_urls(path: str) -> list[str]:
    """Shard URLs from ``data.path``: a directory written by ``selfdistill-shards`` (its
    ``_info.json``; local or an ``s3://`` prefix), brace patterns (several separated by ``::``),
    ``pipe:`` commands, http(s) URLs, or ``s3://`` URLs (read through s5cmd or the AWS CLI)."""
    from braceexpand import braceexpand

    if not path or not path.strip():
        raise ValueError("data.path: empty shard pattern")
    if os.path.isdir(path):
        if has_info(path):
            urls = shard_urls(path)
        else:
            urls = [str(p) for p in sorted(Path(path).glob("*.tar"))]
    elif object_store.is_prefix(path):
        urls = object_store.remote_shard_urls(path, object_store.read_remote_info(path))
    else:
        urls = [u for part in path.split("::") for u in braceexpand(part)]
    if any(u.startswith("s3://") for u in urls):
        object_store.check_endpoint()
    urls = [object_store.to_pipe(u) for u in urls]
    local = [u for u in urls if _is_local(u)]
    missing = [u for u in local if not os.path.exists(u)]
    if urls and len(missing) == len(urls):
        raise FileNotFoundError(f"data.path: {path!r} matches no existing shard (e.g. {missing[0]})")
    if not urls:
        raise FileNotFoundError(f"data.path: {path!r} matches no shard")
    return urls


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def shard_info(path: str) -> dict[str, Any] | None:
    """``_info.json`` of a shard directory written by ``selfdistill-shards`` (local or an
    ``s3://`` prefix), else None."""
    if object_store.is_prefix(path):
        return object_store.read_remote_info(path)
    return read_info(path) if os.path.isdir(path) and has_info(path) else None


class ShardStream(IterableDataset):
    """Samples ``{"image", "label", "index", "bad"}`` from tar shards, for one rank.

    ``resampled``: each worker draws shards at random with replacement, forever (training; the
    loader cuts epochs). Otherwise the rank's shards (every ``world_size``-th) are split between
    workers and read once: every sample exactly once over all ranks and workers (evaluation).
    """

    def __init__(self, urls: list[str], transform: Callable | None, rank: int, world_size: int, seed: int,
                 epoch: int = 0, start_batch: int = 0, resampled: bool = True, shuffle_buffer: int = 1000,
                 retries: int = 2, max_missing_fraction: float = 0.1, draft_size: int = 0) -> None:
        super().__init__()
        self.draft_size = draft_size
        self.urls, self.transform, self.rank, self.world_size = urls, transform, rank, world_size
        self.seed, self.epoch, self.start_batch, self.resampled = seed, epoch, start_batch, resampled
        self.shuffle_buffer, self.retries, self.max_missing_fraction = shuffle_buffer, retries, max_missing_fraction
        self._skipped_shards: list[str] = []

    # -- which shards this reader opens
    def _reader(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def _shard_urls(self) -> Iterator[str]:
        worker, n_workers = self._reader()
        if not self.resampled:
            yield from self.urls[self.rank:: self.world_size][worker::n_workers]
            return
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.start_batch}/{self.rank}/{worker}")
        while True:
            yield rng.choice(self.urls)

    def _open(self, urls: Iterable[str]) -> Iterator[dict[str, Any]]:
        """Open each shard with retries; skip (and count) those that stay unreadable."""
        tried = failed = 0
        for url in urls:
            tried += 1
            for attempt in range(self.retries + 1):
                try:
                    stream = open_shard(url)
                except Exception as err:  # noqa: BLE001 - network, pipe and file errors alike
                    if attempt < self.retries:
                        time.sleep(0.5 * (attempt + 1))
                        continue
                    failed += 1
                    last_error = f"{shard_name(url)}: {err}"
                    log.warning("shard %s unreadable after %d tries, skipped (%s)", shard_name(url), self.retries + 1,
                                err)
                    self._skipped_shards.append(shard_name(url))
                else:
                    yield {"url": url, "stream": stream}
                    break
            if failed and tried >= 10 and failed / tried > self.max_missing_fraction:
                raise ShardReadError(f"{failed} of {tried} shards could not be read, more than "
                                     f"data.max_missing_shards={self.max_missing_fraction}; last: {last_error}")
            if failed == tried and tried >= 3:
                raise ShardReadError(f"none of the {tried} shards opened so far could be read; last: {last_error}")

    def _samples(self) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import group_by_keys, tar_file_expander

        def on_tar_error(err: Exception) -> bool:
            log.warning("damaged shard data skipped: %s", err)
            return True

        files = tar_file_expander(self._open(self._shard_urls()), handler=on_tar_error)
        return group_by_keys(files, handler=on_tar_error)

    def _shuffled(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if not self.resampled or self.shuffle_buffer <= 1:
            yield from samples
            return
        worker, _ = self._reader()
        rng = random.Random(f"shuffle/{self.seed}/{self.epoch}/{self.start_batch}/{self.rank}/{worker}")
        buffer: list[dict[str, Any]] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pending_bad: list[str] = []
        self._skipped_shards = []  # filled by _open; reported with the next sample
        for raw in self._shuffled(self._samples()):
            name = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
            index = _key_index(raw.get("__key__", ""))
            seed = sample_seed(self.seed, self.epoch, index)
            try:
                img = _decode_sample(raw, self.draft_size, getattr(self.transform, "plan", None), seed)
                label = int(raw["cls"].decode()) if "cls" in raw else -1
            except Exception as err:  # noqa: BLE001 - PIL raises many types on bad data
                log.warning("skipping unreadable sample %s (%s: %s)", name, type(err).__name__, err)
                pending_bad.append(name)
                continue
            if self.transform is not None:
                with seeded_rng(seed):
                    img = self.transform(img)
            # each damaged member skipped before this sample was a draw of its own; a skipped shard is
            # an unreadable file (named, counted in bad_images) but no image draw
            skipped, self._skipped_shards[:] = list(self._skipped_shards), []
            yield {"image": img, "label": label, "index": index, "bad": pending_bad + skipped,
                   "draws": 1 + len(pending_bad), "bad_draws": len(pending_bad)}
            pending_bad = []


class ShardReadError(BadDataError):
    """More shards than ``data.max_missing_shards`` allows cannot be opened."""


def shard_name(url: str) -> str:
    """The object a shard URL reads: the ``s3://`` URL inside a client command, else the URL."""
    return next((token for token in url.split() if token.startswith("s3://")), url) if url.startswith("pipe:") else url


def open_shard(url: str) -> Any:
    """A readable stream of the shard ``url``: :class:`CommandStream` for ``pipe:`` commands
    (s3:// shards are ones), webdataset's ``gopen`` for files and http(s)."""
    if url.startswith("pipe:"):
        return CommandStream(url[len("pipe:"):])
    from webdataset.gopen import gopen

    return gopen(url)


class CommandStream:
    """The output of a ``pipe:`` shard command, for tarfile. Unlike webdataset's pipe, a command
    that fails before writing anything fails here, at opening (so it is retried and counted as a
    missing shard), and a failure names the command's exit status and the last line it wrote to
    stderr (s5cmd's and the AWS CLI's reason: no such key, connection refused)."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.errors = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self.errors)
        if not self.proc.stdout.peek(1):  # blocks until the first bytes or the end of the output
            self._check_exit()

    def read(self, size: int = -1) -> bytes:
        data = self.proc.stdout.read(size)
        if not data and size != 0:
            self._check_exit()
        return data

    def _check_exit(self) -> None:
        status = self.proc.wait()
        if status:
            self.errors.seek(0)
            lines = [ln.strip() for ln in self.errors.read().decode(errors="replace").splitlines() if ln.strip()]
            self.close()
            program = (self.command.split() or ["pipe"])[0]
            raise OSError(f"{program} exited with status {status}: {lines[-1] if lines else 'no message'}")

    def close(self) -> None:
        if self.proc.poll() is None:  # closed before the end (a stopped epoch): no error
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.errors.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")


def _decode_sample(raw: dict[str, Any], draft_size: int = 0, plan: Callable | None = None,
                   seed: int = 0) -> Image.Image:
    data = next((raw[k] for k in IMAGE_KEYS if k in raw), None)
    if data is None:
        raise ValueError(f"no image member (one of {IMAGE_KEYS}) in sample with {sorted(raw)}")
    return decode_rgb(io.BytesIO(data), draft_size, plan, seed)


def _key_index(key: str) -> int:
    """The sample's global index when the key is one (selfdistill-shards writes them), else a hash."""
    return int(key) if key.isdigit() else zlib.crc32(key.encode())


class ShardSource:
    """Training batches streamed from shards, the same number on every rank every epoch."""

    def __init__(self, path: str, transform: Callable, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int, collate_fn: Callable, samples_per_epoch: int = 0, shuffle_buffer: int = 1000,
                 retries: int = 2, max_missing_fraction: float = 0.1, pin_memory: bool = False,
                 draft_size: int = 0) -> None:
        self.urls = expand_urls(path)
        self.draft_size = draft_size
        info = shard_info(path)
        total = samples_per_epoch or (info or {}).get("total_samples", 0)
        if not total:
            raise ValueError(f"data.samples_per_epoch: {path!r} has no {INFO_NAME}; say how many samples an "
                             "epoch holds (the shards' total)")
        readers = world_size * max(num_workers, 1)
        if len(self.urls) < readers:
            raise ValueError(
                f"data.path: {len(self.urls)} shards for {world_size} ranks x {max(num_workers, 1)} loader workers "
                f"= {readers} readers; write more, smaller shards (selfdistill-shards write --samples-per-shard) "
                "or lower data.num_workers")
        missing = [u for u in self.urls if _is_local(u) and not os.path.exists(u)]
        if missing:
            fraction = len(missing) / len(self.urls)
            if fraction > max_missing_fraction:
                raise FileNotFoundError(f"data.path: {len(missing)} of {len(self.urls)} shards are missing "
                                        f"(more than data.max_missing_shards={max_missing_fraction}), e.g. {missing[0]}")
            log.warning("%d of %d shards are missing and skipped, e.g. %s", len(missing), len(self.urls), missing[0])
            self.urls = [u for u in self.urls if u not in missing]
        self.transform, self.batch_size, self.rank, self.world_size = transform, batch_size, rank, world_size
        self.seed, self.num_workers, self.collate_fn, self.pin_memory = seed, num_workers, collate_fn, pin_memory
        self.shuffle_buffer, self.retries, self.max_missing_fraction = shuffle_buffer, retries, max_missing_fraction
        self.samples_per_epoch = total
        if self.batches_per_epoch == 0:
            raise ValueError(f"an epoch of {total} samples is less than one global batch "
                             f"({batch_size} x {world_size} ranks)")

    @property
    def batches_per_epoch(self) -> int:
        return self.samples_per_epoch // (self.batch_size * self.world_size)

    def loader(self, epoch: int, start_batch: int = 0) -> Iterable[Any]:
        import webdataset as wds

        stream = ShardStream(self.urls, self.transform, self.rank, self.world_size, self.seed, epoch, start_batch,
                             resampled=True, shuffle_buffer=self.shuffle_buffer, retries=self.retries,
                             max_missing_fraction=self.max_missing_fraction, draft_size=self.draft_size)
        batches = wds.DataPipeline(stream, wds.batched(self.batch_size, collation_fn=self.collate_fn, partial=False))
        loader = wds.WebLoader(batches, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                               prefetch_factor=4 if self.num_workers else None, worker_init_fn=loader_worker_init)
        return loader.with_epoch(self.batches_per_epoch - start_batch)
