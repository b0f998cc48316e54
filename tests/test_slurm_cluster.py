"""The documented SLURM lines on a real two-node cluster (tests/slurm_cluster.py: slurmctld, two slurmd
in network namespaces of their own, munge), each ending compared with the uninterrupted run of the
same recipe on 2 local ranks (conftest ``two_rank_run``)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest

from cluster_runs import (STEPS, assert_same_run, finish, logged_step, max_difference, rank_pids, rows,
                          two_rank_overrides)
from conftest import ROOT
from selfdistill.engine import checkpoint as ckpt
from slurm_cluster import Cluster, alive

pytestmark = pytest.mark.slow
SCRIPT = ROOT / "accelerate_configs" / "slurm_multinode.sh"


def submit(cluster: Cluster, images: Path, out: Path, *options: str, script: Path = SCRIPT, nodes: int = 2,
           ranks: int = 1, sbatch: tuple[str, ...] = (), **overrides) -> int:
    """``sbatch --nodes=2 [sbatch] slurm_multinode.sh [options] recipe overrides`` from the repository
    root, ``ranks`` per node (this cluster has no GPUs: ``--gpus-per-node=0`` overrides the script's 8)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe = out.parent / "recipe.yaml"
    recipe.write_text("train: {epochs: 3}\n")
    return cluster.sbatch(f"--nodes={nodes}", "--cpus-per-task=1", "--gpus-per-node=0", *sbatch,
                          f"--output={out.parent}/job-%j.out", str(script), "--gpus-per-node", str(ranks), *options,
                          str(recipe),
                          *two_rank_overrides(images, out, **overrides), cwd=ROOT, PYTHON=sys.executable,
                          OMP_NUM_THREADS="1")


def job_output(out: Path, job: int) -> str:
    path = out.parent / f"job-{job}.out"
    return path.read_text(errors="replace") if path.is_file() else ""


def test_two_nodes_train_as_two_local_ranks(slurm_cluster, two_rank_run, tmp_path):
    """sbatch --nodes=2 slurm_multinode.sh: one torchrun per node, c10d rendezvous on n1, gloo between
    the two namespaces; the run ends bit-for-bit where the 2-rank run on one machine ends."""
    images, uninterrupted = two_rank_run
    out = tmp_path / "ddp"
    job = submit(slurm_cluster, images, out)
    info = slurm_cluster.wait_job(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), start_now=False)
    assert info["JobState"] == "COMPLETED", job_output(out, job)[-4000:]
    assert info["NodeList"] == "n[1-2]"
    launch = json.loads((out / "provenance.json").read_text())[0]
    assert launch["world_size"] == 2 and launch["env"]["SLURM_JOB_ID"] == str(job), launch
    assert {h: sorted(r) for h, r in launch["hosts"].items()} == {"n1": [0], "n2": [1]}, launch["hosts"]
    assert_same_run(uninterrupted, out)


FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def scancel_usr1(cluster: Cluster, job: int, out: Path) -> None:
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))


def check_preemption(cluster: Cluster, images: Path, uninterrupted: Path, out: Path, script: Path = SCRIPT) -> float:
    """SLURM's early warning by hand (``scancel --signal=USR1 --batch``: the batch shell only, as
    ``--signal=B:USR1@N`` does): the script passes USR1 through srun and torchrun, both nodes' ranks
    finish the same step, checkpoint and exit 75, the script requeues the job, the job starts again
    with --resume auto and ends bit-for-bit where the uninterrupted run ends. Returns the seconds from
    the signal to the job pending again."""
    job = submit(cluster, images, out, script=script)
    try:
        return _preempt(cluster, job, uninterrupted, out)
    finally:  # a failed check must not leave its job holding the nodes
        cluster.run("scancel", str(job), check=False)


def launches(out: Path) -> list[dict]:
    path = out / "provenance.json"
    return json.loads(path.read_text()) if path.is_file() else []


