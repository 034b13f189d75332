"""`make tensorboard`: one run or sweep (the newest by default), failed runs left out, the
address of the loss curves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from cvae.dashboard import main, serve
from tests.helpers import run_cli


def _run(folder: Path, age: int, status: str = "completed", overrides: tuple = ()) -> Path:
    """A run folder with an event file written `age` seconds after the epoch's start."""
    events = folder / "tensorboard" / "events.out.tfevents.1.host"
    events.parent.mkdir(parents=True)
    events.write_bytes(b"")
    os.utime(events, (1_000_000 + age, 1_000_000 + age))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    if status == "completed":
        (folder / "result.json").write_text("{}")
    elif status == "failed":
        (folder / "failure.json").write_text(json.dumps({"error": "ValueError: no"}))
    return folder


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    """An older single run, a sweep with a failed job, and the newest run, which failed."""
    root = tmp_path / "outputs"
    _run(root / "train" / "runs" / "old", 1)
    sweep = root / "train" / "multiruns" / "sweep"
    for job, status in enumerate(("completed", "failed", "running")):
        _run(sweep / str(job), 10 + job, status, (f"model.beta={job}", "model.latent_dim=[8,16]"))
    _run(root / "train" / "runs" / "broken", 50, "failed")
    return root


def test_the_newest_run_or_sweep_without_its_failed_runs(outputs: Path) -> None:
    sweep = outputs / "train" / "multiruns" / "sweep"
    folder, shown, left_out = serve(outputs)
    assert folder == sweep  # the newest run failed: passed over
    assert shown == [sweep / "0", sweep / "2"] and left_out == [sweep / "1"]
    old = outputs / "train" / "runs" / "old"
    assert serve(old) == (old, [old], [])  # a run asked for by name


def test_the_address_opens_on_the_loss_curves(outputs: Path, capsys: pytest.CaptureFixture) -> None:
    main([str(outputs), "--port", "6007", "--dry-run"])
    said = capsys.readouterr().out.splitlines()
    sweep = outputs / "train" / "multiruns" / "sweep"
    assert said[0] == f"TensorBoard on {sweep} (2 runs; failed, left out: 1); the loss curves at:"
    assert said[1] == "http://localhost:6007/#scalars&tagFilter=loss"
    spec = said[2].split("--logdir_spec ", 1)[1].split(" --port ")[0]
    names = [entry.rsplit(":", 1)[0] for entry in spec.split(",")]
    assert names == [
        "0 model.beta=0 model.latent_dim=[8;16]",  # no comma: it would split the spec
        "2 model.beta=2 model.latent_dim=[8;16]",
    ]


@pytest.mark.slow
def test_a_run_that_failed_after_training_started_is_recorded_as_failed(tmp_path: Path) -> None:
    run = tmp_path / "outputs" / "train" / "runs" / "failed"
    fail = ["+callbacks.fail._target_=tests.killers.FailAt", "+callbacks.fail.step=2"]
    result = run_cli(*fail, f"hydra.run.dir={run}", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: failed on purpose at step 2"
    record = json.loads((run / "failure.json").read_text())
    assert record == {"error": "ValueError: failed on purpose at step 2"}
    with pytest.raises(SystemExit, match="no run with TensorBoard event files under"):
        main([str(tmp_path / "outputs"), "--dry-run"])
