"""Which distribution strategy, micro-batch and accumulation fit a recipe on given devices.

The planner predicts the peak memory of one rank as

    runtime + teacher + model/optimizer state + max(rise of forward + backward, optimizer step)

* **state** (student weights, gradients kept between steps, fp32 masters, optimizer moments, the
  strategy's persistent buffers) is *counted*, from the student's parameter tensors and DeepSpeed's
  own buffer rules (:mod:`selfdistill.strategy_memory`; the ZeRO paper's bytes per parameter where
  DeepSpeed follows it, its real buffers where it does not);
* **the rise** of forward + backward (activations, and the gradients as backward writes them) is
  *measured*: the recipe's real training step at two micro-batch sizes on the device at hand
  (:func:`selfdistill.plan_probe.profile_recipe`), so it holds for every method and crop set, EMA
  and frozen teachers included; what a strategy adds during a step is counted
  (:func:`~selfdistill.strategy_memory.step_transient_bytes`);
* **runtime** is what the process holds before the model exists (measured; on a GPU the allocator
  does not count the CUDA context, which the ``reserve`` covers).

:func:`plan` turns that into one row per strategy x activation checkpointing: the largest
micro-batch under the memory budget, the accumulation that reaches the global batch, and a step
time relative to pure compute (recomputation, communication volume per step from the ZeRO paper's
accounting, offload traffic). :func:`write_launch` writes the recommended row as ready-to-run files.
Pure accounting: measuring and starting processes are :mod:`selfdistill.plan_probe`'s.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfdistill.atomic import write_json_atomic, write_text_atomic
from selfdistill.strategy_memory import STRATEGIES, Strategy, deepspeed_config, state_bytes, step_transient_bytes

GIB = 2**30

__all__ = ["GIB", "Profile", "Row", "Target", "Timing", "choose", "largest_micro_batch", "memory_for", "parse_bytes",
           "plan", "predict_peak", "render", "smallest_fitting_memory", "split_batch", "state_floor", "state_total",
           "teacher_bytes_per_rank", "write_launch"]


# -- what the planner is given ----------------------------------------------
def parse_bytes(text: str | int | float, option: str = "") -> int:
    """``80GiB``, ``40 GB``, ``512MiB`` or a number of bytes; given ``option`` (a command-line
    flag), a bare number other than 0 is refused: ``--gpu-memory 40`` means 40 GiB to a person."""
    if isinstance(text, (int, float)):
        return int(text)
    if option and text.strip().replace(".", "", 1).isdigit() and float(text) != 0:
        raise ValueError(f"{option} {text}: give a unit, e.g. {option} {text.strip()}GiB (or GB, MiB)")
    units = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    s = str(text).strip().lower().replace(" ", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 80GiB, 40GB, 512MiB)") from None
    if unit not in units or value < 0:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 80GiB, 40GB, 512MiB)")
    return int(value * units[unit])


@dataclass
class Target:
    """Where the recipe will run: device memory per rank, ranks, the global batch, and what of the
    memory is not planned: ``margin`` (a fraction, for fragmentation and measurement noise) and
    ``reserve`` (bytes outside the allocator: CUDA context, NCCL buffers)."""

    memory: int
    gpus: int = 8
    nodes: int = 1
    global_batch: int = 1024
    margin: float = 0.10
    reserve: int = int(1.5 * GIB)
    cpu: bool = False  # CPU ranks (gloo): memory is the resident set, the runtime counts

    @property
    def ranks(self) -> int:
        return self.gpus * self.nodes

    @property
    def budget(self) -> int:
        return int(self.memory * (1 - self.margin)) - self.reserve


@dataclass
class Timing:
    """The figures the step-time estimate assumes (per rank); ratios between rows depend on them
    only through communication against compute."""

    tflops: float = 125.0  # achieved training FLOP/s, in 1e12 (A100-class bf16 at ~40 % of peak)
    bandwidth_gbs: float = 150.0  # collective bus bandwidth inside a node, GB/s (NVLink)
    inter_node_gbs: float = 25.0  # per GPU between nodes, GB/s (200 Gb/s InfiniBand per GPU)
    pcie_gbs: float = 16.0  # host <-> device for offload, GB/s
    cpu_adam_params_per_s: float = 1.0e9  # DeepSpeed's CPU Adam, parameters per second per rank


@dataclass
class Profile:
    """The recipe, measured on the device at hand (:func:`selfdistill.plan_probe.profile_recipe`)."""

    recipe: str
    precision: str
    optimizer: str
    device: str
    groups: list[list[int]]  # the student's trainable tensors' element counts per optimizer group
    frozen: list[int]  # the student's requires_grad=False tensors
    teacher_bytes: int  # EMA or frozen teacher, as held on a rank without ZeRO-3
    teacher_partitioned: bool  # a frozen teacher is partitioned over the ranks under ZeRO-3
    task_bytes: int  # the method's own tensors (DINO's centers)
    runtime_bytes: int
    batches: tuple[int, int]
    fwd_bwd: dict[str, list[int]] = field(default_factory=dict)  # "off"/"on" -> rise through backward, 2 batches
    forward: dict[str, list[int]] = field(default_factory=dict)  # "off"/"on" -> rise through forward alone
    flops_per_sample: float = 0.0
    buffers: list[list[int]] = field(default_factory=list)  # the student's: [elements, bytes each, floating point]

    @property
    def parameters(self) -> int:
        return sum(map(sum, self.groups))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        return cls(**{**d, "batches": tuple(d["batches"])})

    def line(self, kind: str, ckpt: bool) -> tuple[float, float]:
        """``(intercept, bytes per sample)`` of a measured rise (``fwd_bwd`` or ``forward``)."""
        lo, hi = getattr(self, kind)["on" if ckpt else "off"]
        b1, b2 = self.batches
        slope = max((hi - lo) / (b2 - b1), 0.0)
        return lo - slope * b1, slope

    def rise(self, ckpt: bool, micro_batch: int, early: int, late: int) -> float:
        """Forward + backward's rise under a strategy whose backward adds ``early`` bytes from its
        start (ZeRO's buckets, gathered weights) and ``late`` bytes by its end (DDP's full gradients).

        The probe ran without a strategy: its backward wrote full fp32 gradients (4 bytes per
        parameter), which a strategy replaces by its own. Where activations dominate, the rise peaks
        at backward's start (the forward rise, plus what a strategy allocates early); where they do
        not, at its end (the probe's rise minus its gradients, plus what the strategy holds then)."""
        a, s = self.line("forward", ckpt)
        f, g = self.line("fwd_bwd", ckpt)
        forward = a + s * micro_batch
        whole = f + g * micro_batch
        return max(forward + early, whole - 4 * self.parameters + late)


@dataclass
class Row:
    """One strategy x checkpointing setting on the target (bytes per rank; ``micro_batch`` 0: does not fit)."""

    strategy: str
    ckpt: bool
    state: int
    teacher: int
    transient: int
    activation_per_sample: float
    max_micro_batch: int
    micro_batch: int
    accumulation: int
    peak: int
    comm_bytes: float
    relative_time: float

    @property
    def fits(self) -> bool:
        return self.micro_batch > 0


def teacher_bytes_per_rank(profile: Profile, strategy: Strategy, ranks: int) -> int:
    if profile.teacher_partitioned and strategy.stage == 3:
        return math.ceil(profile.teacher_bytes / ranks)
    return profile.teacher_bytes


def predict_peak(profile: Profile, strategy: Strategy, ckpt: bool, ranks: int, micro_batch: int,
                 host: bool = False) -> int:
    """Bytes at one rank's high-water mark (not the reserve or margin): the larger of backward
    (activations + the strategy's backward transients) and the optimizer step. ``host``: CPU ranks,
    whose resident set includes the runtime; a GPU's allocator does not count it."""
    transient = step_transient_bytes(profile.groups, profile.frozen, ranks, profile.precision, strategy, host=host)
    fixed = ((profile.runtime_bytes if host else 0) + teacher_bytes_per_rank(profile, strategy, ranks)
             + profile.task_bytes + state_total(profile, strategy, ranks))
    rise = profile.rise(ckpt, micro_batch, transient["early"], transient["late"])
    return int(fixed + max(rise, transient["step"]))


def state_total(profile: Profile, strategy: Strategy, ranks: int) -> int:
    return sum(state_bytes(profile.groups, profile.frozen, ranks, profile.precision, profile.optimizer,
                           strategy, buffers=profile.buffers).values())


def comm_bytes_per_step(profile: Profile, strategy: Strategy, ranks: int, accumulation: int) -> float:
    """Bytes each rank sends per optimizer step (ring collectives, (N-1)/N of the volume): DDP
    all-reduces the gradients once (2 psi); ZeRO-1 reduce-scatters them and all-gathers the updated
    weights once (2 psi); ZeRO-2 reduce-scatters every micro-batch (psi each) and all-gathers once;
    ZeRO-3 gathers the weights for forward and backward and reduce-scatters every micro-batch (3 psi
    each). psi: parameters x bytes of the 16-bit or fp32 copy that travels."""
    if ranks == 1:
        return 0.0
    # DDP's gradients are fp32 (autocast keeps fp32 weights); DeepSpeed sends its 16-bit copies in bf16 / fp16
    psi = profile.parameters * (2 if profile.precision in ("bf16", "fp16") and strategy.deepspeed else 4)
    ring = (ranks - 1) / ranks
    if strategy.stage in (0, 1):
        volume = 2 * psi
    elif strategy.stage == 2:
        volume = psi * accumulation + psi
    else:
        volume = 3 * psi * accumulation
    return volume * ring


def relative_step_time(profile: Profile, strategy: Strategy, ckpt: bool, target: Target, accumulation: int,
                       timing: Timing) -> tuple[float, float]:
    """``(step time / pure compute time, bytes sent per step)``: compute x 4/3 with checkpointing (one
    more forward), communication at the bus bandwidth (none of it assumed hidden, so an upper bound),
    offload's host transfers and CPU Adam."""
    samples = target.global_batch / target.ranks
    compute = max(profile.flops_per_sample, 1.0) * samples / (timing.tflops * 1e12)
    comm = comm_bytes_per_step(profile, strategy, target.ranks, accumulation)
    bandwidth = (timing.inter_node_gbs if target.nodes > 1 else timing.bandwidth_gbs) * 1e9
    total = compute * (4 / 3 if ckpt else 1.0) + comm / bandwidth
    if strategy.offload:
        part = profile.parameters / target.ranks
        total += part * (2 + 2) / (timing.pcie_gbs * 1e9) + part / timing.cpu_adam_params_per_s
        if strategy.stage == 3:  # weights come up from the host for forward and backward
            total += 2 * accumulation * profile.parameters * 2 / target.ranks / (timing.pcie_gbs * 1e9)
    return total / compute, comm


def largest_micro_batch(profile: Profile, strategy: Strategy, ckpt: bool, target: Target, limit: int = 1 << 16) -> int:
    """The largest micro-batch whose predicted peak stays within the budget (0: not even one)."""
    fits = lambda b: predict_peak(profile, strategy, ckpt, target.ranks, b, host=target.cpu) <= target.budget  # noqa: E731
    if not fits(1):
        return 0
    lo, hi = 1, limit
    while lo < hi:  # the peak grows with the micro-batch
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def split_batch(global_batch: int, ranks: int, max_micro: int) -> tuple[int, int]:
    """``(micro-batch, accumulation)`` with micro x ranks x accumulation == global batch, the
    micro-batch as large as fits (at most ``max_micro``); ``(0, 0)`` when nothing fits."""
    if global_batch % ranks:
        raise ValueError(f"the global batch {global_batch} does not split over {ranks} ranks; "
                         f"use a multiple of {ranks}")
    per_rank = global_batch // ranks
    for accumulation in range(1, per_rank + 1):
        if per_rank % accumulation == 0 and per_rank // accumulation <= max_micro:
            return per_rank // accumulation, accumulation
    return 0, 0


def plan(profile: Profile, target: Target, strategies: list[str] | None = None,
         timing: Timing | None = None) -> tuple[list[Row], int | None]:
    """Every strategy x checkpointing row and the index of the recommended one (the fastest
    estimated step among those that fit; within 2 %, the simpler strategy), or None."""
    timing = timing or Timing()
    rows = []
    for name in strategies or list(STRATEGIES):
        strategy = STRATEGIES[name]
        for ckpt in (False, True):
            max_micro = largest_micro_batch(profile, strategy, ckpt, target)
            micro, accumulation = split_batch(target.global_batch, target.ranks, max_micro)
            rel, comm = relative_step_time(profile, strategy, ckpt, target, max(accumulation, 1), timing)
            rows.append(Row(
                strategy=name, ckpt=ckpt, state=state_total(profile, strategy, target.ranks),
                teacher=teacher_bytes_per_rank(profile, strategy, target.ranks),
                transient=step_transient_bytes(profile.groups, profile.frozen, target.ranks, profile.precision,
                                               strategy, host=target.cpu)["late"],
                activation_per_sample=profile.line("fwd_bwd", ckpt)[1], max_micro_batch=max_micro,
                micro_batch=micro, accumulation=accumulation,
                peak=predict_peak(profile, strategy, ckpt, target.ranks, micro, host=target.cpu) if micro else 0,
                comm_bytes=comm, relative_time=rel))
    fitting = [i for i, r in enumerate(rows) if r.fits]
    if not fitting:
        return rows, None
    best = min(r.relative_time for r in (rows[i] for i in fitting))
    return rows, next(i for i in fitting if rows[i].relative_time <= best * 1.02)


def choose(rows: list[Row], spec: str) -> int:
    """The row named ``STRATEGY`` (checkpointing off) or ``STRATEGY:ckpt``."""
    name, _, flag = spec.partition(":")
    if name not in STRATEGIES or flag not in ("", "ckpt"):
        raise ValueError(f"--choose takes STRATEGY or STRATEGY:ckpt with a strategy of {', '.join(STRATEGIES)}; "
                         f"got {spec!r}")
    for i, r in enumerate(rows):
        if r.strategy == name and r.ckpt == (flag == "ckpt"):
            if not r.fits:
                raise ValueError(f"{spec} does not fit the target (see the table)")
            return i
    raise ValueError(f"{spec} was not planned (--strategies)")


def render(rows: list[Row], best: int | None, profile: Profile, target: Target) -> str:
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    lines = [f"recipe {profile.recipe}: {profile.parameters / 1e6:.1f} M trainable student parameters, teacher "
             f"{gib(profile.teacher_bytes)} GiB, {profile.precision}, {profile.optimizer}; activations measured on "
             f"{profile.device} at micro-batches {profile.batches[0]} and {profile.batches[1]}",
             f"target: {target.ranks} ranks ({target.nodes} x {target.gpus}), {gib(target.memory)} GiB each, "
             f"global batch {target.global_batch}; budget {gib(target.budget)} GiB per rank "
             f"({target.margin:.0%} margin, {gib(target.reserve)} GiB reserve)", "",
             "| strategy | ckpt | state GiB/rank | teacher GiB | act. GiB/sample | max micro | micro x ranks x accum "
             "| peak GiB | comm GB/step | rel. step time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        split = f"{r.micro_batch} x {target.ranks} x {r.accumulation}" if r.fits else "does not fit"
        mark = " **<- recommended**" if i == best else ""
        lines.append(f"| {r.strategy} | {'on' if r.ckpt else 'off'} | {gib(r.state)} | {gib(r.teacher)} | "
                     f"{r.activation_per_sample / GIB:.3f} | {r.max_micro_batch} | {split} | "
                     f"{gib(r.peak) if r.fits else '-'} | {r.comm_bytes / 1e9:.2f} | "
                     f"{r.relative_time:.2f}{mark} |")
    if best is None:
        lines.append("\nno strategy fits: use more ranks, a smaller model or crops, or a device with more memory")
    return "\n".join(lines)

def state_floor(profile: Profile, target: Target, strategies: list[str] | None = None) -> tuple[int, str]:
    """``(bytes, strategy)``: the least any of ``strategies`` holds per rank before a single
    activation (training state, teacher, task tensors and the step's own transients); pure
    accounting, so an impossible budget is refused before anything is measured."""
    floors = []
    for name in strategies or list(STRATEGIES):
        strategy = STRATEGIES[name]
        transient = step_transient_bytes(profile.groups, profile.frozen, target.ranks, profile.precision, strategy,
                                         host=target.cpu)
        fixed = teacher_bytes_per_rank(profile, strategy, target.ranks) + profile.task_bytes + \
            state_total(profile, strategy, target.ranks)
        floors.append((int(fixed + max(transient["early"], transient["step"])), name))
    return min(floors)


def memory_for(peak: int, target: Target) -> int:
    """The device memory per rank whose budget (after ``target``'s margin and reserve) holds ``peak``."""
    return math.ceil((peak + target.reserve) / (1 - target.margin))


def smallest_fitting_memory(profile: Profile, target: Target, strategies: list[str] | None = None) -> tuple[int, str]:
    """``(memory per rank, row)``: the least device memory on which some row fits (micro-batch 1,
    the rest by accumulation), for the "no strategy fits" answer."""
    need = []
    for name in strategies or list(STRATEGIES):
        for ckpt in (False, True):
            peak = predict_peak(profile, STRATEGIES[name], ckpt, target.ranks, 1, host=target.cpu)
            need.append((memory_for(peak, target), name + (":ckpt" if ckpt else "")))
    return min(need)


# -- ready-to-run files, and checking them -------------------------------------------------------------
def accelerate_yaml(strategy: Strategy, ranks: int, nodes: int, cpu: bool, precision: str,
                    deepspeed_json: Path | None = None) -> str:
    """The Accelerate config of a launch (naming ``deepspeed_json`` for ZeRO)."""
    head = [f"# written by selfdistill-plan: {strategy.name}, {ranks} ranks on {nodes} machine(s)"]
    if nodes > 1:
        head.append("# on every machine: accelerate launch --config_file accelerate.yaml --machine_rank N "
                    "--main_process_ip HEAD_IP ...")
    lines = ["compute_environment: LOCAL_MACHINE"]
    if strategy.deepspeed:
        lines += ["distributed_type: DEEPSPEED", "deepspeed_config:",
                  f"  deepspeed_config_file: {json.dumps(str(deepspeed_json))}", "  zero3_init_flag: false"]
        if nodes > 1:
            lines.append("  deepspeed_multinode_launcher: standard")
    else:
        # MULTI_GPU with use_cpu starts the ranks with torchrun on a CPU-only machine (gloo)
        mixed = {"bf16": "bf16", "fp16": "fp16"}.get(precision, "no")
        lines += ["distributed_type: MULTI_GPU", f'mixed_precision: "{mixed}"', "gpu_ids: all"]
    lines += [f"num_machines: {nodes}", f"num_processes: {ranks}", "machine_rank: 0"]
    if nodes > 1:
        lines += ["main_process_ip: 127.0.0.1", "main_process_port: 29500"]
    lines += ["rdzv_backend: static", "same_network: true", f"use_cpu: {str(cpu).lower()}"]
    return "\n".join(head + lines) + "\n"


def launch_overrides(row: Row) -> list[str]:
    return [f"train.batch_size_per_device={row.micro_batch}", f"train.grad_accum_steps={row.accumulation}",
            f"model.grad_checkpointing={str(row.ckpt).lower()}"]


def write_launch(out: str | os.PathLike, row: Row, target: Target, recipe: str | list[str] | None, overrides: list[str],
                 precision: str, clip_grad: float, cpu: bool = False) -> dict[str, Path]:
    """``accelerate.yaml`` (+ ``deepspeed.json``), ``overrides.txt`` and ``launch.sh`` for ``row``:
    ``launch.sh [more overrides]`` starts the run from any directory."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    strategy = STRATEGIES[row.strategy]
    files = {"accelerate": out / "accelerate.yaml", "overrides": out / "overrides.txt", "launch": out / "launch.sh"}
    write_text_atomic(files["accelerate"], accelerate_yaml(strategy, target.ranks, target.nodes, cpu, precision,
                                                           out / "deepspeed.json"))
    if strategy.deepspeed:
        files["deepspeed"] = out / "deepspeed.json"
        write_json_atomic(files["deepspeed"], deepspeed_config(strategy, clip_grad), indent=2)
    planned = launch_overrides(row)
    keys = {o.split("=", 1)[0] for o in planned}
    every = [o for o in overrides if o.split("=", 1)[0] not in keys] + planned  # the plan's values win
    write_text_atomic(files["overrides"], "".join(f"{o}\n" for o in every))
    recipes = [recipe] if isinstance(recipe, str) else list(recipe or [])
    config_arg = "".join(f" --config {shlex.quote(str(Path(r).resolve()))}" for r in recipes)
    script = (f"#!/usr/bin/env bash\n# {row.strategy}, activation checkpointing {'on' if row.ckpt else 'off'}: "
              f"micro-batch {row.micro_batch} x {target.ranks} ranks x {row.accumulation} accumulation = global "
              f"batch {target.global_batch}; predicted peak {row.peak / GIB:.2f} GiB per rank\n"
              'here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"\n'
              f'exec "${{ACCELERATE:-accelerate}}" launch --config_file "$here/accelerate.yaml" -m selfdistill.cli.pretrain{config_arg} '
              + " ".join(shlex.quote(o) for o in every) + ' "$@"\n')
    write_text_atomic(files["launch"], script)
    files["launch"].chmod(0o755)
    return files
