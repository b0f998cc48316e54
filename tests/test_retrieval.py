"""Revisited Oxford / Paris retrieval: AP by hand, the junk rule, the safe pickle reader, end to end."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image


def test_average_precision_by_hand():
    from selfdistill.eval.retrieval import average_precision

    # positives at ranks 0 and 2 of 2: trapezoids (1 + 1)/2 and (1/2 + 2/3)/2, each 1/2 wide
    assert average_precision([0, 2], 2) == pytest.approx(0.5 * 1.0 + 0.5 * (0.5 + 2 / 3) / 2)
    # one of two positives, at rank 1: (0/1 + 1/2)/2 * 1/2; the missing one adds nothing
    assert average_precision([1], 2) == pytest.approx(0.125)
    assert average_precision([0, 1, 2], 3) == pytest.approx(1.0)
    assert average_precision([], 3) == 0.0


def _similarity(order: list[int], n: int) -> torch.Tensor:
    sim = torch.zeros(n)
    sim[torch.tensor(order)] = torch.linspace(1.0, 0.1, n)
    return sim


def test_revisited_settings_and_junk_rule_by_hand():
    from selfdistill.eval.retrieval import revisited_scores, setting_ground_truth

    gnd = [{"easy": [0], "hard": [1], "junk": [5]},
           {"easy": [2, 4], "hard": [], "junk": [0]}]
    assert setting_ground_truth(gnd, "easy")[0] == {"ok": [0], "junk": [5, 1]}
    assert setting_ground_truth(gnd, "medium")[0] == {"ok": [0, 1], "junk": [5]}
    assert setting_ground_truth(gnd, "hard")[0] == {"ok": [1], "junk": [5, 0]}
    # query 0 ranks the database 3, 0, 5, 1, 4, 2; query 1 ranks it 0, 2, 1, 4, 3, 5
    sim = torch.stack([_similarity([3, 0, 5, 1, 4, 2], 6), _similarity([0, 2, 1, 4, 3, 5], 6)])
    s = revisited_scores(sim, gnd, kappas=(1, 2))
    # Medium, query 0: junk 5 dropped -> 3, 0, 1, 4, 2: positives at ranks 1, 2
    q0_medium = 0.5 * (0 / 1 + 1 / 2) / 2 + 0.5 * (1 / 2 + 2 / 3) / 2
    # Medium, query 1: junk 0 dropped -> 2, 1, 4, 3, 5: positives 2, 4 at ranks 0, 2
    q1_medium = 0.5 * 1.0 + 0.5 * (1 / 2 + 2 / 3) / 2
    assert s["medium"]["aps"] == pytest.approx([q0_medium, q1_medium])
    assert s["medium"]["map"] == pytest.approx((q0_medium + q1_medium) / 2)
    # Easy, query 0: hard image 1 becomes junk too -> 3, 0, 4, 2: positive 0 at rank 1
    assert s["easy"]["aps"][0] == pytest.approx((0 / 1 + 1 / 2) / 2)
    # Hard, query 0: easy image 0 is junk -> 3, 1, 4, 2: positive 1 at rank 1 (rank 3 without the rule)
    assert s["hard"]["aps"][0] == pytest.approx((0 / 1 + 1 / 2) / 2)
    # Hard, query 1 has no positive: left out of the mean
    assert s["hard"]["aps"][1] is None and s["hard"]["n_queries"] == 1
    assert s["hard"]["map"] == pytest.approx(0.25)
    # precision@k as the revisited code: query 0 medium, positives at 1-based ranks 2, 3
    assert s["medium"]["mp"][1] == pytest.approx((0.0 + 1.0) / 2)  # q1 hits at rank 1
    assert s["medium"]["mp"][2] == pytest.approx((1 / 2 + 1 / 2) / 2)


def test_ground_truth_reader_refuses_code_and_reads_numpy(tmp_path):
    from selfdistill.eval.retrieval import load_ground_truth

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "gnd_evil.pkl"
    bad.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [Evil()]}))
    with pytest.raises(ValueError, match="refusing to load"):
        load_ground_truth(bad)
    assert not marker.exists()

    good = tmp_path / "gnd_ok.pkl"
    good.write_bytes(pickle.dumps({"imlist": ["a", "b"], "qimlist": ["q"],
                                   "gnd": [{"bbx": np.array([1.0, 2, 3, 4]), "easy": np.array([1]), "hard": [],
                                            "junk": np.array([], dtype=np.int64)}]}, protocol=2))
    cfg = load_ground_truth(good)
    assert cfg["gnd"][0] == {"easy": [1], "hard": [], "junk": [], "bbx": [1.0, 2.0, 3.0, 4.0]}

    out_of_range = tmp_path / "gnd_range.pkl"
    out_of_range.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["q"],
                                           "gnd": [{"easy": [3], "hard": [], "junk": []}]}))
    with pytest.raises(ValueError, match="outside the 1 database images"):
        load_ground_truth(out_of_range)


def test_multiscale_embedding_averages_three_scales():
    import torch.nn.functional as F

    from selfdistill.eval.retrieval import retrieval_embedding
    from selfdistill.models import Backbone

    torch.manual_seed(0)
    b = Backbone("vit_tiny_patch16_224", 32, 4, depth=2, embed_dim=32, num_heads=2).eval()
    x = torch.randn(1, 3, 34, 41)  # not a multiple of the patch: the remainder pixels are dropped
    with torch.no_grad():
        got = retrieval_embedding(b, multiscale=True)(x)
        parts = [b(x[..., :32, :40]).pooled,
                 b(F.interpolate(x, scale_factor=2 ** -0.5, mode="bilinear")[..., :24, :28]).pooled,
                 b(F.interpolate(x, scale_factor=0.5, mode="bilinear")[..., :16, :20]).pooled]
    assert torch.allclose(got, F.normalize(sum(parts) / 3, dim=-1), atol=1e-5)


def test_retrieval_command_end_to_end(tmp_path, fresh_accelerate_state):
    """Queries that are copies of database images (one cropped by its bbx) are found first."""
    from selfdistill.cli.evaluate import main
    from selfdistill.config import ModelConfig
    from selfdistill.models import export_backbone
    from selfdistill.models import Backbone

    rng = np.random.default_rng(0)
    jpg = tmp_path / "toy" / "jpg"
    jpg.mkdir(parents=True)
    names = []
    for i in range(5):
        Image.fromarray((rng.random((36 + 4 * i, 44, 3)) * 255).astype(np.uint8)).save(jpg / f"db{i}.png")
        names.append(f"db{i}")
    shutil.copy(jpg / "db1.png", jpg / "q0.png")
    big = np.zeros((60, 60, 3), dtype=np.uint8)
    big[10:50, 12:56] = np.asarray(Image.open(jpg / "db3.png"))[:40, :44]
    Image.fromarray(big).save(jpg / "q1.png")
    Image.fromarray(np.asarray(Image.open(jpg / "db3.png"))[:40, :44]).save(jpg / "db3.png")
    gnd = {"imlist": names, "qimlist": ["q0", "q1"],
           "gnd": [{"bbx": [0, 0, 44, 40], "easy": [1], "hard": [], "junk": [0]},
                   {"bbx": [12, 10, 56, 50], "easy": [3], "hard": [], "junk": []}]}
    (tmp_path / "toy" / "gnd_toy.pkl").write_bytes(pickle.dumps(gnd))
    torch.manual_seed(0)
    cfg = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4, drop_path_rate=0.0,
                      kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})
    weights = export_backbone(Backbone(cfg.name, 32, 4, **cfg.kwargs), tmp_path / "w.safetensors")
    out = tmp_path / "r.json"
    rc = main(["retrieval", "--weights", str(weights), "--gnd", str(tmp_path / "toy" / "gnd_toy.pkl"),
               "--ext", ".png", "--image-size", "48", "--crop-queries", "--multiscale", "--num-workers", "0",
               "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["protocol"]["name"] == "retrieval" and res["protocol"]["crop_queries"] is True
    assert res["protocol"]["scales"] == pytest.approx([1.0, 2 ** -0.5, 0.5])
    assert res["protocol"]["n_database"] == 5 and res["protocol"]["n_queries"] == 2
    assert res["weights"] == str(weights) and res["model"]["name"] == "vit_tiny_patch16_224"
    assert res["metrics"]["map_easy"] == 100.0 and res["metrics"]["map_medium"] == 100.0
    # no query has a hard positive: the Hard setting has no score (and says why)
    assert "map_hard" not in res["metrics"] and res["details"]["hard"]["n_queries"] == 0
    rc = main(["retrieval", "--weights", str(weights), "--gnd", str(tmp_path / "toy" / "gnd_toy.pkl"),
               "--ext", ".jpg", "--num-workers", "0", "--out", str(out)])
    assert rc == 2  # a missing image is a one-line error
