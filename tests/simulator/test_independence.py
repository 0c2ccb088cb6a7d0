"""The simulator is an independent witness: no imports from protocol/ or the daemon's tasks."""

from __future__ import annotations

import ast
from pathlib import Path

import daemon.simulator

ALLOWED_DAEMON_PACKAGES = ("daemon.simulator", "daemon.http")


def test_simulator_imports_neither_protocol_nor_daemon_task_code() -> None:
    package = Path(daemon.simulator.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "protocol" or (
                    top == "daemon" and not name.startswith(ALLOWED_DAEMON_PACKAGES)
                ):
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []
