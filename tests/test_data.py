"""Tests for selfdistill.data: multi-crop geometry, seeded folder datasets, bad files, collation."""

from __future__ import annotations

import io
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from selfdistill.data import (
    BadSampleTracker,
    EvalTransform,
    ImageFolderDataset,
    MultiCropAugmentation,
    collate_eval,
    collate_multicrop,
    crop_pixel_centres,
    sample_crop_box,
)

# Only the geometric part of the augmentation: output pixels are the resized crop / 255.
GEOMETRY_ONLY = dict(color_jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0),
                     solarize_p=(0.0, 0.0, 0.0), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
SMALL = dict(global_size=32, local_size=16, n_local_crops=3)


def ramp_image(height: int = 192, width: int = 256) -> Image.Image:
    """R = column, G = row, B = 0: each pixel's value is its own position (non-square on purpose)."""
    rows, cols = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([cols, rows, np.zeros_like(cols)], -1).astype(np.uint8))


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def to_unit_tensor(img: Image.Image) -> torch.Tensor:
    return F.to_dtype(F.pil_to_tensor(img), torch.float32, scale=True)


# -- multi-crop geometry ------------------------------------------------------------------------
@pytest.mark.parametrize("height,width,scale", [(192, 256, (0.05, 0.4)), (300, 40, (0.4, 1.0)),
                                                (40, 300, (0.4, 1.0)), (64, 64, (0.08, 1.0))])
def test_sample_crop_box_matches_torchvision(height, width, scale):
    reference = RandomResizedCrop(8, scale=scale, ratio=(3 / 4, 4 / 3))
    if not hasattr(reference, "make_params"):
        pytest.skip("torchvision too old to expose RandomResizedCrop.make_params")
    image = Image.new("RGB", (width, height))
    for seed in range(50):
        torch.manual_seed(seed)
        ours = sample_crop_box(height, width, scale, (3 / 4, 4 / 3))
        torch.manual_seed(seed)
        theirs = reference.make_params([image])
        assert ours == (theirs["top"], theirs["left"], theirs["height"], theirs["width"])


def test_crops_match_recorded_boxes_and_flips():
    source = ramp_image()
    aug = MultiCropAugmentation(n_local_crops=4, **GEOMETRY_ONLY)
    scales = [aug.global_scale] * 2 + [aug.local_scale] * 4
    seen_flips = {(size, flipped) for size in (224, 96) for flipped in (False, True)}

    for seed in range(20):
        torch.manual_seed(seed)
        random.seed(seed)
        out = aug(source)
        assert out["image_size"].tolist() == [192, 256]
        assert out["boxes"].dtype == torch.float32 and out["flips"].dtype == torch.bool
        for crop, box, flipped, size, scale in zip(out["crops"], out["boxes"], out["flips"],
                                                   aug.crop_sizes, scales):
            top, left, height, width = (int(v) for v in box.tolist())
            assert crop.shape == (3, size, size)
            assert 0 <= top and top + height <= 192 and 0 <= left and left + width <= 256
            area = height * width / (192 * 256)
            assert scale[0] * 0.95 <= area <= min(scale[1] * 1.05, 1.0)

            # Exactly the bicubic resized crop of the recorded box, mirrored when recorded so.
            expected = to_unit_tensor(F.resized_crop(source, top, left, height, width, [size, size],
                                                     interpolation=InterpolationMode.BICUBIC))
            if flipped:
                expected = F.horizontal_flip(expected)
            torch.testing.assert_close(crop, expected, rtol=0, atol=0)

            # The ramp values say where each pixel came from; they must match the predicted centres.
            centres = crop_pixel_centres(box, flipped, size)
            interior = (slice(None), slice(2, -2), slice(2, -2))
            error = (crop[:2] * 255 - centres)[interior].abs()
            assert error.max() <= 1.0
            seen_flips.discard((size, bool(flipped)))
        if not seen_flips:
            break
    assert not seen_flips, f"never saw {seen_flips}"


