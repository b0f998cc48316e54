"""Linear probe: DINO's SGD and SMD's LARS recipes on frozen features."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from conftest import ACCELERATE_LAUNCH, make_image_folder
from selfdistill.engine.task import Hook

ROOT = Path(__file__).resolve().parents[1]


class Features(Dataset):
    """Pre-computed "features" as images: 6 classes around far-apart centres (linearly separable)."""

    def __init__(self, n_per_class: int, seed: int, dim: int = 16, classes: int = 6) -> None:
        g = torch.Generator().manual_seed(seed)
        centres = torch.zeros(classes, dim)
        centres[torch.arange(classes), torch.arange(classes)] = 3.0
        self.y = torch.arange(classes).repeat_interleave(n_per_class)
        self.x = centres[self.y] + 0.5 * torch.randn(len(self.y), dim, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, key):
        i = key[1] if isinstance(key, tuple) else key
        return {"image": self.x[i], "label": int(self.y[i]), "index": i, "bad": []}


class FeatureImages:
    """``Features`` served to the loop as an image set: an epoch-seeded map-style source."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def train_source(self, batch_size, rank, world_size, collate_fn, repeat_batches=0, pin_memory=False):
        from selfdistill.data.sources import MapSource

        return MapSource(self.ds, batch_size, rank, world_size, 0, 0, collate_fn, repeat_batches, pin_memory)

    def finish(self, batch):
        return batch


def _train(tmp: Path, recipe: str, epochs: int, lr: float, resume: bool = True, hooks=(), checkpoint_every=1000):
    from selfdistill.data import collate_eval
    from selfdistill.training.linear_probe import train_linear_classifier

    train, val = Features(24, seed=0), Features(10, seed=1)
    return train_linear_classifier(
        lambda x: x, 16, 6, FeatureImages(train), lambda: DataLoader(val, batch_size=20, collate_fn=collate_eval),
        recipe, tmp, epochs=epochs, batch_size=16, base_lr=lr, resume=resume, show_progress=False, cpu=True,
        hooks=hooks, checkpoint_every=checkpoint_every)


@pytest.mark.parametrize("recipe,lr", [("dino", 16.0), ("smd", 1600.0)])
def test_separable_features_reach_full_accuracy(tmp_path, fresh_accelerate_state, recipe, lr):
    out = _train(tmp_path, recipe, epochs=4, lr=lr)
    assert out["metrics"]["top1"] == 100.0
    assert out["metrics"]["top5"] == 100.0
    assert out["lr"] == pytest.approx(lr * 16 / 256)
    hist = out["history"]
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    # cosine per epoch from the base lr to 0 (the lr used in each epoch is logged)
    assert hist[0]["lr"] == pytest.approx(lr * 16 / 256)
    assert hist[2]["lr"] == pytest.approx(lr * 16 / 256 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 2 / 4)).item()))
    from safetensors.torch import load_file

    head = load_file(str(tmp_path / "linear_head.safetensors"))
    assert head["weight"].shape == (6, 16) and head["bias"].shape == (6,)


def test_lars_step_is_larc_without_clipping():
    """SMD's LARC(trust 0.001, clip=False), wd 0: g <- g * 0.001 |p| / |g|, then SGD with momentum;
    a parameter with zero norm (the zero-initialised bias) takes the plain SGD step."""
    from selfdistill.training.linear_probe import RECIPES, build_optimizer

    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    b = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer([w, b], RECIPES["smd"], lr=2.0)
    w.grad = torch.tensor([[0.0, 2.0]])  # |g| = 2
    b.grad = torch.tensor([1.0, -1.0])
    opt.step()
    scaled = torch.tensor([[0.0, 2.0]]) * (0.001 * 5 / 2)
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0]]) - 2.0 * scaled)
    assert torch.allclose(b.detach(), torch.tensor([-2.0, 2.0]))
    w.grad = torch.tensor([[0.0, 2.0]])
    b.grad = torch.zeros(2)
    before = w.detach().clone()
    opt.step()  # momentum 0.9: buffer = 0.9 * old + new
    new = torch.tensor([[0.0, 2.0]]) * (0.001 * before.norm() / 2)
    assert torch.allclose(w.detach(), before - 2.0 * (0.9 * scaled + new))
    assert isinstance(build_optimizer([w], RECIPES["dino"], 0.1), torch.optim.SGD)


def test_vit_features_are_cls_tokens_of_the_last_blocks():
    from selfdistill.training.linear import LinearFeatures
    from selfdistill.models import Backbone

    torch.manual_seed(0)
    b = Backbone("vit_tiny_patch16_224", 16, 4, depth=2, embed_dim=32, num_heads=2).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        out = b(x)
        two = LinearFeatures(b, 2)(x)
        one_avg = LinearFeatures(b, 1, avgpool_patchtokens=True)(x)
        # the CLS of the first block, after the final norm, by hand
        m = b.model
        h = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        first = m.norm(m.blocks[0](h))[:, 0]
    assert two.shape == (3, 64) and one_avg.shape == (3, 64)
    assert torch.allclose(two[:, 32:], out.pooled, atol=1e-5)  # last block: the final-norm CLS
    assert torch.allclose(two[:, :32], first, atol=1e-5)
    assert torch.allclose(one_avg[:, :32], out.pooled, atol=1e-5)
    assert torch.allclose(one_avg[:, 32:], out.tokens.mean(1), atol=1e-5)
    with pytest.raises(ValueError, match="only 2 blocks"):
        LinearFeatures(b, 3)
    r = Backbone("resnet18").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # no CLS token: the average pool, whatever n_last_blocks says
        assert torch.equal(LinearFeatures(r, 4)(x), r(x).pooled)
    assert LinearFeatures(r, 4).describe().startswith("average-pooled")


