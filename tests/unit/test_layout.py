"""The layering of the tree: libs at the bottom, services on libs, and no service inside another.

What two services share belongs in libs: a service that imports another runs the other's code
(and its import-time side effects, metrics, settings) in its own process, and the two can no
longer be changed or deployed apart. Checked from the source, so a lazy import inside a function
counts as much as one at the top.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = ROOT) -> Iterator[str]:
    """Every module ``path`` imports, relative imports resolved to absolute names."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                yield ".".join([*base, *([node.module] if node.module else [])])
            elif node.module is not None:
                yield node.module


def _python_files(top: str) -> list[Path]:
    return sorted((ROOT / top).rglob("*.py"))


def test_no_service_imports_another() -> None:
    services = sorted(p.name for p in (ROOT / "services").iterdir() if (p / "__init__.py").is_file())
    assert {"gateway", "ingest", "persist", "transform"} <= set(services)
    leaks = []
    for path in _python_files("services"):
        parts = path.relative_to(ROOT / "services").parts
        if len(parts) < 2:
            continue  # services/__init__.py belongs to no service
        own = parts[0]
        for name in imported_modules(path):
            target = name.split(".")
            if target[0] == "services" and len(target) > 1 and target[1] != own:
                leaks.append(f"{path.relative_to(ROOT)} imports {name}")
            if target[0] == "cli":
                leaks.append(f"{path.relative_to(ROOT)} imports {name} (cli is above the services)")
    assert not leaks, "what two services share belongs in libs:\n" + "\n".join(leaks)


def test_libs_import_no_service() -> None:
    leaks = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _python_files("libs")
        for name in imported_modules(path)
        if name.split(".")[0] in ("services", "cli")
    ]
    assert not leaks, "libs are below the services and the CLI:\n" + "\n".join(leaks)


def test_relative_imports_count_too(tmp_path: Path) -> None:
    """The checker itself: ``from ..ingest import x`` inside services/gateway is services.ingest."""
    source = tmp_path / "services" / "gateway" / "webhooks" / "routes.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "from ...ingest import routes\nfrom . import store\nfrom .. import auth\n"
        "def later() -> None:\n    import services.persist.writer\n"
    )
    assert sorted(imported_modules(source, tmp_path)) == [
        "services.gateway",
        "services.gateway.webhooks",
        "services.ingest",
        "services.persist.writer",
    ]
