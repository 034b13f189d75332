"""The README and the pages under docs/ stay true to the repository: every relative link and
image resolves to a file (a `#section` to a heading of that page), every page is one click
from the README, each guide opens with its commands, every `cvae...` name they cite exists,
and the README's and the Python page's snippets run on a tiny checkpoint. (Their command
lines: tests/test_readme.py.)"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

from tests.helpers import CONF_DIR, PAGES, README, REPO, page_name

DOCS = REPO / "docs"
# Pages that are maps, not guides: they need not open with commands.
NOT_GUIDES = {"docs/ARCHITECTURE.md"}
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code: where links are links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text()))


def slugs(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces
    to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    anchors = set()
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", text, flags=re.M):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_every_relative_link_and_image_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_relative_to(REPO) or not file.exists():
            broken.append(f"{target} (no file {file})")
        elif anchor and file.suffix == ".md" and anchor not in slugs(file):
            broken.append(f"{target} (no heading #{anchor} in {page_name(file)})")
    assert not broken, f"{page_name(page)}: " + "; ".join(broken)


def test_every_page_is_linked_from_the_readme() -> None:
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    pages = sorted(DOCS.rglob("*.md"))
    assert pages, "no pages under docs/"
    missing = [page_name(page) for page in pages if page.resolve() not in linked]
    assert not missing, f"not linked from README.md: {', '.join(missing)}"


def test_the_readme_stays_a_front_door() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert "make test" in text  # CI and the hooks look for it


GUIDES = [p for p in PAGES if p != README and page_name(p) not in NOT_GUIDES]


@pytest.mark.parametrize("page", GUIDES, ids=page_name)
def test_each_guide_opens_with_its_commands(page: Path) -> None:
    """The first code block is a bash block, before the first section."""
    text = page.read_text()
    first_block = re.search(r"^```(\w*)", text, flags=re.M)
    first_section = re.search(r"^## ", text, flags=re.M)
    assert first_block and first_block.group(1) == "bash", page_name(page)
    assert first_section is None or first_block.start() < first_section.start(), page_name(page)


# --- names: every `cvae...` (or `module.name`, `Class.attribute`) the pages cite exists -------
def _modules() -> dict[str, object]:
    import cvae

    found = {"cvae": cvae}
    for info in pkgutil.walk_packages(cvae.__path__, "cvae."):
        found[info.name] = importlib.import_module(info.name)
    return found


# Short module names that are also entry points or parameter names (`train.log`,
# `conditioning.plane.weight`), like those that are also config keys (`data.root`,
# `objective.metric`): only checked with their `cvae.` prefix.
AMBIGUOUS = {
    "models",
    "train",
    "evaluate",
    "generate",
    "export",
    "summarize",
    "cvae",
    "conditioning",
}
FILES = re.compile(
    r"\.(py|ya?ml|json|npy|ckpt|pt|onnx|md|csv|png|gif|log|lock|partial|txt"
    r"|ipynb|gz)$"
)
NAME = re.compile(r"([A-Za-z_]\w*(?:\.\w+)+)(?:\(.*\))?")


def _has(owner: object, name: str) -> bool:
    """An attribute of a module or class, or one its instances set (`self.name = ...`)."""
    if hasattr(owner, name):
        return True
    return inspect.isclass(owner) and f"self.{name} " in inspect.getsource(owner)


def cited_names(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    names = []
    for span in re.findall(r"`([^`\n]+)`", text):
        match = NAME.fullmatch(span.strip())
        if match and not FILES.search(match.group(1)):
            names.append(match.group(1))
    return names


@pytest.fixture(scope="module")
def configs() -> list:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        # the keys of the model families beside the default's (`model.levels`, ...)
        return [
            compose("train"),
            compose("train", overrides=["model=hvae"]),
            compose("eval", overrides=["ckpt_path=x"]),
        ]


@pytest.fixture(scope="module")
def namespace(configs: list) -> tuple[dict[str, object], dict[str, object], dict[str, object]]:
    """cvae's modules by full name, by short name (unambiguous ones), and its classes."""
    modules = _modules()
    keys = {key for cfg in configs for key in cfg}  # data, model, objective, ...
    short = {n.rsplit(".", 1)[-1]: m for n, m in modules.items()}
    short = {n: m for n, m in short.items() if n not in AMBIGUOUS | keys}
    classes = {
        name: obj
        for module in modules.values()
        for name, obj in vars(module).items()
        if inspect.isclass(obj) and obj.__module__.startswith("cvae")
    }
    return modules, short, classes


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_every_cited_name_exists(
    page: Path, namespace: tuple[dict[str, object], dict[str, object], dict[str, object]]
) -> None:
    modules, short, classes = namespace
    missing = []
    for name in cited_names(page):
        head, *rest = name.split(".")
        if head == "cvae":  # the longest module prefix, then attributes
            parts = name.split(".")
            cut = max(i for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules)
            owner, rest = modules[".".join(parts[:cut])], parts[cut:]
        elif head in short:
            owner = short[head]
        elif head in classes:
            owner = classes[head]
        else:
            continue  # a config key, a variable of a snippet, a file
        for attribute in rest:
            if not _has(owner, attribute):
                missing.append(name)
                break
            owner = getattr(owner, attribute, None)
    assert not missing, f"{page_name(page)} cites names the code does not have: {missing}"