def test_crop_pixel_centres_formula_and_batching():
    centres = crop_pixel_centres((10.0, 20.0, 8.0, 4.0), False, 4)
    assert centres.shape == (2, 4, 4)
    # x: left + (c + 0.5) * width / S - 0.5 ; y: top + (r + 0.5) * height / S - 0.5
    torch.testing.assert_close(centres[0, 0], torch.tensor([20.0, 21.0, 22.0, 23.0]))
    torch.testing.assert_close(centres[1, :, 0], torch.tensor([10.5, 12.5, 14.5, 16.5]))
    flipped = crop_pixel_centres((10.0, 20.0, 8.0, 4.0), True, 4)
    torch.testing.assert_close(flipped[0], centres[0].flip(-1))
    torch.testing.assert_close(flipped[1], centres[1])

    boxes = torch.tensor([[[0.0, 0.0, 4.0, 4.0], [10.0, 20.0, 8.0, 4.0]]])  # [B=1, V=2, 4]
    batched = crop_pixel_centres(boxes, torch.tensor([[False, True]]), 4)
    assert batched.shape == (1, 2, 2, 4, 4)
    torch.testing.assert_close(batched[0, 1], flipped)
    grid = torch.arange(4.0)
    torch.testing.assert_close(batched[0, 0, 0], grid.expand(4, 4))  # identity crop: x = column


def test_default_config_is_dino():
    aug = MultiCropAugmentation()
    assert aug.n_crops == 12 and aug.crop_sizes == [224] * 2 + [96] * 10
    torch.manual_seed(0)
    random.seed(0)
    out = aug(noise_image(200, 300).convert("L"))  # grayscale input is converted to RGB
    assert [tuple(c.shape) for c in out["crops"]] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 10
    assert all(c.dtype == torch.float32 and type(c) is torch.Tensor for c in out["crops"])
    assert out["boxes"].shape == (12, 4) and out["flips"].shape == (12,)
    assert out["image_size"].dtype == torch.int64 and out["image_size"].tolist() == [200, 300]
    # ImageNet normalisation: values leave [0, 1].
    assert min(c.min().item() for c in out["crops"]) < 0


def test_solarize_and_grayscale_are_applied():
    source = noise_image(64, 64)
    solarize = MultiCropAugmentation(**{**GEOMETRY_ONLY, "solarize_p": (1.0, 1.0, 1.0)}, **SMALL)
    torch.manual_seed(1)
    out = solarize(source)
    top, left, height, width = (int(v) for v in out["boxes"][0].tolist())
    expected = F.resized_crop(source, top, left, height, width, [32, 32], interpolation=InterpolationMode.BICUBIC)
    if out["flips"][0]:
        expected = F.horizontal_flip(expected)
    torch.testing.assert_close(out["crops"][0], to_unit_tensor(ImageOps.solarize(expected, 128)), rtol=0, atol=0)

    gray = MultiCropAugmentation(**{**GEOMETRY_ONLY, "grayscale_p": 1.0}, **SMALL)
    for crop in gray(source)["crops"]:
        assert torch.equal(crop[0], crop[1]) and torch.equal(crop[1], crop[2])


def test_eval_transform():
    transform = EvalTransform()
    assert transform.resize_size == 256
    image = transform(noise_image(120, 300))
    assert image.shape == (3, 224, 224) and type(image) is torch.Tensor
    assert EvalTransform(size=32, mean=(0, 0, 0), std=(1, 1, 1))(noise_image(40, 50)).max() <= 1.0


# -- folder datasets -----------------------------------------------------------------------------
def save(path, img: Image.Image) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return str(path)


def test_labelled_folder(tmp_path):
    save(tmp_path / "zebra" / "a.png", noise_image(8, 8))
    save(tmp_path / "ant" / "nested" / "b.JPG", noise_image(8, 8))
    save(tmp_path / "ant" / "c.png", noise_image(8, 8))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path)
    assert ds.labelled and ds.classes == ["ant", "zebra"]
    assert [(p.split("/")[-1], label) for p, label in ds.samples] == [("c.png", 0), ("b.JPG", 0), ("a.png", 1)]
    item = ds[2]
    assert isinstance(item["image"], Image.Image) and item["image"].mode == "RGB"
    assert (item["label"], item["index"], item["bad"]) == (1, 2, [])
    assert ds.targets == [0, 0, 1]


def test_unlabelled_folder(tmp_path):
    for name in ("b.png", "a.bmp", "c.webp"):
        save(tmp_path / name, noise_image(8, 8))
    ds = ImageFolderDataset(tmp_path)
    assert not ds.labelled and ds.classes == []
    assert [p.split("/")[-1] for p, _ in ds.samples] == ["a.bmp", "b.png", "c.webp"]
    assert {label for _, label in ds.samples} == {-1} and ds[0]["label"] == -1


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        ImageFolderDataset(tmp_path / "does_not_exist")
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no images.*\.jpg.*" + tmp_path.name):
        ImageFolderDataset(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path)


