"""The hierarchical VAE: with no level below the top it is the one-level model; its bounds
over all levels are right (KL against Monte Carlo, the likelihood against a brute-force
integral); bad level settings are one line; its sampling graph exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from cvae.models import CVAE, HVAE, from_checkpoint
from cvae.samplers import GaussianMixtureSampler
from tests.helpers import brute_force_log_likelihood, compose_config, exported_samples, generator

TINY = {"in_channels": 1, "image_size": 8, "latent_dim": 3, "hidden_channels": [4, 8]}


def test_a_hierarchy_of_one_level_is_the_one_level_model() -> None:
    """The same weights give the same ELBO, importance-weighted bound and samples."""
    torch.manual_seed(0)
    one = CVAE(**TINY).eval()
    hierarchy = HVAE(**TINY, levels=[]).eval()
    hierarchy.load_state_dict(one.state_dict())
    x = torch.rand(4, 1, 8, 8)
    for call in (
        lambda m: m.elbo(x, generator=generator(1)),
        lambda m: m.log_likelihood(x, k=16, generator=generator(2)),
        lambda m: m.sample(5, generator=generator(3)),
        lambda m: m.reconstruct(x),
    ):
        assert torch.equal(call(hierarchy), call(one))
    assert hierarchy.latent_levels == 1 and hierarchy.encode(x).priors == (None,)


def _two_levels(**settings: object) -> HVAE:
    torch.manual_seed(0)
    return HVAE(**{**TINY, **settings}, levels=[2], level_width=8).eval()


def test_the_kl_over_levels_matches_a_monte_carlo_estimate() -> None:
    """E_q[log q(z_0, z_1 | x) - log p(z_0, z_1)], by many samples of the log-ratio, against
    the ELBO's KL (closed form per level given the upper latents), averaged over as many."""
    model = _two_levels()
    with torch.no_grad():  # a lower posterior far from its prior: a KL worth measuring
        model.top_down.posteriors[0][-1].bias[:2] += 1.5
    x = torch.rand(1, 1, 8, 8).expand(20_000, -1, -1, -1)
    with torch.no_grad():
        _, kl_levels, posterior = model.elbo_terms(x, generator=generator(0))
        encoding = model._encoding(x[:1], None)
        _, log_ratio = model._log_weight_terms(x[:1], None, encoding, 20_000, generator(1))
    monte_carlo = -log_ratio.mean(dim=(1, 2))  # each level's, from (levels, samples, images)
    torch.testing.assert_close(kl_levels.mean(1), monte_carlo, atol=0.03, rtol=0)
    assert len(posterior.levels) == 2 and posterior.levels[1].mu.shape == (20_000, 2)


