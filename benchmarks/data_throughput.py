"""Loader throughput of DINO multi-crop (2x224 + 10x96) from an image folder, webdataset shards and
an HF dataset, with full-size and reduced-size JPEG decoding, with the whole augmentation in the
loader workers (``data.augment_on=workers``) or only decoding and cutting there
(``data.augment_on=device``, then the rest timed on this CPU per image as the device-side cost),
against what a ViT-S/16 training step consumes on the same machine.

    python benchmarks/data_throughput.py --out benchmarks/results/data_cpu.json

The images are ImageNet-sized (500x375) JPEG crops of the real photos shipped with scikit-learn,
written once as a folder, as shards and as an HF dataset. Each configuration runs the project's
own training source (``open_images(...).train_source``) for ``--batches`` batches after one warm-up batch.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_images(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` 500x375 JPEGs (quality 90) cut at random from scikit-learn's two sample photos."""
    folder = root / "folder" / "photos"
    if folder.is_dir() and len(list(folder.iterdir())) >= n:
        return root / "folder"
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo = photos[i % len(photos)]
        scale = rng.uniform(1.0, 1.6)
        big = photo.resize((int(photo.width * scale), int(photo.height * scale)), Image.BICUBIC)
        left, top = rng.integers(0, big.width - 500 + 1), rng.integers(0, big.height - 375 + 1)
        crop = big.crop((left, top, left + 500, top + 375))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.save(folder / f"{i:05d}.jpg", quality=90)
    return root / "folder"


def make_shards(folder: Path, out: Path, per_shard: int) -> Path:
    """The project's preprocessor, as a user would run it (original JPEG bytes kept)."""
    from selfdistill.data.shard_inputs import folder_input
    from selfdistill.data.shard_writer import write_shards

    if not (out / "_info.json").is_file():
        write_shards(out, folder_input(folder), samples_per_shard=per_shard, progress=False)
    return out


def make_hf(folder: Path, out: Path) -> Path:
    import datasets

    if (out / "dataset_info.json").is_file():
        return out
    datasets.load_dataset("imagefolder", data_dir=str(folder), split="train").save_to_disk(str(out))
    return out


def loader_images_per_s(fmt: str, path: Path, workers: int, decode_size: int, augment_on: str,
                        args: argparse.Namespace) -> tuple[float, float]:
    """Images/s out of the loader, and the device-side milliseconds per image (``augment_on=device``:
    the timed batches finished afterwards on this CPU, as the training process would; else 0)."""
    from selfdistill.engine.prefetch import to_device
    from selfdistill.methods import build_method
    from selfdistill.recipe import load_config

    config = load_config(None, [f"data.format={fmt}", f"data.path={path}", f"data.num_workers={workers}",
                                f"data.decode_size={decode_size}", f"train.batch_size_per_device={args.batch}",
                                f"data.augment_on={augment_on}", "model.name=vit_small_patch16_224"])
    method = build_method(config)
    images = method.train_data()
    source = images.train_source(args.batch, 0, 1, method.collate_fn())
    batches = iter(source.loader(0))
    next(batches)  # warm-up: worker start, first decodes
    t0 = time.perf_counter()
    got = [next(batches) for _ in range(args.batches)]
    seconds = time.perf_counter() - t0
    n = sum(len(b["index"]) for b in got)
    del batches  # the workers stop (no prefetching beside the device-side timing)
    device = torch.device(args.device)
    got = [to_device(b, device) for b in got]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    images.finish(copy.deepcopy(got[0]))  # warm-up (kernels, allocator)
    sync()
    t0 = time.perf_counter()
    for batch in got:
        images.finish(batch)
    sync()
    return n / seconds, 1000 * (time.perf_counter() - t0) / n if augment_on == "device" else 0.0


def decode_images_per_s(folder: Path, sizes: tuple[int, ...], rounds: int = 10) -> dict[str, float]:
    """JPEG decoding alone (``decode_rgb`` on bytes already in memory), one process: passes over
    all images alternate between the decode sizes, and the median pass of each is reported."""
    import io

    from selfdistill.data.folder import decode_rgb

    blobs = [f.read_bytes() for f in sorted((folder / "photos").iterdir())]
    rates: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(rounds):
        for size in sizes:
            t0 = time.perf_counter()
            for blob in blobs:
                decode_rgb(io.BytesIO(blob), size)
            rates[size].append(len(blobs) / (time.perf_counter() - t0))
    return {str(size): float(np.median(r)) for size, r in rates.items()}


