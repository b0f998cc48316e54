"""``model.pretrained``: timm tags and ``hf-hub:`` names from a local Hugging Face cache (a fake one
here: nothing is downloaded), and DINO / DINOv2 training checkpoints restoring both networks."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch
from conftest import merged, tiny_overrides
from safetensors.torch import save_file

from selfdistill.configkit import ConfigError
from selfdistill.methods import build_method
from selfdistill.models import Backbone
from selfdistill.recipe import load_config

TAG = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # a real timm tag; the fake cache holds a tiny network for it
TINY = dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2)


def fake_hub_cache(root, repo: str, tensors: dict[str, torch.Tensor], architecture: str) -> None:
    """The layout ``huggingface_hub`` writes: ``models--org--name/{refs/main, snapshots/<sha>/...}``."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(sha)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(json.dumps({"architecture": architecture, "num_classes": 0}))


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_timm_tag_or_hf_hub_name_is_read_from_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = Backbone("vit_tiny_patch16_224", **TINY)
    fake_hub_cache(tmp_path / "hub", f"timm/{TAG}", source.model.state_dict(), "vit_tiny_patch16_224")
    for spec in (TAG, f"hf-hub:timm/{TAG}"):
        loaded = Backbone("vit_tiny_patch16_224", pretrained=spec, **TINY)
        assert same_state(loaded.model.state_dict(), source.model.state_dict())
    # Not cached: one line naming the cache and the command that fetches it.
    with pytest.raises(FileNotFoundError) as e:
        Backbone("vit_tiny_patch16_224", pretrained="vit_tiny_patch16_224.augreg_in21k", **TINY)
    assert "\n" not in str(e.value) and str(tmp_path / "hub") in str(e.value)
    assert "`hf download timm/vit_tiny_patch16_224.augreg_in21k`" in str(e.value)
    # The cached repo says which architecture its weights are for.
    with pytest.raises(ValueError, match=r"holds weights of timm's 'vit_tiny_patch16_224', not of model.name="
                                         r"vit_small_patch16_224"):
        Backbone("vit_small_patch16_224", pretrained=f"hf-hub:timm/{TAG}", **TINY)
    # Through the config: the tag's architecture must be model.name's, and the tag reaches the student.
    with pytest.raises(ConfigError, match=r"model.pretrained: 'vit_small_patch16_224.dino' holds weights of timm's "
                                          r"'vit_small_patch16_224', not of model.name=vit_tiny_patch16_224"):
        load_config(None, merged(tiny_overrides(tmp_path, tmp_path / "run"), "model.pretrained=vit_small_patch16_224.dino"))
    dino = build_method(load_config(None, merged(tiny_overrides(tmp_path, tmp_path / "run"), f"model.pretrained={TAG}")))
    assert same_state(dino.student.backbone.model.state_dict(), source.model.state_dict())
    assert same_state(dino.teacher.backbone.model.state_dict(), source.model.state_dict())


# -- DINO / DINOv2 training checkpoints, written from a tiny run's networks in their own key names ---------


def dino_names(state: dict[str, torch.Tensor], backbone: str = "backbone.") -> dict[str, torch.Tensor]:
    """This project's network keys as DINO's: the timm model is the backbone itself, and the last
    layer's weight norm is ``torch.nn.utils.weight_norm``'s ``weight_g`` / ``weight_v``."""
    out = {}
    for key, value in state.items():
        key = key.replace("backbone.model.", backbone)
        key = key.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                                   "weight_v")
        out[key] = value.clone()
    return out


