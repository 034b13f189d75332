"""The commands of the README and of every page under docs/, as written: every
`.venv/bin/python -m cvae.<tool> ...` line of their bash blocks composes (each key, group and
option exists), and the checkpoint tools run on a tiny trained checkpoint with the line's own
overrides, page by page. (Links, headings and snippets: tests/test_docs.py.)"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.helpers import CONF_DIR, PAGES, page_name

CONFIGS = {
    "train": "train",
    "evaluate": "eval",
    "generate": "generate",
    "export": "export",
    "train_features": "train_features",
}
# Lines that need what this test's tiny unconditional checkpoint cannot give: a placeholder
# path (your own images, the Inception weights), a conditional Fashion-MNIST model
# (`label=`; tests/test_conditional.py runs those paths on synthetic shapes), or a
# hierarchy's temperature list or lower level (tests/test_hvae.py runs the commands on a
# hierarchy). They are still composed, only not run.
NOT_RUN = ("/path/to/", "label=", "temperature=[", "level=1")


def page_commands(page: Path) -> list[list[str]]:
    """The words of every cvae command line in a page's bash blocks (continuations joined,
    comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
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


COMMANDS = {page_name(page): page_commands(page) for page in PAGES}
EVERY_COMMAND = [(name, words) for name, words_list in COMMANDS.items() for words in words_list]


def test_the_pages_have_commands_for_every_tool() -> None:
    tools = {words[0] for _, words in EVERY_COMMAND}
    assert tools >= {"cvae.train", "cvae.evaluate", "cvae.generate", "cvae.export"}
    readme_tools = {words[0] for words in COMMANDS["README.md"]}
    assert readme_tools >= {"cvae.train", "cvae.evaluate", "cvae.generate"}


@pytest.mark.parametrize(
    ("page", "words"), EVERY_COMMAND, ids=[f"{page}: {' '.join(w)}" for page, w in EVERY_COMMAND]
)
def test_command_composes(page: str, words: list[str]) -> None:
    tool = words[0].removeprefix("cvae.")
    if tool not in CONFIGS:
        return  # summarize takes a folder, not overrides
    overrides = _overrides(words[1:])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(CONFIGS[tool], overrides=overrides)
    for override in overrides:  # each plain `key=value` is the value the config then holds
        key, _, value = override.partition("=")
        if (
            "." not in key
            or key[0] in "+~"
            or key.startswith("hydra.")
            or any(c in value for c in "$[{,*")
        ):
            continue
        held = OmegaConf.select(cfg, key)
        assert str(held) == str(yaml.safe_load(value)) or str(held) == value, override


@pytest.fixture(scope="module")
def log_dir(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log folder whose newest training run is the tiny trained checkpoint (ckpt_path=last),
    with the sampler training fitted beside it (last.gmm.pt)."""
    logs = tmp_path_factory.mktemp("logs")
    target = logs / "train" / "runs" / "2026-01-01_00-00-00" / "checkpoints"
    target.mkdir(parents=True)
    for path in (trained_run / "checkpoints").glob("last.*"):
        shutil.copy(path, target)
    return logs


def tool_lines(commands: list[list[str]]) -> list[list[str]]:
    """The evaluate, generate and export lines that can run on the tiny checkpoint."""
    return [
        w
        for w in commands
        if w[0] in ("cvae.evaluate", "cvae.generate", "cvae.export")
        and not any(marker in " ".join(w) for marker in NOT_RUN)
    ]


TOOL_LINES = {name: tool_lines(commands) for name, commands in COMMANDS.items()}
TOOLS = {
    "evaluate": "cvae.evaluation:evaluate_checkpoint",
    "generate": "cvae.generation:generate",
    "export": "cvae.exporting:run",
}


def test_enough_tool_lines_run() -> None:
    """The README and the evaluation guide keep the lines a reader runs first."""
    assert sum(map(len, TOOL_LINES.values())) >= 8
    assert TOOL_LINES["README.md"] and len(TOOL_LINES["docs/evaluation.md"]) >= 8


@pytest.mark.slow
@pytest.mark.parametrize("page", [name for name, lines in TOOL_LINES.items() if lines])
def test_tool_commands_run_in_order(
    page: str, log_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each evaluate, generate and export line of a page, in the page's order, from a working
    folder of its own (a line may use what an earlier one wrote, as a reader would), with the
    line's own overrides plus where to find `last` and a small evaluation budget."""
    from cvae.errors import run_or_report

    monkeypatch.chdir(tmp_path)
    for number, words in enumerate(TOOL_LINES[page]):
        tool = words[0].removeprefix("cvae.")
        module, _, name = TOOLS[tool].partition(":")
        function = getattr(__import__(module, fromlist=[name]), name)
        overrides = _overrides(words[1:])
        run_dir = next(
            (o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")),
            f"outputs/{tool}/{number}",
        )
        overrides = [o for o in overrides if not o.startswith("hydra.")]
        overrides += [f"paths.log_dir={log_dir}", f"paths.output_dir={run_dir}", "device=cpu"]
        if tool == "evaluate":
            overrides += ["eval.max_images=8", "eval.iw_samples=4", "eval.progress=false"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(CONFIGS[tool], overrides=overrides)
        run_or_report(function, cfg)
        assert Path(run_dir).is_dir(), f"{page}: {' '.join(words)}"