def test_the_importance_weighted_likelihood_matches_brute_force_integration() -> None:
    """log p(x) = log of the integral of p(x | z_0, z_1) p(z_1 | z_0) p(z_0) over a fine grid
    of a model with one latent on each of two levels, against the estimate with K samples."""
    torch.manual_seed(0)
    model = HVAE(
        in_channels=1,
        image_size=4,
        latent_dim=1,
        hidden_channels=[4],
        levels=[1],
        level_width=8,
        recon_loss="bce",
    ).eval()
    with torch.no_grad():
        model.encoder.log_var.bias += 1.0  # a proposal wider than the posterior
        model.top_down.posteriors[0][-1].bias[1:] += 1.0
        model.decoder.project[0].weight *= 3
    x = (torch.rand(3, 1, 4, 4) > 0.5).float()
    brute = brute_force_log_likelihood(model, x)
    estimate = model.log_likelihood(x, k=20_000, generator=generator(0))
    torch.testing.assert_close(estimate, brute, atol=0.05, rtol=0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"levels": [4, 0]},
            "model.levels=[4, 0]: every level needs an integer number of latents >= 1, got 0",
        ),
        (
            {"levels": "16"},
            "model.levels must be a list of latent sizes, or of latent map shapes [channels, "
            "height, width], got '16'",
        ),
        (
            {"levels": [4, [2, 4, 4]]},
            "model.levels=[4, [2, 4, 4]]: all levels are sizes (vectors) or all are "
            "[channels, height, width] (maps), not a mix",
        ),
        (
            {"levels": [[0, 4, 4]]},
            "model.levels=[[0, 4, 4]]: every level needs an integer number of latents >= 1, "
            "got [0, 4, 4]",
        ),
        (
            {"levels": [[2, 4]]},
            "model.levels: a latent map is [channels, height, width], got [2, 4]",
        ),
        (
            {"levels": [[2, 3, 3]]},
            "model.levels: level 1 is 3x3, not one of the decoder's resolutions for "
            "data.image_size=8 and model.hidden_channels=[4, 8] (2x2, 4x4: the image size "
            "halved once per block, which the levels' sides must divide)",
        ),
        (
            {"levels": [[2, 4, 4], [2, 2, 2]]},
            "model.levels: level 2 (2x2) is coarser than the level above it: list the levels "
            "top-down, coarse to fine",
        ),
        ({"levels": [4], "level_width": 0}, "model.level_width must be an integer >= 1, got 0"),
    ],
)
def test_bad_level_settings_are_one_line_naming_the_key(settings: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        HVAE(**TINY, **settings)
    assert str(error.value) == message


def test_a_temperature_per_level() -> None:
    """One number for every level, or one per level, top first; the levels below the top
    are drawn from their conditional priors (temperature 0: at the prior's mean)."""
    model = _two_levels()
    at_means = model.sample(4, temperature=[1.0, 0.0], generator=generator(0))
    z = model.sample_latents(4, 1.0, generator(0))
    torch.testing.assert_close(at_means, model.decode(z))
    assert not torch.allclose(model.sample(4, 1.0, generator(0)), at_means)
    with pytest.raises(ValueError) as error:
        model.sample(4, temperature=[1.0, 0.5, 0.5])
    assert str(error.value) == (
        "temperature=[1.0, 0.5, 0.5] has 3 value(s) for a model of 2 latent level(s): give "
        "one number, or one per level"
    )


def test_the_posterior_and_its_statistics_have_every_level() -> None:
    model = _two_levels()
    posterior = model.encode(torch.rand(6, 1, 8, 8))
    assert [level.mu.shape for level in posterior.levels] == [(6, 3), (6, 2)]
    kl = model.kl_per_dimension(posterior)
    assert [part.shape for part in kl] == [(6, 3), (6, 2)]
    assert bool((kl[1] >= 0).all())


def test_the_exported_sampling_graph_gives_the_models_images(tmp_path: Path) -> None:
    model = _two_levels()
    z, eps = torch.randn(5, 3), torch.randn(5, 2)
    with torch.no_grad():
        expected = model.decode_noise(z, eps)
    actual = exported_samples(model, tmp_path, z, eps)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # zero noise: each lower level at its conditional prior's mean
        torch.testing.assert_close(model.decode_noise(z, torch.zeros(5, 2)), model.decode(z))


def test_hvae_presets_compose_and_a_checkpoint_round_trip_keeps_the_class(tmp_path) -> None:
    """`model=hvae` and `model=convhvae` build hierarchies; a checkpoint names its class,
    so every command loads it as one; a sampler fitted to its top level saves and loads."""
    for preset, levels, size in (("hvae", [64], 32), ("convhvae", [40], 28)):
        cfg = compose_config(tmp_path, f"model={preset}", f"data.image_size={size}")
        model = instantiate(cfg.model)
        assert isinstance(model, HVAE) and model.hparams.levels == levels
    model = _two_levels()
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    loaded = from_checkpoint(checkpoint)
    assert type(loaded) is HVAE and loaded.level_sizes == [2]
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    posterior = loaded.encode(torch.rand(50, 1, 8, 8))
    sampler = GaussianMixtureSampler(components=2, dims=None).fit(posterior.mu, posterior.log_var)
    sampler.save(path)
    again = GaussianMixtureSampler().loaded_for(path)
    first = loaded.sample(4, generator=generator(0), sampler=sampler)
    assert torch.equal(loaded.sample(4, generator=generator(0), sampler=again), first)


def test_a_kl_warm_up_per_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """`level_warmup_steps`: each level's KL weight ramps over its own steps in training;
    validation scores the final objective; a list of the wrong length is one line."""
    model = _two_levels(level_warmup_steps=[0, 100])
    model.train()
    monkeypatch.setattr(HVAE, "global_step", property(lambda self: 25))
    assert model._level_weights().tolist() == [1.0, 0.25]
    x = torch.rand(4, 1, 8, 8)
    torch.manual_seed(1)
    terms = model.loss_terms(x)
    expected = terms["recon"] + terms["kl_level_0"] + 0.25 * terms["kl_level_1"]
    torch.testing.assert_close(terms["loss"], expected)
    model.eval()
    assert model._level_weights().tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"model.level_warmup_steps must be null or a list of 2"):
        _two_levels(level_warmup_steps=[100])
    with pytest.raises(ValueError, match=r"it needs model.iw_samples=1"):
        _two_levels(level_warmup_steps=[0, 100], iw_samples=4)


