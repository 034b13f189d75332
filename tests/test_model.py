"""The model wing: loss terms, sampling, architectures and config validation."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from torch.distributions import Normal

from cvae import CVAE
from cvae.errors import error_line, user_error
from cvae.models import kl_divergence, reparameterize
from cvae.models.inference import FastDecoder
from cvae.models.networks import ResidualBlock
from tests.helpers import compose_config, compose_train


def test_kl_matches_hand_computation() -> None:
    # KL(N(1, e^0) || N(0, 1)) = 0.5 per dim; KL(N(0, e^2) || N(0, 1)) = 0.5 (e^2 - 1 - 2).
    mu = torch.tensor([[1.0, 0.0]])
    log_var = torch.tensor([[0.0, 2.0]])
    expected = 0.5 + 0.5 * (math.exp(2) - 1 - 2)
    assert kl_divergence(mu, log_var).item() == pytest.approx(expected, rel=1e-6)


def test_closed_form_kl_matches_monte_carlo() -> None:
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 4, generator=generator)
    log_var = torch.randn(3, 4, generator=generator)
    q = Normal(mu, torch.exp(0.5 * log_var))
    z = q.sample((200_000,))
    monte_carlo = (q.log_prob(z) - Normal(0.0, 1.0).log_prob(z)).sum(-1).mean(0)
    torch.testing.assert_close(kl_divergence(mu, log_var), monte_carlo, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("recon_loss", ["mse", "bce"])
def test_loss_is_recon_plus_beta_kl_averaged_over_batch(recon_loss: str) -> None:
    model = CVAE(
        in_channels=1,
        image_size=8,
        latent_dim=3,
        hidden_channels=[4],
        recon_loss=recon_loss,
        beta=2.5,
    )
    x = torch.rand(5, 1, 8, 8)
    torch.manual_seed(0)
    terms = model.loss_terms(x)
    torch.manual_seed(0)  # the same eps, by hand
    mu, log_var = model.encoder(x)
    z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
    x_hat = model.decoder(z)
    if recon_loss == "mse":  # a Gaussian of variance 1/2: squared error + (D/2) log(pi)
        recon = ((x_hat - x) ** 2).sum(dim=(1, 2, 3)) + 32 * math.log(math.pi)
    else:
        recon = -(x * torch.log(x_hat) + (1 - x) * torch.log(1 - x_hat)).sum(dim=(1, 2, 3))
    kl = 0.5 * (mu**2 + log_var.exp() - 1 - log_var).sum(dim=1)
    torch.testing.assert_close(terms["recon"], recon.mean())
    torch.testing.assert_close(terms["kl"], kl.mean())
    torch.testing.assert_close(terms["loss"], recon.mean() + 2.5 * kl.mean())


def test_gradients_flow_through_the_sampling() -> None:
    mu = torch.zeros(4, 3, requires_grad=True)
    log_var = torch.zeros(4, 3, requires_grad=True)
    z = reparameterize(mu, log_var)
    (z**2).sum().backward()
    assert mu.grad is not None and mu.grad.abs().sum() > 0
    assert log_var.grad is not None and log_var.grad.abs().sum() > 0
    model = CVAE(in_channels=1, image_size=8, latent_dim=3, hidden_channels=[4])
    model.loss_terms(torch.rand(2, 1, 8, 8))["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_reparameterize_samples_the_right_distribution() -> None:
    torch.manual_seed(0)
    mu, log_var = torch.full((100_000, 1), 2.0), torch.full((100_000, 1), math.log(9.0))
    z = reparameterize(mu, log_var)
    assert z.mean().item() == pytest.approx(2.0, abs=0.05)
    assert z.std().item() == pytest.approx(3.0, abs=0.05)


@pytest.mark.parametrize(
    ("preset", "channels", "size"),
    [
        ("cvae", 1, 32),
        ("cvae", 3, 64),
        ("vae_2conv", 1, 28),
        ("vae_2conv", 3, 64),
        ("cvae_maxpool", 1, 32),
        ("cvae_maxpool", 3, 64),
        ("cvae_deep", 3, 32),
    ],
)
def test_presets_map_images_to_images(tmp_path, preset: str, channels: int, size: int) -> None:
    cfg = compose_config(
        tmp_path,
        f"model={preset}",
        f"data.channels={channels}",
        f"data.image_size={size}",
        "model.latent_dim=4",
    )
    model = instantiate(cfg.model)
    x = torch.rand(2, channels, size, size)
    x_hat, posterior = model(x)
    assert x_hat.shape == x.shape and posterior.mu.shape == posterior.log_var.shape == (2, 4)
    samples = model.sample(3)
    assert samples.shape == (3, channels, size, size)
    assert not torch.allclose(samples[0], samples[1])  # the decoder reads its latent


def _layers(module: torch.nn.Module) -> list[str]:
    return [type(m).__name__ for m in module.modules() if not list(m.children())]


def test_vae_2conv_preset_is_the_design_notes_architecture(tmp_path) -> None:
    cfg = compose_config(tmp_path, "model=vae_2conv", "data.channels=1", "data.image_size=28")
    model = instantiate(cfg.model)
    convs = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (32, (3, 3), (2, 2)),
        (64, (3, 3), (2, 2)),
    ]
    assert _layers(model.encoder) == [
        "Conv2d",
        "ReLU",
        "Conv2d",
        "ReLU",
        "Flatten",
        "Linear",
        "Linear",
    ]
    assert model.encoder.mu.in_features == 64 * 7 * 7
    assert _layers(model.decoder) == [
        "Linear",
        "ReLU",
        "ConvTranspose2d",
        "ReLU",
        "ConvTranspose2d",
        "Sigmoid",
    ]
    deconvs = [m for m in model.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [d.out_channels for d in deconvs] == [32, 1]


def test_cvae_maxpool_preset_pools_after_each_growing_convolution(tmp_path) -> None:
    model = instantiate(compose_config(tmp_path, "model=cvae_maxpool").model)
    layers = _layers(model.encoder.features)
    assert layers == ["Conv2d", "ReLU", "MaxPool2d"] * 4 + ["Flatten"]
    convs = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256]
    assert all(c.stride == (1, 1) for c in convs)
    assert model.encoder.mu.in_features == 256 * 4 * 4


def test_cvae_deep_adds_residual_blocks_at_every_resolution(tmp_path) -> None:
    model = instantiate(compose_config(tmp_path, "model=cvae_deep").model)
    encoder_blocks = [m for m in model.encoder.modules() if isinstance(m, ResidualBlock)]
    decoder_blocks = [m for m in model.decoder.modules() if isinstance(m, ResidualBlock)]
    assert len(encoder_blocks) == len(decoder_blocks) == 2 * 4
    kinds = {type(m).__name__ for m in model.modules() if "Conv" in type(m).__name__}
    assert kinds == {"Conv2d", "ConvTranspose2d"}
    block = encoder_blocks[0]
    x = torch.rand(2, block.body[0].in_channels, 8, 8)
    with torch.no_grad():
        for layer in block.body:  # a block whose body gives zero is the identity (after ReLU)
            if isinstance(layer, torch.nn.Conv2d):
                layer.weight.zero_()
        block.eval()
        torch.testing.assert_close(block(x), torch.relu(x))  # the skip path carries x


def test_resize_upsampling_doubles_like_the_transposed_convolutions() -> None:
    kwargs = {"in_channels": 3, "image_size": 32, "latent_dim": 8, "hidden_channels": [4, 8]}
    transpose, resize = CVAE(**kwargs, upsample="transpose"), CVAE(**kwargs, upsample="resize")
    z = torch.randn(5, 8)
    assert resize.decode(z).shape == transpose.decode(z).shape == (5, 3, 32, 32)
    layers = [type(m).__name__ for m in resize.decoder.features.modules()]
    assert "ConvTranspose2d" not in layers and layers.count("Upsample") == 2
    # transpose keeps the layers (so the checkpoint keys) of models from before the choice
    assert [type(m).__name__ for m in transpose.decoder.features] == [
        "ConvTranspose2d",
        "ReLU",
        "ConvTranspose2d",
        "Sigmoid",
    ]
    assert transpose.hparams.upsample == "transpose"
    fast = FastDecoder(resize.decoder)  # evaluation's decoder computes the same function
    torch.testing.assert_close(fast(z), resize.decoder.logits(z), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.latent_dim=0", "model.latent_dim"),
        ("model.latent_dim=abc", "model.latent_dim"),
        ("+model.latnt_dim=3", "latnt_dim"),
        ("model.beta=-1", "model.beta"),
        ("model.recon_loss=l1", "model.recon_loss"),
        ("data.image_size=30", "model.image_size=30"),
        ("model.downsample=avgpool", "model.downsample"),
        ("model.upsample=bicubic", "model.upsample"),
        ("data.batch_size=0", "data.batch_size"),
    ],
)
def test_bad_config_fails_at_build_with_the_key(tmp_path, override: str, key: str) -> None:
    cfg = compose_train(tmp_path, override)
    with pytest.raises(Exception) as caught:  # Hydra wraps the error
        instantiate(cfg.data)
        instantiate(cfg.model)
    cause = user_error(caught.value)
    assert cause is not None
    assert key in error_line(cause) and len(str(cause).splitlines()) == 1


def test_sample_and_reconstruct_leave_training_mode_alone() -> None:
    model = CVAE(in_channels=3, image_size=16, latent_dim=4, hidden_channels=[8, 16])
    model.train()
    generator = torch.Generator().manual_seed(1)
    first = model.sample(4, generator=generator)
    assert model.training
    again = model.sample(4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first, again)
    x = torch.rand(4, 3, 16, 16)
    torch.testing.assert_close(model.reconstruct(x), model.reconstruct(x))  # the mean, no noise
    assert model.sample(4, temperature=0.0).std(0).max() == 0  # all from z = 0


@pytest.mark.slow
def test_compile_keeps_the_eager_results_and_parameter_names() -> None:
    """`model.compile=true` compiles in place: same losses, checkpoints keep eager names."""
    torch.manual_seed(0)
    eager = CVAE(in_channels=1, image_size=8, latent_dim=4, hidden_channels=[4, 8])
    compiled = CVAE(in_channels=1, image_size=8, latent_dim=4, hidden_channels=[4, 8], compile=True)
    compiled.load_state_dict(eager.state_dict())
    compiled.setup("fit")
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    x = torch.rand(6, 1, 8, 8)
    losses = []
    for model in (eager, compiled):
        torch.manual_seed(1)  # the same posterior sample
        loss = model.loss_terms(x)["loss"]
        loss.backward()
        losses.append((loss.detach(), model.encoder.mu.weight.grad.clone()))
    torch.testing.assert_close(losses[0][0], losses[1][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(losses[0][1], losses[1][1], rtol=1e-3, atol=1e-4)


def test_a_model_built_with_no_arguments_is_the_one_cvae_train_builds(tmp_path) -> None:
    """`CVAE()` in Python and `python -m cvae.train` with no overrides: the same settings,
    the same layers, the same optimizer (one set of defaults, `conf/model/cvae.yaml`'s)."""
    built = instantiate(compose_config(tmp_path).model)
    default = CVAE()
    assert dict(default.hparams) == dict(built.hparams)
    shapes = {k: v.shape for k, v in default.state_dict().items()}
    assert shapes == {k: v.shape for k, v in built.state_dict().items()}
    for factory in (default.optimizer_factory, built.optimizer_factory):
        assert (factory.func, factory.keywords) == (torch.optim.Adam, {"fused": True})
