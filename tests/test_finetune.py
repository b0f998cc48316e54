"""`run_eval.py finetune`: layer decay, FD's shared -> per-block relative position bias, head init,
a tiny end-to-end fine-tune, exact resume, and two gloo ranks."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import ACCELERATE_LAUNCH, make_image_folder, merged, run_training
from selfdistill.configkit import ConfigError
from selfdistill.training.finetune import finetuning
from selfdistill.training.finetune_config import FinetuneModelConfig, FinetuneOptimConfig, load_finetune_config
from selfdistill.training.finetune_model import (
    SHARED_RPB,
    build_model,
    build_optimizer,
    build_scheduler,
    param_groups,
    unshare_rel_pos_bias,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = ["model.name=vit_tiny_patch16_224", "model.patch_size=8", "model.kwargs={depth: 2, embed_dim: 32, num_heads: 2}"]
# FD's student as the FD pretraining method builds it (timm Beit, one shared bias table), tiny.
SHARED_BEIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, use_abs_pos_emb=False,
                   use_rel_pos_bias=False, use_shared_rel_pos_bias=True, init_values=0.1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ft")
    return make_image_folder(root / "train", size=32), make_image_folder(root / "val", n_per_class=6, size=32, seed=5)


def overrides(train: Path, val: Path, out: Path, *extra: str) -> list[str]:
    return merged([f"data.path={train}", f"data.val_path={val}", "data.input_size=32", "data.num_workers=0",
            f"train.output_dir={out}", "train.epochs=2", "train.batch_size_per_device=8", "train.log_every=1",
            "train.trackers=[]", "train.progress_bar=false", "eval.batch_size=8", "optim.warmup_epochs=1",
            "optim.scale_lr_with_batch=false", "optim.lr=1e-3", *extra])


def finetune(train: Path, val: Path, out: Path, *extra: str, resume: str | None = None) -> dict:
    return finetuning(load_finetune_config(None, overrides(train, val, out, *extra)), resume=resume).fit()


def shared_beit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", num_classes=0, **SHARED_BEIT)
    with torch.no_grad():  # timm zero-inits the table; a random one makes the comparisons meaningful
        model.rel_pos_bias.relative_position_bias_table.normal_(0.0, 1.0)
    return model.eval()


# ----------------------------------------------------------------------------------------------
def test_layer_decay_gives_documented_lr_per_block():
    depth, decay = 3, 0.5
    cfg = FinetuneModelConfig(weights="random", name="vit_tiny_patch16_224", patch_size=8, global_pool="avg",
                              kwargs={"depth": depth, "embed_dim": 32, "num_heads": 2})
    model = build_model(cfg, num_classes=4, input_size=32).model
    optim = FinetuneOptimConfig(layer_decay=decay, weight_decay=0.05)
    groups = param_groups(model, optim)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}

    def layer_id(name: str) -> int:  # BEiT: embeddings 0, block i -> i + 1, the rest (fc_norm, head) L + 1
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            return 0
        m = re.match(r"blocks\.(\d+)\.", name)
        return int(m.group(1)) + 1 if m else depth + 1

    names = [n for n, _ in model.named_parameters()]
    assert {"fc_norm.weight", "head.weight", "blocks.2.mlp.fc2.weight"} <= set(names)
    for name, p in model.named_parameters():
        assert scale[id(p)] == pytest.approx(decay ** (depth + 1 - layer_id(name))), name
        no_decay = p.ndim <= 1 or name in ("cls_token", "pos_embed")
        assert wd[id(p)] == (0.0 if no_decay else 0.05), name
    assert sorted({round(s, 6) for s in scale.values()}) == [0.0625, 0.125, 0.25, 0.5, 1.0]

    # Per step: warm-up from warmup_lr, then each group runs at the schedule x its lr_scale.
    opt = build_optimizer(model, optim, lr=1e-3)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2, min_lr=0.0, warmup_lr=0.0)
    sched.step_update(0)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    sched.step_update(2)  # the first step after warm-up: the peak
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])


def test_rel_pos_bias_weight_decay_follows_fd_or_timm():
    model = timm.create_model("beit_base_patch16_224", num_classes=2, **{**SHARED_BEIT, "use_rel_pos_bias": True,
                                                                        "use_shared_rel_pos_bias": False})
    tables = {id(p) for n, p in model.named_parameters() if "relative_position_bias_table" in n}
    assert len(tables) == 2
    for decay_tables, expected in ((True, 0.05), (False, 0.0)):
        groups = param_groups(model, FinetuneOptimConfig(weight_decay=0.05, decay_rel_pos_bias=decay_tables))
        assert {g["weight_decay"] for g in groups for p in g["params"] if id(p) in tables} == {expected}


# ----------------------------------------------------------------------------------------------
def test_fd_conversion_copies_the_shared_bias_into_every_block_and_keeps_the_function():
    src = shared_beit()
    state = src.state_dict()
    table = state[SHARED_RPB]
    converted = unshare_rel_pos_bias(state)
    assert not any(k.startswith("rel_pos_bias.") for k in converted)
    for i in range(2):
        assert torch.equal(converted[f"blocks.{i}.attn.relative_position_bias_table"], table)
    assert converted["blocks.0.attn.relative_position_bias_table"] is not converted["blocks.1.attn.relative_position_bias_table"]

    per_block = timm.create_model("beit_base_patch16_224", num_classes=0,
                                  **{**SHARED_BEIT, "use_rel_pos_bias": True, "use_shared_rel_pos_bias": False}).eval()
    per_block.load_state_dict(converted, strict=True)
    # Same attention biases (incl. the 3 cls entries through the regenerated index) ...
    shared_bias = src.rel_pos_bias()
    for blk in per_block.blocks:
        assert torch.equal(blk.attn._get_rel_pos_bias()[0], shared_bias)
    # ... so the same features before the head (mean pooling + fc_norm on both sides).
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(per_block(x), src(x), atol=1e-6, rtol=0)
        per_block.blocks[1].attn.relative_position_bias_table.zero_()  # the copied tables do matter
        assert not torch.allclose(per_block(x), src(x), atol=1e-4)

    assert unshare_rel_pos_bias({"a": table}) == {"a": table}  # nothing shared: unchanged
    with pytest.raises(ValueError, match="both a shared relative position bias"):
        unshare_rel_pos_bias({**converted, SHARED_RPB: table})


def test_fd_export_builds_the_fine_tuning_model(tmp_path):
    """The FD student exported by this project -> per-block biases, mean pooling, a x0.001 head."""
    from selfdistill.models import export_backbone
    from selfdistill.models import Backbone

    kwargs = {k: v for k, v in SHARED_BEIT.items() if k not in ("img_size", "patch_size")}
    src = Backbone("beit_base_patch16_224", 32, 8, 0.0, **kwargs).eval()
    with torch.no_grad():
        src.model.rel_pos_bias.relative_position_bias_table.normal_(0.0, 1.0)
    path = export_backbone(src, tmp_path / "fd_student.safetensors")
    cfg = FinetuneModelConfig(weights=str(path), global_pool="avg", kwargs={"use_fc_norm": True}, drop_path_rate=0.0)
    built = build_model(cfg, num_classes=200, input_size=32)
    model = built.model.eval()
    assert built.report["rel_pos_bias_unshared"] and model.rel_pos_bias is None
    assert set(built.report["new"]) == {"head.weight", "head.bias"}
    for blk in model.blocks:
        assert torch.equal(blk.attn.relative_position_bias_table, src.model.rel_pos_bias.relative_position_bias_table)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_head(model.forward_features(x), pre_logits=True), src(x).pooled, atol=1e-6)
    # The fresh head: trunc_normal(0.02) x head_init_scale, bias 0.
    assert model.head.weight.std().item() == pytest.approx(0.02 * 0.001, rel=0.1)
    assert torch.count_nonzero(model.head.bias) == 0
    plain = build_model(FinetuneModelConfig(weights=str(path), head_init_scale=1.0), 200, 32).model
    assert plain.head.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert built.info["kwargs"]["use_rel_pos_bias"] and not built.info["kwargs"]["use_shared_rel_pos_bias"]

    with pytest.raises(ValueError, match="does not fit Beit: missing"):  # a wrong architecture is named, not loaded
        build_model(FinetuneModelConfig(weights=str(path), kwargs={"depth": 3}), 2, 32)


# ----------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_tiny_finetune_from_a_pretraining_run_learns_and_reports(folders, tmp_path):
    """A DINO run directory -> its teacher fine-tuned for 3 epochs on colour-coded classes."""
    train, val = folders
    pre = tmp_path / "pre"
    run_training(make_image_folder(tmp_path / "pre_img"), pre, "train.max_steps=2")
    out = tmp_path / "ft"
    results = finetune(train, val, out, f"model.weights={pre}", "data.input_size=16", "train.epochs=3",
                       "optim.lr=3e-3", "optim.layer_decay=0.9")
    assert results["model"]["timm_name"] == "vit_tiny_patch16_224" and results["model"]["patch_size"] == 4
    assert results["load"]["new"] == ["head.bias", "head.weight"] and results["load"]["unused"] == []
    history = results["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3] and all(r["val/n"] == 12 for r in history)
    assert history[-1]["val/loss"] < history[0]["val/loss"]
    assert results["final"]["top1"] >= 90.0 and results["final"]["top5"] == 100.0
    print(f"tiny fine-tune: val top-1 per epoch {[r['val/top1'] for r in history]}, "
          f"loss {[round(r['val/loss'], 4) for r in history]}")

    saved = json.loads((out / "finetune_results.json").read_text())
    assert saved["final"] == results["final"] and saved["classes"] == ["a", "b"]
    summary = json.loads((out / "summary.json").read_text())  # the end of every run of the loop
    assert summary["steps"] == 12 and summary["last_eval"]["val/top1"] == results["final"]["top1"]
    assert summary["exports"][0] == str(out / "finetuned.safetensors")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in rows) == 12 and sum("val/top1" in r for r in rows) == 3
    assert all(r["lr"] >= r["lr_min_group"] for r in rows if "lr" in r)
    # The weights: the last checkpoint's, with metadata run_eval.py knn / load_backbone understand.
    from selfdistill.engine import checkpoint as ckpt
    from selfdistill.models import load_backbone

    weights = load_file(str(out / "finetuned.safetensors"))
    last = load_file(str(ckpt.latest_checkpoint(out) / "model.safetensors"))
    assert weights.keys() == last.keys() and all(torch.equal(weights[k], last[k]) for k in weights)
    backbone, model_cfg = load_backbone(str(out / "finetuned.safetensors"))
    assert model_cfg.name == "vit_tiny_patch16_224" and torch.equal(backbone.model.blocks[0].attn.qkv.weight,
                                                                     weights["blocks.0.attn.qkv.weight"])


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_resume_after_one_epoch_matches_uninterrupted_run(folders, tmp_path):
    """Mixup/cutmix, RandAugment, random erasing, drop path and EMA all on: bit-identical."""
    train, val = folders
    extra = [*TINY_VIT, "model.weights=random", "model.drop_path_rate=0.1", "ema.enabled=true", "ema.decay=0.9"]
    full, part = tmp_path / "full", tmp_path / "part"
    finetune(train, val, full, *extra)
    finetune(train, val, part, *extra, "train.max_steps=4")  # one epoch (4 steps), checkpoint at its end
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["step_000000004"]
    resumed = finetune(train, val, part, *extra, resume="auto")
    assert resumed["steps"] == 8 and [r["epoch"] for r in resumed["history"]] == [1, 2]
    for name in ("finetuned.safetensors", "finetuned_ema.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(part / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    ema, model = load_file(str(full / "finetuned_ema.safetensors")), load_file(str(full / "finetuned.safetensors"))
    assert not torch.equal(ema["head.weight"], model["head.weight"])  # the EMA is a different model
    losses = [[json.loads(x)["loss"] for x in (d / "log.jsonl").read_text().splitlines() if '"loss"' in x]
              for d in (full, part)]
    assert losses[0] == losses[1] and len(losses[0]) == 8
    assert json.loads((full / "finetune_results.json").read_text())["history"] == resumed["history"]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_labelled_shards_train_and_validate(folders, tmp_path):
    from selfdistill.data.shard_inputs import folder_input
    from selfdistill.data.shard_writer import write_shards

    train, val = folders
    write_shards(tmp_path / "train", folder_input(train), samples_per_shard=8, progress=False)
    write_shards(tmp_path / "val", folder_input(val), samples_per_shard=6, progress=False)
    results = finetune(tmp_path / "train", tmp_path / "val", tmp_path / "run", *TINY_VIT, "model.weights=random",
                       "data.format=wds", "train.epochs=1")
    assert results["classes"] == ["a", "b"] and results["steps"] == 4 and results["final"]["n"] == 12


def test_config_errors_and_recipes():
    with pytest.raises(ConfigError, match="model.weights: required"):
        load_finetune_config(None, ["data.path=/x", "data.val_path=/y"])
    with pytest.raises(ConfigError, match=r"unknown key 'optim.layer_decy' \(did you mean 'optim.layer_decay'\?\)"):
        load_finetune_config(None, ["model.weights=random", "model.name=vit_tiny_patch16_224", "optim.layer_decy=0.6"])
    with pytest.raises(ConfigError, match="needs an even batch"):
        load_finetune_config(None, ["model.weights=random", "model.name=vit_tiny_patch16_224", "data.path=/x", "data.val_path=/y",
                                    "train.batch_size_per_device=7"])
    vit = load_finetune_config(ROOT / "configs/finetune_fd_vit_base16.yaml", ["model.weights=w"])
    assert (vit.model.name, vit.model.global_pool, vit.model.drop_path_rate) == ("beit_base_patch16_224", "avg", 0.3)
    assert (vit.optim.lr, vit.optim.lr_base_batch, vit.optim.layer_decay, vit.optim.warmup_epochs) == (1.25e-3, 512, 0.6, 20)
    assert (vit.optim.min_lr, vit.optim.warmup_lr, vit.optim.weight_decay, vit.optim.clip_grad) == (2.5e-7, 2.5e-7, 0.05, 5.0)
    assert (vit.mixup.mixup, vit.mixup.cutmix, vit.mixup.label_smoothing, vit.data.reprob) == (0.8, 1.0, 0.1, 0.25)
    assert vit.data.auto_augment == "rand-m9-mstd0.5-inc1" and vit.train.epochs == 100
    swin = load_finetune_config(ROOT / "configs/finetune_fd_swin_base.yaml", ["model.weights=w"])
    assert (swin.model.drop_path_rate, swin.optim.layer_decay, swin.train.batch_size_per_device) == (0.4, 0.8, 64)


def test_cli_refuses_weights_that_do_not_fit(folders, tmp_path):
    from selfdistill.cli.evaluate import main

    train, val = folders
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"blocks.0.norm1.weight": torch.ones(4)}, str(bad))
    rc = main(["finetune", *overrides(train, val, tmp_path / "o", f"model.weights={bad}"), "model.name=vit_tiny_patch16_224"])
    assert rc == 2


# ----------------------------------------------------------------------------------------------
def launch(launcher: list[str], train: Path, val: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [ACCELERATE_LAUNCH, *launcher, str(ROOT / "run_eval.py"), "finetune",
           *overrides(train, val, out, *TINY_VIT, "model.weights=random", "train.epochs=1", *extra)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(out.parent))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_two_steps_on_two_gloo_ranks(folders, tmp_path):
    train, val = folders
    out = tmp_path / "run"
    r = launch(["--num_processes", "2"], train, val, out)
    assert "re-launching 2 gloo ranks" in r.stderr
    results = json.loads((out / "finetune_results.json").read_text())
    # 32 images / (8 per rank x 2 ranks) = 2 steps; every validation image counted once over the ranks.
    assert results["world_size"] == 2 and results["global_batch"] == 16 and results["steps"] == 2
    assert results["final"]["n"] == 12
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [row["step"] for row in rows] == [1, 2]


@pytest.mark.slow
def test_deepspeed_zero2_matches_ddp(folders, tmp_path):
    """ds_configs/finetune_zero2.json (clipping from optim.clip_grad) on two CPU ranks, EMA on."""
    pytest.importorskip("deepspeed")
    train, val = folders
    ddp, ds = tmp_path / "ddp", tmp_path / "ds"
    launch(["--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml")], train, val, ddp, "ema.enabled=true")
    launch(["--use_deepspeed", "--deepspeed_config_file", str(ROOT / "ds_configs/finetune_zero2.json"),
            "--num_processes", "2"], train, val, ds, "ema.enabled=true")
    for name in ("finetuned.safetensors", "finetuned_ema.safetensors"):
        a, b = load_file(str(ddp / name)), load_file(str(ds / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (name, k)
    results = [json.loads((d / "finetune_results.json").read_text()) for d in (ddp, ds)]
    assert results[0]["final"]["n"] == results[1]["final"]["n"] == 12 and results[1]["steps"] == 2
