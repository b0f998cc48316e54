"""A published recipe reads any source by changing ``data.path`` only: no recipe pins ``data.format``
(a pinned ``folder`` broke shard patterns and mangled ``s3://`` URLs into ``s3:/``), and an explicit
format that contradicts the path is refused in one line that names ``data.format`` and the detected
format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import make_image_folder, merged, tiny_overrides
from s3_server import s3_bucket, s3_server  # noqa: F401 - fixtures
from selfdistill.cli.shards import main as shards_main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "dino_vit_small16.yaml"


def _recipe_argv(data_path: str, out: Path, *extra: str) -> list[str]:
    """The published recipe with a tiny model, fp32 and two epochs; only ``data.path`` names the source."""
    tiny = tiny_overrides(data_path, out, **{"train.precision": "fp32", "data.shuffle_buffer": 8})
    return ["--config", str(RECIPE), *merged(tiny, *extra)]


def _shards(tmp_path: Path) -> Path:
    images = make_image_folder(tmp_path / "images", n_per_class=8)  # 16 images, 4 shards of 4
    out = tmp_path / "shards"
    assert shards_main(["write", "--folder", str(images), "--out", str(out), "--samples-per-shard", "4",
                        "--no-progress"]) == 0
    return out


def _trained_steps(out: Path) -> list[int]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def test_no_recipe_pins_a_format():
    pinned = [p.name for p in sorted((ROOT / "configs").glob("*.yaml"))
              if "format" in ((yaml.safe_load(p.read_text()) or {}).get("data") or {})]
    assert pinned == []


@pytest.mark.slow
@pytest.mark.parametrize("source", ["brace_pattern", "shard_directory", "s3_prefix"])
def test_the_dino_recipe_trains_from_shards_by_changing_data_path_only(source, request, tmp_path,
                                                                       fresh_accelerate_state):
    from selfdistill.cli.pretrain import main as pretrain

    shards = _shards(tmp_path)
    extra: list[str] = []
    if source == "brace_pattern":  # no _info.json: the epoch size is given
        path, extra = f"{shards}/shard-{{000000..000003}}.tar", ["data.samples_per_epoch=16"]
    elif source == "shard_directory":
        path = str(shards)
    else:
        path = request.getfixturevalue("s3_bucket").upload(shards, "imagenet/train")
        assert path.startswith("s3://") and path.endswith("/imagenet/train/")
    out = tmp_path / "run"
    assert pretrain(_recipe_argv(path, out, *extra)) == 0
    assert _trained_steps(out) == [1, 2, 3, 4]  # 16 images / batch 8 x 2 epochs
    resolved = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert resolved["path"] == path and resolved["format"] == "auto"  # the URL kept intact
    assert (out / "export" / "teacher_backbone.safetensors").is_file()


@pytest.mark.parametrize("given, path, detected", [
    ("folder", "s3://bucket/imagenet/train/", "wds"),
    ("folder", "shards/train/shard-{000000..000005}.tar", "wds"),
    ("hf", "SHARDS", "wds"),
])
def test_a_wrong_explicit_format_is_one_line(given, path, detected, tmp_path, capsys, fresh_accelerate_state):
    from selfdistill.cli.pretrain import main as pretrain

    if path == "SHARDS":
        path = str(_shards(tmp_path))
    out = tmp_path / "run"
    code = pretrain(_recipe_argv(path, out, f"data.format={given}"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err and not out.exists(), err
    assert err.endswith(f"data.format: {given!r} but data.path {path!r} is {detected!r} by detection; leave "
                        f"data.format at 'auto' (the default) or set it to {detected!r}"), err
