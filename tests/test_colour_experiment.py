"""`experiment=icons`: the colour recipe that docs/reports/colour-likelihoods.md measured and
chose (the icon preset, the likelihood that won, a latent and a fitted sampler sized for the
preset's 472 training images). It composes with the icon preset, builds the model it names,
scores and samples colour images with it, and its sampler settings fit and draw on as few
posterior means as the preset has."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate

from cvae.models.likelihoods import GaussianOptimal
from tests.helpers import compose_tool

CHOSEN = "gaussian_optimal"  # the measurement's pick (docs/reports/colour-likelihoods.md)


def compose_experiment(tmp_path: Path, *overrides: str):
    return compose_tool("train", tmp_path / "out", "experiment=icons", *overrides)


def test_it_composes_the_icon_preset_with_the_chosen_likelihood(tmp_path: Path) -> None:
    cfg = compose_experiment(tmp_path)
    assert cfg.data.source == "folder"
    assert Path(cfg.data.root) == Path("/usr/share/icons/oxygen/base/64x64")
    assert cfg.data.channels == 3 and cfg.data.image_size == 64
    assert cfg.model.recon_loss == CHOSEN
    assert cfg.model.latent_dim == 128
    assert cfg.model.in_channels == 3 and cfg.model.image_size == 64  # follow the data
    assert cfg.sampler.components == 10 and cfg.sampler.dims == 16
    assert cfg.trainer.max_epochs == 350 and cfg.trainer.check_val_every_n_epoch == 25
    # any of it can still be overridden on the command line
    other = compose_experiment(tmp_path, "model.recon_loss=gaussian_optimal")
    assert other.model.recon_loss == "gaussian_optimal"


def test_it_builds_a_model_that_scores_and_samples_colour_images(tmp_path: Path) -> None:
    cfg = compose_experiment(tmp_path)
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    assert isinstance(model.likelihood, GaussianOptimal)
    assert model.decoder.images(model.decode_logits(torch.zeros(1, 128))).shape == (1, 3, 64, 64)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        log_px = model.log_likelihood(images, k=2)
    assert log_px.shape == (2,) and torch.isfinite(log_px).all()

    sampler = instantiate(cfg.sampler)  # fitted to 40 posterior means, fewer than the preset's
    mu = torch.randn(40, cfg.model.latent_dim)
    sampler.fit(mu, torch.zeros_like(mu))
    samples = model.sample(3, generator=torch.Generator().manual_seed(0), sampler=sampler)
    assert samples.shape == (3, 3, 64, 64)
    assert samples.min() >= 0 and samples.max() <= 1
