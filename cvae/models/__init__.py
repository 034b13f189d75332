"""The model wing: networks, loss terms and the Lightning module."""

from cvae.models.cvae import CVAE
from cvae.models.likelihoods import build_likelihood
from cvae.models.losses import kl_divergence
from cvae.models.networks import Decoder, Encoder, reparameterize

__all__ = ["CVAE", "Decoder", "Encoder", "build_likelihood", "kl_divergence", "reparameterize"]
