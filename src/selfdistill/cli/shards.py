"""``selfdistill-shards``: pack images into webdataset tar shards, and verify them.

    selfdistill-shards write --folder /data/imagenet/train --out /data/imagenet-shards/train \\
        --resize-shorter 256
    selfdistill-shards verify --dir /data/imagenet-shards/train

Every option is also a ``shards.key=value`` word (``shards.out=DIR``), as on every entry point.
A rerun of ``write`` with the same arguments finishes an interrupted run, keeping finished shards.
On N machines: ``write ... --num-nodes N --node-rank R`` on each, then ``finalize --out ... --num-nodes N``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from selfdistill.cli import dispatch


def _positive_bytes(text: str) -> int:
    """Byte counts as ints or floats (``1e9``), so large limits are easy to type."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"must be a positive whole number of bytes: {text!r}")
    return int(value)


def _add_write(sub: Any) -> None:
    w = sub.add_parser("write", help="write an image folder, file list or HF dataset as tar shards", allow_abbrev=False)
    src = w.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="image folder: root/<class>/**/<image> (labelled) or root/<image>")
    src.add_argument("--file-list", help="text file of 'path' or 'path<TAB>label' lines (relative to the list)")
    src.add_argument("--hf-dataset", help="local HF datasets directory (save_to_disk output or imagefolder tree)")
    w.add_argument("--class-names", help="comma-separated class names for a labelled --file-list")
    w.add_argument("--image-column", default="image", help="HF image column (default: image)")
    w.add_argument("--label-column", default="label", help="HF label column; absent means unlabelled")
    w.add_argument("--hf-split", default="train", help="split of an HF DatasetDict (default: train)")
    w.add_argument("--out", required=True, help="output directory, or s3://bucket/prefix/ (needs --staging)")
    w.add_argument("--staging", help="with an s3:// --out: local directory where shards are written before upload")
    w.add_argument("--delete-local", action="store_true",
                   help="with an s3:// --out: delete each local shard once it is uploaded")
    w.add_argument("--prefix", default="shard", help="shard names are {prefix}-{index:06d}.tar")
    w.add_argument("--samples-per-shard", type=int, default=1000,
                   help="default 1000; 0: no count limit (needs --max-shard-bytes)")
    w.add_argument("--max-shard-bytes", type=_positive_bytes, help="size limit per shard file, e.g. 1e9")
    w.add_argument("--resize-shorter", type=int, help="downscale so the shorter side is this many pixels")
    w.add_argument("--quality", type=int, help="re-encode every image as JPEG of this quality "
                   "(resized images default to 95)")
    w.add_argument("--check", choices=["decode", "headers"], default="decode",
                   help="decode (default): every image decoded whole, a truncated one skipped and counted; headers: "
                        "only PIL's header check for images stored as they are (about 4x faster pass-through, a "
                        "truncated JPEG passes): for input verified before")
    order = w.add_mutually_exclusive_group()
    order.add_argument("--shuffle-seed", type=int, default=0, help="seed of the one-off sample shuffle (default 0)")
    order.add_argument("--no-shuffle", action="store_true", help="keep the input order")
    w.add_argument("--workers", type=int, default=None,
                   help="processes reading and encoding images (default: the cores this job may use)")
    w.add_argument("--max-bad-fraction", type=float, default=None,
                   help="refuse the input when more than this fraction of its images is unreadable (default 0.01)")
    w.add_argument("--num-nodes", type=int, default=1, help="split the write over this many machines (default 1)")
    w.add_argument("--node-rank", type=int, default=0, help="which part this machine writes: 0..num-nodes-1")
    w.add_argument("--rehash", action="store_true", help="on a resume, check finished shards by sha256, "
                   "not only by size and record")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_verify(sub: Any) -> None:
    v = sub.add_parser("verify", help="re-read every shard: checksum, sample count, images decode, labels",
                       allow_abbrev=False)
    v.add_argument("--dir", required=True, help="shard directory holding _info.json")
    v.add_argument("--workers", type=int, default=None, help="processes (default: the cores available)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_finalize(sub: Any) -> None:
    f = sub.add_parser("finalize", help="join the parts of a write split with --num-nodes: write _info.json",
                       allow_abbrev=False)
    f.add_argument("--out", required=True, help="the --out the nodes wrote to (a directory or s3:// prefix)")
    f.add_argument("--num-nodes", type=int, required=True, help="the --num-nodes the nodes were given")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfdistill-shards", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    _add_write(sub)
    _add_verify(sub)
    _add_finalize(sub)
    return p


def _source(args: argparse.Namespace) -> Any:
    from selfdistill.data import shard_inputs

    if args.class_names and not args.file_list:
        raise ValueError("--class-names only applies to --file-list")
    if args.folder:
        return shard_inputs.folder_input(args.folder)
    if args.file_list:
        names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
        return shard_inputs.file_list_input(args.file_list, names)
    return shard_inputs.hf_input(args.hf_dataset, args.image_column, args.label_column, args.hf_split)


def run_write(args: argparse.Namespace) -> int:
    from selfdistill.data import shard_writer

    source = _source(args)
    bad = shard_writer.DEFAULT_MAX_BAD_FRACTION if args.max_bad_fraction is None else args.max_bad_fraction
    info = shard_writer.write_shards(
        args.out, source, prefix=args.prefix, samples_per_shard=args.samples_per_shard or None,
        max_shard_bytes=args.max_shard_bytes, resize_shorter=args.resize_shorter, quality=args.quality, check=args.check,
        shuffle_seed=None if args.no_shuffle else args.shuffle_seed, workers=args.workers,
        progress=not args.no_progress, max_bad_fraction=bad, num_nodes=args.num_nodes, node_rank=args.node_rank,
        staging=args.staging, delete_local=args.delete_local, rehash=args.rehash)
    if info is None:
        print(f"node {args.node_rank} of {args.num_nodes} wrote its part to {args.out}; when every node is done: "
              f"selfdistill-shards finalize --out {args.out} --num-nodes {args.num_nodes}")
        return 0
    _summary(info, args.out)
    return 0


def _summary(info: dict[str, Any], out: str) -> None:
    skipped = sum(len(s["skipped"]) for s in info["shards"])
    classes = len(info["class_names"]) if info["class_names"] is not None else "no"
    print(f"wrote {info['total_samples']} samples ({classes} classes) in {len(info['shards'])} shards "
          f"to {out}" + (f"; skipped {skipped} unreadable images" if skipped else ""))


def run_finalize(args: argparse.Namespace) -> int:
    from selfdistill.data.shard_writer import finalize_shards

    _summary(finalize_shards(args.out, args.num_nodes), args.out)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from selfdistill.data.shard_verify import verify_shards
    from selfdistill.data.shard_workers import default_workers

    workers = default_workers() if args.workers is None else args.workers
    report = verify_shards(args.dir, workers=workers, progress=not args.no_progress)
    if report.ok:
        print(f"OK: {report.n_shards} shards, {report.n_samples} samples in {args.dir}")
        return 0
    print(f"FAILED: {len(report.failures)} of {report.n_shards} shards in {args.dir}:")
    for name, problems in report.failures.items():
        for problem in problems:
            print(f"  {name}: {problem}")
    return 1


def _refusing_bad_data(handler: Any) -> Any:
    """Unusable input data or an unreachable object store: one line and exit 1 (2 is for usage)."""
    from selfdistill.data import BadDataError

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except BadDataError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    return run


def main(argv: list[str] | None = None) -> int:
    from selfdistill.configkit import ConfigError, option_overrides

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    # A sub-command's options also as shards.key=value words (shards.out=DIR is --out DIR), the grammar of
    # every entry point; argparse lists sub-parsers only through its (stable) private action.
    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if argv and argv[0] in commands:
        try:
            argv = [argv[0], *option_overrides(commands[argv[0]], "shards", argv[1:])]
        except ConfigError as e:
            print(str(e), file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handler = {"write": run_write, "verify": run_verify, "finalize": run_finalize}[args.command]
    return dispatch(_refusing_bad_data(handler), args)


if __name__ == "__main__":
    sys.exit(main())