class _KillAt(Hook):
    """An interrupted run: dies before optimizer step ``step`` (after the checkpoint of the one before)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_start(self, loop) -> None:
        if loop.state.step == self.step:
            raise KeyboardInterrupt


def test_resume_after_a_kill_at_a_random_step_equals_uninterrupted(tmp_path, fresh_accelerate_state):
    """A checkpoint every step (the loop's), a kill at a random one, resumed: the same history and
    head bit for bit; a resume with other settings is refused before anything is written."""
    import random

    from safetensors.torch import load_file

    from selfdistill.configkit import ConfigError
    from selfdistill.engine.checkpoint import checkpoint_dir

    full = _train(tmp_path / "full", "dino", epochs=3, lr=4.0)  # 9 steps: 3 per epoch
    kill = int(os.environ.get("LINEAR_KILL_STEP", random.randrange(1, 9)))
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "cut", "dino", epochs=3, lr=4.0, hooks=[_KillAt(kill)], checkpoint_every=1)
    assert checkpoint_dir(tmp_path / "cut", kill).is_dir()
    resumed = _train(tmp_path / "cut", "dino", epochs=3, lr=4.0, checkpoint_every=1)
    events = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resumed"] == [kill]
    assert resumed["history"] == full["history"], f"killed before step {kill}"
    a = load_file(str(tmp_path / "full" / "linear_head.safetensors"))
    b = load_file(str(tmp_path / "cut" / "linear_head.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), f"killed before step {kill}"
    with pytest.raises(ConfigError, match="another recipe: probe.lr"):
        _train(tmp_path / "cut", "dino", epochs=3, lr=8.0)


def _tiny_export(path: Path) -> Path:
    from selfdistill.config import ModelConfig
    from selfdistill.models import export_backbone
    from selfdistill.models import Backbone

    torch.manual_seed(0)
    cfg = ModelConfig(name="vit_tiny_patch16_224", img_size=16, patch_size=4, drop_path_rate=0.0,
                      kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})
    return export_backbone(Backbone(cfg.name, 16, 4, **cfg.kwargs), path)


def _linear_cmd(weights: Path, train: Path, val: Path, out: Path) -> list[str]:
    return [str(ROOT / "run_eval.py"), "linear", "--weights", str(weights), "--data.path", str(train),
            "--data.val_path", str(val), "--image-size", "16", "--epochs", "2", "--batch-size", "8",
            "--lr", "4", "--n-last-blocks", "2", "--num-workers", "0", "--out", str(out)]


@pytest.mark.slow
def test_two_processes_train_the_same_head_as_one(tmp_path):
    """Accelerate DDP: the same global batches (each rank half of each), so the same head."""
    from safetensors.torch import load_file

    train = make_image_folder(tmp_path / "train", n_per_class=8, size=20)
    val = make_image_folder(tmp_path / "val", n_per_class=3, size=20, seed=2)
    weights = _tiny_export(tmp_path / "w.safetensors")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    one = subprocess.run([sys.executable, *_linear_cmd(weights, train, val, tmp_path / "one" / "r.json")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([ACCELERATE_LAUNCH, "--num_processes", "2",
                          *_linear_cmd(weights, train, val, tmp_path / "two" / "r.json")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = (json.loads((tmp_path / d / "r.json").read_text()) for d in ("one", "two"))
    assert r1["protocol"]["processes"] == 1 and r2["protocol"]["processes"] == 2
    assert r1["protocol"]["name"] == "linear" and r1["protocol"]["n_val"] == 6
    h1, h2 = (load_file(str(tmp_path / d / "linear" / "linear_head.safetensors")) for d in ("one", "two"))
    assert all(torch.allclose(h1[k], h2[k], atol=1e-5) for k in h1)
    assert r1["metrics"]["top1"] == r2["metrics"]["top1"]


def test_linear_protocol_reads_folders_shards_and_hf(tmp_path, fresh_accelerate_state):
    """The same labelled images as an image folder, selfdistill shards and an HF dataset on disk."""
    import datasets
    from accelerate import Accelerator

    from selfdistill.data.shard_inputs import folder_input
    from selfdistill.data.shard_writer import write_shards
    from selfdistill.training.linear import LinearOptions
    from selfdistill.eval.protocols import EvalContext, Weights, run_protocol

    train = make_image_folder(tmp_path / "train", n_per_class=8, size=20)
    val = make_image_folder(tmp_path / "val", n_per_class=3, size=20, seed=2)
    write_shards(tmp_path / "shards", folder_input(train), samples_per_shard=4, progress=False)
    hf = datasets.load_dataset("imagefolder", data_dir=str(train))["train"]
    hf.save_to_disk(str(tmp_path / "hf"))
    weights = Weights(str(_tiny_export(tmp_path / "w.safetensors")))
    acc = Accelerator(cpu=True)
    for name, path in (("folder", train), ("shards", tmp_path / "shards"), ("hf", tmp_path / "hf")):
        opts = LinearOptions(str(path), str(val), epochs=1, batch_size=4, lr=4.0, n_last_blocks=1,
                             image_size=16, num_workers=0)
        res = run_protocol("linear", weights, opts, EvalContext(acc, tmp_path / name))
        assert res["protocol"]["n_train"] == 16 and res["protocol"]["n_val"] == 6, name
        assert res["protocol"]["num_classes"] == 2 and res["classes"] == ["a", "b"], name
        assert len(res["history"]) == 1 and 0.0 <= res["metrics"]["top1"] <= 100.0
