"""The top-level packages depend one way: rewards <- rollout <- quant, rl <- actors <- solray (README, Layout).

Every import counts, at module level or inside a function: an import hidden in a function is still a
dependency, only a later one.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each package and the packages it may import (directly or not).
LAYERS = {
    "rewards": set(),
    "rollout": {"rewards"},
    "quant": {"rewards", "rollout"},
    "rl": {"rewards", "rollout"},
    "actors": {"rewards", "rollout", "quant", "rl"},
    "solray": {"rewards", "rollout", "quant", "rl", "actors"},
}
TESTBED = "rollout.tiny"


def imports(path: Path) -> set[str]:
    """Absolute module names `path` imports anywhere in its body."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def package_imports() -> dict[str, dict[str, set[Path]]]:
    """package -> imported top-level package -> the files importing it."""
    found: dict[str, dict[str, set[Path]]] = {package: {} for package in LAYERS}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            for name in imports(path):
                top = name.split(".")[0]
                if top in LAYERS and top != package:
                    found[package].setdefault(top, set()).add(path.relative_to(ROOT))
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle of a directed graph, each once, as the list of its nodes from its smallest."""
    found = set()

    def walk(path: list[str]) -> None:
        for nxt in graph.get(path[-1], ()):
            if nxt == path[0]:
                found.add(tuple(path))
            elif nxt not in path and nxt > path[0]:
                walk([*path, nxt])

    for start in graph:
        walk([start])
    return sorted(list(cycle) for cycle in found)


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_top_level_packages():
    graph = {package: set(targets) for package, targets in package_imports().items()}
    assert cycles(graph) == []


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_each_package_imports_only_the_layers_below_it(package):
    upward = {target: sorted(map(str, files)) for target, files in package_imports()[package].items() if target not in LAYERS[package]}
    assert upward == {}, f"{package} imports packages above it: {upward}"


def test_only_the_testbed_imports_the_testbed():
    """The tiny testbed is a plug-in (entry points in pyproject.toml): general code reaches it only through the registries."""
    offenders = sorted(
        str(path.relative_to(ROOT))
        for package in LAYERS
        for path in (ROOT / package).rglob("*.py")
        if not path.is_relative_to(ROOT / "rollout" / "tiny") and any(name.startswith(TESTBED) for name in imports(path))
    )
    assert offenders == []
