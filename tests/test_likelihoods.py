"""Decoder likelihoods are proper densities; KL warm-up and free bits do what they say."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal

from cvae import CVAE
from cvae.models.likelihoods import GaussianOptimal, build_likelihood, check_recon_loss
from cvae.models.losses import beta_at, free_bits_kl, kl_per_dimension


def _pair(binary: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder logits and images: likelihoods score logits, Gaussians as means sigmoid(logits)."""
    generator = torch.Generator().manual_seed(0)
    x_hat = torch.rand(4, 3, 5, 5, generator=generator).clamp(0.01, 0.99)
    x = torch.rand(4, 3, 5, 5, generator=generator)
    return torch.logit(x_hat), (x > 0.5).float() if binary else x


def _reference(logits: torch.Tensor, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    return Normal(torch.sigmoid(logits), sigma).log_prob(x).flatten(1).sum(1)


def test_bernoulli_matches_torch_distributions() -> None:
    logits, x = _pair(binary=True)
    expected = Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    for name in ("bernoulli", "bce"):
        torch.testing.assert_close(build_likelihood(name)(logits, x), expected)


@pytest.mark.parametrize("logit", [40.0, -40.0])
def test_bernoulli_is_exact_for_confident_logits(logit: float) -> None:
    """A Sigmoid rounds 40 to exactly 1 in float32: on probabilities, the right pixels cost
    nothing and the wrong ones 100 nats (the clamp). On logits both are exact."""
    logits = torch.full((2, 1, 4, 4), logit)
    x = torch.zeros(2, 1, 4, 4)
    x[1] = 1.0  # image 0 all black, image 1 all white
    expected = Bernoulli(logits=logits.double()).log_prob(x.double()).flatten(1).sum(1)
    got = build_likelihood("bernoulli")(logits, x)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-12)
    wrong = 0 if logit > 0 else 1  # the image that the logits contradict: 40 nats a pixel
    assert float(got[wrong]) == pytest.approx(-40.0 * 16, rel=1e-6)
    assert -1e-15 <= float(got[1 - wrong]) <= 0  # right, but not certain: e^-40 a pixel


def test_a_decoder_that_outputs_50_scores_50_nats_a_pixel_on_a_black_image() -> None:
    """The issue's example: the last layer outputs +50 everywhere, the image is black."""
    model = CVAE(
        in_channels=1,
        image_size=8,
        latent_dim=3,
        hidden_channels=[4],
        recon_loss="bernoulli",
        upsample="transpose",
    )
    last = model.decoder.features[-2]  # the ConvTranspose2d before the Sigmoid
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(50.0)
    black = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    log_px, _, _ = model.elbo_terms(black)
    torch.testing.assert_close(log_px, torch.full((2,), -50.0 * 64))
    assert torch.equal(model.decode(torch.zeros(1, 3)), torch.ones(1, 1, 8, 8))  # means in [0, 1]
    nll = -model.log_likelihood(black, k=3, generator=torch.Generator().manual_seed(0))
    # 3,200 nats from the decoder, plus log mean_k q(z_k | x) / p(z_k): a few tenths of a
    # nat for this untrained encoder (0.67 seen), where clamped probabilities would add 100s
    torch.testing.assert_close(nll, torch.full((2,), 50.0 * 64), rtol=0.0, atol=2.0)


def test_likelihoods_broadcast_images_over_samples() -> None:
    logits, x = _pair(binary=True)
    samples = torch.stack([logits, logits.flip(0)])  # (2, B, C, H, W)
    for name in ("bernoulli", "gaussian_fixed"):
        likelihood = build_likelihood(name)
        got = likelihood(samples, x)
        assert got.shape == (2, 4)
        torch.testing.assert_close(got[1], likelihood(logits.flip(0), x))


@pytest.mark.parametrize("name", ["gaussian_fixed", "mse", "gaussian_learned"])
def test_gaussians_match_torch_distributions(name: str) -> None:
    logits, x = _pair()
    likelihood = build_likelihood(name, sigma=0.3)
    torch.testing.assert_close(likelihood(logits, x), _reference(logits, x, 0.3))


def test_mse_is_the_seed_squared_error_plus_a_constant() -> None:
    logits, x = _pair()
    squared_error = (x - torch.sigmoid(logits)).pow(2).flatten(1).sum(1)
    constant = 0.5 * x[0].numel() * math.log(math.pi)
    torch.testing.assert_close(-build_likelihood("mse")(logits, x), squared_error + constant)


def test_gaussian_learned_sigma_is_trained() -> None:
    likelihood = build_likelihood("gaussian_learned", sigma=1.0)
    logits, x = _pair()
    (-likelihood(logits, x).sum()).backward()
    assert likelihood.log_sigma.grad is not None and likelihood.log_sigma.grad > 0  # shrink it


