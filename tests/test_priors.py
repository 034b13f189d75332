"""The prior seam (`cvae/models/priors.py`): each prior's density, KL and samples against
independent computations, the likelihood under each prior against brute force, checkpoints
from before priors, the one-line errors, and what each prior does with a class."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from cvae import CVAE
from cvae.metrics import PosteriorStatistics
from cvae.models.latents import Posterior
from cvae.models.losses import kl_divergence, kl_per_dimension, normal_log_density
from cvae.models.priors import MixtureOfGaussians, StandardNormal, VampPrior
from tests.helpers import compose_train

TINY = {"in_channels": 1, "image_size": 4, "latent_dim": 2, "hidden_channels": [4]}


def _posterior(batch: int = 3, dims: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(batch, dims), torch.randn(batch, dims) * 0.5 - 0.3


def _set_mixture(prior: MixtureOfGaussians) -> None:
    """A mixture with well separated components and unequal weights and spreads."""
    torch.manual_seed(1)
    with torch.no_grad():
        prior.means.copy_(torch.randn_like(prior.means) * 2)
        prior.log_vars.copy_(torch.rand_like(prior.log_vars) - 1)
        prior.weight_logits.copy_(torch.randn_like(prior.weight_logits))


def _monte_carlo_kl(prior, mu, log_var, samples: int = 200_000):
    """log q(z | x) - log p(z) at posterior samples: mean and standard error per row."""
    z = mu + torch.exp(0.5 * log_var) * torch.randn(samples, *mu.shape)
    terms = normal_log_density(z, mu, log_var) - prior.log_prob(z)
    return terms.mean(0), terms.std(0) / math.sqrt(samples)


@pytest.mark.parametrize("prior", ["standard", "mog with one component"])
def test_kl_estimate_agrees_with_the_closed_form(prior: str) -> None:
    mu, log_var = _posterior()
    if prior == "standard":
        model = StandardNormal(2)
    else:
        model = MixtureOfGaussians(2, 1)
        _set_mixture(model)
    assert model.factorised
    closed = model.kl(mu, log_var)
    mean, error = _monte_carlo_kl(model, mu, log_var)
    assert (closed - mean).abs().max() < 4 * error.max() + 1e-4
    if prior != "standard":  # the closed form itself, against torch's
        target = Normal(model.means[0], torch.exp(0.5 * model.log_vars[0]))
        by_torch = torch.distributions.kl_divergence(Normal(mu, torch.exp(0.5 * log_var)), target)
        torch.testing.assert_close(closed, by_torch.sum(-1).detach())
    else:  # exactly the one KL function of before
        torch.testing.assert_close(closed, kl_divergence(mu, log_var), rtol=0, atol=0)


def test_mixture_density_is_torch_s_mixture_and_its_kl_the_sample_estimate() -> None:
    prior = MixtureOfGaussians(3, 4)
    _set_mixture(prior)
    assert not prior.factorised
    reference = MixtureSameFamily(
        Categorical(logits=prior.weight_logits),
        Independent(Normal(prior.means, torch.exp(0.5 * prior.log_vars)), 1),
    )
    z = torch.randn(5, 7, 3) * 3
    torch.testing.assert_close(prior.log_prob(z), reference.log_prob(z), rtol=1e-5, atol=1e-5)
    mu, log_var = _posterior(dims=3)
    z = mu + torch.exp(0.5 * log_var) * torch.randn(mu.shape)
    expected = normal_log_density(z, mu, log_var) - reference.log_prob(z)
    torch.testing.assert_close(prior.kl(mu, log_var, z), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="posterior sample"):
        prior.kl(mu, log_var)


def test_vamp_density_is_the_mixture_of_its_pseudo_inputs_posteriors() -> None:
    torch.manual_seed(0)
    model = CVAE(**TINY, prior="vamp", prior_components=3)
    prior = model.prior
    assert isinstance(prior, VampPrior) and len(prior.pseudo_inputs()) == 3
    mu, log_var = model.encode(prior.pseudo_inputs()).top  # each pseudo-input's posterior
    reference = MixtureSameFamily(
        Categorical(logits=torch.zeros(3)), Independent(Normal(mu, torch.exp(0.5 * log_var)), 1)
    )
    z = torch.randn(4, 6, 2) * 2
    torch.testing.assert_close(prior.log_prob(z), reference.log_prob(z), rtol=1e-5, atol=1e-5)
    # pushed through the encoder at every use: the prior follows the encoder
    with torch.no_grad():
        model.encoder.mu.bias += 1.0
    assert not torch.allclose(prior.log_prob(z), reference.log_prob(z))


@pytest.mark.parametrize("prior", ["standard", "mog", "vamp"])
def test_log_likelihood_matches_brute_force_integration(prior: str) -> None:
    """log p(x) = log of the integral of p(x | z) p(z) over a fine grid of the 2-d latent
    space, against the importance-weighted estimate with many samples. The decoder is made
    to depend on z strongly, so that the prior matters: N(0, I) in place of the mixtures
    moves the truth by 0.11 (mog) and 0.33 nats (vamp), the estimate's error is < 0.02."""
    torch.manual_seed(0)
    model = CVAE(
        **TINY, recon_loss="bce", prior=prior, prior_components=None if prior == "standard" else 3
    ).eval()
    if prior == "mog":
        _set_mixture(model.prior)
    with torch.no_grad():
        model.encoder.log_var.bias += 1.0  # a proposal wider than the posterior
        model.decoder.project[0].weight *= 3
    x = (torch.rand(3, 1, 4, 4) > 0.5).float()
    step = 0.04
    axis = torch.arange(-9, 9 + step / 2, step)
    grid = torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        logits = model.decode_logits(grid)
        log_px = torch.stack([model.likelihood(logits, image) for image in x], dim=1)
        log_joint = log_px + model.prior.log_prob(grid)[:, None]
        brute = torch.logsumexp(log_joint, dim=0) + 2 * math.log(step)
    estimate = model.log_likelihood(x, k=20_000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(estimate, brute, atol=0.04, rtol=0)


def test_checkpoints_from_before_priors_load_as_standard_and_sample_unchanged(
    trained_run: Path, tmp_path: Path
) -> None:
    saved = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["hyper_parameters"]["prior"] == "standard"
    assert not any(key.startswith("prior.") for key in saved["state_dict"])  # nothing new
    for key in ("prior", "prior_components"):
        saved["hyper_parameters"].pop(key)
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)
    model = CVAE.load_from_checkpoint(old, weights_only=True).eval()
    assert isinstance(model.prior, StandardNormal) and model.hparams.prior == "standard"
    # the draws of before, bit for bit: N(0, I) on the CPU generator, scaled, decoded
    latent = model.hparams.latent_dim
    for temperature in (1.0, 0.7):
        z = temperature * torch.randn(5, latent, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            before = torch.sigmoid(model.decoder.logits(z))
        after = model.sample(5, temperature, generator=torch.Generator().manual_seed(3))
        assert torch.equal(after, before)
    # and evaluation's log p(z) is the standard normal's
    z = torch.randn(4, latent)
    assert torch.equal(model.prior.log_prob(z), normal_log_density(z))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"prior": "flow"}, "model.prior="),
        ({"prior": "mog", "prior_components": 0}, "model.prior_components"),
        ({"prior": "vamp", "prior_components": 2.5}, "model.prior_components"),
        ({"prior": "standard", "prior_components": 4}, "model.prior_components"),
        ({"prior": "mog", "free_bits": 0.5}, "model.free_bits"),
        ({"prior": "vamp", "prior_components": 3, "free_bits": 0.5}, "model.free_bits"),
    ],
)
def test_bad_prior_settings_are_one_line_naming_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key) as caught:
        CVAE(**TINY, **kwargs)
    assert len(str(caught.value).splitlines()) == 1


