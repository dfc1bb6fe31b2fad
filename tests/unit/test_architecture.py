"""The package's shape, as issue 15 left it: no import cycle between modules (at import
time), the dead-letter tooling independent of the engine, and every module small enough
to read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "banyan_bus"
MAX_LINES = 480  # "~450": a module that grows past this wants a room of its own


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """banyan_bus modules imported at module level (not under ``if TYPE_CHECKING``)."""
    out: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("banyan_bus")
        ):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("banyan_bus")}
    return out


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {name: _imports(path, modules) & set(modules) for name, path in modules.items()}
    graph["banyan_bus"] = set()  # the package's __init__ re-exports; nothing imports it back
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, [*stack, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_dlq_tooling_does_not_import_the_engine() -> None:
    modules = _modules()
    for name in ("banyan_bus.dlq", "banyan_bus.dlq_record", "banyan_bus.deadletter"):
        assert "banyan_bus.consume" not in _imports(modules[name], modules), name


def test_every_module_is_small() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
