"""data.augment_on=device: the workers cut, the training process finishes the crops. For the same
drawn parameters the device path must give what the worker path (torchvision / PIL) gives, within
the tolerances below (in uint8 levels, measured on scikit-learn's two real photos), and the drawn
parameters must follow the recipe's probabilities."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from sklearn.datasets import load_sample_image
from torchvision.transforms.v2 import functional as F

from selfdistill.data import MultiCropAugmentation, collate_multicrop
from selfdistill.data import device_augment as D


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(load_sample_image(name)).resize((160, 120)) for name in ("china.jpg", "flower.jpg")]


def levels(img: Image.Image) -> torch.Tensor:
    return F.pil_to_tensor(img).float()[None] / 255


def gap(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a - b).abs() * 255
    return d.mean().item(), d.max().item()


# (worker op on PIL, device op on [N, 3, H, W] floats, parameter values, mean |Δ|, max |Δ|), in levels
OPS = {
    "brightness": (F.adjust_brightness, D.adjust_brightness, [0.6, 0.9, 1.2, 1.4], 1.0, 2.0),
    "contrast": (F.adjust_contrast, D.adjust_contrast, [0.6, 0.9, 1.2, 1.4], 1.0, 2.0),
    "saturation": (F.adjust_saturation, D.adjust_saturation, [0.6, 0.8, 1.2, 1.4], 1.0, 2.0),
    # PIL rounds hue, saturation and value to 8 bits each on the way through HSV
    "hue": (F.adjust_hue, D.adjust_hue, [-0.1, -0.07, -0.02, 0.03, 0.06, 0.1], 1.0, 8.0),
    # PIL approximates the Gaussian by three box blurs: close on average, apart on sharp edges
    "blur": (lambda im, s: im.filter(ImageFilter.GaussianBlur(radius=s)), lambda x, s: D.gaussian_blur(x, s, 2.0),
             [0.1, 0.5, 1.0, 2.0], 1.0, 32.0),
}


@pytest.mark.parametrize("name", list(OPS))
def test_each_operation_matches_the_worker_path(photos, name):
    pil_op, device_op, values, mean_tol, max_tol = OPS[name]
    for img in photos:
        for v in values:
            mean, worst = gap(levels(pil_op(img, v)), device_op(levels(img), torch.tensor([v])))
            assert mean <= mean_tol and worst <= max_tol, (name, v, mean, worst)
    if name == "hue":  # the 8-bit HSV rounding moves few pixels by more than 4 levels
        x = levels(photos[0])
        d = (levels(F.adjust_hue(photos[0], 0.1)) - D.adjust_hue(x, torch.tensor([0.1]))).abs() * 255
        assert (d > 4).float().mean() < 0.01


def test_grayscale_and_solarize_match_the_worker_path(photos):
    for img in photos:
        x = levels(img)
        mean, worst = gap(levels(F.rgb_to_grayscale(img, num_output_channels=3)), D.grayscale(x).expand(-1, 3, -1, -1))
        assert mean <= 0.5 and worst <= 1.0
        assert torch.allclose(levels(ImageOps.solarize(img, threshold=128)), D.solarize(x), atol=1e-6, rtol=0)


def test_device_batch_equals_worker_crops_for_the_same_draws(photos):
    """The whole chain, every crop of a batch: same seeds -> same draws -> (nearly) the same pixels;
    the per-sample parameters really reach their own crop (a batch, not one setting for all)."""
    kw = dict(global_size=64, local_size=32, n_local_crops=3)
    workers, device = MultiCropAugmentation(**kw), MultiCropAugmentation(**kw)
    device.on_device = True
    samples = {}
    for aug, key in ((workers, "w"), (device, "d")):
        out = []
        for seed in range(8):
            random.seed(seed)
            torch.manual_seed(seed)
            out.append({"image": aug(photos[seed % 2]), "label": 0, "index": seed, "bad": []})
        samples[key] = collate_multicrop(out)
    expected, got = samples["w"], device.finish(samples["d"])
    assert "params" not in got and all(c.dtype == torch.float32 for c in got["crops"])
    assert torch.equal(expected["boxes"], got["boxes"]) and torch.equal(expected["flips"], got["flips"])
    std = torch.tensor(workers.std).reshape(1, 3, 1, 1)
    means = []
    for a, b in zip(expected["crops"], got["crops"]):
        d = ((a - b).abs() * std * 255).flatten(1)
        means += d.mean(dim=1).tolist()
        assert d.mean() <= 1.5, d.mean()
    assert max(means) <= 4.0, max(means)  # every single crop close, blur included


@pytest.mark.parametrize("size", [24, 64, 150])
def test_device_cut_matches_pil_bicubic(photos, size):
    """The workers' cut on the device path (torch's antialiased bicubic on uint8) against PIL's
    bicubic crop-resize of the worker path, shrinking, near 1:1 and enlarging: within 4 levels."""
    aug = MultiCropAugmentation(global_size=size, local_size=size, n_local_crops=0)
    aug.on_device = True
    for seed in range(4):
        torch.manual_seed(seed)
        draws = aug.draw(120, 160)
        img = photos[seed % 2]
        pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]
        for d in draws:
            crop, box = aug._cut_uint8(pixels, d, img.size)
            assert box == list(d.box)
            d_levels = (F.pil_to_tensor(aug._cut(img, d)).int() - crop.int()).abs()
            assert d_levels.float().mean() <= 0.2 and d_levels.max() <= 4, (size, d.box)  # 0.14 and 4 measured


def test_drawn_parameters_follow_the_recipe():
    aug = MultiCropAugmentation(n_local_crops=4)
    n = 3000
    draws = [aug.draw(375, 500) for _ in range(n)]

    def rate(values: list[bool], p: float) -> None:
        sd = max((p * (1 - p) / len(values)) ** 0.5, 1e-9)
        assert abs(sum(values) / len(values) - p) <= 4 * sd + 1e-9, (sum(values) / len(values), p)

    views = [d for sample in draws for d in sample]
    rate([d.flip for d in views], 0.5)
    rate([d.jitter for d in views], 0.8)
    rate([d.gray for d in views], 0.2)
    for kind, (blur, sol) in enumerate(zip(aug.blur_p, aug.solarize_p)):
        chosen = [s[kind] for s in draws] if kind < 2 else [d for s in draws for d in s[2:]]
        rate([d.sigma > 0 for d in chosen], blur)
        rate([d.solarize for d in chosen], sol)
        assert all(0.1 <= d.sigma <= 2.0 for d in chosen if d.sigma > 0)
    jittered = [d for d in views if d.jitter]
    for position in range(4):
        for op in range(4):
            rate([d.order[position] == op for d in jittered], 0.25)
    for k, (lo, hi) in enumerate(aug.jitter_ranges):
        values = torch.tensor([d.factors[k] for d in jittered])
        assert lo <= values.min() and values.max() <= hi
        assert abs(values.mean().item() - (lo + hi) / 2) < 4 * (hi - lo) / (12 * len(values)) ** 0.5
    assert all(d.factors == (1.0, 1.0, 1.0, 0.0) and d.order == (0, 1, 2, 3) for d in views if not d.jitter)


# -- in the loop: every method trains with both settings -------------------------------------------
def _tiny_run(data, out, *extra):
    from conftest import logged_losses, run_training

    if "method.name=simsiam" in extra:  # a tiny ResNet (SimSiam's recipe), two 32 px views
        from test_simsiam import SIMSIAM, train

        train(data, out, *SIMSIAM, "train.epochs=1", "data.global_crop_size=32", *extra[1:])
    else:
        run_training(data, out, "train.epochs=1", "model.drop_path_rate=0.0", "data.global_crop_size=32",
                     "model.img_size=32", "data.local_crop_size=16", *extra)
    return logged_losses(out)


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("method", [
    ["method.name=dino"], ["method.name=glsd"], ["method.name=patchwise_dino"], ["method.name=dinov2"],
    ["method.name=simsiam"]])
def test_training_on_device_augmentation_follows_the_worker_path(photo_folder, tmp_path, method):
    """Same draws, crops within a level or so: the same run's losses agree step by step within 1 %
    (SimSiam's negative cosine, near 0 here: within 0.01 of its range [-1, 1]). Skipping the colour
    jitter on the device moves them by 2-15 %."""
    workers = _tiny_run(photo_folder, tmp_path / "w", *method, "data.augment_on=workers")
    device = _tiny_run(photo_folder, tmp_path / "d", *method, "data.augment_on=device")
    assert len(device) == len(workers) == 2
    for a, b in zip(workers, device):
        assert abs(a - b) <= (0.01 if method == ["method.name=simsiam"] else 0.01 * abs(a)), (workers, device)


@pytest.fixture
def photo_folder(tmp_path):
    """Class folders of real photo crops (the equivalence needs texture, not flat colours)."""
    rng = torch.Generator().manual_seed(0)
    for name in ("china.jpg", "flower.jpg"):
        photo = Image.fromarray(load_sample_image(name))
        (tmp_path / "photos" / name[:-4]).mkdir(parents=True)
        for i in range(8):
            top, left = (int(v) for v in torch.randint(0, 300, (2,), generator=rng))
            photo.crop((left, top, left + 96, top + 72)).save(tmp_path / "photos" / name[:-4] / f"{i}.jpg")
    return tmp_path / "photos"


def test_fd_view_is_normalised_on_the_device_as_in_the_workers(photos):
    from selfdistill.data import SingleViewAugmentation as FDTransform

    workers, device = FDTransform(32), FDTransform(32)
    device.on_device = True
    torch.manual_seed(0)
    expected = workers(photos[0])
    torch.manual_seed(0)
    cut = device(photos[0])
    assert cut.dtype == torch.uint8
    got = device.finish({"image": cut[None]})["image"][0]
    assert torch.allclose(expected, got, atol=1e-5, rtol=0)


def test_augment_on_is_checked_and_resolved():
    from selfdistill.configkit import ConfigError
    from selfdistill.data import augment_on_device
    from selfdistill.recipe import load_config

    with pytest.raises(ConfigError, match="augment_on"):
        load_config(None, ["data.augment_on=gpu"])
    assert augment_on_device("device") and not augment_on_device("workers")
    assert augment_on_device("auto") == torch.cuda.is_available() and not augment_on_device("auto", cpu=True)


def test_large_jpegs_are_decoded_at_the_scale_the_crops_need(photos, tmp_path):
    """A 1600 x 1200 JPEG: the crops drawn before decoding allow a 1/2 or 1/4 DCT decode; the draws
    are the worker path's (same boxes, flips) and the finished crops stay close to it."""
    from selfdistill.data import ImageFolderDataset
    from selfdistill.data.folder import decode_rgb

    (tmp_path / "big" / "a").mkdir(parents=True)
    for i, img in enumerate(photos):
        img.resize((1600, 1200), Image.BICUBIC).save(tmp_path / "big" / "a" / f"{i}.jpg", quality=92)
    kw = dict(global_size=64, local_size=32, n_local_crops=3)
    workers, device = MultiCropAugmentation(**kw), MultiCropAugmentation(**kw)
    device.on_device = True
    reduced = decode_rgb(tmp_path / "big" / "a" / "0.jpg", plan=device.plan, seed=3)
    assert reduced.width < 1600 and reduced.info["full_size"] == (1600, 1200)
    w_set, d_set = (ImageFolderDataset(tmp_path / "big", transform=t, seed=5) for t in (workers, device))
    batches = [collate_multicrop([ds[(1, i)] for i in range(2) for _ in range(1)]) for ds in (w_set, d_set)]
    expected, got = batches[0], device.finish(batches[1])
    # the boxes cut at the reduced scale: the drawn ones rounded to the decoded grid, and recorded as cut
    reduction = 1600 / reduced.width
    assert 0 < (expected["boxes"] - got["boxes"]).abs().max() <= reduction
    assert torch.equal(expected["flips"], got["flips"]) and torch.equal(expected["image_size"], got["image_size"])
    std = torch.tensor(workers.std).reshape(1, 3, 1, 1)
    for a, b in zip(expected["crops"], got["crops"]):
        print("BIG", ((a - b).abs() * std * 255).mean().item())