def test_free_bits_apply_to_a_one_component_prior_and_are_refused_at_the_call() -> None:
    x = torch.rand(4, 1, 4, 4)
    one = CVAE(**TINY, prior="mog", prior_components=1, free_bits=10.0)
    assert one.loss_terms(x, free_bits=10.0)["loss"] > 2 * 10.0  # every dim at the floor
    many = CVAE(**TINY, prior="mog", prior_components=3)
    with pytest.raises(ValueError, match="model.free_bits") as caught:
        many.loss_terms(x, free_bits=0.5)
    assert len(str(caught.value).splitlines()) == 1


def test_bad_prior_in_the_config_fails_at_build_with_the_key(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    from cvae.errors import error_line, user_error

    cfg = compose_train(tmp_path, "model/prior=vamp", "model.free_bits=0.5")
    with pytest.raises(Exception) as caught:  # Hydra wraps the error
        instantiate(cfg.model)
    assert "model.free_bits" in error_line(user_error(caught.value))


@pytest.mark.parametrize("prior", ["mog", "vamp"])
def test_mixture_priors_train_their_parameters(prior: str) -> None:
    torch.manual_seed(0)
    model = CVAE(**TINY, prior=prior, prior_components=3)
    x = torch.rand(6, 1, 4, 4)
    model.loss_terms(x)["loss"].backward()
    grads = [p.grad for name, p in model.named_parameters() if name.startswith("prior.")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    iw = CVAE(**TINY, prior=prior, prior_components=3, iw_samples=4)
    terms = iw.loss_terms(x)
    assert torch.isfinite(terms["loss"]) and terms["kl"].shape == ()


def test_mixture_sampling_scales_each_component_by_the_temperature() -> None:
    prior = MixtureOfGaussians(2, 3)
    _set_mixture(prior)
    with torch.no_grad():
        at_zero = prior.sample(200, torch.Generator().manual_seed(0), temperature=0.0)
        draws = prior.sample(20_000, torch.Generator().manual_seed(0))
    assert all(any(torch.equal(z, m) for m in prior.means) for z in at_zero)  # the means
    reference = MixtureSameFamily(
        Categorical(logits=prior.weight_logits),
        Independent(Normal(prior.means, torch.exp(0.5 * prior.log_vars)), 1),
    )
    torch.testing.assert_close(draws.mean(0), reference.mean.detach(), atol=0.08, rtol=0)
    mean, std = prior.marginal_moments()
    torch.testing.assert_close(mean, reference.mean.detach())
    torch.testing.assert_close(std, reference.stddev.detach())


def test_per_dimension_kl_of_a_mixture_is_the_kl_to_each_marginal() -> None:
    """Under a mixture prior the KL per dimension (active-unit statistics, traversal order)
    is each dimension's posterior against the prior's marginal there: by quadrature, checked
    here by a fine grid."""
    prior = MixtureOfGaussians(2, 3)
    _set_mixture(prior)
    mu, log_var = _posterior()
    with torch.no_grad():
        per_dim = prior.kl_per_dimension(mu, log_var)
    step = 0.002
    grid = torch.arange(-15, 15, step, dtype=torch.float64)
    for row in range(len(mu)):
        for d in range(2):
            q = Normal(mu[row, d].double(), torch.exp(0.5 * log_var[row, d]).double())
            marginal = MixtureSameFamily(
                Categorical(logits=prior.weight_logits.detach().double()),
                Normal(
                    prior.means[:, d].detach().double(),
                    torch.exp(0.5 * prior.log_vars[:, d]).detach().double(),
                ),
            )
            density = q.log_prob(grid).exp()
            truth = ((q.log_prob(grid) - marginal.log_prob(grid)) * density).sum() * step
            assert float(per_dim[row, d]) == pytest.approx(float(truth), abs=1e-3)
    # a factorised prior's per-dimension KLs are the terms of its KL; the statistics of
    # active units use the prior given, N(0, I) unchanged by default
    statistics, default = PosteriorStatistics(), PosteriorStatistics()
    posterior = Posterior.one_level(mu, log_var)
    statistics.update(posterior, lambda q: (StandardNormal(2).kl_per_dimension(q.mu, q.log_var),))
    default.update(posterior, lambda q: (kl_per_dimension(q.mu, q.log_var),))
    assert torch.equal(statistics.kl_per_dim(), default.kl_per_dim())
    one = MixtureOfGaussians(2, 1)
    torch.testing.assert_close(one.kl_per_dimension(mu, log_var).sum(1), one.kl(mu, log_var))


def _fake_trainer(model: CVAE, images: torch.Tensor, labels: torch.Tensor) -> None:
    dataset = [(image, int(label)) for image, label in zip(images, labels, strict=True)]
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(train_set=dataset))


def test_vamp_pseudo_inputs_start_from_the_first_training_images_once() -> None:
    torch.manual_seed(0)
    model = CVAE(**TINY, prior="vamp", prior_components=5)
    images = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)  # fewer: cycled
    _fake_trainer(model, images, torch.zeros(3))
    model.on_fit_start()
    expected = (images.float() / 255).clamp(0.01, 0.99)[torch.arange(5) % 3]
    torch.testing.assert_close(model.prior.pseudo_inputs(), expected)
    assert model.prior.images_wanted() == 0
    # a resumed (or trained) model keeps its own: the flag travels in the state dict
    again = CVAE(**TINY, prior="vamp", prior_components=5)
    again.load_state_dict(model.state_dict())
    _fake_trainer(again, torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.zeros(3))
    again.on_fit_start()
    torch.testing.assert_close(again.prior.pseudo_inputs(), expected)
    # without a training set (pure Python use) they stay random
    plain = CVAE(**TINY, prior="vamp", prior_components=5)
    before = plain.prior.pseudo_inputs().clone()
    plain._trainer = SimpleNamespace(datamodule=None)
    plain.on_fit_start()
    assert torch.equal(plain.prior.pseudo_inputs(), before) and plain.prior.images_wanted() == 5


