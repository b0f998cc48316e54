"""Loss functions as pure functions of tensors: no state, no distributed calls except the
cross-rank sums that are part of a loss's maths (DINOv2's Sinkhorn-Knopp normalises over the
global batch, so :func:`sinkhorn_knopp` all-reduces its sums when ``torch.distributed`` runs).

State such as DINO's center lives in the method object; these functions only compute.
All arithmetic runs in float32 even when the inputs come from a bf16/fp16 forward, because
a softmax at temperature 0.04 over 65k prototypes is not safe in half precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def dino_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor, n_global_crops: int,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
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
    teacher_p = F.softmax((teacher_out.float() - center.float()) / teacher_temp, dim=-1)
    return dino_cross_entropy(student_out, teacher_p, n_global_crops, student_temp)


def dino_cross_entropy(student_out: torch.Tensor, teacher_probs: torch.Tensor, n_global_crops: int,
                       student_temp: float) -> torch.Tensor:
    """DINO's cross-entropy over crop pairs given the teacher's *probabilities* (already centred
    and sharpened, by :func:`dino_loss`'s softmax or by :func:`sinkhorn_knopp` as in DINOv2).

    ``student_out [n_crops * B, K]`` logits and ``teacher_probs [n_global_crops * B, K]``, both
    crop-major; returns ``mean over pairs (i, v != i) of mean_b sum_k -q_i[b, k] log_softmax(s_v / T_s)[b, k]``.
    DINOv2 computes the same value as a sum over its local and global terms divided by the
    number of pairs ``n_global (n_crops - 1)``.
    """
    batch = teacher_probs.shape[0] // n_global_crops
    if teacher_probs.shape[0] % n_global_crops or student_out.shape[0] % batch \
            or student_out.shape[0] // batch < n_global_crops or student_out.shape[1] != teacher_probs.shape[1]:
        raise ValueError(f"expected student [n_crops x B, K] and teacher [{n_global_crops} x B, K], got "
                         f"{tuple(student_out.shape)} and {tuple(teacher_probs.shape)}")
    n_crops = student_out.shape[0] // batch
    student_logp = F.log_softmax(student_out.float() / student_temp, dim=-1).chunk(n_crops)
    teacher_p = teacher_probs.float().detach().chunk(n_global_crops)

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


# -- Dense (token-level) matching: EsViT / GLSD region loss and Patch-Wise DINO correspondences.


@torch.no_grad()
def match_by_similarity(s_feat: torch.Tensor, t_feat: torch.Tensor) -> torch.Tensor:
    """Each student token's most similar teacher token, by cosine similarity (EsViT, GLSD "similarity").

    Matching uses the *backbone* token features, not head logits, and no gradient flows through
    the argmax (ties go to the first teacher token, as ``max(dim)`` does in the reference).

    Args:
        s_feat: ``[B, Ts, C]`` student backbone tokens.
        t_feat: ``[B, Tt, C]`` teacher backbone tokens of the same images.

    Returns:
        int64 ``[B, Ts]`` teacher token index per student token.
    """
    if s_feat.ndim != 3 or t_feat.ndim != 3 or s_feat.shape[0] != t_feat.shape[0] \
            or s_feat.shape[2] != t_feat.shape[2]:
        raise ValueError(f"expected [B, Ts, C] and [B, Tt, C], got {tuple(s_feat.shape)} and {tuple(t_feat.shape)}")
    sim = F.normalize(s_feat.float(), dim=-1) @ F.normalize(t_feat.float(), dim=-1).transpose(1, 2)
    return sim.argmax(dim=-1)


def _half_cell_diagonal_sq(pos: torch.Tensor) -> torch.Tensor:
    """GLSD's squared half-diagonal of one cell, ``[B]``, from the top-left cell's neighbours.

    Half the x step to the right-hand neighbour and half the y step to the neighbour below,
    squared and summed; a flipped crop's negative x step squares away.
    """
    if pos.shape[2] < 2 or pos.shape[3] < 2:
        raise ValueError(f"the hinge needs at least a 2x2 token grid to measure a cell, got {tuple(pos.shape[2:])}")
    half_w = (pos[:, 0, 0, 0] - pos[:, 0, 0, 1]) / 2
    half_h = (pos[:, 1, 0, 0] - pos[:, 1, 1, 0]) / 2
    return half_w**2 + half_h**2


@torch.no_grad()
def match_by_distance(
    s_pos: torch.Tensor, t_pos: torch.Tensor, hinge: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each student token's teacher token with the nearest cell centre in the source image (GLSD "distance").

    Distances are squared Euclidean in source pixels, tokens in row-major order, ties to the
    first teacher token. The hinge drops a match unless its squared distance is strictly below
    the larger of the two grids' squared half cell diagonals (measured per sample from
    neighbouring centres, as GLSD does), so a student token outside the teacher crop teaches
    nothing instead of being pulled to the nearest border token.

    Args:
        s_pos: ``[B, 2, Hs, Ws]`` student token centres (channel 0 = x, 1 = y), e.g. from
            :func:`selfdistill.data.multicrop.token_centres`.
        t_pos: ``[B, 2, Ht, Wt]`` teacher token centres of the same images.
        hinge: apply GLSD's hinge; without it every match is kept.

    Returns:
        ``(idx, keep)``: int64 ``[B, Hs*Ws]`` teacher token index and bool ``[B, Hs*Ws]``.
    """
    if s_pos.ndim != 4 or t_pos.ndim != 4 or s_pos.shape[1] != 2 or t_pos.shape[1] != 2 \
            or s_pos.shape[0] != t_pos.shape[0]:
        raise ValueError(f"expected [B, 2, Hs, Ws] and [B, 2, Ht, Wt], got {tuple(s_pos.shape)} and {tuple(t_pos.shape)}")
    s_pos, t_pos = s_pos.float(), t_pos.float()
    s_flat = s_pos.flatten(2).transpose(1, 2)  # [B, Ts, 2]
    t_flat = t_pos.flatten(2).transpose(1, 2)  # [B, Tt, 2]
    dist2 = (t_flat[:, None, :, :] - s_flat[:, :, None, :]).pow(2).sum(-1)  # [B, Ts, Tt]
    nearest, idx = dist2.min(dim=2)
    if not hinge:
        return idx, torch.ones_like(idx, dtype=torch.bool)
    threshold = torch.maximum(_half_cell_diagonal_sq(t_pos), _half_cell_diagonal_sq(s_pos))  # [B]
    return idx, nearest < threshold[:, None]


def region_loss(s_region: torch.Tensor, t_region: torch.Tensor, center_grid: torch.Tensor, idx: torch.Tensor,
                keep: torch.Tensor | None, student_temp: float, teacher_temp: float) -> torch.Tensor:
    """EsViT / GLSD region-level cross-entropy of one (teacher crop, student crop) pair.

    Each student token is taught by the teacher token ``idx`` points at. Dropped tokens
    (``keep`` False) contribute zero but still count in the mean over *all* student tokens, which
    is GLSD's normalisation (a crop with few valid matches gets a smaller loss, not a louder one).
    The 0.5 pair weight of EsViT/GLSD belongs to the caller.

    Args:
        s_region: ``[B, Ts, K]`` student dense-head logits.
        t_region: ``[B, Tt, K]`` teacher dense-head logits (no gradient is taken through them).
        center_grid: ``[1, K]`` (or ``[K]``) running mean of teacher dense logits.
        idx: int64 ``[B, Ts]`` matched teacher token per student token.
        keep: bool ``[B, Ts]``, or None to keep every token.

    Returns:
        ``mean_b mean_s keep[b,s] * sum_k -softmax((t[b,idx[b,s]] - c)/T_t)_k * log_softmax(s[b,s]/T_s)_k``.
    """
    if s_region.ndim != 3 or t_region.ndim != 3 or s_region.shape[0] != t_region.shape[0] \
            or s_region.shape[2] != t_region.shape[2]:
        raise ValueError(f"expected [B, Ts, K] and [B, Tt, K], got {tuple(s_region.shape)} and {tuple(t_region.shape)}")
    if idx.shape != s_region.shape[:2]:
        raise ValueError(f"idx must be [B, Ts] = {list(s_region.shape[:2])}, got {tuple(idx.shape)}")
    if keep is not None and keep.shape != s_region.shape[:2]:
        raise ValueError(f"keep must be [B, Ts] = {list(s_region.shape[:2])}, got {tuple(keep.shape)}")
    # Gather the matched teacher rows before the softmax: the softmax is per row, so this is the
    # same value and needs [B, Ts, K] memory instead of [B, Tt, K].
    t_matched = torch.gather(t_region.detach().float(), 1, idx[..., None].expand(-1, -1, t_region.shape[2]))
    teacher_p = F.softmax((t_matched - center_grid.detach().float()) / teacher_temp, dim=-1)
    student_logp = F.log_softmax(s_region.float() / student_temp, dim=-1)
    per_token = torch.sum(-teacher_p * student_logp, dim=-1)  # [B, Ts]
    if keep is not None:
        per_token = per_token * keep.to(per_token.dtype)
    return per_token.mean(dim=-1).mean()


def _grid_shape(grid: int | Sequence[int]) -> tuple[int, int]:
    rows, cols = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be positive, got {(rows, cols)}")
    return rows, cols


def _overlap_patch_ids(
    box: tuple[float, float, float, float], flip: bool, grid: tuple[int, int],
    inter: tuple[float, float, float, float],
) -> np.ndarray:
    """Token ids (1-based patches) of one crop that cover the intersection, as a 2-D array.

    Patch-Wise DINO's ``find_intersection_ids_in_crops``: the intersection's extent and offset
    as fractions of the crop, times patches per side, rounded with Python's (banker's) ``round``.
    A flipped crop mirrors the column range and the column order.
    """
    top, left, height, width = box
    i_top, i_bottom, i_left, i_right = inter
    rows, cols = grid
    ids = np.arange(1, rows * cols + 1).reshape(rows, cols)
    width_quote = round(cols * ((i_right - i_left) / width))
    height_quote = round(rows * ((i_bottom - i_top) / height))
    start_w = int(round(cols * ((i_left - left) / width)))
    start_h = int(round(rows * ((i_top - top) / height)))
    end_w, end_h = start_w + width_quote, start_h + height_quote
    if flip:
        # Clamped at 0: with an odd patch count both roundings can go up and the reference would
        # slice from -1 (the last column); even counts (14, 6, 28, 12) never get there.
        start_w, end_w = max(cols - end_w, 0), cols - start_w
    view = ids[start_h:end_h, start_w:end_w]
    return np.fliplr(view) if flip else view


def _subsample(n_big: int, n_small: int) -> np.ndarray:
    """Patch-Wise DINO's ``floor(linspace(0, n_big - 1, n_small))`` (numpy, for identical rounding)."""
    return np.floor(np.linspace(0, n_big - 1, n_small)).astype(np.int64)


def patch_correspondences(
    box1: Sequence[float] | torch.Tensor,
    flip1: bool | torch.Tensor,
    grid1: int | Sequence[int],
    box2: Sequence[float] | torch.Tensor,
    flip2: bool | torch.Tensor,
    grid2: int | Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch-Wise DINO's token correspondences between two crops of one image (``augment.correspondences``).

    The intersection rectangle of the boxes is mapped onto each crop's patch grid, the larger
    of the two index blocks is subsampled per axis with ``floor(linspace(0, n_big-1, n_small))``
    so both have ``min(r1, r2) x min(c1, c2)`` patches, and the pairs are listed row-major after
    the CLS pair. CLS always matches CLS, so crops that do not overlap give ``[0], [0]``.

    Args:
        box1, box2: ``(top, left, height, width)`` in source pixels.
        flip1, flip2: whether each crop was mirrored.
        grid1, grid2: patches per side (or ``(rows, cols)``) of each crop's token grid.

    Returns:
        ``(idx1, idx2)``: int64 ``[1 + M]`` token indices into each crop's sequence, 0 = CLS and
        ``k`` = patch ``k - 1`` (row-major); ``idx1[m]`` and ``idx2[m]`` are matched.
    """
    b1 = tuple(float(v) for v in torch.as_tensor(box1).reshape(-1).tolist())
    b2 = tuple(float(v) for v in torch.as_tensor(box2).reshape(-1).tolist())
    if len(b1) != 4 or len(b2) != 4 or min(b1[2], b1[3], b2[2], b2[3]) <= 0:
        raise ValueError(f"boxes must be (top, left, height, width) with positive sizes, got {b1} and {b2}")
    g1, g2 = _grid_shape(grid1), _grid_shape(grid2)
    cls = [0]
    i_top, i_left = max(b1[0], b2[0]), max(b1[1], b2[1])
    i_bottom, i_right = min(b1[0] + b1[2], b2[0] + b2[2]), min(b1[1] + b1[3], b2[1] + b2[3])
    if i_top >= i_bottom or i_left >= i_right:
        return torch.tensor(cls, dtype=torch.long), torch.tensor(cls, dtype=torch.long)

    inter = (i_top, i_bottom, i_left, i_right)
    view1 = _overlap_patch_ids(b1, bool(flip1), g1, inter)
    view2 = _overlap_patch_ids(b2, bool(flip2), g2, inter)
    (r1, c1), (r2, c2) = view1.shape, view2.shape
    if r1 >= r2:
        view1 = view1[_subsample(r1, r2), :]
    else:
        view2 = view2[_subsample(r2, r1), :]
    if c1 >= c2:
        view1 = view1[:, _subsample(c1, c2)]
    else:
        view2 = view2[:, _subsample(c2, c1)]
    idx1 = torch.tensor(cls + view1.reshape(-1).tolist(), dtype=torch.long)
    idx2 = torch.tensor(cls + view2.reshape(-1).tolist(), dtype=torch.long)
    return idx1, idx2


# -- Feature Distillation (FD, Wei et al. 2022): regress the teacher's whitened feature map.


def fd_loss(student_tokens_projected: torch.Tensor, teacher_tokens: torch.Tensor, beta: float = 2.0,
            eps: float = 1e-5) -> torch.Tensor:
    """FD's loss: Smooth-L1 (``beta``) between the projected student tokens and the teacher's
    tokens "whitened" by a LayerNorm without affine parameters, averaged over every element.

    Args:
        student_tokens_projected: ``[B, L, C_t]`` student tokens (CLS included for ViTs) after the
            method's 1x1 projector.
        teacher_tokens: ``[B, L, C_t]`` teacher tokens after the teacher's own final norm. They are
            normalised again per token over channels (mean 0, variance 1, ``eps``), with no gain or
            bias: a fixed target scale whatever the teacher, which is the point of FD's whitening.

    Returns:
        ``mean`` over ``B x L x C_t`` of ``0.5 d^2 / beta`` where ``|d| < beta``, else ``|d| - beta / 2``.
    """
    if student_tokens_projected.shape != teacher_tokens.shape:
        raise ValueError(f"student tokens {tuple(student_tokens_projected.shape)} and teacher tokens "
                         f"{tuple(teacher_tokens.shape)} must have the same shape [B, L, C]")
    dtype = torch.promote_types(student_tokens_projected.dtype, torch.float32)  # fp32 at least
    target = F.layer_norm(teacher_tokens.detach().to(dtype), teacher_tokens.shape[-1:], eps=eps)
    return F.smooth_l1_loss(student_tokens_projected.to(dtype), target, beta=beta)


# -- SimSiam and SMD (hard-aware metric distillation): embedding losses of two-view methods.


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """SimSiam's symmetric negative cosine: ``-(cos(p1, sg z2) + cos(p2, sg z1)) / 2``.

    ``p``: predictor outputs, ``z``: projector outputs of views 1 and 2 (``[B, D]``). The stop-gradient
    on ``z`` is what keeps SimSiam from collapsing; it is applied here, not left to the caller.
    """
    cos1 = F.cosine_similarity(p1.float(), z2.detach().float(), dim=-1).mean()
    cos2 = F.cosine_similarity(p2.float(), z1.detach().float(), dim=-1).mean()
    return -(cos1 + cos2) / 2


def _pairwise_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sqrt(clamp(|a_i|^2 + |b_j|^2 - 2 a_i.b_j, 1e-12))``: SMD's expanded form, whose clamp fixes
    the self-distance at 1e-6 (not 0), which decides ties in the positive/negative split. One
    ``addmm`` as in the reference: the ReLU weights are differences of nearly equal distances, so
    float32 rounding shows in the loss and the operation order is kept for parity."""
    sq = torch.addmm((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :], a, b.t(), beta=1, alpha=-2)
    return sq.clamp(min=1e-12).sqrt()


def smd_loss(teacher_emb: torch.Tensor, student_emb: torch.Tensor, tau: float = 0.04) -> torch.Tensor:
    """SMD's hard-aware metric distillation loss (Liu & Ye, ECCV 2022), teacher first.

    Both ``[N, D]`` embeddings are L2-normalised. For anchor ``i`` (a teacher row), a sample ``j``
    is a *negative* when the teacher puts it farther from ``i`` than the student currently puts
    ``i``'s own embedding (``Dtt[i,j] > Dts[i,i]``), else a positive (``i`` itself included). Per
    anchor only the hardest negative (closest student embedding) and the hardest positive
    (farthest) count, each weighted by how far the student distance strays from the teacher's
    (ReLU, no gradient): ``mean_i softplus((w_ap d_ap - w_an d_an) / tau)``, i.e. a 2-way
    cross-entropy with label "negative". Pairs the student already places like the teacher have
    weight 0, so a student equal to the teacher scores the floor ``log 2``. An anchor with no
    negative gets ``w_an = 0``. Mining is within the given (per-rank) batch: no gather, as in SMD.

    Gradients flow only into ``student_emb``. Computed in float32 (float64 inputs stay float64).

    Returns:
        The scalar loss.
    """
    if teacher_emb.ndim != 2 or teacher_emb.shape != student_emb.shape:
        raise ValueError(f"smd_loss needs teacher and student embeddings of one shape [N, D], got "
                         f"{tuple(teacher_emb.shape)} and {tuple(student_emb.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    dtype = torch.promote_types(teacher_emb.dtype, torch.float32)
    t = F.normalize(teacher_emb.detach().to(dtype), dim=1)
    s = F.normalize(student_emb.to(dtype), dim=1)
    d_tt = _pairwise_distance(t, t)  # teacher-teacher, no gradient
    d_ts = _pairwise_distance(t, s)  # teacher row i vs student column j
    with torch.no_grad():
        negative = d_tt > d_ts.diagonal()[:, None]
    d_an, a = torch.where(negative, d_ts, torch.full_like(d_ts, 1e5)).min(dim=1)
    d_ap, p = torch.where(negative, torch.zeros_like(d_ts), d_ts).max(dim=1)
    w_an = F.relu(d_tt.gather(1, a[:, None]).squeeze(1) - d_an).detach()
    w_ap = F.relu(d_ap - d_tt.gather(1, p[:, None]).squeeze(1)).detach()
    return F.softplus((w_ap * d_ap - w_an * d_an) / tau).mean()


# -- DINOv2 (Oquab et al., 2023): KoLeo regulariser, Sinkhorn-Knopp centering, iBOT masked patches.


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The Kozachenko-Leonenko entropy estimator as a loss (DINOv2's ``KoLeoLoss``): spread the
    batch's features uniformly over the sphere.

    With rows L2-normalised, ``x_i <- x_i / max(|x_i|, eps)``, and ``n(i) = argmax_{j != i} x_i . x_j``
    each row's nearest other row (no gradient through the choice)::

        L = -1/B sum_i log(|x_i - x_n(i) + eps|_2 + eps)

    the distance as ``torch.nn.PairwiseDistance(p=2, eps=eps)`` computes it. A collapsed batch
    (two equal rows) costs ``-log(sqrt(D) eps + eps)``, about 18 for ``eps = 1e-8``.

    Args:
        x: ``[B, D]`` features (DINOv2: the student's backbone CLS tokens of one global crop), B >= 2.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
        >>> round(koleo_loss(x).item(), 4)  # every nearest neighbour at distance sqrt(2)
        -0.3466
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"koleo_loss needs [B, D] features with B >= 2, got {tuple(x.shape)}")
    x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)  # below any cosine: a row is never its own neighbour
        nearest = dots.argmax(dim=1)
    distance = torch.linalg.vector_norm(x - x[nearest] + eps, ord=2, dim=-1)
    return -torch.log(distance + eps).mean()


def _all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``t`` summed (or maxed) over the ranks when ``torch.distributed`` runs; ``t`` itself otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """DINOv2's (and SwAV's) Sinkhorn-Knopp centering: teacher probabilities whose prototypes are
    used equally over the batch, in place of DINO's centre.

    ``Q = exp(t / T_t)^T`` (``[K, N]``) is divided by its total, then ``n_iterations`` times every
    prototype row is scaled to sum ``1/K`` and every sample column to ``1/N``; the result is
    ``N Q^T``, each row summing to 1. When ``torch.distributed`` runs, the total, the row sums and
    the sample count ``N`` are all-reduced as in DINOv2, so the balance is over the global batch
    and two ranks give what one rank gives on their concatenated rows; one process is the special
    case. The logits are shifted by their global maximum first (the same ``Q`` in exact arithmetic,
    no ``exp`` overflow), and everything runs in float32. No gradients.

    Args:
        teacher_logits: ``[N, K]`` teacher head outputs (N samples on this rank, may be 0).
        teacher_temp: the teacher's sharpening temperature.
        n_iterations: row/column normalisation rounds (DINOv2: 3).

    Returns:
        ``[N, K]`` float32 teacher probabilities.

    Example:
        >>> t = torch.tensor([[5.0, 0.0], [5.0, 0.0]])  # prototype 0 dominates both samples
        >>> sinkhorn_knopp(t, 1.0, n_iterations=50).round(decimals=3)
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000]])
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp needs [N, K] logits, got {tuple(teacher_logits.shape)}")
    logits = teacher_logits.detach().float()
    n_prototypes = logits.shape[1]
    top = logits.max() if logits.numel() else logits.new_full((), -torch.inf)
    top = _all_reduce(top.reshape(1).clone(), "max")
    q = torch.exp((logits - top) / teacher_temp).t()  # [K, N]
    n_samples = _all_reduce(torch.full((1,), float(q.shape[1]), device=q.device))
    tiny = torch.finfo(q.dtype).tiny  # a prototype no sample can reach stays 0 instead of 0/0
    q /= _all_reduce(q.sum().reshape(1))
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True)).clamp_min(tiny)  # each prototype: total mass 1 ...
        q /= n_prototypes  # ... then 1/K
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)  # each sample: total mass 1 ...
        q /= n_samples  # ... then 1/N
    return (q * n_samples).t()


def ibot_patch_loss(student_patch_logits: torch.Tensor, teacher_patch_probs: torch.Tensor, masks: torch.Tensor,
                    student_temp: float) -> torch.Tensor:
    """iBOT's masked-patch loss as DINOv2 computes it (``iBOTPatchLoss.forward``).

    Per image ``b`` with masked patches ``M_b`` (``masks[b]``)::

        l_b = 1/max(|M_b|, 1) sum_{n in M_b} sum_k -P_t[b, n, k] log_softmax(s[b, n] / T_s)[k]
        L   = 1/B sum_b l_b

    so every image weighs the same whatever its number of masked patches, and an image with no
    masked patch contributes 0 (but still counts in ``B``). The teacher's probabilities are
    already centred and sharpened (softmax with a centre, or :func:`sinkhorn_knopp`).

    Args:
        student_patch_logits: ``[B, N, K]`` student head outputs for every patch.
        teacher_patch_probs: ``[B, N, K]`` teacher probabilities (only masked positions are read).
        masks: ``[B, N]`` bool, True where the student saw the mask token.
        student_temp: the student's temperature.

    Example:
        >>> s = torch.zeros(2, 3, 4)  # uniform student: log 4 per masked patch
        >>> t = torch.full((2, 3, 4), 0.25)
        >>> m = torch.tensor([[True, True, False], [False, False, False]])
        >>> round(ibot_patch_loss(s, t, m, 0.1).item(), 4)  # (log 4 + 0) / 2
        0.6931
    """
    if student_patch_logits.shape != teacher_patch_probs.shape or student_patch_logits.ndim != 3 \
            or masks.shape != student_patch_logits.shape[:2]:
        raise ValueError(f"expected student and teacher [B, N, K] and masks [B, N], got "
                         f"{tuple(student_patch_logits.shape)}, {tuple(teacher_patch_probs.shape)}, {tuple(masks.shape)}")
    masks = masks.bool()
    ce = torch.sum(-teacher_patch_probs.detach().float() * F.log_softmax(student_patch_logits.float() / student_temp,
                                                                         dim=-1), dim=-1)  # [B, N]
    per_image = (ce * masks).sum(dim=1) / masks.sum(dim=1).clamp_min(1)
    return per_image.mean()
