"""Copydays copy detection: GeM, positives by name prefix, PCA whitening, an exact copy at rank 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def test_gem_by_hand():
    from selfdistill.eval.copydetect import gem

    tokens = torch.tensor([[[1.0, -3.0], [2.0, 0.0]]])  # [B=1, T=2, D=2]
    out = gem(tokens, p=4)
    assert out[0, 0].item() == pytest.approx(((1 + 16) / 2) ** 0.25)
    assert out[0, 1].item() == pytest.approx(1e-6, rel=1e-3)  # negatives are clamped to eps first


def test_positives_by_prefix_and_ap_in_the_top_k():
    from selfdistill.eval.copydetect import copy_detection_ap, copydays_positives

    originals = ["200000.jpg", "200100.jpg", "200200.jpg"]
    assert copydays_positives(["200101.jpg", "200000.jpg", "999901.jpg"], originals) == [[1], [0], []]
    sim = torch.tensor([[0.1, 0.9, 0.5, 0.7],   # positive 1 first
                        [0.9, 0.1, 0.5, 0.7],   # positive 1 at rank 3
                        [0.9, 0.8, 0.5, 0.7]])  # no positive
    aps = copy_detection_ap(sim, [[1], [1], []], topk=4)
    assert aps[0] == 1.0
    assert aps[1] == pytest.approx((0 / 3 + 1 / 4) / 2)
    assert aps[2] is None
    assert copy_detection_ap(sim, [[1], [1], []], topk=2)[1] == 0.0  # outside the top 2: not found


def test_whitening_gives_identity_covariance_on_the_fitting_set():
    from selfdistill.eval.copydetect import PCAWhitening

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(8, 8, generator=g)
    x = torch.randn(500, 8, generator=g) @ mix + 3.0  # correlated, off-centre
    w = PCAWhitening.fit(x)
    y = w(x).double()
    assert torch.allclose(y.mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-5)
    cov = (y - y.mean(0)).T @ (y - y.mean(0)) / y.shape[0]
    assert torch.allclose(cov, torch.eye(8, dtype=torch.float64), atol=1e-4)
    assert torch.all(w.eigenvalues[:-1] >= w.eigenvalues[1:])  # sorted, largest first
    # DINO's uncentred second moment is another matrix: its whitening is not the identity here
    y_dino = PCAWhitening.fit(x, centred=False)(x).double()
    cov_dino = (y_dino - y_dino.mean(0)).T @ (y_dino - y_dino.mean(0)) / y.shape[0]
    assert not torch.allclose(cov_dino, torch.eye(8, dtype=torch.float64), atol=1e-2)


def _copydays(root: Path, rng: np.random.Generator) -> Path:
    for d in ("original", "strong", "jpegqual/3", "distractors", "whitening"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(4):
        img = Image.fromarray((rng.random((30, 36, 3)) * 255).astype(np.uint8))
        img.save(root / "original" / f"2{i:03d}00.png")
        img.save(root / "jpegqual" / "3" / f"2{i:03d}00.jpg", quality=50)
    shutil.copy(root / "original" / "200100.png", root / "strong" / "200101.png")  # an exact copy
    shutil.copy(root / "original" / "200200.png", root / "strong" / "200203.png")
    for i in range(6):
        Image.fromarray((rng.random((30, 30, 3)) * 255).astype(np.uint8)).save(root / "distractors" / f"{i}.png")
    for i in range(20):
        Image.fromarray((rng.random((30, 30, 3)) * 255).astype(np.uint8)).save(root / "whitening" / f"{i}.png")
    return root


def test_copydetect_command_finds_exact_copies_first(tmp_path, fresh_accelerate_state):
    from selfdistill.cli.evaluate import main

    root = _copydays(tmp_path / "copydays", np.random.default_rng(0))
    out = tmp_path / "c.json"
    rc = main(["copydetect", "--weights", "random", "--model.name", "vit_tiny_patch16_224", "--model.img_size", "32",
               "--model.patch_size", "8", "--model.kwargs", "{depth: 2, embed_dim: 32, num_heads: 2}",
               "--data.path", str(root), "--image-size", "32", "--whitening-path", str(root / "whitening"),
               "--distractors-path", str(root / "distractors"), "--batch-size", "4", "--num-workers", "0",
               "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    p = res["protocol"]
    assert p["name"] == "copydetect" and p["blocks"] == ["original", "strong", "jpegqual/3"]
    assert p["n_database"] == 4 + 6 and p["n_distractors"] == 6 and p["n_whitening"] == 20
    assert p["whitening_matrix"] == "covariance" and p["headline"] == "map_strong"
    assert res["metrics"]["map_strong"] == 100.0 and res["metrics"]["map_original"] == 100.0
    assert 0.0 <= res["metrics"]["map_jpegqual_3"] <= 100.0
    assert res["details"]["strong"]["n_queries"] == 2


def test_copydetect_features_are_cls_and_gem_of_patch_tokens():
    from selfdistill.eval.copydetect import copy_detection_embedding, gem
    from selfdistill.models import Backbone

    torch.manual_seed(0)
    b = Backbone("vit_tiny_patch16_224", 32, 8, depth=2, embed_dim=32, num_heads=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = copy_detection_embedding(b)(x)
        feats = b.model.forward_features(x)  # final-norm tokens, CLS first
    assert f.shape == (2, 64)
    assert torch.allclose(f[:, :32], feats[:, 0], atol=1e-6)
    assert torch.allclose(f[:, 32:], gem(feats[:, 1:], 4.0), atol=1e-6)
