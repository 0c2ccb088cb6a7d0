"""Reading workflow files: the ones shipped in daemon/workflows/, then the user's directory.

This module only reads files; what a file must say is `protocol.workflow`'s
business. A user file named like a shipped one replaces it. Anything wrong
stops the start-up with a `WorkflowFileError` that names the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Final

from protocol.workflow import Catalog, Workflow, WorkflowError, parse_workflow

log = logging.getLogger(__name__)

SHIPPED_DIR: Final = Path(__file__).resolve().parent / "workflows"


class WorkflowFileError(Exception):
    """A workflow file or directory is unusable; the message names it and says why."""


def read_workflow(path: Path, *, default_checkpoint: str) -> Workflow:
    """One workflow file; its name is the file name without `.json`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkflowFileError(f"{path}: cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise WorkflowFileError(f"{path}: is not UTF-8 text") from None
    # The JSON reader and the graph's checks recurse once per level of nesting.
    too_deep = WorkflowFileError(f"{path}: is nested too deeply")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise WorkflowFileError(f"{path}: is not valid JSON: {exc}") from None
    except RecursionError:
        raise too_deep from None
    try:
        return parse_workflow(path.stem, data, default_checkpoint=default_checkpoint)
    except WorkflowError as exc:
        raise WorkflowFileError(f"{path}: {exc}") from None
    except RecursionError:
        raise too_deep from None


def _files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise WorkflowFileError(f"{directory}: the workflow directory does not exist")
    return sorted(p for p in directory.glob("*.json") if not p.name.startswith("."))


def load_catalog(
    user_dir: Path | None, *, default_checkpoint: str, shipped_dir: Path = SHIPPED_DIR
) -> Catalog:
    """The shipped workflows, then the user's (which may replace shipped ones by name)."""
    workflows: dict[str, Workflow] = {}
    for path in _files(shipped_dir):
        workflow = read_workflow(path, default_checkpoint=default_checkpoint)
        workflows[workflow.name] = workflow
    if user_dir is not None:
        for path in _files(user_dir):
            workflow = read_workflow(path, default_checkpoint=default_checkpoint)
            if workflow.name in workflows:
                log.info("workflow %r from %s replaces the shipped one", workflow.name, path)
            workflows[workflow.name] = workflow
    log.info("workflows: %s", ", ".join(sorted(workflows)))
    return Catalog(workflows)
