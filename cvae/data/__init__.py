"""The data wing: image sources, preprocessing and the Lightning data module."""

from cvae.data.datamodule import ImageDataModule
from cvae.data.decode import Preprocess, open_image
from cvae.data.folder import IMAGE_EXTENSIONS, index_folder
from cvae.data.presets import SyntheticShapes, read_idx

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDataModule",
    "Preprocess",
    "SyntheticShapes",
    "index_folder",
    "open_image",
    "read_idx",
]
