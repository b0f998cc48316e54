"""Dense matching: token geometry, GLSD distance / similarity matching, region loss, Patch-Wise DINO
correspondences. Expected values are worked out by hand in the comments."""

import math

import pytest
import torch
import torch.nn.functional as nnF
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from selfdistill.data.multicrop import token_centres
from selfdistill.losses import match_by_distance, match_by_similarity, patch_correspondences, region_loss


def _pos(xs, ys):
    """[1, 2, len(ys), len(xs)] centres of a regular grid with column x's and row y's."""
    x = torch.tensor(xs, dtype=torch.float32)[None, :].expand(len(ys), len(xs))
    y = torch.tensor(ys, dtype=torch.float32)[:, None].expand(len(ys), len(xs))
    return torch.stack([x, y])[None]


# ------------------------------------------------------------------------------- token geometry


def test_token_centres_by_hand_flip_and_per_sample():
    # Sample 0: box top=10, left=20, h=8, w=4 on a 2x2 grid: cells are 2 source px wide, 4 high.
    # Columns 20,21 | 22,23 -> x = 20.5, 22.5 ; rows 10..13 | 14..17 -> y = 11.5, 15.5.
    # Sample 1: the same box, flipped: the first token column is the right-hand cell.
    boxes = torch.tensor([[10.0, 20.0, 8.0, 4.0], [10.0, 20.0, 8.0, 4.0]])
    c = token_centres(boxes, torch.tensor([False, True]), (2, 2))
    assert c.shape == (2, 2, 2, 2) and c.dtype == torch.float32
    torch.testing.assert_close(c[0, 0], torch.tensor([[20.5, 22.5], [20.5, 22.5]]))
    torch.testing.assert_close(c[0, 1], torch.tensor([[11.5, 11.5], [15.5, 15.5]]))
    torch.testing.assert_close(c[1, 0], torch.tensor([[22.5, 20.5], [22.5, 20.5]]))
    torch.testing.assert_close(c[1, 1], c[0, 1])

    # Per sample, 3x3 grid: box (0, 0, 6, 6) -> cells of 2 px, centres 0.5, 2.5, 4.5;
    # box (3, 30, 9, 3) flipped -> x cells of 1 px: 30, 31, 32 mirrored; y cells of 3 px: 4, 7, 10.
    c = token_centres([[0, 0, 6, 6], [3, 30, 9, 3]], [False, True], 3)
    torch.testing.assert_close(c[0], _pos([0.5, 2.5, 4.5], [0.5, 2.5, 4.5])[0])
    torch.testing.assert_close(c[1], _pos([32.0, 31.0, 30.0], [4.0, 7.0, 10.0])[0])

    with pytest.raises(ValueError):
        token_centres(torch.zeros(4), torch.zeros(1, dtype=torch.bool), 2)


@pytest.mark.parametrize("flipped", [False, True])
def test_token_centres_are_cell_means_of_a_resized_coordinate_image(flipped):
    # GLSD's construction: resize-crop a map of source coordinates like the image, flip it with
    # the crop, average-pool it by the stride. Crop 32 px, stride 8 -> 4x4 tokens; the box both
    # shrinks (40 -> 32 rows) and stretches (24 -> 32 columns).
    h, w = 60, 50
    coords = torch.stack([torch.arange(w, dtype=torch.float32)[None, :].expand(h, w),
                          torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)])
    top, left, bh, bw = 5, 7, 40, 24
    crop = F.resized_crop(coords, top, left, bh, bw, [32, 32], interpolation=InterpolationMode.BICUBIC,
                          antialias=True)
    if flipped:
        crop = F.horizontal_flip(crop)
    pooled = nnF.avg_pool2d(crop[None], 8)
    got = token_centres(torch.tensor([[top, left, bh, bw]], dtype=torch.float32), torch.tensor([flipped]), 4)
    assert (got - pooled).abs().max() < 0.02


# ------------------------------------------------------------------------------- match_by_distance


