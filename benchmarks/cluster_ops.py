"""What preemption and a dead rank cost: 2 gloo ranks of ``run_pretrain.py`` under torchrun (as the
SLURM script starts them), a small ViT on a generated image folder.

    python benchmarks/cluster_ops.py --out benchmarks/results/cluster_ops_cpu.json

* preemption: SIGUSR1 to torchrun at a random step; measured from the signal to the checkpoint
  (the run's ``preempted`` event) and to the exit of the whole job, and the steps lost (the
  checkpoint's step against the last step logged before the signal); also the time from the launch
  to the first step, the floor of any restart;
* a dead rank: ``kill -9`` of rank 1 under ``--max_restarts 1`` with a checkpoint every
  ``--checkpoint-every`` steps; measured: the steps trained again (last logged before the kill
  minus the step resumed from) and the time from the kill to the first step after the restart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from selfdistill.atomic import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ["model.name=vit_tiny_patch16_224", "model.img_size=32", "model.patch_size=8", "model.drop_path_rate=0.0",
          "model.kwargs={depth: 4}", "method.out_dim=1024", "data.global_crop_size=32", "data.local_crop_size=16",
          "data.n_local_crops=4", "data.num_workers=1", "train.batch_size_per_device=32", "train.log_every=1",
          "train.trackers=[]", "train.progress_bar=false", "optim.warmup_epochs=1"]


def make_images(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n // 2):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i:04d}.png")
    return root


def rows(out: Path) -> list[dict]:
    path = out / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def last_step(out: Path) -> int:
    return max((r.get("step", 0) for r in rows(out) if "loss" in r), default=0)


def launch(images: Path, out: Path, *extra: str, restarts: int = 0) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max_restarts", str(restarts), "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
           str(ROOT / "run_pretrain.py"), *RECIPE, f"data.path={images}", f"train.output_dir={out}", *extra,
           "--resume", "auto"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_until(condition, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the run ended or stalled before the point of measurement")
        time.sleep(0.01)


def rank_pid(out: Path, rank: int) -> int:
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"train.output_dir={out}".encode() in argv and b"torch.distributed.run" not in argv and \
                f"RANK={rank}".encode() in env:
            return int(proc.name)  # the first in /proc order: the rank, not a later loader worker
    raise RuntimeError(f"rank {rank} not found")


def preemption_trial(images: Path, out: Path, at_step: int) -> dict:
    started = time.monotonic()
    job = launch(images, out, "train.epochs=4")
    wait_until(lambda: last_step(out) >= 1, job)
    first_step = time.monotonic() - started  # what any restart costs at least: processes, model, first step
    wait_until(lambda: last_step(out) >= at_step, job)
    logged = last_step(out)
    t0 = time.monotonic()
    job.send_signal(signal.SIGUSR1)
    job.wait()
    exited = time.monotonic() - t0
    event = rows(out)[-1]
    assert event.get("event") == "preempted", event
    return {"signal_after_step": logged, "checkpoint_step": event["step"], "steps_lost": 0,
            "signal_to_checkpoint_s": event["checkpoint_seconds_after_signal"], "signal_to_exit_s": round(exited, 3),
            "launch_to_first_step_s": round(first_step, 3)}


def kill_trial(images: Path, out: Path, every: int, at_step: int) -> dict:
    job = launch(images, out, "train.epochs=4", f"train.checkpoint_every={every}", restarts=1)
    wait_until(lambda: last_step(out) >= at_step, job)
    killed_after = last_step(out)
    t0 = time.monotonic()
    os.kill(rank_pid(out, 1), signal.SIGKILL)
    wait_until(lambda: any(r.get("event") == "resumed" for r in rows(out)), job)
    resumed = next(r for r in rows(out) if r.get("event") == "resumed")
    wait_until(lambda: last_step(out) > resumed["step"], job)
    back = time.monotonic() - t0
    job.wait()
    return {"killed_after_step": killed_after, "resumed_from_step": resumed["step"],
            "steps_lost": killed_after - resumed["step"], "kill_to_next_step_s": round(back, 3),
            "finished": job.returncode == 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/cluster_ops_cpu.json")
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        images = make_images(Path(tmp) / "img", 512)  # 8 steps per epoch
        preempt = [preemption_trial(images, Path(tmp) / f"p{i}", rng.randint(2, 20)) for i in range(args.trials)]
        kills = [kill_trial(images, Path(tmp) / f"k{i}", args.checkpoint_every, rng.randint(6, 20))
                 for i in range(args.trials)]
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "command": " ".join(sys.argv), "ranks": 2, "backend": "gloo (CPU)",
              "recipe": RECIPE, "preemption": preempt, "rank_killed": kills}
    for name, trials in (("preemption", preempt), ("rank killed", kills)):
        print(name)
        for t in trials:
            print("  " + ", ".join(f"{k}={v}" for k, v in t.items()))
    write_json_atomic(args.out, report, indent=1)


if __name__ == "__main__":
    main()
