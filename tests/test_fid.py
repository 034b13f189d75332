"""FID and KID with a small injected feature extractor, and the offline error: nothing is
downloaded here (the Inception weights are never fetched)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cvae.fid
from cvae import CVAE
from cvae.errors import run_or_report
from cvae.evaluation import evaluate_checkpoint
from cvae.fid import WEIGHTS_FILE, fid_kid, inception_weights, sample_quality
from tests.helpers import TinyFeatures, compose_tool


def _images(n: int = 300, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 200, (n, 1, 16, 16), generator=generator, dtype=torch.uint8)


def test_fid_of_a_set_with_itself_is_zero_and_grows_as_it_is_shifted() -> None:
    images = _images()
    extractor = TinyFeatures()
    same = fid_kid(images.split(64), images.split(64), extractor)
    assert abs(same["fid"]) < 1e-9
    assert same["fid_real_images"] == same["fid_samples"] == 300
    fids, kids = [], []
    for shift in (10, 30, 55):
        shifted = images + shift  # brighter, still uint8 (at most 254)
        scores = fid_kid(images.split(64), shifted.split(64), extractor)
        fids.append(scores["fid"])
        kids.append(scores["kid"])
    assert 0.01 < fids[0] < fids[1] < fids[2]
    assert abs(same["kid"]) < kids[0] / 10 and kids[0] < kids[1] < kids[2]


def test_fid_of_two_samples_of_one_distribution_is_small() -> None:
    extractor = TinyFeatures()
    between = fid_kid(_images(seed=1).split(100), _images(seed=2).split(100), extractor)["fid"]
    shifted = fid_kid(_images(seed=1).split(100), (_images(seed=2) + 40).split(100), extractor)
    assert between < shifted["fid"] / 10


def test_sample_quality_of_a_model_with_an_injected_extractor() -> None:
    model = CVAE(in_channels=1, image_size=16, latent_dim=4, hidden_channels=[4, 8])
    loader = [(images, torch.zeros(len(images))) for images in _images(40).split(16)]
    scores = sample_quality(model, loader, samples=30, extractor=TinyFeatures(), batch_size=8)
    assert scores["fid_samples"] == 30 and scores["fid_real_images"] == 30
    assert scores["fid"] > 0 and torch.isfinite(torch.tensor(scores["kid"]))
    again = sample_quality(model, loader, samples=30, extractor=TinyFeatures(), batch_size=8)
    assert again == scores  # seeded samples and KID subsets


def test_inception_is_given_uint8_rgb_of_float_images() -> None:
    """The wrapper keeps the contract for Inception: float grayscale in [0, 1] becomes the
    uint8 RGB it was trained on, exactly (x / 255 * 255 rounds back to x)."""
    seen = []

    def network(images: torch.Tensor) -> torch.Tensor:
        seen.append(images)
        return torch.zeros(len(images), 2048)

    images = _images(4)
    cvae.fid.Inception(network)(images.float() / 255)
    assert seen[0].dtype == torch.uint8 and seen[0].shape == (4, 3, 16, 16)
    assert torch.equal(seen[0][:, 1], images[:, 0])


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty torch hub cache, no network, and a download that fails the test if tried."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(cvae.fid, "can_reach", lambda *args, **kwargs: False)

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_offline_without_weights_names_the_file_and_where_to_put_it(offline: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        inception_weights(None)
    message = str(error.value)
    assert WEIGHTS_FILE in message and str(offline) in message
    assert "eval.fid_weights=PATH" in message and "\n" not in message


def test_weights_from_the_hub_cache_or_a_path(offline: Path, tmp_path: Path) -> None:
    offline.mkdir(parents=True)
    (offline / WEIGHTS_FILE).write_bytes(b"")
    assert inception_weights(None) == offline / WEIGHTS_FILE
    with pytest.raises(FileNotFoundError, match="eval.fid_weights=.*nope.pth is not a file"):
        inception_weights(tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not weights")
    with pytest.raises(ValueError, match="eval.fid_weights=.*garbage.pth is not the Inception"):
        cvae.fid.inception(garbage)


def test_evaluate_stops_at_once_with_one_line_when_offline(
    trained_run: Path, tmp_path: Path, offline: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import cvae.evaluation

    def no_evaluation(*args, **kwargs):
        raise AssertionError("the evaluation started before the weights were found")

    monkeypatch.setattr(cvae.evaluation, "image_metrics", no_evaluation)
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    cfg = compose_tool("eval", tmp_path / "out", f"ckpt_path={checkpoint}", "eval.fid=true")
    with pytest.raises(SystemExit) as exit_status:
        run_or_report(evaluate_checkpoint, cfg)
    assert exit_status.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and WEIGHTS_FILE in lines[0]


def test_evaluate_reports_fid_and_kid(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cvae.fid, "inception", lambda weights=None: TinyFeatures())
    cfg = compose_tool(
        "eval",
        tmp_path,
        f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
        "eval.fid=true",
        "eval.fid_samples=20",
        "eval.iw_samples=2",
        "eval.split=val",
        "eval.progress=false",
    )
    metrics = evaluate_checkpoint(cfg)
    assert metrics["fid"] > 0 and "kid" in metrics and metrics["fid_samples"] == 20
    assert metrics["fid_real_images"] == 6  # the validation split has 6 images
    assert set(metrics["colour_w1_samples"]) == {"red", "green", "blue"}  # RGB shapes
    (saved,) = tmp_path.glob("*/metrics.json")
    assert json.loads(saved.read_text())["fid"] == metrics["fid"]
