"""DINOv2: its three losses against hand-computed values, the block masking's statistics, the
method's parameter groups and refusals, training, distillation from a frozen teacher of another
width, exact resume, two gloo ranks equal to one, and iBOT's loss falling on real photos."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DDP_2PROC, accelerate_launch, logged_losses, make_image_folder, run_training, zero_launcher

from selfdistill.configkit import ConfigError
from selfdistill.data.masking import BlockMasking
from selfdistill.engine import checkpoint as ckpt
from selfdistill.losses import ibot_patch_loss, koleo_loss, sinkhorn_knopp
from selfdistill.methods import build_method
from selfdistill.recipe import load_config

ROOT = Path(__file__).resolve().parents[1]
HEADS = ["method.ibot_out_dim=32", "method.ibot_head_hidden_dim=32", "method.ibot_head_bottleneck_dim=16"]
V2 = ["method.name=dinov2", *HEADS]
TINY = ["method.out_dim=16", "method.head_hidden_dim=16", "method.head_bottleneck_dim=8",
        "model.name=vit_tiny_patch16_224", "model.img_size=16", "model.patch_size=4", "data.global_crop_size=16",
        "model.kwargs={depth: 2, embed_dim: 16, num_heads: 2}", *V2]
TEACHER_KWARGS = "{img_size: 16, patch_size: 4, depth: 1, embed_dim: 48, num_heads: 2}"


# -- losses ---------------------------------------------------------------------------------------


def test_koleo_loss_hand_computed():
    # Unit rows a=(1,0), b=(.6,.8), c=(0,-1): a<->b are nearest (distance sqrt(.8)), c's nearest is a (sqrt 2).
    x = torch.tensor([[2.0, 0.0], [0.6, 0.8], [0.0, -3.0]], requires_grad=True)  # norms do not matter
    want = -(2 * math.log(math.sqrt(0.8)) + math.log(math.sqrt(2.0))) / 3
    got = koleo_loss(x)
    assert got.item() == pytest.approx(want, abs=1e-6)
    got.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # PyTorch's PairwiseDistance semantics: |x - y + eps|, then -log(d + eps); a collapsed pair costs ~18.
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    eps = 1e-8
    assert koleo_loss(same).item() == pytest.approx(-math.log(math.sqrt(2) * eps + eps), rel=1e-5)
    # Spreading the batch lowers it: uniform on the circle beats clustered.
    angles = torch.linspace(0, 2 * math.pi, 9)[:-1]
    spread = torch.stack([angles.cos(), angles.sin()], 1)
    assert koleo_loss(spread) < koleo_loss(spread * torch.tensor([1.0, 0.1]))


def test_sinkhorn_knopp_rebalances_a_dominant_prototype():
    # exp(logits).T = [[4, 4, 1], [1, 1, 1]]: prototype 0 dominates. Three rounds by hand (see the
    # docstring's recipe): rows -> 1/K, columns -> 1/N; values carried to 5 digits.
    logits = torch.log(torch.tensor([[4.0, 1.0], [4.0, 1.0], [1.0, 1.0]]))
    want = torch.tensor([[0.60929, 0.39071], [0.60929, 0.39071], [0.28049, 0.71951]])
    got = sinkhorn_knopp(logits, teacher_temp=1.0, n_iterations=3)
    assert torch.allclose(got, want, atol=2e-4), got
    assert torch.allclose(got.sum(1), torch.ones(3), atol=1e-6)
    # One round already balances two identical samples whose softmax is 99.3 % on prototype 0.
    twin = torch.tensor([[5.0, 0.0], [5.0, 0.0]])
    assert F.softmax(twin, -1)[0, 0] > 0.99
    assert torch.allclose(sinkhorn_knopp(twin, 1.0, n_iterations=1), torch.full((2, 2), 0.5), atol=1e-6)
    # Logits near 10 at temperature 0.04 (exp(250) overflows float32) do not overflow; bf16 in,
    # float32 out, no gradient.
    big = (10 + torch.randn(6, 5)).bfloat16().requires_grad_()
    q = sinkhorn_knopp(big, 0.04)
    assert q.dtype == torch.float32 and torch.isfinite(q).all() and not q.requires_grad


def test_ibot_patch_loss_hand_computed_with_an_unmasked_image():
    # Student softmax [.25, .75] on every patch (temperature 1); teacher [1, 0] and [.5, .5] on the
    # two masked patches of image 0; image 1 has no masked patch: it adds 0 but counts in the mean.
    s = torch.tensor([0.0, math.log(3.0)]).expand(2, 3, 2).clone().requires_grad_()
    t = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], [[0.0, 1.0]] * 3])
    masks = torch.tensor([[True, True, False], [False, False, False]])
    ce = [-math.log(0.25), -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))]
    got = ibot_patch_loss(s, t, masks, student_temp=1.0)
    assert got.item() == pytest.approx(sum(ce) / 2 / 2, abs=1e-6)
    got.backward()
    assert s.grad[0, 2].abs().sum() == 0 and s.grad[1].abs().sum() == 0  # only masked patches teach
    # Per image, then over images: one masked patch weighs as much as two in another image.
    m2 = torch.tensor([[True, True, False], [True, False, False]])
    t2 = t.clone()
    t2[1, 0] = torch.tensor([1.0, 0.0])
    assert ibot_patch_loss(s, t2, m2, 1.0).item() == pytest.approx((sum(ce) / 2 + ce[0]) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="masks"):
        ibot_patch_loss(s, t, masks[:, :2], 1.0)


def _sinkhorn_rank(rank: int, world: int, init: str, rows: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        mine = rows.chunk(world)[rank]
        torch.save(sinkhorn_knopp(mine, 0.1), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sinkhorn_knopp_on_two_ranks_equals_one_rank_on_all_rows(tmp_path):
    rows = torch.randn(6, 5) * 3
    rows[:, 0] += 4  # a dominant prototype the balance has to see across ranks
    out = str(tmp_path / "q")
    torch.multiprocessing.start_processes(_sinkhorn_rank, args=(2, f"file://{tmp_path / 'init'}", rows, out),
                                          nprocs=2, start_method="fork")  # fork: no second import of torch
    both = torch.cat([torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)])
    assert torch.allclose(both, sinkhorn_knopp(rows, 0.1), atol=1e-6)


# -- masking --------------------------------------------------------------------------------------


def test_block_masking_probability_and_ratio_match_the_settings_over_3000_draws():
    torch.manual_seed(0)
    masking = BlockMasking((16, 16), sample_probability=0.5, ratio_min_max=(0.1, 0.5))
    draws = torch.stack([masking() for _ in range(3000)])
    masked = draws.any(dim=1)
    p, n = masked.float().mean().item(), len(draws)
    assert abs(p - 0.5) < 4 * math.sqrt(0.5 * 0.5 / n), p
    ratios = draws[masked].float().mean(dim=1)
    sigma = (0.4 / math.sqrt(12)) / math.sqrt(len(ratios))  # std of U(0.1, 0.5) over the masked draws
    assert abs(ratios.mean().item() - 0.3) < 4 * sigma + 1 / 256, ratios.mean()  # + one patch of rounding
    assert ratios.min() >= 0.1 - 2 / 256 and ratios.max() <= 0.5
    # Rectangles, not scattered patches: a masked patch mostly has a masked 4-neighbour.
    grid = draws[masked].view(-1, 16, 16)
    neighbour = torch.zeros_like(grid)
    neighbour[:, 1:] |= grid[:, :-1]
    neighbour[:, :-1] |= grid[:, 1:]
    assert (neighbour & grid).sum() / grid.sum() > 0.9


# -- the method -----------------------------------------------------------------------------------


def test_param_groups_decay_the_lr_by_layer_and_freeze_both_last_layers():
    method = build_method(load_config(None, TINY + ["method.ibot_separate_head=true", "method.layerwise_decay=0.5"]))
    names = {id(p): n for n, p in method.student.named_parameters()}
    scale = {names[id(p)]: g.lr_scale for g in method.param_groups() for p in g.params}
    assert scale["backbone.model.blocks.1.attn.qkv.weight"] == 0.5
    assert scale["backbone.model.blocks.0.attn.qkv.weight"] == 0.25
    assert scale["backbone.model.cls_token"] == scale["mask_token"] == 0.125
    assert scale["backbone.model.patch_embed.proj.weight"] == pytest.approx(0.125 * 0.2)
    assert scale["head.mlp.0.weight"] == scale["ibot_head.mlp.0.weight"] == scale["backbone.model.norm.weight"] == 1
    frozen = [names[id(p)] for g in method.param_groups() if g.frozen_epochs == 1 for p in g.params]
    assert sorted(frozen) == ["head.last_layer.parametrizations.weight.original0",
                              "head.last_layer.parametrizations.weight.original1",
                              "ibot_head.last_layer.parametrizations.weight.original0",
                              "ibot_head.last_layer.parametrizations.weight.original1"]
    assert sum(len(g.params) for g in method.param_groups()) == sum(
        p.requires_grad for p in method.student.parameters())


def test_student_sees_the_mask_token_where_masked_and_the_teacher_the_whole_crop():
    method = build_method(load_config(None, TINY))
    net = method.student.eval()
    crops = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)]
    masks = torch.zeros(4, 16, dtype=torch.bool)
    masks[0, :5] = True
    with torch.no_grad():
        net.mask_token.fill_(3.0)
        cls_m, patch_m, glob_m = net(crops, masks, True)
        cls_u, patch_u, glob_u = net(crops, masks, False)
    assert patch_m.shape == patch_u.shape == (5, 16) and cls_m.shape == (4, 16)
    assert not torch.allclose(glob_m[0], glob_u[0]) and torch.allclose(glob_m[1:], glob_u[1:], atol=1e-6)


def test_register_tokens_are_prefix_tokens_not_patches():
    """timm's ViTs with register tokens (DINOv2's *_reg4): the iBOT patches are the 16 grid tokens."""
    regs = [o for o in TINY if not o.startswith("model.kwargs")] + [
        "model.kwargs={depth: 1, embed_dim: 16, num_heads: 2, reg_tokens: 4}"]
    method = build_method(load_config(None, regs))
    assert method.student.backbone.num_prefix_tokens == 5
    masks = torch.zeros(4, 16, dtype=torch.bool)
    masks[1, 3:9] = True
    cls, patches, glob = method.student([torch.randn(2, 3, 16, 16)] * 2, masks, True)
    assert patches.shape == (6, 16) and glob.shape == (4, 16) and cls.shape == (4, 16)


def test_refusals_are_one_line_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.name.*ViT"):
        build_method(load_config(None, V2 + ["model.name=resnet10t", "model.img_size=null", "method.out_dim=16", "method.head_hidden_dim=16",
                                             "method.head_bottleneck_dim=8"]))
    with pytest.raises(ConfigError, match="teacher_weights"):
        load_config(None, V2 + ["method.teacher_model=vit_tiny_patch16_224"])
    teacher = _tiny_teacher(tmp_path, patch=8)
    with pytest.raises(ConfigError, match="patch"):
        build_method(load_config(None, TINY + _distill(teacher, patch=8)))


def _tiny_teacher(tmp_path: Path, patch: int = 4) -> Path:
    """A ViT wider than the student (48 vs 32/16 channels), saved as safetensors with timm keys."""
    from safetensors.torch import save_file

    from selfdistill.models.networks import create_timm_model

    torch.manual_seed(1)
    net = create_timm_model("vit_tiny_patch16_224", 16, patch, depth=1, embed_dim=48, num_heads=2)
    path = tmp_path / f"teacher_p{patch}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def _distill(teacher: Path, patch: int = 4) -> list[str]:
    return ["method.teacher_model=vit_tiny_patch16_224", f"method.teacher_weights={teacher}",
            f"method.teacher_kwargs={{img_size: 16, patch_size: {patch}, depth: 1, embed_dim: 48, num_heads: 2}}"]


def _resumed_run_equals_uninterrupted(images: Path, tmp_path: Path, *extra: str) -> tuple[Path, dict]:
    """Train 8 steps, and again stopped after 3 and resumed: the logged losses, the EMA teacher (mask
    token included) and every centre must be equal. Returns the uninterrupted run's directory and state."""
    full, part = tmp_path / "full", tmp_path / "part"
    run_training(images, full, *extra)
    run_training(images, part, *extra, **{"train.max_steps": 3})
    run_training(images, part, *extra, resume="auto")
    got = logged_losses(full)
    assert len(got) == 8 and all(math.isfinite(x) for x in got)
    assert logged_losses(part) == got
    a, b = (ckpt.load_task_state(ckpt.latest_checkpoint(d)) for d in (full, part))
    assert all(torch.equal(a["teacher"][k], b["teacher"][k]) for k in a["teacher"])  # the student's EMA
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != "teacher")  # the centres
    return full, a


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_distillation_from_a_wider_frozen_teacher_trains_and_resumes_exactly(image_folder, tmp_path):
    teacher = _tiny_teacher(tmp_path)
    full, state = _resumed_run_equals_uninterrupted(image_folder, tmp_path, *V2, *_distill(teacher),
                                                    "method.centering=centering", "method.ibot_separate_head=true")
    assert {"center", "ibot_center"} <= state.keys()  # both centres were compared
    # The frozen teacher is not the EMA: its width is 48, the exported EMA student's 32.
    from safetensors.torch import load_file

    exported = load_file(str(full / "export" / "teacher_backbone.safetensors"))
    assert exported["cls_token"].shape[-1] == 32
    assert load_file(str(teacher))["cls_token"].shape[-1] == 48
    log = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines() if '"ibot_loss"' in line]
    assert all(r["ibot_loss"] >= 0 and math.isfinite(r["koleo_loss"]) for r in log)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_dinov2_from_scratch_trains_and_resumes_exactly(image_folder, tmp_path):
    """The EMA teacher (DINOv2's own training, Sinkhorn-Knopp centering): interrupted after 3 steps and
    resumed, the losses, the EMA teacher and the centres equal an uninterrupted run's."""
    _resumed_run_equals_uninterrupted(image_folder, tmp_path, *V2)


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_dinov2_on_two_ddp_ranks_gives_the_losses_of_one_rank(tmp_path):
    """DINOv2 from scratch: Sinkhorn-Knopp's all-reduced sums and counts make two DDP ranks of batch 8
    log one rank of batch 16's losses (KoLeo, per rank by design, left out as above)."""
    data = make_image_folder(tmp_path / "img")
    common = [*V2, "train.epochs=1", "model.drop_path_rate=0.0", "method.koleo_loss_weight=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_training(data, one, *common, "train.batch_size_per_device=16")
    accelerate_launch(DDP_2PROC, data, two, *common, "train.batch_size_per_device=8")
    a, b = logged_losses(one), logged_losses(two)
    assert len(a) == len(b) == 2 and all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(a, b)), (a, b)


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    """Real photos (scikit-learn's two samples) cut into 16 crops: texture the patches can predict."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    rng = torch.Generator().manual_seed(0)
    for name in ("china.jpg", "flower.jpg"):
        photo = Image.fromarray(load_sample_image(name))
        (tmp_path / "photos" / name[:-4]).mkdir(parents=True)
        for i in range(8):
            top, left = (int(v) for v in torch.randint(0, 300, (2,), generator=rng))
            photo.crop((left, top, left + 96, top + 96)).resize((32, 32)).save(tmp_path / "photos" / name[:-4]
                                                                               / f"{i}.png")
    return tmp_path / "photos"


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_ibot_loss_falls_on_real_photos(photo_folder, tmp_path):
    """One repeated batch of photo crops, every global crop masked, a fixed teacher: the student
    must learn to predict the teacher's distribution on the patches it cannot see."""
    out = tmp_path / "run"
    run_training(photo_folder, out, *V2, "train.overfit_batches=1", "train.epochs=8", "optim.warmup_epochs=0",
                 "optim.lr=0.2", "model.drop_path_rate=0.0", "method.momentum_teacher=1.0",
                 "method.freeze_last_layer_epochs=0", "method.mask_sample_probability=1.0",
                 "method.warmup_teacher_temp_epochs=0", "data.global_crop_size=32", "model.img_size=32",
                 "data.local_crop_size=16")
    ibot = [json.loads(line)["ibot_loss"] for line in (out / "log.jsonl").read_text().splitlines()
            if '"ibot_loss"' in line]
    assert len(ibot) == 8 and ibot[-1] < 0.8 * ibot[0], ibot


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_distillation_on_two_zero3_ranks_gives_the_losses_of_one_rank(tmp_path):
    """Sinkhorn-Knopp's sums and the loss means over two ranks of batch 8 equal one rank of batch
    16 (same images, same per-image crops and masks), here with the student, its EMA and the frozen
    teacher partitioned by ZeRO-3. KoLeo's nearest neighbours are searched in each rank's batch, as
    DINOv2 does, so it differs by design and is left out here."""
    data = make_image_folder(tmp_path / "img")
    teacher = _tiny_teacher(tmp_path)
    common = [*V2, *_distill(teacher), "train.epochs=1", "model.drop_path_rate=0.0", "method.koleo_loss_weight=0",
              "method.ibot_separate_head=true"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_training(data, one, *common, "train.batch_size_per_device=16")
    accelerate_launch(zero_launcher(3), data, two, *common, "train.batch_size_per_device=8")
    a, b = logged_losses(one), logged_losses(two)
    assert len(a) == len(b) == 2 and all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(a, b)), (a, b)


def test_recipes_load():
    c = load_config(ROOT / "configs" / "dinov2_vit_small14.yaml", [])
    assert c.method.name == "dinov2" and c.method.centering == "sinkhorn_knopp" and c.method.koleo_loss_weight == 0.1
    d = load_config(ROOT / "configs" / "dinov2_distill_vitl14_to_vits14.yaml", [])
    assert d.method.teacher_model == "vit_large_patch14_dinov2" and d.model.name == "vit_small_patch14_dinov2"
