"""``run_pretrain.py`` / ``selfdistill-pretrain``: pretrain with a YAML recipe and dotted overrides.

    python run_pretrain.py --config configs/dino_vit_small16.yaml data.path=/data/imagenet/train
    accelerate launch --num_processes 2 run_pretrain.py --config configs/demo.yaml
    python run_pretrain.py --config configs/dino_vit_small16.yaml train.batch_size_per_device=8 --benchmark 5
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from selfdistill.atomic import write_json_atomic
from selfdistill.configkit import ConfigError
from selfdistill.recipe import load_config
from selfdistill.rundir import CHECKPOINTS, LOG


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_pretrain.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append",
                   help="YAML recipe (configs/*.yaml); defaults are DINO ViT-S/16 ImageNet. Repeat it to stack "
                        "recipes (later files win key by key)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides, e.g. optim.lr=5e-4")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML, each key with where it was set, and exit")
    p.add_argument("--resume", default=None,
                   help="'auto' continues the latest checkpoint in train.output_dir; or a checkpoint/run directory")
    p.add_argument("--resume-elastic", action="store_true",
                   help="let the resumed run use another global batch (ranks x per-device batch x accumulation) than "
                        "the checkpoint: position and schedules are re-derived from the images seen")
    p.add_argument("--check-data", action="store_true",
                   help="decode every training image once before the first step (folder / HF data; progress bar) "
                        "and stop if more than data.max_bad_fraction are unreadable")
    p.add_argument("--demo", action="store_true",
                   help="prepare the embedded Fashion-MNIST demo data first and compare kNN at the end")
    p.add_argument("--plan", action="store_true",
                   help="plan the ZeRO strategy, micro-batch and accumulation instead of training; every other "
                        "option is selfdistill-plan's (run_pretrain.py --plan --help)")
    m = p.add_argument_group("memory measurement (what selfdistill-plan --verify runs)")
    m.add_argument("--measure-memory", metavar="DIR", default=None,
                   help="run --measure-steps steps on one synthetic batch as launched, no checkpoints; write each "
                        "rank's memory (peak, forward + backward, state counted by kind) to DIR/rank{N}.json")
    m.add_argument("--measure-steps", type=int, default=3, metavar="N",
                   help="optimizer steps to run (default 3: the first allocates the optimizer state, DDP rebuilds "
                        "its buckets in the second; the last one's forward + backward is reported)")
    m.add_argument("--measure-flops", action="store_true", help="also count the FLOPs of one more step")
    b = p.add_argument_group("throughput benchmark (no checkpoints, no exports)")
    b.add_argument("--benchmark", type=int, default=0, metavar="N",
                   help="time N optimizer steps of the recipe through the trainer and print images/s, the step "
                        "split (data/forward/backward/optimizer/EMA), peak memory and achieved FLOP/s")
    b.add_argument("--benchmark-warmup", type=int, default=1, metavar="W", help="untimed steps first (default 1)")
    b.add_argument("--benchmark-data", choices=["synthetic", "real"], default="synthetic",
                   help="synthetic: one batch of random images through the recipe's augmentation, repeated "
                        "(measures the model); real: data.path through the configured loader")
    b.add_argument("--benchmark-json", default=None, metavar="PATH", help="also write the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--plan" in argv:
        from selfdistill.cli.plan import main as plan

        return plan([a for a in argv if a != "--plan"])
    args = build_parser().parse_args(argv)
    sources: dict[str, str] = {}
    try:
        config = load_config(args.config, args.overrides, sources)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    if args.print_config:
        from selfdistill.configkit import annotated_yaml

        print(annotated_yaml(config.to_dict(), sources), end="")
        return 0
    if args.benchmark:
        return _benchmark(config, args)
    if args.measure_memory:
        from selfdistill.plan_probe import measure

        measure(config, args.measure_memory, args.measure_steps, args.measure_flops)
        return 0

    try:  # (a benchmark or memory measurement above reads synthetic images: no data paths needed)
        check_launch(config, demo=args.demo)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    from selfdistill.engine.distributed import relaunch_if_needed

    relaunch_if_needed()
    import os

    from selfdistill.cli import setup_logging

    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank == 0)
    if args.demo:
        from selfdistill.demo import prepare_demo_data

        root = Path(config.data.path).parent
        if rank == 0:
            info = prepare_demo_data(root, size=config.data.global_crop_size)
            print(f"demo data: {info['source']}: {info['n_train']} train / {info['n_test']} test images in {root}")
        else:  # rank 0 writes the data; the others wait for it (on a shared filesystem)
            import time

            deadline = time.monotonic() + 1800
            while not (root / "info.json").is_file():
                if time.monotonic() > deadline:
                    print(f"error: rank {rank} waited 30 min for rank 0 to write {root / 'info.json'}", file=sys.stderr)
                    return 1
                time.sleep(1)

    from selfdistill.cli import one_line, release
    from selfdistill.data import BadDataError
    from selfdistill.engine.trainer import NonFiniteLossError, Preempted
    from selfdistill.pretrain import pretraining

    run_dir = Path(config.train.output_dir)
    new_run_dir = not run_dir.exists()
    try:
        summary = pretraining(config, resume=args.resume, check_data=args.check_data,
                              resume_elastic=args.resume_elastic).fit()
    except (ValueError, FileNotFoundError, NonFiniteLossError, BadDataError) as e:
        logging.getLogger("selfdistill").error("%s", one_line(e))
        release(e)
        if new_run_dir and rank == 0:
            remove_unused_run_dir(run_dir)
        return 2 if isinstance(e, ConfigError) else 1
    except Preempted as e:  # the checkpoint is written; exit 75 asks the launcher script to requeue
        logging.getLogger("selfdistill").warning("%s", e)
        return e.exit_code
    if args.demo and summary["rank"] == 0:
        _report_demo(config)
    return 0


def check_launch(config, demo: bool = False) -> None:
    """What can be refused from the recipe alone, before anything is loaded or written (a
    ConfigError naming the key): local data paths that do not exist (``--demo`` writes its own)."""
    if demo:
        return
    from selfdistill.data.images import local_root

    fixes = {"data.path": "point it at the training images",
             "knn.train_path": "point it at labelled images, or leave it empty to use data.path",
             "knn.val_path": "point it at labelled images, or set knn.val_path='' to train without the online kNN"}
    for key, fix in fixes.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        root = local_root(value) if isinstance(value, str) else None
        if root is not None and not root.exists():
            raise ConfigError(f"config error: {key}: {value!r} does not exist; {fix}")


def remove_unused_run_dir(run_dir: Path) -> None:
    """After a failed launch: the run directory this launch created, unless it holds what a run
    keeps (a checkpoint or a training log); config.yaml, provenance and tracker files alone describe
    a run that never started."""
    import shutil

    if run_dir.is_dir() and not (run_dir / LOG).exists() and not any((run_dir / CHECKPOINTS).glob("*")):
        shutil.rmtree(run_dir, ignore_errors=True)


def _benchmark(config, args) -> int:
    import os

    from selfdistill.engine.throughput import format_report, run_benchmark
    from selfdistill.methods import build_method

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = run_benchmark(config, build_method, args.benchmark, args.benchmark_warmup, args.benchmark_data)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_report(report))
        if args.benchmark_json:
            write_json_atomic(args.benchmark_json, report, indent=1)
    return 0


def _report_demo(config) -> None:
    from selfdistill.demo import compare_representations

    run_dir = Path(config.train.output_dir)
    rows = compare_representations(config, run_dir)
    write_json_atomic(run_dir / "demo_results.json", rows, indent=1)
    print("\nkNN on the held-out split (weighted kNN, T=0.07; top-1 %):")
    ks = sorted({int(k.split("_k")[1]) for r in rows.values() for k in r if k.startswith("top1_k")})
    print(f"{'features':28s}" + "".join(f"{'k=' + str(k):>9s}" for k in ks))
    for name, r in rows.items():
        print(f"{name:28s}" + "".join(f"{r[f'top1_k{k}']:9.2f}" for k in ks))
    print(f"\nrun directory: {run_dir}  (config.yaml, log.jsonl, TensorBoard events, loss_curve.png, "
          "export/teacher_backbone.safetensors, demo_results.json)")


if __name__ == "__main__":
    sys.exit(main())
