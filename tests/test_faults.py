"""Faults in what a command is given that would otherwise pass without a word: each is one
line naming the file and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cvae.errors import run_or_report
from cvae.evaluation import evaluate_checkpoint
from cvae.training import train
from tests.helpers import compose_tool, compose_train, load_checkpoint


def _nan_checkpoint(good: Path, path: Path) -> tuple[Path, list[str], int]:
    """A copy of `good` with NaN in two of its weight tensors: the file, their names and
    how many tensors its state_dict holds."""
    checkpoint = load_checkpoint(good)
    weights = checkpoint["state_dict"]
    names = [name for name, tensor in weights.items() if tensor.is_floating_point()][:2]
    for name in names:
        weights[name] = torch.full_like(weights[name], float("nan"))
    torch.save(checkpoint, path)
    return path, names, len(weights)


@pytest.mark.parametrize("command", ["train", "eval", "generate", "fit", "export"])
def test_a_checkpoint_with_nan_weights_is_refused_in_one_line_by_every_command(
    command: str, trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from cvae.exporting import run as export
    from cvae.generation import generate

    path, names, count = _nan_checkpoint(
        trained_run / "checkpoints" / "last.ckpt", tmp_path / "nan.ckpt"
    )
    if command == "train":  # resumed for one more epoch
        cfg = compose_train(tmp_path / "out", f"ckpt_path={path}", "trainer.max_epochs=3")
    else:
        tool = {"fit": "generate"}.get(command, command)
        mode = {"fit": ["mode=fit"], "generate": ["sampler=prior"]}.get(command, [])
        cfg = compose_tool(tool, tmp_path / "out", f"ckpt_path={path}", "device=cpu", *mode)
    runs = {"train": train, "eval": evaluate_checkpoint, "generate": generate, "export": export}
    with pytest.raises(SystemExit) as stopped:
        run_or_report(runs.get(command, generate), cfg)
    assert stopped.value.code == 1
    use = "resume from" if command == "train" else "use"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: ckpt_path={path} holds weights that are not finite (NaN or infinite values "
        f"in 2 of its {count} tensors: {', '.join(names)}): {use} an earlier checkpoint of "
        "that run"
    ]
    assert not (tmp_path / "out").exists()  # refused before anything was written
