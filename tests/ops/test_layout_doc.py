"""docs/architecture.md's Layout names every module of daemon/ and protocol/, and
no module that is gone: a newcomer finds where a rule lives from it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def layout_block() -> str:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    start = doc.index("## Layout")
    return doc[start : doc.index("\n## ", start + 1)]


def listed_modules() -> set[str]:
    """Paths the block names: an indented `name.py` under its folders' lines."""
    listed: set[str] = set()
    folders: list[tuple[int, str]] = []  # (indent, folder) from the outermost in
    for line in layout_block().splitlines():
        match = re.match(r"^( *)([a-z_]+)(/|\.py)\s", line + " ")
        if match is None:
            continue
        indent, name, kind = len(match.group(1)), match.group(2), match.group(3)
        folders = [(i, f) for i, f in folders if i < indent]
        if kind == "/":
            folders.append((indent, name))
        else:
            listed.add("/".join([*(f for _, f in folders), f"{name}.py"]))
    return listed


def actual_modules() -> set[str]:
    found = set()
    for package in ("daemon", "protocol"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name != "__init__.py" and "__pycache__" not in path.parts:
                found.add(path.relative_to(ROOT).as_posix())
    return found


def test_the_layout_names_every_module_and_no_missing_one() -> None:
    listed, actual = listed_modules(), actual_modules()
    assert sorted(actual - listed) == [], "modules the Layout does not name"
    assert sorted(listed - actual) == [], "modules the Layout names that do not exist"


def test_the_layout_reader_sees_nesting() -> None:
    listed = listed_modules()
    assert "daemon/tasks/actor.py" in listed
    assert "protocol/task/table.py" in listed
    assert "daemon/app.py" in listed
