"""The launch configs users copy: they parse, point at files that exist, and never repeat what the
DeepSpeed JSON owns (Accelerate refuses that)."""

import json
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

ROOT = Path(__file__).resolve().parents[1]
DS_OWNED = {"gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device",
            "offload_param_device", "zero3_save_16bit_model", "mixed_precision"}


@pytest.mark.parametrize("path", sorted((ROOT / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_config(path):
    cfg = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    if raw["distributed_type"] == "DEEPSPEED":
        ds = raw["deepspeed_config"]
        assert (ROOT / ds["deepspeed_config_file"]).is_file()
        assert not DS_OWNED & set(raw) and not DS_OWNED & set(ds), path.name
    assert cfg.num_processes >= 1


@pytest.mark.parametrize("path", sorted((ROOT / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_json(path):
    cfg = json.loads(path.read_text())
    assert "optimizer" not in cfg and "scheduler" not in cfg  # named groups + our schedules stay in control
    assert cfg["gradient_clipping"] == 3.0  # "auto" would silently become 1.0
    for key, value in cfg["zero_optimization"].items():
        assert value != "auto", f"{key}: timm models have no model.config, so 'auto' sizes fail"
