"""Loss functions as pure functions of tensors: no state, no distributed calls.

State such as DINO's center lives in the method object; these functions only compute.
All arithmetic runs in float32 even when the inputs come from a bf16/fp16 forward, because
a softmax at temperature 0.04 over 65k prototypes is not safe in half precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dino_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    center: torch.Tensor,
    n_global_crops: int,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """DINO's cross-entropy between teacher and student crops (facebookresearch/dino ``DINOLoss``).

    Args:
        student_out: ``[n_crops * B, K]`` head logits, crop-major (all images of crop 0, then
            crop 1, ...), global crops first.
        teacher_out: ``[n_global_crops * B, K]`` teacher logits of the global crops.
        center: ``[1, K]`` (or ``[K]``) running mean of teacher logits.
        n_global_crops: number of global crops (2 in DINO).

    Returns:
        The mean over all (teacher crop i, student crop v) pairs with ``v != i`` of
        ``mean_b sum_k -softmax((t_i - c)/T_t)[b, k] * log_softmax(s_v / T_s)[b, k]``.
    """
    if teacher_out.shape[0] % n_global_crops:
        raise ValueError(f"teacher_out has {teacher_out.shape[0]} rows, not a multiple of {n_global_crops} crops")
    batch = teacher_out.shape[0] // n_global_crops
    if student_out.shape[0] % batch or student_out.shape[0] // batch < n_global_crops:
        raise ValueError(f"student_out has {student_out.shape[0]} rows; expected n_crops x {batch}")
    if student_out.shape[1] != teacher_out.shape[1]:
        raise ValueError(f"student and teacher widths differ: {student_out.shape[1]} vs {teacher_out.shape[1]}")
    n_crops = student_out.shape[0] // batch

    student_logp = F.log_softmax(student_out.float() / student_temp, dim=-1).chunk(n_crops)
    teacher_p = F.softmax((teacher_out.float() - center.float()) / teacher_temp, dim=-1).detach().chunk(n_global_crops)

    total = student_out.new_zeros((), dtype=torch.float32)
    n_terms = 0
    for i, q in enumerate(teacher_p):
        for v, logp in enumerate(student_logp):
            if v == i:
                continue
            total = total + torch.sum(-q * logp, dim=-1).mean()
            n_terms += 1
    return total / n_terms


def ema_center(center: torch.Tensor, batch_mean: torch.Tensor, momentum: float) -> torch.Tensor:
    """DINO's center update: ``c <- m * c + (1 - m) * mean of teacher logits``."""
    return center * momentum + batch_mean.to(center.dtype) * (1.0 - momentum)
