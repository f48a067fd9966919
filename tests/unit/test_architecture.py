"""The shape of the code, checked: layers, no import cycles, a light gateway import.

The layers, lowest first (docs/architecture.md draws them): ``schemas``; ``tokenizers`` and ``streams.kafka``;
``streams.rules``; ``streams.service``; ``streams.gateway``; ``streams.enrich`` and ``streams.aggregate`` (side
by side, neither importing the other); ``streams.ops``; ``streams.dev``; ``streams.cli``. A module imports only
from its own package and from lower layers. Every import counts, also one inside a function or under
``TYPE_CHECKING``: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {
    "schemas": "budgetflow.schemas",
    "tokenizers": "budgetflow.tokenizers",
    "streams": "budgetflow.streams",
    "integrations": "budgetflow.integrations",
}
LAYERS = {
    "budgetflow.schemas": 0,
    "budgetflow.tokenizers": 1,
    "budgetflow.streams.kafka": 1,
    "budgetflow.streams.rules": 2,
    "budgetflow.streams.service": 3,
    "budgetflow.streams.gateway": 4,
    "budgetflow.streams.enrich": 5,
    "budgetflow.streams.aggregate": 5,
    "budgetflow.integrations": 5,  # gateways people run (LiteLLM): built on the gateway layer only
    "budgetflow.streams.ops": 6,
    "budgetflow.streams.dev": 7,
    "budgetflow.streams.cli": 8,
    "budgetflow.streams": 9,  # the top level: the gateway's public names and `python -m`
}


def modules() -> dict[str, Path]:
    """Every module of the package, by its import name."""
    found: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, wherever in the file the import stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for written in targets:
            target = written
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def layer_of(module: str) -> tuple[str, int]:
    package = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return package, LAYERS[package]


def test_streams_top_level_holds_only_sub_packages() -> None:
    loose = sorted(
        p.name
        for p in (ROOT / "streams").iterdir()
        if p.suffix == ".py" and p.name not in {"__init__.py", "__main__.py"}
    )
    assert loose == [], f"modules at the top of streams/ (put them in a sub-package): {loose}"
    packages = sorted(p.name for p in (ROOT / "streams").iterdir() if (p / "__init__.py").exists())
    assert {f"budgetflow.streams.{p}" for p in packages} <= set(LAYERS), f"a sub-package without a layer: {packages}"


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for module, targets in graph().items():
        package, level = layer_of(module)
        for target in targets:
            other, other_level = layer_of(target)
            if other == package or other_level < level:
                continue
            if package == "budgetflow.streams" and other in {"budgetflow.streams.gateway", "budgetflow.streams.cli"}:
                continue  # the top level re-exports the gateway's names; `python -m` runs the CLI
            wrong.append(f"{module} -> {target}")
    assert wrong == [], "imports that point up or sideways:\n" + "\n".join(sorted(wrong))


@pytest.mark.parametrize(
    ("package", "allowed"),
    [
        ("budgetflow.streams.kafka", {"budgetflow.schemas"}),
        ("budgetflow.schemas", set()),
        ("budgetflow.tokenizers", {"budgetflow.schemas"}),
        (
            "budgetflow.streams.gateway",
            {
                "budgetflow.schemas",
                "budgetflow.tokenizers",
                "budgetflow.streams.kafka",
                "budgetflow.streams.rules",
                "budgetflow.streams.service",
            },
        ),
    ],
)
def test_what_a_package_may_reach(package: str, allowed: set[str]) -> None:
    reached = set()
    for module, targets in graph().items():
        if layer_of(module)[0] == package:
            reached |= {layer_of(t)[0] for t in targets} - {package}
    assert reached <= allowed, f"{package} reaches {sorted(reached - allowed)}"


def test_no_import_cycle() -> None:
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    assert cycles == [], f"import cycles: {cycles}"


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """The graph is computed from the source, so a planted upward import shows up in it."""
    planted = ROOT / "streams" / "kafka" / "_planted_probe.py"
    planted.write_text("def f() -> None:\n    from budgetflow.streams.aggregate import ledger  # noqa: F401\n")
    try:
        edges = graph()
        assert "budgetflow.streams.aggregate.ledger" in edges["budgetflow.streams.kafka._planted_probe"]
        with pytest.raises(AssertionError, match="_planted_probe"):
            test_imports_point_down_the_layers()
    finally:
        planted.unlink()


HEAVY = (
    "budgetflow.streams.aggregate",
    "budgetflow.streams.ops",
    "budgetflow.streams.dev",
    "budgetflow.streams.cli",
    "budgetflow.streams.enrich",
    "rocksdict",
    "yaml",
    "click",
    "rich",
    "aiohttp.web",
)


def test_the_gateway_import_is_light() -> None:
    """What a gateway loads: the publisher, the view and the routing types, and no worker or tool code."""
    probe = (
        "import sys, budgetflow.streams\n"
        "from budgetflow.streams import BudgetPublisher, BudgetView, SyncBudgetPublisher, Decision, Usage\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert heavy == [], f"a gateway import loads worker or tool code: {heavy}"
    assert "budgetflow.streams.gateway.view" in loaded  # the probe imported what it names


MAX_MODULE_LINES = 450  # "about 400": a module past this is split by concern
MAX_FUNCTION_LINES = 50


def test_modules_and_functions_are_of_a_size_to_read() -> None:
    """No module past ~400 lines; a function past 50 lines says why in a comment right above it."""
    too_long = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            said = first >= 2 and lines[first - 2].strip().startswith("#")
            if length > MAX_FUNCTION_LINES and not said:
                too_long.append(f"{name}.{node.name}: {length} lines, no comment above saying why")
    assert too_long == [], "\n".join(too_long)
