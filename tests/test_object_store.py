"""s3:// shards against a real S3-compatible server (moto) through the real clients (s5cmd, aws):
training and kNN from an uploaded shard directory, brace patterns, a missing shard, a dead endpoint."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import make_image_folder, merged, tiny_overrides
from s3_server import free_port, s3_bucket, s3_server, use_client  # noqa: F401 - fixtures
from test_shards import same_output
from selfdistill.cli.shards import main as shards_main
from selfdistill.data import object_store
from selfdistill.data.sources import ShardStream, expand_urls

CLIENTS = ["s5cmd", "aws"]


def write_shard_dir(images: Path, out: Path, per_shard: int = 4) -> Path:
    assert shards_main(["write", "--folder", str(images), "--out", str(out), "--samples-per-shard", str(per_shard),
                        "--no-progress"]) == 0
    return out


def only_endpoint_variable(client: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Leave each client the variable it does *not* read itself (s5cmd reads S3_ENDPOINT_URL, the
    AWS CLI AWS_ENDPOINT_URL): passes only if the project passes the endpoint explicitly."""
    monkeypatch.delenv("S3_ENDPOINT_URL" if client == "s5cmd" else "AWS_ENDPOINT_URL")


def indices(stream: ShardStream) -> list[int]:
    return sorted(s["index"] for s in stream)


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
def test_train_and_knn_from_an_s3_shard_directory(client, s3_bucket, tmp_path, monkeypatch,  # noqa: F811
                                                  fresh_accelerate_state):
    from selfdistill.eval.knn_eval import KnnSetup, pixel_features
    from selfdistill.pretrain import pretraining
    from selfdistill.recipe import load_config

    train = make_image_folder(tmp_path / "train", n_per_class=8)
    val = make_image_folder(tmp_path / "val", n_per_class=3, seed=1)
    train_url = s3_bucket.upload(write_shard_dir(train, tmp_path / "train_shards"), "data/train")
    val_url = s3_bucket.upload(write_shard_dir(val, tmp_path / "val_shards"), "data/val").rstrip("/")  # both forms
    use_client(client, tmp_path, monkeypatch)
    only_endpoint_variable(client, monkeypatch)

    urls = expand_urls(train_url)
    assert len(urls) == 4 and all(u.startswith(f"pipe:{client} --endpoint-url ") for u in urls)
    assert indices(ShardStream(urls, None, 0, 1, 0, resampled=False)) == list(range(16))
    pattern = f"s3://{s3_bucket.name}/data/train/shard-{{000000..000003}}.tar"  # a brace pattern reads the same
    assert indices(ShardStream(expand_urls(pattern), None, 0, 1, 0, resampled=False)) == list(range(16))

    out = tmp_path / "run"  # 16 samples (from the remote _info.json) / batch 8 x 2 epochs
    # a small shuffle buffer: the default 1000 would open 250 four-image shards before the first batch
    pretraining(load_config(None, tiny_overrides(train_url, out, **{"data.shuffle_buffer": 8}))).fit()
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)

    def knn(train_path, val_path):
        setup = KnnSetup.open(str(train_path), str(val_path), [1, 3], image_size=16, batch_size=8, num_workers=0)
        return setup.evaluate_features(pixel_features)

    assert knn(train_url, val_url) == knn(tmp_path / "train_shards", tmp_path / "val_shards")


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
def test_missing_shard_is_retried_skipped_and_named(client, s3_bucket, tmp_path, monkeypatch, caplog,  # noqa: F811
                                                    fresh_accelerate_state):
    from selfdistill.cli.pretrain import main as pretrain

    shards = write_shard_dir(make_image_folder(tmp_path / "img", n_per_class=8), tmp_path / "shards")
    url = s3_bucket.upload(shards, "train")
    s3_bucket.delete("train/shard-000002.tar")  # still listed in _info.json
    use_client(client, tmp_path, monkeypatch)
    reason = "given object s3://{}/train/shard-000002.tar not found" if client == "s5cmd" else "(404)"

    missing = f"s3://{s3_bucket.name}/train/shard-000002.tar"

    caplog.set_level(logging.WARNING)
    samples = list(ShardStream(expand_urls(url), None, 0, 1, 0, resampled=False, retries=1))
    assert sorted(s["index"] for s in samples) == [i for i in range(16) if i // 4 != 2]  # the others read whole
    assert [b for s in samples for b in s["bad"]] == [missing]  # an unreadable file, not an image draw
    assert sum(s["bad_draws"] for s in samples) == 0
    warning = next(r.getMessage() for r in caplog.records if "unreadable after" in r.getMessage())
    assert f"{missing} unreadable after 2 tries, skipped" in warning
    assert f"{client} exited with status 1" in warning and reason.format(s3_bucket.name) in warning

    # Training skips it within data.max_missing_shards and counts it in log.jsonl's bad_images.
    out = tmp_path / "skip"
    assert pretrain(merged(tiny_overrides(url, out), "data.shard_retries=0", "data.max_missing_shards=0.9",
                           "data.shuffle_buffer=8")) == 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(rows) == 4 and rows[-1]["bad_images"] == 1

    # Nothing readable: the run stops with one line naming the client's reason (from a loader worker).
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000003.tar"):
        s3_bucket.delete(f"train/{name}")
    caplog.clear()
    argv = merged(tiny_overrides(url, tmp_path / "run"), "data.num_workers=2", "data.shard_retries=0")
    assert pretrain(argv) == 1
    error = next(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert error.startswith("none of the 3 shards opened so far could be read; last: ")
    assert "\n" not in error and f"{client} exited with status 1" in error

    with pytest.raises(object_store.ObjectStoreError, match=r"needs its _info.json .*brace pattern"):
        expand_urls(f"s3://{s3_bucket.name}/nothing/")


@pytest.mark.parametrize("client", CLIENTS)
def test_unreachable_endpoint_is_one_line(client, tmp_path, monkeypatch, caplog, fresh_accelerate_state):
    """A closed port fails at start-up in a second (the clients would retry for up to a minute)."""
    from selfdistill.cli.pretrain import main as pretrain

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("S3_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # S3_ENDPOINT_URL comes first
    use_client(client, tmp_path, monkeypatch)
    for path in ("s3://bucket/train/", "s3://bucket/train/shard-{000000..000003}.tar"):
        caplog.clear()
        assert pretrain(tiny_overrides(path, tmp_path / "run")) == 1
        error = next(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        assert error == f"S3_ENDPOINT_URL={dead}: the object store does not answer (Connection refused)"


def test_endpoint_reaches_both_clients_explicitly(tmp_path, monkeypatch):
    """s5cmd first, else aws; the endpoint variable (S3_ENDPOINT_URL first) as --endpoint-url."""
    monkeypatch.delenv("S3_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("s5cmd", "aws"):
        (bin_dir / tool).write_text("#!/bin/sh\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert object_store.to_pipe("s3://b/x.tar") == "pipe:s5cmd cat s3://b/x.tar"
    assert object_store.to_pipe("/data/x.tar") == "/data/x.tar"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert object_store.to_pipe("s3://b/x.tar") == "pipe:s5cmd --endpoint-url http://127.0.0.1:9000 cat s3://b/x.tar"
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9001")
    (bin_dir / "s5cmd").unlink()
    assert object_store.to_pipe("s3://b/x.tar") == "pipe:aws --endpoint-url http://127.0.0.1:9001 s3 cp s3://b/x.tar -"
    monkeypatch.delenv("S3_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert object_store.to_pipe("s3://b/x.tar") == "pipe:aws s3 cp s3://b/x.tar -"  # the client's default
    (bin_dir / "aws").unlink()
    with pytest.raises(object_store.ObjectStoreError, match="needs s5cmd or the AWS CLI on PATH"):
        object_store.to_pipe("s3://b/x.tar")


def download(bucket, prefix: str, to: Path) -> Path:
    to.mkdir(parents=True)
    bucket.client("cp", f"s3://{bucket.name}/{prefix}/*", f"{to}/")
    return to


def failing_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, victim: str) -> Path:
    """An s5cmd on PATH that fails the first upload of ``victim`` (then runs the real one); each
    upload it sees is logged."""
    from s3_server import VENV_BIN

    bin_dir = tmp_path / "flaky-bin"
    bin_dir.mkdir()
    log, mark = tmp_path / "uploads.log", tmp_path / "failed-once"
    (bin_dir / "s5cmd").write_text(
        "#!/bin/sh\n"
        f'if [ "$3" = cp ]; then echo "$5" >> {log}; fi\n'
        f'case "$5" in *{victim}) if [ ! -e {mark} ]; then touch {mark}; echo "ERROR: simulated 503" >&2; '
        'exit 1; fi;; esac\n'
        f'exec {VENV_BIN / "s5cmd"} "$@"\n')
    (bin_dir / "s5cmd").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


@pytest.mark.slow
def test_shards_written_to_s3_equal_the_local_write_and_train(s3_bucket, tmp_path, monkeypatch,  # noqa: F811
                                                              fresh_accelerate_state):
    from selfdistill.pretrain import pretraining
    from selfdistill.recipe import load_config

    images = make_image_folder(tmp_path / "img", n_per_class=8)
    local = write_shard_dir(images, tmp_path / "local" / "train")
    log = failing_once(tmp_path, monkeypatch, "shard-000001.tar")
    url = f"s3://{s3_bucket.name}/data/train/"
    stage = tmp_path / "stage"
    assert shards_main(["write", "--folder", str(images), "--out", url, "--staging", str(stage), "--delete-local",
                        "--samples-per-shard", "4", "--no-progress"]) == 0

    uploads = [line.rsplit("/", 1)[1] for line in log.read_text().splitlines()]
    assert sorted(uploads[:5]) == sorted([f"shard-00000{i}.tar" for i in range(4)] + ["shard-000001.tar"])
    assert uploads[5:] == ["wids-index.json", "_info.json"]  # the failed upload was retried; _info.json last
    assert sorted(p.name for p in stage.iterdir()) == ["_info.json", "wids-index.json"]  # shards deleted locally
    same_output(download(s3_bucket, "data/train", tmp_path / "downloaded"), local)

    out = tmp_path / "run"
    pretraining(load_config(None, tiny_overrides(url, out, **{"data.shuffle_buffer": 8}))).fit()
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)


def test_s3_write_resumes_after_a_kill_without_uploading_again(s3_bucket, tmp_path, monkeypatch):  # noqa: F811
    from selfdistill.data import shard_output

    images = make_image_folder(tmp_path / "img", n_per_class=8)
    local = write_shard_dir(images, tmp_path / "local" / "train")
    url = f"s3://{s3_bucket.name}/part/train"
    argv = ["write", "--folder", str(images), "--out", url, "--staging", str(tmp_path / "stage"),
            "--samples-per-shard", "4", "--no-progress", "--workers", "1"]

    real_open, opened = shard_output.open_shard, []

    def killed_at_shard_2(out_dir, name, index, start):
        if index == 2:
            raise KeyboardInterrupt  # the job is stopped while shard 2 is being written
        opened.append(name)
        return real_open(out_dir, name, index, start)

    monkeypatch.setattr(shard_output, "open_shard", killed_at_shard_2)
    with pytest.raises(KeyboardInterrupt):
        shards_main(argv)
    progress = json.loads((tmp_path / "stage" / "_progress.json").read_text())
    assert sorted(progress["uploaded"]) == ["shard-000000.tar", "shard-000001.tar"]
    with pytest.raises(object_store.ObjectStoreError):  # readers see no data set yet
        object_store.read_remote_info(url)

    monkeypatch.setattr(shard_output, "open_shard", real_open)
    real_upload, uploaded = object_store.upload_file, []
    monkeypatch.setattr(object_store, "upload_file", lambda path, u, **kw: uploaded.append(u.rsplit("/", 1)[1])
                        or real_upload(path, u, **kw))
    assert shards_main(argv) == 0
    assert uploaded == ["shard-000002.tar", "shard-000003.tar", "wids-index.json", "_info.json"]
    same_output(download(s3_bucket, "part/train", tmp_path / "downloaded"), local)


def test_two_nodes_upload_and_finalize_equal_the_local_write(s3_bucket, tmp_path):  # noqa: F811
    images = make_image_folder(tmp_path / "img", n_per_class=8)
    local = write_shard_dir(images, tmp_path / "local" / "train")
    url = f"s3://{s3_bucket.name}/nodes/train/"
    for rank in (0, 1):  # each node with its own staging directory, as on separate machines
        assert shards_main(["write", "--folder", str(images), "--out", url, "--staging", str(tmp_path / f"n{rank}"),
                            "--samples-per-shard", "4", "--num-nodes", "2", "--node-rank", str(rank),
                            "--delete-local", "--no-progress"]) == 0
    assert shards_main(["finalize", "--out", url, "--num-nodes", "2"]) == 0
    same_output(download(s3_bucket, "nodes/train", tmp_path / "downloaded"), local)  # node records removed