@pytest.fixture
def multicrop_dataset(tmp_path):
    for i in range(4):
        save(tmp_path / f"img{i}.png", noise_image(40 + 4 * i, 48, seed=i))
    return ImageFolderDataset(tmp_path, transform=MultiCropAugmentation(**SMALL), seed=7)


def crops_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a["image"]["crops"], b["image"]["crops"]))


def test_per_sample_seeding_is_deterministic_and_leaves_global_rng_alone(multicrop_dataset):
    ds = multicrop_dataset
    random.seed(123)
    torch.manual_seed(123)
    py_state, torch_state = random.getstate(), torch.get_rng_state()

    first = ds[(3, 1)]
    assert crops_equal(first, ds[(3, 1)])
    assert torch.equal(first["image"]["boxes"], ds[(3, 1)]["image"]["boxes"])
    assert crops_equal(ds[1], ds[(0, 1)])
    assert not crops_equal(first, ds[(4, 1)])
    assert not crops_equal(first, ds[(3, 2)])

    assert random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)

    other_seed = ImageFolderDataset(ds.root, transform=ds.transform, seed=8)
    assert not crops_equal(first, other_seed[(3, 1)])


def test_augmentation_does_not_depend_on_workers(multicrop_dataset):
    keys = [(5, i) for i in (3, 0, 2, 1)]
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(multicrop_dataset, batch_size=2, sampler=keys, num_workers=workers,
                            collate_fn=collate_multicrop)
        batches[workers] = list(loader)
    for a, b in zip(batches[0], batches[2]):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["boxes"], b["boxes"])
        assert all(torch.equal(x, y) for x, y in zip(a["crops"], b["crops"]))


def write_bad_files(root) -> tuple[str, str]:
    """``b_random.jpg`` is not an image at all, ``c_truncated.png`` stops half way."""
    random_bytes = root / "b_random.jpg"
    random_bytes.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    buffer = io.BytesIO()
    noise_image(64, 64).save(buffer, format="PNG")
    truncated = root / "c_truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return str(random_bytes), str(truncated)


def test_corrupt_images_are_replaced_and_reported(tmp_path, caplog):
    good_a = save(tmp_path / "a_good.png", noise_image(16, 16, seed=1))
    bad_random, bad_truncated = write_bad_files(tmp_path)
    good_d = save(tmp_path / "d_good.png", noise_image(16, 16, seed=2))
    ds = ImageFolderDataset(tmp_path, transform=EvalTransform(size=8))
    assert [p for p, _ in ds.samples] == [good_a, bad_random, bad_truncated, good_d]

    with caplog.at_level(logging.WARNING, logger="selfdistill.data.folder"):
        item = ds[1]
    assert item["index"] == 3 and item["bad"] == [bad_random, bad_truncated]
    assert item["image"].shape == (3, 8, 8)
    assert bad_random in caplog.text and bad_truncated in caplog.text

    tracker = BadSampleTracker()
    for batch in DataLoader(ds, batch_size=2, collate_fn=collate_eval):
        assert batch["image"].shape == (2, 3, 8, 8)
        tracker.update(batch["bad"], batch["draws"], batch["bad_draws"])
    # draws 1 and 2 both land on bad files and both walk past c_truncated: it is one file, met twice
    assert (tracker.n_bad, tracker.n_bad_draws, tracker.n_draws) == (2, 2, 4) and tracker.fraction == 0.5

    tracker.check(max_fraction=0.5, whole=True)
    tracker.check(max_fraction=0.4, min_draws=1)  # 2 of 4 drawn is no evidence that more than 40 % are bad
    with pytest.raises(RuntimeError, match=r"2 of 4 images drawn \(50.00%\).*max_bad_fraction=0.4.*"
                                           r"2 distinct unreadable files, first: .*b_random"):
        tracker.check(max_fraction=0.4, whole=True)
    with pytest.raises(RuntimeError, match="c_truncated"):
        tracker.check(max_fraction=0.01, min_draws=4)  # but it is evidence of more than 1 %

    restored = BadSampleTracker()
    restored.load_state_dict(tracker.state_dict())
    assert (list(restored.bad), restored.n_draws, restored.n_bad_draws) == ([bad_random, bad_truncated], 4, 2)
    older = BadSampleTracker()  # a checkpoint written before the counts were per draw
    older.load_state_dict({"n_bad": 3, "n_seen": 4, "first_bad": [bad_random]})
    assert (older.n_bad, older.n_draws, older.n_bad_draws) == (1, 4, 3)


