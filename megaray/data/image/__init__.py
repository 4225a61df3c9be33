"""Image data: image sources -> parquet shards (:func:`prepare_images`) -> fixed-size crops as Ray
datasets (:func:`image_datasets`). See ``docs/data.md`` ("Images").

Modules: :mod:`.decode` (per-image decode, orientation, RGB conversion, resize), :mod:`.records`
(read units and items), :mod:`.sources` (folders, WebDataset tars, parquet, manifests -> read
units -> images), :mod:`.skimage` (the embedded default set), :mod:`.prepare` (the prepare
stages), :mod:`.datasets` (reproducible crops for training, examples for eval artifacts).
"""

from megaray.data.image.datasets import center_box, crop_box, image_datasets, load_examples, read_manifest
from megaray.data.image.decode import (
    IMAGE_EXTS,
    ImagePrepSettings,
    RejectedImage,
    open_image,
    process_image,
    resize_shorter,
    to_rgb,
)
from megaray.data.image.prepare import prepare_images, summary
from megaray.data.image.sources import collect_units, read_unit

__all__ = [
    "IMAGE_EXTS",
    "ImagePrepSettings",
    "RejectedImage",
    "center_box",
    "collect_units",
    "crop_box",
    "image_datasets",
    "load_examples",
    "open_image",
    "prepare_images",
    "process_image",
    "read_manifest",
    "read_unit",
    "resize_shorter",
    "summary",
    "to_rgb",
]
