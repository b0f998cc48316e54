import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selfdistill.configkit import ConfigError
from selfdistill.recipe import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_key_names_key_and_closest():
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo.yaml", ["optim.lrr=1e-3"])
    msg = str(e.value)
    assert "\n" not in msg and "'optim.lrr'" in msg and "'optim.lr'" in msg


def test_unknown_section_and_method():
    with pytest.raises(ConfigError, match="unknown section 'optm'.*'optim'"):
        load_config(None, ["optm.lr=1"])
    with pytest.raises(ConfigError, match="method.name: unknown method 'dinoo'.*'dino'"):
        load_config(None, ["method.name=dinoo"])


def test_wrong_type_is_one_line_error():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.batch_size_per_device=abc"])
    assert str(e.value) == "config error: train.batch_size_per_device: expected an integer, got 'abc'"
    with pytest.raises(ConfigError, match="data.global_crop_scale: expected a list of 2 values"):
        load_config(None, ["data.global_crop_scale=0.4"])


def test_impossible_values():
    with pytest.raises(ConfigError, match="data.local_crop_scale"):
        load_config(None, ["data.local_crop_scale=[0.5, 0.1]"])
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="method.teacher_temp: must be positive"):
        load_config(None, ["method.teacher_temp=0"])


def test_overrides_and_yaml_numbers():
    cfg = load_config(ROOT / "configs/dino_vit_small16.yaml", ["optim.lr=1e-3", "data.path=/x", "model.img_size=null"])
    assert cfg.optim.lr == 1e-3 and cfg.data.path == "/x" and cfg.model.img_size is None
    assert isinstance(cfg.optim.min_lr, float)


def test_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(ROOT / "configs/demo.yaml")
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p) == cfg


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                                           if not p.name.startswith("finetune_")))  # test_finetune loads those
def test_every_recipe_loads(recipe):
    load_config(ROOT / "configs" / recipe)


def test_print_config_shows_paper_recipe():
    out = subprocess.run([sys.executable, str(ROOT / "run_pretrain.py"), "--config",
                          str(ROOT / "configs/dino_vit_small16.yaml"), "--print-config"],
                         capture_output=True, text=True, check=True).stdout
    cfg = yaml.safe_load(out)
    assert cfg["model"]["name"] == "vit_small_patch16_224"
    assert cfg["method"]["out_dim"] == 65536 and cfg["method"]["momentum_teacher"] == 0.996
    assert (cfg["method"]["warmup_teacher_temp"], cfg["method"]["teacher_temp"]) == (0.04, 0.07)
    assert cfg["data"]["n_local_crops"] == 10 and cfg["data"]["local_crop_size"] == 96
    assert cfg["optim"]["lr"] == 5e-4 and cfg["optim"]["warmup_epochs"] == 10
    assert (cfg["optim"]["weight_decay"], cfg["optim"]["weight_decay_end"]) == (0.04, 0.4)
    assert cfg["train"]["epochs"] == 100 and cfg["train"]["batch_size_per_device"] == 64


