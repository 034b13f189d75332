"""Ex-post samplers: fitted densities of the posteriors that survive a save/load round trip,
draw the same latents from the same seed, and fail in one line when missing or stale."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import cvae.fid
from cvae import CVAE, ImageDataModule
from cvae.callbacks import SamplerFit
from cvae.errors import user_error
from cvae.evaluation import evaluate_checkpoint
from cvae.generation import generate
from cvae.loading import sampler as configured_sampler
from cvae.samplers import (
    EM_CHUNK,
    GaussianMixtureSampler,
    NoFit,
    PriorSampler,
    TwoStageSampler,
    sampler_path,
)
from cvae.training import train
from tests.helpers import TinyFeatures, compose_tool, compose_train


def _two_blobs(n: int = 400) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posterior means in two tight clusters, +3 (label 0) and -3 (label 1), in 4 dims."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    mu = torch.randn(n, 4, generator=generator) * 0.3 + (3 - 6 * labels)[:, None].float()
    return mu, torch.full_like(mu, -6.0), labels


def _checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"a checkpoint's bytes")
    return path


@pytest.mark.parametrize(
    "make",
    [
        lambda: GaussianMixtureSampler(components=2),
        lambda: GaussianMixtureSampler(components=2, dims=2),
        lambda: TwoStageSampler(hidden=32, epochs=3, batch_size=64),
        lambda: TwoStageSampler(hidden=32, epochs=3, batch_size=64, dims=2, latent_dim=1),
    ],
)
def test_a_fitted_sampler_survives_a_round_trip(make, tmp_path: Path) -> None:
    mu, log_var, _ = _two_blobs()
    sampler = make().fit(mu, log_var)
    draws = sampler.draw(50, torch.Generator().manual_seed(1))
    assert draws.shape == (50, 4) and torch.isfinite(draws).all()
    assert torch.equal(draws, sampler.draw(50, torch.Generator().manual_seed(1)))
    checkpoint = _checkpoint(tmp_path)
    path = sampler.save(checkpoint)
    assert path == tmp_path / f"last.{sampler.name}.pt"
    loaded = make().loaded_for(checkpoint)
    assert torch.equal(loaded.draw(50, torch.Generator().manual_seed(1)), draws)


def test_the_mixture_draws_where_the_posteriors_are() -> None:
    mu, log_var, _ = _two_blobs(2000)
    sampler = GaussianMixtureSampler(components=2).fit(mu, log_var)
    draws = sampler.draw(4000, torch.Generator().manual_seed(0))
    near = [(draws - centre).norm(dim=1) < 2 for centre in (3.0, -3.0)]
    assert (near[0] | near[1]).float().mean() > 0.99  # not between the clusters (N(0, I) is)
    assert abs(float(near[0].float().mean()) - 0.5) < 0.05  # both, in their proportions
    cov = torch.cov(draws[near[0]].T)
    assert torch.allclose(cov, 0.09 * torch.eye(4), atol=0.03)


def test_a_mixture_in_principal_directions_keeps_the_rest_as_one_gaussian() -> None:
    """`dims=1`: the mixture along the direction the clusters lie on, the other dimensions
    drawn from the Gaussian of what it leaves (independent noise of variance 0.25 here)."""
    generator = torch.Generator().manual_seed(0)
    side = (torch.arange(4000) % 2) * 2 - 1.0
    axis = torch.tensor([1.0, 1, 0, 0, 0, 0]) / 2**0.5  # not a coordinate axis
    noise = torch.randn(4000, 6, generator=generator) * 0.5
    mu = 3 * side[:, None] * axis + noise - (noise @ axis)[:, None] * axis  # no noise on it
    sampler = GaussianMixtureSampler(components=2, dims=1).fit(mu, torch.zeros_like(mu))
    assert sampler.states[-1]["means"].shape == (2, 1)  # fitted in one direction
    assert torch.allclose(sampler.states[-1]["basis"].abs().flatten(), axis.double(), atol=0.01)
    draws = sampler.draw(8000, torch.Generator().manual_seed(1)).double()
    along = draws @ axis.double()
    assert ((along - 3).abs() < 0.2).float().mean() > 0.45  # both clusters, tight along it
    assert ((along + 3).abs() < 0.2).float().mean() > 0.45
    rest = draws - along[:, None] * axis.double()
    expected = 0.25 * (torch.eye(6) - torch.outer(axis, axis)).double()
    assert torch.allclose(torch.cov(rest.T), expected, atol=0.02)


@pytest.mark.slow
def test_two_stage_models_the_used_directions_and_keeps_the_rest_as_one_gaussian() -> None:
    """Posteriors of a model that uses one latent of six (two clusters along it) and leaves
    the rest at N(0, 1): the second VAE, in that one direction, draws both clusters."""
    side = (torch.arange(2000) % 2) * 2 - 1.0
    mu = torch.zeros(2000, 6)
    mu[:, 0] = 3 * side
    log_var = torch.zeros_like(mu)
    log_var[:, 0] = -4.0
    sampler = TwoStageSampler(hidden=64, epochs=60, batch_size=64, dims=1).fit(mu, log_var)
    assert sampler.states[-1]["basis"].shape == (6, 1)
    along = sampler.draw(4000, torch.Generator().manual_seed(1))[:, 0]
    near = ((along.abs() - 3).abs() < 1).float().mean()
    between = (along.abs() < 1).float().mean()
    assert near > 0.5 and between < 0.15  # one Gaussian of variance 9: 0.22 and 0.26


def test_a_collapsed_two_stage_fit_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """Posteriors that are N(0, I) noise leave the second VAE nothing to encode."""
    noise = torch.zeros(400, 4)
    with caplog.at_level("WARNING", logger="cvae.samplers"):
        TwoStageSampler(hidden=32, epochs=10, batch_size=64).fit(noise, noise)
    assert "sampler=two_stage: the second VAE collapsed (it uses none of its 4 latent " in (
        caplog.text
    )


def test_a_conditional_fit_draws_each_class_from_its_own_density() -> None:
    mu, log_var, labels = _two_blobs()
    sampler = GaussianMixtureSampler(components=1).fit(mu, log_var, labels)
    wanted = torch.tensor([1, 0, 1, 1, 0])
    draws = sampler.draw(5, torch.Generator().manual_seed(0), wanted)
    assert ((draws.mean(dim=1) > 0) == (wanted == 0)).all()
    with pytest.raises(ValueError, match="sampler=gmm was fitted per class: give labels"):
        sampler.draw(5)


def test_a_mixture_with_more_parameters_than_data_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """400 means in 4 dims are 1,600 values: 100 full components have 1,499 parameters (no
    warning), 120 have 1,799 (warned); a diagonal 120 have 1,079 (none)."""
    mu, log_var, _ = _two_blobs()
    assert GaussianMixtureSampler(components=100).parameters(100, 4) == 1499
    for components, covariance, warned in (
        (100, "full", False),
        (120, "full", True),
        (120, "diag", False),
    ):
        caplog.clear()
        sampler = GaussianMixtureSampler(components=components, covariance=covariance)
        with caplog.at_level("WARNING", logger="cvae.samplers"):
            sampler.fit(mu, log_var)
        assert (
            "parameters, more than the 1,600 values of 400 posterior means" in caplog.text
        ) is warned


def test_a_fit_counts_only_for_the_checkpoint_as_it_is(tmp_path: Path) -> None:
    """Missing or of an older checkpoint: `NoFit` (what the commands fit afresh); a file
    that is not a fit is another error (loading says what is wrong; nothing overwrites it
    unasked)."""
    checkpoint = _checkpoint(tmp_path)
    sampler = GaussianMixtureSampler(components=2)
    with pytest.raises(NoFit, match="is not fitted for"):
        sampler.loaded_for(checkpoint)
    mu, log_var, _ = _two_blobs()
    sampler.fit(mu, log_var).save(checkpoint)
    assert sampler.loaded_for(checkpoint).states
    checkpoint.write_bytes(b"trained on since")
    with pytest.raises(NoFit, match="was fitted to another version of"):
        sampler.loaded_for(checkpoint)
    sampler_path(checkpoint, "gmm").write_bytes(b"not a fit")
    with pytest.raises(ValueError, match="is not a sampler fit") as damaged:
        sampler.loaded_for(checkpoint)
    assert not isinstance(damaged.value, NoFit)


def test_the_mixture_fitted_in_chunks_is_scikit_learns_fit() -> None:
    """EM in chunks of a few iterations (progress lines between them) gives the mixture
    one call of scikit-learn's own fit gives."""
    from sklearn.mixture import GaussianMixture

    mu = torch.randn(600, 3, generator=torch.Generator().manual_seed(0))  # no clusters: slow EM
    state = GaussianMixtureSampler(components=4, dims=None).fit(mu, mu).states[-1]
    reference = GaussianMixture(4, random_state=0, reg_covar=1e-5).fit(mu.double().numpy())
    assert reference.n_iter_ > EM_CHUNK  # more than one chunk
    torch.testing.assert_close(state["means"], torch.as_tensor(reference.means_))
    torch.testing.assert_close(state["weights"], torch.as_tensor(reference.weights_))