def test_iwae_training_logs_each_levels_kl_adding_up_to_the_kl() -> None:
    model = _two_levels(iw_samples=4)
    model.train()
    terms = model.loss_terms(torch.rand(4, 1, 8, 8))
    levels = [terms[f"kl_level_{i}"] for i in range(2)]
    assert all(float(kl) != 0 for kl in levels)
    torch.testing.assert_close(sum(levels), terms["kl"])


def test_interpolation_at_a_chosen_level() -> None:
    """Level i walks between the two images' posterior means, the other levels held at the
    first image's: the first frame is its reconstruction; a level the model lacks is one
    line naming the key."""
    model = _two_levels()
    x = torch.rand(2, 1, 8, 8)
    for level in (0, 1):
        frames = model.interpolate(x[0], x[1], steps=5, level=level)
        assert frames.shape == (5, 1, 8, 8)
        torch.testing.assert_close(frames[0], model.reconstruct(x[:1])[0])
        assert not torch.allclose(frames[0], frames[-1])
    with pytest.raises(ValueError) as error:
        model.interpolate(x[0], x[1], level=2)
    assert str(error.value) == "level=2: this model has 2 latent level(s), 0 (the top) to 1"
    with pytest.raises(ValueError, match="this model has 1 latent level"):
        CVAE(**TINY).interpolate(x[0], x[1], level=1)


