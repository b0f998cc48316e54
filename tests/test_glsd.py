"""GLSD: view + region self-distillation on tiny ViT and Swin, both matchings; resume; region loss."""

import math
from pathlib import Path

import pytest
import torch
from conftest import REPEATED_BATCH, logged_losses, run_training
from safetensors.torch import load_file

from selfdistill.recipe import load_config
from selfdistill.engine import checkpoint as ckpt
from selfdistill.losses import region_loss

GLSD = ["method.name=glsd"]
SWIN = ["model.name=swin_tiny_patch4_window7_224", "model.img_size=64", "model.patch_size=null",
        "model.kwargs={depths: [1, 1, 1, 1], embed_dim: 24, num_heads: [1, 1, 1, 1], window_size: 2}",
        "data.global_crop_size=64", "data.local_crop_size=64", "knn.image_size=64"]
REPEATED = [*REPEATED_BATCH, "train.epochs=5"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def train(data: Path, out: Path, extra: list[str], resume: str | None = None, **overrides):
    return run_training(data, out, *GLSD, *extra, resume=resume, **overrides)


losses = logged_losses


@pytest.mark.parametrize("matching", ["distance", "similarity"])
@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_trains_finite_and_falls_on_repeated_batch(image_folder, tmp_path, arch, matching):
    extra = [f"method.dense_matching={matching}", *REPEATED] + (SWIN if arch == "swin" else [])
    out = tmp_path / "run"
    train(image_folder, out, extra)
    got = losses(out)
    assert len(got) == 5 and all(math.isfinite(x) for x in got), got
    assert got[-1] < got[0], got


def test_resume_matches_uninterrupted_run(image_folder, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    extra = ["method.dense_matching=distance"]
    train(image_folder, full, extra)
    train(image_folder, part, extra, **{"train.max_steps": 2})
    train(image_folder, part, extra, resume="auto")
    assert losses(part) == losses(full)
    a = ckpt.load_task_state(ckpt.latest_checkpoint(full))
    b = ckpt.load_task_state(ckpt.latest_checkpoint(part))
    for k in a["teacher"]:
        assert torch.equal(a["teacher"][k], b["teacher"][k]), k
    assert torch.equal(a["center"], b["center"]) and torch.equal(a["center_grid"], b["center_grid"])
    s_full = load_file(str(ckpt.latest_checkpoint(full) / "model.safetensors"))
    s_part = load_file(str(ckpt.latest_checkpoint(part) / "model.safetensors"))
    assert all(torch.equal(s_full[k], s_part[k]) for k in s_full)


def test_region_loss_hand_made_cases():
    k = 8
    uniform = torch.zeros(2, 4, k)
    idx = torch.zeros(2, 4, dtype=torch.long)
    # Uniform student and teacher logits: cross-entropy log K.
    assert region_loss(uniform, uniform, torch.zeros(1, k), idx, None, 0.1, 0.04).item() == pytest.approx(math.log(k))
    # Dropping half of the tokens halves the loss (mean over all student tokens).
    keep = torch.tensor([[True, True, False, False]] * 2)
    assert region_loss(uniform, uniform, torch.zeros(1, k), idx, keep, 0.1, 0.04).item() == \
        pytest.approx(0.5 * math.log(k))
    # A one-hot sharp teacher and a student that agrees: loss near 0.
    t = torch.full((2, 4, k), -10.0)
    t[..., 3] = 10.0
    s = t.clone()
    assert region_loss(s, t, torch.zeros(1, k), torch.arange(4).expand(2, 4), None, 0.1, 0.04).item() < 1e-6


def test_glsd_pair_loss_matches_hand_computation():
    """Two heads and two centers; with identical zero-logit outputs every pair term is
    0.5 log K + 0.5 log K = log K, so the loss is log K."""
    from selfdistill.methods import Progress, build_method

    config = load_config(None, ["method.name=glsd", "method.out_dim=16", "method.head_hidden_dim=16",
                                "method.head_bottleneck_dim=8", "model.name=vit_tiny_patch16_224",
                                "model.img_size=16", "model.patch_size=4",
                                "model.kwargs={depth: 1, embed_dim: 16, num_heads: 2}"])
    method = build_method(config)
    for net in (method.student, method.teacher):
        for h in (net.head.last_layer, net.head_dense.last_layer):
            torch.nn.utils.parametrize.remove_parametrizations(h, "weight")
            h.weight.data.zero_()
    crops = [torch.randn(2, 3, 16, 16) for _ in range(2)] + [torch.randn(2, 3, 8, 8) for _ in range(2)]
    boxes = torch.tensor([[0, 0, 16, 16], [0, 0, 16, 16], [0, 0, 8, 8], [8, 8, 8, 8]], dtype=torch.float32)
    batch = {"crops": crops, "boxes": boxes.expand(2, 4, 4), "flips": torch.zeros(2, 4, dtype=torch.bool)}
    out = method.training_step(method.student, batch, Progress(step=0, epoch=0, steps_per_epoch=1, total_steps=1))
    assert out.loss.item() == pytest.approx(math.log(16), rel=1e-5)


def test_config_rejects_unknown_matching_and_recipes_load():
    from selfdistill.configkit import ConfigError

    with pytest.raises(ConfigError, match="dense_matching"):
        load_config(None, ["method.name=glsd", "method.dense_matching=nearest"])
    root = Path(__file__).resolve().parent.parent / "configs"
    assert load_config(root / "glsd_swin_tiny.yaml", []).method.norm_last_layer is False
    assert load_config(root / "glsd_vit_small16.yaml", []).model.name == "vit_small_patch16_224"
