"""One door to image data: one rule tells a path's format, and training, evaluation and the shard
writer accept or refuse a directory the same way."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_image_folder, tiny_overrides


def test_one_rule_tells_the_format(tmp_path):
    from selfdistill.data import detect_format
    from selfdistill.data.shard_inputs import folder_input
    from selfdistill.data.shard_writer import write_shards

    folder = make_image_folder(tmp_path / "img", n_per_class=2)
    write_shards(tmp_path / "shards", folder_input(folder), samples_per_shard=2, progress=False)
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "a.tar").write_bytes(b"")
    assert detect_format(str(folder)) == "folder"
    assert detect_format(str(tmp_path / "shards")) == "wds"
    assert detect_format(str(tmp_path / "bare")) == "wds"
    for stream in ("pipe:cat a.tar", "s3://bucket/train-{000..009}.tar", "https://host/x.tar", "a.tar::b.tar"):
        assert detect_format(stream) == "wds"
    pytest.importorskip("datasets")
    (tmp_path / "parquet" / "data").mkdir(parents=True)
    (tmp_path / "parquet" / "data" / "train-0.parquet").write_bytes(b"")
    assert detect_format(str(tmp_path / "parquet")) == "hf"


def _parquet(folder: Path, out: Path, image_column: str = "image") -> Path:
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    if image_column != "image":
        ds = ds.rename_column("image", image_column)
    out.mkdir(parents=True)
    ds.to_parquet(str(out / "train.parquet"))
    return out


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_parquet_directory_is_accepted_and_refused_alike_by_training_evaluation_and_the_writer(tmp_path):
    pytest.importorskip("datasets")
    from selfdistill.data import open_images
    from selfdistill.data.shard_inputs import hf_input
    from selfdistill.data.shard_writer import write_shards
    from selfdistill.pretrain import pretraining
    from selfdistill.recipe import load_config

    folder = make_image_folder(tmp_path / "img")
    good = _parquet(folder, tmp_path / "good")
    # training (format detected), evaluation (labelled images), the shard writer
    pretraining(load_config(None, tiny_overrides(good, tmp_path / "run", **{"train.max_steps": 1}))).fit()
    assert (tmp_path / "run" / "export" / "teacher_backbone.safetensors").is_file()
    images = open_images(str(good), labelled=True)
    assert images.source.format == "hf" and len(images) == 32 and images.classes == ["a", "b"]
    info = write_shards(tmp_path / "shards", hf_input(good), samples_per_shard=8, progress=False)
    assert info["total_samples"] == 32 and info["class_names"] == ["a", "b"]

    bad = _parquet(folder, tmp_path / "bad", image_column="picture")
    errors = []
    with pytest.raises(ValueError) as e:
        pretraining(load_config(None, tiny_overrides(bad, tmp_path / "run2"))).fit()
    errors.append(str(e.value))
    with pytest.raises(ValueError) as e:
        open_images(str(bad), labelled=True)
    errors.append(str(e.value))
    with pytest.raises(ValueError) as e:
        hf_input(bad)
    errors.append(str(e.value))
    assert all("no image column 'image'" in m and "picture" in m for m in errors), errors
