"""Training throughput of a recipe, ours against an independent baseline (lightly), in one run.

    make bench-env                       # once: lightly into .bench-env/ (torch untouched)
    python benchmarks/train_throughput.py --suite --out benchmarks/results/train_cpu.json
    python benchmarks/train_throughput.py --config configs/dino_vit_small16.yaml --batch 8 --precision fp32

For each recipe and precision, every repeat starts the project (``run_pretrain.py --benchmark``,
the real ``Trainer``) and the baselines (``benchmarks/lightly_dino.py``) as fresh processes, side
by side, and drives them in lock-step: one optimizer step of one, then one of the next, the order
alternating from step to step, so step k of every implementation ran under the same machine load
(the others wait idle meanwhile). Each process runs ``--warmup`` untimed steps and ``--steps``
timed ones on one synthetic batch (random images through the implementation's own multi-crop
augmentation, so data loading is excluded unless ``--data real``), then, alone, counts the model
FLOPs of one more step with ``torch.utils.flop_counter`` and measures this machine's dense matmul
FLOP/s at the run's precision. Reported: images/s, the step split (data / forward / backward /
optimizer / EMA), peak memory, achieved FLOP/s as a fraction of the matmul FLOP/s (medians over
repeats), and ours/baseline as the median over all timed steps of the ratio of step times of
back-to-back steps (by wall time, and by process CPU time).

The baseline exists for DINO only (lightly has no GLSD, SMD, FD); other methods get our numbers alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's selfdistill, as the child processes get it

# name, recipe, overrides, batch, precisions (bf16 only where a CPU run stays short: this CPU has no
# native bf16, its bf16 matmuls run ~6x slower than fp32). Recipes not in this checkout are skipped.
REDUCED = ["model.img_size=112", "data.global_crop_size=112", "data.local_crop_size=48"]
SUITE = [
    ("DINO ViT-S/16", "configs/dino_vit_small16.yaml", [], 8, ["fp32"]),
    ("DINO ViT-S/16 (reduced)", "configs/dino_vit_small16.yaml", REDUCED, 8, ["fp32", "bf16"]),
    ("GLSD Swin-T", "configs/glsd_swin_tiny.yaml", [], 8, ["fp32"]),
    ("DINOv2 ViT-S/14 (reduced)", "configs/dinov2_vit_small14.yaml",
     ["model.img_size=112", "data.global_crop_size=112", "data.local_crop_size=56"], 8, ["fp32"]),
    ("SMD ResNet-50 -> ResNet-18", "configs/smd_r50_r18.yaml", [], 8, ["fp32"]),
    ("FD ViT-B/16 (DINO teacher)", "configs/fd_dino_vit_base16.yaml", [], 4, ["fp32"]),
]


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


class Child:
    """One implementation in its own process, driven step by step through two pipes (the
    ``SELFDISTILL_BENCH_GATE`` protocol of ``selfdistill.engine.throughput``)."""

    def __init__(self, impl: str, config: str, overrides: list[str], args: argparse.Namespace, workdir: Path) -> None:
        from selfdistill.engine.throughput import GATE_ENV

        self.impl, self.timeout = impl, args.timeout
        tag = f"{impl.split('@')[0]}_{time.monotonic_ns()}"
        self.out, self.log = workdir / f"{tag}.json", workdir / f"{tag}.log"
        common = ["--config", str(ROOT / config), *overrides]
        env = child_env(args.threads)
        if impl.startswith("selfdistill"):
            # "selfdistill@DIR": another checkout of the project (--against), with its own code
            checkout = Path(impl.split("@", 1)[1]) if "@" in impl else ROOT
            env["PYTHONPATH"] = os.pathsep.join([str(checkout / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
            cmd = [sys.executable, str(checkout / "run_pretrain.py"), *common, "--benchmark", str(args.steps),
                   "--benchmark-warmup", str(args.warmup), "--benchmark-data", args.data,
                   "--benchmark-json", str(self.out)]
        else:
            cmd = [sys.executable, str(ROOT / "benchmarks/lightly_dino.py"), *common, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--data", args.data, "--style", impl.split("-", 1)[1],
                   "--json", str(self.out)]
        go_r, self.go_w = os.pipe()
        self.ready_r, ready_w = os.pipe()
        env[GATE_ENV] = f"{go_r},{ready_w}"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, cwd=str(workdir), stdout=log, stderr=subprocess.STDOUT,
                                         pass_fds=(go_r, ready_w))
        os.close(go_r)
        os.close(ready_w)
        self.alive = True

    def wait_ready(self) -> bool:
        """Block until the process is at its next gate (its previous step done)."""
        if self.alive:
            ready, _, _ = select.select([self.ready_r], [], [], self.timeout)
            if not ready or os.read(self.ready_r, 1) != b"r":
                self.fail("stopped" if ready else f"no step within {self.timeout} s")
        return self.alive

    def go(self) -> None:
        if self.alive:
            try:
                os.write(self.go_w, b"g")
            except BrokenPipeError:
                self.fail("went away")

    def finish(self) -> dict | None:
        """Let it count FLOPs, measure the matmul rate and write its report."""
        self.go()
        try:
            code = self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = -9
        for fd in (self.go_w, self.ready_r):
            os.close(fd)
        if self.alive and code != 0:
            self.fail(f"exit {code}")
        if not self.alive:
            return None
        report = json.loads(self.out.read_text())
        print(f"  {self.impl}: {report['images_per_s']:.3f} images/s, {report['images_per_cpu_s']:.3f} images/CPU-s, "
              f"{100 * report.get('flops_fraction', 0):.0f}% of matmul", flush=True)
        return report

    def fail(self, why: str) -> None:
        if self.alive:
            self.alive = False
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            tail = self.log.read_text()[-3000:] if self.log.is_file() else ""
            print(f"  {self.impl} failed ({why}):\n{tail}", file=sys.stderr, flush=True)


def run_lockstep(impls: list[str], config: str, overrides: list[str], args: argparse.Namespace, workdir: Path,
                 first: int) -> dict[str, dict | None]:
    """All implementations built side by side, then driven one step at a time, alternately (who
    goes first alternates from step to step): step k of each ran under the same machine load."""
    children = [Child(impl, config, overrides, args, workdir) for impl in impls]
    try:
        for c in children:
            c.wait_ready()
        for k in range(args.warmup + args.steps):
            order = children if (k + first) % 2 == 0 else children[::-1]
            for c in order:
                c.go()
                c.wait_ready()
        return {c.impl: c.finish() for c in children}  # one after the other: FLOPs and matmul rate alone
    finally:
        for c in children:
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait()


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


def bench_recipe(name: str, config: str, overrides: list[str], batch: int, precisions: list[str],
                 args: argparse.Namespace, baselines: list[str], workdir: Path) -> list[dict]:
    rows = []
    for precision in precisions:
        ov = [*overrides, f"train.batch_size_per_device={batch}", f"train.precision={precision}", *args.set]
        impls = ["selfdistill"] + baselines
        runs: dict[str, list[dict]] = {i: [] for i in impls}
        ratios: dict[str, list[float]] = {i: [] for i in baselines}
        cpu_ratios: dict[str, list[float]] = {i: [] for i in baselines}
        effective = [o.split("=", 1)[1] for o in ov if o.startswith("train.batch_size_per_device=")][-1]
        print(f"{name} {precision} batch {effective}:", flush=True)  # --set may override the table's batch
        for rep in range(args.repeats):
            got = run_lockstep(impls, config, ov, args, workdir, first=rep)
            for impl, report in got.items():
                if report:
                    runs[impl].append(report)
            ours = got["selfdistill"]
            for b in baselines:
                if ours and got[b]:  # per step: step k of both ran back to back
                    ratios[b] += [tb / to for to, tb in zip(ours["step_s"], got[b]["step_s"])]
                    cpu_ratios[b] += [tb / to for to, tb in zip(ours["step_cpu_s"], got[b]["step_cpu_s"])]
        for impl in impls:
            if not runs[impl]:
                continue
            row = {"name": name, "config": config, "overrides": ov, **median_report(runs[impl]),
                   "impl": impl, "runs": runs[impl]}
            if impl in ratios and ratios[impl]:
                row["baseline_of"] = "selfdistill"
                row["ours_over_this"] = statistics.median(ratios[impl])
                row["ours_over_this_cpu"] = statistics.median(cpu_ratios[impl])
                row["ours_over_this_steps"] = ratios[impl]
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
    p.add_argument("--precision", nargs="+", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default: fp32 and bf16 for --config; the table's own precisions for --suite")
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
    p.add_argument("--against", nargs="*", default=[], metavar="CHECKOUT",
                   help="other checkouts of this project (e.g. a worktree of the commit before a change) driven in "
                        "lock-step as more implementations: a refactor's speed, side by side")
    p.add_argument("--out", type=Path, default=None, help="write all runs and medians as JSON")
    args = p.parse_args(argv)
    if not args.suite and not args.config:
        p.error("give --config RECIPE or --suite")

    have_lightly = bool(args.baseline) and lightly_available()
    if args.baseline and not have_lightly:
        print("note: lightly is not installed (make bench-env); reporting our numbers alone", file=sys.stderr)
    recipes = SUITE if args.suite else [(args.name or Path(args.config).stem, args.config, args.overrides, args.batch,
                                         ["fp32", "bf16"])]
    if args.suite and args.only:
        recipes = [r for r in recipes if r[0] in args.only]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for name, config, overrides, batch, precisions in recipes:
            if not (ROOT / config).is_file():
                print(f"skipping {name}: {config} is not in this checkout", file=sys.stderr)
                continue
            method = _method_of(config, overrides)
            overrides = [*overrides, *random_teacher(config, overrides, Path(tmp))]
            baselines = [f"lightly-{s}" for s in args.baseline] if have_lightly and method == "dino" else []
            baselines += [f"selfdistill@{Path(d).resolve()}" for d in args.against]
            rows += bench_recipe(name, config, overrides, batch, args.precision or precisions, args, baselines,
                                 Path(tmp))
    import torch

    report = {"command": " ".join(["python benchmarks/train_throughput.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d"),
              "machine": {"platform": platform.platform(), "processor": _cpu_name(), "cpu_count": os.cpu_count(),
                          "torch": torch.__version__, "threads": args.threads},
              "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        from selfdistill.atomic import write_json_atomic

        write_json_atomic(args.out, report, indent=1)
    print(markdown(rows))
    return 0 if rows else 1


def random_teacher(config: str, overrides: list[str], workdir: Path) -> list[str]:
    """Recipes that distil a frozen teacher name a weights file the benchmark machine need not have;
    speed does not depend on the values, so the teacher gets randomly initialised weights (timm format)."""
    import yaml

    method = (yaml.safe_load((ROOT / config).read_text()) or {}).get("method", {})
    if "teacher_weights" not in method or any(o.startswith("method.teacher_weights=") for o in overrides):
        return []
    import torch
    from safetensors.torch import save_file

    from selfdistill.models import create_timm_model

    name, kwargs = method["teacher_model"], method.get("teacher_kwargs") or {}
    path = workdir / f"random_{name}.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        save_file({k: v.contiguous() for k, v in create_timm_model(name, **kwargs).state_dict().items()}, str(path))
    return [f"method.teacher_weights={path}", "method.teacher_format=timm"]


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