def wait_for_step(cluster: Cluster, job: int, out: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while logged_step(out) < step:
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), job_output(out, job)[-4000:]
        assert time.monotonic() < deadline, f"no step {step} after {timeout} s: " + job_output(out, job)[-4000:]
        time.sleep(0.05)


def _preempt(cluster: Cluster, job: int, uninterrupted: Path, out: Path, send_usr1=scancel_usr1,
             on_requeue=lambda: None, ranks: int = 2) -> float:
    """``send_usr1(cluster, job, out)`` once the run is at step 2; ``on_requeue()`` while the
    requeued job is pending."""
    wait_for_step(cluster, job, out, 2)
    send_usr1(cluster, job, out)
    signalled = time.monotonic()
    requeued = cluster.wait_job(job, ("PENDING",) + FINAL, start_now=False)
    seconds = time.monotonic() - signalled
    assert requeued["JobState"] == "PENDING" and requeued["Restarts"] == "1", (requeued, job_output(out, job)[-4000:])
    on_requeue()
    stops = [r for r in rows(out) if r.get("event") == "preempted"]
    assert len(stops) == 1 and stops[0]["signal"] == "SIGUSR1", stops
    step = stops[0]["step"]
    assert 2 <= step < STEPS and ckpt.checkpoint_dir(out, step).is_dir()
    deadline = time.monotonic() + 120
    while len(launches(out)) < 2:  # the requeued job (started now, not after the ~2 min it would wait)
        state = cluster.wait_job(job, ("RUNNING",) + FINAL)["JobState"]
        assert state == "RUNNING" or len(launches(out)) == 2, f"the requeued job ended {state} without a launch: " + \
            job_output(out, job)[-4000:]
        assert time.monotonic() < deadline, "the requeued job did not start training in 120 s"
        time.sleep(0.1)
    assert launches(out)[1]["step"] == step, f"the requeued job did not resume from step {step}: {launches(out)[1]}"
    info = cluster.wait_job(job, FINAL)
    output = job_output(out, job)
    assert info["JobState"] == "COMPLETED", output[-4000:]
    # both nodes' ranks stopped (exit 75); torchrun itself exits 1 after a signal it forwarded, and srun
    # reports the other node's launcher as terminated: the script requeues because it was signalled
    assert output.count(f"SIGUSR1: stopped after step {step}") == ranks, output[-4000:]
    assert f"requeueing job {job} (exit code" in output, output[-4000:]
    resumed = [r for r in rows(out) if r.get("event") == "resumed"]
    assert [r["step"] for r in resumed] == [step], resumed
    first, second = launches(out)
    assert first["step"] == 0 and "SLURM_RESTART_COUNT" not in first["env"]
    assert second["env"]["SLURM_RESTART_COUNT"] == "1"
    assert_same_run(uninterrupted, out)
    return seconds


def test_preemption_checkpoints_requeues_and_resumes_exactly(slurm_cluster, two_rank_run, tmp_path):
    images, uninterrupted = two_rank_run
    seconds = check_preemption(slurm_cluster, images, uninterrupted, tmp_path / "preempted")
    print(f"scancel --signal=USR1 --batch to the job pending again: {seconds:.1f} s")


def test_the_preemption_check_catches_a_script_that_does_not_resume(slurm_cluster, two_rank_run, tmp_path):
    """The same check against a copy of the script that forgets `--resume auto` must fail."""
    images, uninterrupted = two_rank_run
    broken = tmp_path / "no_resume.sh"
    text = SCRIPT.read_text()
    assert "resume=(--resume auto)" in text
    broken.write_text(text.replace("resume=(--resume auto)", "resume=()"))
    with pytest.raises(AssertionError, match="the requeued job did not resume from step"):
        check_preemption(slurm_cluster, images, uninterrupted, tmp_path / "broken", script=broken)


