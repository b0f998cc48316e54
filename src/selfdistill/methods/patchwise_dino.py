"""Patch-Wise DINO (PW-Self; arXiv 2310.18651): DINO on CLS and matched patch tokens with one head.

The ViT returns all tokens; one DINO head is applied token-wise to CLS and patches; the center
has one row per token position ``[1, 1+N, K]`` (N = patches of a global crop). For each (teacher
global crop i, student crop v != i) pair, the tokens of the two crops that see the same image
region are matched (``losses.patch_correspondences``, per sample from its own crop boxes/flips,
CLS always matched to CLS), and the pair term is the mean over (samples x matched tokens) of the
cross-entropy at the matched positions. Pairs are averaged. Variable match counts are padded
and masked, so the tensor math is batched over samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selfdistill.configkit import fail
from selfdistill.losses import patch_correspondences
from selfdistill.methods.base import Progress, StepOutput, register_method
from selfdistill.methods.dino import Dino, DinoConfig, same_size_runs
from selfdistill.models import Backbone


@dataclass
class PatchwiseDinoConfig(DinoConfig):
    name: str = "patchwise_dino"
    out_dim: int = 10000  # the PW code's default


class AllTokensMultiCropNetwork(nn.Module):
    """ViT + one token-wise head over a list of crops, one backbone call per resolution.

    Returns per crop the logits of all tokens ``[B, 1+T, K]`` (0 = CLS) and its grid, plus the CLS
    embeddings of all crops ``[V*B, D]``.
    """

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor]):
        b = crops[0].shape[0]
        per_crop, pooled = [], []
        for start, end in same_size_runs(crops):
            out = self.backbone(torch.cat(crops[start:end]))
            logits = self.head(torch.cat([out.pooled[:, None], out.tokens], dim=1))  # [n*B, 1+T, K]
            pooled.append(out.pooled)
            for k in range(end - start):
                per_crop.append((logits[k * b:(k + 1) * b], out.grid))
        return per_crop, torch.cat(pooled)


def _padded_matches(boxes: torch.Tensor, flips: torch.Tensor, i: int, v: int, grid_i, grid_v):
    """Per-sample correspondences of crops i (teacher) and v (student), padded: ``(idx_i, idx_v, mask)``
    each ``[B, M_max]``. Only index bookkeeping runs per sample; the loss math is batched."""
    boxes, flips = boxes.detach().cpu(), flips.detach().cpu()
    pairs = [patch_correspondences(boxes[b, i], flips[b, i], grid_i, boxes[b, v], flips[b, v], grid_v)
             for b in range(boxes.shape[0])]
    m = max(len(a) for a, _ in pairs)
    idx_i = torch.zeros(len(pairs), m, dtype=torch.long)
    idx_v = torch.zeros(len(pairs), m, dtype=torch.long)
    mask = torch.zeros(len(pairs), m, dtype=torch.bool)
    for b, (a, c) in enumerate(pairs):
        idx_i[b, :len(a)], idx_v[b, :len(c)], mask[b, :len(a)] = a, c, True
    return idx_i, idx_v, mask


def matched_token_loss(s_logits: torch.Tensor, t_probs: torch.Tensor, idx_t: torch.Tensor, idx_s: torch.Tensor,
                       mask: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Mean over valid (sample, matched token) entries of ``sum_k -P_t[b, idx_t, k] log_softmax(s/T_s)[b, idx_s, k]``.

    ``s_logits [B, Ts, K]``, ``t_probs [B, Tt, K]`` (teacher probabilities, already centred and
    sharpened), ``idx_t, idx_s, mask [B, M]`` (padded entries are masked out).
    """
    k = s_logits.shape[-1]
    t = torch.gather(t_probs, 1, idx_t[..., None].expand(-1, -1, k))
    s = torch.gather(s_logits.float(), 1, idx_s[..., None].expand(-1, -1, k))
    ce = torch.sum(-t * F.log_softmax(s / student_temp, dim=-1), dim=-1)  # [B, M]
    maskf = mask.to(ce.dtype)
    return (ce * maskf).sum() / maskf.sum().clamp_min(1)


@register_method("patchwise_dino")
class PatchwiseDino(Dino):
    config_class = PatchwiseDinoConfig

    def network(self, backbone: Backbone, norm_last_layer: bool) -> nn.Module:
        vit = backbone.model
        if not (hasattr(vit, "patch_embed") and getattr(vit, "cls_token", None) is not None
                and getattr(vit, "global_pool", None) == "token" and backbone.num_prefix_tokens == 1):
            fail("model.name", f"patchwise_dino needs a ViT with a CLS token (no register tokens, "
                               f"global_pool 'token'), got {backbone.name!r}")
        return AllTokensMultiCropNetwork(backbone, self.head(backbone.embed_dim, norm_last_layer))

    def center_shapes(self, backbone: Backbone) -> dict[str, tuple[int, ...]]:
        """One center row per token position of a global crop: CLS, then the patches."""
        patch = backbone.model.patch_embed.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
        side = self.config.data.global_crop_size // patch
        return {"center": (1, 1 + side * side, self.cfg.out_dim)}

    def training_step(self, student: nn.Module, batch: dict[str, Any], progress: Progress) -> StepOutput:
        crops = batch["crops"]
        n_global = self.cfg.n_global_crops
        temp = self.teacher_temp(progress)
        teacher_out, student_out, student_embedding = self.forward(student, crops)
        device = crops[0].device
        total, n_terms = 0.0, 0
        for i in range(n_global):
            t_logits, grid_i = teacher_out[i]
            t_probs = F.softmax((t_logits.float() - self.centers["center"]) / temp, dim=-1)
            for v, (s_logits, grid_v) in enumerate(student_out):
                if v == i:
                    continue
                idx_i, idx_v, mask = _padded_matches(batch["boxes"], batch["flips"], i, v, grid_i, grid_v)
                total = total + matched_token_loss(s_logits, t_probs, idx_i.to(device), idx_v.to(device),
                                                   mask.to(device), self.cfg.student_temp)
                n_terms += 1
        loss = total / n_terms

        t_all = torch.cat([o[0] for o in teacher_out]).detach().float()  # [2B, 1+N, K]
        self.centers.add("center", t_all)
        # Collapse signals on the CLS token, against its own center position.
        metrics = self.collapse_signals(t_all[:, 0], student_embedding.detach(), temp,
                                        center=self.centers["center"][:, 0])
        return StepOutput(loss=loss, metrics=metrics, batch_size=crops[0].shape[0])
