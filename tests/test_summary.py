"""run_eval.py summary: several protocols, one JSON and one markdown table; the protocol registry."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from conftest import make_image_folder

ROOT = Path(__file__).resolve().parents[1]


def _tiny_export(path: Path) -> Path:
    from selfdistill.config import ModelConfig
    from selfdistill.models import export_backbone
    from selfdistill.models import Backbone

    torch.manual_seed(0)
    cfg = ModelConfig(name="vit_tiny_patch16_224", img_size=16, patch_size=4, drop_path_rate=0.0,
                      kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})
    return export_backbone(Backbone(cfg.name, 16, 4, **cfg.kwargs), path)


def test_summary_command_writes_json_and_markdown_for_knn_and_linear(tmp_path):
    train = make_image_folder(tmp_path / "train", n_per_class=8, size=20)
    val = make_image_folder(tmp_path / "val", n_per_class=3, size=20, seed=2)
    weights = _tiny_export(tmp_path / "w.safetensors")
    plan = tmp_path / "plan.yaml"
    plan.write_text("protocols:\n  knn: {k: [1, 3], image_size: 16, num_workers: 0}\n"
                    "  linear: {image_size: 16, epochs: 2, batch_size: 8, lr: 4.0, n_last_blocks: 2, num_workers: 0}\n"
                    "  retrieval: {gnd: /nowhere/gnd.pkl}\n")
    out = tmp_path / "summary"
    r = subprocess.run([sys.executable, str(ROOT / "run_eval.py"), "summary", "--weights", str(weights),
                        "--config", str(plan), "--protocols", "knn,linear", "--data.path", str(train),
                        "--data.val_path", str(val), "knn.temperature=0.1", "--out", str(out / "summary.json")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["protocols"]) == ["knn", "linear"] and summary["failed"] == []
    assert summary["weights"] == str(weights) and summary["model"]["name"] == "vit_tiny_patch16_224"
    knn, linear = summary["protocols"]["knn"], summary["protocols"]["linear"]
    assert knn["protocol"]["name"] == "knn" and knn["protocol"]["temperature"] == 0.1
    assert set(knn["metrics"]) == {"top1_k1", "top1_k3"}
    assert knn["options"]["train_path"] == str(train)  # filled from --data.path
    assert linear["protocol"]["recipe"] == "dino" and linear["protocol"]["epochs"] == 2
    assert linear["protocol"]["feature_dim"] == 64  # two CLS tokens of 32
    assert "top1" in linear["metrics"] and (out / "linear" / "linear_head.safetensors").is_file()
    assert json.loads((out / "knn" / "results.json").read_text())["metrics"] == knn["metrics"]
    md = (out / "summary.md").read_text()
    assert f"| knn | top1_k1 | {knn['metrics']['top1_k1']:.2f} |" in md
    assert f"| linear | top1 | {linear['metrics']['top1']:.2f} |" in md
    assert "**linear**: linear probe (dino recipe)" in md


@dataclass
class _EchoOptions:
    value: float = field(default=1.5, metadata={"help": "what to report"})


def test_a_protocol_registers_with_one_decorator(tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator

    from selfdistill.eval import protocols
    from selfdistill.eval.summary import build_plan, run_summary

    @protocols.register_protocol("echo_test", _EchoOptions, help="reports its option")
    def echo(weights, options, ctx):
        return {"metrics": {"value": options.value, "count": 3}, "protocol": {"description": "echo"}}

    try:
        assert "echo_test" in protocols.protocol_names()
        plan = build_plan(["echo_test"], {"echo_test": {"value": 2}})
        ctx = protocols.EvalContext(Accelerator(cpu=True), tmp_path)
        summary = run_summary(protocols.Weights("random"), plan, ctx)
        res = summary["protocols"]["echo_test"]
        assert res["metrics"] == {"value": 2.0, "count": 3} and res["protocol"] == {"name": "echo_test",
                                                                                   "description": "echo"}
        assert "| echo_test | value | 2.00 |" in (tmp_path / "summary.md").read_text()
        with pytest.raises(ValueError, match="registered twice"):
            protocols.register_protocol("echo_test", _EchoOptions)(lambda w, o, c: {})
    finally:
        protocols._PROTOCOLS.pop("echo_test", None)


def test_plan_errors_name_the_key(tmp_path):
    from selfdistill.eval.summary import build_plan, load_plan_file

    with pytest.raises(ValueError, match="linear.epochs"):
        build_plan(["linear"], {"linear": {"epochs": "many"}}, {"path": "a", "val_path": "b"})
    with pytest.raises(ValueError, match="did you mean 'linear.epochs'"):
        build_plan(["linear"], {"linear": {"epoch": 3}}, {"path": "a", "val_path": "b"})
    with pytest.raises(ValueError, match="retrieval.gnd"):
        build_plan(["retrieval"])
    with pytest.raises(ValueError, match=r"linear.train_path.*--data.path"):
        build_plan(["linear"])
    with pytest.raises(ValueError, match="unknown evaluation protocol 'nope'"):
        build_plan(["nope"])
    plan = tmp_path / "p.yaml"
    plan.write_text("protocols: [knn, copydetect]\nextra: 1\n")
    with pytest.raises(ValueError, match="unknown key"):
        load_plan_file(plan)
    plan.write_text("weights: w.safetensors\ndata: {path: a, val_path: b}\nprotocols: [knn, copydetect]\n")
    tree = load_plan_file(plan)
    assert tree["protocols"] == {"knn": {}, "copydetect": {}}
    with pytest.raises(ValueError, match="copydetect.path"):
        build_plan(list(tree["protocols"]), tree["protocols"], tree["data"])


def test_weights_from_a_bare_timm_file(tmp_path):
    """A timm state dict without selfdistill metadata (with its classifier) loads given --model.name."""
    import timm

    from selfdistill.config import ModelConfig
    from selfdistill.eval.protocols import Weights

    kw = {"depth": 2, "embed_dim": 32, "num_heads": 2}
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, num_classes=5, **kw).eval()
    path = tmp_path / "timm_vit.pth"
    torch.save({"state_dict": ref.state_dict()}, path)
    with pytest.raises(ValueError, match="--model.name"):
        Weights(str(path)).backbone()
    cfg = ModelConfig(name="vit_tiny_patch16_224", img_size=16, patch_size=4, drop_path_rate=0.0, kwargs=kw)
    x = torch.randn(2, 3, 16, 16)
    for fmt in ("timm", "selfdistill"):
        backbone = Weights(str(path), cfg, fmt).backbone()
        assert not any(p.requires_grad for p in backbone.parameters())
        with torch.no_grad():
            assert torch.allclose(backbone(x).pooled, ref.forward_head(ref.forward_features(x), pre_logits=True))
    with pytest.raises(ValueError, match="unknown"):
        Weights(str(path), cfg, "nope").backbone()
