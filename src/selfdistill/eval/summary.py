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
from pathlib import Path
from typing import Any

from selfdistill.atomic import write_json_atomic, write_text_atomic
from selfdistill.eval.protocols import (
    EvalContext,
    Weights,
    get_protocol,
    options_from_dict,
    protocol_names,
    run_protocol,
)

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


def run_summary(weights: Weights, plan: dict[str, Any], ctx: EvalContext) -> dict[str, Any]:
    """Run every protocol of ``plan`` on ``weights``; write ``summary.json`` and ``summary.md``
    (and each protocol's ``results.json``) under ``ctx.out_dir``. A protocol that fails with a
    user error is recorded with its message and the others still run."""
    results: dict[str, Any] = {}
    for name, options in plan.items():
        sub = EvalContext(ctx.accelerator, ctx.out_dir / name)
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
        write_json_atomic(ctx.out_dir / "summary.json", summary)
        write_text_atomic(ctx.out_dir / "summary.md", format_markdown(summary))
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
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"summary plan {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: expected a mapping with 'protocols'")
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


__all__ = ["build_plan", "format_markdown", "load_plan_file", "run_summary"]
