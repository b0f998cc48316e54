"""Image-folder datasets with per-sample seeded augmentation and tolerant decoding.

Two layouts are recognised: ``root/<class>/**/<image>`` (labelled, classes sorted by name) and
``root/<image>`` (unlabelled, label ``-1``). Items can be requested as ``dataset[index]`` or
``dataset[(epoch, index)]``; the transform then runs under RNGs seeded from
``(seed, epoch, index)``, so a sample's augmentation does not depend on the number of workers,
on which worker loads it, or on whether the run was resumed.

An image that cannot be decoded is logged and replaced by the next readable one, so every batch
keeps its size; the bad paths travel with the sample in ``"bad"`` (``"bad_draws"``: 1 when the
drawn image itself was unreadable) and :class:`BadSampleTracker` turns those reports into a hard
failure once too large a fraction of the data is unreadable.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import operator
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "BadSampleTracker", "sample_seed", "seeded_rng"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A stable 63-bit seed for one sample in one epoch.

    A cryptographic hash (rather than ``seed + epoch * n + index``) keeps neighbouring samples and
    epochs statistically unrelated, and unlike ``hash()`` it is identical in every process.
    """
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed Python's ``random`` and torch's CPU generator, restoring both states on exit.

    Only the CPU generator is touched (not ``torch.manual_seed``, which also reseeds CUDA), so with
    ``num_workers=0`` the training process's own random streams are left exactly as they were.
    """
    py_state = random.getstate()
    torch_state = torch.get_rng_state()
    random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        torch.set_rng_state(torch_state)


def _has_extension(name: str, extensions: tuple[str, ...]) -> bool:
    return name.lower().endswith(extensions)


def _find_images(folder: Path, extensions: tuple[str, ...]) -> list[str]:
    """All images below ``folder`` (following symlinks, skipping hidden entries), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in filenames
                     if not f.startswith(".") and _has_extension(f, extensions))
    return sorted(found)


def decode_rgb(source: Any, draft_size: int = 0, plan: Callable[[int, int], Any] | None = None,
               seed: int = 0) -> Image.Image:
    """Fully decode an image (path or file object) as RGB; truncated or corrupt data raise here,
    not in the transform. ``draft_size > 0``: a JPEG is decoded at the smallest DCT scale (1/2, 1/4,
    1/8) whose sides are still at least ``draft_size`` pixels, several times cheaper than full size.

    ``plan`` (a transform that cuts crops for the device): called with the full ``(width, height)``
    under the sample's seeded RNG, it returns ``(draws, reduction)``; a JPEG is then decoded at that
    DCT reduction, and the draws and the full size travel in the image's ``info`` to the transform."""
    with Image.open(source) as img:
        full = img.size
        planned = None
        if plan is not None:
            with seeded_rng(seed):
                planned = plan(*full)
        if planned is not None and planned[1] > 1 and img.format == "JPEG":
            img.draft("RGB", (math.ceil(full[0] / planned[1]), math.ceil(full[1] / planned[1])))
        elif draft_size > 0 and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        rgb = img.convert("RGB")
    if planned is not None:
        rgb.info.update(crop_draws=planned[0], full_size=full)
    return rgb