def test_match_by_distance_identical_and_flipped_crops():
    # Teacher 2x2 tokens (row-major): 0 (0.5, 0.5), 1 (2.5, 0.5), 2 (0.5, 2.5), 3 (2.5, 2.5).
    t = _pos([0.5, 2.5], [0.5, 2.5])
    idx, keep = match_by_distance(t.clone(), t)
    assert idx.tolist() == [[0, 1, 2, 3]] and keep.all()
    # The same crop flipped: student token 0 sits at x = 2.5 -> teacher 1, etc.
    s = _pos([2.5, 0.5], [0.5, 2.5])
    idx, keep = match_by_distance(s, t)
    assert idx.tolist() == [[1, 0, 3, 2]] and keep.all()

    # Same thing through the real geometry: a 3x3 crop against its own mirror image.
    boxes = torch.tensor([[4.0, 9.0, 30.0, 30.0]])
    t3 = token_centres(boxes, torch.tensor([False]), 3)
    s3 = token_centres(boxes, torch.tensor([True]), 3)
    assert match_by_distance(t3, t3)[0].tolist() == [list(range(9))]
    idx, keep = match_by_distance(s3, t3)
    assert idx.tolist() == [[2, 1, 0, 5, 4, 3, 8, 7, 6]] and keep.all()


def test_match_by_distance_hinge_uses_the_larger_cell():
    # Teacher as above: cells 2x2 px -> half-diagonal^2 = 1^2 + 1^2 = 2.
    # Student 2x2: x in {4.5, 8.5} (cells 4 px wide), y in {0.5, 2.5} (2 px high)
    # -> half-diagonal^2 = 2^2 + 1^2 = 5, so the threshold is max(2, 5) = 5.
    #   s0 (4.5, 0.5): nearest t1 (2.5, 0.5), d = 4        -> kept (only because 4 < 5, not < 2)
    #   s1 (8.5, 0.5): nearest t1, d = 36                  -> dropped
    #   s2 (4.5, 2.5): nearest t3, d = 4 -> kept ; s3 (8.5, 2.5): t3, d = 36 -> dropped
    t = _pos([0.5, 2.5], [0.5, 2.5])
    s = _pos([4.5, 8.5], [0.5, 2.5])
    idx, keep = match_by_distance(s, t)
    assert idx.tolist() == [[1, 1, 3, 3]]
    assert keep.tolist() == [[True, False, True, False]]
    # The threshold is symmetric in the two grids: swap roles (teacher = the wide grid).
    #   t0 (0.5,0.5) -> s0 (4.5,0.5) d=16 ; t1 (2.5,0.5) -> s0 d=4 ; t2 -> s2 d=16 ; t3 -> s2 d=4
    idx, keep = match_by_distance(t, s)
    assert idx.tolist() == [[0, 0, 2, 2]] and keep.tolist() == [[False, True, False, True]]

    idx, keep = match_by_distance(s, t, hinge=False)
    assert idx.tolist() == [[1, 1, 3, 3]] and keep.all() and keep.dtype == torch.bool


def test_match_by_distance_hinge_drops_a_far_token_per_sample():
    # Student = teacher grid except its last token (not one the cell size is measured from):
    #   sample 0: (20, 20), far outside the teacher crop: nearest t3, d = 17.5^2 * 2 -> dropped
    #   sample 1: (3.5, 3.5): nearest t3, d = 1^2 + 1^2 = 2 = threshold -> dropped ("not below")
    #   sample 2: (3.0, 3.0): nearest t3, d = 0.5 -> kept
    t = _pos([0.5, 2.5], [0.5, 2.5]).expand(3, -1, -1, -1)
    s = t.clone()
    s[0, :, 1, 1] = torch.tensor([20.0, 20.0])
    s[1, :, 1, 1] = torch.tensor([3.5, 3.5])
    s[2, :, 1, 1] = torch.tensor([3.0, 3.0])
    idx, keep = match_by_distance(s, t)
    assert idx.tolist() == [[0, 1, 2, 3]] * 3
    assert keep.tolist() == [[True, True, True, False], [True, True, True, False], [True, True, True, True]]
    assert match_by_distance(s, t, hinge=False)[1].all()


# ------------------------------------------------------------------------------- match_by_similarity