def dinov2_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINO's names plus DINOv2's: ``dino_head``, a ``mask_token`` and blocks in FSDP chunks of one."""
    out = {}
    for key, value in dino_names(state).items():
        key = re.sub(r"^backbone\.blocks\.(\d+)\.", r"backbone.blocks.\1.\1.", key)
        out[re.sub(r"^head\.", "dino_head.", key)] = value
    width = state["backbone.model.cls_token"].shape[-1]
    out["backbone.mask_token"] = torch.zeros(1, width)
    out["ibot_head.mlp.0.weight"] = torch.randn(8, width)
    return out


def two_runs(tmp_path, *extra: str):
    """Two independently initialised DINO methods (a student and a teacher that differ) and their config."""
    overrides = merged(tiny_overrides(tmp_path, tmp_path / "run"), *extra)
    torch.manual_seed(1)
    a = build_method(load_config(None, overrides))
    torch.manual_seed(2)
    b = build_method(load_config(None, overrides))
    return a.student.state_dict(), b.teacher.state_dict(), overrides


def assert_restored(method, student, teacher, center) -> None:
    assert same_state(method.student.state_dict(), student)
    assert same_state(method.teacher.state_dict(), teacher)
    assert torch.equal(method.centers["center"], center)
    assert not any(p.requires_grad for p in method.teacher.parameters())


def test_a_dino_training_checkpoint_restores_both_networks_heads_and_center(tmp_path, caplog):
    student, teacher, overrides = two_runs(tmp_path)
    center = torch.randn(1, 64)
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": {f"module.{k}": v for k, v in dino_names(student).items()}, "teacher": dino_names(teacher),
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 3, "args": argparse.Namespace(arch="vit_tiny"),
                "dino_loss": {"center": center}, "fp16_scaler": None}, path)
    with caplog.at_level("INFO", logger="selfdistill"):
        dino = build_method(load_config(None, merged(overrides, f"model.pretrained={path}")))
    assert_restored(dino, student, teacher, center)
    report = dino.start_report
    assert report["layout"] == "DINO"
    assert report["restored"] == {
        "student.backbone": "student['module.backbone.*'] (30 tensors)",
        "student.head": "student['module.head.*'] (8 tensors)",
        "teacher.backbone": "teacher['backbone.*'] (30 tensors)",
        "teacher.head": "teacher['head.*'] (8 tensors)",
        "centers.center": "center (1, 64)"}
    assert report["ignored"] == ["optimizer", "epoch", "args", "fp16_scaler"]
    assert "student.backbone <- student['module.backbone.*']" in caplog.text
    # Heads of another size: one line with the keys to set, or the way to take the backbone alone.
    with pytest.raises(ValueError, match=r"wrong shapes: last_layer.parametrizations.weight.original0 \(64, 1\) != "
                                         r"\(32, 1\).*method.out_dim.*model.pretrained_format=dino"):
        build_method(load_config(None, merged(overrides, f"model.pretrained={path}", "method.out_dim=32")))
    # The backbone alone (format dino: the teacher's), as any method reads the file.
    backbone_only = build_method(load_config(None, merged(overrides, f"model.pretrained={path}",
                                                          "model.pretrained_format=dino", "method.out_dim=32")))
    own = {k: v for k, v in teacher.items() if k.startswith("backbone.")}
    assert same_state({k: v for k, v in backbone_only.student.state_dict().items() if k.startswith("backbone.")}, own)
    simsiam_backbone = Backbone("vit_tiny_patch16_224", pretrained=str(path), **TINY)
    assert same_state({f"backbone.model.{k}": v for k, v in simsiam_backbone.model.state_dict().items()}, own)


def test_a_dinov2_checkpoint_restores_both_networks_or_the_student_from_its_teacher(tmp_path):
    student, teacher, overrides = two_runs(tmp_path, "model.name=vit_small_patch14_dinov2")
    assert "backbone.model.blocks.1.ls1.gamma" in student  # DINOv2's layer scale, in timm's and DINOv2's names
    center = torch.randn(1, 64)
    model = {**{f"student.{k}": v for k, v in dinov2_names(student).items()},
             **{f"teacher.{k}": v for k, v in dinov2_names(teacher).items()},
             "dino_loss.center": center, "ibot_patch_loss.center": torch.zeros(1, 8)}
    path = tmp_path / "model_0000099.pth"
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": []}, "iteration": 99}, path)
    dino = build_method(load_config(None, merged(overrides, f"model.pretrained={path}")))
    assert_restored(dino, student, teacher, center)
    assert dino.start_report["layout"] == "DINOv2"
    assert dino.start_report["restored"]["teacher.head"] == "model['teacher.dino_head.*'] (8 tensors)"
    assert dino.start_report["ignored"] == ["model['ibot_patch_loss.center']", "optimizer", "iteration",
                                            "model['student.ibot_head.*']", "model['teacher.ibot_head.*']"]
    # Any other method (format auto, or dinov2) reads the teacher backbone in timm's keys.
    for fmt in ("auto", "dinov2"):
        alone = Backbone("vit_small_patch14_dinov2", pretrained=str(path), pretrained_format=fmt, **TINY)
        assert same_state({f"backbone.model.{k}": v for k, v in alone.model.state_dict().items()},
                          {k: v for k, v in teacher.items() if k.startswith("backbone.")})
    # The teacher_checkpoint.pth DINOv2 writes for evaluation: the student starts as the teacher.
    eval_path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": dinov2_names(teacher)}, eval_path)
    dino = build_method(load_config(None, merged(overrides, f"model.pretrained={eval_path}")))
    assert same_state(dino.student.state_dict(), teacher) and same_state(dino.teacher.state_dict(), teacher)
    assert dino.start_report["restored"]["student.head"] == "teacher['dino_head.*'] (8 tensors)"


def test_a_run_starts_from_a_dino_checkpoint(tmp_path, image_folder, fresh_accelerate_state, caplog):
    """The file reaches a real run: one step from the restored networks, the report logged at start-up."""
    from conftest import run_training

    student, teacher, _ = two_runs(tmp_path)
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": {f"module.{k}": v for k, v in dino_names(student).items()}, "teacher": dino_names(teacher),
                "epoch": 3, "dino_loss": {"center": torch.zeros(1, 64)}}, path)
    with caplog.at_level("INFO", logger="selfdistill"):
        run_training(image_folder, tmp_path / "run", f"model.pretrained={path}", "train.max_steps=1")
    assert "model.pretrained: DINO training checkpoint" in caplog.text and "left out: epoch" in caplog.text
    assert (tmp_path / "run" / "export" / "teacher_backbone.safetensors").is_file()