def test_zero2_on_two_nodes_gives_the_ddp_run(slurm_cluster, two_rank_run, tmp_path):
    """The same with --deepspeed ds_configs/zero2.json: ZeRO-2 across the two nodes gives the 2-rank
    DDP run's losses and teacher (to the order of float sums, as on one machine)."""
    images, uninterrupted = two_rank_run
    out = tmp_path / "zero2"
    job = submit(slurm_cluster, images, out, "--deepspeed", "ds_configs/zero2.json")
    info = slurm_cluster.wait_job(job, FINAL, start_now=False)
    assert info["JobState"] == "COMPLETED", job_output(out, job)[-4000:]
    assert "DeepSpeed (ds_configs/zero2.json)" in job_output(out, job)
    launch = launches(out)[0]
    assert launch["world_size"] == 2 and sorted(launch["hosts"]) == ["n1", "n2"], launch["hosts"]
    assert "deepspeed" in launch["distributed"].lower(), launch["distributed"]
    loss_diff, teacher_diff = max_difference(uninterrupted, out)
    print(f"ZeRO-2 on 2 nodes against DDP on 2 local ranks: loss {loss_diff:.2e}, teacher {teacher_diff:.2e}")
    assert loss_diff < 1e-5 and teacher_diff < 1e-5


def test_a_cluster_reaches_only_its_own_addresses_and_leaves_nothing_behind(slurm_cluster, tmp_path):
    """A second cluster beside the session's: its nodes route only to their own /24 (no default route,
    so a job cannot reach anything else), a two-node step runs on n1 and n2 at their own addresses,
    and after stop() none of its daemons, job processes, namespaces or links is left."""
    if slurm_cluster.prefix == "10.214.0":
        pytest.skip("subnet taken")
    cluster = Cluster(tmp_path / "second", subnet=214).start()
    try:
        for node, ns in cluster.netns.items():
            routes = cluster.run("ip", "-n", ns, "route", "show").stdout.split("\n")
            assert [r.split()[0] for r in routes if r.strip()] == ["10.214.0.0/24"], routes
        step = cluster.run("srun", "-N2", "-n2", "sh", "-c", "echo $(hostname) $(hostname -i)").stdout.split("\n")
        assert sorted(line for line in step if line) == ["n1 10.214.0.11", "n2 10.214.0.12"]
        pids = {name: p.pid for name, p in cluster.procs.items()}
        assert set(pids) == {"munged", "slurmctld", "slurmd-n1", "slurmd-n2"}
    finally:
        cluster.stop()
    assert cluster.leftovers() == []
    assert not any(alive(pid) for pid in pids.values())


def test_a_killed_rank_on_one_node_restarts_both_nodes(slurm_cluster, two_rank_run, tmp_path):
    """kill -9 of the rank on n2: its torchrun and n1's meet again (--max-restarts), every rank goes on
    from the last checkpoint, and the job ends bit-for-bit where the uninterrupted run ends; no requeue.
    (n2's torchrun counts a restart, n1's only sees a membership change: their ranks must still agree
    on the attempt they join.)"""
    images, uninterrupted = two_rank_run
    out = tmp_path / "killed"
    job = submit(slurm_cluster, images, out, "--max-restarts", "1", **{"train.checkpoint_every": 3})
    try:
        deadline = time.monotonic() + 120
        while ckpt.latest_checkpoint(out) is None or logged_step(out) < 4:
            assert slurm_cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), job_output(out, job)[-4000:]
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.05)
        killed_at = logged_step(out)
        pid = rank_pids(str(out))[1]
        assert b"SLURMD_NODENAME=n2\0" in Path(f"/proc/{pid}/environ").read_bytes()  # the other node's rank
        os.kill(pid, signal.SIGKILL)
        info = slurm_cluster.wait_job(job, FINAL, start_now=False, timeout=180)
    finally:
        slurm_cluster.run("scancel", str(job), check=False)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", job_output(out, job)[-4000:]
    resumed = [r for r in rows(out) if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] % 3 == 0 and resumed[0]["step"] <= killed_at, resumed
    assert_same_run(uninterrupted, out)


