"""One evaluation entry: every run_eval.py sub-command comes from the protocol registry with the same
weights and output options, and protocols split their images over the processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ACCELERATE_LAUNCH, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
SHARED = {"--weights", "--weights-format", "--model.name", "--model.img_size", "--model.patch_size", "--model.kwargs",
          "--cpu", "--out"}


def _subparsers():
    from selfdistill.cli.evaluate import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(getattr(a, "choices", None), dict))
    return parser, action.choices


def test_every_sub_command_is_a_registered_protocol_with_the_shared_options():
    from selfdistill.eval.protocols import protocol_names

    _, subs = _subparsers()
    assert sorted(subs) == protocol_names()
    assert {"knn", "linear", "finetune", "retrieval", "copydetect", "attention", "matching", "attn-diagnostics",
            "curves", "pictures", "summary", "export"} <= set(subs)
    for name, sub in subs.items():
        options = {o for a in sub._actions for o in a.option_strings}
        assert SHARED <= options, (name, SHARED - options)


def test_shared_options_mean_the_same_everywhere():
    from selfdistill.eval.protocols import model_config_from

    parser, subs = _subparsers()
    args = ["--weights", "random", "--model.name", "vit_tiny_patch16_224", "--model.kwargs", "{depth: 2, embed_dim: 32}",
            "--cpu", "--out", "o"]
    configs = set()
    for name in subs:
        ns = parser.parse_args([name, *args] + (["--data.path", "a", "--data.val_path", "b"] if name in ("knn", "linear")
                                                else ["--gnd", "g"] if name == "retrieval" else
                                                ["--data.path", "c"] if name == "copydetect" else []))
        assert (ns.weights, ns.cpu, ns.out) == ("random", True, "o")
        configs.add(repr(model_config_from(ns)))
    assert len(configs) == 1 and "'depth': 2" in configs.pop()
    with pytest.raises(SystemExit):  # no prefix matching: --ou is not silently --out / --output-dir
        parser.parse_args(["summary", "--ou", "x.json"])


@pytest.mark.slow
def test_knn_on_two_processes_equals_one_and_splits_the_images(tmp_path):
    """Each process embeds half of the bank and of the queries; the gathered result is the same."""
    train = make_image_folder(tmp_path / "train", n_per_class=8, size=16)
    val = make_image_folder(tmp_path / "val", n_per_class=5, size=16, seed=3)
    import torch

    from selfdistill.models import Backbone, export_backbone

    torch.manual_seed(0)
    weights = export_backbone(Backbone("vit_tiny_patch16_224", 16, 4, depth=2, embed_dim=32, num_heads=2),
                              tmp_path / "w.safetensors")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    knn = [str(ROOT / "run_eval.py"), "knn", "--weights", str(weights), "--data.path", str(train),
           "--data.val_path", str(val), "--image-size", "16", "--k", "1", "5", "--num-workers", "0", "--cpu"]
    one = subprocess.run([sys.executable, *knn, "--out", str(tmp_path / "one.json")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([ACCELERATE_LAUNCH, "--num_processes", "2", *knn, "--out", str(tmp_path / "two.json")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert r1["images_embedded_per_process"] == [16 + 10]  # 2 classes x 8 bank images, 2 x 5 queries
    assert r2["images_embedded_per_process"] == [8 + 5, 8 + 5]
    assert r1["metrics"] == r2["metrics"] and r1["protocol"]["n_train"] == r2["protocol"]["n_train"] == 16
