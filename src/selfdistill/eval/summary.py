"""Several protocols on one set of weights: one JSON and one markdown table.

The plan comes from ``--protocols knn,linear,...`` plus dotted ``protocol.key=value`` overrides,
or from a small YAML::

    weights: runs/dino/export/teacher_backbone.safetensors   # --weights wins
    model: {name: vit_small_patch16_224}                     # only for files without metadata / 'random'
    data: {path: /data/imagenet/train, val_path: /data/imagenet/val}   # shared train/val paths
    protocols:
      knn: {}
      linear: {recipe: dino, epochs: 100, n_last_blocks: 4}
      retrieval: {gnd: /data/roxford5k/gnd_roxford5k.pkl, image_size: 224}
      copydetect: {path: /data/copydays, whitening_path: /data/yfcc20k}

``data.path`` / ``data.val_path`` fill a protocol's ``train_path`` / ``val_path`` unless its own
section sets them. The backbone is loaded once; each protocol writes its files (a linear head,
checkpoints) under ``<out>/<protocol>/``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfdistill.atomic import write_json_atomic, write_text_atomic
from selfdistill.configkit import parse_override, read_recipe
from selfdistill.eval.protocols import (
    EvalContext,
    Weights,
    get_protocol,
    model_config,
    options_from_dict,
    protocol_names,
    register_protocol,
    run_protocol,
)
from selfdistill.rundir import SUMMARY, eval_summary

log = logging.getLogger(__name__)

SHARED_DATA = {"path": "train_path", "val_path": "val_path"}


def build_plan(protocols: list[str], sections: dict[str, Any] | None = None,
               data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Typed options for each protocol, in order: its YAML section over the shared data paths."""
    sections, data = dict(sections or {}), dict(data or {})
    unknown_data = set(data) - set(SHARED_DATA)
    if unknown_data:
        raise ValueError(f"summary data: unknown key(s) {sorted(unknown_data)}; use {sorted(SHARED_DATA)}")
    if not protocols:
        raise ValueError(f"summary: no protocol chosen (available: {', '.join(protocol_names())})")
    extra = set(sections) - set(protocols)
    if extra:
        raise ValueError(f"summary: options given for {sorted(extra)}, which are not among the protocols run "
                         f"({', '.join(protocols)})")
    plan: dict[str, Any] = {}
    for name in protocols:
        if name in plan:
            raise ValueError(f"summary: protocol {name!r} is listed twice")
        proto = get_protocol(name)
        if not proto.in_summary:
            raise ValueError(f"summary: {name!r} is not a measuring protocol (summary runs: "
                             f"{', '.join(n for n in protocol_names() if get_protocol(n).in_summary)})")
        fields = {f.name for f in dataclasses.fields(proto.options)}
        section = dict(sections.get(name) or {})
        for key, target in SHARED_DATA.items():
            if key in data and target in fields and target not in section:
                section[target] = data[key]
        missing = [f.name for f in dataclasses.fields(proto.options)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in section]
        if missing:
            raise ValueError(f"summary: protocol {name!r} needs {', '.join(f'{name}.{m}' for m in missing)}"
                             + (" (or --data.path / --data.val_path)" if set(missing) & set(SHARED_DATA.values())
                                else ""))
        plan[name] = options_from_dict(proto.options, section, name)
    return plan


def run_summary(weights: Weights, plan: dict[str, Any], ctx: EvalContext, out: Path | None = None) -> dict[str, Any]:
    """Run every protocol of ``plan`` on ``weights``; write ``summary.json`` (at ``out``, default
    under ``ctx.out_dir``) and ``summary.md`` beside it, and each protocol's ``results.json`` under
    ``ctx.out_dir/<protocol>``. A protocol that fails with a user error is recorded with its
    message and the others still run."""
    results: dict[str, Any] = {}
    for name, options in plan.items():
        sub = ctx.child(name)
        start = time.monotonic()
        try:
            res = run_protocol(name, weights, options, sub)
        except (ValueError, FileNotFoundError) as e:
            log.error("summary: %s failed: %s", name, e)
            res = {"protocol": {"name": name}, "error": str(e), **weights.describe()}
        res["seconds"] = round(time.monotonic() - start, 1)
        res["options"] = dataclasses.asdict(options)
        results[name] = res
        if ctx.is_main and "error" not in res:
            write_json_atomic(sub.out_dir / "results.json", res)
    summary = {**weights.describe(), "protocols": results,
               "failed": [n for n, r in results.items() if "error" in r]}
    if ctx.is_main:
        out = out or ctx.out_dir / SUMMARY
        write_json_atomic(out, summary)
        write_text_atomic(out.with_suffix(".md"), format_markdown(summary))
    return summary


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def format_markdown(summary: dict[str, Any]) -> str:
    """One table row per metric, then each protocol's description."""
    model = summary.get("model") or {}
    lines = ["# Evaluation summary", "",
             f"Weights: `{summary.get('weights')}`" + (f" (timm `{model['name']}`)" if model.get("name") else ""), "",
             "| protocol | metric | value |", "|---|---|---|"]
    for name, res in summary["protocols"].items():
        if "error" in res:
            lines.append(f"| {name} | error | {res['error'].replace('|', '/')} |")
            continue
        for metric, value in res["metrics"].items():
            lines.append(f"| {name} | {metric} | {_fmt(value)} |")
    lines += ["", "## Protocols", ""]
    for name, res in summary["protocols"].items():
        desc = res.get("protocol", {}).get("description", "")
        lines.append(f"- **{name}**" + (f": {desc}" if desc else "") + (f" ({res['seconds']} s)" if "seconds" in res else ""))
    return "\n".join(lines) + "\n"


