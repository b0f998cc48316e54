"""``run_eval.py`` / ``selfdistill-eval``: every sub-command is a protocol of the registry
(:mod:`selfdistill.eval.protocols`), with the same weights and output options everywhere.

    python run_eval.py knn --weights runs/dino --data.path TRAIN --data.val_path VAL
    python run_eval.py knn --weights runs/dino data.path=TRAIN data.val_path=VAL knn.k=[20]
    python run_eval.py linear --weights W --data.path TRAIN --data.val_path VAL [--recipe dino|smd]
    python run_eval.py finetune --config configs/finetune_fd_vit_base16.yaml --weights W data.path=T data.val_path=V
    python run_eval.py retrieval --weights W --gnd /data/roxford5k/gnd_roxford5k.pkl
    python run_eval.py copydetect --weights W --data.path /data/copydays [--whitening-path DIR]
    python run_eval.py summary --weights W --protocols knn,linear --data.path TRAIN --data.val_path VAL
    python run_eval.py pictures --weights runs/dino --images photo.jpg
    python run_eval.py export --weights runs/dino --part student --out student.safetensors

Every option is also a ``section.key=value`` word, as in run_pretrain.py: ``data.path=TRAIN``,
``knn.image_size=32``, ``model.name=vit_small_patch16_224`` (``<command>.<option>`` for each option).
``knn --weights RUN`` takes the settings it is not given from the run's config.yaml.

Under ``accelerate launch --num_processes N`` every protocol splits its images over the N processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from selfdistill.cli import dispatch, setup_logging
from selfdistill.rundir import eval_dir, eval_results


def build_parser() -> argparse.ArgumentParser:
    from selfdistill.eval.protocols import (add_options_arguments, add_weights_arguments, get_protocol, override_keys,
                                            protocol_names)

    p = argparse.ArgumentParser(prog="run_eval.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in protocol_names():
        proto = get_protocol(name)
        keys = ", ".join(k for k in override_keys(proto) if not k.startswith("model."))
        sp = sub.add_parser(name, help=proto.help, description=proto.fn.__doc__, allow_abbrev=False,
                            epilog=f"Every option is also a section.key=value word: {keys}, model.name, model.kwargs, "
                                   "... (values read as YAML).")
        add_weights_arguments(sp, proto)
        add_options_arguments(sp, proto.options)
    return p


def _context(args: argparse.Namespace, proto: Any, weights: Any) -> Any:
    """Where the results and files go (``--out`` as the protocol's ``output`` says) and a factory
    of the Accelerator (gloo ranks on CPU)."""
    from selfdistill.engine.distributed import make_accelerator
    from selfdistill.eval.protocols import EvalContext

    out = Path(args.out) if args.out else None
    if proto.output == "results":
        out = out or eval_results(weights.directory(), proto.name)
        out_dir = Path(args.output_dir) if args.output_dir else eval_dir(out.parent, proto.name)
    elif proto.output == "summary":  # the defaults follow the weights, which the summary YAML may name
        out_dir = Path(args.output_dir) if args.output_dir else None
    elif proto.output == "file":
        out_dir = out.parent if out else Path(".")
    else:
        out_dir = out or Path(".")
    return EvalContext(lambda: make_accelerator("fp32", 1, args.cpu, [], None), out_dir, out, args.cpu)


def run_command(args: argparse.Namespace) -> int:
    from selfdistill.atomic import write_json_atomic
    from selfdistill.engine.distributed import relaunch_if_needed
    from selfdistill.cli import one_line, release
    from selfdistill.data import BadDataError
    from selfdistill.engine.trainer import NonFiniteLossError, Preempted
    from selfdistill.eval.protocols import Weights, get_protocol, model_config_from, options_from_args, run_protocol

    proto = get_protocol(args.command)
    options = options_from_args(proto.options, args)
    weights = Weights(args.weights, model_config_from(args), args.weights_format)
    relaunch_if_needed()
    if int(os.environ.get("RANK", "0")) != 0:
        setup_logging(False)
    ctx = _context(args, proto, weights)
    try:
        result = run_protocol(proto.name, weights, options, ctx)
    except (NonFiniteLossError, BadDataError) as e:
        logging.getLogger("selfdistill").error("%s", one_line(e))
        release(e)
        return 1
    except Preempted as e:  # fine-tuning: checkpoint written, continue with --resume auto
        logging.getLogger("selfdistill").warning("%s", e)
        return e.exit_code
    if proto.output == "summary":
        return 1 if result.get("failed") else 0
    if proto.output == "results" and ctx.is_main:
        width = max((len(k) for k in result["metrics"]), default=0)
        for k, v in result["metrics"].items():
            print(f"{k:<{width}}  {v:.2f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
        write_json_atomic(ctx.out, result)
        print(f"results written to {ctx.out}")
    return 0


def expand(argv: list[str]) -> list[str]:
    """The sub-command's ``section.key=value`` words as its options (the grammar of every entry point)."""
    from selfdistill.eval.protocols import expand_overrides, get_protocol, protocol_names

    i = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if i is None or argv[i] not in protocol_names():
        return argv
    return [*argv[:i + 1], *expand_overrides(get_protocol(argv[i]), argv[i + 1:])]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        argv = expand(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    setup_logging(int(os.environ.get("RANK", "0")) == 0)
    return dispatch(run_command, args)


if __name__ == "__main__":
    sys.exit(main())
