"""How close ``selfdistill-plan``'s predicted peak memory per rank is to the measured one, on two CPU
ranks (gloo), for ViT-B/16 and Swin-B DINO, GLSD Swin-T and FD ViT-B, under DDP, ZeRO-2 and ZeRO-3,
with and without activation checkpointing.

    python benchmarks/plan_accuracy.py --out benchmarks/results/plan_accuracy_cpu.json

For each recipe the planner measures forward + backward once (``--probe-batches``, single process),
then each strategy x checkpointing row is launched by the planner's own ``--verify`` (the written
``launch.sh``, 2 ranks, ``--micro-batch`` images each, 2 steps) and its measured peak resident set per
rank is compared with the prediction. The FD teacher is a randomly initialised ViT-B/16 written once
as a timm-format file (memory does not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PLAN = [sys.executable, "-m", "selfdistill.cli.plan"]


def recipes(workdir: Path) -> dict[str, tuple[str, list[str]]]:
    teacher = workdir / "fd_teacher_vit_base16.safetensors"
    if not teacher.is_file():
        import timm

        from selfdistill.atomic import write_safetensors_atomic

        state = timm.create_model("vit_base_patch16_224", pretrained=False).state_dict()
        write_safetensors_atomic(teacher, {k: v.contiguous() for k, v in state.items()})
    return {
        "DINO ViT-B/16": ("configs/dino_vit_small16.yaml", ["model.name=vit_base_patch16_224"]),
        "DINO Swin-B": ("configs/dino_vit_small16.yaml", ["model.name=swin_base_patch4_window7_224"]),
        "GLSD Swin-T": ("configs/glsd_swin_tiny.yaml", []),
        "FD ViT-B/16": ("configs/fd_dino_vit_base16.yaml", [f"method.teacher_weights={teacher}",
                                                            "method.teacher_format=timm"]),
    }


def plan(args: argparse.Namespace, recipe: str, overrides: list[str], extra: list[str]) -> dict:
    out = args.workdir / f"plan_{hashlib.sha1(repr((recipe, overrides, extra)).encode()).hexdigest()[:12]}.json"
    cmd = [*PLAN, "--config", str(ROOT / recipe), *overrides, f"train.precision={args.precision}",
           "--cpu", "--gpus", "2", "--gpu-memory", args.memory, "--global-batch", str(2 * args.micro_batch),
           "--probe-batches", *map(str, args.probe_batches), "--json", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=None, help="names of recipes() to run (default: all)")
    p.add_argument("--strategies", nargs="+", default=["ddp", "zero2", "zero3"])
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--probe-batches", type=int, nargs=2, default=[2, 4])
    p.add_argument("--precision", default="fp32")
    p.add_argument("--memory", default="20GiB", help="the CPU target's memory per rank (only bounds the table)")
    p.add_argument("--workdir", type=Path, default=Path("runs/bench_plan"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/plan_accuracy.json"))
    args = p.parse_args(argv)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (recipe, overrides) in recipes(args.workdir).items():
        if args.recipes and name not in args.recipes:
            continue
        t0 = time.perf_counter()
        profile = plan(args, recipe, overrides, ["--strategies", *args.strategies])
        profile_path = args.workdir / f"profile_{len(rows)}.json"
        profile_path.write_text(json.dumps(profile))
        print(f"{name}: profiled in {time.perf_counter() - t0:.0f} s", flush=True)
        for strategy in args.strategies:
            for ckpt in (False, True):
                choice = f"{strategy}:ckpt" if ckpt else strategy
                report = plan(args, recipe, overrides, ["--strategies", *args.strategies, "--profile", str(profile_path),
                                                        "--choose", choice, "--verify", "--verify-micro-batch",
                                                        str(args.micro_batch)])
                v = report["verify"]
                row = {"recipe": name, "strategy": strategy, "ckpt": ckpt, "micro_batch": v["micro_batch"],
                       "ranks": v["ranks"], "predicted_peak_gib": v["predicted_peak"] / 2**30,
                       "measured_peak_gib": v["measured_peak"] / 2**30, "error": v["error"],
                       "predicted_state_gib": v["predicted_state"] / 2**30,
                       "measured_state_gib": v["measured_state"] / 2**30,
                       "parameters": sum(map(sum, profile["profile"]["groups"]))}
                rows.append(row)
                print(json.dumps(row), flush=True)
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__}
    report = {"command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d"), "machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
              "rows": rows, "worst_abs_error": max((abs(r["error"]) for r in rows), default=None)}
    from selfdistill.atomic import write_json_atomic

    write_json_atomic(args.out, report, indent=1)
    print(markdown(rows))
    return 0


def markdown(rows: list[dict]) -> str:
    lines = ["| recipe | strategy | ckpt | predicted peak GiB | measured peak GiB | error | state predicted / counted GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['strategy']} | {'on' if r['ckpt'] else 'off'} | {r['predicted_peak_gib']:.2f} | "
                     f"{r['measured_peak_gib']:.2f} | {r['error']:+.1%} | {r['predicted_state_gib']:.3f} / "
                     f"{r['measured_state_gib']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
