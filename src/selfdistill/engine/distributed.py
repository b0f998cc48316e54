"""The one place that decides the distributed backend and builds the Accelerator.

On a CPU-only machine two launch paths silently misbehave (see DEVELOPERS.md / ecosystem notes):
``accelerate launch --num_processes 2`` starts ONE process, and a plain ``Accelerator()`` under a
2-process launch gives two independent rank-0 copies. We fix the first by re-launching the ranks
with ``torch.distributed.run`` and the second by asking Accelerate for gloo (``cpu=True``), then we
check that Accelerate sees the world size the launcher asked for.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from selfdistill.engine.trackers import check_installed

log = logging.getLogger(__name__)

RELAUNCH_FLAG = "SELFDISTILL_RELAUNCHED"


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def uses_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def gather_objects(accelerator: Any, item: Any) -> list[Any]:
    """Collective: ``item`` (picklable) of every rank, in rank order."""
    if accelerator.num_processes == 1:
        return [item]
    from accelerate.utils import gather_object

    return gather_object([item])


def process_argv(pid: int) -> list[str]:
    """The command line of process ``pid`` (Linux /proc; empty when unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _accelerate_launch_args(argv: list[str]) -> list[str] | None:
    """The arguments after ``accelerate launch`` (or Accelerate's ``accelerate-launch``, the same
    launcher without the other sub-commands' imports) in ``argv``; None for another program."""
    if "launch" in argv and any("accelerate" in a for a in argv[: argv.index("launch") + 1]):
        return argv[argv.index("launch") + 1:]
    at = next((i for i, a in enumerate(argv[:2]) if Path(a).name == "accelerate-launch"), None)
    return None if at is None else argv[at + 1:]


def _parent_accelerate_num_processes() -> int:
    """``--num_processes`` of an ``accelerate launch`` that started this process, else 0."""
    rest = _accelerate_launch_args(process_argv(os.getppid()))
    if rest is None:
        return 0
    try:
        from accelerate.commands.launch import launch_command_parser

        args, _ = launch_command_parser().parse_known_args(rest)
    except SystemExit:
        return 0
    n = args.num_processes
    if n is None and args.config_file:
        try:
            from accelerate.commands.config.config_args import load_config_from_file

            n = load_config_from_file(args.config_file).num_processes
        except Exception:  # noqa: BLE001 - an unreadable config simply means "unknown"
            n = None
    return int(n or 0)


def _started_by_a_launcher() -> bool:
    if "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        return True
    return _accelerate_launch_args(process_argv(os.getppid())) is not None


def stop_with_launcher() -> None:
    """Have the kernel send this process SIGTERM when the launcher that started it dies.

    A launcher killed by a signal it does not handle (``accelerate launch`` on SIGUSR1: exit 138)
    would otherwise leave its ranks training as orphans (torchrun starts each rank in a session of
    its own, so a signal to the launcher's process group never reaches them). SIGTERM is a
    preemption signal (``train.preempt_signals``): the ranks finish the step, checkpoint and stop;
    without it they simply end. Kept across ``exec``, so the re-launched torchrun below has it too."""
    if not sys.platform.startswith("linux") or not _started_by_a_launcher():
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not glibc / no prctl: nothing to arm
        return


def relaunch_if_needed(argv: list[str] | None = None) -> None:
    """Re-launch N CPU ranks when ``accelerate launch --num_processes N`` (N > 1) started only one.

    Accelerate's launcher falls back to a single process when it finds no GPU; the user asked for
    N ranks, so we start them with ``torch.distributed.run --standalone`` (gloo) instead of
    silently training on one. Every process started by a launcher first arms
    :func:`stop_with_launcher`.
    """
    stop_with_launcher()
    if "WORLD_SIZE" in os.environ or os.environ.get(RELAUNCH_FLAG) or torch.cuda.is_available():
        return
    n = _parent_accelerate_num_processes()
    if n <= 1:
        return
    argv = list(sys.argv if argv is None else argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *argv]
    print(f"selfdistill: accelerate started 1 process on a CPU-only machine although {n} were asked; "
          f"re-launching {n} gloo ranks: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", **{RELAUNCH_FLAG: "1"})
    os.execvpe(cmd[0], cmd, env)


def join_torchelastic_attempt(backend: str) -> None:
    """Under torchrun, join the ranks of this attempt in a namespace of its own.

    torchrun restarts every rank when one dies (``--max_restarts``). The restarted ranks meet in the
    agent's store, which still holds the previous attempt's keys (this torch no longer prefixes them
    per attempt), so a rank could read the address of a rank that died and fail to connect or hang
    (seen on 2 gloo ranks). Accelerate and DeepSpeed then use this process group as it is.

    The attempt is counted in the store (how often this rank has joined; every rank joins once per
    attempt), not read from ``TORCHELASTIC_RESTART_COUNT``: that count is per node, and only the node
    whose rank died counts a restart (the others see a membership change), so on two nodes the ranks
    of one attempt disagreed on it and waited for each other forever (seen on the test cluster)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or torch.distributed.is_initialized():
        return
    rank = int(os.environ["RANK"])
    agent = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    attempt = agent.add(f"/selfdistill/joins/rank_{rank}", 1)
    store = torch.distributed.PrefixStore(f"/selfdistill/attempt_{attempt}", agent)
    torch.distributed.init_process_group(backend, store=store, rank=rank,
                                         world_size=world_size_from_env())


def make_accelerator(precision: str, grad_accum_steps: int, cpu: bool, log_with: list[str],
                     project_dir: str | None):
    """Build the Accelerator with the right backend and verify the world size."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        raise ValueError("FSDP is not supported: the EMA teacher, the exports and resuming are built for DDP and "
                         "DeepSpeed; to shard weights, gradients and optimizer state use ZeRO-3 "
                         "(accelerate launch --config_file accelerate_configs/gpu_8_zero3.yaml ...)")
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher not in ("", "no") and launcher != precision:  # "no" is also Accelerate's default: not a request
        raise ValueError(f"the launcher asks for mixed precision {launcher} (accelerate launch --mixed_precision or "
                         f"the accelerate config) but the recipe says train.precision={precision}; make them agree: "
                         f"train.precision={launcher}, or launch with --mixed_precision no")
    on_cpu = cpu or not torch.cuda.is_available()
    if precision == "fp16" and on_cpu:
        raise ValueError("train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    check_installed(log_with)
    if uses_deepspeed():
        check_deepspeed_launch(cpu)
    elif not torch.cuda.is_available():
        # Accelerate may import DeepSpeed when it is installed, and DeepSpeed then warns
        # "Setting accelerator to CPU" on every launch: name the only accelerator a machine without
        # a GPU has (what DeepSpeed would pick), so the warning shows only in runs that use DeepSpeed.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    world = world_size_from_env()
    if world > 1:
        join_torchelastic_attempt("gloo" if on_cpu else "nccl")
    if on_cpu and world > 1 and uses_deepspeed():
        PartialState(backend="gloo")  # DeepSpeed through Accelerate otherwise leaves every rank at 0
    accelerator = Accelerator(
        cpu=on_cpu and not uses_deepspeed(),
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision],
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=grad_accum_steps,
                                                                sync_with_dataloader=False),
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=project_dir) if project_dir else None,
    )
    if accelerator.num_processes != world:
        raise RuntimeError(
            f"the launcher started WORLD_SIZE={world} ranks but Accelerate sees {accelerator.num_processes}; "
            "on CPU launch with `accelerate launch --config_file accelerate_configs/cpu_2proc.yaml` or torchrun")
    return accelerator