def test_bad_last_image_wraps_and_all_bad_raises(tmp_path):
    save(tmp_path / "a_good.png", noise_image(8, 8))
    write_bad_files(tmp_path)
    item = ImageFolderDataset(tmp_path)[2]
    assert item["index"] == 0 and len(item["bad"]) == 1

    (tmp_path / "a_good.png").write_bytes(b"")
    with pytest.raises(RuntimeError, match="none of the 3 images"):
        ImageFolderDataset(tmp_path)[0]


def test_tracker_counts_files_once_and_merges_ranks():
    rank0, rank1 = BadSampleTracker(), BadSampleTracker()
    rank0.update([f"bad{i}.jpg" for i in range(30)], draws=100, bad_draws=3)
    rank0.update(["bad0.jpg"], draws=100, bad_draws=1)
    rank1.update(["bad0.jpg", "bad99.jpg"], draws=50, bad_draws=2)
    assert rank0.n_bad == 30 and rank0.fraction == pytest.approx(4 / 200)
    total = BadSampleTracker.combined([rank0.state_dict(), rank1.state_dict()])
    assert (total.n_bad, total.n_draws, total.n_bad_draws) == (31, 250, 6)
    with pytest.raises(RuntimeError) as error:
        total.check(0.01, whole=True)
    assert "31 distinct unreadable files" in str(error.value)
    assert str(error.value).count(".jpg") == BadSampleTracker.max_shown_paths


def test_tracker_fails_mid_epoch_only_on_clear_evidence():
    noisy = BadSampleTracker()  # a 1 % dataset whose first draws happen to hold 3 bad of 96
    noisy.update(["x"], draws=96, bad_draws=3)
    noisy.check(0.02, min_draws=50)
    with pytest.raises(RuntimeError, match=r"3 of 96 images drawn \(3.12%\)"):
        noisy.check(0.02, whole=True)  # had those 96 been the whole dataset
    clear = BadSampleTracker()  # 3 % over 10,000 draws: the bound is past 2 %
    clear.update(["x"], draws=10_000, bad_draws=300)
    assert 0.02 < clear.lower_bound() < 0.03
    with pytest.raises(RuntimeError, match=r"at least 2\.\d\d% with high confidence"):
        clear.check(0.02)
    clear.check(0.02, min_draws=20_000)


# -- collation -----------------------------------------------------------------------------------
def test_collate_shapes():
    aug = MultiCropAugmentation(**SMALL)
    samples = [{"image": aug(noise_image(40, 50, seed=i)), "label": i, "index": 10 + i,
                "bad": ["x.jpg"] if i == 1 else []} for i in range(3)]
    batch = collate_multicrop(samples)
    assert [tuple(c.shape) for c in batch["crops"]] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 3
    assert batch["boxes"].shape == (3, 5, 4) and batch["boxes"].dtype == torch.float32
    assert batch["flips"].shape == (3, 5) and batch["flips"].dtype == torch.bool
    assert batch["image_size"].tolist() == [[40, 50]] * 3
    assert batch["label"].tolist() == [0, 1, 2] and batch["label"].dtype == torch.int64
    assert batch["index"].tolist() == [10, 11, 12] and batch["index"].dtype == torch.int64
    assert batch["bad"] == ["x.jpg"]

    evaluated = collate_eval([{"image": torch.zeros(3, 8, 8), "label": -1, "index": i, "bad": []}
                              for i in range(4)])
    assert evaluated["image"].shape == (4, 3, 8, 8) and evaluated["label"].tolist() == [-1] * 4
    assert evaluated["bad"] == []


def test_overfit_batches_repeats_epoch_zero_exactly():
    from selfdistill.data.sampler import EpochShardSampler

    s = EpochShardSampler(40, 4, rank=1, world_size=2, seed=3, repeat_batches=2)
    assert s.batches_per_epoch == 2 and len(s) == 8
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(5)
    assert list(s) == first and all(e == 0 for e, _ in first)  # same images, same augmentation key
    full = EpochShardSampler(40, 4, rank=1, world_size=2, seed=3)
    full.set_epoch(0)
    assert first == list(full)[:8]
