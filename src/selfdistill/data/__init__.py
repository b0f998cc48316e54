"""Data: DINO multi-crop augmentation with crop geometry, image folders, collation."""

from selfdistill.data.collate import collate_eval, collate_multicrop
from selfdistill.data.folder import (
    IMAGE_EXTENSIONS,
    BadSampleTracker,
    ImageFolderDataset,
    sample_seed,
    seeded_rng,
)
from selfdistill.data.multicrop import (
    EvalTransform,
    MultiCropAugmentation,
    crop_pixel_centres,
    sample_crop_box,
    token_centres,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadSampleTracker",
    "EvalTransform",
    "ImageFolderDataset",
    "MultiCropAugmentation",
    "collate_eval",
    "collate_multicrop",
    "crop_pixel_centres",
    "sample_crop_box",
    "sample_seed",
    "seeded_rng",
    "token_centres",
]
