"""cvae: convolutional variational autoencoders with PyTorch Lightning and Hydra.

The public names load on first use: `import cvae` (and every `--help`) stays fast, and
Lightning is imported only once a model or data module is asked for.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cvae.data import ImageDataModule
    from cvae.models import CVAE
    from cvae.pixels import unit_range
    from cvae.viz import visualize_batch

_HOMES = {
    "CVAE": "cvae.models",
    "ImageDataModule": "cvae.data",
    "unit_range": "cvae.pixels",
    "visualize_batch": "cvae.viz",
}
__all__ = ["CVAE", "ImageDataModule", "unit_range", "visualize_batch"]
__version__ = version("cvae")


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'cvae' has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
