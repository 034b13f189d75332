"""The in-domain feature network: `cvae.train_features` trains a classifier on labelled
shapes and saves it as TorchScript; `eval.fid_features=PATH` loads it (or any TorchScript
file keeping the contract) for FID, with one-line errors for files that do not fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import cvae.evaluation
import cvae.fid
from cvae.errors import run_or_report
from cvae.evaluation import evaluate_checkpoint
from cvae.features import run
from cvae.fid import feature_network, fid_kid
from tests.helpers import REPO, TINY_CLASSIFIER, compose_tool, write_mixed_images


@pytest.fixture(scope="module")
def feature_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("features")
    result = run(
        compose_tool(
            "train_features", folder, "data=synthetic", "data.synthetic_images=96", *TINY_CLASSIFIER
        )
    )
    assert result["path"] == str(folder / "features.pt")
    return folder / "features.pt"


def _shapes(brightness: int = 200, count: int = 64, seed: int = 0) -> torch.Tensor:
    """Squares of `brightness` on a dark ground, uint8 `(count, 3, 16, 16)`; the same
    squares and ground for every `brightness`."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 60, (count, 3, 16, 16), generator=generator, dtype=torch.uint8)
    for image, corner in zip(
        images, torch.randint(0, 8, (count, 2), generator=generator), strict=True
    ):
        y, x = corner.tolist()
        image[:, y : y + 8, x : x + 8] = brightness
    return images


def test_the_classifier_file_keeps_the_contract_and_measures_fid(feature_file: Path) -> None:
    info = json.loads(feature_file.with_name("features.json").read_text())
    assert (
        info["channels"] == 3
        and info["num_features"] == 16
        and info["classes"] == ["circle", "square", "triangle"]
    )
    assert 0 <= info["test_accuracy"] <= 1 and info["train_seconds"] >= 0
    assert info["standardized_on_train_images"] == info["train_images"]  # fewer than 10,000
    network = feature_network(feature_file)  # channels from the file's own metadata
    assert network.num_features == 16 and network.meta["test_accuracy"] == info["test_accuracy"]
    for size in (16, 28, 64):  # any size: resized inside
        assert network(torch.rand(5, 3, size, size)).shape == (5, 16)
    assert network.network.classify(torch.rand(5, 3, 16, 16)).shape == (5, 3)
    images = _shapes()
    same = fid_kid(images.split(16), images.split(16), network)
    assert abs(same["fid"]) < 1e-9
    fids = [
        fid_kid(images.split(16), _shapes(dimmer).split(16), network)["fid"]
        for dimmer in (170, 120)
    ]
    assert 1e-6 < fids[0] < fids[1]  # small numbers: the features' scale is the network's


def _one_line_error(capsys: pytest.CaptureFixture, run_it) -> str:
    """What `run_or_report` prints for the input error `run_it` raises."""
    with pytest.raises(SystemExit) as exit_status:
        run_it()
    assert exit_status.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


class OneChannel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images).mean((2, 3))


class NotFlat(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_files_that_do_not_fit_are_one_line_naming_the_key_and_file(
    feature_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("not a network")
    pickle = tmp_path / "state.pt"
    torch.save(OneChannel().state_dict(), pickle)
    one_channel, not_flat = tmp_path / "gray.pt", tmp_path / "images.pt"
    torch.jit.script(OneChannel()).save(str(one_channel))
    torch.jit.script(NotFlat()).save(str(not_flat))
    cases = {
        tmp_path / "missing.pt": "is not a file",
        text: "is not a TorchScript file (PytorchStreamReader failed reading zip archive",
        pickle: "is not a TorchScript file",
        one_channel: "fails on float32 images (2, 3, 16, 16) in [0, 1] (",
        not_flat: "returns (2, 3, 16, 16) for images (2, 3, 16, 16), not finite float",
    }
    cases[feature_file] = "takes 3-channel images, but the data has 1 channel(s)"
    for path, expected in cases.items():
        channels = 1 if path == feature_file else 3
        with pytest.raises((OSError, ValueError)) as error:
            feature_network(path, channels=channels, image_size=16)
        line = str(error.value)
        assert line.startswith(f"eval.fid_features={path} ") and expected in line, line
        assert "\n" not in line


def test_evaluate_with_a_feature_file(
    feature_file: Path,
    trained_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    def no_inception(*args, **kwargs):
        raise AssertionError("Inception was loaded")

    monkeypatch.setattr(cvae.fid, "inception", no_inception)
    checkpoint = f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}"
    cfg = compose_tool(
        "eval",
        tmp_path,
        checkpoint,
        "eval.fid=true",
        "eval.fid_samples=20",
        f"eval.fid_features={feature_file}",
        "eval.iw_samples=2",
        "eval.split=val",
        "eval.progress=false",
    )
    metrics = evaluate_checkpoint(cfg)
    assert metrics["fid"] > 0 and metrics["fid_samples"] == 20 and "kid" in metrics
    assert metrics["fid_features"] == str(feature_file)
    (saved,) = tmp_path.glob("*/metrics.json")
    assert json.loads(saved.read_text())["fid"] == metrics["fid"]

    def no_evaluation(*args, **kwargs):
        raise AssertionError("the evaluation started before the feature network was checked")

    monkeypatch.setattr(cvae.evaluation, "image_metrics", no_evaluation)
    missing = tmp_path / "nope.pt"
    for overrides, expected in (
        ([f"eval.fid_features={missing}"], f"error: eval.fid_features={missing} is not a file"),
        ([f"eval.fid_features={feature_file}", "eval.fid_weights=w.pth"], "name two feature"),
    ):
        cfg = compose_tool("eval", tmp_path / "bad", checkpoint, "eval.fid=true", *overrides)
        line = _one_line_error(capsys, lambda cfg=cfg: run_or_report(evaluate_checkpoint, cfg))
        assert expected in line


def test_images_without_classes_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    flat = tmp_path / "flat"
    write_mixed_images(flat, 4)
    cfg = compose_tool(
        "train_features", tmp_path / "out", "data=folder", f"data.root={flat}", *TINY_CLASSIFIER
    )
    line = _one_line_error(capsys, lambda: run_or_report(run, cfg))
    assert "trains a classifier on the data's classes" in line and str(flat) in line
    assert not (tmp_path / "out" / "features.pt").exists()


def test_the_door_answers_help_without_torch() -> None:
    code = (
        "import sys, cvae.train_features; "
        "print(sorted(m for m in ('lightning', 'torch') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