def test_gaussian_optimal_uses_the_analytic_sigma_and_keeps_it_for_evaluation() -> None:
    logits, x = _pair()
    likelihood = build_likelihood("gaussian_optimal")
    sigma = (x - torch.sigmoid(logits)).pow(2).mean().sqrt()
    torch.testing.assert_close(likelihood(logits, x), _reference(logits, x, sigma))
    assert math.isclose(float(likelihood.log_sigma.exp()), float(sigma), rel_tol=1e-5)
    likelihood.eval()  # evaluation: the running sigma, whatever the batch
    torch.testing.assert_close(likelihood(logits[:1], x[:1]), _reference(logits, x, sigma)[:1])


def test_a_diverged_batch_does_not_poison_the_running_sigma() -> None:
    likelihood = build_likelihood("gaussian_optimal")
    logits, x = _pair()
    likelihood(logits, x)
    kept = likelihood.log_sigma.clone()
    likelihood(torch.full_like(logits, float("nan")), x)  # a step that will be skipped
    assert torch.equal(likelihood.log_sigma, kept)


def test_gaussian_optimal_sigma_is_clamped_below() -> None:
    likelihood = GaussianOptimal(min_sigma=0.01)
    x = torch.rand(2, 1, 4, 4).clamp(0.01, 0.99)
    torch.testing.assert_close(likelihood(torch.logit(x), x), _reference(torch.logit(x), x, 0.01))


def test_switching_likelihood_changes_nothing_else() -> None:
    x = torch.rand(3, 1, 8, 8)
    models, terms = [], []
    for name in ("bernoulli", "gaussian_fixed", "gaussian_learned", "gaussian_optimal"):
        torch.manual_seed(0)
        model = CVAE(
            in_channels=1, image_size=8, latent_dim=4, hidden_channels=[4], recon_loss=name
        )
        torch.manual_seed(1)
        terms.append(model.loss_terms(x))
        models.append(model)
    networks = [
        {k: v for k, v in m.state_dict().items() if not k.startswith("likelihood")} for m in models
    ]
    for other, other_terms in zip(networks[1:], terms[1:], strict=True):
        assert other.keys() == networks[0].keys()
        assert all(torch.equal(other[k], networks[0][k]) for k in other)
        torch.testing.assert_close(other_terms["kl"], terms[0]["kl"])
    recons = [float(t["recon"].detach()) for t in terms]
    assert recons[1] == recons[2]  # fixed and learned sigma start from the same value
    assert len({recons[0], recons[1], recons[3]}) == 3  # otherwise the reconstruction differs


def test_unknown_likelihood_names_the_key() -> None:
    with pytest.raises(ValueError, match="model.recon_loss='l1' is not one of bernoulli"):
        check_recon_loss("l1")


# --- training aids ---------------------------------------------------------------------------
def test_beta_schedules() -> None:
    assert [beta_at(s, 2.0, "linear", 4) for s in (0, 2, 4, 10)] == [0.0, 1.0, 2.0, 2.0]
    assert [beta_at(s, 1.0, "cyclical", 4) for s in (0, 2, 4, 7, 8, 10)] == [
        0.0,
        0.5,
        1.0,
        1.0,
        0.0,
        0.5,
    ]
    assert beta_at(5, 3.0, "constant", 4) == 3.0 and beta_at(5, 3.0, "linear", 0) == 3.0


def test_free_bits_floor_each_dimension_of_the_batch_mean_kl() -> None:
    mu = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    log_var = torch.zeros(2, 2)
    per_dim = kl_per_dimension(mu, log_var).mean(0)  # [0, 2]
    assert per_dim.tolist() == [0.0, 2.0]
    assert float(free_bits_kl(mu, log_var, 0.5)) == pytest.approx(2.5)


