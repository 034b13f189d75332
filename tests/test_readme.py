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
# Lines that need what this test's tiny unconditional checkpoint cannot give: a placeholder
# path (your own images, the Inception weights), or a conditional Fashion-MNIST model
# (`label=`; tests/test_conditional.py runs those paths on synthetic shapes). They are still
# composed, only not run.
NOT_RUN = ("/path/to/", "label=")


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
    """Hydra overrides of a command line: flags (and `--cfg`'s argument) dropped, a sweep's
    first value taken."""
    overrides = []
    for previous, word in zip(["", *words], words, strict=False):
        if word.startswith("-") or previous == "--cfg":
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
TOOLS = {"evaluate": "cvae.runtime:evaluate_checkpoint", "generate": "cvae.generation:generate",
         "export": "cvae.exporting:run"}  # fmt: skip


def test_readme_tool_commands_run_in_order(
    log_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each evaluate, generate and export line, in the README's order, from a working folder
    of its own (a line may use what an earlier one wrote, as a reader would), with the line's
    own overrides plus where to find `last` and a small evaluation budget."""
    from cvae.errors import run_or_report

    assert len(TOOL_LINES) >= 8
    monkeypatch.chdir(tmp_path)
    for number, words in enumerate(TOOL_LINES):
        tool = words[0].removeprefix("cvae.")
        module, _, name = TOOLS[tool].partition(":")
        function = getattr(__import__(module, fromlist=[name]), name)
        overrides = _overrides(words[1:])
        run_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")),
                       f"outputs/{tool}/{number}")  # fmt: skip
        overrides = [o for o in overrides if not o.startswith("hydra.")]
        overrides += [f"paths.log_dir={log_dir}", f"paths.output_dir={run_dir}", "device=cpu"]
        if tool == "evaluate":
            overrides += ["eval.max_images=8", "eval.iw_samples=4", "eval.progress=false"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(CONFIGS[tool], overrides=overrides)
        run_or_report(function, cfg)
        assert Path(run_dir).is_dir(), " ".join(words)
