"""Data: the one door to images (folders, HF datasets, shards), DINO multi-crop augmentation with
crop geometry, collation, and the shard writer."""

from selfdistill.data.collate import collate_eval, collate_multicrop
from selfdistill.data.folder import (
    IMAGE_EXTENSIONS,
    BadDataError,
    BadSampleTracker,
    ImageFolderDataset,
    sample_seed,
    seeded_rng,
)
from selfdistill.data.images import ImageSet, SourceConfig, detect_format, finish_on_device, open_images
from selfdistill.data.multicrop import (
    AUGMENT_ON,
    EvalTransform,
    augment_on_device,
    MultiCropAugmentation,
    SingleViewAugmentation,
    crop_pixel_centres,
    sample_crop_box,
    to_normalized_tensor,
    token_centres,
)

__all__ = [
    "AUGMENT_ON",
    "IMAGE_EXTENSIONS",
    "BadDataError",
    "BadSampleTracker",
    "EvalTransform",
    "ImageFolderDataset",
    "ImageSet",
    "MultiCropAugmentation",
    "SingleViewAugmentation",
    "augment_on_device",
    "SourceConfig",
    "collate_eval",
    "collate_multicrop",
    "crop_pixel_centres",
    "detect_format",
    "finish_on_device",
    "open_images",
    "sample_crop_box",
    "sample_seed",
    "seeded_rng",
    "to_normalized_tensor",
    "token_centres",
]
