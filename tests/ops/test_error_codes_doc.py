"""README.md's list of error codes names every code a task can end with, and no
code the daemon never sends: clients branch on `error.code`."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from daemon.config import FIELDS

ROOT = Path(__file__).resolve().parents[2]


def codes_in_code() -> set[str]:
    """Literal codes of `Failed("code", ...)` and `TaskError(code="code", ...)`."""
    found: set[str] = set()
    for package in ("daemon", "protocol"):
        for path in (ROOT / package).rglob("*.py"):
            if "simulator" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                code: ast.expr | None = None
                if name == "Failed" and node.args:
                    code = node.args[0]
                elif name == "TaskError":
                    code = next((k.value for k in node.keywords if k.arg == "code"), None)
                if isinstance(code, ast.Constant) and isinstance(code.value, str):
                    found.add(code.value)
    return found


def codes_in_readme() -> set[str]:
    """The `codes` of the paragraph's sentence that starts with "Error codes:"."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("Error codes:")
    paragraph = readme[start : readme.index("\n\n", start)]
    # Each code opens its entry: `code` (what it means), or `code`, `code`, ...
    return set(re.findall(r"`([a-z_]+)`(?= \(|,|\.)", paragraph)) - setting_names(paragraph)


def setting_names(paragraph: str) -> set[str]:
    return {name for name in FIELDS if f"`{name}`" in paragraph}


def test_the_readme_lists_every_error_code_and_no_other() -> None:
    sent, listed = codes_in_code(), codes_in_readme()
    assert sorted(sent - listed) == [], "error codes the README does not list"
    assert sorted(listed - sent) == [], "error codes the README lists that are never sent"


def test_the_readers_see_the_codes() -> None:
    assert {"cancelled", "comfy_error", "lost", "backend_unavailable"} <= codes_in_code()
    assert {"cancelled", "internal", "no_output"} <= codes_in_readme()
