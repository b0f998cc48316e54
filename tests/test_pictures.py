"""Pictures: DINO attention maps and masks, patch matching, FD attention diagnostics, curves, index.html."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image_folder, run_training
from selfdistill.config import ModelConfig
from selfdistill.eval.attention import (
    AttentionStats,
    attention_distance,
    cls_attention,
    diagonality,
    mass_threshold,
    vit_attention,
)
from selfdistill.eval.pictures import (
    load_image,
    matching_picture,
    mutual_nearest_matches,
    random_view,
    write_index,
)
from selfdistill.models import Backbone

TINY = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8, drop_path_rate=0.0,
                   kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})


def tiny_vit() -> Backbone:
    torch.manual_seed(0)
    return Backbone(TINY.name, TINY.img_size, TINY.patch_size, **TINY.kwargs).eval()


def make_photos(root: Path, n: int = 3, size: tuple[int, int] = (40, 48)) -> list[Path]:
    """Structured images (gradients, a bright square, noise) of a non-square size."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        h, w = size
        img = np.zeros((h, w, 3), np.float32)
        img[..., 0] = np.linspace(0, 255, w)[None, :]
        img[..., 1] = np.linspace(255, 0, h)[:, None]
        img[8 + 3 * i:20 + 3 * i, 10:24] = 250
        img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
        paths.append(root / f"photo{i}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


def assert_valid_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 0 and img.height > 0
        assert np.asarray(img.convert("RGB")).std() > 1.0, f"{path} is a constant image"


# --------------------------------------------------------------------------------------------
# Attention: extraction, DINO threshold, distance, diagonality
# --------------------------------------------------------------------------------------------


def test_mass_threshold_keeps_the_top_patches_holding_60_percent():
    maps = torch.tensor([[[0.5, 0.3], [0.1, 0.1]],     # 0.5 < 0.6: needs 0.5 and 0.3
                         [[0.05, 0.15], [0.7, 0.1]]])  # 0.7 alone holds 60 %
    expected = torch.tensor([[[True, True], [False, False]], [[False, False], [True, False]]])
    assert torch.equal(mass_threshold(maps, 0.6), expected)
    assert torch.equal(mass_threshold(maps * 7.0, 0.6), expected)  # normalised first (CLS row without CLS key)
    assert mass_threshold(maps, 1.0).all()
    kept = (maps * mass_threshold(maps, 0.6)).flatten(1).sum(1)
    assert (kept >= 0.6).all()
    with pytest.raises(ValueError, match="threshold mass"):
        mass_threshold(maps, 0.0)


def test_vit_attention_is_the_softmax_of_the_blocks_and_leaves_the_model_untouched():
    backbone = tiny_vit()
    x = torch.randn(2, 3, 32, 40)
    att = vit_attention(backbone, x)
    assert att.layers == [0, 1] and att.grid == (4, 5) and att.num_prefix_tokens == 1 and att.patch_size == 8
    assert [tuple(a.shape) for a in att.maps] == [(2, 2, 21, 21)] * 2
    torch.testing.assert_close(att.maps[1].sum(-1), torch.ones(2, 2, 21))

    # Hand computation of the last block: softmax(q k^T * scale) from its own qkv projection.
    attn = backbone.model.blocks[-1].attn
    seen = {}
    handle = attn.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        backbone(x)
        q, k, _ = attn.qkv(seen["x"]).reshape(2, 21, 3, 2, 16).permute(2, 0, 3, 1, 4)
        ref = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
    handle.remove()
    torch.testing.assert_close(att.maps[1], ref)
    last = vit_attention(backbone, x, layers=[-1])
    assert last.layers == [1] and len(last.maps) == 1
    torch.testing.assert_close(last.maps[0], ref)

    cls = cls_attention(last.maps[0], last.grid)
    assert cls.shape == (2, 2, 4, 5)
    torch.testing.assert_close(cls.flatten(2), ref[:, :, 0, 1:])
    # Fused attention switched back on, no hooks left behind, eval mode kept.
    assert all(b.attn.fused_attn == attn.fused_attn for b in backbone.model.blocks)
    assert not any(m._forward_hooks for m in backbone.model.modules())


def test_a_local_timm_weights_file_loads_with_its_model_name(tmp_path):
    from selfdistill.models import load_backbone

    ref = tiny_vit()
    torch.save(ref.model.state_dict(), tmp_path / "vit.pth")
    backbone, _ = load_backbone(str(tmp_path / "vit.pth"), TINY)
    assert all(torch.equal(a, b) for a, b in zip(backbone.state_dict().values(), ref.state_dict().values()))
    with pytest.raises(ValueError, match="name its timm model with --model.name"):
        load_backbone(str(tmp_path / "vit.pth"))


def test_vit_attention_refuses_models_without_global_attention():
    with pytest.raises(ValueError, match="need a ViT"):
        vit_attention(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit_attention(tiny_vit(), torch.randn(1, 3, 30, 32))


def test_attention_distance_and_diagonality_by_hand():
    grid, p = (2, 2), 8  # patch centres (4, 4), (12, 4), (4, 12), (12, 12)
    eye = torch.eye(5)[None, None]
    assert attention_distance(eye, grid, p).item() == 0.0
    assert diagonality(eye, grid).item() == 1.0

    a = torch.zeros(1, 1, 5, 5)  # token 0 = CLS, tokens 1..4 = patches
    a[0, 0, 1, 4] = 1.0                              # patch 0 -> patch 3: 8*sqrt(2)
    a[0, 0, 2, [0, 1, 2]] = torch.tensor([0.5, 0.25, 0.25])  # half on CLS: renormalised to 1/2, 1/2 -> 4
    a[0, 0, 3, 1:] = 0.25                            # uniform: (0 + 8 + 8 + 8 sqrt 2) / 4
    a[0, 0, 4, 4] = 1.0                              # itself: 0
    hand = (8 * math.sqrt(2) + 4 + (16 + 8 * math.sqrt(2)) / 4 + 0) / 4
    assert attention_distance(a, grid, p).item() == pytest.approx(hand, rel=1e-6)
    assert diagonality(a, grid, radius=0).item() == pytest.approx((0 + 0.5 + 0.25 + 1) / 4)
    assert diagonality(a, grid, radius=1).item() == pytest.approx(1.0)  # every patch neighbours every other

    uniform = torch.full((1, 3, 17, 17), 1 / 17)
    assert diagonality(uniform, (4, 4))[0].tolist() == pytest.approx([1 / 16] * 3)

    stats = AttentionStats(radii=(0, 1))
    from selfdistill.eval.attention import AttentionMaps

    stats.update(AttentionMaps([a.repeat(2, 1, 1, 1), eye.repeat(2, 1, 1, 1)], [0, 1], grid, 1, p))
    res = stats.result()
    assert res["n_images"] == 2 and np.asarray(res["attention_distance_px"]) == pytest.approx(np.array([[hand], [0.0]]))
    assert np.asarray(res["diagonality"]["radius_0"]) == pytest.approx(np.array([[0.4375], [1.0]]))
    assert stats.mean_maps().shape == (2, 1, 4, 4)


# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------


def test_mutual_nearest_matches_by_hand():
    t1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    t2 = torch.tensor([[0.0, 1.0], [1.0, 0.1]])
    m = mutual_nearest_matches(t1, t2)
    # 1 <-> 0 (cos 1.0) before 0 <-> 1 (cos 0.995); patch 2's nearest (1) prefers patch 0.
    assert m.idx1.tolist() == [1, 0] and m.idx2.tolist() == [0, 1]
    assert m.similarity.tolist() == pytest.approx([1.0, 1 / math.sqrt(1.01)])
    assert mutual_nearest_matches(t1, t2, top_k=1).idx1.tolist() == [1]
    # Without patch 0 of the first picture, patch 1 of the second turns to patch 2 ([1, 1]), mutually.
    m = mutual_nearest_matches(t1, t2, mask1=torch.tensor([False, True, True]))
    assert m.idx1.tolist() == [1, 2] and m.idx2.tolist() == [0, 1]
    m = mutual_nearest_matches(t1, t2, mask2=torch.tensor([False, True]))
    assert m.idx1.tolist() == [0] and m.idx2.tolist() == [1]


def test_matching_identical_views_joins_same_position_patches(tmp_path):
    photo = make_photos(tmp_path / "img", n=1)[0]
    img, _ = load_image(photo, 32)
    box = (0, 0, 32, 32)
    res = matching_picture(tiny_vit(), img, img, tmp_path / "m.png", top_k=50, geometry=(box, False, box, False))
    m, seg = res["matches"], res["segments"]
    assert len(m.idx1) == 16 and torch.equal(m.idx1, m.idx2)  # every patch is its own mutual nearest neighbour
    gap = seg[0, 2] - seg[0, 0] - 32
    assert gap > 0 and torch.allclose(seg[:, 2] - seg[:, 0], 32 + gap) and torch.equal(seg[:, 1], seg[:, 3])
    centres = torch.tensor([[(c + 0.5) * 8, (r + 0.5) * 8] for r in range(4) for c in range(4)])
    assert torch.equal(seg[:, :2], centres[m.idx1])
    st = res["stats"]
    assert st["mean_error_src_px"] == 0.0 and st["fraction_within_cell"] == 1.0 and st["overlapping_patch_pairs"] == 16
    assert_valid_png(tmp_path / "m.png")

    fg = matching_picture(tiny_vit(), img, img, tmp_path / "fg.png", top_k=50, foreground=0.6)
    n_fg = fg["stats"]["foreground_patches"]
    assert n_fg[0] == n_fg[1] and 0 < n_fg[0] < 16  # the 60 % CLS-attention foreground of the same picture
    assert torch.equal(fg["matches"].idx1, fg["matches"].idx2) and len(fg["matches"].idx1) == n_fg[0]


def test_random_view_uses_the_training_crop_geometry():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    v1, box1, f1 = random_view(img, 32, seed=3)
    v2, box2, f2 = random_view(img, 32, seed=3)
    assert (box1, f1) == (box2, f2) and np.array_equal(np.asarray(v1), np.asarray(v2)) and v1.size == (32, 32)
    top, left, h, w = box1
    assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80 and h * w >= 0.4 * 60 * 80 * 0.99
    boxes = {random_view(img, 32, seed=s)[1] for s in range(5)}
    assert len(boxes) > 1


# --------------------------------------------------------------------------------------------
# Commands, PNGs and the index
# --------------------------------------------------------------------------------------------


def index_pngs(out: Path) -> set[str]:
    html = (out / "index.html").read_text()
    return set(re.findall(r'<img src="([^"]+\.png)"', html))


def test_pictures_command_writes_valid_pngs_and_an_index_of_all(tmp_path, capsys):
    from selfdistill.cli.evaluate import main
    from selfdistill.models import export_backbone

    weights = export_backbone(tiny_vit(), tmp_path / "w" / "vit.safetensors")
    photos = make_photos(tmp_path / "photos", n=3)
    out = tmp_path / "pics"
    rc = main(["pictures", "--weights", str(weights), "--images", str(tmp_path / "photos"), "--out", str(out),
               "--pair", str(photos[0]), str(photos[1]), "--max-images", "2", "--max-views", "1",
               "--top-k", "5", "--cpu"])
    assert rc == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["attention_00_photo0.png", "attention_01_photo1.png", "attn_distance.png", "attn_mean_maps.png",
                    "matching_00_photo0.png", "matching_pair_00_photo0_photo1.png"]
    for p in pngs:
        assert_valid_png(out / p)
    assert index_pngs(out) == set(pngs)
    captions = json.loads((out / "captions.json").read_text())
    assert set(captions) == set(pngs) and all(c["caption"] for c in captions.values())

    diag = json.loads((out / "attn_diagnostics.json").read_text())
    assert diag["n_images"] == 3 and diag["grid"] == [4, 4] and diag["patch_size"] == 8
    dist = np.asarray(diag["attention_distance_px"])
    assert dist.shape == (2, 2) and (dist > 0).all() and (dist < 32 * math.sqrt(2)).all()
    for r in ("radius_0", "radius_1"):
        d = np.asarray(diag["diagonality"][r])
        assert d.shape == (2, 2) and ((0 < d) & (d <= 1)).all()
    assert (np.asarray(diag["diagonality"]["radius_1"]) >= np.asarray(diag["diagonality"]["radius_0"])).all()
    att = json.loads((out / "attention.json").read_text())
    kept = att["images"]["photo0.png"]["kept_fraction_per_head"]
    assert att["threshold"] == 0.6 and len(kept) == 2 and all(0 < f <= 1 for f in kept)
    match = json.loads((out / "matching.json").read_text())["pictures"]["matching_00_photo0.png"]
    assert 0 < match["n_matches"] <= 5 and len(match["error_src_px"]) == match["n_matches"]

    # Another command adds its PNG and the index is regenerated with all of them.
    (out / "extra").mkdir()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(out / "extra" / "odd name.png")
    write_index(out)
    assert index_pngs(out) == set(pngs) | {"extra/odd%20name.png"}

    # A model without attention blocks: a clear one-line error, exit code 2.
    rc = main(["attention", "--weights", "random", "--model.name", "resnet18", "--images", str(photos[0]),
               "--out", str(out), "--image-size", "32", "--cpu"])
    assert rc == 2 and "need a ViT" in capsys.readouterr().err


def test_curves_and_pictures_of_a_run_with_checkpoint_knn(tmp_path, fresh_accelerate_state):
    from selfdistill.cli.evaluate import main

    data = make_image_folder(tmp_path / "train", n_per_class=8)
    val = make_image_folder(tmp_path / "val", n_per_class=3, seed=3)
    run = tmp_path / "run"
    # 16 images, batch 8: 2 steps per epoch, a checkpoint every 2 steps, online kNN after each epoch.
    run_training(data, run, **{"train.checkpoint_every": 2, "train.keep_checkpoints": 5, "knn.val_path": str(val)})
    online = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "knn/top1_k1" in r]
    assert [r["step"] for r in online] == [2, 4]

    assert main(["curves", "--run", str(run), "--knn-each-checkpoint", "--num-workers", "0", "--cpu"]) == 0
    out = run / "pictures"
    cache = json.loads((out / "checkpoint_knn.json").read_text())
    assert sorted(cache["checkpoints"]) == ["step_000000002", "step_000000004"]
    # Each checkpoint's evaluation backbone is the one online kNN evaluated at that step.
    for r in online:
        row = cache["checkpoints"][f"step_{r['step']:09d}"]
        assert row["top1_k1"] == pytest.approx(r["knn/top1_k1"]) and row["top1_k3"] == pytest.approx(r["knn/top1_k3"])
    for p in ("eval_curves.png", "training_curves.png"):
        assert_valid_png(out / p)

    # The whole set for the run directory: same pictures/ directory, curves included in the index.
    photos = make_photos(tmp_path / "photos", n=1, size=(20, 24))
    assert main(["pictures", "--weights", str(run), "--images", str(photos[0]), "--max-diagnostic-images", "1",
                 "--cpu"]) == 0
    pngs = {p.name for p in out.glob("*.png")}
    assert {"attention_00_photo0.png", "matching_00_photo0.png", "attn_distance.png", "eval_curves.png"} <= pngs
    assert index_pngs(out) == pngs
