"""``run_eval.py`` sub-commands built from the evaluation-protocol registry (``linear``,
``retrieval``, ``copydetect``, ... and ``summary``): each protocol's options dataclass becomes its
arguments, so the command line, the summary YAML and the Python API take the same options."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Callable


def _weights_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--weights", required=required,
                   help="exported .safetensors, a bare timm weights file (.safetensors/.pth/.bin; needs "
                        "--model.name), a checkpoint or run directory, or 'random'")
    p.add_argument("--weights-format", default="timm",
                   help="key layout of a bare weights file (selfdistill.models.teachers formats; default timm)")
    p.add_argument("--model.name", dest="model_name", help="timm name (for 'random' and bare weight files)")
    p.add_argument("--model.img_size", dest="img_size", type=int)
    p.add_argument("--model.patch_size", dest="patch_size", type=int)
    p.add_argument("--model.kwargs", dest="model_kwargs", help="other timm.create_model keywords, as YAML: "
                   "'{depth: 2, embed_dim: 32}'")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")


def add_protocol_command(sub: Any, name: str) -> argparse.ArgumentParser:
    """``run_eval.py <name>``: the protocol's options plus the weights / output arguments."""
    from selfdistill.eval.protocols import add_options_arguments, get_protocol

    proto = get_protocol(name)
    p = sub.add_parser(name, help=proto.help, description=proto.fn.__doc__)
    _weights_arguments(p)
    add_options_arguments(p, proto.options)
    p.add_argument("--out", help=f"results JSON (default: {name}_results.json beside --weights, or ./)")
    p.add_argument("--output-dir", help=f"directory for the protocol's files (default: <--out's directory>/{name})")
    return p


def add_summary_command(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("summary", help="run several protocols on one set of weights; one JSON + markdown table",
                       description="python run_eval.py summary --weights W --protocols knn,linear "
                                   "--data.path TRAIN --data.val_path VAL [linear.epochs=10 ...] "
                                   "or --config plan.yaml (see selfdistill.eval.summary)")
    _weights_arguments(p, required=False)
    p.add_argument("--config", help="summary YAML (weights, model, data, protocols with their options)")
    p.add_argument("--protocols", help="comma-separated protocols to run, in order (default: the YAML's)")
    p.add_argument("--data.path", dest="data_path", help="shared labelled training images (train_path)")
    p.add_argument("--data.val_path", dest="data_val_path", help="shared labelled validation images (val_path)")
    p.add_argument("--out-dir", help="where summary.json, summary.md and each protocol's files go "
                                     "(default: eval_summary/ beside --weights, or ./eval_summary)")
    p.add_argument("overrides", nargs="*", metavar="protocol.key=value",
                   help="protocol options, e.g. linear.epochs=10 retrieval.gnd=/data/gnd_roxford5k.pkl")
    return p


def _model_config(args: argparse.Namespace, tree: dict[str, Any] | None = None):
    import yaml

    from selfdistill.config import ModelConfig

    base = dict((tree or {}).get("model") or {})
    if args.model_name:
        base["name"] = args.model_name
    if args.img_size is not None:
        base["img_size"] = args.img_size
    if args.patch_size is not None:
        base["patch_size"] = args.patch_size
    if args.model_kwargs:
        kw = yaml.safe_load(args.model_kwargs)
        if not isinstance(kw, dict):
            raise ValueError(f"--model.kwargs must be a YAML mapping, got {args.model_kwargs!r}")
        base["kwargs"] = kw
    if not base:
        return None
    if "name" not in base:
        raise ValueError("the model needs a timm name (--model.name or model.name in the YAML)")
    return ModelConfig(name=base["name"], img_size=base.get("img_size"), patch_size=base.get("patch_size"),
                       drop_path_rate=0.0, kwargs=dict(base.get("kwargs") or {}))


def _context(cpu: bool, out_dir: Path):
    from selfdistill.engine.distributed import make_accelerator, relaunch_if_needed
    from selfdistill.eval.protocols import EvalContext

    relaunch_if_needed()
    rank = int(os.environ.get("RANK", "0"))
    logging.getLogger().setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return EvalContext(make_accelerator("fp32", 1, cpu, [], None), out_dir)


def _default_dir(weights: str) -> Path:
    p = Path(weights)
    return (p if p.is_dir() else p.parent) if p.exists() else Path(".")


def run_protocol_command(args: argparse.Namespace) -> int:
    from selfdistill.atomic import write_json_atomic
    from selfdistill.eval.protocols import Weights, get_protocol, options_from_args, run_protocol

    name = args.command
    options = options_from_args(get_protocol(name).options, args)
    out = Path(args.out) if args.out else _default_dir(args.weights) / f"{name}_results.json"
    ctx = _context(args.cpu, Path(args.output_dir) if args.output_dir else out.parent / name)
    weights = Weights(args.weights, _model_config(args), args.weights_format)
    result = run_protocol(name, weights, options, ctx)
    if ctx.is_main:
        width = max(len(k) for k in result["metrics"]) if result["metrics"] else 0
        for k, v in result["metrics"].items():
            print(f"{k:<{width}}  {v:.2f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
        write_json_atomic(out, result)
        print(f"results written to {out}")
    return 0


def run_summary_command(args: argparse.Namespace) -> int:
    from selfdistill.config import parse_override
    from selfdistill.eval.protocols import Weights
    from selfdistill.eval.summary import build_plan, format_markdown, load_plan_file, run_summary

    tree: dict[str, Any] = load_plan_file(args.config) if args.config else {"protocols": {}}
    sections: dict[str, Any] = {k: dict(v) for k, v in tree["protocols"].items()}
    data = dict(tree.get("data") or {})
    if args.data_path:
        data["path"] = args.data_path
    if args.data_val_path:
        data["val_path"] = args.data_val_path
    names = [n.strip() for n in args.protocols.split(",") if n.strip()] if args.protocols else list(sections)
    for item in args.overrides:
        key, value = parse_override(item)
        proto, _, option = key.partition(".")
        if not option:
            raise ValueError(f"override {item!r} must look like protocol.key=value")
        if proto == "data":
            data[option] = value
        elif proto not in names:
            raise ValueError(f"override {item!r}: {proto!r} is not among the protocols run ({', '.join(names)})")
        else:
            sections.setdefault(proto, {})[option] = value
    sections = {n: s for n, s in sections.items() if n in names}  # a YAML may list more than --protocols picks
    weights_spec = args.weights or tree.get("weights")
    if not weights_spec:
        raise ValueError("summary needs --weights (or 'weights' in the YAML)")
    plan = build_plan(names, sections, data)
    out_dir = Path(args.out_dir) if args.out_dir else _default_dir(weights_spec) / "eval_summary"
    ctx = _context(args.cpu, out_dir)
    fmt = args.weights_format if args.weights_format != "timm" else tree.get("weights_format", "timm")
    summary = run_summary(Weights(str(weights_spec), _model_config(args, tree), fmt), plan, ctx)
    if ctx.is_main:
        print(format_markdown(summary))
        print(f"written: {out_dir / 'summary.json'}, {out_dir / 'summary.md'}")
    return 1 if summary["failed"] else 0


def protocol_handlers(names: tuple[str, ...]) -> dict[str, Callable[[argparse.Namespace], int]]:
    return {n: run_protocol_command for n in names}


__all__ = ["add_protocol_command", "add_summary_command", "protocol_handlers", "run_protocol_command",
           "run_summary_command"]
