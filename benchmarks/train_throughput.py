"""Training throughput of a recipe, ours against an independent baseline (lightly), in one run.

    make bench-env                       # once: lightly into .bench-env/ (torch untouched)
    python benchmarks/train_throughput.py --suite --out benchmarks/results/train_cpu.json
    python benchmarks/train_throughput.py --config configs/dino_vit_small16.yaml --batch 8 --precision fp32

For each recipe and precision, every repeat runs the project (``run_pretrain.py --benchmark``, the
real ``Trainer``) and the baseline (``benchmarks/lightly_dino.py``) in fresh processes, one after
the other, alternating which goes first. Each process builds the recipe, runs ``--warmup`` untimed
steps and ``--steps`` timed optimizer steps on one synthetic batch (random images through the
implementation's own multi-crop augmentation, so data loading is excluded unless ``--data real``),
counts the model FLOPs of one more step with ``torch.utils.flop_counter`` and measures this
machine's dense matmul FLOP/s at the run's precision. Reported: images/s, the step split
(data / forward / backward / optimizer / EMA), peak memory, achieved FLOP/s as a fraction of the
matmul FLOP/s, and ours/baseline as the median over repeats of the ratio within each repeat.

The baseline exists for DINO only (lightly has no GLSD, SMD, FD); other methods get our numbers alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name, recipe, overrides, batch. Recipes that are not in this checkout (methods merged later) are skipped.
SUITE = [
    ("DINO ViT-S/16", "configs/dino_vit_small16.yaml", [], 8),
    ("DINO ViT-S/16 (reduced)", "configs/dino_vit_small16.yaml",
     ["model.img_size=112", "data.global_crop_size=112", "data.local_crop_size=48"], 8),
    ("GLSD Swin-T", "configs/glsd_swin_tiny.yaml", [], 8),
    ("SMD ResNet-18", "configs/smd_resnet18.yaml", [], 16),
    ("FD ViT-B/16", "configs/fd_vit_base16.yaml", [], 8),
]


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_child(impl: str, config: str, overrides: list[str], args: argparse.Namespace, workdir: Path) -> dict | None:
    out = workdir / f"{impl}_{time.monotonic_ns()}.json"
    common = ["--config", str(ROOT / config), *overrides]
    if impl == "selfdistill":
        cmd = [sys.executable, str(ROOT / "run_pretrain.py"), *common, "--benchmark", str(args.steps),
               "--benchmark-warmup", str(args.warmup), "--benchmark-data", args.data, "--benchmark-json", str(out)]
    else:
        style = impl.split("-", 1)[1]
        cmd = [sys.executable, str(ROOT / "benchmarks/lightly_dino.py"), *common, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--data", args.data, "--style", style, "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.threads), cwd=str(workdir),
                       timeout=args.timeout)
    if r.returncode != 0:
        print(f"  {impl} failed (exit {r.returncode}):\n{r.stderr[-3000:]}", file=sys.stderr, flush=True)
        return None
    report = json.loads(out.read_text())
    print(f"  {impl}: {report['images_per_s']:.3f} images/s, {report['images_per_cpu_s']:.3f} images/CPU-s, "
          f"{100 * report.get('flops_fraction', 0):.0f}% of matmul", flush=True)
    return report


def lightly_available() -> bool:
    r = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import lightly",
                        str(ROOT / ".bench-env")], capture_output=True, env=child_env(0))
    return r.returncode == 0


def median_report(runs: list[dict]) -> dict:
    """Medians over repeats of every number the table shows."""
    keys = ("images_per_s", "images_per_cpu_s", "step_s_median", "peak_memory_gib", "flops_per_step",
            "achieved_flops_per_s", "matmul_flops_per_s", "flops_fraction", "flops_fraction_cpu")
    med = {k: statistics.median(r[k] for r in runs) for k in keys if all(k in r for r in runs)}
    med["phases_s"] = {p: statistics.median(r["phases_s"][p] for r in runs) for p in runs[0]["phases_s"]}
    for k in ("impl", "method", "model", "crops", "batch", "precision", "threads", "device", "student_parameters"):
        med[k] = runs[0][k]
    med["repeats"] = len(runs)
    return med


def bench_recipe(name: str, config: str, overrides: list[str], batch: int, args: argparse.Namespace,
                 baselines: list[str], workdir: Path) -> list[dict]:
    rows = []
    for precision in args.precision:
        ov = [*overrides, f"train.batch_size_per_device={batch}", f"train.precision={precision}", *args.set]
        impls = ["selfdistill"] + baselines
        runs: dict[str, list[dict]] = {i: [] for i in impls}
        ratios: dict[str, list[float]] = {i: [] for i in baselines}
        cpu_ratios: dict[str, list[float]] = {i: [] for i in baselines}
        print(f"{name} {precision} batch {batch}:", flush=True)
        for rep in range(args.repeats):
            order = impls if rep % 2 == 0 else impls[::-1]  # alternate who runs first
            got = {impl: run_child(impl, config, ov, args, workdir) for impl in order}
            for impl, report in got.items():
                if report:
                    runs[impl].append(report)
            ours = got["selfdistill"]
            for b in baselines:
                if ours and got[b]:
                    ratios[b].append(ours["images_per_s"] / got[b]["images_per_s"])
                    cpu_ratios[b].append(ours["images_per_cpu_s"] / got[b]["images_per_cpu_s"])
        for impl in impls:
            if not runs[impl]:
                continue
            row = {"name": name, "config": config, "overrides": ov, **median_report(runs[impl]),
                   "runs": runs[impl]}
            if impl in ratios and ratios[impl]:
                row["baseline_of"] = "selfdistill"
                row["ours_over_this"] = statistics.median(ratios[impl])
                row["ours_over_this_cpu"] = statistics.median(cpu_ratios[impl])
                row["ours_over_this_runs"] = ratios[impl]
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| recipe | crops | batch | precision | implementation | images/s | ours / this | ours / this (CPU time) "
             "| step s | data | forward | backward | optimizer | EMA | peak GiB | GFLOP / step | % of matmul |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ph = r["phases_s"]
        ratio = f"{r['ours_over_this']:.2f}x" if "ours_over_this" in r else ""
        ratio_cpu = f"{r['ours_over_this_cpu']:.2f}x" if "ours_over_this_cpu" in r else ""
        frac = f"{100 * r['flops_fraction']:.0f}% ({100 * r['flops_fraction_cpu']:.0f}%)" if "flops_fraction" in r else ""
        lines.append(
            f"| {r['name']} | {r['crops']} | {r['batch']} | {r['precision']} | {r['impl']} | {r['images_per_s']:.3f} | "
            f"{ratio} | {ratio_cpu} | {r['step_s_median']:.2f} | " + " | ".join(
                f"{ph.get(p, 0.0):.2f}" for p in ("data", "forward", "backward", "optimizer", "ema")) +
            f" | {r['peak_memory_gib']:.2f} | {r['flops_per_step'] / 1e9:.0f} | {frac} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="one recipe (configs/*.yaml); or --suite")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides for --config")
    p.add_argument("--suite", action="store_true", help="the BENCHMARKS.md table: " + "; ".join(s[0] for s in SUITE))
    p.add_argument("--only", nargs="*", default=None, help="with --suite: only these recipe names")
    p.add_argument("--name", default=None, help="label of --config in the table")
    p.add_argument("--batch", type=int, default=8, help="per-device batch for --config")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per implementation (median reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of every run (0: default)")
    p.add_argument("--data", choices=["synthetic", "real"], default="synthetic")
    p.add_argument("--baseline", nargs="*", default=["docs", "batched"], choices=["docs", "batched"],
                   help="lightly training steps to compare with (none: ours alone)")
    p.add_argument("--set", nargs="*", default=[], metavar="section.key=value",
                   help="overrides for every recipe (e.g. train.compile=true)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--out", type=Path, default=None, help="write all runs and medians as JSON")
    args = p.parse_args(argv)
    if not args.suite and not args.config:
        p.error("give --config RECIPE or --suite")

    have_lightly = bool(args.baseline) and lightly_available()
    if args.baseline and not have_lightly:
        print("note: lightly is not installed (make bench-env); reporting our numbers alone", file=sys.stderr)
    recipes = SUITE if args.suite else [(args.name or Path(args.config).stem, args.config, args.overrides, args.batch)]
    if args.suite and args.only:
        recipes = [r for r in recipes if r[0] in args.only]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for name, config, overrides, batch in recipes:
            if not (ROOT / config).is_file():
                print(f"skipping {name}: {config} is not in this checkout", file=sys.stderr)
                continue
            method = _method_of(config, overrides)
            baselines = [f"lightly-{s}" for s in args.baseline] if have_lightly and method == "dino" else []
            rows += bench_recipe(name, config, overrides, batch, args, baselines, Path(tmp))
    import torch

    report = {"command": " ".join(["python benchmarks/train_throughput.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d"),
              "machine": {"platform": platform.platform(), "processor": _cpu_name(), "cpu_count": os.cpu_count(),
                          "torch": torch.__version__, "threads": args.threads},
              "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = args.out.with_name(args.out.name + ".tmp")
        tmp_out.write_text(json.dumps(report, indent=1) + "\n")
        os.replace(tmp_out, args.out)
    print(markdown(rows))
    return 0 if rows else 1


def _method_of(config: str, overrides: list[str]) -> str:
    import yaml

    name = (yaml.safe_load((ROOT / config).read_text()) or {}).get("method", {}).get("name", "dino")
    for o in overrides:
        if o.startswith("method.name="):
            name = o.split("=", 1)[1]
    return name


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
