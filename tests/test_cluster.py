"""Cluster operations: preemption (signal → the step finished, a checkpoint, exit 75), time-based
checkpoints, a rank killed under torchrun, the SLURM script, resuming on another rank count."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cluster_runs import (STEPS, assert_same_run, finish, logged_step, max_difference, rank_pids, rows,
                          torchrun, two_rank_overrides, wait_for)
from conftest import make_image_folder, run_training, tiny_overrides
from selfdistill.engine import checkpoint as ckpt
from selfdistill.engine.task import Hook
from selfdistill.engine.trainer import Preempted

ROOT = Path(__file__).resolve().parents[1]


class SignalAt(Hook):
    """Sends ``signum`` to this process when step ``step`` starts (as SLURM would, from outside)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum, self.sent = step, signum, False

    def on_step_start(self, loop) -> None:
        if loop.state.step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "img")


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_finishes_the_step_checkpoints_and_resumes_exactly(images, tmp_path, signum):
    from selfdistill.pretrain import pretraining
    from selfdistill.recipe import load_config

    full, cut = tmp_path / "full", tmp_path / "cut"
    run_training(images, full)
    config = load_config(None, tiny_overrides(images, cut))
    with pytest.raises(Preempted) as stopped:
        pretraining(config, hooks=[SignalAt(2, signum)]).fit()
    assert stopped.value.exit_code == 75 and stopped.value.step == 3  # step 3 was under way: finished
    assert ckpt.latest_checkpoint(cut) == ckpt.checkpoint_dir(cut, 3)
    event = rows(cut)[-1]
    assert event["event"] == "preempted" and event["signal"] == signal.Signals(signum).name and event["step"] == 3
    assert 0 < event["checkpoint_seconds_after_signal"] < 60
    assert signal.getsignal(signum) == signal.SIG_DFL  # the previous handler is back
    run_training(images, cut, resume="auto")
    assert_same_run(full, cut)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_checkpoint_every_minutes(images, tmp_path):
    out = tmp_path / "timed"
    run_training(images, out, **{"train.checkpoint_every_minutes": 1e-6, "train.keep_checkpoints": 100})
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(out)] == list(range(1, 9))


# -- the SLURM script's arguments, stand-in srun and scontrol (the real cluster: test_slurm_cluster.py) --
SLURM_SCRIPT = ROOT / "accelerate_configs" / "slurm_multinode.sh"
FAKE_SRUN = """#!/usr/bin/env bash
# stand-in srun: records its arguments (NUL-separated) and exits $FAKE_SRUN_RC; the step itself runs on
# the real cluster (tests/test_slurm_cluster.py)
printf '%s\\0' "$@" > "$FAKE_SLURM_LOG/srun.args"
exit "${FAKE_SRUN_RC:-0}"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
# stand-in scontrol: `show hostnames` gives this machine; everything is recorded
echo "$*" >> "$FAKE_SLURM_LOG/scontrol.log"
[ "$1 $2" = "show hostnames" ] && echo localhost
exit 0
"""


class Slurm:
    """A fake SLURM around ``slurm_multinode.sh``: stand-in ``srun``/``scontrol`` first in PATH."""

    def __init__(self, tmp: Path) -> None:
        self.log = tmp / "slurm_log"
        self.bin = tmp / "slurm_bin"
        self.log.mkdir(parents=True)
        self.bin.mkdir(parents=True)
        for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, PATH=f"{self.bin}:{os.environ['PATH']}", FAKE_SLURM_LOG=str(self.log),
                   SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1",
                   PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
        env.pop("WORLD_SIZE", None)
        return env

    def run(self, args: list[str], **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SLURM_SCRIPT), *args], cwd=ROOT, env=self.env(**extra),
                              capture_output=True, text=True, timeout=600)

    def srun_args(self) -> list[str]:
        return (self.log / "srun.args").read_text().split("\0")[:-1]

    def scontrol(self) -> list[str]:
        path = self.log / "scontrol.log"
        return path.read_text().splitlines() if path.is_file() else []


