"""The house's layer rule, checked on the code: a module imports only modules of its own
layer or lower (lazy and type-only imports included), no import cycles, the model and data
wings never import each other, and no private name is used across modules. The layers are
written once, in docs/ARCHITECTURE.md ("Layers"), which this test reads."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cvae"
WINGS = ("data", "models")


def layers() -> dict[str, int]:
    """Each unit's layer (0: lowest), from the numbered list under "## Layers"."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    found = {}
    for number, names in re.findall(r"^(\d+)\. \*\*\w[\w ]*\*\*: ([\w, ]+)$", section, re.M):
        for name in names.split(", "):
            found[name.strip()] = int(number)
    return found


def unit(module: str) -> str:
    """`cvae.models.priors` -> `models` (a wing is one unit); `cvae.fid` -> `fid`."""
    return module.split(".")[1] if module.count(".") else "__init__"


def source_modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts)] = path
    return modules


def imports(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """`(imported cvae module, names taken from it, line)` of every import in the file,
    top-level, lazy (inside functions) and type-only alike."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("cvae")]
        elif isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level:  # relative: from . import x
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{name}" if name else base
            if name.startswith("cvae"):
                found.append((name, [a.name for a in node.names], node.lineno))
    return found


MODULES = source_modules()
EDGES = [
    (importer, imported, names, line)
    for importer, path in MODULES.items()
    for imported, names, line in imports(path, importer)
]


def test_every_module_has_a_layer() -> None:
    order = layers()
    missing = sorted({unit(m) for m in MODULES} - set(order))
    assert not missing, f"units without a layer in docs/ARCHITECTURE.md: {missing}"
    stale = sorted(set(order) - {unit(m) for m in MODULES})
    assert not stale, f"layers name units that do not exist: {stale}"


def test_no_module_imports_a_higher_layer() -> None:
    order = layers()
    upward = [
        f"{importer}:{line} imports {imported} (layer {order[unit(imported)]} > "
        f"{order[unit(importer)]})"
        for importer, imported, _, line in EDGES
        if order[unit(imported)] > order[unit(importer)]
    ]
    assert not upward, "\n".join(upward)


def test_the_wings_never_import_each_other() -> None:
    crossing = [
        f"{importer}:{line} imports {imported}"
        for importer, imported, _, line in EDGES
        if unit(importer) in WINGS and unit(imported) in WINGS and unit(importer) != unit(imported)
    ]
    assert not crossing, "\n".join(crossing)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph`, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for after in sorted(graph.get(node, ())):
            if state.get(after) == 1:
                return path[path.index(after) :] + [after]
            if after not in state and (found := visit(after)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize("level", ["units", "modules"])
def test_no_import_cycle(level: str) -> None:
    """Between units (a wing counts as one), and between modules inside the wings (their
    package `__init__` aside: it only re-exports)."""
    graph: dict[str, set[str]] = {}
    for importer, imported, _, _ in EDGES:
        if level == "units" and unit(importer) != unit(imported):
            graph.setdefault(unit(importer), set()).add(unit(imported))
        inside = level == "modules" and unit(importer) == unit(imported) != importer
        if inside and not imported.endswith(tuple(WINGS)) and importer != imported:
            graph.setdefault(importer, set()).add(imported)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_private_name_is_used_across_modules() -> None:
    private = [
        f"{importer}:{line} takes {name} from {imported}"
        for importer, imported, names, line in EDGES
        for name in names
        if name.startswith("_") and imported != importer
    ]
    for importer, path in MODULES.items():
        aliases = {
            a.asname or a.name
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Import)
            for a in node.names
            if a.name.startswith("cvae")
        }
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
            ):
                private.append(f"{importer}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not private, "\n".join(private)


def test_the_layer_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checks above are not vacuous: a model importing the sampler module is found."""
    fake = tmp_path / "cvae" / "models" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from cvae.samplers import LatentSampler\nfrom cvae.loading import _x\n")
    found = imports(fake, "cvae.models.bad")
    order = layers()
    assert [order[unit(m)] > order["models"] for m, _, _ in found] == [True, True]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