def test_missing_or_stale_fits_say_how_to_fit(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path)
    with pytest.raises(NoFit) as missing:
        GaussianMixtureSampler().loaded_for(checkpoint)
    assert str(missing.value) == (
        f"sampler=gmm is not fitted for {checkpoint} (no last.gmm.pt beside it): fit it with: "
        f".venv/bin/python -m cvae.generate mode=fit sampler=gmm ckpt_path={checkpoint} "
        "(or draw from the model's prior: sampler=prior)"
    )
    mu, log_var, _ = _two_blobs()
    GaussianMixtureSampler(components=2).fit(mu, log_var).save(checkpoint)
    checkpoint.write_bytes(b"trained on since")  # a last.ckpt that moved on
    with pytest.raises(ValueError, match="was fitted to another version of .*: fit it again"):
        GaussianMixtureSampler().loaded_for(checkpoint)
    for make, key in (
        (lambda: GaussianMixtureSampler(covariance="round"), "sampler.covariance='round' is not"),
        (lambda: GaussianMixtureSampler(components=0), "sampler.components must be an integer"),
        (lambda: GaussianMixtureSampler(dims=0), "sampler.dims must be null or an integer >= 1"),
        (lambda: TwoStageSampler(dims=-1), "sampler.dims must be null or an integer >= 1"),
    ):
        with pytest.raises(ValueError, match=key):
            make()
    prior = PriorSampler()
    assert not prior.needs_fit and prior.loaded_for(checkpoint) is prior