def test_slurm_script_passes_arguments_untouched_and_chooses_the_backend(tmp_path):
    slurm = Slurm(tmp_path)
    user_args = ["data.path=/d/shard-{000000..001281}.tar", "model.kwargs={depth: 4}", "optim.lr=5e-4"]
    r = slurm.run(["configs/demo.yaml", *user_args], FAKE_SRUN_RC="0")
    assert r.returncode == 0, r.stdout + r.stderr
    argv = slurm.srun_args()
    entry = argv.index("run_pretrain.py")
    # one argument each: the brace pattern is not expanded, the YAML dict is not split
    assert argv[entry + 1:] == ["--config", "configs/demo.yaml", *user_args, "--resume", "auto"]
    assert argv[0] == "--kill-on-bad-exit=1" and argv[1:4] == [sys.executable, "-m", "torch.distributed.run"]
    launcher = argv[:entry]
    for flag, value in (("--nnodes", "1"), ("--rdzv_backend", "c10d"), ("--rdzv_endpoint", "localhost:24242"),
                        ("--rdzv_id", "4242"), ("--max_restarts", "3")):
        assert launcher[launcher.index(flag) + 1] == value, flag
    assert "SIGUSR1" in launcher[launcher.index("--signals-to-handle") + 1]
    assert "DDP" in r.stdout and "show hostnames localhost" in slurm.scontrol()

    r = slurm.run(["--deepspeed", "ds_configs/zero2.json", "--gpus-per-node", "4", "--max-restarts", "1",
                   "configs/demo.yaml", "--resume", "runs/x"], FAKE_SRUN_RC="0")
    assert r.returncode == 0 and "DeepSpeed (ds_configs/zero2.json)" in r.stdout
    argv = slurm.srun_args()
    assert argv[argv.index("--nproc_per_node") + 1] == "4" and argv[argv.index("--max_restarts") + 1] == "1"
    assert argv[-2:] == ["--resume", "runs/x"]  # the user's --resume wins


@pytest.mark.parametrize("args, message", [
    (["--deepspeed"], "--deepspeed needs a JSON file"),
    (["--deepspeed", "nope.json", "configs/demo.yaml"], "DeepSpeed config nope.json not found"),
    (["--gpus", "8", "configs/demo.yaml"], "unknown option --gpus"),
    (["missing.yaml"], "recipe missing.yaml not found"),
    (["--max-restarts", "x", "configs/demo.yaml"], "expected a whole number, got 'x'"),
])
def test_slurm_script_refuses_bad_arguments(tmp_path, args, message):
    r = Slurm(tmp_path).run(args, FAKE_SRUN_RC="0")
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_slurm_script_requeues_on_exit_75_only(tmp_path):
    slurm = Slurm(tmp_path)
    r = slurm.run(["configs/demo.yaml"], FAKE_SRUN_RC="75")
    assert r.returncode == 0 and "requeue 4242" in slurm.scontrol()
    slurm = Slurm(tmp_path / "failed")
    r = slurm.run(["configs/demo.yaml"], FAKE_SRUN_RC="1")
    assert r.returncode == 1 and not any(line.startswith("requeue") for line in slurm.scontrol())


# -- two gloo ranks under torchrun and the SLURM script (slow) -----------------------------------
@pytest.mark.slow
def test_sigterm_to_every_process_of_the_job(two_rank_run, tmp_path):
    """SIGTERM to the launcher, the ranks and their loader workers at once (what slurmstepd does):
    loader workers must not die under the step the ranks finish before their checkpoint."""
    images, uninterrupted = two_rank_run
    out = tmp_path / "terminated"
    job = torchrun(images, out, **{"data.num_workers": 1})
    wait_for(lambda: logged_step(out) >= 2, "step 2", job)
    os.killpg(job.pid, signal.SIGTERM)
    rc, output = finish(job)
    assert rc != 0 and "stopped after step" in output, output[-4000:]
    assert "exited unexpectedly" not in output and "killed by signal" not in output, output[-4000:]
    step = rows(out)[-1]["step"]
    assert rows(out)[-1]["event"] == "preempted" and ckpt.latest_checkpoint(out) == ckpt.checkpoint_dir(out, step)
    rc, output = finish(torchrun(images, out, **{"data.num_workers": 1}))
    assert rc == 0, output[-4000:]
    assert_same_run(uninterrupted, out)


EXITS_WITH_LOADER_OPEN = """
import torch
from torch.utils.data import DataLoader
from selfdistill.data.sources import loader_worker_init

batches = iter(DataLoader(torch.arange(64), batch_size=4, num_workers=2, worker_init_fn=loader_worker_init))
next(batches)
raise RuntimeError("a peer rank died")
"""


