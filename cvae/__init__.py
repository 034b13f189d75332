"""cvae: convolutional variational autoencoders with PyTorch Lightning and Hydra."""

from importlib.metadata import version

from cvae.data import ImageDataModule
from cvae.models import CVAE
from cvae.models.networks import unit_range
from cvae.viz import visualize_batch

__all__ = ["CVAE", "ImageDataModule", "unit_range", "visualize_batch"]
__version__ = version("cvae")
