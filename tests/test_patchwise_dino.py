"""Patch-Wise DINO: trains on a tiny ViT, loss falls on a repeated batch, resume, matched-token loss."""

import math
from pathlib import Path

import pytest
import torch
from conftest import REPEATED_BATCH, logged_losses, run_training

from selfdistill.configkit import ConfigError
from selfdistill.recipe import load_config
from selfdistill.engine import checkpoint as ckpt
from selfdistill.methods.patchwise_dino import matched_token_loss

PW = ["method.name=patchwise_dino"]
REPEATED = [*REPEATED_BATCH, "train.epochs=5"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def train(data: Path, out: Path, extra: list[str], resume: str | None = None, **overrides):
    return run_training(data, out, *PW, *extra, resume=resume, **overrides)


losses = logged_losses


def test_trains_finite_and_falls_on_repeated_batch(image_folder, tmp_path):
    out = tmp_path / "run"
    train(image_folder, out, REPEATED)
    got = losses(out)
    assert len(got) == 5 and all(math.isfinite(x) for x in got), got
    assert got[-1] < got[0], got
    state = ckpt.load_task_state(ckpt.latest_checkpoint(out))
    assert state["center"].shape == (1, 1 + 16, 64)  # 16 px global crop, patch 4: 4x4 patches + CLS


def test_resume_matches_uninterrupted_run(image_folder, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(image_folder, full, [])
    train(image_folder, part, [], **{"train.max_steps": 2})
    train(image_folder, part, [], resume="auto")
    assert losses(part) == losses(full)
    a = ckpt.load_task_state(ckpt.latest_checkpoint(full))
    b = ckpt.load_task_state(ckpt.latest_checkpoint(part))
    for k in a["teacher"]:
        assert torch.equal(a["teacher"][k], b["teacher"][k]), k
    assert torch.equal(a["center"], b["center"])


def test_matched_token_loss_hand_made():
    k = 8
    s = torch.zeros(2, 5, k)
    t = torch.full((2, 10, k), 1.0 / k)
    idx_t = torch.tensor([[0, 3, 4], [0, 0, 0]])
    idx_s = torch.tensor([[0, 1, 2], [0, 0, 0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    # Uniform teacher and student: log K whatever the padding.
    assert matched_token_loss(s, t, idx_t, idx_s, mask, 0.1).item() == pytest.approx(math.log(k))
    # Padded entries do not count: sample 1's only valid entry (CLS) is perfect, sample 0 pays log K on 3.
    t2 = t.clone()
    t2[1, 0] = torch.nn.functional.one_hot(torch.tensor(2), k).float()
    s2 = s.clone()
    s2[1, 0, 2] = 100.0
    got = matched_token_loss(s2, t2, idx_t, idx_s, mask, 0.1).item()
    assert got == pytest.approx(3 * math.log(k) / 4, abs=1e-4)


def test_refuses_non_vit():
    with pytest.raises(ConfigError, match="ViT"):
        from selfdistill.methods import build_method

        build_method(load_config(None, PW + ["model.name=swin_tiny_patch4_window7_224", "model.img_size=64",
                                             "model.kwargs={depths: [1, 1, 1, 1], embed_dim: 24, "
                                             "num_heads: [1, 1, 1, 1], window_size: 2}",
                                             "method.out_dim=16", "method.head_hidden_dim=16",
                                             "method.head_bottleneck_dim=8"]))


def test_recipe_loads():
    root = Path(__file__).resolve().parent.parent / "configs"
    c = load_config(root / "patchwise_dino_vit_small16.yaml", [])
    assert c.method.name == "patchwise_dino" and c.train.epochs == 100
