"""Run provenance: what produced a run directory, so a result can be traced to its code, packages,
command and machines. Each launch of a run (the first, every resume, every requeue) appends one
record to ``provenance.json``; a run that changed its rank count between jobs shows it there.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from selfdistill.atomic import write_json_atomic
from selfdistill.engine.distributed import process_argv
from selfdistill.rundir import PROVENANCE

__all__ = ["PACKAGES", "code_version", "launch_record", "package_versions", "record_launch"]

PACKAGES = ("selfdistill", "torch", "torchvision", "timm", "accelerate", "deepspeed", "webdataset", "datasets",
            "safetensors", "numpy", "pillow")
# launchers and schedulers whose variables say where and how a rank was started
ENV_PREFIXES = ("SLURM_JOB_", "SLURM_NNODES", "SLURM_NODELIST", "SLURM_RESTART_COUNT", "SLURM_ARRAY_", "TORCHELASTIC_",
                "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "CUDA_VISIBLE_DEVICES",
                "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_MIXED_PRECISION",
                "OMP_NUM_THREADS")
LAUNCHERS = ("accelerate", "torchrun", "torch.distributed.run", "deepspeed", "srun", "mpirun")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def code_version(path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The git commit of the checkout holding ``path`` (default: this package), whether tracked files
    differ from it, and the branch; None outside a checkout or without git."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
        root = git("rev-parse", "--show-toplevel")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty, "branch": branch, "root": root}


def _launcher_command() -> list[str] | None:
    """The command line of the nearest ancestor process that is a launcher (accelerate launch,
    torchrun, srun, ...), read from /proc; None when there is none or /proc is absent."""
    pid = os.getppid()
    for _ in range(4):
        argv = process_argv(pid)
        if not argv:
            return None
        if any(any(name in part for name in LAUNCHERS) for part in argv[:3]):
            return argv
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
        if pid <= 1:
            return None
    return None


def rank_record() -> dict[str, Any]:
    """This rank's host and device (gathered from every rank)."""
    import torch

    device = None
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        device = torch.cuda.get_device_name(index)
    return {"host": socket.gethostname(), "local_rank": int(os.environ.get("LOCAL_RANK", "0")), "device": device}


def launch_record(accelerator: Any, ranks: list[dict[str, Any]], resumed_from: str | None, step: int,
                  distributed: str) -> dict[str, Any]:
    """What started this launch: code, packages, command lines, world and hosts (one record)."""
    import torch

    hosts: dict[str, list[int]] = {}
    for rank, info in enumerate(ranks):
        hosts.setdefault(info["host"], []).append(rank)
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "resumed_from": resumed_from,
        "step": step,
        "code": code_version(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "command": [sys.executable, *sys.argv],
        "launcher": _launcher_command(),
        "cwd": os.getcwd(),
        "world_size": accelerator.num_processes,
        "distributed": distributed,
        "hosts": hosts,
        "devices": sorted({info["device"] for info in ranks if info["device"]}),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
    }


def record_launch(run_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Append ``record`` to the run's ``provenance.json`` (a list: one record per launch)."""
    path = Path(run_dir) / PROVENANCE
    records: list[dict[str, Any]] = []
    if path.is_file():
        try:
            records = json.loads(path.read_text())
        except ValueError:
            records = []  # (atomic writes make this unlikely; never block a run on it)
    return write_json_atomic(path, [*records, record], indent=1)
