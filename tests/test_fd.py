"""FD (Feature Distillation): the loss, the teacher checkpoint formats, training on tiny ViT and
Swin pairs, resume, recipes, and two ranks (DDP and ZeRO-3 with a partitioned teacher)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ACCELERATE_LAUNCH, logged_losses, make_image_folder, merged
from safetensors.torch import load_file, save_file

from selfdistill.recipe import load_config
from selfdistill.engine import checkpoint as ckpt
from selfdistill.losses import fd_loss
from selfdistill.models import create_timm_model
from selfdistill.models.weights import load_teacher

ROOT = Path(__file__).resolve().parents[1]
TEACHER = dict(depth=2, embed_dim=48, num_heads=2)
BEIT = ("{depth: 2, embed_dim: 32, num_heads: 2, use_abs_pos_emb: false, use_rel_pos_bias: false, "
        "use_shared_rel_pos_bias: true, init_values: 0.1, global_pool: token}")
SWIN = dict(depths=[2, 1, 1, 1], embed_dim=16, num_heads=[1, 1, 1, 1], window_size=2)
SWIN_STUDENT = ["model.name=swin_tiny_patch4_window7_224", "model.img_size=64", "model.patch_size=null",
                "model.kwargs={depths: [1, 1, 1, 1], embed_dim: 24, num_heads: [1, 1, 1, 1], window_size: 2}",
                "data.global_crop_size=64", "knn.image_size=64"]
REPEATED = ["train.overfit_batches=1", "model.drop_path_rate=0.0", "optim.warmup_epochs=0", "optim.lr=0.05",
            "train.epochs=5"]


def save_torch(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def tiny_vit_teacher(seed: int = 0, name: str = "vit_tiny_patch16_224", **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_timm_model(name, 16, 4, **{**TEACHER, **kw}).eval()


def tiny_swin_teacher(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_timm_model("swin_base_patch4_window7_224", 64, None, **SWIN).eval()


def plain(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def fd_overrides(data: Path, out: Path, teacher: Path, *extra: str) -> list[str]:
    """A 2-block BEiT-style student (FD's: no absolute position embedding, one shared relative
    position bias, layer scale 0.1) learning a 2-block ViT teacher's 16 px, 4x4-token map."""
    return merged(["method.name=fd", "method.teacher_model=vit_tiny_patch16_224", f"method.teacher_weights={teacher}",
            "method.teacher_kwargs={img_size: 16, patch_size: 4, depth: 2, embed_dim: 48, num_heads: 2}",
            "model.name=beit_base_patch16_224", "model.img_size=16", "model.patch_size=4", "model.drop_path_rate=0.1",
            f"model.kwargs={BEIT}", f"data.path={data}", "data.global_crop_size=16",
            "data.global_crop_scale=[0.08, 1.0]",
            "data.num_workers=0", "optim.warmup_epochs=1", "optim.weight_decay=0.05", "optim.weight_decay_end=0.05",
            f"train.output_dir={out}", "train.epochs=2", "train.batch_size_per_device=8", "train.log_every=1",
            "train.trackers=[]", "train.progress_bar=false", "knn.image_size=16", "knn.k=[1, 3]", *extra])


@pytest.fixture(scope="module")
def setup_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fd")
    data = make_image_folder(root / "img")
    vit = root / "teacher_vit.safetensors"
    save_file(plain(tiny_vit_teacher()), str(vit))
    return {"root": root, "data": data, "vit": vit}


def train(files, out: Path, *extra: str, resume: str | None = None):
    from selfdistill.pretrain import pretraining

    return pretraining(load_config(None, fd_overrides(files["data"], out, files["vit"], *extra)), resume=resume).fit()


# -- the loss -----------------------------------------------------------------------------------