CONDITIONAL = {**TINY, "conditional": True, "class_names": ["a", "b", "c"]}


@pytest.mark.parametrize("prior", ["standard", "mog", "vamp"])
def test_every_prior_is_the_same_for_every_class(prior: str) -> None:
    """Conditional models: p(z) does not depend on the class (it enters the encoder and the
    decoder), so sample_classes decodes the same latents for every class, and sampling one
    class draws from the one prior."""
    torch.manual_seed(0)
    components = None if prior == "standard" else 4
    model = CVAE(**CONDITIONAL, prior=prior, prior_components=components).eval()
    rows = model.sample_classes(2, generator=torch.Generator().manual_seed(0))
    z = model.sample_latents(2, generator=torch.Generator().manual_seed(0))
    for index in range(3):
        with torch.no_grad():
            by_hand = model.decode(z, torch.full((2,), index))
        torch.testing.assert_close(rows[2 * index : 2 * index + 2], by_hand)
    one_class = model.sample(2, generator=torch.Generator().manual_seed(0), labels="b")
    torch.testing.assert_close(one_class, rows[2:4])


def test_conditional_vamp_pseudo_inputs_carry_classes() -> None:
    torch.manual_seed(0)
    model = CVAE(**CONDITIONAL, prior="vamp", prior_components=4)
    assert model.prior.pseudo_labels.tolist() == [0, 1, 2, 0]  # before data: round robin
    images = torch.randint(0, 256, (4, 1, 4, 4), dtype=torch.uint8)
    _fake_trainer(model, images, torch.tensor([2, 2, 1, 0]))
    model.on_fit_start()
    assert model.prior.pseudo_labels.tolist() == [2, 2, 1, 0]  # the images' own classes
    mu, log_var = model.encode(model.prior.pseudo_inputs(), model.prior.pseudo_labels).top
    reference = MixtureSameFamily(
        Categorical(logits=torch.zeros(4)), Independent(Normal(mu, torch.exp(0.5 * log_var)), 1)
    )
    z = torch.randn(6, 2)
    torch.testing.assert_close(model.prior.log_prob(z), reference.log_prob(z), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prior", ["mog", "vamp"])
def test_a_tiny_training_run_with_each_mixture_prior(prior: str, tmp_path: Path) -> None:
    from cvae.training import train

    train(compose_train(tmp_path, f"model/prior={prior}", "model.prior_components=4", "test=false"))
    model = CVAE.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert model.hparams.prior == prior and model.prior.components_count == 4
    assert model.prior.images_wanted() == 0  # vamp: set from the data, and saved so
    assert torch.isfinite(model.log_likelihood(torch.rand(2, 3, 16, 16), k=8)).all()