# Accelerate config keys that a DeepSpeed JSON owns; Accelerate refuses a YAML that repeats them.
DEEPSPEED_OWNED_KEYS = ("gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device",
                        "offload_param_device", "offload_param_nvme_path", "offload_optimizer_nvme_path",
                        "zero3_save_16bit_model", "mixed_precision")


def check_deepspeed_launch(cpu: bool) -> None:
    """One-line errors for DeepSpeed launches that cannot work, before Accelerate's long traceback."""
    if cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        raise ValueError(
            "train.cpu=true (or ACCELERATE_USE_CPU) cannot be combined with DeepSpeed: DeepSpeed ignores it and "
            "takes the accelerators. On a machine without a GPU DeepSpeed already runs on CPU (gloo): drop "
            "train.cpu; to train on the CPU of a GPU machine, launch without --use_deepspeed")
    if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        fields = os.environ.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",")
        repeated = [k for k in DEEPSPEED_OWNED_KEYS if k in fields]
        if repeated:
            raise ValueError(
                f"the accelerate config repeats {', '.join(repeated)}, which the DeepSpeed JSON "
                f"{os.environ['ACCELERATE_DEEPSPEED_CONFIG_FILE']} owns (Accelerate refuses that): remove them "
                "from the YAML; precision comes from train.precision, clipping from the JSON / optim.clip_grad")


def configure_deepspeed(accelerator, micro_batch_size: int, clip_grad: float, precision: str = "fp32",
                        load_universal: bool = False) -> None:
    """Fill the DeepSpeed values Accelerate cannot infer here, and check the ones a JSON fixes.

    We never hand our data loader to ``prepare`` (its sampler is ours), so the micro-batch size is
    set explicitly; ``gradient_clipping: "auto"`` would silently become 1.0, so it takes
    ``optim.clip_grad``, and an explicit JSON value must agree with the recipe. ``load_universal``:
    the run resumes a checkpoint of another rank count, read in DeepSpeed's universal format.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    conf = plugin.deepspeed_config
    mb = conf.get("train_micro_batch_size_per_gpu", "auto")
    if mb not in ("auto", None) and int(mb) != micro_batch_size:
        raise ValueError(f"the DeepSpeed config sets train_micro_batch_size_per_gpu={mb} but "
                         f"train.batch_size_per_device={micro_batch_size}; use \"auto\" or make them equal")
    conf["train_micro_batch_size_per_gpu"] = micro_batch_size
    if load_universal:
        conf.setdefault("checkpoint", {})["load_universal"] = True
    for key in ("bf16", "fp16"):
        enabled = conf.get(key, {}).get("enabled", "auto")
        if enabled not in ("auto", None) and bool(enabled) != (precision == key):
            raise ValueError(f"the DeepSpeed config sets {key}.enabled={str(enabled).lower()} but train.precision="
                             f"{precision}; use a config whose precision matches (\"auto\" follows train.precision)")
    clip = conf.get("gradient_clipping", "auto")
    if clip in ("auto", None):
        conf["gradient_clipping"] = clip_grad
    elif abs(float(clip) - clip_grad) > 1e-12:
        raise ValueError(f"the DeepSpeed config sets gradient_clipping={clip} but optim.clip_grad={clip_grad}; "
                         "make them equal (DINO uses 3.0)")