def training_images_per_s(args: argparse.Namespace) -> float:
    """Optimizer steps of DINO ViT-S/16 on one fixed multi-crop batch (data excluded)."""
    from selfdistill.recipe import load_config
    from selfdistill.methods import Progress, build_method

    config = load_config(None, ["model.name=vit_small_patch16_224", f"train.batch_size_per_device={args.train_batch}"])
    method = build_method(config)
    student = method.student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    method.setup(_NoAccelerator(), steps_per_epoch=10, total_steps=100)
    b = args.train_batch
    batch = {"crops": [torch.randn(b, 3, 224, 224)] * 2 + [torch.randn(b, 3, 96, 96)] * 10,
             "index": torch.arange(b), "label": torch.zeros(b, dtype=torch.long)}
    times = []
    for step in range(args.train_steps + 1):
        t0 = time.perf_counter()
        out = method.training_step(student, batch, Progress(step, 0, 10, 100))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step(student, Progress(step, 0, 10, 100))
        times.append(time.perf_counter() - t0)
    return b / float(np.median(times[1:]))


class _NoAccelerator:
    """Just enough of an Accelerator for ``Method.setup`` in one CPU process."""

    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    is_main_process = True

    def unwrap_model(self, model):
        return model

    def reduce(self, tensor, reduction="sum"):
        return tensor


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=10, help="timed batches per configuration and repeat")
    p.add_argument("--repeats", type=int, default=3, help="round-robin repeats; the median is reported")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--decode-size", type=int, default=160, help="reduced-size decoding (data.decode_size) to compare")
    p.add_argument("--formats", nargs="+", default=["folder", "wds", "hf"])
    p.add_argument("--augment-on", nargs="+", default=["workers", "device"], choices=["workers", "device"])
    p.add_argument("--device", default="cpu", help="where the device half of augment_on=device is timed (cuda)")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("runs/bench_data"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/data.json"))
    args = p.parse_args(argv)
    folder = make_images(args.workdir, args.images)
    paths = {"folder": folder, "wds": make_shards(folder, args.workdir / "shards", per_shard=16)}
    if "hf" in args.formats:
        paths["hf"] = make_hf(folder, args.workdir / "hf")

    decode_only = decode_images_per_s(folder, (0, args.decode_size))
    configs = [(fmt, workers, decode, where) for fmt in args.formats for workers in args.workers
               for decode in (0, args.decode_size) for where in args.augment_on]
    runs: dict[tuple, list[tuple[float, float]]] = {c: [] for c in configs}
    for _ in range(args.repeats):  # round-robin, so slow phases of the machine hit every configuration
        for c in configs:
            runs[c].append(loader_images_per_s(c[0], paths[c[0]], c[1], c[2], c[3], args))
    rows = []
    for (fmt, workers, decode, where), values in runs.items():
        ips = float(np.median([v[0] for v in values]))
        row = {"format": fmt, "workers": workers, "decode_size": decode, "augment_on": where, "images_per_s": ips,
               "images_per_s_per_worker": ips / workers,
               "device_ms_per_image": float(np.median([v[1] for v in values])), "runs": values}
        rows.append(row)
        print(json.dumps(row), flush=True)
    train_ips = training_images_per_s(args)
    report = {"command": " ".join(["benchmarks/data_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d"),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "rows": rows, "decode_only_images_per_s": decode_only, "train_vit_s16_images_per_s": train_ips,
              "device": args.device}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(markdown(report, args.decode_size))
    return 0


def markdown(report: dict, decode_size: int) -> str:
    train = report["train_vit_s16_images_per_s"]
    lines = ["| source | workers | decode | augment on | images/s | per worker | vs workers path "
             f"| device ms / image ({report.get('device', 'cpu')}) | loader / ViT-S/16 step |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {(r["format"], r["workers"], r["decode_size"]): r["images_per_s"] for r in report["rows"]
            if r.get("augment_on", "workers") == "workers"}
    for r in report["rows"]:
        decode = "full" if r["decode_size"] == 0 else f">= {r['decode_size']} px"
        where = r.get("augment_on", "workers")
        ref = base.get((r["format"], r["workers"], r["decode_size"]))
        speedup = f"{r['images_per_s'] / ref:.2f}x" if ref and where == "device" else ""
        cost = f"{r['device_ms_per_image']:.2f}" if where == "device" else ""
        lines.append(f"| {r['format']} | {r['workers']} | {decode} | {where} | {r['images_per_s']:.1f} | "
                     f"{r['images_per_s_per_worker']:.1f} | {speedup} | {cost} | {r['images_per_s'] / train:.2f} |")
    d = report["decode_only_images_per_s"]
    lines.append(f"\nJPEG decoding alone (500x375): full {d['0']:.0f} images/s, reduced (>= {decode_size} px) "
                 f"{d[str(decode_size)]:.0f} images/s: {d[str(decode_size)] / d['0']:.2f}x")
    lines.append(f"\nViT-S/16 DINO training step (2x224 + 10x96, fp32, this machine): {train:.2f} images/s")
    by = {(r["format"], r["workers"], r["decode_size"], r.get("augment_on", "workers")): r["images_per_s"]
          for r in report["rows"]}
    for (fmt, workers, decode, where), ips in by.items():
        if decode == 0 and (fmt, workers, decode_size, where) in by:
            lines.append(f"- {fmt}, {workers} worker(s), augment on {where}: reduced-size decoding "
                         f"{by[(fmt, workers, decode_size, where)] / ips:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