def test_match_by_similarity_is_cosine_argmax_per_sample():
    # Teacher tokens t0 = (10, 0), t1 = (1, 1). Cosines:
    #   s0 (1, 0.9):  t0 0.74, t1 0.999 -> 1   (the dot product would pick t0: 10 > 1.9)
    #   s1 (0, 1):    t0 0,    t1 0.71  -> 1
    #   s2 (1, -0.5): t0 0.89, t1 0.32  -> 0
    #   s3 (-1, 0):   t0 -1,   t1 -0.71 -> 1
    # Sample 1 has the teacher tokens swapped, so every index flips.
    s = torch.tensor([[1.0, 0.9], [0.0, 1.0], [1.0, -0.5], [-1.0, 0.0]])
    t = torch.tensor([[10.0, 0.0], [1.0, 1.0]])
    s_feat = torch.stack([s, s]).requires_grad_()
    t_feat = torch.stack([t, t.flip(0)])
    idx = match_by_similarity(s_feat, t_feat)
    assert idx.tolist() == [[1, 1, 0, 1], [0, 0, 1, 0]]
    assert idx.dtype == torch.int64 and not idx.requires_grad


# ------------------------------------------------------------------------------- region_loss


def test_region_loss_uniform_logits_normalise_over_all_tokens():
    # Uniform student and teacher logits: every kept token costs log K, dropped ones 0, and the mean
    # runs over all Ts = 3 tokens: sample 0 keeps 2 of 3 -> 2/3 log K, sample 1 all -> log K.
    B, Ts, Tt, K = 2, 3, 4, 5
    keep = torch.tensor([[True, True, False], [True, True, True]])
    loss = region_loss(torch.zeros(B, Ts, K), torch.zeros(B, Tt, K), torch.zeros(1, K),
                       torch.zeros(B, Ts, dtype=torch.long), keep, 0.1, 0.04)
    assert loss.item() == pytest.approx((2 / 3 + 1) / 2 * math.log(K), rel=1e-6)


def test_region_loss_matches_loop_computation():
    torch.manual_seed(0)
    B, Ts, Tt, K, ts, tt = 2, 3, 4, 5, 0.1, 0.07
    s = torch.randn(B, Ts, K, requires_grad=True)
    t = torch.randn(B, Tt, K, requires_grad=True)
    c = torch.randn(1, K)
    idx = torch.tensor([[3, 0, 3], [1, 2, 0]])
    keep = torch.tensor([[True, False, True], [True, True, False]])

    total = 0.0
    for b in range(B):
        per_sample = 0.0
        for i in range(Ts):
            if not keep[b, i]:
                continue
            z = [(t[b, idx[b, i], k].item() - c[0, k].item()) / tt for k in range(K)]
            q = [math.exp(v - max(z)) for v in z]
            q = [v / sum(q) for v in q]
            zs = [s[b, i, k].item() / ts for k in range(K)]
            lse = max(zs) + math.log(sum(math.exp(v - max(zs)) for v in zs))
            per_sample += -sum(qk * (zk - lse) for qk, zk in zip(q, zs))
        total += per_sample / Ts
    loss = region_loss(s, t, c, idx, keep, ts, tt)
    assert loss.item() == pytest.approx(total / B, rel=1e-5)
    # keep=None keeps everything; gradients reach the student only, and not its dropped tokens.
    assert region_loss(s, t, c, idx, None, ts, tt).item() > loss.item()
    loss.backward()
    assert t.grad is None
    assert s.grad[0, 1].abs().max() == 0 and s.grad[0, 0].abs().max() > 0


def test_region_loss_is_fp32_under_bf16_inputs():
    s = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    t = torch.randn(2, 4, 8, dtype=torch.bfloat16)
    idx = torch.zeros(2, 3, dtype=torch.long)
    loss = region_loss(s, t, torch.zeros(1, 8), idx, torch.ones(2, 3, dtype=torch.bool), 0.1, 0.04)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ------------------------------------------------------------------------------- patch_correspondences


def test_patch_correspondences_identical_and_disjoint_crops():
    idx1, idx2 = patch_correspondences((0, 0, 64, 64), False, 4, (0, 0, 64, 64), False, 4)
    assert idx1.tolist() == list(range(17)) and idx2.tolist() == list(range(17))
    assert idx1.dtype == torch.long

    # Touching at x = 10 only, then fully apart: CLS only.
    for box2 in [(0, 10, 10, 10), (50, 50, 5, 5)]:
        idx1, idx2 = patch_correspondences((0, 0, 10, 10), False, 2, box2, True, 2)
        assert idx1.tolist() == [0] and idx2.tolist() == [0]


