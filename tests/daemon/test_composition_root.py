"""Only the composition root knows the App: services get what they use, not the App.

A module that imports daemon.app (even only for type hints) is reaching for
a service locator and makes an import cycle with it; cli.py starts the App
and app.py is the App.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import daemon

COMPOSITION_ROOT = "daemon.app"
MAY_IMPORT_IT = frozenset({"daemon.app", "daemon.cli"})


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every module `source` imports, anywhere in it (TYPE_CHECKING blocks and functions too);
    `from package import name` counts as importing `package.name` as well."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("import daemon.app", "daemon.api.routes"),
        ("from daemon.app import App", "daemon.ops.metrics"),
        ("from daemon import app", "daemon.ops.systemd"),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from daemon.app import App\n",
            "daemon.api.routes",
        ),
        ("def f():\n    from ..app import App\n", "daemon.api.routes"),
        ("from . import app", "daemon.cli"),
    ],
)
def test_every_way_of_importing_the_app_is_seen(source: str, module: str) -> None:
    assert COMPOSITION_ROOT in imported_modules(source, module)


def test_no_module_but_app_and_cli_imports_the_app() -> None:
    root = Path(daemon.__file__).parent
    importers = set()
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        source = path.read_text(encoding="utf-8")
        if COMPOSITION_ROOT in imported_modules(source, module, is_package=path.stem == "__init__"):
            importers.add(module)
    assert importers - MAY_IMPORT_IT == set()
