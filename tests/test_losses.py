import math

import pytest
import torch

from selfdistill.losses import dino_loss, ema_center
from selfdistill.schedules import cosine_schedule, linear_warmup_then_constant


def _ce(q, s_logits, ts):
    """-sum_k q_k log softmax(s/ts)_k for plain Python lists."""
    z = [x / ts for x in s_logits]
    m = max(z)
    lse = m + math.log(sum(math.exp(x - m) for x in z))
    return -sum(qk * (zk - lse) for qk, zk in zip(q, z))


def _softmax(v, t):
    e = [math.exp(x / t) for x in v]
    return [x / sum(e) for x in e]


def test_dino_loss_matches_hand_computation():
    # B = 1, K = 2, 2 global crops + 1 local crop.
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    teacher = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    center = torch.tensor([[1.0, 0.0]])
    ts, tt = 0.5, 0.25
    q0 = _softmax([2.0 - 1.0, 0.0], tt)
    q1 = _softmax([0.0 - 1.0, 0.0], tt)
    # pairs (teacher crop i, student crop v), v != i: (0,1), (0,2), (1,0), (1,2)
    expected = (_ce(q0, [0.0, 1.0], ts) + _ce(q0, [0.5, 0.5], ts) + _ce(q1, [1.0, 0.0], ts)
                + _ce(q1, [0.5, 0.5], ts)) / 4
    got = dino_loss(student, teacher, center, 2, ts, tt)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_batch_mean_and_crop_major_order():
    torch.manual_seed(0)
    B, K, V = 3, 5, 4
    s = torch.randn(V * B, K)
    t = torch.randn(2 * B, K)
    c = torch.randn(1, K)
    # Reference by explicit loops over images (crop-major layout: row = v * B + b).
    total, n = 0.0, 0
    for i in range(2):
        for v in range(V):
            if v == i:
                continue
            per_image = [_ce(_softmax((t[i * B + b] - c[0]).tolist(), 0.04), s[v * B + b].tolist(), 0.1)
                         for b in range(B)]
            total += sum(per_image) / B
            n += 1
    assert dino_loss(s, t, c, 2, 0.1, 0.04).item() == pytest.approx(total / n, rel=1e-5)
    assert n == 2 * (V - 1)


def test_dino_loss_is_fp32_under_bf16_inputs_and_grad_flows_to_student_only():
    s = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    loss = dino_loss(s, t, torch.zeros(1, 16), 2, 0.1, 0.04)
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad is not None and t.grad is None


def test_dino_loss_rejects_bad_shapes():
    with pytest.raises(ValueError):
        dino_loss(torch.randn(5, 4), torch.randn(4, 4), torch.zeros(1, 4), 2, 0.1, 0.04)
    with pytest.raises(ValueError):
        dino_loss(torch.randn(6, 4), torch.randn(4, 3), torch.zeros(1, 4), 2, 0.1, 0.04)


def test_center_update():
    c = torch.tensor([[1.0, 2.0]])
    mean = torch.tensor([[3.0, -2.0]])
    out = ema_center(c, mean, 0.9)
    assert torch.allclose(out, torch.tensor([[0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2]]))


def test_method_center_is_ema_of_teacher_mean():
    from selfdistill.recipe import load_config
    from selfdistill.methods import build_method

    cfg = load_config(None, ["method.out_dim=8", "method.head_hidden_dim=8", "method.head_bottleneck_dim=4",
                             "model.name=vit_tiny_patch16_224", "model.img_size=16", "model.patch_size=8",
                             "model.kwargs={depth: 1, embed_dim: 16, num_heads: 2}"])
    method = build_method(cfg)
    logits = torch.randn(6, 8)
    method.centers.add("center", logits)
    before = method.centers["center"].clone()
    method.centers.update()
    assert torch.allclose(method.centers["center"], 0.9 * before + 0.1 * logits.mean(0, keepdim=True), atol=1e-6)
    method.centers.update()  # the rows were consumed: a second update sees none and only decays
    assert torch.allclose(method.centers["center"], 0.9 * (0.9 * before + 0.1 * logits.mean(0, keepdim=True)),
                          atol=1e-6)


def test_lr_schedule_endpoints_match_dino_cosine_scheduler():
    total, warmup, base, final = 100, 10, 1.0, 0.01
    assert cosine_schedule(0, total, base, final, warmup) == 0.0
    assert cosine_schedule(warmup - 1, total, base, final, warmup) == pytest.approx(base)  # linspace endpoint
    assert cosine_schedule(warmup, total, base, final, warmup) == pytest.approx(base)
    last = final + 0.5 * (base - final) * (1 + math.cos(math.pi * (total - 1 - warmup) / (total - warmup)))
    assert cosine_schedule(total - 1, total, base, final, warmup) == pytest.approx(last)
    assert cosine_schedule(10_000, total, base, final, warmup) == pytest.approx(last)  # clamps


def test_weight_decay_and_momentum_schedule_endpoints():
    assert cosine_schedule(0, 50, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine_schedule(49, 50, 0.04, 0.4) == pytest.approx(0.4, abs=1e-3)
    assert cosine_schedule(0, 50, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_schedule(49, 50, 0.996, 1.0) == pytest.approx(1.0, abs=1e-5)
    mid = cosine_schedule(25, 50, 0.996, 1.0)
    assert 0.996 < mid < 1.0


def test_teacher_temperature_warmup_is_per_epoch_linspace():
    assert linear_warmup_then_constant(0, 30, 0.04, 0.07) == pytest.approx(0.04)
    assert linear_warmup_then_constant(29, 30, 0.04, 0.07) == pytest.approx(0.07)
    assert linear_warmup_then_constant(15, 30, 0.04, 0.07) == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert linear_warmup_then_constant(99, 30, 0.04, 0.07) == 0.07
    assert linear_warmup_then_constant(0, 0, 0.04, 0.07) == 0.07
