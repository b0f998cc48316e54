"""Weights in and out: safetensors export that timm loads, and loading backbones for evaluation."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from selfdistill.config import ModelConfig
from selfdistill.models import Backbone

METADATA_KEY = "selfdistill"


def export_backbone(backbone: Backbone, model_cfg: ModelConfig, path: str | Path) -> Path:
    """Write the backbone's timm state dict as safetensors (atomically) plus a JSON sidecar.

    Load it with ``timm.create_model(name, pretrained=True, num_classes=0,
    pretrained_cfg_overlay=dict(file=path))`` (``num_classes=0``, or any other class count for a
    fresh classifier: the file holds no classifier, so timm's strict 1000-class load cannot apply).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"timm_name": model_cfg.name, "img_size": model_cfg.img_size, "patch_size": model_cfg.patch_size,
            "kwargs": model_cfg.kwargs}
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(info)})
    os.replace(tmp, path)
    kw = ", ".join(f"{k}={v!r}" for k, v in _timm_kwargs(info).items())
    info["load_with"] = (f"timm.create_model({model_cfg.name!r}, pretrained=True, num_classes=0{', ' + kw if kw else ''}, "
                         f"pretrained_cfg_overlay=dict(file={str(path)!r}))")
    path.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    return path


def _timm_kwargs(info: dict[str, Any]) -> dict[str, Any]:
    kw = {k: info[k] for k in ("img_size", "patch_size") if info.get(k) is not None}
    kw.update(info.get("kwargs") or {})
    return kw


def read_export_info(path: str | Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if METADATA_KEY not in meta:
        raise ValueError(f"{path}: no selfdistill metadata; pass --model.name (and --model.img_size) explicitly")
    return json.loads(meta[METADATA_KEY])


def load_backbone(weights: str, model_cfg: ModelConfig | None = None) -> tuple[Backbone, ModelConfig]:
    """A frozen backbone from ``weights``: an exported ``.safetensors``, a checkpoint or run
    directory of this project (its evaluation backbone, i.e. the DINO teacher), or ``random``
    (needs ``model_cfg``) for the random-initialisation baseline."""
    if weights == "random":
        if model_cfg is None:
            raise ValueError("--weights random needs the model (e.g. --model.name vit_small_patch16_224)")
        return _build(model_cfg), model_cfg
    path = Path(weights)
    if path.is_file() and path.suffix == ".safetensors":
        if model_cfg is None:
            info = read_export_info(path)
            model_cfg = ModelConfig(name=info["timm_name"], img_size=info.get("img_size"),
                                    patch_size=info.get("patch_size"), drop_path_rate=0.0,
                                    kwargs=info.get("kwargs") or {})
        backbone = _build(model_cfg)
        from safetensors.torch import load_file

        try:
            missing, unexpected = backbone.model.load_state_dict(load_file(str(path)), strict=False)
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"{path} does not fit {model_cfg.name}: {str(e).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise ValueError(f"{path} does not fit {model_cfg.name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return backbone, model_cfg
    if path.is_dir():
        return _from_checkpoint(path)
    raise FileNotFoundError(f"--weights {weights}: expected a .safetensors file, a checkpoint/run directory or 'random'")


def _build(model_cfg: ModelConfig) -> Backbone:
    m = model_cfg
    return Backbone(m.name, m.img_size, m.patch_size, 0.0, False, **m.kwargs).eval()


def _from_checkpoint(path: Path) -> tuple[Backbone, ModelConfig]:
    from selfdistill.config import load_config
    from selfdistill.engine.checkpoint import CONFIG, load_method_state, resolve_resume
    from selfdistill.methods import build_method

    ckpt = resolve_resume(str(path), path)
    assert ckpt is not None
    config = load_config(ckpt / CONFIG)
    method = build_method(config)
    method.load_state_dict(load_method_state(ckpt))
    backbone = method.eval_backbone().eval()
    return backbone, config.model

