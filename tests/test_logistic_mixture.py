"""The discretized mixture of logistics: a probability over the 256 levels of each pixel,
equal to a brute-force reference, finite at saturated outputs, and usable by every command."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cvae import CVAE
from cvae.models.likelihoods import LogisticMixture, build_likelihood

LEVELS = torch.arange(256, dtype=torch.float64) / 255


def _reference(logits: torch.Tensor, x: torch.Tensor, components: int) -> torch.Tensor:
    """log p(x) per image, pixel by pixel in float64, straight from PixelCNN++'s definition:
    P(level) = sigmoid((v + 1/255 - m) / s) - sigmoid((v - 1/255 - m) / s) on v in [-1, 1],
    the CDF itself at level 0 and its complement at level 255; green's location moves by
    tanh(a) * red, blue's by tanh(b) * red + tanh(c) * green."""
    logits, x = logits.double(), x.double()
    batch, channels, height, width = x.shape
    k = components
    total = torch.zeros(batch, dtype=torch.float64)
    for n in range(batch):
        for i in range(height):
            for j in range(width):
                p = logits[n, :, i, j]
                weights = torch.softmax(p[:k], 0)
                loc = p[k : k + k * channels].view(k, channels)
                log_s = p[k + k * channels : k + 2 * k * channels].view(k, channels).clamp(-7, 7)
                coeff = torch.tanh(p[k + 2 * k * channels :].view(k, -1))
                level = (x[n, :, i, j] * 255).round()
                v = level / 255 * 2 - 1
                probability = 0.0
                for m in range(k):
                    joint = weights[m]
                    for c in range(channels):
                        mean = loc[m, c] + sum(
                            coeff[m, c * (c - 1) // 2 + d] * v[d] for d in range(c)
                        )
                        s = log_s[m, c].exp()
                        upper = (
                            1.0 if level[c] == 255 else torch.sigmoid((v[c] + 1 / 255 - mean) / s)
                        )
                        lower = 0.0 if level[c] == 0 else torch.sigmoid((v[c] - 1 / 255 - mean) / s)
                        joint = joint * (upper - lower)
                    probability = probability + joint
                total[n] += math.log(probability)
    return total


@pytest.mark.parametrize("channels", [1, 3])
def test_the_log_likelihood_equals_a_brute_force_reference(channels: int) -> None:
    generator = torch.Generator().manual_seed(channels)
    likelihood = LogisticMixture(3)
    logits = torch.randn(2, likelihood.output_channels(channels), 3, 3, generator=generator)
    x = torch.randint(0, 256, (2, channels, 3, 3), generator=generator) / 255
    x[0, :, 0, 0], x[0, :, 0, 1] = 0.0, 1.0  # both edge levels
    torch.testing.assert_close(likelihood(logits, x).double(), _reference(logits, x, 3))


@pytest.mark.parametrize("scale", [0.1, 3.0])
def test_the_probabilities_of_the_256_levels_sum_to_one(scale: float) -> None:
    """Each grey pixel's 256 levels, for locations inside and far outside [-1, 1]; and for
    colour, blue's 256 levels given red and green: p(r, g, b) summed over b is p(r) p(g | r),
    the grey probabilities of red and of green at its coupled location (one component)."""
    generator = torch.Generator().manual_seed(0)
    grey = LogisticMixture(2)
    logits = torch.randn(1, grey.output_channels(1), 2, 2, generator=generator) * scale
    x = LEVELS.float().view(256, 1, 1, 1)
    for i in range(2):
        for j in range(2):
            pixel = logits[:, :, i : i + 1, j : j + 1].expand(256, -1, -1, -1)
            assert abs(float(torch.logsumexp(grey(pixel, x).double(), 0))) < 1e-5
    one, colour = LogisticMixture(1), LogisticMixture(1)
    # weight, locations (r, g, b), log-scales (r, g, b), couplings (g<-r, b<-r, b<-g)
    p = torch.randn(10, generator=generator) * scale
    for r, g in torch.randint(0, 256, (6, 2), generator=generator).tolist():
        v_r = r / 255 * 2 - 1
        x = torch.tensor([[r, g, b] for b in range(256)], dtype=torch.float32) / 255
        summed = torch.logsumexp(colour(p.view(1, 10, 1, 1), x.view(256, 3, 1, 1)), 0)
        green_loc = p[2] + torch.tanh(p[7]) * v_r
        red = one(
            torch.stack([p[0], p[1], p[4]]).view(1, 3, 1, 1), torch.tensor(r / 255).view(1, 1, 1, 1)
        )
        green = one(
            torch.stack([p[0], green_loc, p[5]]).view(1, 3, 1, 1),
            torch.tensor(g / 255).view(1, 1, 1, 1),
        )
        torch.testing.assert_close(summed, (red + green)[0], atol=1e-4, rtol=1e-5)


def test_saturated_outputs_give_finite_likelihoods_and_gradients() -> None:
    likelihood = LogisticMixture(2)
    for value in (1e4, -1e4):
        logits = torch.full((2, likelihood.output_channels(3), 2, 2), value, requires_grad=True)
        x = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand(2, 3, 2, 2)
        log_p = likelihood(logits, x)
        log_p.sum().backward()
        assert torch.isfinite(log_p).all() and torch.isfinite(logits.grad).all()


def test_bits_per_dim_of_8_bit_data_is_minus_log2_p_over_dims() -> None:
    """No dequantisation offset: the likelihood is already a probability of the 8-bit values."""
    likelihood = LogisticMixture(2)
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(1, likelihood.output_channels(3), 4, 4, generator=generator)
    x = torch.randint(0, 256, (1, 3, 4, 4), generator=generator) / 255
    nll = -float(_reference(logits, x, 2))
    by_hand = -math.log2(math.exp(-nll)) / 48
    assert likelihood.bits_per_dim(nll, 48, binary_data=False) == pytest.approx(by_hand)
    assert build_likelihood("gaussian_optimal").bits_per_dim(nll, 48, False) == pytest.approx(
        by_hand + 8
    )


def test_samples_are_8_bit_and_follow_the_mixture() -> None:
    """One confident component at level 200 of 255 and one at 20, weighted 3:1: draws land
    on 8-bit values, three quarters of them at 200; the shown image is their mean."""
    likelihood = LogisticMixture(2)
    logits = torch.zeros(1, likelihood.output_channels(1), 64, 64)
    logits[:, 0], logits[:, 1] = math.log(3), 0.0  # mixture weights 3:1
    logits[:, 2], logits[:, 3] = 200 / 255 * 2 - 1, 20 / 255 * 2 - 1  # locations
    logits[:, 4:6] = -7.0  # narrow: every draw within a few levels of its location
    draws = likelihood.sample(logits, torch.Generator().manual_seed(0)) * 255
    assert torch.equal(draws, draws.round())
    assert float(draws.gt(110).float().mean()) == pytest.approx(0.75, abs=0.03)
    assert bool(((draws - 200).abs().le(3) | (draws - 20).abs().le(3)).all())
    mean = likelihood.image_head(1)(logits)
    assert float(mean.mean()) == pytest.approx((0.75 * 200 + 0.25 * 20) / 255, abs=1e-4)


def test_a_model_with_it_decodes_images_in_the_unit_range() -> None:
    model = CVAE(
        in_channels=3,
        image_size=16,
        latent_dim=4,
        hidden_channels=[8, 16],
        recon_loss="logistic_mixture",
        mixture_components=5,
    )
    assert model.decoder.logits(torch.zeros(2, 4)).shape == (2, 50, 16, 16)
    with torch.no_grad():
        images = model.decode(torch.randn(2, 4))
    assert images.shape == (2, 3, 16, 16) and 0 <= float(images.min()) <= float(images.max()) <= 1
    with pytest.raises(ValueError, match=r"model\.mixture_components must be a positive integer"):
        CVAE(recon_loss="logistic_mixture", mixture_components=0)


@pytest.mark.slow
def test_every_command_runs_on_a_logistic_mixture_model(tmp_path: Path) -> None:
    """Train on tiny colour images (with the sampler fit at the end), evaluate bits/dim,
    sample and export; and a hierarchy with it trains."""
    from cvae.evaluation import evaluate_checkpoint
    from cvae.exporting import run as export_command
    from cvae.generation import generate
    from cvae.training import train
    from tests.helpers import compose_tool, compose_train

    run = tmp_path / "run"
    settings = ["model.recon_loss=logistic_mixture", "model.mixture_components=3"]
    sampler = ["sampler.components=2", "sampler.dims=4"]
    train(compose_train(run, *settings, *sampler, "test=false"))
    checkpoint = f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    metrics = evaluate_checkpoint(
        compose_tool(
            "eval", tmp_path / "eval", checkpoint, "eval.iw_samples=4", "eval.progress=false"
        )
    )
    dims = 3 * 16 * 16
    assert metrics["bits_per_dim"] == pytest.approx(metrics["iw_nll"] / (dims * math.log(2)))
    assert math.isfinite(metrics["bits_per_dim"]) and metrics["bits_per_dim"] > 0
    out = generate(compose_tool("generate", tmp_path / "sample", checkpoint, "n=8"))
    assert (out / "samples.png").is_file()
    assert sorted(export_command(compose_tool("export", tmp_path / "export", checkpoint))) == [
        "decoder",
        "encoder",
    ]
    hierarchy = tmp_path / "hvae"
    train(compose_train(hierarchy, "model=hvae", "model.levels=[3]", *settings, *sampler))
    assert (hierarchy / "checkpoints" / "last.ckpt").is_file()
