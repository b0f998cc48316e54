"""Shard writing speed: ``selfdistill-shards write`` against webdataset's ``ShardWriter`` on the same
files in one run, storing the JPEGs as they are (pass-through) and resized to a 256 px shorter side,
and the writer's scaling with ``--workers``. A row with the old header-only check isolates the
writing path from the decoding.

    python benchmarks/shard_write.py --out benchmarks/results/shard_write_cpu.json

The images are ImageNet-sized (500x375) JPEG crops of scikit-learn's sample photos
(``data_throughput.make_images``). ``ShardWriter`` is run as its users run it: read each file, write
its bytes (or, for the resize, decode, resize bicubic and encode as JPEG 95 with PIL). selfdistill
also decodes every image to refuse broken ones (:func:`selfdistill.data.shard_encode.decode_all`), work a
plain ``ShardWriter`` loop does not do, so a third baseline adds that same check to it. Every
configuration runs ``--repeats`` times round-robin (a busy machine slows all of them alike); the
median is reported, with images/s and MB/s of shard bytes written.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_throughput import make_images  # noqa: E402

SHORTER = 256


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.jpg"))


def _resized_jpeg(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = SHORTER / min(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=95)
        return out.getvalue()


def shard_writer(files: list[Path], out: Path, per_shard: int, mode: str) -> None:
    """webdataset's ShardWriter: ``copy`` the bytes, ``check`` them with selfdistill's decode first,
    or ``resize``."""
    import webdataset as wds

    from selfdistill.data.shard_encode import decode_all

    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, path in enumerate(files):
            data = path.read_bytes()
            if mode == "check":
                with Image.open(io.BytesIO(data)) as img:
                    decode_all(img)
            elif mode == "resize":
                data = _resized_jpeg(data)
            sink.write({"__key__": f"{i:09d}", "jpg": data, "cls": b"0",
                        "json": json.dumps({"source": str(path), "label": 0}).encode()})


def selfdistill_writer(folder: Path, out: Path, per_shard: int, mode: str, workers: int) -> None:
    """``mode`` ``headers`` is ``--check headers`` (PIL's header check instead of a whole decode): what
    the writing path itself costs against ``ShardWriter``'s copy."""
    from selfdistill.data.shard_inputs import folder_input
    from selfdistill.data.shard_writer import write_shards

    write_shards(out, folder_input(folder), samples_per_shard=per_shard, workers=workers,
                 progress=False, resize_shorter=SHORTER if mode == "resize" else None,
                 check="headers" if mode == "headers" else "decode")


def timed(run, out: Path) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    run(out)
    seconds = time.perf_counter() - start
    written = sum(p.stat().st_size for p in out.glob("*.tar"))
    shutil.rmtree(out, ignore_errors=True)
    return seconds, written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--per-shard", type=int, default=250)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="selfdistill --workers to scale over")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("runs/bench_shard_write"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/shard_write.json"))
    args = p.parse_args(argv)
    folder = make_images(args.workdir, args.images)
    files = _files(folder)[:args.images]
    if len(files) < len(_files(folder)):
        raise SystemExit(f"{folder} holds more than --images {args.images} images; use another --workdir")
    input_mb = sum(f.stat().st_size for f in files) / 1e6

    configs: dict[tuple[str, str, int], object] = {}
    for mode in ("copy", "check", "resize"):
        configs[("ShardWriter", mode, 1)] = lambda out, m=mode: shard_writer(files, out, args.per_shard, m)
    configs[("selfdistill", "headers", 1)] = lambda out: selfdistill_writer(folder, out, args.per_shard, "headers", 1)
    for mode in ("copy", "resize"):
        for w in args.workers:
            configs[("selfdistill", mode, w)] = lambda out, m=mode, w=w: selfdistill_writer(folder, out, args.per_shard,
                                                                                           m, w)
    runs: dict[tuple[str, str, int], list[tuple[float, int]]] = {c: [] for c in configs}
    for _ in range(args.repeats):
        for config, run in configs.items():
            runs[config].append(timed(run, args.workdir / "out"))
    rows = []
    for (tool, mode, workers), values in runs.items():
        seconds = statistics.median(v[0] for v in values)
        row = {"tool": tool, "mode": mode, "workers": workers, "images_per_s": len(files) / seconds,
               "mb_per_s": values[0][1] / 1e6 / seconds, "shard_mb": values[0][1] / 1e6,
               "seconds": [v[0] for v in values]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"command": " ".join(["benchmarks/shard_write.py", *(argv if argv is not None else sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d"),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "cores_available": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                          "load_average_at_end": os.getloadavg()},
              "images": len(files), "input_mb": input_mb, "per_shard": args.per_shard, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    by = {(r["tool"], r["mode"], r["workers"]): r for r in report["rows"]}
    names = {"copy": "pass-through", "check": "pass-through + decode check", "resize": f"resize {SHORTER}",
             "headers": "pass-through, header check only (old check)"}
    lines = ["| writer | images | workers | images/s | MB/s written | vs ShardWriter (same images) |",
             "|---|---|---|---|---|---|"]
    for (tool, mode, workers), r in by.items():
        ref = by[("ShardWriter", "copy" if mode == "headers" else mode, 1)]["images_per_s"]
        ratio = "" if tool == "ShardWriter" else f"{r['images_per_s'] / ref:.2f}x"
        if tool == "selfdistill" and mode == "copy":
            ratio += f" ({r['images_per_s'] / by[('ShardWriter', 'check', 1)]['images_per_s']:.2f}x with the check)"
        lines.append(f"| {tool} | {names[mode]} | {workers} | {r['images_per_s']:.0f} | {r['mb_per_s']:.1f} "
                     f"| {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