def test_a_failing_rank_exits_at_once_with_its_loader_workers():
    """The workers ignore SIGTERM; a rank that fails with a loader open (a peer died) must not wait
    for them at exit (torchrun would kill it only after its shutdown timeout, and restart late)."""
    done = subprocess.run([sys.executable, "-c", EXITS_WITH_LOADER_OPEN], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "a peer rank died" in done.stderr


# -- resuming on another batch layout --------------------------------------------------------------
def test_resume_plan_keeps_the_global_batch_or_says_how():
    from selfdistill.engine.elastic import Layout, plan_resume

    state = {"step": 7, "epoch": 1, "batch_in_epoch": 6, "world_size": 2}  # 3 steps into epoch 1 (4 per epoch)
    two, one = Layout(2, 8, 2), Layout(1, 16, 2)
    assert plan_resume(state, two, two, 4) == (state, None)
    moved, said = plan_resume(state, two, Layout(4, 8, 1), 4)
    assert moved["batch_in_epoch"] == 3 and moved["step"] == 7 and "the same images in every step" in said
    assert plan_resume(state, two, one, 4)[0]["batch_in_epoch"] == 6
    with pytest.raises(ValueError) as refused:
        plan_resume(state, two, Layout(1, 8, 1), 4)
    message = str(refused.value)
    assert "global batch 32 (8 per device x 2 ranks x 2 accumulation)" in message
    assert "global batch 8 (8 per device x 1 ranks x 1 accumulation)" in message
    assert "train.batch_size_per_device=32 train.grad_accum_steps=1" in message and "--resume-elastic" in message
    # elastic: 3 steps x 32 = 96 images of epoch 1 trained; a global batch of 40 continues at its 2nd step
    moved, said = plan_resume(state, two, Layout(1, 40, 1), 3, elastic=True)
    assert (moved["step"], moved["batch_in_epoch"], moved["epoch"]) == (1 * 3 + 2, 2, 1)
    assert "the last 16 of them trained again" in said
    with pytest.raises(ValueError, match="inside an accumulation window"):
        plan_resume({**state, "batch_in_epoch": 5}, two, one, 4)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_resume_with_another_global_batch_is_refused_unless_elastic(images, tmp_path):
    from selfdistill.pretrain import pretraining
    from selfdistill.recipe import load_config

    out = tmp_path / "run"
    run_training(images, out, **{"train.max_steps": 3})  # 32 images, batch 8: 3 of 4 steps of epoch 0
    config = load_config(None, tiny_overrides(images, out, **{"train.batch_size_per_device": 16}))
    with pytest.raises(ValueError, match=r"global batch 8 .*; this run has global batch 16 .*--resume-elastic"):
        pretraining(config, resume="auto").fit()
    assert ckpt.latest_checkpoint(out) == ckpt.checkpoint_dir(out, 3)  # nothing loaded, nothing written
    pretraining(config, resume="auto", resume_elastic=True).fit()
    resumed = [r for r in rows(out) if r.get("event") == "resumed"]
    assert resumed[-1]["step"] == 1 and "--resume-elastic" in resumed[-1]["layout_change"]  # 24 images = 1 x 16
    assert [r["step"] for r in rows(out) if "loss" in r][-3:] == [2, 3, 4]  # 2 epochs of 2 steps of 16


def summary_indices(out: Path, rank: int) -> list[int]:
    return json.loads((out / f"rank_summary_{rank}.json").read_text())["indices_seen"]


@pytest.mark.slow
def test_ddp_run_moves_from_two_ranks_to_one_and_back(two_rank_run, tmp_path):
    """2 ranks x 8 for 3 steps, 1 rank x 16 for 3 steps (across an epoch end), 2 ranks x 8 to the end:
    every step trains the uninterrupted run's images; losses and teacher differ only by the order
    of float sums (one rank adds 16 gradients, two ranks average two sums of 8)."""
    images, uninterrupted = two_rank_run
    out = tmp_path / "elastic"
    rc, output = finish(torchrun(images, out, **{"train.max_steps": 3}))
    assert rc == 0, output[-4000:]
    rc, output = finish(torchrun(images, out, ranks=1, **{"train.max_steps": 6, "train.batch_size_per_device": 16}))
    assert rc == 0, output[-4000:]
    one_rank = summary_indices(out, 0)
    rc, output = finish(torchrun(images, out))
    assert rc == 0, output[-4000:]

    full = [summary_indices(uninterrupted, r) for r in (0, 1)]
    for j, step in enumerate(range(3, 6)):  # the one-rank steps: the same images as the two ranks'
        assert sorted(one_rank[16 * j:16 * (j + 1)]) == sorted(full[0][8 * step:8 * (step + 1)] +
                                                             full[1][8 * step:8 * (step + 1)]), step
    for r in (0, 1):  # back on two ranks: each rank its own images again
        assert summary_indices(out, r) == full[r][8 * 6:]
    changes = [r["layout_change"] for r in rows(out) if r.get("event") == "resumed"]
    assert len(changes) == 2 and all("the same images in every step" in c for c in changes)
    loss_diff, teacher_diff = max_difference(uninterrupted, out)
    print(f"2 -> 1 -> 2 ranks (DDP): largest loss difference {loss_diff:.2e}, teacher {teacher_diff:.2e}")
    assert loss_diff < 1e-5 and teacher_diff < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_checkpoint_resumes_on_one_rank(two_rank_run, tmp_path, stage):
    """A ZeRO checkpoint of 2 ranks goes on under 1 rank x 16 through DeepSpeed's universal checkpoint
    (converted once, automatically), and ends with DDP's uninterrupted losses and teacher."""
    images, uninterrupted = two_rank_run
    out = tmp_path / f"zero{stage}"
    rc, output = finish(torchrun(images, out, deepspeed=f"zero{stage}", **{"train.max_steps": 3}))
    assert rc == 0, output[-4000:]
    rc, output = finish(torchrun(images, out, ranks=1, deepspeed=f"zero{stage}",
                                 **{"train.batch_size_per_device": 16}))
    assert rc == 0, output[-4000:]
    assert (ckpt.checkpoint_dir(out, 3) / "universal" / "pytorch_model" / "zero").is_dir()
    assert "the same images in every step" in [r for r in rows(out) if r.get("event") == "resumed"][0]["layout_change"]
    loss_diff, teacher_diff = max_difference(uninterrupted, out)
    print(f"ZeRO-{stage} 2 -> 1 ranks: largest loss difference {loss_diff:.2e}, teacher {teacher_diff:.2e}")
    assert loss_diff < 1e-5 and teacher_diff < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("signum, launcher_exit", [(signal.SIGUSR1, -signal.SIGUSR1), (signal.SIGTERM, 143)])
def test_a_signal_to_accelerate_launch_leaves_no_rank_running(two_rank_run, tmp_path, signum, launcher_exit):
    """The README's `accelerate launch` line in a user's own batch script, signalled as a scheduler
    signals a step (the launcher's process group). Accelerate's launcher does not handle SIGUSR1 (it
    dies, 138) and exits 143 on SIGTERM; torchrun starts the ranks in sessions of their own, so the
    signal never reaches them. They must still checkpoint and stop, not train on as orphans, and the
    run goes on with --resume auto to the uninterrupted run's end."""
    images, uninterrupted = two_rank_run
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    job = subprocess.Popen([accelerate, "launch", "--num_processes", "2", str(ROOT / "run_pretrain.py"),
                            *two_rank_overrides(images, out), "--resume", "auto"], env=env, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(lambda: logged_step(out) >= 2, "step 2", job)
    os.killpg(job.pid, signum)
    job.wait(timeout=60)
    assert job.returncode == launcher_exit  # killed by SIGUSR1 (a shell says 138) / sys.exit(143)
    wait_for(lambda: not rank_pids(str(out)), "the ranks to stop", timeout=60)
    rc, output = finish(job, timeout=60)
    event = rows(out)[-1]
    # SIGTERM: the kernel's, when the ranks' torchrun died with the launcher (or torchrun's, forwarded)
    assert event["event"] == "preempted" and event["signal"] == "SIGTERM" and 2 <= event["step"] < STEPS, \
        output[-4000:]
    assert ckpt.latest_checkpoint(out) == ckpt.checkpoint_dir(out, event["step"])
    if signum == signal.SIGTERM:
        return  # resuming a preemption checkpoint exactly is tested above; USR1's is the new path
    rc, output = finish(torchrun(images, out))
    assert rc == 0, output[-4000:]
    assert_same_run(uninterrupted, out)
