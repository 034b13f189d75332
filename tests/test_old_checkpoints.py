"""Checkpoints written before the typed posterior and samplers as objects (commit 859023e)
load with today's code and give the same numbers: samples from the prior and from their
fitted `gmm`, ELBO, importance-weighted bound and reconstructions
(`tests/data/checkpoints_859023e/README.md` says how they were made).

To float rounding, not bit for bit: the same code on another CPU picks other kernels (on
an Intel Xeon in 2026-12 the transposed-convolution samples differed from the references by
at most 6e-8, in 43 of 3,072 values), and the `resize` decoder computes the same function as
a transposed convolution since commit 5a60cc7 with its sums reordered
(`tests/test_decoder_phases.py`). A changed computation moves them by far more."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cvae.models import CVAE
from cvae.samplers import GaussianMixtureSampler

FIXTURE = Path(__file__).parent / "data" / "checkpoints_859023e"
NAMES = ("default", "mse_transpose_vamp", "conditional_mog")


@pytest.fixture(scope="module")
def references() -> dict:
    return torch.load(FIXTURE / "references.pt", weights_only=True)


@pytest.mark.parametrize("name", NAMES)
def test_old_checkpoint_gives_the_same_numbers(name: str, references: dict) -> None:
    expected = references[name]
    checkpoint = FIXTURE / f"{name}.ckpt"
    model = CVAE.load_from_checkpoint(checkpoint)
    x, labels = expected["images"], expected["labels"]
    sampler = GaussianMixtureSampler().loaded_for(checkpoint)  # the file's own settings
    assert sampler.settings()["components"] == 3
    generator = torch.Generator
    got = {
        "samples_prior": model.sample(4, generator=generator().manual_seed(0), labels=labels),
        "samples_gmm": model.sample(
            4, generator=generator().manual_seed(0), labels=labels, sampler=sampler
        ),
        "elbo": model.elbo(x, labels, generator=generator().manual_seed(1)),
        "iw_bound": model.log_likelihood(x, labels, k=8, generator=generator().manual_seed(2)),
        "reconstructions": model.reconstruct(x, labels),
    }
    for key, value in got.items():
        torch.testing.assert_close(
            value, expected[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{name}: {k}: {m}"
        )


def test_old_defaults_are_kept_from_the_saved_settings() -> None:
    """The checkpoint `CVAE()` of 859023e made (mse, transpose) keeps its likelihood and
    up-sampling though today's defaults differ; a checkpoint that lacks those settings
    (written before they existed) gets the values it was trained with."""
    checkpoint = torch.load(FIXTURE / "mse_transpose_vamp.ckpt", weights_only=True)
    model = CVAE.from_checkpoint(checkpoint)
    assert (model.hparams.recon_loss, model.hparams.upsample) == ("mse", "transpose")
    assert CVAE().hparams.upsample == "resize"
    for key in ("recon_loss", "upsample"):
        del checkpoint["hyper_parameters"][key]
    older = CVAE.from_checkpoint(checkpoint)
    assert (older.hparams.recon_loss, older.hparams.upsample) == ("mse", "transpose")
