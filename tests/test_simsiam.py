"""SimSiam: loss, network, two-view augmentation, fixed predictor lr, channels-last, training,
resume, export of the evaluated student, and two gloo ranks."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ACCELERATE_LAUNCH, logged_losses, make_image_folder, merged, tiny_overrides
from safetensors.torch import load_file

from selfdistill.recipe import load_config
from selfdistill.engine import checkpoint as ckpt
from selfdistill.losses import simsiam_loss

ROOT = Path(__file__).resolve().parents[1]
TINY_RESNET = "{layers: [1, 1, 1, 1], channels: [8, 16, 16, 32], stem_width: 8}"  # 32-d pooled output
SIMSIAM = ["method.name=simsiam", "method.proj_dim=32", "method.pred_dim=8"]
REPEATED = ["train.overfit_batches=1", "optim.warmup_epochs=0", "train.epochs=6"]


def resnet_overrides(data: Path, out: Path, *extra: str) -> list[str]:
    """The tiny recipe of conftest with a 4-block, 8-32 channel ResNet-18 at 16 px and SGD."""
    base = [o for o in tiny_overrides(data, out) if not o.startswith(("method.", "model."))]
    return merged([*base, "model.name=resnet18", "model.img_size=null", "model.patch_size=null", "model.drop_path_rate=0.0",
            f"model.kwargs={TINY_RESNET}", "data.global_crop_size=16", "data.global_crop_scale=[0.2, 1.0]",
            "knn.image_size=16", "optim.name=sgd", "optim.lr=0.05", "optim.min_lr=0.0", "optim.weight_decay=1e-4",
            "optim.weight_decay_end=1e-4", "optim.clip_grad=0.0", *extra])


def train(data: Path, out: Path, *extra: str, resume: str | None = None):
    from selfdistill.pretrain import pretraining

    return pretraining(load_config(None, resnet_overrides(data, out, *extra)), resume=resume).fit()


def launch_two_ranks(data: Path, out: Path, *extra: str, launcher: list[str] | None = None
                     ) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [ACCELERATE_LAUNCH, *(launcher or ["--num_processes", "2"]), str(ROOT / "run_pretrain.py"),
           *resnet_overrides(data, out, *extra)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(out.parent))


def check_two_ranks(out: Path) -> None:
    summaries = [json.loads((out / f"rank_summary_{r}.json").read_text()) for r in (0, 1)]
    assert [s["world_size"] for s in summaries] == [2, 2]
    assert summaries[0]["student_sha256"] == summaries[1]["student_sha256"]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # 32 images / (8 x 2 ranks) = 2 steps x 2 epochs
    assert all(math.isfinite(r["loss"]) for r in rows)


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_simsiam_loss_hand_values_and_stop_gradient():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert simsiam_loss(z, z, z, z).item() == pytest.approx(-1.0)  # predictions agree with the projections
    assert simsiam_loss(z, z, -z, -z).item() == pytest.approx(1.0)
    assert simsiam_loss(z.flip(1), z.flip(1), z, z).item() == pytest.approx(0.0)  # orthogonal
    p1, p2, z1, z2 = (torch.randn(4, 6, requires_grad=True) for _ in range(4))
    simsiam_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None  # stop-gradient on the projections
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


def test_network_structure_and_recipe():
    from selfdistill.methods import build_method

    cfg = load_config(ROOT / "configs/simsiam_resnet50.yaml", ["model.name=resnet18", f"model.kwargs={TINY_RESNET}"])
    net = build_method(cfg).student
    proj, pred = net.projector, net.predictor
    # (Linear-BN-ReLU) x 2 at the backbone width, Linear, BN without affine; predictor 2048 -> 512 -> 2048.
    assert [type(m).__name__ for m in proj] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert (proj[0].in_features, proj[0].out_features, proj[6].out_features) == (32, 32, 2048)
    assert proj[7].affine is False and proj[6].bias is None
    assert (pred[0].in_features, pred[0].out_features, pred[3].out_features) == (2048, 512, 2048)
    assert cfg.method.fix_pred_lr and cfg.optim.name == "sgd" and cfg.optim.lr == 0.05
    assert cfg.data.global_crop_scale == (0.2, 1.0) and cfg.optim.weight_decay == cfg.optim.weight_decay_end == 1e-4


def test_two_views_follow_the_moco_v2_recipe():
    from PIL import Image

    from selfdistill.config import DataConfig
    from selfdistill.methods.simsiam import two_view_augmentation

    aug = two_view_augmentation(DataConfig(global_crop_size=16, global_crop_scale=(0.2, 1.0)))
    img = Image.new("RGB", (40, 40), (200, 30, 30))
    out = aug(img)
    assert len(out["crops"]) == 2 and all(c.shape == (3, 16, 16) for c in out["crops"])
    areas = [(h * w) / (40 * 40) for _, _, h, w in out["boxes"].tolist()]
    assert all(0.19 <= a <= 1.0 for a in areas)
    assert aug.jitter_ranges == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))
    assert aug.blur_p == (0.5,) * 3 and aug.solarize_p == (0.0,) * 3


def test_predictor_keeps_the_peak_lr_while_the_encoder_decays(image_folder, tmp_path):
    from selfdistill.pretrain import pretraining

    def groups(fix: bool) -> dict[str, dict]:
        trainer = pretraining(load_config(None, resnet_overrides(image_folder, tmp_path / "run", *SIMSIAM,
                                                             "optim.warmup_epochs=0", f"method.fix_pred_lr={fix}")))
        trainer.build()
        lrs = {}
        for step in (0, 4, 7):
            trainer.scheduler.step_update(step)
            for g in trainer.optimizer.param_groups:
                lrs.setdefault(g["name"], []).append((g["lr"], g["weight_decay"]))
        return lrs, trainer.scheduler.base_lr

    lrs, base = groups(True)
    assert base == pytest.approx(0.05 * 8 / 256)
    assert [lr for lr, _ in lrs["predictor"]] == [base] * 3
    assert lrs["encoder"][0][0] == base and lrs["encoder"][2][0] < 0.1 * base  # cosine over 8 steps
    assert all(wd == 1e-4 for g in lrs.values() for _, wd in g)  # decay on every parameter, BN included
    lrs, _ = groups(False)
    assert lrs["predictor"] == lrs["encoder"]


def test_resnet_student_is_channels_last_with_packed_state_dict():
    from selfdistill.methods import build_method

    cfg = load_config(None, merged([*SIMSIAM, "model.name=resnet18", "model.img_size=null", f"model.kwargs={TINY_RESNET}"]))
    method = build_method(cfg)
    conv = method.student.backbone.model.conv1.weight
    assert method.student.backbone.channels_last  # model.channels_last (default true), as for DINO
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert all(v.is_contiguous() for v in method.student.state_dict().values())
    vit = build_method(load_config(None, merged([*SIMSIAM, "model.name=vit_tiny_patch16_224", "model.img_size=16",
                                                 "model.patch_size=4", "model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}"])))
    assert not vit.student.backbone.channels_last


def test_trains_finite_and_falls_on_repeated_batch(image_folder, tmp_path):
    out = tmp_path / "run"
    train(image_folder, out, *SIMSIAM, *REPEATED)
    got = logged_losses(out)
    assert len(got) == 6 and all(math.isfinite(x) and -1.0 <= x <= 1.0 for x in got), got
    assert got[-1] < got[0] - 0.05, got
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert all(r["output_std"] > 0.1 for r in rows)  # not collapsed


def test_resume_matches_uninterrupted_run_and_export_is_the_student(image_folder, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(image_folder, full, *SIMSIAM)
    train(image_folder, part, *SIMSIAM, "train.max_steps=3")
    train(image_folder, part, *SIMSIAM, resume="auto")
    assert logged_losses(part) == logged_losses(full)
    s_full = load_file(str(ckpt.latest_checkpoint(full) / "model.safetensors"))
    s_part = load_file(str(ckpt.latest_checkpoint(part) / "model.safetensors"))
    assert s_full.keys() == s_part.keys() and all(torch.equal(s_full[k], s_part[k]) for k in s_full)
    # The evaluated backbone is the trained student, in the run's export and when a run directory is loaded.
    from selfdistill.models import load_backbone

    exported = load_file(str(full / "export" / "teacher_backbone.safetensors"))
    assert all(torch.equal(v, s_full["backbone.model." + k]) for k, v in exported.items())
    backbone, _ = load_backbone(str(full))
    assert all(torch.equal(v, s_full["backbone.model." + k]) for k, v in backbone.model.state_dict().items())


@pytest.mark.slow
def test_two_gloo_ranks(tmp_path):
    data = make_image_folder(tmp_path / "img")
    out = tmp_path / "run"
    result = launch_two_ranks(data, out, *SIMSIAM)
    assert result.returncode == 0, result.stderr[-3000:]
    check_two_ranks(out)