# --- config: every `group.key` and `group=option` the pages cite exists ------------------------
GROUPS = ("data", "model", "trainer", "callbacks", "logger", "paths", "eval", "objective")
CITED_GROUPS = (*GROUPS, "experiment", "hparams_search")
OVERRIDE = re.compile(r"^\+?([a-z_]+(?:/[a-z_]+)?)(\.[\w.]+)?=(\S*)$")


def cited_config(page: Path) -> tuple[set[str], set[tuple[str, str]]]:
    """Dotted config keys (`model.beta`, `data.root=DIR`) and group options (`data=folder`,
    `+model/scheduler=cosine`) in a page's inline code."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    keys, options = set(), set()
    for span in re.findall(r"`([^`\n]+)`", text):
        for word in span.replace("'", " ").split():
            match = OVERRIDE.match(word) or re.fullmatch(r"([a-z_]+)(\.[\w.]+)()", word)
            if not match or match.group(1).split("/")[0] not in CITED_GROUPS:
                continue
            group, key, value = match.groups()
            if key:
                keys.add(group + key)
            elif re.fullmatch(r"\w+", value):
                options.add((group, value))
    return keys, options


def _config_has(configs: list, key: str) -> bool:
    from omegaconf import OmegaConf

    missing = object()
    return any(
        OmegaConf.select(
            cfg, key, default=missing, throw_on_missing=False, throw_on_resolution_failure=False
        )
        is not missing
        for cfg in configs
    )


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_every_config_key_and_option_exists(page: Path, configs: list) -> None:
    import lightning.pytorch as pl

    from cvae import CVAE

    keys, options = cited_config(page)
    # A dotted name may also be an attribute of what the group builds (`model.encode`,
    # `trainer.save_checkpoint`) or of the cvae module of that name (`callbacks.ImageLogger`,
    # `objective.check_objective`).
    builds = {"model": CVAE, "trainer": pl.Trainer}
    builds |= {
        n: importlib.import_module(f"cvae.{n}")
        for n in CITED_GROUPS
        if importlib.util.find_spec(f"cvae.{n}") is not None
    }
    missing = [
        key
        for key in sorted(keys)
        if not _config_has(configs, key)
        and not (key.count(".") == 1 and hasattr(builds.get(key.split(".")[0]), key.split(".")[1]))
    ]
    missing += [
        f"{group}={option}"
        for group, option in sorted(options)
        if not (CONF_DIR / group / f"{option}.yaml").is_file()
    ]
    assert not missing, f"{page_name(page)} cites config that does not exist: {missing}"


# --- snippets ----------------------------------------------------------------------------------
SHOWCASE = "outputs/train/runs/showcase/checkpoints/last.ckpt"


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def run_blocks(blocks: list[str], checkpoint: Path) -> dict:
    """Run snippets one after the other in one namespace, as a reader pastes them, with the
    tiny checkpoint where they name a run's and the real conf/ folder where they name one."""
    scope: dict = {}
    for block in blocks:
        code = block.replace(SHOWCASE, str(checkpoint)).replace("/abs/path/to/conf", str(CONF_DIR))
        exec(compile(code, "<snippet>", "exec"), scope)  # noqa: S102
    return scope


def test_the_readme_snippet_runs(trained_run: Path) -> None:
    blocks = python_blocks(README)
    assert len(blocks) == 1 and SHOWCASE in blocks[0]
    scope = run_blocks(blocks, trained_run / "checkpoints" / "last.ckpt")
    assert scope["samples"].shape[0] == 16 and scope["log_px"].shape == (16,)


def test_the_python_page_snippets_run(trained_run: Path) -> None:
    blocks = python_blocks(DOCS / "python-api.md")
    assert len(blocks) == 4 and SHOWCASE in blocks[0]
    scope = run_blocks(blocks, trained_run / "checkpoints" / "last.ckpt")
    assert scope["x_hat"].shape == scope["x"].shape
    assert scope["images"].shape == (16, *scope["x"].shape[1:])  # from the fitted mixture
    assert scope["log_px"].shape == (len(scope["x"]),)
    assert scope["cfg"].model.latent_dim == 32