def test_logged_beta_is_the_one_used_and_val_loss_uses_the_final_beta(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cvae.training import train
    from tests.helpers import compose_train

    train(
        compose_train(
            tmp_path,
            "model.beta=2.0",
            "model.beta_schedule=linear",
            "model.warmup_steps=4",
            "trainer.max_epochs=2",
            "test=false",
        )
    )
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    betas = [(e.step, e.value) for e in accumulator.Scalars("train/beta")]
    assert betas[:5] == [(0, 0.0), (1, 0.5), (2, 1.0), (3, 1.5), (4, 2.0)]
    for val, recon, kl in zip(
        *(accumulator.Scalars(f"val/{n}") for n in ("loss", "recon", "kl")), strict=True
    ):
        assert val.value == pytest.approx(recon.value + 2.0 * kl.value, rel=1e-5)


def test_free_bits_raise_the_logged_training_loss_not_the_logged_kl(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cvae.training import train
    from tests.helpers import compose_train

    train(compose_train(tmp_path, "model.free_bits=10.0", "test=false"))  # 8 latents: >= 80
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    loss, recon, kl = (accumulator.Scalars(f"train/{n}") for n in ("loss", "recon", "kl"))
    assert len(loss) >= 3
    for total, r, k in zip(loss, recon, kl, strict=True):
        assert k.value < 80  # the true KL, logged as it is
        assert total.value == pytest.approx(r.value + 80.0, rel=1e-5)  # every dim at the floor


def test_bad_training_aid_settings_name_the_key() -> None:
    for kwargs, key in (
        ({"beta_schedule": "cosine"}, "model.beta_schedule"),
        ({"free_bits": -1.0}, "model.free_bits"),
        ({"sigma": 0.0}, "model.sigma"),
    ):
        with pytest.raises(ValueError, match=key):
            CVAE(in_channels=1, image_size=8, hidden_channels=[4], **kwargs)


def test_iw_training_loss_is_the_importance_weighted_bound_by_hand() -> None:
    model = CVAE(
        in_channels=1,
        image_size=8,
        latent_dim=3,
        hidden_channels=[4],
        recon_loss="bce",
        beta=0.5,
        iw_samples=4,
    )
    x = (torch.rand(5, 1, 8, 8) > 0.5).float()
    torch.manual_seed(0)
    terms = model.loss_terms(x)
    torch.manual_seed(0)  # the same eps, by hand
    mu, log_var = model.encoder(x)
    q = Normal(mu, torch.exp(0.5 * log_var))
    z = mu + torch.exp(0.5 * log_var) * torch.randn(4, *mu.shape)
    probs = model.decoder(z.flatten(0, 1)).unflatten(0, (4, 5))
    log_px = (x * probs.log() + (1 - x) * (1 - probs).log()).sum(dim=(2, 3, 4))
    log_ratio = (Normal(0.0, 1.0).log_prob(z) - q.log_prob(z)).sum(-1)
    bound = torch.logsumexp(log_px + 0.5 * log_ratio, dim=0) - math.log(4)
    torch.testing.assert_close(terms["loss"], -bound.mean(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(terms["recon"], -log_px.mean(), rtol=1e-5, atol=1e-4)


def test_iw_training_bound_is_tighter_than_the_elbo() -> None:
    torch.manual_seed(0)
    elbo_model = CVAE(
        in_channels=1, image_size=8, latent_dim=3, hidden_channels=[4], recon_loss="bce"
    )
    iw_model = CVAE(
        in_channels=1,
        image_size=8,
        latent_dim=3,
        hidden_channels=[4],
        recon_loss="bce",
        iw_samples=32,
    )
    iw_model.load_state_dict(elbo_model.state_dict())
    x = (torch.rand(64, 1, 8, 8) > 0.5).float()
    elbo_loss = torch.stack([elbo_model.loss_terms(x)["loss"] for _ in range(8)]).mean()
    iw_loss = torch.stack([iw_model.loss_terms(x)["loss"] for _ in range(8)]).mean()
    exact_side = -iw_model.log_likelihood(x, k=2000).mean()
    assert exact_side < iw_loss < elbo_loss
    assert elbo_loss - iw_loss > 0.8 * (elbo_loss - exact_side)  # most of the ELBO's gap closed


def test_bad_iw_samples_settings_name_the_key() -> None:
    for kwargs, key in (
        ({"iw_samples": 0}, "model.iw_samples"),
        ({"iw_samples": 4, "free_bits": 0.5}, "model.free_bits"),
    ):
        with pytest.raises(ValueError, match=key):
            CVAE(in_channels=1, image_size=8, hidden_channels=[4], **kwargs)


def test_likelihood_monitor_logs_the_iw_nll_of_the_first_validation_images(tmp_path) -> None:
    from hydra.utils import instantiate
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cvae.pixels import dequantize
    from cvae.training import train
    from tests.helpers import compose_train

    train(
        compose_train(
            tmp_path,
            "model.iw_samples=2",
            "trainer.max_epochs=2",
            "test=false",
            "callbacks.likelihood_monitor.every_n_epochs=1",
            "callbacks.likelihood_monitor.num_images=4",
            "callbacks.likelihood_monitor.iw_samples=7",
        )
    )
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    logged = accumulator.Scalars("val/iw_nll")
    assert len(logged) == 2 and logged[0].value != logged[1].value
    # The last value, by hand: the trained model, the first 4 validation images, K = 7.
    model = CVAE.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    data = instantiate(compose_train(tmp_path).data)
    data.setup("fit")
    generator = torch.Generator().manual_seed(0)
    images = next(iter(data.val_dataloader()))[0][:4]
    x = dequantize(images, model.likelihood.continuous, generator)
    by_hand = -model.log_likelihood(x, k=7, generator=generator).mean()
    assert logged[-1].value == pytest.approx(float(by_hand), rel=1e-5)
