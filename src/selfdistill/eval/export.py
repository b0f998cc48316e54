"""``run_eval.py export``: weights in any readable form written as this project's export."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from selfdistill.eval.protocols import EvalContext, Weights, register_protocol
from selfdistill.models import export_backbone, load_backbone

__all__ = ["ExportOptions", "export_protocol"]


@dataclass
class ExportOptions:
    part: str = field(default="eval", metadata={
        "help": "of a checkpoint or run: eval, the evaluated backbone (DINO: the EMA teacher), or student "
                "(full fp32 weights, gathered from ZeRO partitions)", "choices": ["eval", "student"]})
    checkpoint: str = field(default="", metadata={"help": "a checkpoint or run directory (the same as --weights)"})


@register_protocol("export", ExportOptions, output="file",
                   help="write a backbone as safetensors with the metadata that rebuilds it (timm loads it)")
def export_protocol(weights: Weights, options: ExportOptions, ctx: EvalContext) -> dict[str, Any]:
    """A checkpoint's or run's backbone (``--part``), or any weights file with ``--model.name`` /
    ``--weights-format`` (a DINO, DeiT, CLIP... release converted to timm keys), as an export."""
    spec = options.checkpoint or weights.require()
    if ctx.out is None:
        raise ValueError("export needs --out: the .safetensors file to write")
    if not ctx.is_main:
        return {}
    backbone, model_cfg = load_backbone(spec, weights.model, weights.format, options.part)
    path = export_backbone(backbone, ctx.out)
    print(f"wrote {path} (+ {path.with_suffix('.json').name})")
    return {"weights": spec, "model": model_cfg.name, "out": str(path)}
