"""The model's settings checked before anything is built: one-line errors naming the config
key (`model.*`), so a typo fails at start-up, not as a shape error mid-network."""

from __future__ import annotations

import math
from collections.abc import Sequence

from cvae.models.likelihoods import check_recon_loss
from cvae.models.losses import BETA_SCHEDULES
from cvae.models.networks import DOWNSAMPLING, UPSAMPLING


def check_network(
    in_channels: int,
    image_size: int,
    latent_dim: int,
    hidden_channels: Sequence[int],
    kernel_size: int,
    downsample: str,
    upsample: str,
    recon_loss: str,
    beta: float,
    lr: float,
) -> None:
    """The networks' settings: sizes, widths, kernel, resampling, likelihood, beta, lr."""
    for key, value in (
        ("in_channels", in_channels),
        ("image_size", image_size),
        ("latent_dim", latent_dim),
        ("kernel_size", kernel_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"model.{key} must be a positive integer, got {value!r}")
    if not hidden_channels or not all(isinstance(c, int) and c >= 1 for c in hidden_channels):
        raise ValueError(
            "model.hidden_channels must be a non-empty list of positive widths, "
            f"got {list(hidden_channels)}"
        )
    if kernel_size < 2:
        raise ValueError(f"model.kernel_size must be >= 2, got {kernel_size}")
    if downsample not in DOWNSAMPLING:
        raise ValueError(f"model.downsample={downsample!r} is not one of {', '.join(DOWNSAMPLING)}")
    if upsample not in UPSAMPLING:
        raise ValueError(f"model.upsample={upsample!r} is not one of {', '.join(UPSAMPLING)}")
    check_recon_loss(recon_loss)
    if not isinstance(beta, (int, float)) or not beta >= 0 or math.isinf(beta):
        raise ValueError(f"model.beta must be a finite number >= 0, got {beta!r}")
    if not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ValueError(f"model.lr must be a number > 0, got {lr!r}")
    factor = 2 ** len(hidden_channels)
    if image_size < factor or image_size % factor:
        raise ValueError(
            f"model.image_size={image_size} (data.image_size) is not divisible by {factor}: "
            f"model.hidden_channels has {len(hidden_channels)} blocks, each halving the image"
        )


def check_training(
    sigma: float,
    min_sigma: float,
    beta_schedule: str,
    warmup_steps: int,
    free_bits: float,
    residual_blocks: int,
    max_bad_steps: int,
    iw_samples: int = 1,
) -> None:
    """The training aids' settings (likelihood scale, KL schedule, free bits, IWAE, bad-step
    patience): one-line errors naming the config key."""
    for key, value in (("sigma", sigma), ("min_sigma", min_sigma)):
        if not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"model.{key} must be a number > 0, got {value!r}")
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(
            f"model.beta_schedule={beta_schedule!r} is not one of {', '.join(BETA_SCHEDULES)}"
        )
    if not isinstance(residual_blocks, int) or residual_blocks < 0:
        raise ValueError(f"model.residual_blocks must be an integer >= 0, got {residual_blocks!r}")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"model.warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if not isinstance(max_bad_steps, int) or max_bad_steps < 1:
        raise ValueError(f"model.max_bad_steps must be an integer >= 1, got {max_bad_steps!r}")
    if not isinstance(free_bits, (int, float)) or free_bits < 0:
        raise ValueError(f"model.free_bits must be a number >= 0, got {free_bits!r}")
    if not isinstance(iw_samples, int) or iw_samples < 1:
        raise ValueError(f"model.iw_samples must be an integer >= 1, got {iw_samples!r}")
    if iw_samples > 1 and free_bits > 0:
        raise ValueError(
            "model.free_bits works on the ELBO's KL term: set model.free_bits=0 "
            f"with model.iw_samples={iw_samples}"
        )


def check_skip_factor(factor: object) -> None:
    """`model.skip_updates_above`: null, or a number > 1 (a factor of the running level)."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise ValueError(
            f"model.skip_updates_above must be null or a number > 1 (times the running "
            f"gradient-norm level), got {factor!r}"
        )
