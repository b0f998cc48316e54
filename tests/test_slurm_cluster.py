"""The documented SLURM lines on a real two-node cluster (tests/slurm_cluster.py: slurmctld, two slurmd
in network namespaces of their own, munge), each ending compared with the uninterrupted run of the
same recipe on 2 local ranks (conftest ``two_rank_run``)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from cluster_runs import STEPS, assert_same_run, logged_step, rows, two_rank_overrides
from conftest import ROOT
from selfdistill.engine import checkpoint as ckpt
from slurm_cluster import Cluster

pytestmark = pytest.mark.slow
SCRIPT = ROOT / "accelerate_configs" / "slurm_multinode.sh"


def submit(cluster: Cluster, images: Path, out: Path, *options: str, script: Path = SCRIPT,
           sbatch: tuple[str, ...] = (), **overrides) -> int:
    """``sbatch --nodes=2 slurm_multinode.sh [options] recipe overrides`` from the repository root, one
    rank per node (this cluster has no GPUs: ``--gpus-per-node=0`` overrides the script's 8)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe = out.parent / "recipe.yaml"
    recipe.write_text("train: {epochs: 3}\n")
    return cluster.sbatch("--nodes=2", "--cpus-per-task=1", "--gpus-per-node=0", f"--output={out.parent}/job-%j.out",
                          *sbatch, str(script), "--gpus-per-node", "1", *options, str(recipe),
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
