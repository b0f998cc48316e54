"""Multi-process runs shared by the cluster tests: the tiny recipe on 2 gloo ranks under torchrun,
the uninterrupted reference, and comparisons of two runs' ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import ROOT, logged_losses, tiny_overrides
from selfdistill.engine import checkpoint as ckpt


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def final_state(out: Path) -> tuple[dict, dict]:
    last = ckpt.latest_checkpoint(out)
    return ckpt.student_state(last), ckpt.load_task_state(last)


def assert_same_run(a: Path, b: Path) -> None:
    (s_a, m_a), (s_b, m_b) = final_state(a), final_state(b)
    assert s_a.keys() == s_b.keys()
    for k in s_a:
        assert torch.equal(s_a[k], s_b[k]), k
    for k in m_a["teacher"]:
        assert torch.equal(m_a["teacher"][k], m_b["teacher"][k]), k
    assert logged_losses(a) == logged_losses(b)


STEPS = 12  # 64 images, 2 ranks x 8: 4 optimizer steps per epoch, 3 epochs


def two_rank_overrides(images: Path, out: Path, **extra) -> list[str]:
    """No drop path: a step's result then depends on its images only, not on how they are dealt."""
    return tiny_overrides(images, out, **{"train.epochs": 3, "model.drop_path_rate": 0.0, **extra})


def torchrun(images: Path, out: Path, *args: str, ranks: int = 2,
             deepspeed: str | None = None, **extra) -> subprocess.Popen:
    """gloo ranks of run_pretrain.py under torchrun, USR1 forwarded to the ranks as the script does;
    ``deepspeed``: a ds_configs/ name, set the way the SLURM script sets it."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    if deepspeed:
        env.update(ACCELERATE_USE_DEEPSPEED="true",
                   ACCELERATE_DEEPSPEED_CONFIG_FILE=str(ROOT / f"ds_configs/{deepspeed}.json"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", str(ROOT / "run_pretrain.py"),
           *two_rank_overrides(images, out, **extra), "--resume", "auto", *args]
    return subprocess.Popen(cmd, env=env, cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # every launch here starts a session of its own
        output, _ = proc.communicate()
        raise AssertionError(f"still running after {timeout} s:\n{output[-6000:]}") from None
    return proc.returncode, output


def wait_for(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{proc.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def logged_step(out: Path) -> int:
    path = out / "log.jsonl"
    if not path.is_file():
        return 0
    return max((json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()),
               default=0)


def rank_pids(marker: str) -> dict[int, int]:
    """Training processes (not their launcher, not loader workers) whose command line holds ``marker``."""
    found: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
        except (OSError, ValueError):
            continue
        text = [a.decode(errors="replace") for a in argv]
        if any(marker in a for a in text) and any(a.endswith("run_pretrain.py") for a in text) and \
                "torch.distributed.run" not in text and b"RANK" in env:
            rank, pid = int(env[b"RANK"]), int(proc.name)
            found[rank] = min(pid, found.get(rank, pid))  # a loader worker is forked later: larger pid
    return found


def max_difference(a: Path, b: Path) -> tuple[float, float]:
    """Largest difference of the logged losses (step by step) and of the final teachers."""
    la, lb = logged_losses(a), logged_losses(b)
    assert len(la) == len(lb) == STEPS
    teacher_a, teacher_b = final_state(a)[1]["teacher"], final_state(b)[1]["teacher"]
    loss_diff = max(abs(x - y) for x, y in zip(la, lb))
    teacher_diff = max((teacher_a[k].float() - teacher_b[k].float()).abs().max().item() for k in teacher_a)
    return loss_diff, teacher_diff
