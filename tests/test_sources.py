"""Training sources: webdataset shards (exact and resampled), HF datasets, bad input."""

from __future__ import annotations

import io
import os
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import make_image_folder, tiny_overrides
from selfdistill.data import object_store
from selfdistill.data.sources import ShardSource, ShardStream, expand_urls

wds = pytest.importorskip("webdataset")


def jpeg_bytes(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(root: Path, n_shards: int, per_shard: int, corrupt: set[int] = frozenset()) -> list[str]:
    """``n_shards`` tars of ``per_shard`` labelled JPEGs keyed by global index; ``corrupt`` indices
    get bytes that are not an image."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = root / f"shard-{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(s * per_shard, (s + 1) * per_shard):
                data = b"\xff\xd8\xff\xe0 broken jpeg" if i in corrupt else jpeg_bytes(i)
                sink.write({"__key__": f"{i:09d}", "jpg": data, "cls": str(i % 3).encode()})
        paths.append(str(path))
    info = {"format": "selfdistill-shards/1", "shards": [{"name": Path(p).name, "samples": per_shard} for p in paths],
            "total_samples": n_shards * per_shard, "class_names": ["a", "b", "c"]}
    (root / "_info.json").write_text(json.dumps(info))
    return paths


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img.resize((8, 8)))).permute(2, 0, 1).float()


def read_all(stream: ShardStream, workers: int) -> list[dict]:
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return list(loader)


def test_exact_mode_reads_every_sample_once_over_ranks_and_workers(tmp_path):
    urls = write_shards(tmp_path / "s", n_shards=8, per_shard=5)
    seen = []
    for rank in (0, 1):
        stream = ShardStream(urls, to_tensor, rank, 2, seed=0, resampled=False)
        samples = read_all(stream, workers=2)
        seen += [(s["index"], s["label"]) for s in samples]
    assert sorted(i for i, _ in seen) == list(range(40))
    assert all(label == i % 3 for i, label in seen)


def test_two_ranks_two_workers_get_the_same_number_of_batches(tmp_path):
    write_shards(tmp_path / "s", n_shards=4, per_shard=7)  # unequal split of 28 samples is no problem
    counts = []
    for rank in (0, 1):
        source = ShardSource(str(tmp_path / "s"), to_tensor, batch_size=3, rank=rank, world_size=2, seed=0,
                             num_workers=2, collate_fn=_stack)
        assert source.batches_per_epoch == 28 // 6
        for epoch in (0, 1):
            counts.append(sum(1 for _ in source.loader(epoch)))
    assert counts == [4, 4, 4, 4]


def _stack(samples):
    return {"image": torch.stack([s["image"] for s in samples]), "index": torch.tensor([s["index"] for s in samples]),
            "bad": [b for s in samples for b in s["bad"]]}


def test_too_few_shards_for_the_readers_is_a_clear_error(tmp_path):
    write_shards(tmp_path / "s", n_shards=3, per_shard=4)
    with pytest.raises(ValueError, match=r"3 shards for 2 ranks x 2 loader workers = 4 readers"):
        ShardSource(str(tmp_path / "s"), to_tensor, 2, 0, 2, 0, 2, _stack)


def test_corrupt_sample_is_skipped_counted_and_named(tmp_path):
    urls = write_shards(tmp_path / "s", n_shards=2, per_shard=5, corrupt={3})
    samples = read_all(ShardStream(urls, to_tensor, 0, 1, seed=0, resampled=False), workers=0)
    assert sorted(s["index"] for s in samples) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    bad = [b for s in samples for b in s["bad"]]
    assert bad == [f"{urls[0]}:000000003"]
    # the damaged member was a draw of its own: 10 members read, 1 of them bad
    assert (sum(s["draws"] for s in samples), sum(s["bad_draws"] for s in samples)) == (10, 1)


def test_missing_shards_are_skipped_up_to_a_limit(tmp_path, caplog):
    write_shards(tmp_path / "s", n_shards=4, per_shard=3)
    (tmp_path / "s" / "shard-000002.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 4 shards are missing"):
        ShardSource(str(tmp_path / "s"), to_tensor, 2, 0, 1, 0, 0, _stack, max_missing_fraction=0.1)
    source = ShardSource(str(tmp_path / "s"), to_tensor, 2, 0, 1, 0, 0, _stack, max_missing_fraction=0.3)
    assert len(source.urls) == 3 and "1 of 4 shards are missing" in caplog.text
    assert sum(1 for _ in source.loader(0)) == source.batches_per_epoch == 6
    # A shard that disappears after start-up is retried, then skipped while others still read.
    stream = ShardStream([*source.urls, str(tmp_path / "gone.tar")], to_tensor, 0, 1, 0, resampled=False, retries=1)
    assert len(read_all(stream, workers=0)) == 9
    assert "gone.tar unreadable after 2 tries" in caplog.text


def test_pipe_urls_and_patterns(tmp_path):
    urls = write_shards(tmp_path / "s", n_shards=3, per_shard=2)
    pattern = str(tmp_path / "s" / "shard-{000000..000002}.tar")
    assert expand_urls(pattern) == urls
    assert expand_urls(str(tmp_path / "s")) == urls  # the directory's _info.json
    piped = [f"pipe:cat {u}" for u in urls]
    local = read_all(ShardStream(urls, to_tensor, 0, 1, 0, resampled=False), 0)
    through_pipe = read_all(ShardStream(piped, to_tensor, 0, 1, 0, resampled=False), 0)
    assert [s["index"] for s in through_pipe] == [s["index"] for s in local]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(local, through_pipe))
    with pytest.raises(ValueError, match="empty shard pattern"):
        expand_urls(" ")
    with pytest.raises(FileNotFoundError, match="matches no existing shard"):
        expand_urls(str(tmp_path / "nothing-{0..3}.tar"))


def test_dino_trains_from_shards(tmp_path):
    from selfdistill.recipe import load_config
    from selfdistill.pretrain import pretraining

    write_shards(tmp_path / "s", n_shards=4, per_shard=8)
    out = tmp_path / "run"
    config = load_config(None, tiny_overrides(tmp_path / "s", out, **{"data.format": "wds", "data.num_workers": 2}))
    pretraining(config).fit()
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]  # 32 samples / batch 8, 2 epochs
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_hf_imagefolder_trains_like_a_folder(tmp_path):
    pytest.importorskip("datasets")
    from selfdistill.recipe import load_config
    from selfdistill.data.folder import ImageFolderDataset
    from selfdistill.data.hf import HFImageDataset
    from selfdistill.pretrain import pretraining

    data = make_image_folder(tmp_path / "img")
    hf = HFImageDataset(str(data))
    folder = ImageFolderDataset(data)
    assert len(hf) == len(folder) and hf.classes == folder.classes
    assert sorted(hf.targets) == sorted(folder.targets)
    sample = hf[(1, 3)]
    assert sample["index"] == 3 and sample["label"] in (0, 1) and sample["image"].size == (24, 24)
    out = tmp_path / "run"
    pretraining(load_config(None, tiny_overrides(data, out, **{"data.format": "hf"}))).fit()
    assert (out / "export" / "student_backbone.safetensors").is_file()


def test_reduced_size_jpeg_decoding(tmp_path):
    from selfdistill.data.folder import decode_rgb

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8))
    img.save(tmp_path / "x.jpg", quality=90)
    img.save(tmp_path / "x.png")
    assert decode_rgb(tmp_path / "x.jpg").size == (500, 375)
    assert decode_rgb(tmp_path / "x.jpg", draft_size=160).size == (250, 188)  # 1/2 scale: shorter side >= 160
    assert decode_rgb(tmp_path / "x.jpg", draft_size=90).size == (125, 94)  # 1/4
    assert decode_rgb(tmp_path / "x.png", draft_size=90).size == (500, 375)  # only JPEG has DCT scales


def test_preprocessed_folder_streams_every_image_once(tmp_path):
    from selfdistill.data.shard_inputs import folder_input
    from selfdistill.data.shard_writer import write_shards as preprocess

    data = make_image_folder(tmp_path / "img", n_per_class=9)
    preprocess(tmp_path / "shards", folder_input(data), samples_per_shard=4, progress=False)
    urls = expand_urls(str(tmp_path / "shards"))
    assert len(urls) == 5
    samples = [s for rank in (0, 1) for s in read_all(ShardStream(urls, to_tensor, rank, 2, 0, resampled=False), 2)]
    assert sorted(s["index"] for s in samples) == list(range(18))
    assert sorted(s["label"] for s in samples) == [0] * 9 + [1] * 9


def test_knn_from_shards_equals_knn_from_folders(tmp_path):
    from selfdistill.recipe import load_config
    from selfdistill.data.shard_inputs import folder_input
    from selfdistill.data.shard_writer import write_shards as preprocess
    from selfdistill.eval.knn_eval import KnnSetup, pixel_features

    train = make_image_folder(tmp_path / "train", n_per_class=6)
    val = make_image_folder(tmp_path / "val", n_per_class=3, seed=1)
    for name, folder in (("train", train), ("val", val)):
        preprocess(tmp_path / f"{name}_shards", folder_input(folder), samples_per_shard=4, progress=False)

    def results(train_path, val_path):
        config = load_config(None, [f"data.path={train_path}", f"knn.val_path={val_path}", "knn.image_size=16",
                                    "knn.k=[1, 3]", "data.num_workers=2"])
        return KnnSetup.from_config(config).evaluate_features(pixel_features)

    from_folders = results(train, val)
    assert results(tmp_path / "train_shards", tmp_path / "val_shards") == from_folders
    assert from_folders[1]["top1"] == 100.0


def test_s3_urls_stream_through_s5cmd(tmp_path, monkeypatch):
    """s3:// shards are read through `s5cmd cat` (here a stand-in script serving a local copy; the
    real clients against a real server: test_object_store.py)."""
    urls = write_shards(tmp_path / "bucket" / "train", n_shards=2, per_shard=3)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "s5cmd"
    fake.write_text(f'#!/bin/sh\n[ "$1" = cat ] || exit 2\nexec cat "{tmp_path}/bucket/${{2#s3://}}"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    for name in ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"):  # else the client gets --endpoint-url first
        monkeypatch.delenv(name, raising=False)
    # The stand-in serves no endpoint to probe (the probe against a real server: test_object_store.py).
    monkeypatch.setattr(object_store, "check_endpoint", lambda *args, **kwargs: None)
    remote = expand_urls("s3://train/shard-{000000..000001}.tar")
    assert remote == ["pipe:s5cmd cat s3://train/shard-000000.tar", "pipe:s5cmd cat s3://train/shard-000001.tar"]
    got = read_all(ShardStream(remote, to_tensor, 0, 1, 0, resampled=False), 0)
    want = read_all(ShardStream(urls, to_tensor, 0, 1, 0, resampled=False), 0)
    assert [s["index"] for s in got] == [s["index"] for s in want] == list(range(6))
