"""Pack an image folder, a file list or a local HF dataset into webdataset tar shards.

Training from millions of small files is bound by file-system metadata; a few hundred tar files
read sequentially are not. The writer shuffles the sample order once (training reads shards in
order, so a class-sorted folder would otherwise yield single-class shards) and cuts the shuffled
list into shards by a rule, so which sample lands in which shard is a pure function of the
arguments and the input listing (:mod:`~selfdistill.data.shard_inputs`).

The layout of the output directory is :mod:`selfdistill.data.shard_format` (what readers use);
``_progress.json`` also holds the plan and the shards completed so far while a run is unfinished.

``key`` is the sample's zero-padded position in the shuffled order. Tar headers carry a fixed
mtime, user and mode (:mod:`~selfdistill.data.shard_encode`), so the same arguments give
byte-identical shards, whatever the number of ``workers`` (:mod:`~selfdistill.data.shard_workers`).

Size planning: with ``max_shard_bytes`` the cut is made while writing, in order: a shard closes
when the next prepared sample would push it past the limit, so each image is read and encoded once.
Such a plan is known only as far as it was written; a count plan is known up-front, which is what
lets ``num_nodes`` writers each take a contiguous block of shards (:func:`node_shards`) and
:func:`finalize_shards` join them into the same directory a single writer makes.

Crash safety: shards are renamed into place complete (:mod:`~selfdistill.data.shard_output`).
``_progress.json`` (rewritten atomically after every shard) keeps the records of an interrupted
run; a resume trusts a recorded shard whose file has the recorded size (``rehash=True`` also
compares sha256), adopts a complete unrecorded one (the run died between the rename and the
record), and writes the others again.

Object storage: with an ``s3://`` output, shards are written in a local staging directory and each
finished one is uploaded (and optionally deleted locally); uploads are recorded so a resume skips
them, and ``_info.json`` is uploaded last, so a reader never sees a half-written data set.

Every image is decoded whole (:func:`~selfdistill.data.shard_encode.decode_all`): unreadable ones
are skipped with a warning naming the file and listed in their shard's ``"skipped"`` record, so one
corrupt file does not stop a day-long job; ``"samples"`` counts what was actually written. More than
``max_bad_fraction`` of them unreadable, or none readable, refuses the input and removes what was
written.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import random
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from selfdistill.atomic import write_json_atomic
from selfdistill.data import object_store
from selfdistill.data.folder import BadDataError
from selfdistill.data.shard_encode import EncodeOptions
from selfdistill.data.shard_format import (FORMAT, INFO_NAME, WIDS_INDEX_NAME, file_sha256, member_key, progress_name,
                                           shard_file_index, shard_file_name)
from selfdistill.data.shard_inputs import Sample, ShardInput
from selfdistill.data.shard_output import NodeWriter, Target
from selfdistill.data.shard_workers import Progress, default_workers, prepared_stream

__all__ = ["DEFAULT_MAX_BAD_FRACTION", "finalize_shards", "node_shards", "write_shards"]

#: Unreadable images tolerated before a write is refused, as in training (``data.max_bad_fraction``).
DEFAULT_MAX_BAD_FRACTION = 0.01


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
# State files


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _listing_sha256(source: ShardInput) -> str:
    """Fingerprint of the input listing: a folder that gained or lost files is a different input."""
    digest = hashlib.sha256()
    for sample in source.samples:
        digest.update(f"{sample.source}\t{sample.label}\n".encode())
    return digest.hexdigest()


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


# --------------------------------------------------------------------------------------------
# Resuming, publishing, the entry points


def _is_intact(path: str, record: dict[str, Any], rehash: bool) -> bool:
    """A finished shard is trusted by its size and record (a file that is there in full was renamed
    into place complete); ``rehash`` also compares its sha256."""
    if not os.path.isfile(path) or os.path.getsize(path) != record["bytes"]:
        return False
    return not rehash or file_sha256(path)[0] == record["sha256"]


def _adopt(path: str, name: str, start: int, stop: int, keys: Sequence[str],
           samples: Sequence[Sample]) -> dict[str, Any]:
    """Record a complete but unrecorded shard (the run died between rename and record)."""
    sha, size = file_sha256(path)
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
    return sorted(state["done"].values(), key=lambda r: shard_file_index(r["name"]))


def _count_jobs(target: Target, state: dict[str, Any], mine: range, prefix: str, keys: Callable[[int, int], list[str]],
                ordered: Sequence[Sample], rehash: bool) -> tuple[list[tuple[int, int, int]], list[str]]:
    """(shards to write, shards to upload) of a plan known in advance; complete unrecorded shards
    are adopted on the way."""
    fixed, upload = [], []
    uploaded = set(state["uploaded"])
    for index in mine:
        start, stop = state["plan"][index]
        name = shard_file_name(prefix, index)
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
            fixed.append((shard_file_index(name), record["start"], record["stop"]))
            del state["done"][name]
    index, start = len(done), done[-1]["stop"] if done else 0
    for name in _stray_shards(target.local, prefix):
        if shard_file_index(name) >= index:
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
                                if plan is None or shard_file_index(n) in mine]  # other nodes' shards are expected
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
    writer = NodeWriter(target, state, progress_path, prefix, (samples_per_shard, max_shard_bytes),
                     node_range[1] - node_range[0], max_bad_fraction, str(args["input"].get("path")))
    bar = Progress(node_range[1] - node_range[0], node_range[1] - node_range[0] - len(positions), progress, "writing")
    items = ((f"{p:0{width}d}", ordered[p]) for p in positions)
    try:
        with contextlib.closing(prepared_stream(source.reader, options, items, workers)) as stream:
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
        records = [merged["done"].get(shard_file_name(first["args"]["prefix"], i)) for i in range(len(first["plan"]))]
        missing = [shard_file_name(first["args"]["prefix"], i) for i, r in enumerate(records) if r is None]
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
