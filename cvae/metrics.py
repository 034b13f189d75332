"""What a trained VAE is worth, as maths over batches: likelihood bounds, reconstruction
quality and how much of each latent level it uses. `cvae.evaluation` runs them over a whole
split (chunks, resuming, files); training's callbacks run them on validation batches."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from cvae.models import CVAE
from cvae.models.latents import Posterior
from cvae.pixels import dequantize, is_binary, unit_range

log = logging.getLogger(__name__)
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): Var_x E_q[z_d] above this is "active"
PER_IMAGE = ("iw_nll", "neg_elbo", "recon", "kl", "mse_per_pixel", "psnr", "ssim")
CHANNELS = ("red", "green", "blue")  # colour metrics are for images of three channels
COLOUR_BINS = 32  # intensity bins of a channel's histogram
KLPerDimension = Callable[[Posterior], tuple[torch.Tensor, ...]]


class PosteriorStatistics:
    """Running mean and variance over the data of each latent's posterior mean, and the mean
    KL of each latent, for every latent level (kept side by side, `sizes` latents each):
    enough for active units without keeping every mean. Active units depend on the
    posterior only; the KL per latent is the model's (`CVAE.kl_per_dimension`: under a
    mixture prior, each dimension's KL to the prior's marginal there). `kl_images` caps the
    images the KL is averaged over (None: all): a mixture prior's marginal KL costs
    `components` times a factorised one's."""

    def __init__(self, kl_images: int | None = None) -> None:
        self.kl_images = kl_images
        self.count = 0
        self.kl_count = 0
        self.sizes: list[int] = []
        self.sum: torch.Tensor | None = None
        self.sum_squares: torch.Tensor | None = None
        self.kl_sum: torch.Tensor | None = None

    def update(self, posterior: Posterior, kl_per_dimension: KLPerDimension) -> None:
        """Add a batch's posterior; `kl_per_dimension`: the model's."""
        means = torch.cat([level.mu.detach().double() for level in posterior.levels], dim=1)
        if self.sum is None:
            self.sizes = [level.mu.shape[1] for level in posterior.levels]
            self.sum, self.sum_squares, self.kl_sum = (torch.zeros_like(means[0]) for _ in range(3))
        self.count += len(means)
        self.sum += means.sum(0)
        self.sum_squares += means.pow(2).sum(0)
        room = len(means) if self.kl_images is None else max(self.kl_images - self.kl_count, 0)
        if room:
            capped = posterior.map(lambda t: t[:room].detach().double())
            self.kl_sum += torch.cat(kl_per_dimension(capped), dim=1).sum(0)
            self.kl_count += len(capped)

    def sum_over_ranks(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Make these the statistics of every rank's data: `reduce` sums a tensor over the
        ranks (data-parallel validation, where each rank sees a share)."""
        counts = torch.tensor(
            [float(self.count), float(self.kl_count)], dtype=torch.float64, device=self.sum.device
        )
        packed = reduce(torch.cat([counts, self.sum, self.sum_squares, self.kl_sum]))
        self.count, self.kl_count = int(packed[0]), int(packed[1])
        self.sum, self.sum_squares, self.kl_sum = packed[2:].split(len(self.sum))

    def state(self) -> dict:
        """Plain values to save with a chunk of results (see `merge`)."""
        return {
            "count": self.count,
            "kl_count": self.kl_count,
            "sizes": list(self.sizes),
            "sum": self.sum,
            "sum_squares": self.sum_squares,
            "kl_sum": self.kl_sum,
        }

    def merge(self, state: dict) -> None:
        """Add the statistics of another share of the data (a `state()`)."""
        if self.sum is None:
            self.sizes = list(state.get("sizes") or [len(state["sum"])])
            self.sum, self.sum_squares, self.kl_sum = (
                torch.zeros_like(state["sum"]) for _ in range(3)
            )
        self.count += state["count"]
        self.kl_count += state["kl_count"]
        self.sum += state["sum"]
        self.sum_squares += state["sum_squares"]
        self.kl_sum += state["kl_sum"]

    def variance(self) -> torch.Tensor:
        mean = self.sum / self.count
        return (self.sum_squares / self.count - mean.pow(2)).clamp_min(0)

    def active_units(self) -> int:
        return int((self.variance() > ACTIVE_UNIT_THRESHOLD).sum())

    def active_units_per_level(self) -> list[int]:
        active = self.variance() > ACTIVE_UNIT_THRESHOLD
        return [int(part.sum()) for part in active.split(self.sizes)]

    def kl_per_dim(self) -> torch.Tensor:
        return self.kl_sum / self.kl_count


def is_colour(images: torch.Tensor) -> bool:
    """Images of three channels (RGB), those the colour metrics describe."""
    return images.dim() == 4 and images.shape[1] == len(CHANNELS)


def colour_histogram(images: torch.Tensor, bins: int = COLOUR_BINS) -> torch.Tensor:
    """Pixel counts per channel and intensity bin, `(C, bins)` (float64, on the CPU), of
    images in [0, 1] (uint8: scaled): histograms of batches add up."""
    x = unit_range(images).detach()
    index = (x * bins).long().clamp_(0, bins - 1).transpose(0, 1).reshape(x.shape[1], -1)
    counts = torch.zeros(x.shape[1], bins, dtype=torch.float64, device=x.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float64))
    return counts.cpu()


def colour_distance(real: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per channel, how far `other`'s intensities lie from `real`'s (`colour_histogram`s):
    the Wasserstein-1 distance between the two distributions, in [0, 1] intensity units
    (0.1: on average a tenth of the range away; a reddish cast shows as red's)."""
    cdf = [(h / h.sum(1, keepdim=True)).cumsum(1) for h in (real, other)]
    return (cdf[0] - cdf[1]).abs().sum(1) / real.shape[1]


def channel_errors(reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of each image's reconstruction per channel, `(B, C)`, on [0, 1]
    pixels: which colour a model gets wrong."""
    return (reconstructions - unit_range(images)).abs().mean(dim=(2, 3))


def named(values: torch.Tensor) -> dict[str, float]:
    """`{"red": ..., "green": ..., "blue": ...}` of a value per channel, rounded."""
    return {name: round(float(v), 6) for name, v in zip(CHANNELS, values, strict=True)}


def image_metrics(
    model: CVAE,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    iw_samples: int,
    generator: torch.Generator,
    max_decodes: int | None = 1024,
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """Per-image results of a batch of images (uint8 or [0, 1]) with their `labels` (a
    conditional model's classes, else None), its posterior statistics and whether its images
    are binary: what an evaluation chunk holds. A continuous likelihood is scored on
    dequantised images (`pixels.dequantize`, noise from `generator`), so its bounds are on
    the 8-bit data. Nothing is read back to the host until the batch is done. `decoder`:
    see `CVAE.log_likelihood`."""
    images = images.to(model.device)
    with torch.inference_mode():
        clean = unit_range(images)
        x = dequantize(images, model.likelihood.continuous, generator)
        log_px, kl_levels, posterior = model.elbo_terms(x, labels, generator=generator)
        kl = kl_levels.sum(0)
        nll = -model.log_likelihood(
            x, labels, k=iw_samples, generator=generator, max_decodes=max_decodes, decoder=decoder
        )
        mean_decoded = model.reconstruct(clean, labels)
        statistics = PosteriorStatistics()
        statistics.update(posterior, model.kl_per_dimension)
        values = {
            "iw_nll": nll,
            "neg_elbo": kl - log_px,
            "recon": -log_px,
            "kl": kl,
            "mse_per_pixel": (mean_decoded - clean).pow(2).flatten(1).mean(1),
            "psnr": peak_signal_noise_ratio(
                mean_decoded, clean, data_range=1.0, reduction="none", dim=(1, 2, 3)
            ),
            "ssim": structural_similarity_index_measure(
                mean_decoded, clean, data_range=1.0, reduction="none"
            ),
        }
    return {
        "images": len(images),
        "values": {name: value.double().cpu() for name, value in values.items()},
        "kl_levels": kl_levels.T.double().cpu(),  # (B, levels): each level's KL, summing to kl
        "posterior": {
            k: v.cpu() if torch.is_tensor(v) else v for k, v in statistics.state().items()
        },
        "binary": is_binary(images),
        "dims": images[0].numel(),
        **({"colour": colour_terms(mean_decoded, clean)} if is_colour(images) else {}),
    }


def colour_terms(reconstructions: torch.Tensor, images: torch.Tensor) -> dict:
    """What an evaluation chunk keeps of colour: each image's per-channel error and the
    colour histograms of the images and their reconstructions (summed over chunks)."""
    return {
        "errors": channel_errors(reconstructions, images).double().cpu(),
        "real": colour_histogram(images),
        "reconstructions": colour_histogram(reconstructions),
    }


def combine(chunks: list[dict], model: CVAE, iw_samples: int) -> dict:
    """The metrics of an evaluation from its chunks (`image_metrics` results), in order:
    the same whether they were computed in one run or across interrupted ones."""
    values = {name: torch.cat([c["values"][name] for c in chunks]) for name in PER_IMAGE}
    count, dims = len(values["iw_nll"]), chunks[0]["dims"]
    binary = all(c["binary"] for c in chunks)
    posterior = PosteriorStatistics()
    for chunk in chunks:
        posterior.merge(chunk["posterior"])
    metrics = {
        name: float(values[name].mean()) for name in PER_IMAGE if name not in ("psnr", "ssim")
    }
    bits = model.likelihood.bits_per_dim(metrics["iw_nll"], dims, binary)
    if bits is None:
        log.warning(
            "a Bernoulli likelihood on non-binary images is not a density: its NLL means "
            "nothing and bits/dim are not reported (evaluate with data.binarize=true)"
        )
    metrics.update(
        bits_per_dim=bits,
        images=count,
        iw_samples=iw_samples,
        binary_data=binary,
        proper_density=bits is not None,
        conditional=model.conditional,  # likelihoods of x given its class: log p(x | y)
        psnr=float(values["psnr"].mean()),
        ssim=float(values["ssim"].mean()),
        active_units=posterior.active_units(),
        latent_dim=int(sum(posterior.sizes)),
        kl_per_dim=[round(v, 6) for v in posterior.kl_per_dim().tolist()],
    )
    if all("colour" in c for c in chunks):  # RGB images (chunks of older runs have none)
        colour = [c["colour"] for c in chunks]
        metrics["mae_per_channel"] = named(torch.cat([c["errors"] for c in colour]).mean(0))
        real = sum(c["real"] for c in colour)
        reconstructions = sum(c["reconstructions"] for c in colour)
        metrics["colour_w1_reconstructions"] = named(colour_distance(real, reconstructions))
    if len(posterior.sizes) > 1:
        metrics["active_units_per_level"] = posterior.active_units_per_level()
        if all("kl_levels" in c for c in chunks):  # chunks of older runs have none
            kl_levels = torch.cat([c["kl_levels"] for c in chunks]).mean(0)
            metrics["kl_per_level"] = [round(v, 6) for v in kl_levels.tolist()]
    return metrics
