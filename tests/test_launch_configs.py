"""The launch configs users copy: they parse, point at files that exist, and never repeat what the
DeepSpeed JSON owns (Accelerate refuses that)."""

import json
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from selfdistill.engine.distributed import DEEPSPEED_OWNED_KEYS, check_deepspeed_launch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_config(path):
    cfg = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    if raw["distributed_type"] == "DEEPSPEED":
        ds = raw["deepspeed_config"]
        assert (ROOT / ds["deepspeed_config_file"]).is_file()
        assert not set(DEEPSPEED_OWNED_KEYS) & set(raw) and not set(DEEPSPEED_OWNED_KEYS) & set(ds), path.name
    assert cfg.num_processes >= 1


@pytest.mark.parametrize("path", sorted((ROOT / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_json(path):
    cfg = json.loads(path.read_text())
    assert "optimizer" not in cfg and "scheduler" not in cfg  # named groups + our schedules stay in control
    # Pretraining JSONs pin DINO's 3.0; the fine-tuning one leaves "auto", which configure_deepspeed
    # replaces by the recipe's optim.clip_grad (DeepSpeed alone would silently make it 1.0).
    assert cfg["gradient_clipping"] == ("auto" if path.name.startswith("finetune") else 3.0)
    for key, value in cfg["zero_optimization"].items():
        assert value != "auto", f"{key}: timm models have no model.config, so 'auto' sizes fail"


def test_deepspeed_launch_errors(monkeypatch):
    """What accelerate launch exports for a YAML that repeats DeepSpeed keys, and --cpu: one-line errors."""
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds_configs/zero2.json")
    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", "deepspeed_config_file,gradient_clipping,zero3_init_flag")
    with pytest.raises(ValueError, match="repeats gradient_clipping, which the DeepSpeed JSON ds_configs/zero2.json owns"):
        check_deepspeed_launch(cpu=False)
    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", "deepspeed_config_file,zero3_init_flag")
    check_deepspeed_launch(cpu=False)  # a clean YAML passes
    with pytest.raises(ValueError, match="train.cpu=true .* cannot be combined with DeepSpeed"):
        check_deepspeed_launch(cpu=True)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(ValueError, match="cannot be combined with DeepSpeed"):
        check_deepspeed_launch(cpu=False)


def test_deepspeed_values_filled_or_checked_against_the_recipe():
    from types import SimpleNamespace

    from selfdistill.engine.distributed import configure_deepspeed

    def accelerator(config):
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))

    conf = json.loads((ROOT / "ds_configs/zero2.json").read_text())
    configure_deepspeed(accelerator(conf), 32, 3.0, "bf16")
    assert conf["train_micro_batch_size_per_gpu"] == 32
    fp16 = json.loads((ROOT / "ds_configs/zero3_fp16.json").read_text())
    configure_deepspeed(accelerator(fp16), 8, 3.0, "fp16")
    with pytest.raises(ValueError, match="bf16.enabled=false but train.precision=bf16"):
        configure_deepspeed(accelerator(fp16), 8, 3.0, "bf16")
    with pytest.raises(ValueError, match="gradient_clipping=3.0 but optim.clip_grad=1.0"):
        configure_deepspeed(accelerator(conf), 32, 1.0, "fp32")
    conf["train_micro_batch_size_per_gpu"] = 16
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=16 but train.batch_size_per_device=32"):
        configure_deepspeed(accelerator(conf), 32, 3.0, "fp32")
