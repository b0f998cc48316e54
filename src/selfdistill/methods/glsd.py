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

from selfdistill.config import Config, _fail
from selfdistill.data.multicrop import token_centres
from selfdistill.losses import ema_center, match_by_distance, match_by_similarity, region_loss
from selfdistill.methods.base import Method, Progress, StepOutput, register_method
from selfdistill.methods.dino import Dino, DinoConfig, build_backbones, dino_head, init_teacher, same_size_runs
from selfdistill.models import Backbone


@dataclass
class GlsdConfig(DinoConfig):
    name: str = "glsd"
    dense_matching: str = "distance"  # "distance" (GLSD) or "similarity" (EsViT)
    hinge: bool = True  # distance matching only: drop matches farther than half a cell diagonal

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.dense_matching not in ("distance", "similarity"):
            _fail(f"{prefix}.dense_matching", f"must be 'distance' or 'similarity', got {self.dense_matching!r}")


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

    def __init__(self, config: Config) -> None:
        Method.__init__(self, config)
        cfg: GlsdConfig = config.method  # type: ignore[assignment]
        self.cfg = cfg
        student_backbone, teacher_backbone = build_backbones(config.model)
        dim = student_backbone.embed_dim
        self.student = DenseMultiCropNetwork(student_backbone, dino_head(cfg, dim, cfg.norm_last_layer),
                                             dino_head(cfg, dim, cfg.norm_last_layer))
        self.teacher = init_teacher(
            DenseMultiCropNetwork(teacher_backbone, dino_head(cfg, dim, True), dino_head(cfg, dim, True)), self.student)
        k = cfg.out_dim
        self.center = torch.zeros(1, k)
        self.center_grid = torch.zeros(1, k)
        self._center_sum = torch.zeros(1, k)
        self._center_rows = 0
        self._grid_sum = torch.zeros(1, k)
        self._grid_rows = 0
        self._accelerator: Any = None

    def setup(self, accelerator: Any, steps_per_epoch: int, total_steps: int) -> None:
        super().setup(accelerator, steps_per_epoch, total_steps)
        self.center_grid = self.center_grid.to(accelerator.device)
        self._grid_sum = self._grid_sum.to(accelerator.device)

    # -- per step -------------------------------------------------------------------------------
    def training_step(self, student: nn.Module, batch: dict[str, Any], progress: Progress) -> StepOutput:
        crops = batch["crops"]
        n_global = self.cfg.n_global_crops
        temp = self.teacher_temp(progress)
        st = self.cfg.student_temp
        with torch.no_grad():
            teacher_out, _ = self.teacher(crops[:n_global])
        student_out, student_embedding = student(crops)

        if self.cfg.dense_matching == "distance":
            boxes, flips = batch["boxes"], batch["flips"]
            centres = [token_centres(boxes[:, v], flips[:, v], out[3]) for v, out in enumerate(student_out)]

        total = 0.0
        n_terms = 0
        for i in range(n_global):
            t_view, t_dense, t_tok, _ = teacher_out[i]
            q = F.softmax((t_view.float() - self.center) / temp, dim=-1)
            for v, (s_view, s_dense, s_tok, _) in enumerate(student_out):
                if v == i:
                    continue
                view = torch.sum(-q * F.log_softmax(s_view.float() / st, dim=-1), dim=-1).mean()
                if self.cfg.dense_matching == "distance":
                    idx, keep = match_by_distance(centres[v], centres[i], self.cfg.hinge)
                else:
                    idx, keep = match_by_similarity(s_tok.detach(), t_tok), None
                region = region_loss(s_dense, t_dense, self.center_grid, idx, keep, st, temp)
                total = total + 0.5 * view + 0.5 * region
                n_terms += 1
        loss = total / n_terms

        t_view_all = torch.cat([o[0] for o in teacher_out]).detach().float()
        t_dense_all = torch.cat([o[1].flatten(0, 1) for o in teacher_out]).detach().float()
        self._center_sum += t_view_all.sum(dim=0, keepdim=True)
        self._center_rows += t_view_all.shape[0]
        self._grid_sum += t_dense_all.sum(dim=0, keepdim=True)
        self._grid_rows += t_dense_all.shape[0]
        metrics = self._collapse_signals(t_view_all, student_embedding.detach(), temp)
        return StepOutput(loss=loss, metrics=metrics, batch_size=crops[0].shape[0])

    def _update_center(self) -> None:
        """Both centers <- EMA of the mean teacher logit (view rows / token rows) over the whole
        optimizer step and all ranks, one reduction for both."""
        dev = self._center_sum.device
        stats = torch.cat([self._center_sum.flatten(), self._grid_sum.flatten(),
                           torch.full((1,), float(self._center_rows), device=dev),
                           torch.full((1,), float(self._grid_rows), device=dev)])
        if self._accelerator is not None and self._accelerator.num_processes > 1:
            stats = self._accelerator.reduce(stats, reduction="sum")
        k = self.cfg.out_dim
        view_mean = (stats[:k] / stats[-2].clamp_min(1)).view_as(self.center)
        grid_mean = (stats[k:2 * k] / stats[-1].clamp_min(1)).view_as(self.center_grid)
        self.center = ema_center(self.center, view_mean, self.cfg.center_momentum)
        self.center_grid = ema_center(self.center_grid, grid_mean, self.cfg.center_momentum)
        self._reset_center_stats()

    def _reset_center_stats(self) -> None:
        super()._reset_center_stats()
        self._grid_sum.zero_()
        self._grid_rows = 0

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict(), "center": self.center.detach().cpu(),
                "center_grid": self.center_grid.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.center = state["center"].to(self._center_sum.device)
        self.center_grid = state["center_grid"].to(self._grid_sum.device)