def test_fd_loss_hand_made_case():
    teacher = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    z = (teacher - 2.5) / math.sqrt(1.25 + 1e-5)  # per-token LayerNorm, biased variance, eps 1e-5, no gain/bias
    # |d| < beta = 2 everywhere: 0.5 d^2 / 2 = d^2 / 4, mean over the 4 channels.
    assert fd_loss(torch.zeros(1, 1, 4), teacher).item() == pytest.approx((z ** 2 / 4).mean().item(), rel=1e-6)
    assert fd_loss(torch.zeros(1, 1, 4), teacher).item() == pytest.approx(0.25, rel=1e-4)
    # Two channels past beta: |d| - beta / 2 = |d| - 1 there.
    pred = torch.tensor([[[4.0, 0.0, 0.0, -4.0]]])
    d = (pred - z).abs()[0, 0]
    want = ((d[0] - 1) + d[1] ** 2 / 4 + d[2] ** 2 / 4 + (d[3] - 1)) / 4
    assert fd_loss(pred, teacher).item() == pytest.approx(want.item(), rel=1e-6)
    # The reference implementation's value on random tensors (SmoothL1Loss(2.0) after LayerNorm without affine).
    torch.manual_seed(1)
    pred, target = torch.randn(2, 197, 768), torch.randn(2, 197, 768) * 4 + 2
    assert fd_loss(pred, target).item() == pytest.approx(0.4722956120967865, rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        fd_loss(torch.zeros(1, 2, 4), teacher)


def test_whitening_has_no_parameters_and_is_per_token():
    """The target LayerNorm has no gain or bias: a per-token affine change of the teacher's tokens
    (any scale > 0, any shift) leaves the loss unchanged, and the gradient stops at the teacher."""
    torch.manual_seed(0)
    pred = torch.randn(2, 5, 8, requires_grad=True)
    teacher = torch.randn(2, 5, 8, requires_grad=True)
    scale, shift = torch.rand(2, 5, 1) * 3 + 1, torch.randn(2, 5, 1) * 10
    assert fd_loss(pred, teacher * scale + shift).item() == pytest.approx(fd_loss(pred, teacher).item(), rel=1e-4)
    fd_loss(pred, teacher).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert teacher.grad is None


# -- the method ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_gradient_reaches_projector_and_student_not_teacher(setup_files, tmp_path):
    from accelerate import Accelerator

    from selfdistill.methods import Progress, build_method

    config = load_config(None, fd_overrides(setup_files["data"], tmp_path, setup_files["vit"]))
    method = build_method(config)
    # The trainable parameters are the student backbone and the 1x1 projector: no whitening parameters.
    names = [n for n, _ in method.student.named_parameters()]
    assert {n for n in names if not n.startswith("backbone.")} == {"projector.weight", "projector.bias"}
    assert method.student.projector.weight.shape == (48, 32)  # teacher channels x student channels
    groups = {g.name: g.params for g in method.param_groups()}
    assert sum(len(p) for p in groups.values()) == len(names)
    no_decay = {id(p) for p in groups["no_decay"]}
    named = dict(method.student.named_parameters())
    assert id(named["backbone.model.cls_token"]) in no_decay and id(named["projector.bias"]) in no_decay
    assert id(named["backbone.model.blocks.0.gamma_1"]) in no_decay  # layer scale (1-D)
    assert id(named["projector.weight"]) not in no_decay
    assert id(named["backbone.model.rel_pos_bias.relative_position_bias_table"]) not in no_decay  # 2-D, as FD

    method.setup(Accelerator(cpu=True), 1, 1)
    teacher_params = list(method.teacher.parameters())
    assert teacher_params and not any(p.requires_grad for p in teacher_params)
    assert not any(m.training for m in method.teacher.module().modules())
    out = method.training_step(method.student, {"image": torch.randn(4, 3, 16, 16)},
                               Progress(step=0, epoch=0, steps_per_epoch=1, total_steps=1))
    out.loss.backward()
    assert method.student.projector.weight.grad.abs().sum() > 0
    assert named["backbone.model.patch_embed.proj.weight"].grad.abs().sum() > 0
    assert named["backbone.model.rel_pos_bias.relative_position_bias_table"].grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher_params)
    # The target is the teacher's token map incl. CLS after its final norm.
    x = torch.randn(2, 3, 16, 16)
    reference = tiny_vit_teacher()
    assert torch.allclose(method.teacher(x), reference.forward_features(x), atol=1e-6)
    assert method.teacher(x).shape == (2, 17, 48)


