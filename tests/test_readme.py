"""The README's commands, as written: every `.venv/bin/python -m cvae.<tool> ...` line of its
code blocks composes (each key, group and option exists), and the checkpoint tools run on a
tiny trained checkpoint with the line's own overrides."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import CONF_DIR

README = Path(__file__).resolve().parents[1] / "README.md"
CONFIGS = {"train": "train", "evaluate": "eval", "generate": "generate", "export": "export"}
# Lines that need what a CPU test cannot have: a named dataset's files, a placeholder path, a
# cluster, hours of training. They are still composed, only not run.
NOT_RUN = ("data=celeba", "/path/to/", "/other/images", "hydra/launcher=slurm", "a.png")


def readme_commands() -> list[list[str]]:
    """The words of every cvae command line in the README's bash blocks (continuations
    joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == [".venv/bin/python", "-m"] and words[2].startswith("cvae."):
                commands.append(words[2:])
    return commands


def _overrides(words: list[str]) -> list[str]:
    """Hydra overrides of a command line: flags dropped, a sweep's first value taken."""
    overrides = []
    for word in words:
        if word.startswith("-"):
            continue
        key, _, value = word.partition("=")
        if "," in value and not value.startswith("["):
            value = value.split(",")[0]
        overrides.append(f"{key}={value}" if _ else word)
    return overrides


COMMANDS = readme_commands()


def test_the_readme_has_commands_for_every_tool() -> None:
    tools = {words[0] for words in COMMANDS}
    assert tools >= {"cvae.train", "cvae.evaluate", "cvae.generate", "cvae.export"}


@pytest.mark.parametrize("words", COMMANDS, ids=" ".join)
def test_readme_command_composes(words: list[str]) -> None:
    tool = words[0].removeprefix("cvae.")
    if tool not in CONFIGS:
        return  # summarize takes a folder, not overrides
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(CONFIGS[tool], overrides=_overrides(words[1:]))
    assert cfg.task_name


@pytest.fixture(scope="module")
def log_dir(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log folder whose newest training run is the tiny trained checkpoint (ckpt_path=last)."""
    logs = tmp_path_factory.mktemp("logs")
    target = logs / "train" / "runs" / "2026-01-01_00-00-00" / "checkpoints"
    target.mkdir(parents=True)
    shutil.copy(trained_run / "checkpoints" / "last.ckpt", target)
    return logs


TOOL_LINES = [w for w in COMMANDS if w[0] in ("cvae.evaluate", "cvae.generate", "cvae.export")
              and not any(marker in " ".join(w) for marker in NOT_RUN)]  # fmt: skip


@pytest.mark.parametrize("words", TOOL_LINES, ids=" ".join)
def test_readme_tool_command_runs(words: list[str], log_dir: Path, tmp_path: Path) -> None:
    from cvae.errors import run_or_report

    tool = words[0].removeprefix("cvae.")
    run = {"evaluate": "cvae.runtime:evaluate", "generate": "cvae.generation:generate",
           "export": "cvae.exporting:run"}[tool]  # fmt: skip
    module, _, name = run.partition(":")
    function = getattr(__import__(module, fromlist=[name]), name)
    # The line's own overrides, plus where to find `last` and a small budget for the test.
    overrides = [*_overrides(words[1:]), f"paths.log_dir={log_dir}", f"paths.output_dir={tmp_path}",
                 "device=cpu"]  # fmt: skip
    if tool == "evaluate":
        overrides += ["eval.max_images=8", "eval.iw_samples=4"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(CONFIGS[tool], overrides=overrides)
    run_or_report(function, cfg)
    assert any(tmp_path.iterdir()), "the command wrote nothing"
