"""Structured logs: one logfmt line per event on stderr (journald takes it from there).

    level=info logger=daemon.tasks task_id=... prompt_id=... backend=... msg="task completed"

Context fields come from `extra={...}`; only the names in `CONTEXT_FIELDS` are
printed, so nothing else (request bodies, headers) can leak into the logs.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Final, TextIO

CONTEXT_FIELDS: Final = ("task_id", "prompt_id", "backend", "client", "status", "route")


def _quote(value: object) -> str:
    text = str(value)
    if text and all(c.isalnum() or c in "-_.:/@" for c in text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    def __init__(self, *, with_time: bool) -> None:
        super().__init__()
        self.with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if self.with_time:
            parts.append(f"time={self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}")
        parts.append(f"level={record.levelname.lower()}")
        parts.append(f"logger={record.name}")
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                parts.append(f"{name}={_quote(value)}")
        parts.append(f"msg={_quote(record.getMessage())}")
        if record.exc_info:
            parts.append(f"error={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup_logging(level: str, *, stream: TextIO | None = None) -> None:
    """Configure the root logger; under journald (JOURNAL_STREAM set) leave time to it."""
    with_time = "JOURNAL_STREAM" not in os.environ
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(LogfmtFormatter(with_time=with_time))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # trio-websocket logs every frame at debug; keep it to warnings.
    logging.getLogger("trio-websocket").setLevel(logging.WARNING)
