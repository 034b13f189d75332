"""A hierarchy of latent maps (`model.levels` of `[channels, height, width]`): the decoder is
its top-down path. Its bounds over all levels are right (KL against Monte Carlo, the
likelihood against a brute-force integral), its levels are flat vectors outside the model,
its sampling graph exports, and every command runs on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cvae.models import HVAE
from tests.helpers import brute_force_log_likelihood, exported_samples, generator

MAPS = {"in_channels": 1, "image_size": 8, "latent_dim": 3, "hidden_channels": [4, 8]}


def _maps(**settings: object) -> HVAE:
    """Two map levels below the top: 2 channels at 2x2, 1 channel at 4x4 (8 + 16 latents)."""
    torch.manual_seed(0)
    return HVAE(**{**MAPS, "levels": [[2, 2, 2], [1, 4, 4]], **settings}).eval()


def test_map_levels_are_flat_vectors_outside_the_model() -> None:
    """Each level's posterior and conditional prior are `(B, channels * side * side)`; the
    decoder of every level's posterior means is the reconstruction."""
    model = _maps()
    x = torch.rand(5, 1, 8, 8)
    posterior = model.encode(x)
    assert [level.mu.shape for level in posterior.levels] == [(5, 3), (5, 8), (5, 16)]
    assert [p is None for p in posterior.priors] == [True, False, False]
    assert [part.shape for part in model.kl_per_dimension(posterior)] == [(5, 3), (5, 8), (5, 16)]
    with torch.no_grad():
        torch.testing.assert_close(model.decode_latents(posterior.means), model.reconstruct(x))
    assert model.level_sizes == [8, 16] and model.latent_levels == 3
    assert model.decoder.project[0].in_features == 3  # the maps join on the way, not here


def test_the_kl_over_map_levels_matches_a_monte_carlo_estimate() -> None:
    model = _maps()
    with torch.no_grad():  # lower posteriors away from their priors: a KL worth measuring
        for posterior in model.top_down.posteriors:
            posterior.bias[: len(posterior.bias) // 2] += 1.0
    x = torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        _, kl_levels, _ = model.elbo_terms(x.expand(20_000, -1, -1, -1), generator=generator(0))
        encoding = model._encoding(x, None)
        _, log_ratio = model._log_weight_terms(x, None, encoding, 20_000, generator(1))
    assert log_ratio.shape == (3, 20_000, 1)
    assert float(kl_levels.sum(0).mean()) == pytest.approx(
        float(-log_ratio.sum(0).mean()), abs=0.05
    )


def test_the_importance_weighted_likelihood_of_a_map_level_matches_brute_force() -> None:
    """A 2x2 image, one top latent and a 1x1 map of one channel below it: log p(x) over a
    fine grid of (z_0, z_1) against the estimate with K samples."""
    torch.manual_seed(0)
    model = HVAE(
        in_channels=1,
        image_size=2,
        latent_dim=1,
        hidden_channels=[4],
        levels=[[1, 1, 1]],
        recon_loss="bce",
    ).eval()
    with torch.no_grad():
        model.encoder.log_var.bias += 1.0  # a proposal wider than the posterior
        model.top_down.posteriors[0].bias[1:] += 1.0
        model.top_down.merges[0].weight *= 3
    x = (torch.rand(3, 1, 2, 2) > 0.5).float()
    brute = brute_force_log_likelihood(model, x)
    estimate = model.log_likelihood(x, k=20_000, generator=generator(0))
    torch.testing.assert_close(estimate, brute, atol=0.05, rtol=0)


def test_samples_take_a_temperature_per_map_level() -> None:
    model = _maps()
    at_means = model.sample(4, temperature=[1.0, 0.0, 0.0], generator=generator(0))
    z = model.sample_latents(4, 1.0, generator(0))
    with torch.no_grad():
        torch.testing.assert_close(at_means, model.decode(z))
    assert not torch.allclose(model.sample(4, 1.0, generator=generator(0)), at_means)


def test_the_exported_sampling_graph_of_map_levels_gives_the_models_images(
    tmp_path: Path,
) -> None:
    model = _maps()
    z, eps = torch.randn(5, 3), torch.randn(5, 24)
    with torch.no_grad():
        expected = model.decode_noise(z, eps)
    actual = exported_samples(model, tmp_path, z, eps)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_a_conditional_map_hierarchy_trains_and_samples_per_class() -> None:
    torch.manual_seed(0)
    model = _maps(conditional=True, class_names=["a", "b"])
    x, labels = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 1, 0])
    model.train()
    assert torch.isfinite(model.loss_terms(x, labels=labels)["loss"])
    model.eval()
    assert model.log_likelihood(x, labels, k=3).shape == (4,)
    as_a = model.sample(2, generator=generator(0), labels="a", temperature=[1.0, 0.0, 0.0])
    as_b = model.sample(2, generator=generator(0), labels="b", temperature=[1.0, 0.0, 0.0])
    assert not torch.allclose(as_a, as_b)


def test_a_decoder_override_is_refused_for_map_levels() -> None:
    with pytest.raises(ValueError, match="this one's latent maps join the decoder's layers"):
        _maps().log_likelihood(torch.rand(2, 1, 8, 8), k=2, decoder=lambda v: v)


def test_a_level_off_the_decoders_resolutions_is_one_line_before_the_data_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16x16 images with two blocks: the decoder's maps are 4x4 and 8x8, so a 3x3 level is
    refused, naming model.levels and the image size, before any image is decoded."""
    from cvae.data import ImageDataModule
    from cvae.errors import error_line, user_error
    from cvae.training import train
    from tests.helpers import compose_train

    def read(self: ImageDataModule) -> None:
        raise AssertionError("the data was read before the model's settings were checked")

    monkeypatch.setattr(ImageDataModule, "prepare_data", read)
    with pytest.raises(Exception) as error:
        train(compose_train(tmp_path / "run", "model=hvae_maps", "model.levels=[[2,4,4],[2,3,3]]"))
    assert error_line(user_error(error.value)) == (
        "model.levels: level 2 is 3x3, not one of the decoder's resolutions for "
        "data.image_size=16 and model.hidden_channels=[8, 16] (4x4, 8x8: the image size "
        "halved once per block, which the levels' sides must divide)"
    )