def test_patch_correspondences_flip_mirrors_indices():
    # Same box, crop 2 flipped: crop 1's patches 1 2 / 3 4 sit in crop 2 at 2 1 / 4 3.
    idx1, idx2 = patch_correspondences((5, 5, 32, 32), False, 2, (5, 5, 32, 32), True, 2)
    assert idx1.tolist() == [0, 1, 2, 3, 4] and idx2.tolist() == [0, 2, 1, 4, 3]
    # Both flipped: they agree again.
    idx1, idx2 = patch_correspondences((5, 5, 32, 32), True, 2, (5, 5, 32, 32), True, 2)
    assert idx1.tolist() == [0, 2, 1, 4, 3] and idx2.tolist() == [0, 2, 1, 4, 3]


def test_patch_correspondences_flipped_local_inside_global():
    # Global (0, 0, 200, 200), 14x14 patches; flipped local (100, 100, 80, 80), 6x6 patches.
    # Intersection = the local box. Global: start 14 * 100/200 = 7, extent round(14 * 0.4 = 5.6) = 6
    # -> rows/cols 7..12, ids r * 14 + c + 1. Local: all 6x6, columns read right to left.
    idx1, idx2 = patch_correspondences((0, 0, 200, 200), False, 14, (100, 100, 80, 80), True, 6)
    assert len(idx1) == len(idx2) == 37 and idx1[0] == idx2[0] == 0
    assert idx1[1:7].tolist() == [106, 107, 108, 109, 110, 111]
    assert idx2[1:7].tolist() == [6, 5, 4, 3, 2, 1]
    assert idx1[1:].tolist() == [r * 14 + c + 1 for r in range(7, 13) for c in range(7, 13)]
    assert idx2[1:].tolist() == [r * 6 + (5 - c) + 1 for r in range(6) for c in range(6)]


def test_patch_correspondences_bankers_rounding_and_row_subsampling():
    # Crop 1 (0, 0, 16, 16), 4x4 patches; crop 2 (0, 10, 16, 6), 2x2 patches. Intersection cols 10..16.
    # Crop 1 columns: start round(4 * 10/16 = 2.5) = 2 (banker's; half-up would give 3),
    # extent round(4 * 6/16 = 1.5) = 2 -> columns 2, 3 ; rows 0..3 -> ids [[3,4],[7,8],[11,12],[15,16]].
    # Crop 2 covers the intersection: [[1,2],[3,4]]. Rows 4 vs 2: crop 1 keeps floor(linspace(0,3,2)) = 0, 3.
    idx1, idx2 = patch_correspondences((0, 0, 16, 16), False, 4, (0, 10, 16, 6), False, 2)
    assert idx1.tolist() == [0, 3, 4, 15, 16]
    assert idx2.tolist() == [0, 1, 2, 3, 4]
    # Tensors for boxes and flips (as the augmentation records them) give the same answer.
    t1, t2 = patch_correspondences(torch.tensor([0.0, 0.0, 16.0, 16.0]), torch.tensor(False), 4,
                                   torch.tensor([0.0, 10.0, 16.0, 6.0]), torch.tensor(False), 2)
    assert t1.tolist() == idx1.tolist() and t2.tolist() == idx2.tolist()


def test_patch_correspondences_subsample_the_larger_grid_per_axis():
    # Same box, 4x4 vs 3x3: floor(linspace(0, 3, 3)) = floor(0, 1.5, 3) = 0, 1, 3 on both axes.
    idx1, idx2 = patch_correspondences((0, 0, 12, 12), False, 4, (0, 0, 12, 12), False, 3)
    assert idx1.tolist() == [0, 1, 2, 4, 5, 6, 8, 13, 14, 16]
    assert idx2.tolist() == list(range(10))
    idx2, idx1 = patch_correspondences((0, 0, 12, 12), False, 3, (0, 0, 12, 12), False, 4)
    assert idx1.tolist() == [0, 1, 2, 4, 5, 6, 8, 13, 14, 16] and idx2.tolist() == list(range(10))
    # Each axis on its own: crop 1 has more rows (4 vs 2), crop 2 more columns (4 vs 2).
    # Crop 1 (4 rows x 2 cols) keeps rows 0, 3: ids 1 2 / 7 8. Crop 2 (2 rows x 4 cols) keeps
    # columns 0, 3: ids 1 4 / 5 8.
    idx1, idx2 = patch_correspondences((0, 0, 12, 12), False, (4, 2), (0, 0, 12, 12), False, (2, 4))
    assert idx1.tolist() == [0, 1, 2, 7, 8] and idx2.tolist() == [0, 1, 4, 5, 8]
