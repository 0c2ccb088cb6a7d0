"""Every target of the Makefile is in README.md (`make <target>`), and the README
names no target the Makefile lacks."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TARGET = "all"  # `make` alone; the README says `make test`
MAKE = r"\bmake ([a-z][a-z-]*[a-z])\b"


def make_targets() -> set[str]:
    makefile = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.MULTILINE)
    assert phony is not None, "the Makefile lists its targets in .PHONY"
    return set(phony.group(1).split()) - {DEFAULT_TARGET}


def readme_targets() -> set[str]:
    """`make X` in code: indented command lines and `backticked` spans (not prose)."""
    readme = (ROOT / "README.md").read_text()
    code = [line for line in readme.splitlines() if line.startswith("    ")]
    code += re.findall(r"`([^`\n]+)`", readme)
    return {target for text in code for target in re.findall(MAKE, text)}


def test_the_readme_names_every_make_target_and_no_other() -> None:
    targets, named = make_targets(), readme_targets()
    assert sorted(targets - named) == [], "make targets the README does not name"
    assert sorted(named - targets) == [], "make targets the README names that do not exist"


def test_the_readers_see_the_targets() -> None:
    assert {"bench-loop", "test-deps", "run", "docs"} <= make_targets()
    assert {"bench-loop", "test", "run"} <= readme_targets()
