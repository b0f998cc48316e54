"""DINO / DINOv2 training checkpoints read whole: both networks in this project's names, their
heads and the loss centres, so a DINO-family method can continue another code base's run
(a backbone alone is read by the weights door with the ``dino`` / ``dinov2`` formats)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from selfdistill.models.converters import dinov2_backbone, is_training_checkpoint, split_network
from selfdistill.models.weights import read_tensors, strip_prefix

__all__ = ["TrainingCheckpoint", "read_training_checkpoint"]


@dataclass
class TrainingCheckpoint:
    """The networks of a DINO-style training checkpoint in this project's names:
    ``networks[network][part]`` (network ``student`` / ``teacher``; part ``backbone`` in timm
    keys, ``head`` and other heads in :class:`DINOHead` keys, weight norm as torch
    parametrizations), the loss centres, where each part came from and what was left out."""

    path: str
    layout: str  # "DINO" (facebookresearch/dino, EsViT) or "DINOv2"
    networks: dict[str, dict[str, dict[str, torch.Tensor]]]
    centers: dict[str, torch.Tensor]
    sources: dict[str, str]  # "student.head" -> "student['module.head.*']"
    ignored: list[str]  # entries of the file not read (optimizer, epoch, args, other heads...)




# Loss centres of the file -> this project's (``Centers`` names).
_CENTERS = {"dino_loss.center": "center", "ddino_loss.center": "center", "ddino_loss.center_grid": "center_grid"}


def _head_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weight_norm``'s ``weight_g`` / ``weight_v`` (DINO, DINOv2) as torch parametrizations' names."""
    renamed = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
    return {re.sub(r"(weight_g|weight_v)$", lambda m: renamed[m.group(1)], k): v for k, v in state.items()}



def read_training_checkpoint(path: str | Path) -> TrainingCheckpoint | None:
    """Both networks of a DINO-style training checkpoint, or None for any other file.

    Layouts: facebookresearch/dino's ``checkpoint.pth`` (``student`` with DDP's ``module.`` and
    ``teacher``, each ``backbone.`` + ``head.``; ``dino_loss.center``; EsViT adds ``head_dense.``
    and ``ddino_loss``), DINOv2's consolidated training state (``model``: ``student.`` /
    ``teacher.`` + ``backbone.``, ``dino_head.``, ``ibot_head.``; ``dino_loss.center``) and its
    ``teacher_checkpoint.pth`` (``teacher`` only). Optimizer, epoch, arguments and scaler are left out.
    """
    path = Path(path)
    if path.suffix == ".safetensors" or not path.is_file():
        return None
    obj = read_tensors(path)
    if not isinstance(obj, dict) or not is_training_checkpoint(obj):
        return None
    networks: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    sources: dict[str, str] = {}
    centers: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    if isinstance(obj.get("teacher"), dict):  # DINO / EsViT, or DINOv2's teacher_checkpoint.pth
        for network in ("student", "teacher"):
            if isinstance(obj.get(network), dict):
                networks[network], found = split_network(obj[network], f"{network}['")
                sources.update({f"{network}.{p}": f"{s}']" for p, s in found.items()})
        for loss in ("dino_loss", "ddino_loss"):
            for name, value in (obj.get(loss) or {}).items():
                (centers.__setitem__(_CENTERS[f"{loss}.{name}"], value) if f"{loss}.{name}" in _CENTERS
                 else ignored.append(f"{loss}.{name}"))
        ignored += [k for k in obj if k not in ("student", "teacher", "dino_loss", "ddino_loss")]
    else:  # DINOv2's full training state under "model"
        model = obj["model"]
        for network in ("student", "teacher"):
            state = strip_prefix(model, f"{network}.")[0]
            if state:
                networks[network], found = split_network(state, f"model['{network}.")
                sources.update({f"{network}.{p}": f"{s}']" for p, s in found.items()})
        for key, value in model.items():
            if not key.startswith(("student.", "teacher.")):
                (centers.__setitem__(_CENTERS[key], value) if key in _CENTERS else ignored.append(f"model['{key}']"))
        ignored += [k for k in obj if k != "model"]
    layout = "DINO"
    for parts in networks.values():
        if "mask_token" in parts.get("backbone", {}):
            layout = "DINOv2"
            parts["backbone"] = dinov2_backbone(parts["backbone"])
        for part in parts:
            if part != "backbone":
                parts[part] = _head_keys(parts[part])
    return TrainingCheckpoint(str(path), layout, networks, centers, sources, ignored)
