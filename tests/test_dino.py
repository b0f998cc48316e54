"""DINO method pieces: one backbone call per crop resolution, named groups, teacher set-up."""

import torch

from selfdistill.recipe import load_config
from selfdistill.methods import build_method

TINY = ["method.out_dim=16", "method.head_hidden_dim=16", "method.head_bottleneck_dim=8",
        "model.name=vit_tiny_patch16_224", "model.img_size=16", "model.patch_size=4",
        "model.kwargs={depth: 1, embed_dim: 16, num_heads: 2}"]


def test_same_resolution_crops_share_one_backbone_forward():
    method = build_method(load_config(None, TINY))
    calls = []
    method.student.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    crops = [torch.randn(3, 3, 16, 16) for _ in range(2)] + [torch.randn(3, 3, 8, 8) for _ in range(4)]
    logits, emb = method.student(crops)
    assert calls == [(6, 3, 16, 16), (12, 3, 8, 8)]
    assert logits.shape == (18, 16) and emb.shape == (18, 16)
    # Crop-major order: row v*B + b is crop v of image b.
    single, _ = method.student([crops[4][1:2]])
    assert torch.allclose(logits[4 * 3 + 1], single[0], atol=1e-5)


def test_param_groups_are_named_and_follow_dino_rules():
    method = build_method(load_config(None, TINY))
    groups = {g.name: g for g in method.param_groups()}
    assert set(groups) == {"regularized", "not_regularized", "last_layer"}
    names = {id(p): n for n, p in method.student.named_parameters()}
    assert all(names[id(p)].endswith(".bias") or p.ndim <= 1 for p in groups["not_regularized"].params)
    assert all(p.ndim > 1 and not names[id(p)].endswith(".bias") for p in groups["regularized"].params)
    assert [names[id(p)] for p in groups["last_layer"].params] == ["head.last_layer.parametrizations.weight.original1"]
    assert groups["last_layer"].frozen_epochs == 1
    assert not groups["not_regularized"].weight_decay
    n_trainable = sum(p.requires_grad for p in method.student.parameters())
    assert sum(len(g.params) for g in groups.values()) == n_trainable


def test_teacher_starts_as_student_without_grad_and_drop_path():
    deeper = [o for o in TINY if not o.startswith("model.kwargs")] + ["model.kwargs={depth: 2, embed_dim: 16, num_heads: 2}"]
    method = build_method(load_config(None, deeper + ["model.drop_path_rate=0.2"]))
    s, t = method.student.state_dict(), method.teacher.state_dict()
    assert all(torch.equal(s[k], t[k]) for k in s)
    assert not any(p.requires_grad for p in method.teacher.parameters())
    assert not method.teacher.training
    dpr = [m.drop_prob for m in method.teacher.modules() if hasattr(m, "drop_prob")]
    assert all(p == 0 for p in dpr)
    assert any(m.drop_prob > 0 for m in method.student.modules() if hasattr(m, "drop_prob"))


def test_student_distils_a_fixed_teacher_on_a_repeated_batch():
    """With the EMA and the center frozen the target is fixed, so the loss must fall: this checks
    the direction of every gradient from the loss to the student's backbone and head."""
    from selfdistill.methods import Progress

    torch.manual_seed(0)
    frozen = ["method.freeze_last_layer_epochs=0", "method.momentum_teacher=1.0", "method.center_momentum=1.0"]
    method = build_method(load_config(None, TINY + frozen))
    params = [p for g in method.param_groups() for p in g.params]
    opt = torch.optim.AdamW(params, lr=1e-3)
    crops = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8) for _ in range(2)]
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    losses = []
    for step in range(30):
        progress = Progress(step=step, epoch=0, steps_per_epoch=100, total_steps=100)
        out = method.training_step(method.student, {"crops": crops}, progress)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        method.after_optimizer_step(method.student, progress)
        losses.append(out.loss.item())
    assert all(torch.equal(v, teacher_before[k]) for k, v in method.teacher.state_dict().items())
    assert losses[-1] < 0.5 * losses[0], losses
