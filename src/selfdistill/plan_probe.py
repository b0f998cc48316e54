"""The planner's measurements: the recipe probed in a fresh process, and a written launch run.

:mod:`selfdistill.planner` only counts; what it needs measured comes from here. The probe child is
this module (``python -m selfdistill.plan_probe``), which runs the recipe's real steps through the
engine (:func:`selfdistill.engine.rank_memory.measure_run`): no entry point is started and none
is imported, so the planner never climbs back into the CLI. ``run_pretrain.py --measure-memory``
(what ``--verify`` starts through the written ``launch.sh``) calls :func:`measure` here too.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from selfdistill import planner as P
from selfdistill.atomic import write_text_atomic
from selfdistill.configkit import ConfigError
from selfdistill.engine.rank_memory import measure_run, module_tensors
from selfdistill.engine.throughput import benchmark_config
from selfdistill.methods import build_method
from selfdistill.models.frozen import FrozenTeacher
from selfdistill.recipe import load_config
from selfdistill.strategy_memory import STRATEGIES

__all__ = ["main", "measure", "optimizer_kind", "probe_command", "profile_recipe", "unmeasured_profile", "verify"]


def optimizer_kind(name: str) -> str:
    """How the state accounting counts an optimizer: ``adamw`` (two fp32 moments per parameter: the
    Adam family, LAMB, and, on the safe side, every optimizer with betas) or ``sgd`` (one: SGD,
    LARS and other momentum methods)."""
    from timm.optim import get_optimizer_info

    if name in ("adamw", "sgd"):
        return name
    return "adamw" if get_optimizer_info(name).has_betas else "sgd"


def unmeasured_profile(config: Any, recipe: str = "") -> P.Profile | None:
    """What the accounting needs of ``config`` without running a step: the method built on the meta
    device (no memory, no weights read) for its optimizer groups, frozen tensors, buffers, teacher
    and task tensors; no activations. None when the method cannot be built there (a teacher read
    from a file)."""
    try:
        with torch.device("meta"):
            task = build_method(copy.deepcopy(config))
            optimizer = task.build_optimizer(config.train.batch_size_per_device, torch.device("meta"))
    except Exception:  # noqa: BLE001 - any failure only means: measure first, as before
        return None
    student = task.student
    return P.Profile(recipe=recipe, precision=config.train.precision, optimizer=optimizer_kind(config.optim.name),
                     device="meta", groups=[[p.numel() for p in g["params"]] for g in optimizer.param_groups],
                     frozen=[p.numel() for p in student.parameters() if not p.requires_grad],
                     buffers=[[b.numel(), b.element_size(), int(b.is_floating_point())] for b in student.buffers()],
                     # meta tensors share one null pointer, so storages() cannot tell them apart: count each
                     # teacher tensor once; the method's own small tensors (centers) are left out of the bound
                     teacher_bytes=sum(t.nbytes for t in module_tensors(getattr(task, "teacher", None)).values()),
                     task_bytes=0,
                     teacher_partitioned=isinstance(getattr(task, "teacher", None), FrozenTeacher),
                     runtime_bytes=0, batches=(1, 2))


def probe_command(config_path: Path, out_dir: Path, steps: int, flops: bool) -> list[str]:
    """The probe child: this module, not an entry point (``python -m selfdistill.plan_probe``)."""
    cmd = [sys.executable, "-m", "selfdistill.plan_probe", "--config", str(config_path),
           "--measure-memory", str(out_dir), "--measure-steps", str(steps)]
    return cmd + (["--measure-flops"] if flops else [])


def profile_recipe(config: Any, recipe: str = "", batches: tuple[int, int] = (2, 4), steps: int = 3,
                   progress: Callable[[str], None] | None = None) -> P.Profile:
    """Measure ``config``'s training step on this machine: one fresh process per micro-batch size and
    checkpointing setting (so each high-water mark is its own), single rank, no DeepSpeed."""
    if not 0 < batches[0] < batches[1]:
        raise ValueError(f"the probe needs two micro-batch sizes, smaller first (got {batches})")
    fwd_bwd: dict[str, list[int]] = {"off": [], "on": []}
    forward: dict[str, list[int]] = {"off": [], "on": []}
    first: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="selfdistill-plan-") as tmp:
        for ckpt in (False, True):
            for b in batches:
                c = benchmark_config(config, str(Path(tmp) / "run"))
                c.model.grad_checkpointing = ckpt
                c.train.batch_size_per_device, c.train.grad_accum_steps = b, 1
                path = Path(tmp) / f"probe_{int(ckpt)}_{b}.yaml"
                write_text_atomic(path, c.to_yaml())
                if progress:
                    progress(f"measuring forward + backward: micro-batch {b}, checkpointing {'on' if ckpt else 'off'}")
                out = Path(tmp) / f"probe_{int(ckpt)}_{b}"
                env = {k: v for k, v in os.environ.items()
                       if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_DEEPSPEED")}
                flops = not ckpt and b == batches[0]
                r = subprocess.run(probe_command(path, out, steps, flops), env=env, capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"the probe at micro-batch {b} failed:\n{r.stderr[-3000:]}")
                result = json.loads((out / "rank0.json").read_text())
                fwd_bwd["on" if ckpt else "off"].append(result["fwd_bwd_bytes"])
                forward["on" if ckpt else "off"].append(result["forward_bytes"])
                if flops:
                    first = result
    return P.Profile(recipe=recipe, precision=config.train.precision, optimizer=optimizer_kind(config.optim.name),
                     device=first["device"], groups=first["groups"], frozen=first["frozen"], buffers=first["buffers"],
                     teacher_bytes=first["teacher_bytes"], task_bytes=first["task_bytes"],
                     teacher_partitioned=first["teacher_frozen"],
                     runtime_bytes=first["runtime_bytes"], batches=tuple(batches), fwd_bwd=fwd_bwd, forward=forward,
                     flops_per_sample=first.get("flops_per_sample", 0.0))


def verify(profile: P.Profile, row: P.Row, target: P.Target, recipe: str | list[str] | None, overrides: list[str],
           precision: str, clip_grad: float, out: Path, micro_cap: int = 0, steps: int = 3) -> dict[str, Any]:
    """One real run of ``row``'s setting scaled to this machine (its GPUs, or 2 gloo ranks on a CPU;
    the micro-batch at most ``micro_cap`` when given): the launch files written, started with
    ``--measure-memory``, and the measured peak per rank against the prediction. The written
    ``launch.sh`` is what is checked, so it starts the run as a user would."""
    cuda = torch.cuda.device_count()
    ranks = min(target.ranks, cuda) if cuda else 2
    micro = row.micro_batch if not micro_cap else min(row.micro_batch, micro_cap)
    strategy = STRATEGIES[row.strategy]
    local = P.Target(memory=target.memory, gpus=ranks, nodes=1, global_batch=micro * ranks, margin=target.margin,
                     reserve=target.reserve, cpu=not cuda)
    local_row = copy.copy(row)
    local_row.micro_batch, local_row.accumulation = micro, 1
    local_row.peak = P.predict_peak(profile, strategy, row.ckpt, ranks, micro, host=local.cpu)
    files = P.write_launch(out / "launch", local_row, local, recipe, overrides, precision, clip_grad, cpu=not cuda)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["ACCELERATE"] = str(Path(sys.executable).with_name("accelerate"))  # this environment's launcher
    cmd = ["bash", str(files["launch"]), "--measure-memory", str(out / "measured"), "--measure-steps", str(steps)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"the verification run failed ({shlex.join(cmd)}):\n{r.stderr[-3000:]}")
    measured = [json.loads((out / "measured" / f"rank{i}.json").read_text()) for i in range(ranks)]
    worst = max(m["peak_bytes"] for m in measured)
    predicted_state = P.state_total(profile, strategy, ranks)
    return {"strategy": row.strategy, "ckpt": row.ckpt, "ranks": ranks, "micro_batch": micro,
            "predicted_peak": local_row.peak, "measured_peak": worst, "error": local_row.peak / worst - 1,
            "predicted_state": predicted_state, "measured_state": max(m["state_bytes"] for m in measured),
            "ranks_measured": measured}


def measure(config: Any, out_dir: str | os.PathLike, steps: int = 3, flops: bool = False) -> dict[str, Any]:
    """Run and measure ``config``'s steps as launched (each rank writes ``out_dir/rank{N}.json``)."""
    from selfdistill.engine.distributed import relaunch_if_needed

    relaunch_if_needed()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return measure_run(config, build_method, out_dir, steps, flops)


def main(argv: list[str] | None = None) -> int:
    """The probe child: ``--config RECIPE [overrides] --measure-memory DIR [--measure-steps N] [--measure-flops]``."""
    p = argparse.ArgumentParser(prog="python -m selfdistill.plan_probe", description=__doc__, allow_abbrev=False)
    p.add_argument("--config", action="append")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--measure-memory", metavar="DIR", required=True)
    p.add_argument("--measure-steps", type=int, default=3, metavar="N")
    p.add_argument("--measure-flops", action="store_true")
    args = p.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    measure(config, args.measure_memory, args.measure_steps, args.measure_flops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