def test_clip_teacher_gets_clip_normalisation(setup_files, tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator

    from selfdistill.methods import build_method
    from selfdistill.methods.fd import CLIP_MEAN, CLIP_STD

    config = load_config(None, fd_overrides(setup_files["data"], tmp_path, setup_files["vit"],
                                            f"method.teacher_mean={list(CLIP_MEAN)}",
                                            f"method.teacher_std={list(CLIP_STD)}"))
    method = build_method(config)
    method.setup(Accelerator(cpu=True), 1, 1)
    pixels = torch.rand(2, 3, 4, 4)
    mean, std = torch.tensor(config.data.mean).view(3, 1, 1), torch.tensor(config.data.std).view(3, 1, 1)
    clip = (pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    assert torch.allclose(method.teacher_input((pixels - mean) / std), clip, atol=1e-5)


def test_token_grid_mismatch_and_missing_teacher_are_clear_errors(setup_files, tmp_path):
    from selfdistill.configkit import ConfigError
    from selfdistill.methods import build_method

    bad = fd_overrides(setup_files["data"], tmp_path, setup_files["vit"],
                       "method.teacher_kwargs={img_size: 16, patch_size: 8, depth: 2, embed_dim: 48, num_heads: 2}")
    with pytest.raises(ValueError, match=r"token grids must be equal.*1 prefix \+ 4x4.*1 prefix \+ 2x2"):
        build_method(load_config(None, bad))
    with pytest.raises(ConfigError, match="method.teacher_weights"):
        load_config(None, ["method.name=fd", "method.teacher_model=vit_base_patch16_224"])
    with pytest.raises(ConfigError, match="method.teacher_format: unknown format 'clip'"):
        load_config(None, ["method.name=fd", "method.teacher_model=vit_tiny_patch16_224", "method.teacher_weights=x",
                           "method.teacher_format=clip"])
    # A BEiT student that normalises only its pooled vector would regress un-normalised tokens.
    fc_norm = fd_overrides(setup_files["data"], tmp_path, setup_files["vit"],
                           f"model.kwargs={BEIT.replace('global_pool: token', 'global_pool: avg')}")
    with pytest.raises(ValueError, match="global_pool: token"):
        build_method(load_config(None, fc_norm))


# -- teacher checkpoint formats -----------------------------------------------------------------

CLIP_PREFIXES = [("patch_embed.proj.", "conv1."), ("norm_pre.", "ln_pre."), ("norm.", "ln_post."),
                 ("blocks.", "transformer.resblocks.")]
CLIP_PARTS = [(".norm1.", ".ln_1."), (".norm2.", ".ln_2."), (".attn.qkv.weight", ".attn.in_proj_weight"),
              (".attn.qkv.bias", ".attn.in_proj_bias"), (".attn.proj.", ".attn.out_proj."),
              (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj.")]


def to_openai_clip(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm CLIP ViT keys -> OpenAI's CLIP layout (the inverse of timm's converter), text tower included."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "cls_token":
            k, v = "class_embedding", v[0, 0]
        elif k == "pos_embed":
            k, v = "positional_embedding", v[0]
        for a, b in CLIP_PREFIXES:
            if k.startswith(a):
                k = b + k[len(a):]
        for a, b in CLIP_PARTS:
            k = k.replace(a, b)
        out["visual." + k] = v
    d = model.embed_dim
    out.update({"visual.proj": torch.randn(d, 24), "text_projection": torch.randn(d, 24), "logit_scale": torch.ones(()),
                "token_embedding.weight": torch.randn(10, d), "positional_embedding": torch.randn(7, d),
                "transformer.resblocks.0.ln_1.weight": torch.ones(d), "ln_final.weight": torch.ones(d),
                "input_resolution": torch.tensor(16), "context_length": torch.tensor(7),
                "vocab_size": torch.tensor(10)})
    return out


def to_original_swin(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm Swin keys -> Microsoft's original layout: a stage's downsampling at the end of the previous
    stage, persistent relative position indices, attention masks of shifted blocks."""
    out = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k): v
           for k, v in model.state_dict().items()}
    for name, buf in model.named_buffers():
        if name.endswith("relative_position_index"):
            out[name] = buf.clone()
    for name, module in model.named_modules():
        if hasattr(module, "shift_size") and any(module.shift_size):
            out[f"{name}.attn_mask"] = torch.randn(4, 4, 4)
    return out


def _fmt_cases(root: Path):
    """(format, timm name, timm kwargs, original model, file, expected left-out keys)."""
    ns = argparse.Namespace(arch="vit_base", lr=0.0005, out_dim=65536, output_dir="/runs/x")
    cases = []

    clip = tiny_vit_teacher(1, "vit_base_patch16_clip_quickgelu_224")
    with torch.no_grad():  # OpenAI ships fp16 weights: make the reference exactly representable
        for p in clip.parameters():
            p.copy_(p.half().float())
    state = {k: v.half() for k, v in to_openai_clip(clip).items()}
    cases.append(("openai_clip", "vit_base_patch16_clip_quickgelu_224", clip,
                  save_torch(state, root / "openai.pt"), {"visual.proj", "text_projection", "vocab_size"}))

    oc = tiny_vit_teacher(2, "vit_base_patch16_clip_224")
    epoch = {"epoch": 32, "name": "laion", "state_dict": {"module." + k: v for k, v in to_openai_clip(oc).items()}}
    cases.append(("open_clip", "vit_base_patch16_clip_224", oc, save_torch(epoch, root / "epoch_32.pt"),
                  {"visual.proj", "logit_scale", "epoch", "name"}))

    dino = tiny_vit_teacher(3, "vit_base_patch16_224")
    cases.append(("dino", "vit_base_patch16_224", dino, save_torch(plain(dino), root / "dino_backbone.pth"), set()))

    dino_full = tiny_vit_teacher(4, "vit_base_patch16_224")
    student = tiny_vit_teacher(5, "vit_base_patch16_224")  # a different network: must not be the one loaded
    full = {"teacher": {**{f"backbone.{k}": v for k, v in plain(dino_full).items()},
                        "head.mlp.0.weight": torch.randn(8, 48), "head.last_layer.weight_g": torch.ones(16, 1)},
            "student": {**{f"module.backbone.{k}": v for k, v in plain(student).items()},
                        "module.head.mlp.0.weight": torch.randn(8, 48)},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}, "epoch": 100, "args": ns,
            "dino_loss": {"center": torch.zeros(1, 16)}}
    cases.append(("dino", "vit_base_patch16_224", dino_full, save_torch(full, root / "checkpoint.pth"),
                  {"teacher.head.mlp.0.weight", "student", "optimizer", "args", "dino_loss"}))

    deit = tiny_vit_teacher(6, "deit_base_patch16_224")
    file = {"model": {**plain(deit), "head.weight": torch.randn(1000, 48), "head.bias": torch.zeros(1000)}}
    cases.append(("deit", "deit_base_patch16_224", deit, save_torch(file, root / "deit.pth"), {"head.weight"}))

    swin = tiny_swin_teacher(7)
    original = to_original_swin(swin)
    esvit = {"teacher": {**{f"backbone.{k}": v for k, v in original.items()},
                         "head.mlp.0.weight": torch.randn(8, 128), "head_dense.mlp.0.weight": torch.randn(8, 128)},
             "student": {f"module.backbone.{k}": torch.zeros_like(v) for k, v in original.items()},
             "epoch": 300, "args": ns}
    cases.append(("esvit", "swin_base_patch4_window7_224", swin, save_torch(esvit, root / "esvit.pth"),
                  {"teacher.head_dense.mlp.0.weight", "layers.0.blocks.0.attn.relative_position_index",
                   "layers.0.blocks.1.attn_mask", "student"}))
    return cases


def _kwargs_of(name: str) -> dict:
    if name.startswith("swin"):
        return dict(img_size=64, **SWIN)
    return dict(img_size=16, patch_size=4, **TEACHER)


def test_each_teacher_format_loads_to_the_same_outputs(tmp_path):
    cases = _fmt_cases(tmp_path)
    assert {c[0] for c in cases} == {"openai_clip", "open_clip", "dino", "deit", "esvit"}
    for fmt, name, original, path, left_out in cases:
        kwargs = _kwargs_of(name)
        teacher, report = load_teacher(name, path, fmt, **kwargs)
        x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
        with torch.no_grad():
            assert torch.equal(teacher.forward_features(x), original.forward_features(x)), (fmt, path.name)
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        assert report.used == len(teacher.state_dict()), fmt
        assert left_out <= set(report.dropped), (fmt, sorted(report.dropped)[:8])
        assert f"({fmt} format)" in str(report)


def test_mismatched_teacher_files_are_refused(tmp_path):
    shallow = tiny_vit_teacher(0, "vit_base_patch16_224", depth=1)
    path = save_torch(plain(shallow), tmp_path / "dino.pth")
    with pytest.raises(ValueError, match=r"missing \d+ keys: blocks\.1\.attn"):
        load_teacher("vit_base_patch16_224", path, "dino", **_kwargs_of("vit"))
    # A ViT file is not a CLIP one, nor an EsViT one; a TorchScript archive is not read at all.
    with pytest.raises(ValueError, match="not a CLIP state dict"):
        load_teacher("vit_base_patch16_clip_224", path, "openai_clip", **_kwargs_of("vit"))
    with pytest.raises(ValueError, match="not an EsViT checkpoint"):
        load_teacher("swin_base_patch4_window7_224", path, "esvit", **_kwargs_of("swin"))
    scripted = tmp_path / "ViT-B-16.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(scripted))
    with pytest.raises(ValueError, match="TorchScript archive.*state_dict"):
        load_teacher("vit_base_patch16_clip_224", scripted, "openai_clip", **_kwargs_of("vit"))


# -- training -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_trains_finite_and_falls_on_repeated_batch(setup_files, tmp_path):
    out = tmp_path / "run"
    train(setup_files, out, *REPEATED)
    got = logged_losses(out)
    assert len(got) == 5 and all(math.isfinite(x) for x in got), got
    assert all(b < a for a, b in zip(got, got[1:])), got


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_resume_matches_uninterrupted_run_and_exports_the_student(setup_files, tmp_path):
    from selfdistill.models import load_backbone

    full, part = tmp_path / "full", tmp_path / "part"
    train(setup_files, full)
    train(setup_files, part, "train.max_steps=3")
    train(setup_files, part, resume="auto")
    assert logged_losses(part) == logged_losses(full) and len(logged_losses(full)) == 8
    s_full = load_file(str(ckpt.latest_checkpoint(full) / "model.safetensors"))
    s_part = load_file(str(ckpt.latest_checkpoint(part) / "model.safetensors"))
    assert s_full.keys() == s_part.keys() and all(torch.equal(s_full[k], s_part[k]) for k in s_full)
    # The evaluated network is the student backbone (no projector), with FD's shared relative position bias.
    evaluated = load_file(str(full / "export" / "teacher_backbone.safetensors"))
    assert evaluated.keys() == {k.removeprefix("backbone.model.") for k in s_full if k.startswith("backbone.")}
    assert all(torch.equal(v, s_full["backbone.model." + k]) for k, v in evaluated.items())
    assert "rel_pos_bias.relative_position_bias_table" in evaluated and "pos_embed" not in evaluated
    backbone, _ = load_backbone(str(full))  # a run directory: the trained student, not a fresh one
    assert all(torch.equal(v, evaluated[k]) for k, v in backbone.model.state_dict().items())


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_swin_student_learns_an_esvit_format_swin_teacher(setup_files, tmp_path):
    swin = tiny_swin_teacher(7)
    esvit = {"teacher": {f"backbone.{k}": v for k, v in to_original_swin(swin).items()}, "epoch": 1}
    path = save_torch(esvit, tmp_path / "esvit.pth")
    kw = ", ".join(f"{k}: {v}" for k, v in SWIN.items())
    out = tmp_path / "run"
    train(setup_files, out, *SWIN_STUDENT, *REPEATED, "train.epochs=2", "method.teacher_format=esvit",
          "method.teacher_model=swin_base_patch4_window7_224", f"method.teacher_weights={path}",
          f"method.teacher_kwargs={{img_size: 64, {kw}}}", "method.no_decay_keywords=[relative_position_bias_table]")
    got = logged_losses(out)
    assert len(got) == 2 and all(math.isfinite(x) for x in got) and got[1] < got[0], got


def test_recipes_load_with_fd_hyperparameters():
    expected = {"fd_clip_vit_base16": ("openai_clip", 0.2, 1.2e-3), "fd_dino_vit_base16": ("dino", 0.3, 1.2e-3),
                "fd_deit_vit_base16": ("deit", 0.3, 1.2e-3), "fd_esvit_swin_base": ("esvit", 0.3, 8e-4)}
    for name, (fmt, dpr, peak_lr) in expected.items():
        c = load_config(ROOT / "configs" / f"{name}.yaml", [])
        global_batch = 16 * c.train.batch_size_per_device  # FD's 16 GPUs x 128
        assert c.method.name == "fd" and c.method.teacher_format == fmt, name
        assert c.model.drop_path_rate == dpr and c.train.epochs == 300 and c.optim.warmup_epochs == 10, name
        assert c.optim.lr * global_batch / 256 == pytest.approx(peak_lr), name  # FD: BASE_LR per 512 images
        assert c.optim.weight_decay == c.optim.weight_decay_end == 0.05 and c.optim.clip_grad == 3.0, name
        assert c.data.global_crop_scale == (0.08, 1.0) and c.optim.betas == (0.9, 0.999), name
        if name.endswith("vit_base16"):
            assert c.model.name == "beit_base_patch16_224" and c.model.kwargs == {
                "use_abs_pos_emb": False, "use_rel_pos_bias": False, "use_shared_rel_pos_bias": True,
                "init_values": 0.1, "global_pool": "token"}, name
    clip = load_config(ROOT / "configs" / "fd_clip_vit_base16.yaml", [])
    assert clip.method.teacher_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_fd_vit_student_has_one_zero_shared_relative_position_bias():
    c = load_config(ROOT / "configs" / "fd_clip_vit_base16.yaml", [])
    from selfdistill.models import Backbone

    torch.manual_seed(0)
    b = Backbone(c.model.name, c.model.img_size, c.model.patch_size, c.model.drop_path_rate,
                 **{**c.model.kwargs, "depth": 2})
    state = b.model.state_dict()
    table = state["rel_pos_bias.relative_position_bias_table"]
    assert table.shape == ((2 * 14 - 1) ** 2 + 3, 12) and table.abs().max() == 0  # zero-initialised
    assert not any("relative_position_bias_table" in k for k in state if k.startswith("blocks."))
    assert "pos_embed" not in state and torch.all(state["blocks.1.gamma_1"] == 0.1)
    seen = []
    b.model.norm.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    tokens, grid, n_prefix = b.all_tokens(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 197, 768) and grid == (14, 14) and n_prefix == 1
    assert len(seen) == 1 and torch.equal(tokens, seen[0][1])  # the tokens come out of the final norm
    assert b.model.norm.eps == 1e-6


# -- two ranks ----------------------------------------------------------------------------------


def _launch(launcher: list[str], files, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [ACCELERATE_LAUNCH, *launcher, str(ROOT / "run_pretrain.py"),
           *fd_overrides(files["data"], out, files["vit"], *REPEATED, "train.epochs=3", *extra)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(out.parent))
    assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.mark.slow
def test_two_ranks_ddp_and_zero3_with_a_partitioned_teacher(setup_files):
    pytest.importorskip("deepspeed")
    root = setup_files["root"]
    ddp = _launch(["--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml")], setup_files, root / "ddp")
    summaries = [json.loads((root / "ddp" / f"rank_summary_{r}.json").read_text()) for r in (0, 1)]
    assert summaries[0]["student_sha256"] == summaries[1]["student_sha256"]
    ddp_losses = logged_losses(root / "ddp")
    assert len(ddp_losses) == 3 and ddp_losses[-1] < ddp_losses[0], ddp_losses
    total = sum(p.numel() for p in tiny_vit_teacher().parameters())
    assert f"{total} of {total} teacher parameters" in ddp.stderr

    config = json.loads((ROOT / "ds_configs/zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny tensors
    (root / "zero3.json").write_text(json.dumps(config))
    z3 = _launch(["--use_deepspeed", "--deepspeed_config_file", str(root / "zero3.json"), "--num_processes", "2"],
                 setup_files, root / "zero3")
    held = [int(n) for n in re.findall(rf"(\d+) of {total} teacher parameters on rank", z3.stderr)]
    assert held and all(n <= total / 2 + 64 for n in held), z3.stderr[-2000:]  # partitions padded to the ranks
    assert logged_losses(root / "zero3") == pytest.approx(ddp_losses, rel=1e-4)
    # The evaluated network (the student) is exported whole, from the consolidated checkpoint.
    export = root / "zero3" / "export"
    evaluated = load_file(str(export / "teacher_backbone.safetensors"))
    student = load_file(str(export / "student_backbone.safetensors"))
    assert evaluated.keys() == student.keys() and all(torch.equal(evaluated[k], student[k]) for k in student)
    assert evaluated["cls_token"].shape == (1, 1, 32)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_fd_run_fine_tunes_through_run_eval(setup_files, tmp_path):
    """The seed's two stages end to end: an FD pretraining run, then `run_eval.py finetune` on its
    run directory (shared relative position bias copied into every block, mean pooling + new fc_norm)."""
    from selfdistill.training.finetune import finetuning
    from selfdistill.training.finetune_config import load_finetune_config

    pre = tmp_path / "fd"
    train(setup_files, pre, "train.max_steps=2")
    out = tmp_path / "ft"
    data = setup_files["data"]
    config = load_finetune_config(ROOT / "configs/finetune_fd_vit_base16.yaml", [
        f"model.weights={pre}", f"data.path={data}", f"data.val_path={data}", "data.input_size=16",
        "data.num_workers=0", f"train.output_dir={out}", "train.epochs=1", "train.batch_size_per_device=8",
        "train.trackers=[]", "train.progress_bar=false", "train.precision=fp32", "eval.batch_size=8",
        "optim.warmup_epochs=0"])
    results = finetuning(config, resume=None).fit()
    assert results["model"]["timm_name"] == "beit_base_patch16_224"
    assert results["load"]["rel_pos_bias_unshared"]
    assert set(results["load"]["new"]) >= {"head.weight", "head.bias"}
    assert math.isfinite(results["final"]["top1"])
    weights = load_file(str(out / "finetuned.safetensors"))
    assert "rel_pos_bias.relative_position_bias_table" not in weights
    assert all(f"blocks.{i}.attn.relative_position_bias_table" in weights for i in range(2))
