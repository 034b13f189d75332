"""The model wing: networks, loss terms and the Lightning module.

`MODELS` names every model class a checkpoint may hold (`model_class` in the checkpoint,
written by the model; checkpoints without it are `CVAE`'s): `from_checkpoint` builds the
right one, so the commands load any model family the same way.
"""

from __future__ import annotations

import torch

from cvae.models.cvae import CVAE
from cvae.models.hvae import HVAE
from cvae.models.likelihoods import build_likelihood
from cvae.models.losses import kl_divergence
from cvae.models.networks import Decoder, Encoder, reparameterize

MODELS: dict[str, type[CVAE]] = {"CVAE": CVAE, "HVAE": HVAE}


def from_checkpoint(checkpoint: dict, map_location: torch.device | str | None = None) -> CVAE:
    """The model a loaded checkpoint dict holds, of the class it names, in eval mode
    (`CVAE.from_checkpoint`)."""
    return CVAE.from_checkpoint(checkpoint, map_location)


__all__ = [
    "CVAE",
    "HVAE",
    "MODELS",
    "Decoder",
    "Encoder",
    "build_likelihood",
    "from_checkpoint",
    "kl_divergence",
    "reparameterize",
]