class ImageFolderDataset(Dataset):
    """Images below ``root``, labelled by class sub-folder when there are any.

    ``__getitem__`` accepts an ``int`` index (epoch 0) or an ``(epoch, index)`` tuple and returns
    ``{"image", "label", "index", "bad"}``. ``"index"`` and ``"label"`` describe the image actually
    returned, which differs from the requested one when that was unreadable; ``"bad"`` lists every
    unreadable path met on the way.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        seed: int = 0,
        draft_size: int = 0,
    ) -> None:
        self.root = Path(root)
        self.draft_size = draft_size
        self.transform = transform
        self.extensions = tuple(e.lower() for e in extensions)
        self.seed = seed
        self._warned: set[str] = set()

        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist or is not a directory")
        self.classes, self.samples = self._scan()
        self.labelled = bool(self.classes)
        if not self.samples:
            raise ValueError(f"no images with extensions {list(self.extensions)} found in {str(self.root)!r}")

    def _scan(self) -> tuple[list[str], list[tuple[str, int]]]:
        """Class sub-folders make the dataset labelled; otherwise the images directly in root."""
        entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
        loose = [e.path for e in entries if e.is_file() and _has_extension(e.name, self.extensions)
                 and not e.name.startswith(".")]
        if not class_dirs:
            return [], [(path, -1) for path in loose]

        if loose:
            logger.warning("%s has class folders; ignoring %d images lying directly in it",
                           self.root, len(loose))
        classes = [d.name for d in class_dirs]
        samples = []
        for label, d in enumerate(class_dirs):
            images = _find_images(Path(d.path), self.extensions)
            if not images:
                logger.warning("class folder %s holds no images with extensions %s", d.path,
                               list(self.extensions))
            samples.extend((path, label) for path in images)
        return classes, samples

    @property
    def targets(self) -> list[int]:
        """Label of every sample, in order (``-1`` everywhere when unlabelled)."""
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _parse_key(self, key: int | tuple[int, int]) -> tuple[int, int]:
        if isinstance(key, tuple):
            epoch, index = map(operator.index, key)
        else:
            epoch, index = 0, operator.index(key)
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for dataset of size {n}")
        return epoch, index % n

    def _read_first_good(self, index: int, seed: int) -> tuple[Image.Image, int, list[str]]:
        """Decode sample ``index``, or the next readable one after it (wrapping round)."""
        bad: list[str] = []
        errors: list[Exception] = []
        n = len(self.samples)
        plan = getattr(self.transform, "plan", None)
        for offset in range(n):
            current = (index + offset) % n
            path = self.samples[current][0]
            try:
                img = decode_rgb(path, self.draft_size, plan, seed)
            except Exception as err:  # noqa: BLE001 - PIL raises many types on bad data
                bad.append(path)
                errors.append(err)
                continue
            for bad_path, err in zip(bad, errors):  # warned only now: a folder with none readable is one error
                self._report_bad(bad_path, err)
            return img, current, bad
        raise BadDataError(f"none of the {n} images in {str(self.root)!r} can be read (the first, {bad[0]}: "
                           f"{type(errors[0]).__name__}); point data.path at a folder of images")

    def _report_bad(self, path: str, err: Exception) -> None:
        """Warn once per file per process; later hits of the same file only go to debug."""
        level = logging.DEBUG if path in self._warned else logging.WARNING
        self._warned.add(path)
        logger.log(level, "skipping unreadable image %s (%s: %s)", path, type(err).__name__, err)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = self._parse_key(key)
        seed = sample_seed(self.seed, epoch, index)
        img, used, bad = self._read_first_good(index, seed)
        if self.transform is not None:
            with seeded_rng(seed):
                img = self.transform(img)
        return {"image": img, "label": self.samples[used][1], "index": used, "bad": bad, "draws": 1,
                "bad_draws": int(used != index)}

    def __repr__(self) -> str:
        kind = f"{len(self.classes)} classes" if self.labelled else "unlabelled"
        return f"{type(self).__name__}(root={str(self.root)!r}, {len(self)} images, {kind})"


class BadDataError(RuntimeError):
    """More of the data is unreadable than ``data.max_bad_fraction`` allows."""


class BadSampleTracker:
    """Counts unreadable images reported in batches and fails when there are too many.

    A few corrupt files in a large dataset are tolerated (they are replaced), but a mostly broken
    dataset must stop the run instead of silently training on duplicates. The fraction is over
    *draws*: a sampler draw whose own image was unreadable counts once, however many bad files the
    replacement then walked past (a cluster of bad files is met all at once, but each is drawn only
    as often as any other file), so it estimates the dataset's bad fraction without bias and never
    exceeds 1. The distinct unreadable files met are kept to name them. Counts are per process;
    :meth:`combined` merges every rank's.
    """

    max_shown_paths = 20

    def __init__(self) -> None:
        self.bad: dict[str, None] = {}  # distinct unreadable files, in the order met
        self.n_draws = 0
        self.n_bad_draws = 0

    def update(self, bad_paths: Sequence[str], draws: int, bad_draws: int) -> None:
        """Add one batch: its ``"bad"`` paths, ``"draws"`` and ``"bad_draws"``."""
        self.bad.update(dict.fromkeys(bad_paths))
        self.n_draws += draws
        self.n_bad_draws += bad_draws

    @property
    def n_bad(self) -> int:
        """Distinct unreadable files met."""
        return len(self.bad)

    @property
    def fraction(self) -> float:
        return self.n_bad_draws / self.n_draws if self.n_draws else 0.0

    def lower_bound(self, z: float = 4.0) -> float:
        """Wilson score lower bound of the bad fraction: the check runs at every log step, so a single
        look must be very unlikely (z=4: about 3 in 100,000) to fail a dataset within the limit."""
        n = self.n_draws
        if n == 0:
            return 0.0
        p, z2 = self.fraction, z * z
        spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
        return max(0.0, (p + z2 / (2 * n) - spread) / (1 + z2 / n))

    def check(self, max_fraction: float, min_draws: int = 1000, whole: bool = False) -> None:
        """Raise when the bad fraction is over ``max_fraction``.

        During an epoch the draws are a sample of the data, so the run stops once even the
        :meth:`lower_bound` is over the limit (after ``min_draws`` draws): a mostly broken dataset
        fails within the first batches, a slightly-over one as soon as the evidence is clear. With
        ``whole`` (the draws cover whole epochs: every image drawn as often as every other) the
        observed fraction itself is the dataset's and is compared.
        """
        if whole:
            over = self.fraction > max_fraction
        else:
            over = self.n_draws >= min_draws and self.lower_bound() > max_fraction
        if not over:
            return
        shown = list(self.bad)[: self.max_shown_paths]
        sure = "" if whole else f", at least {100 * self.lower_bound():.2f}% with high confidence"
        raise BadDataError(
            f"{self.n_bad_draws} of {self.n_draws} images drawn ({100 * self.fraction:.2f}%{sure}) could not be "
            f"read, more than data.max_bad_fraction={max_fraction}; {self.n_bad} distinct unreadable files, first: "
            f"{', '.join(shown)}")

    def state_dict(self) -> dict[str, Any]:
        return {"bad": list(self.bad), "n_draws": self.n_draws, "n_bad_draws": self.n_bad_draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bad = dict.fromkeys(state.get("bad", state.get("first_bad", [])))
        self.n_draws = int(state.get("n_draws", state.get("n_seen", 0)))  # n_seen / n_bad: an older checkpoint
        self.n_bad_draws = int(state.get("n_bad_draws", state.get("n_bad", 0)))

    @classmethod
    def combined(cls, states: Sequence[dict[str, Any]]) -> BadSampleTracker:
        """One tracker for every rank's state: the union of their bad files, the sums of their draws."""
        total = cls()
        for state in states:
            part = cls()
            part.load_state_dict(state)
            total.update(list(part.bad), part.n_draws, part.n_bad_draws)
        return total
