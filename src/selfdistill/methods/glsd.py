"""GLSD: global-local self-distillation (EsViT's region loss with distance or similarity matching).

DINO's view-level loss plus a token-level ("region") loss: each student token of crop v is taught
by one teacher token of global crop i, matched either by the nearest cell centre in the source
image (``distance``, GLSD, with its hinge) or by the most similar backbone token (``similarity``,
EsViT). Two separate DINO heads (``head`` for the pooled view feature, ``head_dense`` for tokens)
and two centers (``center`` and ``center_grid``, both ``[1, K]``). Each (teacher global crop i,
student crop v != i) pair contributes ``0.5 * view + 0.5 * region``; pairs are averaged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selfdistill.configkit import one_of
from selfdistill.data.multicrop import token_centres
from selfdistill.losses import match_by_distance, match_by_similarity, region_loss
from selfdistill.methods.base import Progress, StepOutput, register_method
from selfdistill.methods.dino import Dino, DinoConfig, same_size_runs
from selfdistill.models import Backbone


@dataclass
class GlsdConfig(DinoConfig):
    name: str = "glsd"
    dense_matching: str = "distance"  # "distance" (GLSD) or "similarity" (EsViT)
    hinge: bool = True  # distance matching only: drop matches farther than half a cell diagonal

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        one_of(self, prefix, "dense_matching", ("distance", "similarity"))


class DenseMultiCropNetwork(nn.Module):
    """Backbone + view head + dense head over a list of crops, one backbone call per resolution.

    Returns one ``(view_logits [B,K], dense_logits [B,T,K], tokens [B,T,D], grid)`` per crop, and the
    pooled embeddings of all crops ``[V*B, D]`` (crop-major).
    """

    def __init__(self, backbone: Backbone, head: nn.Module, head_dense: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.head_dense = head_dense

    def forward(self, crops: list[torch.Tensor]):
        groups = [(end - start, self.backbone(torch.cat(crops[start:end]))) for start, end in same_size_runs(crops)]
        pooled = torch.cat([out.pooled for _, out in groups])
        view = self.head(pooled)
        b = crops[0].shape[0]
        per_crop = []
        row = 0
        for n, out in groups:
            dense = self.head_dense(out.tokens)  # [n*B, T, K]: the head is token-wise
            for k in range(n):
                sl = slice(k * b, (k + 1) * b)
                per_crop.append((view[row:row + b], dense[sl], out.tokens[sl], out.grid))
                row += b
        return per_crop, pooled


@register_method("glsd")
class Glsd(Dino):
    config_class = GlsdConfig
    last_layer_prefixes = ("head.last_layer.", "head_dense.last_layer.")

    def network(self, backbone: Backbone, norm_last_layer: bool) -> nn.Module:
        return DenseMultiCropNetwork(backbone, self.head(backbone.embed_dim, norm_last_layer),
                                     self.head(backbone.embed_dim, norm_last_layer))

    def center_shapes(self, backbone: Backbone) -> dict[str, tuple[int, ...]]:
        return {"center": (1, self.cfg.out_dim), "center_grid": (1, self.cfg.out_dim)}

    # -- per step -------------------------------------------------------------------------------
    def training_step(self, student: nn.Module, batch: dict[str, Any], progress: Progress) -> StepOutput:
        crops = batch["crops"]
        n_global = self.cfg.n_global_crops
        temp = self.teacher_temp(progress)
        st = self.cfg.student_temp
        teacher_out, student_out, student_embedding = self.forward(student, crops)

        if self.cfg.dense_matching == "distance":
            boxes, flips = batch["boxes"], batch["flips"]
            centres = [token_centres(boxes[:, v], flips[:, v], out[3]) for v, out in enumerate(student_out)]

        total = 0.0
        n_terms = 0
        for i in range(n_global):
            t_view, t_dense, t_tok, _ = teacher_out[i]
            q = F.softmax((t_view.float() - self.centers["center"]) / temp, dim=-1)
            for v, (s_view, s_dense, s_tok, _) in enumerate(student_out):
                if v == i:
                    continue
                view = torch.sum(-q * F.log_softmax(s_view.float() / st, dim=-1), dim=-1).mean()
                if self.cfg.dense_matching == "distance":
                    idx, keep = match_by_distance(centres[v], centres[i], self.cfg.hinge)
                else:
                    idx, keep = match_by_similarity(s_tok.detach(), t_tok), None
                region = region_loss(s_dense, t_dense, self.centers["center_grid"], idx, keep, st, temp)
                total = total + 0.5 * view + 0.5 * region
                n_terms += 1
        loss = total / n_terms

        t_view_all = torch.cat([o[0] for o in teacher_out]).detach().float()
        self.centers.add("center", t_view_all)
        self.centers.add("center_grid", torch.cat([o[1].flatten(0, 1) for o in teacher_out]))
        metrics = self.collapse_signals(t_view_all, student_embedding.detach(), temp)
        return StepOutput(loss=loss, metrics=metrics, batch_size=crops[0].shape[0])
