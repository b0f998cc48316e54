"""The sharding preprocessor: folder/file-list/HF input -> webdataset tar shards, verify, resume."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from selfdistill.cli.shards import main
from selfdistill.data import shard_encode, shard_format, shard_output
from selfdistill.data.shard_inputs import folder_input
from selfdistill.data.shard_verify import verify_shards
from selfdistill.data.shard_writer import write_shards


def make_mixed_folder(root: Path, counts=(8, 8, 7), size=(40, 30), seed: int = 0) -> Path:
    """Class folders of noisy RGB images, alternating JPEG and PNG (23 images by default)."""
    rng = np.random.default_rng(seed)
    for c_idx, n in enumerate(counts):
        folder = root / f"class_{'abc'[c_idx]}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            pixels[..., c_idx] = 200
            Image.fromarray(pixels).save(folder / f"{i:03d}.{'jpg' if i % 2 else 'png'}")
    return root


def write(*args: str) -> int:
    return main(["write", *args, "--no-progress"])


def read_back(out: Path) -> list[dict]:
    """Every sample of every shard in _info.json, read with webdataset (not resampled)."""
    return list(wds.WebDataset(shard_format.shard_urls(out), shardshuffle=False))


def image_member(sample: dict) -> tuple[str, bytes]:
    ext = next(e for e in ("jpg", "png", "webp") if e in sample)
    return ext, sample[ext]


def shard_shas(out: Path) -> dict[str, str]:
    return {s["name"]: s["sha256"] for s in shard_format.read_info(out)["shards"]}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_mixed_folder(tmp_path / "images")


def test_folder_round_trip(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    assert write("--folder", str(folder), "--out", str(out), "--samples-per-shard", "5") == 0

    info = shard_format.read_info(out)
    assert info["format"] == "selfdistill-shards/1"
    assert info["class_names"] == ["class_a", "class_b", "class_c"]
    assert [s["name"] for s in info["shards"]] == [f"shard-{i:06d}.tar" for i in range(5)]
    assert [s["samples"] for s in info["shards"]] == [5, 5, 5, 5, 3]
    assert info["total_samples"] == 23
    assert sorted(os.listdir(out)) == ["_info.json"] + [f"shard-{i:06d}.tar" for i in range(5)] + ["wids-index.json"]
    for record in info["shards"]:
        assert os.path.getsize(out / record["name"]) == record["bytes"]
        with tarfile.open(out / record["name"]) as tar:  # fixed headers: reproducible bytes
            assert {(m.mtime, m.uname, m.mode) for m in tar.getmembers()} == {(0, "selfdistill", 0o444)}

    samples = read_back(out)
    sources = [json.loads(s["json"])["source"] for s in samples]
    expected = sorted(str(p) for p in folder.rglob("*.*"))
    assert sorted(sources) == expected  # every source exactly once
    assert sources != expected  # written in shuffled order
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(23)]
    for sample, source in zip(samples, sources):
        label = info["class_names"].index(Path(source).parent.name)
        assert int(sample["cls"]) == label == json.loads(sample["json"])["label"]
        ext, data = image_member(sample)
        assert ext == Path(source).suffix[1:]
        assert data == Path(source).read_bytes()  # pass-through keeps the original bytes


def test_unlabelled_folder_no_shuffle(tmp_path: Path) -> None:
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 30), (i * 50, 0, 0)).save(folder / f"{i}.png")
    out = tmp_path / "shards"
    assert write("--folder", str(folder), "--out", str(out), "--no-shuffle") == 0

    info = shard_format.read_info(out)
    assert info["class_names"] is None and info["args"]["shuffle_seed"] is None
    samples = read_back(out)
    assert [json.loads(s["json"]) for s in samples] == [{"source": str(folder / f"{i}.png"), "label": -1}
                                                        for i in range(4)]
    assert all("cls" not in s for s in samples)
    assert main(["verify", "--dir", str(out), "--no-progress"]) == 0


def test_verify_detects_a_flipped_byte(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "shards"
    assert write("--folder", str(folder), "--out", str(out), "--samples-per-shard", "5") == 0
    assert main(["verify", "--dir", str(out), "--no-progress", "--workers", "2"]) == 0
    assert "OK: 5 shards, 23 samples" in capsys.readouterr().out

    victim = out / "shard-000002.tar"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert main(["verify", "--dir", str(out), "--no-progress"]) == 1
    report = capsys.readouterr().out
    assert "FAILED: 1 of 5 shards" in report
    assert "shard-000002.tar: sha256" in report
    assert "shard-000001.tar" not in report and "shard-000003.tar" not in report


def test_verify_reports_missing_shard_and_bad_label(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    assert write("--folder", str(folder), "--out", str(out), "--samples-per-shard", "5") == 0
    (out / "shard-000004.tar").unlink()
    info = json.loads((out / "_info.json").read_text())
    info["class_names"] = ["only_one"]
    (out / "_info.json").write_text(json.dumps(info))

    report = verify_shards(out, progress=False)
    assert not report.ok
    assert report.failures["shard-000004.tar"] == ["missing"]
    assert any("outside 0..0" in p for p in report.failures["shard-000000.tar"])


class Interrupted(RuntimeError):
    pass


def interrupt_after(monkeypatch: pytest.MonkeyPatch, n_shards: int) -> None:
    """Make the writer die (like a killed job) when it starts shard number ``n_shards``."""
    real = shard_output.open_shard
    calls = []

    def flaky(out_dir, name, index, start):
        if len(calls) == n_shards:
            Path(out_dir, f".{name}.tmp").write_bytes(b"half a shard")
            raise Interrupted("killed")
        calls.append(name)
        return real(out_dir, name, index, start)

    monkeypatch.setattr(shard_output, "open_shard", flaky)


def identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_resume_after_interruption_matches_clean_run(folder: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    clean, out = tmp_path / "clean", tmp_path / "resumed"
    args = ["--folder", str(folder), "--samples-per-shard", "5", "--resize-shorter", "24"]
    assert write(*args, "--out", str(clean)) == 0

    interrupt_after(monkeypatch, 2)
    with pytest.raises(Interrupted):
        write(*args, "--out", str(out))
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == [".shard-000002.tar.tmp", "_progress.json",
                                       "shard-000000.tar", "shard-000001.tar"]
    with pytest.raises(FileNotFoundError, match="unfinished"):
        shard_format.read_info(out)
    kept = {name: identity(out / name) for name in ("shard-000000.tar", "shard-000001.tar")}

    assert write(*args, "--out", str(out)) == 0
    assert {name: identity(out / name) for name in kept} == kept  # not rewritten
    assert shard_shas(out) == shard_shas(clean)
    assert sorted(os.listdir(out)) == sorted(os.listdir(clean))  # no .tmp, no _progress.json
    assert main(["verify", "--dir", str(out), "--no-progress"]) == 0


def test_resume_adopts_unrecorded_shard_and_rewrites_damaged(folder: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    clean, out = tmp_path / "clean", tmp_path / "resumed"
    args = ["--folder", str(folder), "--samples-per-shard", "5"]
    assert write(*args, "--out", str(clean)) == 0

    interrupt_after(monkeypatch, 3)
    with pytest.raises(Interrupted):
        write(*args, "--out", str(out))
    monkeypatch.undo()
    # The job died between renaming shard 2 and recording it.
    progress = json.loads((out / "_progress.json").read_text())
    del progress["done"]["shard-000002.tar"]
    (out / "_progress.json").write_text(json.dumps(progress))
    adopted = identity(out / "shard-000002.tar")

    assert write(*args, "--out", str(out)) == 0
    assert identity(out / "shard-000002.tar") == adopted
    assert shard_format.read_info(out)["shards"] == shard_format.read_info(clean)["shards"]

    # A finished directory: a deleted and a damaged shard are rewritten, the rest are left alone.
    (out / "shard-000001.tar").unlink()
    damaged = out / "shard-000003.tar"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    untouched = {n: identity(out / n) for n in ("shard-000000.tar", "shard-000002.tar", "shard-000004.tar")}
    assert write(*args, "--out", str(out)) == 0
    assert {n: identity(out / n) for n in untouched} == untouched
    assert shard_shas(out) == shard_shas(clean)


def test_workers_give_identical_shards(folder: Path, tmp_path: Path) -> None:
    args = ["--folder", str(folder), "--samples-per-shard", "4", "--quality", "80"]
    assert write(*args, "--out", str(tmp_path / "one")) == 0
    assert write(*args, "--out", str(tmp_path / "two"), "--workers", "2") == 0
    assert shard_shas(tmp_path / "one") == shard_shas(tmp_path / "two")
    assert all(image_member(s)[0] == "jpg" for s in read_back(tmp_path / "two"))


def test_resize_shorter_reencodes_only_larger_images(tmp_path: Path) -> None:
    folder = make_mixed_folder(tmp_path / "big", counts=(3, 3), size=(40, 30))
    make_mixed_folder(folder, counts=(0, 0, 2), size=(20, 16), seed=1)  # smaller than the target
    out = tmp_path / "shards"
    assert write("--folder", str(folder), "--out", str(out), "--resize-shorter", "24") == 0

    samples = read_back(out)
    assert len(samples) == 8
    for sample in samples:
        source = Path(json.loads(sample["json"])["source"])
        ext, data = image_member(sample)
        with Image.open(io.BytesIO(data)) as img:
            if source.parent.name == "class_c":
                assert data == source.read_bytes() and img.size == (20, 16)
            else:
                assert ext == "jpg" and img.format == "JPEG" and img.size == (32, 24)


def test_max_shard_bytes_splits_by_size(tmp_path: Path) -> None:
    folder = make_mixed_folder(tmp_path / "images", counts=(6, 6), size=(64, 64))
    out = tmp_path / "shards"
    limit = 40_000
    assert write("--folder", str(folder), "--out", str(out), "--max-shard-bytes", "4e4",
                 "--samples-per-shard", "0", "--workers", "2") == 0

    info = shard_format.read_info(out)
    counts = [s["samples"] for s in info["shards"]]
    assert sum(counts) == 12 and len(counts) > 2 and max(counts) > 1
    for record in info["shards"]:
        assert record["bytes"] == os.path.getsize(out / record["name"])
        assert record["bytes"] <= limit or record["samples"] == 1
    assert len(read_back(out)) == 12
    # Both limits together: the count caps shards that would fit by size.
    capped = tmp_path / "capped"
    assert write("--folder", str(folder), "--out", str(capped), "--max-shard-bytes", "4e4",
                 "--samples-per-shard", "1") == 0
    assert [s["samples"] for s in shard_format.read_info(capped)["shards"]] == [1] * 12


def test_file_list_with_labels(tmp_path: Path) -> None:
    folder = make_mixed_folder(tmp_path / "images", counts=(2, 2))
    lines = [f"images/{p.parent.name}/{p.name}\t{1 - 'ab'.index(p.parent.name[-1])}"
             for p in sorted(folder.rglob("*.*"))]
    listing = tmp_path / "list.txt"
    listing.write_text("# path<TAB>label\n" + "\n".join(lines) + "\n\n")
    out = tmp_path / "shards"
    assert write("--file-list", str(listing), "--class-names", "bee,ant", "--out", str(out)) == 0

    info = shard_format.read_info(out)
    assert info["class_names"] == ["bee", "ant"] and info["total_samples"] == 4
    for sample in read_back(out):
        source = Path(json.loads(sample["json"])["source"])
        assert source.is_absolute() and source.exists()
        assert int(sample["cls"]) == (0 if source.parent.name == "class_b" else 1)


def test_file_list_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = make_mixed_folder(tmp_path / "images", counts=(2,))
    paths = sorted(folder.rglob("*.*"))
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(f"{paths[0]}\t0\n{paths[1]}\n")
    assert write("--file-list", str(mixed), "--out", str(tmp_path / "o")) == 2
    assert "label all lines or none" in capsys.readouterr().err
    missing = tmp_path / "missing.txt"
    missing.write_text(f"{paths[0]}\n{tmp_path / 'gone.jpg'}\n")
    assert write("--file-list", str(missing), "--out", str(tmp_path / "o")) == 2
    assert "gone.jpg" in capsys.readouterr().err


def test_hf_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    datasets = pytest.importorskip("datasets")
    images = [Image.fromarray(np.full((30, 40, 3), 40 * i, dtype=np.uint8)) for i in range(5)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 1, 0, 1]}, features=features)
    ds.save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "shards"
    assert write("--hf-dataset", str(tmp_path / "hf"), "--out", str(out), "--samples-per-shard", "2") == 0

    info = shard_format.read_info(out)
    assert info["class_names"] == ["cat", "dog"] and len(info["shards"]) == 3
    samples = read_back(out)
    assert sorted(json.loads(s["json"])["source"] for s in samples) == list(range(5))
    for sample in samples:
        row = json.loads(sample["json"])["source"]
        assert int(sample["cls"]) == [0, 1, 1, 0, 1][row]
        with Image.open(io.BytesIO(image_member(sample)[1])) as img:
            assert img.convert("RGB").getpixel((0, 0)) == (40 * row,) * 3
    assert main(["verify", "--dir", str(out), "--no-progress"]) == 0

    capsys.readouterr()
    assert write("--hf-dataset", str(tmp_path / "hf"), "--image-column", "picture", "--out", str(tmp_path / "x")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no image column 'picture'" in err and err.count("\n") == 1


def test_input_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert write("--folder", str(tmp_path / "nope"), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert write("--folder", str(tmp_path / "empty"), "--out", str(tmp_path / "o")) == 2
    assert "no images" in capsys.readouterr().err
    assert main(["verify", "--dir", str(tmp_path / "nope")]) == 2
    capsys.readouterr()
    images = make_mixed_folder(tmp_path / "images", counts=(1,))
    assert write("--folder", str(images), "--out", "s3://bucket/train/") == 2
    assert "needs --staging DIR" in capsys.readouterr().err
    assert write("--folder", str(images), "--out", str(tmp_path / "o"), "--delete-local") == 2
    assert "only apply to an s3:// --out" in capsys.readouterr().err


def test_resume_with_different_arguments_is_refused(folder: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "shards"
    assert write("--folder", str(folder), "--out", str(out), "--samples-per-shard", "5") == 0
    before = {p.name: identity(p) for p in out.iterdir()}
    capsys.readouterr()
    assert write("--folder", str(folder), "--out", str(out), "--samples-per-shard", "6") == 2
    err = capsys.readouterr().err
    assert "different arguments" in err and "samples_per_shard: 5 -> 6" in err and err.count("\n") == 1
    assert {p.name: identity(p) for p in out.iterdir()} == before

    (folder / "class_a" / "extra.png").write_bytes((folder / "class_a" / "000.png").read_bytes())
    assert write("--folder", str(folder), "--out", str(out), "--samples-per-shard", "5") == 2
    assert "different set of input images" in capsys.readouterr().err


def test_unreadable_image_is_skipped_and_recorded(folder: Path, tmp_path: Path) -> None:
    bad = folder / "class_b" / "zz_broken.jpg"
    bad.write_bytes(b"not an image at all")
    out = tmp_path / "shards"
    info = write_shards(out, folder_input(folder), samples_per_shard=5, progress=False,
                               max_bad_fraction=0.05)  # 1 of 24
    assert info["total_samples"] == 23
    assert [src for s in info["shards"] for src in s["skipped"]] == [str(bad)]
    assert str(bad) not in {json.loads(s["json"])["source"] for s in read_back(out)}
    assert verify_shards(out, progress=False).ok


def test_timm_and_wids_read_a_written_directory(folder: Path, tmp_path: Path) -> None:
    """_info.json carries timm's webdataset schema (the directory's name is the split) and
    wids-index.json is a wids index: both libraries read every sample with its label."""
    import timm.data
    import wids

    out = tmp_path / "train"
    assert write("--folder", str(folder), "--out", str(out), "--samples-per-shard", "5") == 0
    info = shard_format.read_info(out)
    assert info["splits"]["train"]["shard_lengths"] == [5, 5, 5, 5, 3] and info["splits"]["train"]["num_samples"] == 23

    dataset = timm.data.create_dataset("wds/selfdistill", root=str(out), split="train", is_training=False)
    assert len(dataset) == 23
    read = [(img.size, int(target)) for img, target in dataset]
    assert len(read) == 23 and {t for _, t in read} == {0, 1, 2} and {s for s, _ in read} == {(40, 30)}

    index = wids.ShardListDataset(str(out / "wids-index.json"), cache_dir=str(tmp_path / "wids_cache"))
    assert len(index) == 23
    samples = [index[i] for i in range(23)]
    labels = sorted(int(s[".cls"]) for s in samples)
    assert labels == sorted(int(s["cls"]) for s in read_back(out))
    assert all(any(k in s for k in (".jpg", ".png")) for s in samples)


def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def photo_jpeg(path: Path, seed: int = 0) -> Path:
    """A 64x48 JPEG with detail in every block, so a cut file misses image data, not padding."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def test_truncated_jpeg_is_caught_by_writer_and_verify(folder: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    """A JPEG cut to 60 % of its bytes passes PIL's verify() (headers only): the writer decodes every
    image and skips it; verify decodes every stored image and refuses a shard holding one."""
    cut = photo_jpeg(folder / "class_a" / "zz_cut.jpg")
    truncate(cut)
    with Image.open(cut) as img:
        img.verify()  # what the writer and verify used to rely on: no error

    out = tmp_path / "shards"
    assert write("--folder", str(folder), "--out", str(out), "--samples-per-shard", "5",
                 "--max-bad-fraction", "0.05") == 0
    assert "skipped 1 unreadable images" in capsys.readouterr().out
    info = shard_format.read_info(out)
    assert [src for s in info["shards"] for src in s["skipped"]] == [str(cut)] and info["total_samples"] == 23
    assert str(cut) not in {json.loads(s["json"])["source"] for s in read_back(out)}

    # The same folder written with --check headers (the old header-only check): the cut JPEG is stored,
    # and verify, which always decodes, refuses it.
    stored = tmp_path / "headers_only"
    assert write("--folder", str(folder), "--out", str(stored), "--samples-per-shard", "5", "--check", "headers") == 0
    assert str(cut) in {json.loads(s["json"])["source"] for s in read_back(stored)}
    capsys.readouterr()
    assert main(["verify", "--dir", str(stored), "--no-progress"]) == 1
    report = capsys.readouterr().out
    assert "FAILED: 1 of 5 shards" in report and "image does not decode (OSError: image file is truncated" in report


def test_folder_of_non_images_is_refused_leaving_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.jpg").write_text(f"not a picture {i}")
    out = tmp_path / "out" / "train"
    assert write("--folder", str(folder), "--out", str(out), "--max-bad-fraction", "1") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no readable image in ") and err.count("\n") == 1 and str(folder) in err
    assert not out.exists()
    assert write("--folder", str(folder), "--out", str(out), "--workers", "2") == 1  # the default limit: at once
    err = capsys.readouterr().err
    assert "more than --max-bad-fraction 0.01 allows" in err and f"{folder}/" in err and err.count("\n") == 1
    assert not out.exists()
    warnings = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert warnings and all("not an image format PIL can read" in w and "BytesIO" not in w for w in warnings)


def test_bad_fraction_limit(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """2 unreadable of 23 (9 %): refused by default and by --max-bad-fraction 0.05, kept with 0.1."""
    for name in ("bad_0.jpg", "bad_1.png"):
        (folder / "class_c" / name).write_bytes(b"\xff\xd8\xff garbage")
    (folder / "class_a" / "000.png").unlink()
    (folder / "class_b" / "000.png").unlink()
    out = tmp_path / "shards"
    for limit in ([], ["--max-bad-fraction", "0.05"]):
        assert write("--folder", str(folder), "--out", str(out), "--samples-per-shard", "5", *limit) == 1
        assert "at least 2 of the 23 images" in capsys.readouterr().err or limit == []
        assert not out.exists()
    assert write("--folder", str(folder), "--out", str(out), "--samples-per-shard", "5",
                 "--max-bad-fraction", "0.1") == 0
    assert "wrote 21 samples" in capsys.readouterr().out


def test_verify_refuses_a_directory_without_samples(folder: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "shards"
    assert write("--folder", str(folder), "--out", str(out), "--samples-per-shard", "50") == 0
    info = json.loads((out / "_info.json").read_text())
    (out / "_info.json").write_text(json.dumps({**info, "shards": [], "total_samples": 0}))
    capsys.readouterr()
    assert main(["verify", "--dir", str(out), "--no-progress"]) == 1
    assert "_info.json: no samples" in capsys.readouterr().out


def same_output(a: Path, b: Path) -> None:
    """Byte-identical shards, wids index and _info.json (but for its creation time)."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name == "_info.json":
            strip = lambda p: {k: v for k, v in json.loads(p.read_text()).items() if k != "created"}  # noqa: E731
            assert strip(a / name) == strip(b / name)
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process from /proc, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
def test_kill_9_leaves_no_worker_and_resume_is_identical(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    folder = make_mixed_folder(tmp_path / "images", counts=(60, 60), size=(160, 120))
    args = ["--folder", str(folder), "--samples-per-shard", "2", "--resize-shorter", "40"]
    clean, out = tmp_path / "clean" / "train", tmp_path / "killed" / "train"
    assert write(*args, "--out", str(clean), "--workers", "1") == 0

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(shard_format.__file__).parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "selfdistill.cli.shards", "write", *args, "--out", str(out),
                             "--workers", "2", "--no-progress"], env=env)
    deadline = time.monotonic() + 120
    while not (out / "shard-000001.tar").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    stats = {int(p.name): proc_stat(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
    workers = {pid: st[2] for pid, st in stats.items() if st is not None and st[1] == proc.pid}
    assert len(workers) == 2 and proc.poll() is None  # killed mid-write
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    def alive() -> list[int]:  # a zombie has exited (nobody may reap it in a container)
        stats = {pid: proc_stat(pid) for pid in workers}
        return [pid for pid, st in stats.items() if st is not None and st[0] != "Z" and st[2] == workers[pid]]

    deadline = time.monotonic() + 5
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive() == []
    assert not (out / "_info.json").exists() and (out / "_progress.json").exists()

    assert write(*args, "--out", str(out), "--workers", "2") == 0
    same_output(out, clean)


def test_size_cut_encodes_each_image_once_and_resume_trusts_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    folder = make_mixed_folder(tmp_path / "images", counts=(6, 6), size=(64, 64))
    calls = []
    real = shard_encode.prepare_image
    monkeypatch.setattr(shard_encode, "prepare_image", lambda raw, options: calls.append(1) or real(raw, options))
    out = tmp_path / "shards"
    args = ["--folder", str(folder), "--out", str(out), "--max-shard-bytes", "4e4", "--samples-per-shard", "0",
            "--quality", "90", "--workers", "1"]
    assert write(*args) == 0
    assert len(calls) == 12  # one preparation (decode, encode) per image
    n_shards = len(shard_format.read_info(out)["shards"])
    assert n_shards > 2

    # A flipped byte keeps the size: a resume trusts the file by size and record, --rehash does not.
    victim = out / "shard-000001.tar"
    data = bytearray(victim.read_bytes())
    data[600] ^= 0xFF
    victim.write_bytes(bytes(data))
    calls.clear()
    assert write(*args) == 0 and calls == [] and victim.read_bytes() == bytes(data)
    assert write(*args, "--rehash") == 0
    assert 0 < len(calls) < 12 and verify_shards(out, progress=False).ok
    assert len(shard_format.read_info(out)["shards"]) == n_shards

    # Progress: per image, with images/s; a plain line (no carriage return) when stderr is not a terminal.
    capsys.readouterr()
    write_shards(tmp_path / "p", folder_input(folder), samples_per_shard=5, workers=1)
    err = capsys.readouterr().err
    assert "writing: 12/12 images, " in err and " images/s" in err and "\r" not in err


@pytest.mark.slow
def test_three_nodes_and_finalize_equal_a_single_write(folder: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """Three processes write one directory: node 1 here, then nodes 0 and 2 at once; finalize joins them."""
    import subprocess
    import sys

    args = ["--folder", str(folder), "--samples-per-shard", "3", "--quality", "85"]
    single, split = tmp_path / "single" / "train", tmp_path / "split" / "train"
    assert write(*args, "--out", str(single)) == 0
    assert write(*args, "--out", str(split), "--num-nodes", "3", "--node-rank", "1") == 0
    assert "finalize --out" in capsys.readouterr().out
    assert main(["finalize", "--out", str(split), "--num-nodes", "3"]) == 2  # nodes 0 and 2 have not run
    assert "_progress-node0-of-3.json is missing" in capsys.readouterr().err
    assert not (split / "_info.json").exists()

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(shard_format.__file__).parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    nodes = [subprocess.Popen([sys.executable, "-m", "selfdistill.cli.shards", "write", *args, "--out", str(split),
                               "--num-nodes", "3", "--node-rank", str(rank), "--no-progress", "--workers", "1"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert main(["finalize", "--out", str(split), "--num-nodes", "3"]) == 0
    assert "wrote 23 samples (3 classes) in 8 shards" in capsys.readouterr().out
    same_output(split, single)

    assert write(*args, "--out", str(tmp_path / "x"), "--num-nodes", "2", "--max-shard-bytes", "1e6") == 2
    assert "--num-nodes needs a plan known before writing" in capsys.readouterr().err


def test_shard_bytes_are_those_of_webdataset_tarwriter(folder: Path, tmp_path: Path) -> None:
    """The writer builds tar headers itself (tarfile's general path was its slowest part); the file
    is byte for byte what webdataset's TarWriter writes for the same samples and header fields."""
    out = tmp_path / "shards"
    assert write("--folder", str(folder), "--out", str(out), "--samples-per-shard", "50") == 0
    shard = out / "shard-000000.tar"
    again = io.BytesIO()
    with wds.TarWriter(again, user="selfdistill", group="selfdistill", mtime=0, encoder=False) as writer:
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            writer.write({k: v for k, v in sample.items() if k != "__url__"})
    assert again.getvalue() == shard.read_bytes()


def test_options_as_section_key_words_equal_the_flags(folder: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    """`shards.key=value` is the same command as `--key value` (the override grammar of every entry point);
    an unknown key is one line with the closest name, exit 2."""
    flags, words = tmp_path / "flags", tmp_path / "words"
    assert write("--folder", str(folder), "--out", str(flags), "--samples-per-shard", "5") == 0
    assert main(["write", f"shards.folder={folder}", f"shards.out={words}", "shards.samples_per_shard=5",
                 "shards.no_progress=true"]) == 0
    assert shard_shas(flags) == shard_shas(words)
    assert main(["verify", f"shards.dir={words}", "shards.no_progress=true"]) == 0
    capsys.readouterr()
    assert main(["write", f"shards.folder={folder}", "shards.samples_per_shards=5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shards.samples_per_shards: unknown key" in err and "shards.samples_per_shard" in err
