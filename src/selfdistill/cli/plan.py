"""``selfdistill-plan`` / ``run_pretrain.py --plan``: which ZeRO strategy, activation checkpointing,
micro-batch and accumulation fit a recipe on the target devices, and the launch files for it.

    selfdistill-plan --config configs/dino_vit_small16.yaml model.name=vit_base_patch16_224 \\
        --gpu-memory 40GiB --gpus 8 --global-batch 1024 --write plans/vitb
    selfdistill-plan --config configs/demo.yaml --cpu --gpus 2 --gpu-memory 8GiB --global-batch 64 --verify
    selfdistill-plan --config configs/demo.yaml plan.cpu=true plan.gpus=2 plan.gpu_memory=8GiB plan.global_batch=64

Each option is also a ``plan.key=value`` word, as recipe keys are ``section.key=value``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from selfdistill.configkit import ConfigError
from selfdistill.recipe import load_config


def build_parser() -> argparse.ArgumentParser:
    from selfdistill.strategy_memory import STRATEGIES

    p = argparse.ArgumentParser(prog="selfdistill-plan", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", help="YAML recipe (configs/*.yaml); repeat it to stack recipes")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides of the recipe")
    t = p.add_argument_group("target")
    t.add_argument("--gpu-memory", default=None,
                   help="memory per rank, e.g. 80GiB or 40GB (default: the visible GPU's)")
    t.add_argument("--gpus", type=int, default=None, help="ranks per machine (default: the visible GPUs, else 8)")
    t.add_argument("--nodes", type=int, default=1, help="machines (default 1)")
    t.add_argument("--global-batch", type=int, default=None,
                   help="images per optimizer step (default: the recipe's per-device batch x accumulation x ranks)")
    t.add_argument("--margin", type=float, default=0.10, help="fraction of the memory left unplanned (default 0.10)")
    t.add_argument("--reserve", default=None,
                   help="memory outside the allocator per rank: CUDA context, NCCL (default 1.5GiB; 0 with --cpu)")
    t.add_argument("--cpu", action="store_true", help="plan CPU ranks over gloo (memory is the resident set)")
    t.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    m = p.add_argument_group("measurement and estimate")
    m.add_argument("--probe-batches", type=int, nargs=2, default=[2, 4], metavar=("B1", "B2"),
                   help="the two micro-batch sizes forward + backward is measured at (default 2 4)")
    m.add_argument("--tflops", type=float, default=None, help="achieved training TFLOP/s per rank (default 125)")
    m.add_argument("--bandwidth", type=float, default=None, help="collective bandwidth in a node, GB/s (default 150)")
    m.add_argument("--inter-node-bandwidth", type=float, default=None, help="per GPU between nodes, GB/s (default 25)")
    o = p.add_argument_group("output")
    o.add_argument("--write", metavar="DIR", help="write the recommended launch: accelerate.yaml, deepspeed.json, "
                                                  "overrides.txt, launch.sh, plan.md, plan.json")
    o.add_argument("--choose", metavar="STRATEGY[:ckpt]", default=None,
                   help="write this row instead of the recommended one, e.g. zero3:ckpt or ddp")
    o.add_argument("--verify", action="store_true",
                   help="run real steps of the written setting on this machine (its GPUs, or 2 gloo ranks) and "
                        "compare the measured peak memory per rank with the prediction")
    o.add_argument("--verify-micro-batch", type=int, default=0, metavar="N",
                   help="at most this micro-batch in the verification run (default: the plan's; 4 on a CPU)")
    o.add_argument("--json", metavar="PATH", help="also write the plan as JSON")
    m.add_argument("--profile", metavar="PLAN_JSON", default=None,
                   help="reuse the measured profile of an earlier plan.json of the same recipe instead of measuring")
    return p


def main(argv: list[str] | None = None) -> int:
    import torch

    from selfdistill import plan_probe, planner as P

    from selfdistill.configkit import option_overrides

    parser = build_parser()
    try:  # its own options also as plan.key=value, beside the recipe's section.key=value
        argv = option_overrides(parser, "plan", sys.argv[1:] if argv is None else list(argv))
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
        if args.gpu_memory is None:
            if args.cpu or not torch.cuda.is_available():
                raise ValueError("no GPU is visible here: give the target's memory per rank, e.g. --gpu-memory 80GiB")
            args.gpu_memory = torch.cuda.get_device_properties(0).total_memory
        gpus = args.gpus or (torch.cuda.device_count() if torch.cuda.is_available() and not args.cpu else 8)
        t = config.train
        global_batch = args.global_batch or t.batch_size_per_device * t.grad_accum_steps * gpus * args.nodes
        reserve = P.parse_bytes(args.reserve, "--reserve") if args.reserve is not None else \
            (0 if args.cpu else int(1.5 * P.GIB))
        target = P.Target(memory=P.parse_bytes(args.gpu_memory, "--gpu-memory"), gpus=gpus, nodes=args.nodes,
                          global_batch=global_batch,
                          margin=args.margin, reserve=reserve, cpu=args.cpu)
        if target.ranks < 1 or global_batch < 1 or not 0 <= args.margin < 1:
            raise ValueError("--gpus, --nodes and --global-batch must be positive and --margin in [0, 1)")
        P.split_batch(global_batch, target.ranks, global_batch)  # a global batch the ranks cannot split: say so now
        timing = P.Timing(**{k: v for k, v in (("tflops", args.tflops), ("bandwidth_gbs", args.bandwidth),
                                                ("inter_node_gbs", args.inter_node_bandwidth)) if v is not None})
        if args.profile:
            profile = P.Profile.from_dict(json.loads(Path(args.profile).read_text())["profile"])
        else:
            refuse_impossible_budget(config, target, args.strategies)
            profile = plan_probe.profile_recipe(config, " + ".join(args.config or ["(defaults)"]),
                                                tuple(args.probe_batches),
                                                progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        rows, best = P.plan(profile, target, args.strategies, timing)
        chosen = P.choose(rows, args.choose) if args.choose else best
    except ImpossibleBudget as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = P.render(rows, best, profile, target)
    print(table)
    report = {"profile": asdict(profile), "target": asdict(target), "timing": asdict(timing),
              "rows": [asdict(r) for r in rows], "recommended": best, "chosen": chosen}
    if chosen is None:
        memory, row = P.smallest_fitting_memory(profile, target, args.strategies)
        print(f"\nerror: nothing to write: no row fits in --gpu-memory {_size(target.memory)}; the smallest memory "
              f"per rank that fits is {_size(memory)} ({row}, micro-batch 1)", file=sys.stderr)
        return 1
    row = rows[chosen]
    recipe, overrides = args.config, list(args.overrides)
    out = Path(args.write) if args.write else None
    if out is not None:
        files = P.write_launch(out, row, target, recipe, overrides, config.train.precision, config.optim.clip_grad,
                               cpu=args.cpu)
        from selfdistill.atomic import write_json_atomic, write_text_atomic

        write_text_atomic(out / "plan.md", table + "\n")
        write_json_atomic(out / "plan.json", report, indent=1)
        print(f"\nwritten to {out}: " + ", ".join(p.name for p in files.values()) + ", plan.md, plan.json")
        print(f"launch: {files['launch']}")
    if args.verify:
        import tempfile

        work = out / "verify" if out is not None else Path(tempfile.mkdtemp(prefix="selfdistill-verify-"))
        cap = args.verify_micro_batch or (0 if torch.cuda.is_available() else 4)
        print(f"\nverifying {row.strategy} (checkpointing {'on' if row.ckpt else 'off'}) on this machine ...",
              file=sys.stderr, flush=True)
        try:
            v = plan_probe.verify(profile, row, target, recipe, overrides, config.train.precision, config.optim.clip_grad,
                         work, micro_cap=cap)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        report["verify"] = v
        print(f"verify: {v['ranks']} ranks, micro-batch {v['micro_batch']}: predicted peak "
              f"{v['predicted_peak'] / P.GIB:.2f} GiB per rank, measured {v['measured_peak'] / P.GIB:.2f} GiB "
              f"({v['error']:+.1%}); state predicted {v['predicted_state'] / P.GIB:.3f} GiB, "
              f"counted {v['measured_state'] / P.GIB:.3f} GiB")
        print(f"verify measurements and logs: {work}")
    if args.json:
        from selfdistill.atomic import write_json_atomic

        write_json_atomic(args.json, report, indent=1)
    return 0


class ImpossibleBudget(ValueError):
    """The target's memory cannot hold the recipe whatever the strategy."""


def refuse_impossible_budget(config, target, strategies: list[str]) -> None:
    """Before the minute of measuring: refuse a memory per rank that not even the training state
    of the leanest strategy fits, naming the least memory that might (activations come on top)."""
    from selfdistill import plan_probe, planner as P

    profile = plan_probe.unmeasured_profile(config)
    if profile is None:
        return
    floor, strategy = P.state_floor(profile, target, strategies)
    if floor > target.budget:
        raise ImpossibleBudget(
            f"--gpu-memory {_size(target.memory)} cannot hold this recipe on {target.ranks} ranks: even "
            f"{strategy} keeps {_size(floor)} of training state per rank, so at least "
            f"{_size(P.memory_for(floor, target))} per rank are needed (with --margin {target.margin} and "
            f"--reserve {_size(target.reserve)}, before activations); give more memory or ranks")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f}GiB" if n >= 2**30 else f"{n / 2**20:.1f}MiB"


if __name__ == "__main__":
    sys.exit(main())
