"""What a trained VAE is worth: likelihood bounds, bits per dimension, reconstruction quality
and how much of the latent space it uses, over a whole split."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from cvae.models import CVAE
from cvae.models.losses import kl_per_dimension
from cvae.models.networks import unit_range

log = logging.getLogger(__name__)
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): Var_x E_q[z_d] above this is "active"


def is_binary(images: torch.Tensor) -> bool:
    """Whether uint8 images hold only 0 and 255 (or float images only 0 and 1)."""
    top = 255 if images.dtype == torch.uint8 else 1
    return bool(((images == 0) | (images == top)).all())


def likelihood_input(
    images: torch.Tensor, continuous: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """What the likelihood is evaluated on: for a continuous density, 8-bit images
    dequantised, (x + u) / 256 with u ~ U(0, 1), so that it bounds the probability of the
    8-bit values (Theis et al., 2016); for a probability of binary images, the images."""
    if not continuous or images.dtype != torch.uint8:
        return unit_range(images)
    noise = torch.rand(images.shape, generator=generator).to(images.device)
    return (images.float() + noise) / 256


class PosteriorStatistics:
    """Running mean and variance over the data of each latent's posterior mean, and the mean
    KL of each latent: enough for active units without keeping every `mu`."""

    def __init__(self) -> None:
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.sum_squares: torch.Tensor | None = None
        self.kl_sum: torch.Tensor | None = None

    def update(self, mu: torch.Tensor, log_var: torch.Tensor) -> None:
        mu, log_var = mu.detach().double(), log_var.detach().double()
        kl = kl_per_dimension(mu, log_var)
        if self.sum is None:
            self.sum, self.sum_squares, self.kl_sum = (torch.zeros_like(mu[0]) for _ in range(3))
        self.count += len(mu)
        self.sum += mu.sum(0)
        self.sum_squares += mu.pow(2).sum(0)
        self.kl_sum += kl.sum(0)

    def sum_over_ranks(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Make these the statistics of every rank's data: `reduce` sums a tensor over the
        ranks (data-parallel validation, where each rank sees a share)."""
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device)
        packed = reduce(torch.cat([count, self.sum, self.sum_squares, self.kl_sum]))
        self.count = int(packed[0])
        self.sum, self.sum_squares, self.kl_sum = packed[1:].split(len(self.sum))

    def variance(self) -> torch.Tensor:
        mean = self.sum / self.count
        return (self.sum_squares / self.count - mean.pow(2)).clamp_min(0)

    def active_units(self) -> int:
        return int((self.variance() > ACTIVE_UNIT_THRESHOLD).sum())

    def kl_per_dim(self) -> torch.Tensor:
        return self.kl_sum / self.count


def evaluate(
    model: CVAE,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    iw_samples: int = 1000,
    seed: int = 0,
    max_images: int | None = None,
) -> dict:
    """Per-image means over `batches` (uint8 or [0, 1] images), in nats unless named.

    `neg_elbo` = `recon` + `kl` and `iw_nll` (importance weighted, `iw_samples` samples) are
    negative log-likelihoods with the decoder's proper density, on binary images as they are
    or on dequantised 8-bit images; `bits_per_dim` converts `iw_nll` to bits per pixel value
    of the discrete data. `mse_per_pixel`, `psnr` (dB) and `ssim` compare the images with
    the decoding of their posterior means. A conditional model is evaluated with each image's
    label: its likelihoods are of x given its class, log p(x | y) (`conditional` says so).
    """
    generator = torch.Generator().manual_seed(seed)
    device = model.device
    psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
    psnr, ssim = psnr.to(device), ssim.to(device)
    posterior = PosteriorStatistics()
    totals = {"neg_elbo": 0.0, "recon": 0.0, "kl": 0.0, "iw_nll": 0.0, "mse_per_pixel": 0.0}
    count, binary, dims = 0, True, 0
    continuous = model.likelihood.continuous
    model.eval()
    for images, labels in batches:
        labels = labels if model.conditional else None
        if max_images is not None:
            images = images[: max_images - count]
            labels = labels[: len(images)] if labels is not None else None
        if len(images) == 0:
            break
        images = images.to(device)
        binary = binary and is_binary(images)
        with torch.no_grad():
            clean = unit_range(images)
            x = likelihood_input(images, continuous, generator)
            log_px, kl, mu, log_var = model.elbo_terms(x, labels, generator=generator)
            recon = -log_px
        nll = -model.log_likelihood(x, labels, k=iw_samples, generator=generator)
        mean_decoded = model.reconstruct(clean, labels)
        posterior.update(mu, log_var)
        psnr.update(mean_decoded, clean)
        ssim.update(mean_decoded, clean)
        totals["neg_elbo"] += float((recon + kl).sum())
        totals["recon"] += float(recon.sum())
        totals["kl"] += float(kl.sum())
        totals["iw_nll"] += float(nll.sum())
        totals["mse_per_pixel"] += float((mean_decoded - clean).pow(2).flatten(1).mean(1).sum())
        count += len(images)
        dims = images[0].numel()
        if max_images is not None and count >= max_images:
            break
    if count == 0:
        raise ValueError("no images to evaluate")
    metrics = {name: value / count for name, value in totals.items()}
    # A density on [0, 1] bounds the 8-bit data's probability once ln 256 per value is added;
    # a Bernoulli is a probability only of binary data, and means nothing as NLL otherwise.
    offset = dims * math.log(256) if continuous else 0.0
    proper = continuous or binary
    bits = (metrics["iw_nll"] + offset) / (dims * math.log(2))
    if not proper:
        log.warning(
            "a Bernoulli likelihood on non-binary images is not a density: its NLL means "
            "nothing and bits/dim are not reported (evaluate with data.binarize=true)"
        )
    metrics.update(
        bits_per_dim=bits if proper else None,
        images=count,
        iw_samples=iw_samples,
        binary_data=binary,
        proper_density=proper,
        conditional=model.conditional,  # likelihoods of x given its class: log p(x | y)
        psnr=float(psnr.compute()),
        ssim=float(ssim.compute()),
        active_units=posterior.active_units(),
        latent_dim=int(model.hparams.latent_dim),
        kl_per_dim=[round(v, 6) for v in posterior.kl_per_dim().tolist()],
    )
    return metrics
