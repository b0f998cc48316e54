"""GLSD and Patch-Wise DINO on two gloo ranks: DDP, DeepSpeed ZeRO-2 (with resume) and ZeRO-3, the
same loop and the same guarantees as DINO (tests/test_deepspeed.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import DDP_2PROC, REPEATED_BATCH, accelerate_launch, logged_losses, make_image_folder, zero_launcher
from selfdistill.engine import checkpoint as ckpt

pytestmark = pytest.mark.slow
REPEATED_4 = [*REPEATED_BATCH, "train.epochs=4"]  # 4 optimizer steps on one global batch (8 x 2 ranks)
GLSD = ["method.name=glsd", "method.dense_matching=distance"]
PATCHWISE = ["method.name=patchwise_dino"]
SWIN = ["model.name=swin_tiny_patch4_window7_224", "model.img_size=64", "model.patch_size=null",
        "model.kwargs={depths: [1, 1, 1, 1], embed_dim: 24, num_heads: [1, 1, 1, 1], window_size: 2}",
        "data.global_crop_size=64", "data.local_crop_size=64", "knn.image_size=64"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("dense2") / "img")


def method_state(out: Path) -> dict:
    return ckpt.load_task_state(ckpt.latest_checkpoint(out))


def check_two_ranks_agree_and_loss_falls(out: Path) -> list[float]:
    summaries = [json.loads((out / f"rank_summary_{r}.json").read_text()) for r in (0, 1)]
    assert [s["world_size"] for s in summaries] == [2, 2]
    assert summaries[0]["student_sha256"] == summaries[1]["student_sha256"]
    got = logged_losses(out)
    assert len(got) == 4 and all(math.isfinite(x) for x in got), got
    assert got[-1] < got[0], got
    return got


def assert_states_close(a: dict, b: dict, atol: float) -> None:
    for k in a["teacher"]:
        assert torch.allclose(a["teacher"][k], b["teacher"][k], atol=atol), k
    for k in a:
        if k.startswith("center"):
            assert torch.allclose(a[k], b[k], atol=atol), k


def test_glsd_zero2_matches_ddp_and_resumes(data):
    ddp, z2 = data.parent / "glsd_ddp", data.parent / "glsd_zero2"
    accelerate_launch(DDP_2PROC, data, ddp, *GLSD, *REPEATED_4)
    accelerate_launch(zero_launcher(2), data, z2, *GLSD, *REPEATED_4)
    want = check_two_ranks_agree_and_loss_falls(ddp)
    got = check_two_ranks_agree_and_loss_falls(z2)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert_states_close(method_state(z2), method_state(ddp), atol=1e-5)
    assert {"center", "center_grid"} <= set(method_state(z2))

    # Stop after 2 steps, resume: the uninterrupted run's losses, teacher and both centers.
    part = data.parent / "glsd_zero2_part"
    accelerate_launch(zero_launcher(2), data, part, *GLSD, *REPEATED_4, "train.max_steps=2")
    accelerate_launch(zero_launcher(2), data, part, *GLSD, *REPEATED_4, "--resume", "auto")
    assert logged_losses(part) == pytest.approx(got, rel=1e-6)
    assert_states_close(method_state(part), method_state(z2), atol=1e-6)


def test_patchwise_dino_zero3_with_checkpointing_matches_ddp(data):
    ddp, z3 = data.parent / "pw_ddp", data.parent / "pw_zero3"
    accelerate_launch(DDP_2PROC, data, ddp, *PATCHWISE, *REPEATED_4)
    accelerate_launch(zero_launcher(3), data, z3, *PATCHWISE, *REPEATED_4, "model.grad_checkpointing=true")
    want = check_two_ranks_agree_and_loss_falls(ddp)
    got = check_two_ranks_agree_and_loss_falls(z3)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    state = method_state(z3)
    assert state["center"].shape == (1, 1 + 16, 64)  # per-position center survives ZeRO-3
    assert_states_close(state, method_state(ddp), atol=1e-5)
    assert (z3 / "export" / "student_backbone.safetensors").is_file()


def test_glsd_similarity_on_swin_two_ranks(data):
    out = data.parent / "glsd_swin"
    accelerate_launch(DDP_2PROC, data, out, "method.name=glsd", "method.dense_matching=similarity",
                      *REPEATED_4, *SWIN)
    check_two_ranks_agree_and_loss_falls(out)
