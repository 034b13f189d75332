"""The model wing: networks, loss terms and the Lightning module."""

from cvae.models.cvae import CVAE
from cvae.models.losses import kl_divergence, reconstruction_loss
from cvae.models.networks import Decoder, Encoder, reparameterize

__all__ = ["CVAE", "Decoder", "Encoder", "kl_divergence", "reconstruction_loss", "reparameterize"]