@pytest.mark.parametrize("directions", ["principal", "latents"])
def test_a_traversal_at_a_chosen_level_moves_that_level_only(
    directions: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each row moves level 1's latents along one direction; the top level stays at the
    image's posterior mean in every image."""
    from cvae.generation import DIRECTIONS, traverse

    model = _two_levels()
    with torch.no_grad():  # a lower level that varies with the image
        model.top_down.posteriors[0][-1].weight.mul_(20)
    images = torch.rand(40, 1, 8, 8)
    found = DIRECTIONS[directions](model, [(images, torch.zeros(40))], 2, level=1)
    assert found.vectors.shape == (2, 2) and len(found.names) == 2
    decoded = []
    decode = model.decode_latents
    monkeypatch.setattr(
        model, "decode_latents", lambda z, labels=None: decoded.append(z) or decode(z)
    )
    grid = traverse(model, images[0], found, 3, 2.0, level=1)
    assert grid.shape == (6, 1, 8, 8) and not torch.allclose(grid[0], grid[2])
    top = model.encode(images[:1]).levels[0].mu
    torch.testing.assert_close(decoded[0][:, :3], top.expand(6, -1))
    assert decoded[0][:, 3:].std(0).min() > 0
    with pytest.raises(ValueError, match="level=2: this model has 2 latent level"):
        traverse(model, images[0], found, 3, 2.0, level=2)


@pytest.mark.parametrize("prior", ["standard", "vamp"])
def test_evaluation_metrics_report_each_level(prior: str) -> None:
    """`cvae.evaluate`'s metrics of a hierarchy: active units and the KL of each level (the
    ELBO's, adding up to `kl`), beside the totals. Under a mixture prior the per-latent KLs
    (each to the prior's 1-D marginal) do not add up to the top level's KL: not its source."""
    from cvae.metrics import combine, image_metrics

    settings = {"prior": prior, "prior_components": 3} if prior == "vamp" else {}
    model = _two_levels(**settings)
    chunks = [image_metrics(model, torch.rand(6, 1, 8, 8), None, 4, generator(i)) for i in (0, 1)]
    metrics = combine(chunks, model, 4)
    assert len(metrics["active_units_per_level"]) == len(metrics["kl_per_level"]) == 2
    assert metrics["latent_dim"] == 5 and len(metrics["kl_per_dim"]) == 5
    assert sum(metrics["kl_per_level"]) == pytest.approx(metrics["kl"], abs=1e-5)
    levels = torch.cat([c["kl_levels"] for c in chunks]).mean(0)
    assert metrics["kl_per_level"] == pytest.approx(levels.tolist(), abs=1e-6)
    del chunks[0]["kl_levels"]  # a chunk saved before the per-level KL was kept
    assert "kl_per_level" not in combine(chunks, model, 4)


def test_a_conditional_hierarchy_reads_the_class_everywhere() -> None:
    """`model.conditional=true` on a hierarchy: the class enters the encoder and the decoder;
    bounds, samples, walks and the exported sampling graph take it."""
    torch.manual_seed(0)
    model = HVAE(
        **TINY, levels=[2], level_width=8, conditional=True, class_names=["a", "b", "c"]
    ).eval()
    x, labels = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    assert torch.isfinite(model.loss_terms(x, labels=labels)["loss"])
    assert model.log_likelihood(x, labels, k=4).shape == (4,)
    as_a = model.sample(3, generator=generator(0), labels="a", temperature=[1.0, 0.0])
    as_b = model.sample(3, generator=generator(0), labels="b", temperature=[1.0, 0.0])
    assert not torch.allclose(as_a, as_b)  # the same latents, another class
    assert model.interpolate(x[0], x[1], labels=[0, 1], level=1).shape == (8, 1, 8, 8)
    sampling, example, names, _ = model.exportable()["decoder"]
    assert names == ["z", "eps", "labels"]
    with torch.no_grad():
        torch.testing.assert_close(sampling(*example), model.decode_noise(*example))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("levels", "latents", "rows"),
    [("[4,3]", 15, 4), ("[[2,4,4],[1,8,8]]", 8 + 32 + 64, 6)],
    ids=["vectors", "maps"],
)
def test_every_command_runs_on_a_trained_hierarchy(
    tmp_path: Path, levels: str, latents: int, rows: int
) -> None:
    """Train a tiny hierarchy (and the sampler fitted when it ends), then evaluate, sample with
    a temperature per level, walk a lower level and export, as the commands do: vector
    levels, and latent maps at the 16x16 images' 4x4 and 8x8 resolutions."""
    from cvae.evaluation import evaluate_checkpoint
    from cvae.exporting import run as export_command
    from cvae.generation import generate
    from cvae.training import train
    from tests.helpers import compose_tool, compose_train

    run = tmp_path / "run"
    train(
        compose_train(
            run,
            "model=hvae",
            f"model.levels={levels}",
            "model.level_width=16",
            "sampler.components=2",
            "sampler.dims=4",
            "test=false",
        )
    )
    checkpoint = f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    metrics = evaluate_checkpoint(
        compose_tool(
            "eval", tmp_path / "eval", checkpoint, "eval.iw_samples=4", "eval.progress=false"
        )
    )
    assert len(metrics["active_units_per_level"]) == 3 and metrics["latent_dim"] == latents
    out = generate(
        compose_tool(
            "generate",
            tmp_path / "sample",
            checkpoint,
            "mode=showcase",
            "n=8",
            "temperature=[1.0,0.5,0.0]",
        )
    )
    assert {p.name for p in out.iterdir()} >= {"samples.png", "interpolation.gif", "traversal.png"}
    out = generate(
        compose_tool(
            "generate",
            tmp_path / "walk",
            checkpoint,
            "mode=interpolate",
            "level=2",
            "sampler=prior",
        )
    )
    assert (out / "interpolation.gif").is_file()
    out = generate(
        compose_tool("generate", tmp_path / "traverse", checkpoint, "mode=traverse", "level=1")
    )
    assert "of level 1" not in (out / "traversal.txt").read_text()  # principal directions
    assert (
        len((out / "traversal.txt").read_text().splitlines()) == rows
    )  # its latents, or the test images
    paths = export_command(compose_tool("export", tmp_path / "export", checkpoint))
    assert sorted(paths) == ["decoder", "encoder"]


def test_cvae_load_from_checkpoint_builds_the_class_the_checkpoint_names(tmp_path) -> None:
    """The notebook's loader, `CVAE.load_from_checkpoint`, gives a hierarchy's checkpoint as
    the `HVAE` it is; a class this cvae does not know is one line naming it."""
    model = _two_levels()
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "last.ckpt")
    loaded = CVAE.load_from_checkpoint(tmp_path / "last.ckpt")
    assert type(loaded) is HVAE and loaded.level_sizes == [2]
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(loaded.reconstruct(x), model.reconstruct(x))
    checkpoint["model_class"] = "NVAE"
    with pytest.raises(ValueError) as error:
        from_checkpoint(checkpoint)
    assert str(error.value) == (
        "the checkpoint holds a NVAE model, which this cvae does not know (one of CVAE, HVAE)"
    )
