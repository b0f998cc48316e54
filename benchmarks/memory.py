"""Memory per rank of DINO pretraining under DDP and DeepSpeed ZeRO, with and without activation
checkpointing, and the largest per-rank batch that fits a memory cap.

    python benchmarks/memory.py --out benchmarks/results/memory_cpu.json

For each model and each distribution strategy it launches two ranks of the real training loop
(``benchmarks/memory_worker.py``) for a few steps and records, per rank:
  * state: memory held between steps minus the runtime before the model was built and minus the
    EMA teacher (a plain fp32 copy in every strategy): student weights, optimizer state, gradient
    and communication buffers;
  * peak: the high-water mark over the run (RSS on CPU, ``max_memory_allocated`` on a GPU).
  * fwd+bwd: the high-water mark of forward + backward alone above the memory at its start
    (activations, and gradients where a strategy keeps them whole).
Activation memory per sample is the slope of fwd+bwd between single-process runs at two batch
sizes, with checkpointing off and on. The largest batch under ``--cap-gib`` solves
``resident + fwd_bwd(B) + (b - B) * slope <= cap`` for b.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "benchmarks" / "memory_worker.py"
STRATEGIES = ["ddp", "zero1", "zero2", "zero3", "zero3_offload"]
GIB = 2**30


def make_images(root: Path, n: int, size: int = 256) -> Path:
    if (root / "x").is_dir() and len(list((root / "x").iterdir())) >= n:
        return root
    (root / "x").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "x" / f"{i:04d}.jpg")
    return root


def launcher(strategy: str, ranks: int) -> list[str]:
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    if ranks == 1:
        return [sys.executable]
    if strategy == "ddp":
        if torch.cuda.is_available():
            return [accelerate, "launch", "--multi_gpu", "--num_processes", str(ranks)]
        return [accelerate, "launch", "--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml")]
    return [accelerate, "launch", "--use_deepspeed", "--deepspeed_config_file",
            str(ROOT / f"ds_configs/{strategy}.json"), "--num_processes", str(ranks)]


def run(args: argparse.Namespace, model: str, strategy: str, ranks: int, batch: int, ckpt: bool,
        precision: str | None = None, steps: int | None = None, local_crops: int | None = None) -> dict:
    precision = precision or args.precision
    steps = steps or args.steps
    local_crops = args.local_crops if local_crops is None else local_crops
    tag = f"{model}_{strategy}_r{ranks}_b{batch}_ckpt{int(ckpt)}_{precision}"
    result_dir = args.workdir / "results" / tag
    shutil.rmtree(result_dir, ignore_errors=True)
    result_dir.mkdir(parents=True)
    overrides = [
        f"model.name={model}", "model.img_size=224", f"model.grad_checkpointing={str(ckpt).lower()}",
        f"data.path={args.workdir / 'images'}", "data.num_workers=0", f"data.n_local_crops={local_crops}",
        f"train.batch_size_per_device={batch}", f"train.max_steps={steps}", "train.epochs=1",
        "train.checkpoint_every=1000000", "train.trackers=[]", "train.progress_bar=false", "train.log_every=1",
        f"train.output_dir={args.workdir / 'runs' / tag}", f"train.precision={precision}",
    ]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(max(1, args.threads // ranks)))
    env.pop("WORLD_SIZE", None)
    cmd = [*launcher(strategy, ranks), str(WORKER), str(result_dir), *overrides]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{tag} failed:\n{r.stderr[-3000:]}")
    ranks_out = [json.loads((result_dir / f"rank{i}.json").read_text()) for i in range(ranks)]
    worst = max(ranks_out, key=lambda x: x["peak_bytes"])
    row = {"model": model, "strategy": strategy, "ranks": ranks, "batch": batch, "checkpointing": ckpt,
           "precision": precision,
           "state_gib": max(x["tensor_state_bytes"] for x in ranks_out) / GIB,
           "resident_state_gib": max(x["state_bytes"] for x in ranks_out) / GIB, "peak_gib": worst["peak_bytes"] / GIB,
           "fwd_bwd_gib": max(x["fwd_bwd_bytes"] for x in ranks_out) / GIB,
           "resident_gib": max(x["after_steps_bytes"] for x in ranks_out) / GIB,
           "student_parameters": worst["student_parameters"], "teacher_gib": worst["teacher_bytes"] / GIB,
           "runtime_gib": worst["before_build_bytes"] / GIB, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_base_patch16_224", "swin_base_patch4_window7_224"])
    p.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    p.add_argument("--batch", type=int, default=2, help="per-rank batch of the strategy table")
    p.add_argument("--slope-batches", type=int, nargs=2, default=[2, 6],
                   help="two single-process batch sizes for activation memory per sample")
    p.add_argument("--local-crops", type=int, default=10)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--state-precision", default="bf16",
                   help="precision of the model + optimizer state comparison (one step, batch 1; '' to skip): "
                        "with bf16 DeepSpeed keeps 16-bit weights and fp32 masters, as on GPUs")
    p.add_argument("--cap-gib", type=float, default=16.0, help="memory cap per rank for the largest-batch column")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workdir", type=Path, default=Path("runs/bench_memory"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/memory.json"))
    args = p.parse_args(argv)
    args.workdir = args.workdir.resolve()
    make_images(args.workdir / "images", n=max(64, 2 * args.batch * args.steps * 2))

    rows, state_rows, slopes = [], [], {}
    for model in args.models:
        if args.state_precision:
            for strategy in args.strategies:
                state_rows.append(run(args, model, strategy, 2, 1, False, args.state_precision, steps=1, local_crops=2))
        for ckpt in (False, True):
            b1, b2 = args.slope_batches
            lo, hi = run(args, model, "ddp", 1, b1, ckpt), run(args, model, "ddp", 1, b2, ckpt)
            slopes[(model, ckpt)] = (hi["fwd_bwd_gib"] - lo["fwd_bwd_gib"]) / (b2 - b1)
        for strategy in args.strategies:
            for ckpt in (False, True):
                row = run(args, model, strategy, 2, args.batch, ckpt)
                slope = slopes[(model, ckpt)]
                row["activation_gib_per_sample"] = slope
                # Between steps the rank holds `resident`; a step adds fwd_bwd(b), linear in b.
                need = row["resident_gib"] + row["fwd_bwd_gib"]
                row["max_batch_under_cap"] = int(args.batch + (args.cap_gib - need) / slope) if slope > 0 else None
                rows.append(row)

    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    report = {"command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]), "machine": machine,
              "date": time.strftime("%Y-%m-%d"), "args": {k: str(v) for k, v in vars(args).items()},
              "rows": rows, "state_rows": state_rows, "activation_gib_per_sample": {f"{m} ckpt={c}": s for (m, c), s in slopes.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(markdown(report, args.cap_gib))
    return 0


def markdown(report: dict, cap: float) -> str:
    lines = [f"| model | strategy | ckpt | state GiB | vs DDP | fwd+bwd GiB | peak GiB | max batch @ {cap:g} GiB |",
             "|---|---|---|---|---|---|---|---|"]
    ddp = {(r["model"], r["checkpointing"]): r["state_gib"] for r in report["rows"] if r["strategy"] == "ddp"}
    for r in report["rows"]:
        base = ddp.get((r["model"], r["checkpointing"]))
        ratio = f"{r['state_gib'] / base:.0%}" if base else "-"
        lines.append(f"| {r['model']} | {r['strategy']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{r['state_gib']:.2f} | {ratio} | {r['fwd_bwd_gib']:.2f} | {r['peak_gib']:.2f} | "
                     f"{r['max_batch_under_cap']} |")
    if report["state_rows"]:
        lines += ["", "| model | strategy | precision | model + optimizer state GiB | vs DDP |", "|---|---|---|---|---|"]
        ddp = {r["model"]: r["state_gib"] for r in report["state_rows"] if r["strategy"] == "ddp"}
        for r in report["state_rows"]:
            ratio = f"{r['state_gib'] / ddp[r['model']]:.0%}" if r["model"] in ddp else "-"
            lines.append(f"| {r['model']} | {r['strategy']} | {r['precision']} | {r['state_gib']:.2f} | {ratio} |")
    lines.append("")
    lines.append("| model | activation GiB / sample, ckpt off | ckpt on | reduction |")
    lines.append("|---|---|---|---|")
    acts = report["activation_gib_per_sample"]
    for model in dict.fromkeys(r["model"] for r in report["rows"]):
        off, on = acts[f"{model} ckpt=False"], acts[f"{model} ckpt=True"]
        lines.append(f"| {model} | {off:.3f} | {on:.3f} | {off / on:.1f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