def load_plan_file(path: str | Path) -> dict[str, Any]:
    """The summary YAML: ``weights``, ``model``, ``data``, ``protocols`` (a mapping or a list of names)."""
    tree = read_recipe(path)
    unknown = set(tree) - {"weights", "model", "data", "protocols", "weights_format"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)} (use weights, weights_format, model, data, "
                         "protocols)")
    protos = tree.get("protocols") or {}
    if isinstance(protos, list):
        protos = {str(n): {} for n in protos}
    if not isinstance(protos, dict):
        raise ValueError(f"{path}: 'protocols' must map protocol names to their options (or list names)")
    tree["protocols"] = {str(k): (v or {}) for k, v in protos.items()}
    return tree


@dataclass
class SummaryOptions:
    config: str = field(default="", metadata={"help": "summary YAML (weights, model, data, protocols with their "
                                                      "options)"})
    protocols: str = field(default="", metadata={"help": "comma-separated protocols to run, in order (default: "
                                                         "the YAML's)"})
    data_path: str = field(default="", metadata={"help": "shared labelled training images (each protocol's "
                                                         "train_path)", "flags": ["--data.path"]})
    data_val_path: str = field(default="", metadata={"help": "shared labelled validation images (val_path)",
                                                     "flags": ["--data.val_path"]})
    overrides: list[str] = field(default_factory=list, metadata={
        "help": "protocol options, e.g. linear.epochs=10 retrieval.gnd=/data/gnd_roxford5k.pkl", "positional": True,
        "metavar": "protocol.key=value"})


@register_protocol("summary", SummaryOptions, help="several protocols on one set of weights: one JSON and a "
                                                   "markdown table", output="summary")
def summary_protocol(weights: Weights, options: SummaryOptions, ctx: EvalContext) -> dict[str, Any]:
    """python run_eval.py summary --weights W --protocols knn,linear --data.path TRAIN --data.val_path VAL
    [linear.epochs=10 ...], or --config plan.yaml (see selfdistill.eval.summary)."""
    tree: dict[str, Any] = load_plan_file(options.config) if options.config else {"protocols": {}}
    sections: dict[str, Any] = {k: dict(v) for k, v in tree["protocols"].items()}
    data = dict(tree.get("data") or {})
    if options.data_path:
        data["path"] = options.data_path
    if options.data_val_path:
        data["val_path"] = options.data_val_path
    names = [n.strip() for n in options.protocols.split(",") if n.strip()] if options.protocols else list(sections)
    for item in options.overrides:
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
    if not weights.spec:
        weights.spec = tree.get("weights")
    weights.require()
    if weights.model is None:
        weights.model = model_config(tree.get("model") or {})
    if weights.format == "timm":
        weights.format = tree.get("weights_format", "timm")
    plan = build_plan(names, sections, data)
    ctx.out = ctx.out or eval_summary(weights.directory())
    ctx.out_dir = ctx.out_dir or ctx.out.parent
    summary = run_summary(weights, plan, ctx, ctx.out)
    if ctx.is_main:
        print(format_markdown(summary))
        print(f"written: {ctx.out}, {ctx.out.with_suffix('.md') if ctx.out else ''}")
    return summary


__all__ = ["SummaryOptions", "build_plan", "format_markdown", "load_plan_file", "run_summary", "summary_protocol"]
