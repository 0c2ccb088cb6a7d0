"""README.md's API table names every route the daemon installs, and no route it
does not: a client author reads the API from it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Where the daemon's routes are added (`router.add("GET", "/pattern", ...)`).
ROUTE_MODULES = ("daemon/api/routes.py", "daemon/app.py")
# The browser client's catch-all is the table's `GET /`.
CATCH_ALL = "/{path...}"


def installed_routes() -> set[tuple[str, str]]:
    """(method, pattern) of every `*.add("METHOD", "/literal pattern", ...)` call."""
    found: set[tuple[str, str]] = set()
    for module in ROUTE_MODULES:
        for node in ast.walk(ast.parse((ROOT / module).read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add"
                and len(node.args) >= 2
            ):
                continue
            method, pattern = node.args[0], node.args[1]
            if isinstance(method, ast.Constant) and isinstance(pattern, ast.Constant):
                found.add((str(method.value), str(pattern.value)))
    return found


def documented_routes() -> set[tuple[str, str]]:
    """(method, path) of each `METHOD /path` in the first column of the API table."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## API")
    section = readme[start : readme.index("\n## ", start + 1)]
    found: set[tuple[str, str]] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first_cell = line.split(" | ", 1)[0]
            found.update(re.findall(r"`([A-Z]+) (/[^`]*)`", first_cell))
    return found


def as_documented(pattern: str) -> str:
    """'/tasks/{task_id}' -> '/tasks/{taskId}' (the JSON's spelling); the catch-all is '/'."""
    if pattern == CATCH_ALL:
        return "/"
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), pattern)


def test_the_api_table_names_every_route_and_no_other() -> None:
    installed = {(method, as_documented(pattern)) for method, pattern in installed_routes()}
    documented = documented_routes()
    assert sorted(installed - documented) == [], "routes the README's API table does not name"
    assert sorted(documented - installed) == [], "routes the README names that do not exist"


def test_the_readers_see_the_routes() -> None:
    installed = installed_routes()
    assert ("DELETE", "/tasks/{task_id}") in installed
    assert ("GET", CATCH_ALL) in installed
    documented = documented_routes()
    assert ("GET", "/readyz") in documented  # a second route in the same cell
    assert ("POST", "/generate") in documented