def test_a_two_node_checkpoint_goes_on_on_one_node(slurm_cluster, two_rank_run, tmp_path):
    """Elastic: 3 steps on two nodes x 8, then the same sbatch line with --nodes=1 and
    train.batch_size_per_device=16 (the same global batch) goes on from that checkpoint: the same
    images every step, losses and teacher within the order of float sums of the 2-rank run."""
    images, uninterrupted = two_rank_run
    out = tmp_path / "elastic"
    job = submit(slurm_cluster, images, out, **{"train.max_steps": 3})
    assert slurm_cluster.wait_job(job, FINAL, start_now=False)["JobState"] == "COMPLETED", job_output(out, job)[-4000:]
    job = submit(slurm_cluster, images, out, nodes=1, **{"train.batch_size_per_device": 16})
    assert slurm_cluster.wait_job(job, FINAL, start_now=False)["JobState"] == "COMPLETED", job_output(out, job)[-4000:]
    first, second = launches(out)
    assert sorted(first["hosts"]) == ["n1", "n2"] and second["world_size"] == 1 and second["step"] == 3
    changes = [r["layout_change"] for r in rows(out) if r.get("event") == "resumed"]
    assert len(changes) == 1 and "the same images in every step" in changes[0], changes
    loss_diff, teacher_diff = max_difference(uninterrupted, out)
    print(f"2 nodes -> 1 node: largest loss difference {loss_diff:.2e}, teacher {teacher_diff:.2e}")
    assert loss_diff < 1e-5 and teacher_diff < 1e-5


