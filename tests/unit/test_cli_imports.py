"""The import graph of ``cli``, read with ``ast``: no cycle anywhere, and the bench in its layers.

Imports inside functions count: a deferred import is still a cycle, only one that fails later
(the old ``cli/bench.py`` and its stage modules imported each other that way).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Final

import pytest

import cli

CLI_DIR: Final = Path(cli.__file__).parent

# The bench's layers: a module imports only modules of a lower layer (see cli/bench/__init__.py).
BENCH_LAYERS: Final = {
    "cli.bench": 0,
    "cli.bench.report": 1,
    "cli.bench.stats": 1,
    "cli.bench.profile": 1,
    "cli.bench.cpu": 1,
    "cli.bench.rawsql": 1,
    "cli.bench.charts": 2,
    "cli.bench.drive": 2,
    "cli.bench.deploy": 2,
    "cli.bench.raw": 3,
    "cli.bench.pipeline": 3,
    "cli.bench.gateway": 3,
    "cli.bench.webhooks": 3,
    "cli.bench.imap": 3,
    "cli.bench.send": 3,
    "cli.bench.idle": 3,
    "cli.bench.streams": 3,
    "cli.bench.transform_memory": 3,
    "cli.bench.failover": 3,
    "cli.bench.shard_move": 3,
    "cli.bench.shard_down": 3,
    "cli.bench.mime": 3,
    "cli.bench.runner": 4,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(CLI_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(CLI_DIR.rglob("*.py"))}


def _with_parents(name: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a`` and ``a.b`` first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def import_graph() -> dict[str, set[str]]:
    """Module -> the cli modules it imports (parents included), anywhere in its body."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets.add(base)
                # ``from pkg import mod`` imports the submodule when there is one
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {m for t in targets for m in _with_parents(t) if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path that starts and ends on the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def test_find_cycle_sees_a_cycle_through_a_deferred_import() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_cli_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "cli.bench.runner" in graph, "the graph did not find the bench package"
    assert find_cycle(graph) is None


def test_every_bench_module_has_a_layer() -> None:
    assert {m for m in _modules() if m.startswith("cli.bench")} == set(BENCH_LAYERS)


@pytest.mark.parametrize("module", sorted(BENCH_LAYERS))
def test_bench_module_imports_only_lower_layers(module: str) -> None:
    graph = import_graph()
    above = {
        target
        for target in graph[module]
        if target in BENCH_LAYERS
        and not module.startswith(f"{target}.")  # its own package, which imports nothing
        and BENCH_LAYERS[target] >= BENCH_LAYERS[module]
    }
    assert not above, f"{module} imports {sorted(above)}, not below it"


def test_the_runner_runs_every_stage_module() -> None:
    from cli.bench.runner import STAGES

    declared = {
        name
        for name in BENCH_LAYERS
        if BENCH_LAYERS[name] == 3 and hasattr(importlib.import_module(name), "STAGE")
    }
    assert {s.run.__module__ for s in STAGES} == declared
    assert len({s.name for s in STAGES}) == len(STAGES)


# ``cli.__main__`` runs the command line when imported, as it is meant to
@pytest.mark.parametrize("module", sorted(m for m in _modules() if not m.endswith("__main__")))
def test_every_cli_module_imports(module: str) -> None:
    importlib.import_module(module)
