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
from selfdistill.models.backbone import load_timm_weights

METADATA_KEY = "selfdistill"
DEEPSPEED_TAG = "pytorch_model"  # the directory Accelerate's save_state gives the ZeRO files


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
        load_timm_weights(backbone.model, str(path), what=f"--weights ({model_cfg.name})")
        return backbone, model_cfg
    if path.is_dir():
        return _from_checkpoint(path)
    raise FileNotFoundError(f"--weights {weights}: expected a .safetensors file, a checkpoint/run directory or 'random'")


def _build(model_cfg: ModelConfig) -> Backbone:
    m = model_cfg
    return Backbone(m.name, m.img_size, m.patch_size, 0.0, False, **m.kwargs).eval()


def _from_checkpoint(path: Path, part: str = "eval") -> tuple[Backbone, ModelConfig]:
    """``part='eval'``: the method's evaluation backbone (DINO: the teacher); ``'student'``: the
    student backbone, consolidated from ZeRO partitions when DeepSpeed wrote the checkpoint."""
    from selfdistill.config import load_config
    from selfdistill.engine.checkpoint import CONFIG, load_method_state, resolve_resume
    from selfdistill.methods import build_method

    ckpt = resolve_resume(str(path), path)
    assert ckpt is not None
    config = load_config(ckpt / CONFIG)
    config.model.pretrained = ""  # the checkpoint holds the weights; the start file may be gone
    method = build_method(config)
    if part == "student":
        method.student.load_state_dict(student_state_from_checkpoint(ckpt))
        return method.student_backbone().eval(), config.model
    if part != "eval":
        raise ValueError(f"unknown part {part!r}: use 'eval' or 'student'")
    method.load_state_dict(load_method_state(ckpt))
    backbone = method.eval_backbone()
    if backbone is method.student_backbone():  # SimSiam, SMD: the student itself is evaluated
        method.student.load_state_dict(student_state_from_checkpoint(ckpt))
    return backbone.eval(), config.model


def student_state_from_checkpoint(ckpt: str | Path) -> dict[str, Any]:
    """The full fp32 student state dict of a checkpoint, whatever wrote it.

    DDP: Accelerate's ``model.safetensors``. DeepSpeed (any ZeRO stage, any rank count): the fp32
    master partitions merged by DeepSpeed's ``zero_to_fp32`` (which unpickles DeepSpeed's own
    files: only read checkpoints you trust, as for ``--resume``).
    """
    ckpt = Path(ckpt)
    if (ckpt / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(ckpt / "model.safetensors"))
    if (ckpt / DEEPSPEED_TAG).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DEEPSPEED_TAG)
        # ZeRO-1 records no frozen parameters (e.g. DINO's weight-norm gain); ZeRO-1/2 keep the
        # whole module in the model-states file, so take them from there.
        import torch

        states = ckpt / DEEPSPEED_TAG / "mp_rank_00_model_states.pt"  # ZeRO-1/2 only
        module = torch.load(states, map_location="cpu", weights_only=True)["module"] if states.is_file() else {}
        for key, value in module.items():
            if key not in state and value.numel() > 0:
                state[key] = value.float() if value.is_floating_point() else value
        return {k: v.contiguous() for k, v in state.items()}
    raise FileNotFoundError(f"{ckpt}: no student weights (neither model.safetensors nor a DeepSpeed "
                            f"{DEEPSPEED_TAG}/ directory)")


def export_from_checkpoint(path: str | Path, out: str | Path, part: str = "eval") -> Path:
    backbone, model_cfg = _from_checkpoint(Path(path), part)
    return export_backbone(backbone, model_cfg, out)

