"""The package layout keeps the pipeline: each subpackage imports only from the ones below it.

Every module's imports are read with ``ast`` (function-level imports included) and each import of
another cascade_bench package is checked against ``ALLOWED``, a table that itself only points down
the pipeline order ``LAYERS``.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

import cascade_bench

PACKAGE_ROOT = Path(cascade_bench.__file__).resolve().parent

#: Bottom to top. ``__init__`` is the package root: the public API re-exported from below.
LAYERS = (
    "data",
    "models",
    "stages",
    "measure",
    "routing",
    "training",
    "cost",
    "experiment",
    "bench",
    "harness",
    "commands",
    "cli",
    "__main__",
)

#: What each package may import (besides itself).
ALLOWED: dict[str, frozenset[str]] = {
    "data": frozenset(),
    "models": frozenset(),
    "stages": frozenset({"models"}),
    "measure": frozenset({"models", "stages"}),
    "routing": frozenset({"data", "models", "stages", "measure"}),
    "training": frozenset({"data", "models", "stages", "measure", "routing"}),
    "cost": frozenset({"data", "models", "stages", "measure", "routing"}),
    "experiment": frozenset({"data", "models", "stages", "measure", "routing", "training", "cost"}),
    "bench": frozenset({"data", "models", "stages", "measure", "routing", "training", "cost", "experiment"}),
    "harness": frozenset({"data", "models", "stages", "measure", "routing", "training", "cost", "experiment"}),
    "commands": frozenset(
        {"data", "models", "stages", "measure", "routing", "training", "cost", "experiment", "bench", "harness"}
    ),
    "cli": frozenset({"measure", "commands", "experiment"}),
    "__init__": frozenset({"data", "models", "stages", "measure", "routing", "training", "cost"}),
    "__main__": frozenset({"cli"}),  # ``python -m cascade_bench`` (and torchrun -m): the CLI only
}


def module_name(path: Path) -> str:
    """'cascade_bench.routing.passes' for .../cascade_bench/routing/passes.py (packages end in __init__)."""
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts)


def imported_modules(source: str, module: str) -> set[str]:
    """Absolute names of every module ``source`` imports, at any depth (lazy imports included)."""
    is_package = module.endswith(".__init__")
    package = module.rsplit(".", 1)[0] if not is_package else module[: -len(".__init__")]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                anchor = package.split(".")
                if node.level > 1:
                    anchor = anchor[: -(node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if node.module is None:  # from . import x: x is a module
                found.update(f"{base}.{alias.name}" for alias in node.names)
            else:
                found.add(base)
    return found


def layer_of(module: str) -> str:
    """The package a cascade_bench module belongs to: 'routing' for cascade_bench.routing.passes."""
    parts = module.split(".")
    if parts[0] != "cascade_bench":
        raise ValueError(f"{module!r} is not a cascade_bench module")
    return parts[1] if len(parts) > 1 else "__init__"


def violations(source: str, module: str) -> list[str]:
    """'a -> b' for every import of ``module`` that goes up or sideways against ``ALLOWED``."""
    here = layer_of(module)
    bad = []
    for target in sorted(imported_modules(source, module)):
        if target.split(".")[0] != "cascade_bench" or target == "cascade_bench":
            continue
        there = layer_of(target)
        if there != here and there not in ALLOWED[here]:
            bad.append(f"{module} -> {target}")
    return bad


def package_modules() -> list[Path]:
    return sorted(path for path in PACKAGE_ROOT.rglob("*.py") if "__pycache__" not in path.parts)


def test_allowed_table_only_points_down():
    order = {name: rank for rank, name in enumerate(LAYERS)}
    for package, allowed in ALLOWED.items():
        if package == "__init__":
            continue
        assert all(order[dep] < order[package] for dep in allowed), (package, allowed)


def test_every_module_sits_in_a_known_layer():
    for path in package_modules():
        layer = layer_of(module_name(path))
        assert layer in ALLOWED, f"{path} is in no layer of LAYERS; put it in a subpackage"


def test_no_module_imports_up_the_pipeline():
    bad = [line for path in package_modules() for line in violations(path.read_text(), module_name(path))]
    assert bad == []


def test_every_imported_module_exists():
    """Lazy imports inside functions run only when called: a stale path after a move shows here."""
    missing = sorted(
        {
            f"{module_name(path)} -> {target}"
            for path in package_modules()
            for target in imported_modules(path.read_text(), module_name(path))
            if target.startswith("cascade_bench") and importlib.util.find_spec(target) is None
        }
    )
    assert missing == []


def test_the_checker_sees_upward_and_lazy_imports():
    source = (
        "from .exits import ExitRule\n"
        "def f():\n"
        "    from ..routing.passes import forward_cascade\n"
        "    import cascade_bench.experiment.config\n"
        "from .. import cost\n"
    )
    assert imported_modules(source, "cascade_bench.stages.llm") == {
        "cascade_bench.stages.exits",
        "cascade_bench.routing.passes",
        "cascade_bench.experiment.config",
        "cascade_bench.cost",
    }
    assert violations(source, "cascade_bench.stages.llm") == [
        "cascade_bench.stages.llm -> cascade_bench.cost",
        "cascade_bench.stages.llm -> cascade_bench.experiment.config",
        "cascade_bench.stages.llm -> cascade_bench.routing.passes",
    ]
    # Relative imports in a package's __init__ resolve against the package itself.
    assert imported_modules("from .passes import x\n", "cascade_bench.routing.__init__") == {
        "cascade_bench.routing.passes"
    }
    assert violations("from ..bench.routing import x\n", "cascade_bench.experiment.reports") == [
        "cascade_bench.experiment.reports -> cascade_bench.bench.routing"
    ]


def test_sideways_between_training_and_cost_is_refused():
    assert violations("from ..training.loops import fit\n", "cascade_bench.cost.measurement") == [
        "cascade_bench.cost.measurement -> cascade_bench.training.loops"
    ]


@pytest.mark.parametrize("name", cascade_bench.__all__)
def test_public_api_is_importable_from_the_top(name):
    assert getattr(cascade_bench, name) is not None


def _runtime_source(source: str) -> str:
    """``source`` without its ``if TYPE_CHECKING:`` blocks (imports for annotations only never run)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            node.body = [ast.Pass()]
    return ast.unparse(tree)


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the cascade_bench modules it imports when run (function-level imports included, a
    package named as itself: ``cascade_bench.routing`` is its ``__init__``)."""

    def known(target: str) -> "str | None":
        for name in (target, f"{target}.__init__", target.rsplit(".", 1)[0]):
            if name in sources:
                return name
        return None

    return {
        module: {known(t) for t in imported_modules(_runtime_source(source), module) if t.startswith("cascade_bench")}
        - {None, module}
        for module, source in sources.items()
    }


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import each other, directly or through others (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                top = stack.pop()
                group.append(top)
                if top == module:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_cycle_hides_behind_a_function_level_import():
    """A module pair that import each other works only while one import waits inside a function: the
    layering test cannot see such a cycle within one package, so it is refused here."""
    sources = {module_name(path): path.read_text() for path in package_modules()}
    assert import_cycles(import_graph(sources)) == []


def test_the_cycle_finder_sees_a_cycle_through_a_lazy_import_and_not_through_type_checking():
    sources = {
        "cascade_bench.experiment.reports": "from .plots import draw\n",
        "cascade_bench.experiment.plots": "def draw():\n    from .reports import table\n",
        "cascade_bench.experiment.sweep": "from .points import Point\n",
        "cascade_bench.experiment.points": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sweep import Sweep\n"
        ),
    }
    assert import_cycles(import_graph(sources)) == [
        ["cascade_bench.experiment.plots", "cascade_bench.experiment.reports"]
    ]


def test_no_two_modules_share_a_name():
    """A module's name says what it holds: no two modules of the package share a file name (a reader
    meeting ``memory.py`` should not have to ask which one)."""
    names: dict[str, list[str]] = {}
    for path in PACKAGE_ROOT.rglob("*.py"):
        if path.name not in ("__init__.py", "__main__.py"):
            names.setdefault(path.name, []).append(str(path.relative_to(PACKAGE_ROOT)))
    assert {name: paths for name, paths in names.items() if len(paths) > 1} == {}