def test_samplers_are_built_by_hydra_from_their_group(tmp_path: Path) -> None:
    """`sampler=<name>` instantiates that class with the group's settings; a bad setting is
    one line naming the key; an unknown name is Hydra's error naming the group."""
    built = configured_sampler(compose_tool("generate", tmp_path, "sampler=two_stage"))
    assert isinstance(built, TwoStageSampler) and built.settings()["dims"] == 64
    assert isinstance(
        configured_sampler(compose_tool("generate", tmp_path, "sampler=prior")), PriorSampler
    )
    bad = compose_tool("generate", tmp_path, "sampler.components=0", "ckpt_path=x")
    with pytest.raises(Exception) as error:
        configured_sampler(bad)
    assert "sampler.components must be an integer >= 1, got 0" in str(user_error(error.value))
    with pytest.raises(Exception, match="sampler/flow"):
        compose_tool("generate", tmp_path, "sampler=flow")
    for kind in (GaussianMixtureSampler, TwoStageSampler, PriorSampler):  # one set of defaults
        built = configured_sampler(compose_tool("generate", tmp_path, f"sampler={kind.name}"))
        assert built.settings() == kind().settings()


@pytest.mark.parametrize("damage", ["empty", "truncated", "not_a_dict", "wrong_kind", "payload"])
def test_a_damaged_sampler_file_is_one_line_with_the_fit_command(
    damage: str, tmp_path: Path
) -> None:
    checkpoint = _checkpoint(tmp_path)
    mu, log_var, _ = _two_blobs()
    path = GaussianMixtureSampler(components=2).fit(mu, log_var).save(checkpoint)
    whole = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(whole[: len(whole) // 2])
    elif damage == "not_a_dict":
        torch.save([1, 2, 3], path)
    elif damage == "wrong_kind":  # a gmm fit saved under two_stage's name
        path.rename(sampler_path(checkpoint, "two_stage"))
        path = sampler_path(checkpoint, "two_stage")
    else:  # a pickle that would run code if loaded unsafely: never run
        torch.save({"sampler": "gmm", "settings": {}, "states": SimpleNamespace(x=1)}, path)
    sampler = TwoStageSampler() if damage == "wrong_kind" else GaussianMixtureSampler()
    with pytest.raises(ValueError) as error:
        sampler.loaded_for(checkpoint)
    message = str(error.value)
    assert message.startswith(f"{path} ") and "\n" not in message
    assert (
        f"fit it again with: .venv/bin/python -m cvae.generate mode=fit sampler={sampler.name}"
        in message
    )
    assert "weights_only=False" not in message


@pytest.mark.slow
def test_generate_and_eval_fid_fit_a_missing_sampler_then_draw_from_the_fit(
    trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    checkpoint = tmp_path / "last.ckpt"
    shutil.copy(trained_run / "checkpoints" / "last.ckpt", checkpoint)
    sample = ("mode=sample", "sampler=gmm", "sampler.components=2", "n=8")
    # an interrupted run's checkpoint, with no fit beside it: generate makes the fit first
    with caplog.at_level("INFO", logger="cvae.samplers"):
        made = generate(
            compose_tool("generate", tmp_path / "a", f"ckpt_path={checkpoint}", *sample)
        )
    assert f"components=2, covariance=full, dims=64) is not fitted for {checkpoint} " in caplog.text
    assert sampler_path(checkpoint, "gmm").is_file() and (made / "sampler.json").is_file()
    fit = sampler_path(checkpoint, "gmm").read_bytes()
    first = generate(compose_tool("generate", tmp_path / "c", f"ckpt_path={checkpoint}", *sample))
    assert sampler_path(checkpoint, "gmm").read_bytes() == fit  # the saved fit, not a new one
    fitted = generate(
        compose_tool(
            "generate",
            tmp_path / "b",
            f"ckpt_path={checkpoint}",
            "mode=fit",
            "sampler=gmm",
            "sampler.components=2",
        )
    )
    assert fitted == sampler_path(checkpoint, "gmm") and fitted.is_file()
    again = generate(compose_tool("generate", tmp_path / "d", f"ckpt_path={checkpoint}", *sample))
    assert (first / "samples.png").read_bytes() == (again / "samples.png").read_bytes()
    assert (made / "samples.png").read_bytes() == (first / "samples.png").read_bytes()
    prior = generate(
        compose_tool("generate", tmp_path / "e", f"ckpt_path={checkpoint}", "n=8", "sampler=prior")
    )
    assert (prior / "samples.png").read_bytes() != (first / "samples.png").read_bytes()
    # the Python API takes the same fitted object
    model = CVAE.load_from_checkpoint(checkpoint, weights_only=True)
    sampler = GaussianMixtureSampler().loaded_for(checkpoint)
    images = model.sample(4, generator=torch.Generator().manual_seed(0), sampler=sampler)
    assert images.shape[0] == 4
    # eval.fid draws from the same fit (and stops before any work without one)
    monkeypatch.setattr(cvae.fid, "inception", lambda weights=None: TinyFeatures())
    fid = (
        "eval.fid=true",
        "eval.fid_samples=20",
        "eval.iw_samples=2",
        "eval.split=val",
        "eval.progress=false",
    )
    scores = {}
    for name in ("prior", "gmm"):  # one output folder: each evaluation keeps its own results
        cfg = compose_tool(
            "eval", tmp_path / "eval", f"ckpt_path={checkpoint}", *fid, f"sampler={name}"
        )
        scores[name] = evaluate_checkpoint(cfg)
        assert scores[name]["fid_sampler"] == name
    kept = {
        json.loads(p.read_text())["fid_sampler"]: json.loads(p.read_text())["fid"]
        for p in (tmp_path / "eval").glob("*/metrics.json")
    }
    assert kept == {name: scores[name]["fid"] for name in ("prior", "gmm")}
    datamodule = ImageDataModule.load_from_checkpoint(checkpoint)  # the gmm's FID, by hand
    by_hand = cvae.fid.sample_quality(
        model,
        datamodule.ordered_dataloader("val"),
        samples=20,
        extractor=TinyFeatures(),
        sampler=sampler,
    )
    assert by_hand["fid"] == pytest.approx(scores["gmm"]["fid"], rel=1e-6)
    sampler_path(checkpoint, "gmm").unlink()  # eval.fid without a fit makes one too
    cfg = compose_tool("eval", tmp_path / "refit", f"ckpt_path={checkpoint}", *fid, *sample[1:3])
    assert evaluate_checkpoint(cfg)["fid"] == pytest.approx(scores["gmm"]["fid"], rel=1e-6)
    assert sampler_path(checkpoint, "gmm").is_file()


def test_training_fits_the_sampler_it_is_given(tmp_path: Path) -> None:
    """`cvae.train sampler=gmm`: fitted to the final last.ckpt, recorded, shown in
    TensorBoard, and drawn from by `cvae.generate` at once; bad settings fail first."""
    bad = tmp_path / "bad"
    with pytest.raises(Exception) as error:
        train(compose_train(bad, "sampler=gmm", "sampler.components=0"))
    assert str(user_error(error.value)) == "sampler.components must be an integer >= 1, got 0"
    assert not bad.exists()  # before any work
    run = tmp_path / "run"
    gmm = ("sampler=gmm", "sampler.components=2", "sampler.dims=4")
    train(compose_train(run, *gmm, "test=false"))
    checkpoint = run / "checkpoints" / "last.ckpt"
    record = json.loads((run / "sampler.json").read_text())
    assert record["fit"] == str(sampler_path(checkpoint, "gmm"))
    assert record["settings"]["components"] == 2 and record["images"] > 0
    GaussianMixtureSampler().loaded_for(checkpoint)  # fitted to the last.ckpt that stayed
    accumulator = EventAccumulator(str(run / "tensorboard"))  # every events file of the run
    accumulator.Reload()
    assert accumulator.Images("samples/gmm")[-1].height == 8 * (16 + 2) + 2  # 64 images
    out = generate(compose_tool("generate", tmp_path / "g", f"ckpt_path={checkpoint}", *gmm))
    assert (out / "samples.png").is_file()


def test_a_sampler_that_cannot_be_fitted_at_the_end_is_a_warning(
    trained_run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The run succeeded and its checkpoints stay: a failed fit (say, a class with one image)
    says so and gives the command, instead of failing the run."""

    class OneImageClass(GaussianMixtureSampler):
        def _fit_one(self, mu: torch.Tensor, log_var: torch.Tensor) -> dict:
            raise ValueError("sampler=gmm: class 3 has 1 image(s); a density needs at least 2")

    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    model = CVAE.load_from_checkpoint(checkpoint)
    datamodule = ImageDataModule.load_from_checkpoint(checkpoint)
    trainer = SimpleNamespace(is_global_zero=True, datamodule=datamodule, loggers=[])
    SamplerFit(OneImageClass(), checkpoint, trained_run).on_fit_end(trainer, model)
    assert "sampler=gmm was not fitted (sampler=gmm: class 3 has 1 image(s)" in caplog.text


def test_two_saves_at_once_both_end_with_a_whole_file_and_nothing_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes saving one checkpoint's fit overlap: each writes a temporary file of its
    own, so the one left is whole; an interrupted save leaves the previous fit and no
    temporary file."""
    import threading

    checkpoint = _checkpoint(tmp_path)
    mu, log_var, _ = _two_blobs()
    fits = [GaussianMixtureSampler(components=k).fit(mu, log_var) for k in (1, 2)]
    both_writing, real_save = threading.Barrier(2), torch.save

    def overlapping(obj, handle, *args, **kwargs):
        both_writing.wait(timeout=30)  # neither finishes before the other has started
        real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", overlapping)
    threads = [threading.Thread(target=fit.save, args=(checkpoint,)) for fit in fits]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    loaded = GaussianMixtureSampler().loaded_for(checkpoint)
    assert loaded.settings()["components"] in (1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.gmm.pt"]

    def stopped(obj, handle, *args, **kwargs):
        handle.write(b"half a file")
        raise KeyboardInterrupt  # what SIGTERM becomes in a command (errors.sigterm_raises)

    monkeypatch.setattr(torch, "save", stopped)
    with pytest.raises(KeyboardInterrupt):
        fits[0].save(checkpoint)
    assert GaussianMixtureSampler().loaded_for(checkpoint).settings() == loaded.settings()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.gmm.pt"]


@pytest.mark.slow
def test_fit_on_a_checkpoint_saved_mid_epoch_uses_every_training_image(
    trained_run: Path, tmp_path: Path
) -> None:
    """A checkpoint saved mid-epoch holds the data module's place in the epoch; the fit
    reads every training image regardless."""
    saved = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    state = saved["ImageDataModule"]["train_order"]
    saved["ImageDataModule"]["train_order"] = {**state, "epoch": 0, "positions_done": 32}
    checkpoint = tmp_path / "mid_epoch.ckpt"
    torch.save(saved, checkpoint)
    out = tmp_path / "fit"
    generate(
        compose_tool("generate", out, f"ckpt_path={checkpoint}", "mode=fit", "sampler.components=2")
    )
    datamodule = ImageDataModule.load_from_checkpoint(checkpoint)
    datamodule.setup("fit")
    assert json.loads((out / "sampler.json").read_text())["images"] == len(datamodule.train_set)