def test_cli_config_error_exit_code():
    r = subprocess.run([sys.executable, str(ROOT / "run_pretrain.py"), "optim.lr=abc"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "config error: optim.lr: expected a number, got 'abc'"


def test_numbers_are_accepted_for_strings_but_not_the_reverse():
    cfg = load_config(None, ["train.output_dir=2024"])
    assert cfg.train.output_dir == "2024"
    with pytest.raises(ConfigError, match="train.log_every: expected an integer"):
        load_config(None, ["train.log_every=1.5"])
    with pytest.raises(ConfigError, match="method.norm_last_layer: expected true/false"):
        load_config(None, ["method.norm_last_layer=1"])


def test_model_kwargs_without_values_are_refused():
    with pytest.raises(ConfigError, match=r"model.kwargs: 'depth:2' has no value"):
        load_config(None, ["model.kwargs={depth:2}"])
    assert load_config(None, ["model.kwargs={depth: 2}"]).model.kwargs == {"depth": 2}


def test_timm_names_are_checked_with_the_closest_names_and_tags_refused():
    with pytest.raises(ConfigError, match=r"model.name: unknown timm model 'vit_smal_patch16_224' "
                                          r"\(closest: vit_small_patch16_224"):
        load_config(None, ["model.name=vit_smal_patch16_224"])
    with pytest.raises(ConfigError, match=r"pretrained tag 'dino'.*model.name=vit_small_patch16_224 .*model.pretrained"):
        load_config(None, ["model.name=vit_small_patch16_224.dino"])
    with pytest.raises(ConfigError, match=r"method.teacher_model: unknown timm model 'resnet5O'"):
        load_config(None, ["method.name=smd", "method.teacher_model=resnet5O", "method.teacher_weights=w"])


def test_recipes_build_on_a_base_and_stack(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("model:\n  name: vit_tiny_patch16_224\n  kwargs: {depth: 4, embed_dim: 96}\n"
                                        "optim:\n  lr: 1.0e-3\n  min_lr: 1.0e-5\n")
    (tmp_path / "sub" / "child.yaml").write_text("base: ../base.yaml\noptim:\n  lr: 2.0e-3\nmodel:\n  kwargs: {depth: 2}\n")
    (tmp_path / "extra.yaml").write_text("optim:\n  min_lr: 0.0\n")
    sources: dict[str, str] = {}
    c = load_config([tmp_path / "sub" / "child.yaml", tmp_path / "extra.yaml"], ["train.epochs=3"], sources)
    assert c.model.name == "vit_tiny_patch16_224" and c.model.kwargs == {"depth": 2}  # a value replaces the base's
    assert (c.optim.lr, c.optim.min_lr, c.train.epochs) == (2e-3, 0.0, 3)
    assert sources["model.name"].endswith("base.yaml") and sources["optim.lr"].endswith("child.yaml")
    assert sources["optim.min_lr"].endswith("extra.yaml") and sources["train.epochs"] == "override"

    (tmp_path / "loop_a.yaml").write_text("base: loop_b.yaml\n")
    (tmp_path / "loop_b.yaml").write_text("base: loop_a.yaml\n")
    with pytest.raises(ConfigError, match="recipe bases form a loop"):
        load_config(tmp_path / "loop_a.yaml")
    (tmp_path / "orphan.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml' does not exist \(the base of .*orphan.yaml"):
        load_config(tmp_path / "orphan.yaml")


def test_an_override_given_twice_is_an_error():
    with pytest.raises(ConfigError, match=r"optim.lr is overridden twice .*give it once"):
        load_config(None, ["optim.lr=1e-3", "train.epochs=2", "optim.lr=2e-3"])


def test_patchwise_recipe_is_the_dino_recipe_with_three_keys_changed():
    root = Path(__file__).resolve().parents[1] / "configs"
    dino, pw = (load_config(root / f"{n}.yaml").to_dict() for n in ("dino_vit_small16", "patchwise_dino_vit_small16"))
    changed = {(s, k) for s in dino for k in dino[s] if k in pw[s] and dino[s][k] != pw[s][k]}
    assert changed == {("method", "name"), ("method", "out_dim"), ("train", "output_dir")}


def test_print_config_says_where_each_value_came_from(tmp_path):
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "run_pretrain.py"), "--config",
                        str(root / "configs/patchwise_dino_vit_small16.yaml"), "optim.lr=1e-3", "--print-config"],
                       capture_output=True, text=True, check=True)
    lines = r.stdout.splitlines()
    assert any(l.startswith("  name: patchwise_dino  # ") and l.endswith("patchwise_dino_vit_small16.yaml") for l in lines)
    assert any(l.startswith("  head_hidden_dim: 2048  # ") and l.endswith("dino_vit_small16.yaml") for l in lines)
    assert "  lr: 0.001  # override" in lines and "  n_global_crops: 2  # default" in lines
    printed = yaml.safe_load(r.stdout)  # still a recipe
    (tmp_path / "saved.yaml").write_text(r.stdout)
    assert load_config(tmp_path / "saved.yaml").to_dict() == printed