ZERO2_LAUNCH = ["--use_deepspeed", "--deepspeed_config_file", str(ROOT / "ds_configs/zero2.json"),
                "--deepspeed_multinode_launcher", "standard"]


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_accelerate_launch_across_the_two_nodes(slurm_cluster, two_rank_run, tmp_path, strategy):
    """The README's two-node line without SLURM: `accelerate launch --num_machines 2 --machine_rank 0|1
    --main_process_ip <n1's address>` run on n1 and on n2 trains one run: under DDP equal to the
    2-local-rank run, under ZeRO-2 (`--deepspeed_multinode_launcher standard`: torchrun on each node)
    within the order of float sums of it."""
    images, uninterrupted = two_rank_run
    out = tmp_path / "two_machines"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    if strategy == "ddp":
        env["ACCELERATE_USE_CPU"] = "1"
    launcher = ["--multi_gpu"] if strategy == "ddp" else ZERO2_LAUNCH
    procs = [subprocess.Popen(slurm_cluster.on_node(node, [
        accelerate, "launch", *launcher, "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
        "--main_process_ip", slurm_cluster.addr["n1"], "--main_process_port", "29555", str(ROOT / "run_pretrain.py"),
        *two_rank_overrides(images, out)]), env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True) for rank, node in enumerate(("n1", "n2"))]
    outputs = [finish(p, timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    launch = launches(out)[0]
    assert {h: sorted(r) for h, r in launch["hosts"].items()} == {"n1": [0], "n2": [1]}, launch["hosts"]
    if strategy == "ddp":
        assert_same_run(uninterrupted, out)
        return
    assert "deepspeed" in launch["distributed"].lower(), launch["distributed"]
    loss_diff, teacher_diff = max_difference(uninterrupted, out)
    assert loss_diff < 1e-5 and teacher_diff < 1e-5


# -- SLURM's clock: the --signal warning and the time limit ------------------------------------------
# Both need a job of a minute or more (SLURM checks limits every 30 s). They run beside the tests above
# (each on one node of its own, 2 ranks, one core of the node's two), submitted when this module starts
# and checked at its end. Each run is frozen (SIGSTOP to its ranks) once it is where the test wants it,
# and its limit then shortened to a minute or two (`scontrol update TimeLimit`): SLURM's own clock then
# fires mid-run however long the start took on a loaded machine.
WARNING_LEAD = 60  # --signal=B:USR1@60


def freeze(out: Path, ranks: int = 2) -> dict[int, int]:
    pids = rank_pids(str(out))
    assert len(pids) == ranks, pids
    for pid in pids.values():
        os.kill(pid, signal.SIGSTOP)
    return pids


def thaw(pids: dict[int, int]) -> None:
    for pid in pids.values():
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def shorten_limit(cluster: Cluster, job: int, minutes_left: int) -> float:
    """Set the job's limit to ``minutes_left`` whole minutes after the current one of its run time;
    returns the limit as a wall-clock time (SLURM's EndTime)."""
    run_time = cluster.job(job)["RunTime"]  # [D-]HH:MM:SS
    h, m, sec = (int(x) for x in run_time.split("-")[-1].split(":"))
    elapsed = 3600 * h + 60 * m + sec
    cluster.run("scontrol", "update", f"JobId={job}", f"TimeLimit={math.floor(elapsed / 60) + minutes_left}")
    return datetime.fromisoformat(cluster.job(job)["EndTime"]).timestamp()


def warning_before_the_limit(cluster: Cluster, images: Path, uninterrupted: Path, out: Path,
                             started: list[int]) -> dict:
    """``#SBATCH --signal=B:USR1@60`` with a 2-minute limit: SLURM's own USR1 to the batch script,
    then the same checkpoint, exit 75, requeue and bit-for-bit end as ``scancel --signal=USR1 --batch``."""
    job = submit(cluster, images, out, nodes=1, ranks=2, sbatch=("--nodelist=n1", "--time=10",
                                                                  f"--signal=B:USR1@{WARNING_LEAD}"))
    started.append(job)
    seen: dict = {}

    def by_the_clock(cluster: Cluster, job: int, out: Path) -> None:
        pids = freeze(out)
        try:
            seen["limit"] = shorten_limit(cluster, job, 2)
            deadline = time.monotonic() + 150
            while "USR1: every rank finishes its step" not in job_output(out, job):
                assert time.monotonic() < deadline, "no USR1 from SLURM 150 s after the limit was set"
                time.sleep(0.1)
            seen["lead"] = seen["limit"] - time.time()
        finally:
            thaw(pids)

    def no_second_warning() -> None:  # the requeued job keeps the 2-minute limit: give it room
        cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")

    try:
        seen["requeue_seconds"] = _preempt(cluster, job, uninterrupted, out, send_usr1=by_the_clock,
                                           on_requeue=no_second_warning)
    finally:
        cluster.run("scancel", str(job), check=False)
    return seen


def a_limit_without_warning(cluster: Cluster, images: Path, out: Path, script: Path, started: list[int]) -> dict:
    """A script without ``--signal`` (no warning) reaches its limit at step 4 or later, with a periodic
    checkpoint at step 3. At the limit SLURM sends SIGTERM to the batch script and to every task: the
    ranks finish their step and checkpoint (as on any SIGTERM) and the script, signalled, requeues the
    job before SLURM's KillWait ends it (else it would end TIMEOUT, not requeued: the same sbatch line
    then goes on, docs/cluster.md). The job resumes from that checkpoint and ends bit-for-bit."""
    job = submit(cluster, images, out, script=script, nodes=1, ranks=2, sbatch=("--nodelist=n2", "--time=10"),
                 **{"train.checkpoint_every": 3})
    started.append(job)
    try:
        wait_for_step(cluster, job, out, 4)
        pids = freeze(out)
        limit = shorten_limit(cluster, job, 1)
        requeued = cluster.wait_job(job, ("PENDING",) + FINAL, start_now=False, timeout=200)
        seen = {"state": requeued["JobState"], "restarts": requeued["Restarts"], "after_limit": time.time() - limit,
                "stopped_at": logged_step(out), "checkpoint": ckpt.checkpoint_step(ckpt.latest_checkpoint(out))}
        thaw(pids)
        if requeued["JobState"] == "PENDING":  # the requeued job keeps the 1-minute limit: give it room
            cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
            seen["final"] = cluster.wait_job(job, FINAL)["JobState"]
    finally:
        cluster.run("scancel", str(job), check=False)
    seen.update(output=job_output(out, job), out=out)
    return seen


@pytest.fixture(scope="module")
def clock(slurm_cluster, two_rank_run, tmp_path_factory):
    """The two clock jobs, started in the background when the module's first test starts; cancelled at
    the module's end if no test asked for their result (a run of a few selected tests)."""
    images, uninterrupted = two_rank_run
    root = tmp_path_factory.mktemp("clock")
    no_warning = root / "no_signal.sh"
    text = SCRIPT.read_text()
    assert "#SBATCH --signal=B:USR1@180\n" in text
    no_warning.write_text(text.replace("#SBATCH --signal=B:USR1@180\n", ""))
    pool, started, t0 = ThreadPoolExecutor(2), [], time.monotonic()

    def timed(fn, *args):
        result = fn(*args, started)
        result["seconds"] = time.monotonic() - t0
        return result

    jobs = {"warning": pool.submit(timed, warning_before_the_limit, slurm_cluster, images, uninterrupted,
                                   root / "warning" / "run"),
            "limit": pool.submit(timed, a_limit_without_warning, slurm_cluster, images, root / "limit" / "run",
                                 no_warning)}
    yield {name: (lambda f=f: f.result(timeout=400)) for name, f in jobs.items()}
    if not all(f.done() for f in jobs.values()):
        for job in started:
            slurm_cluster.run("scancel", str(job), check=False)
    pool.shutdown(wait=True)


@pytest.fixture(autouse=True)
def _start_the_clock_jobs(request):
    """Every real-cluster test of this module starts them first (their minutes then overlap the rest)."""
    if "slurm_cluster" in request.fixturenames:
        request.getfixturevalue("clock")


def test_the_warning_signal_arrives_before_the_time_limit(clock, two_rank_run):
    """SLURM's USR1 lands between 60 and 90 s before the limit (its 30-s check); the run checkpoints,
    exits 75, is requeued, and ends bit-for-bit as the uninterrupted run (checked in the job's thread)."""
    seen = clock["warning"]()
    print(f"--signal=B:USR1@{WARNING_LEAD}: USR1 {seen['lead']:.1f} s before the limit; requeued "
          f"{seen['requeue_seconds']:.1f} s after it; done {seen['seconds']:.0f} s after the module started")
    assert WARNING_LEAD - 2 <= seen["lead"] <= WARNING_LEAD + 32, seen


def test_a_time_limit_without_warning_checkpoints_requeues_and_resumes_exactly(clock, two_rank_run):
    seen = clock["limit"]()
    print(f"time limit without warning: requeued {seen['after_limit']:.1f} s after the limit, stopped at step "
          f"{seen['stopped_at']}, checkpoint step {seen['checkpoint']}; done {seen['seconds']:.0f} s after the module "
          "started")
    assert seen["state"] == "PENDING" and seen["restarts"] == "1", (seen["state"], seen["output"][-4000:])
    assert f"SIGTERM: stopped after step {seen['checkpoint']}" in seen["output"], seen["output"][-4000:]
    assert 3 <= seen["checkpoint"] <= seen["stopped_at"] < STEPS, seen
    assert seen["final"] == "COMPLETED", seen["output"][-4000:]
    resumed = [r["step"] for r in rows(seen["out"]) if r.get("event") == "resumed"]
    assert resumed == [seen["checkpoint"]], resumed
    assert_same_run(two_rank_run[1], seen["out"])
