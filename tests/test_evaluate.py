"""Evaluation and generation: likelihood estimates with known answers, the commands' outputs."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image

from cvae import CVAE, ImageDataModule
from cvae.errors import Interrupted, run_or_report
from cvae.evaluation import evaluate_checkpoint, evaluate_model
from cvae.generation import along_principal_axes, generate, traverse
from cvae.metrics import (
    PosteriorStatistics,
    channel_errors,
    colour_distance,
    colour_histogram,
    named,
)
from cvae.models.latents import Gaussian, Posterior
from cvae.models.likelihoods import gaussian_log_density
from cvae.models.losses import kl_per_dimension
from cvae.pixels import dequantize
from tests.helpers import compose_tool, write_mixed_images

REPO = Path(__file__).resolve().parents[1]


def _checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.ckpt"


def _linear_gaussian(model: CVAE, exact_posterior: bool, n: int = 5) -> torch.Tensor:
    """Make `model` a linear Gaussian model x = W z + b + N(0, 1/2), whose marginal
    likelihood is known: N(x; b, W W^T + I/2). Returns log p(x) of a test batch."""
    torch.manual_seed(0)
    pixels, latent = 16, model.hparams.latent_dim
    w = torch.linalg.qr(torch.randn(pixels, latent))[0] * torch.tensor([2.0, 1.0, 0.5])
    b = torch.rand(pixels)
    noise = 0.5
    x = torch.randn(n, latent) @ w.T + b + noise**0.5 * torch.randn(n, pixels)
    x = x.view(n, 1, 4, 4)
    # W has orthogonal columns, so the exact posterior has a diagonal covariance.
    posterior_var = 1 / (1 + (w * w).sum(0) / noise)

    def encode(images: torch.Tensor, labels=None) -> Posterior:
        if not exact_posterior:  # the prior: a poor proposal, fixed by many samples
            zeros = torch.zeros(len(images), latent)
            return Posterior.one_level(zeros, zeros)
        mean = posterior_var * ((images.flatten(1) - b) @ w) / noise
        return Posterior.one_level(mean, posterior_var.log().expand(len(images), -1))

    model.encode = encode
    # Means outside [0, 1]: the decoder outputs them directly, scored by an identity-link
    # Gaussian (the model's own link, sigmoid(logits), is not under test here).
    model.decode_logits = lambda z, labels=None: (z @ w.T + b).view(-1, 1, 4, 4)  # pass as decoder=
    log_sigma = torch.tensor(0.5 * math.log(noise))
    model.likelihood.log_prob = lambda mean, images: gaussian_log_density(mean, images, log_sigma)
    marginal = torch.distributions.MultivariateNormal(b, w @ w.T + noise * torch.eye(pixels))
    return x, marginal.log_prob(x.flatten(1))


def test_iwae_is_exact_with_the_true_posterior() -> None:
    model = CVAE(in_channels=1, image_size=4, latent_dim=3, hidden_channels=[4], recon_loss="mse")
    x, truth = _linear_gaussian(model, exact_posterior=True)
    for k in (1, 7):
        estimate = model.log_likelihood(x, k=k, decoder=model.decode_logits)
        torch.testing.assert_close(estimate, truth, atol=1e-3, rtol=0)


def test_iwae_tightens_towards_the_truth_as_k_grows() -> None:
    model = CVAE(in_channels=1, image_size=4, latent_dim=3, hidden_channels=[4], recon_loss="mse")
    x, truth = _linear_gaussian(model, exact_posterior=False, n=200)
    generator = torch.Generator().manual_seed(0)
    options = {"generator": generator, "max_decodes": 10**5, "decoder": model.decode_logits}
    gaps = [  # mean over 200 points of log p(x) minus its estimate
        float((truth - model.log_likelihood(x, k=k, **options)).mean()) for k in (1, 10, 100, 2000)
    ]
    assert gaps[0] > gaps[1] > gaps[2] > -0.05  # a lower bound, closing in
    assert abs(gaps[3]) < 0.05 < gaps[0] / 20


def test_log_likelihood_takes_the_fast_decoder_by_default() -> None:
    """Called from Python with its defaults, the estimate runs the evaluator's fast path (a
    `FastDecoder` and its `decodes_per_call`): the draws of passing them, never the slow
    module, and the module's logits up to rounding."""
    from cvae.models.inference import FastDecoder

    torch.manual_seed(0)
    model = CVAE(
        in_channels=1, image_size=8, latent_dim=3, hidden_channels=[4, 8], recon_loss="bce"
    )
    x = (torch.rand(5, 1, 8, 8) > 0.5).float()
    fast = FastDecoder(model.decoder)
    per_call = fast.decodes_per_call()
    slow = model.log_likelihood(
        x,
        k=50,
        generator=torch.Generator().manual_seed(0),
        max_decodes=per_call,
        decoder=model.decoder.logits,
    )
    explicit = model.log_likelihood(
        x, k=50, generator=torch.Generator().manual_seed(0), max_decodes=per_call, decoder=fast
    )

    def refuse(z: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the slow decoder was called")

    model.decoder.logits = refuse
    default = model.log_likelihood(x, k=50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(default, explicit)
    torch.testing.assert_close(default, slow, atol=1e-4, rtol=0)


def test_trained_model_bound_tightens_and_k_one_is_the_elbo(trained_run: Path) -> None:
    model = CVAE.load_from_checkpoint(_checkpoint(trained_run), weights_only=True)
    with torch.no_grad():  # a wider proposal than the model learned: room to tighten
        model.encoder.log_var.bias += 2
    x = torch.rand(16, 3, 16, 16)
    generator = torch.Generator().manual_seed(0)
    nll = [float(-model.log_likelihood(x, k=k, generator=generator).mean()) for k in (1, 64)]
    elbo = float(model.elbo(x, generator=generator).mean())
    assert nll[1] < nll[0]
    assert abs(-elbo - nll[0]) < 0.05 * abs(nll[0])  # both one-sample estimates


def _standard_kl(posterior: Posterior) -> tuple[torch.Tensor, ...]:
    return (kl_per_dimension(posterior.mu, posterior.log_var),)


def test_active_units_count_latents_whose_mean_varies() -> None:
    statistics = PosteriorStatistics()
    mu = torch.zeros(100, 3)
    mu[:, 0] = torch.linspace(-1, 1, 100)  # variance 0.34: active
    mu[:, 1] = torch.linspace(-0.05, 0.05, 100)  # variance 0.0009: inactive
    statistics.update(Posterior.one_level(mu, torch.zeros(100, 3)), _standard_kl)
    assert statistics.active_units() == 1
    expected_kl = 0.5 * mu.pow(2).mean(0)
    torch.testing.assert_close(statistics.kl_per_dim().float(), expected_kl)


def test_kl_images_caps_the_kl_average_not_the_active_units() -> None:
    mu = torch.zeros(200, 2)
    mu[:, 0] = torch.linspace(-1, 1, 200)
    capped, full = PosteriorStatistics(kl_images=150), PosteriorStatistics()
    for rows in mu.split(100):
        capped.update(Posterior.one_level(rows, torch.zeros_like(rows)), _standard_kl)
        full.update(Posterior.one_level(rows, torch.zeros_like(rows)), _standard_kl)
    assert (capped.count, capped.kl_count) == (200, 150)
    assert capped.active_units() == full.active_units() == 1
    torch.testing.assert_close(capped.kl_per_dim().float(), 0.5 * mu[:150].pow(2).mean(0))
    merged = PosteriorStatistics()  # a chunk's saved state adds up to the same statistics
    merged.merge(capped.state())
    torch.testing.assert_close(merged.kl_per_dim(), capped.kl_per_dim())
    assert merged.active_units() == 1


def test_statistics_of_two_levels_count_each_level() -> None:
    """A posterior with two latent levels: active units per level and a KL per latent of
    each (what a hierarchy reports), through the same statistics as one level."""
    top, lower = torch.zeros(50, 2), torch.zeros(50, 3)
    top[:, 1] = torch.linspace(-1, 1, 50)
    lower[:, :2] = torch.linspace(-1, 1, 50)[:, None]
    posterior = Posterior((Gaussian(top, torch.zeros(50, 2)), Gaussian(lower, torch.zeros(50, 3))))
    statistics = PosteriorStatistics()
    statistics.update(posterior, lambda q: tuple(kl_per_dimension(*level) for level in q.levels))
    assert statistics.active_units_per_level() == [1, 2]
    assert statistics.active_units() == 3
    assert statistics.kl_per_dim().shape == (5,)


def test_dequantisation_keeps_each_value_in_its_bin() -> None:
    images = torch.tensor([[[[0, 1, 254, 255]]]], dtype=torch.uint8)
    x = dequantize(images, continuous=True, generator=torch.Generator().manual_seed(0))
    assert torch.all(x * 256 >= images.float()) and torch.all(x * 256 < images.float() + 1)
    binary = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert dequantize(binary, continuous=False).tolist() == [[[[0.0, 1.0]]]]


def test_evaluate_reports_every_metric(trained_run: Path) -> None:
    model = CVAE.load_from_checkpoint(_checkpoint(trained_run), weights_only=True)
    dm = ImageDataModule.load_from_checkpoint(_checkpoint(trained_run))
    dm.setup()
    metrics = evaluate_model(model, dm.test_dataloader(), iw_samples=8, max_images=5)
    assert metrics["images"] == 5
    assert metrics["neg_elbo"] == pytest.approx(metrics["recon"] + metrics["kl"])
    assert metrics["iw_nll"] < metrics["neg_elbo"] + 1.0
    dims = 3 * 16 * 16
    bpd = (metrics["iw_nll"] + dims * math.log(256)) / (dims * math.log(2))
    assert metrics["bits_per_dim"] == pytest.approx(bpd)
    assert 0 < metrics["psnr"] < 100 and -1 <= metrics["ssim"] <= 1
    assert 0 <= metrics["active_units"] <= 8 and len(metrics["kl_per_dim"]) == 8
    assert 0 < metrics["mse_per_pixel"] < 1
    # colour (the shapes are RGB): each channel's error, and how far the reconstructions'
    # intensities lie from the images'
    assert set(metrics["mae_per_channel"]) == {"red", "green", "blue"}
    assert all(0 < v < 1 for v in metrics["mae_per_channel"].values())
    assert all(0 <= v < 1 for v in metrics["colour_w1_reconstructions"].values())


def test_colour_metrics_name_the_channel_a_model_gets_wrong() -> None:
    """Reconstructions with red 0.2 too high: red's error and histogram distance are 0.2,
    green's and blue's 0."""
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.7
    tinted = images.clone()
    tinted[:, 0] += 0.2
    errors = channel_errors(tinted, (images * 255).round().to(torch.uint8)).mean(0)
    assert errors.tolist() == pytest.approx([0.2, 0.0, 0.0], abs=0.003)  # 8-bit rounding
    distance = colour_distance(colour_histogram(images, bins=100), colour_histogram(tinted, 100))
    assert distance.tolist() == pytest.approx([0.2, 0.0, 0.0], abs=0.011)  # a bin's width
    assert named(distance)["red"] == pytest.approx(0.2, abs=0.011)
    assert colour_histogram(images).sum(1).tolist() == [4 * 8 * 8] * 3  # every pixel counted


def test_bernoulli_nll_is_reported_only_on_binary_data() -> None:
    model = CVAE(
        in_channels=1, image_size=16, latent_dim=4, hidden_channels=[4], recon_loss="bernoulli"
    )
    grey = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    binary = (grey > 127).to(torch.uint8) * 255
    on_grey = evaluate_model(model, [(grey, torch.zeros(4))], iw_samples=2)
    on_binary = evaluate_model(model, [(binary, torch.zeros(4))], iw_samples=2)
    assert on_grey["proper_density"] is False and on_grey["bits_per_dim"] is None
    assert on_binary["proper_density"] is True
    assert on_binary["bits_per_dim"] == pytest.approx(on_binary["iw_nll"] / (256 * math.log(2)))


@pytest.mark.slow
def test_evaluate_command_prints_and_writes_metrics(trained_run: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cvae.evaluate",
            f"ckpt_path={_checkpoint(trained_run)}",
            "eval.iw_samples=4",
            "eval.split=val",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (folder,) = [p.parent for p in tmp_path.glob("*/metrics.json")]
    assert folder.name.startswith("last-val-k4-")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["images"] == 6 and metrics["iw_samples"] == 4 and metrics["split"] == "val"
    assert "iw_nll" in result.stdout and "bits_per_dim" in result.stdout
    assert (folder / "config.yaml").is_file() and (folder / "settings.json").is_file()
    rows = (folder / "per_image.csv").read_text().splitlines()
    assert rows[0].startswith("index,iw_nll") and len(rows) == 1 + 6
    assert "IW NLL, K=4: 6 of 6 images" in result.stdout  # not a terminal: a log line


def _evaluation(trained_run: Path, out: Path, *overrides: str) -> DictConfig:
    return compose_tool(
        "eval",
        out,
        f"ckpt_path={_checkpoint(trained_run)}",
        "eval.seed=3",
        "eval.chunk_images=2",
        "eval.progress=false",
        *overrides,
    )


def _run_evaluation(trained_run: Path, out: Path, *overrides: str) -> dict:
    return evaluate_checkpoint(_evaluation(trained_run, out, *overrides))


def _chunk_values(folder: Path) -> list[dict]:
    return [
        torch.load(path, weights_only=True)["values"]
        for path in sorted((folder / "chunks").glob("*.pt"))
    ]


def test_interrupted_evaluation_resumes_with_the_same_numbers(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cvae.evaluation

    whole = _run_evaluation(trained_run, tmp_path / "whole", "eval.iw_samples=5")
    evaluate_chunk, calls = cvae.evaluation.image_metrics, []

    def interrupted_after_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the third chunk
        return evaluate_chunk(*args, **kwargs)

    monkeypatch.setattr(cvae.evaluation, "image_metrics", interrupted_after_two)
    with pytest.raises(
        Interrupted,
        match=r"^Ctrl-C: 2 finished chunks of 2 images kept in .*; the same command continues",
    ):
        _run_evaluation(trained_run, tmp_path / "resumed", "eval.iw_samples=5")
    (folder,) = (tmp_path / "resumed").iterdir()
    assert len(_chunk_values(folder)) == 2 and not (folder / "metrics.json").exists()
    calls.clear()
    resumed = _run_evaluation(trained_run, tmp_path / "resumed", "eval.iw_samples=5")
    assert len(calls) == 1  # 6 validation images in chunks of 2: only the last one was left
    (whole_folder,) = (tmp_path / "whole").iterdir()
    assert folder.name == whole_folder.name  # the same evaluation, the same folder name
    for got, expected in zip(_chunk_values(folder), _chunk_values(whole_folder), strict=True):
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)  # identical, per image
    assert resumed == whole


def test_sigterm_keeps_the_finished_chunks_and_says_so_in_one_line(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import cvae.evaluation

    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # as in a command's process
    evaluate_chunk, calls = cvae.evaluation.image_metrics, []

    def terminated_in_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's kill, mid-chunk
        return evaluate_chunk(*args, **kwargs)

    monkeypatch.setattr(cvae.evaluation, "image_metrics", terminated_in_the_third)
    cfg = _evaluation(trained_run, tmp_path, "eval.iw_samples=5")
    with pytest.raises(SystemExit) as stopped:
        run_or_report(evaluate_checkpoint, cfg)
    assert stopped.value.code == 143  # 128 + SIGTERM, as a shell reports it
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and re.fullmatch(
        r"SIGTERM: 2 finished chunks of 2 images kept in .*; the same command continues "
        r"from there",
        said[0],
    )
    (folder,) = tmp_path.iterdir()
    assert len(_chunk_values(folder)) == 2
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # given back


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_a_chunk"])
def test_a_damaged_chunk_is_evaluated_again_and_named_in_one_log_line(
    damage: str, trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import cvae.evaluation

    first = _run_evaluation(trained_run, tmp_path, "eval.iw_samples=2", "eval.split=val")
    (folder,) = tmp_path.iterdir()
    chunk = folder / "chunks" / "00001.pt"
    data = chunk.read_bytes()
    if damage == "not_a_chunk":
        torch.save({"weights": torch.zeros(2)}, chunk)
    else:
        chunk.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with caplog.at_level("WARNING", logger=cvae.evaluation.__name__):
        again = _run_evaluation(trained_run, tmp_path, "eval.iw_samples=2", "eval.split=val")
    reason = {
        "truncated": r"the file is damaged or truncated: .+",
        "empty": r"the file is empty",
        "not_a_chunk": r"not an evaluation chunk",
    }[damage]
    said = [r.getMessage() for r in caplog.records if r.name == cvae.evaluation.__name__]
    assert len(said) == 1 and re.fullmatch(
        rf"{re.escape(str(chunk))} is damaged \({reason}\): evaluating that chunk again",
        said[0],
    ), said
    assert again == first and chunk.read_bytes() == data  # the same chunk, written again


def test_each_evaluation_gets_a_folder_of_its_own(trained_run: Path, tmp_path: Path) -> None:
    first = _run_evaluation(trained_run, tmp_path, "eval.iw_samples=2", "eval.split=val")
    again = _run_evaluation(trained_run, tmp_path, "eval.iw_samples=2", "eval.split=val")
    assert again == first and len(list(tmp_path.iterdir())) == 1  # found, not redone
    _run_evaluation(trained_run, tmp_path, "eval.iw_samples=3", "eval.split=val")
    _run_evaluation(trained_run, tmp_path, "eval.iw_samples=2", "eval.split=val", "eval.seed=4")
    assert len(list(tmp_path.iterdir())) == 3
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n.rsplit("-", 1)[0] for n in names] == ["last-val-k2", "last-val-k2", "last-val-k3"]


def test_evaluating_a_folder_uses_every_image_at_the_model_s_size(
    trained_run: Path, tmp_path: Path
) -> None:
    """The model takes 3 channels at 16x16; the folder preset is asked for 1 at 32x32: its
    images are read as the model needs them, all 7 of them unless a split is named."""
    images = tmp_path / "images"
    write_mixed_images(images, 7)
    (images / "broken.png").write_bytes(b"")  # skipped, not counted
    common = (
        "data=folder",
        f"data.root={images}",
        "data.channels=1",
        "data.image_size=32",
        f"data.cache_dir={tmp_path / 'cache'}",
        "eval.iw_samples=2",
    )
    every = _run_evaluation(trained_run, tmp_path / "all", *common)
    assert every["images"] == 7 and every["split"] == "all"
    test_split = _run_evaluation(trained_run, tmp_path / "test", *common, "eval.split=test")
    assert test_split["images"] == 1  # 10% of the 7


def test_progress_is_a_log_line_when_not_on_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    from cvae.progress import ProgressReport

    with caplog.at_level("INFO", logger="cvae.progress"):
        report = ProgressReport(100, "IW NLL, K=5", done=20, every=0.0)
        report.advance(30)
        report.close()
    assert "IW NLL, K=5: 50 of 100 images" in caplog.text
    assert re.search(r"about [\d.]+ (s|min|h) left", caplog.text)


def test_evaluate_on_data_that_does_not_fit_names_the_key(trained_run: Path, tmp_path) -> None:
    cfg = compose_tool(
        "eval",
        tmp_path,
        f"ckpt_path={_checkpoint(trained_run)}",
        "data=synthetic",
        "data.image_size=32",
    )
    with pytest.raises(ValueError, match="data.image_size=32 does not fit"):
        evaluate_checkpoint(cfg)


def test_binarized_data_is_fixed_for_evaluation_and_fresh_for_training() -> None:
    def datamodule() -> ImageDataModule:
        dm = ImageDataModule(
            source="synthetic", synthetic_images=40, image_size=8, binarize=True, batch_size=40
        )
        dm.setup()
        return dm

    first, second = datamodule(), datamodule()
    val = next(iter(first.val_dataloader()))[0]
    assert set(val.unique().tolist()) <= {0, 255}
    assert torch.equal(val, next(iter(second.val_dataloader()))[0])
    batch = next(iter(first.train_dataloader()))
    first.trainer = SimpleNamespace(training=True)
    draws = [first.on_after_batch_transfer(batch, 0)[0] for _ in range(2)]
    assert set(draws[0].unique().tolist()) <= {0, 255} and not torch.equal(*draws)
    mean_draw = torch.stack([first.on_after_batch_transfer(batch, 0)[0] for _ in range(200)])
    intensity = batch[0].float()
    assert (mean_draw.float().mean(0) - intensity).abs().mean() < 10  # pixel ~ Bernoulli(x)


# --- generation ------------------------------------------------------------------------------
def _generate(trained_run: Path, out: Path, *overrides: str) -> Path:
    cfg = compose_tool("generate", out, f"ckpt_path={_checkpoint(trained_run)}", *overrides)
    return generate(cfg)


def test_sample_writes_a_grid_and_files_reproducibly(trained_run: Path, tmp_path: Path) -> None:
    a = _generate(trained_run, tmp_path / "a", "mode=sample", "n=6", "temperature=0.8")
    b = _generate(trained_run, tmp_path / "b", "mode=sample", "n=6", "temperature=0.8")
    files = sorted(p.name for p in (a / "samples").iterdir())
    assert files == [f"{i:04d}.png" for i in range(6)]
    assert (a / "samples.png").read_bytes() == (b / "samples.png").read_bytes()
    assert Image.open(a / "samples" / "0000.png").size == (16, 16)


def test_reconstruct_decodes_a_folder_like_training_data(trained_run: Path, tmp_path) -> None:
    write_mixed_images(tmp_path / "in" / "sub", 3)
    (tmp_path / "in" / "broken.png").write_bytes(b"")
    out = _generate(trained_run, tmp_path / "out", "mode=reconstruct", f"input={tmp_path / 'in'}")
    pairs = sorted(str(p.relative_to(out / "pairs")) for p in (out / "pairs").rglob("*.png"))
    assert pairs == ["sub/image_0.png", "sub/image_1.png", "sub/image_2.png"]
    assert Image.open(out / "pairs" / pairs[0]).size == (32, 16)  # input | reconstruction
    assert (out / "reconstructions.png").is_file()


def test_reconstruct_without_input_shows_n_test_images_as_the_showcase_does(
    trained_run: Path, tmp_path: Path
) -> None:
    alone = _generate(trained_run, tmp_path / "alone", "mode=reconstruct", "n=6")
    showcase = _generate(trained_run, tmp_path / "showcase", "mode=showcase", "n=6")
    grid = (alone / "reconstructions.png").read_bytes()
    assert grid == (showcase / "reconstructions.png").read_bytes()
    assert Image.open(alone / "reconstructions.png").size[0] > 6 * 16  # the six, in a row
    assert not (alone / "pairs").exists()  # no files of their own: they are not the user's


@pytest.mark.parametrize("spherical", [False, True])
def test_interpolate_writes_grid_and_gif(trained_run: Path, tmp_path, spherical: bool) -> None:
    out = _generate(trained_run, tmp_path, "mode=interpolate", "steps=5", f"spherical={spherical}")
    gif = Image.open(out / "interpolation.gif")
    assert gif.n_frames == 8  # 5 forwards, 3 back
    assert Image.open(out / "interpolation.png").size[0] > 5 * 16


def test_interpolation_ends_at_the_two_reconstructions(trained_run: Path) -> None:
    model = CVAE.load_from_checkpoint(_checkpoint(trained_run), weights_only=True)
    x = torch.rand(2, 3, 16, 16)
    ends = model.reconstruct(x)
    for spherical in (False, True):
        frames = model.interpolate(x[0], x[1], steps=4, spherical=spherical)
        torch.testing.assert_close(frames[[0, -1]], ends, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("directions", ["principal", "latents"])
def test_traverse_sweeps_the_chosen_directions(
    trained_run: Path, tmp_path: Path, directions: str
) -> None:
    image = tmp_path / "one.png"
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(image)
    out = _generate(
        trained_run,
        tmp_path / "out",
        "mode=traverse",
        f"input={image}",
        "dims=3",
        "steps=4",
        f"directions={directions}",
    )
    rows = (out / "traversal.txt").read_text().splitlines()
    assert [row.split(":")[0] for row in rows] == ["row 1", "row 2", "row 3"]
    if directions == "latents":
        dims = [int(row.split()[3]) for row in rows]  # "row 1: latent 5 (KL ...)"
        assert len(set(dims)) == 3 and all(0 <= d < 8 for d in dims)
    else:
        shares = [float(row.split("(")[1].split("%")[0]) for row in rows]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.05
    width, height = Image.open(out / "traversal.png").size
    assert (width, height) == (4 * 16 + 5 * 2, 3 * 16 + 4 * 2)


def test_a_traversal_moves_only_along_its_direction(trained_run: Path) -> None:
    """Each row's latents differ from the image's mean only along the row's vector, at the
    asked spreads around the centre; a latent's unit vector moves that latent alone."""
    model = CVAE.load_from_checkpoint(_checkpoint(trained_run), weights_only=True).eval()
    images = torch.rand(40, 3, 16, 16)
    directions = along_principal_axes(model, [(images, torch.zeros(40))], 2)
    torch.testing.assert_close(
        directions.vectors @ directions.vectors.T, torch.eye(2), atol=1e-5, rtol=0
    )
    decoded = []
    model.decode_latents = lambda z, label=None: decoded.append(z) or z  # latents, not images
    traverse(model, images[0], directions, 3, 2.0)
    z = decoded[0].reshape(2, 3, -1)
    mu = model.encode(images[:1]).mu
    for row, vector in enumerate(directions.vectors):
        moved = z[row] - mu
        along = moved @ vector
        torch.testing.assert_close(moved, along[:, None] * vector, atol=1e-5, rtol=0)
        values = torch.tensor([-2.0, 0.0, 2.0])
        expected = (directions.centre - mu[0]) @ vector + directions.spreads[row] * values
        torch.testing.assert_close(along, expected, atol=1e-5, rtol=1e-5)


def test_unknown_mode_is_an_error(trained_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode='dream' is not one of"):
        _generate(trained_run, tmp_path, "mode=dream")


def test_unknown_traversal_directions_are_an_error_before_any_image(
    trained_run: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="directions='diagonal' is not one of principal, latents"):
        _generate(trained_run, tmp_path / "out", "mode=showcase", "directions=diagonal")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options",
    [
        {"kernel_size": 4},
        {"kernel_size": 3},
        {"kernel_size": 5},
        {"kernel_size": 2},
        {"kernel_size": 4, "batch_norm": True, "residual_blocks": 1},
    ],
)
def test_fast_decoder_computes_the_decoder_s_logits(options: dict) -> None:
    from cvae.models.inference import FastDecoder

    torch.manual_seed(0)
    model = CVAE(in_channels=3, image_size=16, latent_dim=5, hidden_channels=[4, 8], **options)
    for module in model.modules():  # BatchNorm statistics other than the initial ones
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    model.eval()
    fast = FastDecoder(model.decoder)
    assert fast.last is not None  # every last layer of ours has the fast form
    z = torch.randn(7, 5)
    with torch.inference_mode():
        torch.testing.assert_close(fast(z), model.decoder.logits(z), atol=1e-5, rtol=1e-5)
    assert all(p.is_contiguous() for p in model.decoder.parameters())  # the model untouched
