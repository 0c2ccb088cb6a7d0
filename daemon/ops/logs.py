"""Structured logs: one logfmt line per event on stderr (journald takes it from there).

    time=2026-11-25T12:34:56.789Z level=info logger=daemon.tasks.actor task_id=... prompt_id=...
        backend=http://127.0.0.1:8188 msg="task completed: Xq3....png"

`time` is UTC, and left out when the lines go to journald, which stamps them
itself: when `JOURNAL_STREAM` names the very file the handler writes to
(systemd.exec(5): a process started from a service inherits the variable
with its output sent elsewhere, a terminal's shell or `2>file`).

Values are bare when they are plain words, else quoted with backslash
escapes (backslash, double quote, newline, CR and tab as in JSON; other
control characters as backslash-u and four hex digits), so every record is
exactly one line.

Context fields come from `extra={...}`; only the names in `CONTEXT_FIELDS` are
printed, so nothing else can ride along into the logs. What is never logged,
at any level: request bodies (a prompt is the user's own words), request
headers (Authorization, Cookie), image bytes. Ids are: task, prompt, backend.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Final, TextIO

CONTEXT_FIELDS: Final = ("task_id", "prompt_id", "backend", "client", "status", "route")


_ESCAPES: Final = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    code = ord(char)
    # Other control characters (and the Unicode line separators) could break
    # the line or fool a terminal: written as \uXXXX, as JSON would.
    if code < 0x20 or 0x7F <= code < 0xA0 or char in "\u2028\u2029":
        return f"\\u{code:04x}"
    return char


# Every character _escape changes, for str.translate (one C loop, not one call per character).
_ESCAPE_TABLE: Final = {
    code: _escape(chr(code))
    for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *map(ord, _ESCAPES))
}
# Bare values: word characters (str.isalnum() or "_") and -.:/@
_BARE: Final = re.compile(r"[\w\-.:/@]+")


def _quote(value: object) -> str:
    text = str(value)
    if _BARE.fullmatch(text):
        return text
    return '"' + text.translate(_ESCAPE_TABLE) + '"'


class LogfmtFormatter(logging.Formatter):
    def __init__(self, *, with_time: bool) -> None:
        super().__init__()
        self.with_time = with_time
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if self.with_time:
            second = int(record.created)
            if second != self._second:  # one strftime per second, not per line
                self._second = second
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            parts.append(f"time={self._stamp}.{int(record.msecs):03d}Z")
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


def writes_to_journald(stream: TextIO) -> bool:
    """Whether `stream` is the journald stream that $JOURNAL_STREAM ("DEVICE:INODE") names."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        found = os.fstat(stream.fileno())
    except (OSError, ValueError):  # no descriptor (io.StringIO), or closed
        return False
    return (found.st_dev, found.st_ino) == (int(device), int(inode))


def setup_logging(level: str, *, stream: TextIO | None = None) -> None:
    """Configure the root logger; on journald's stream leave time to journald."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    with_time = not writes_to_journald(stream)
    handler.setFormatter(LogfmtFormatter(with_time=with_time))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The formatter prints none of what a record gathers about where it was made
    # (caller's file, line and function: a stack walk per record) or who made it
    # (thread, process): not gathering it saves a third of a log line's cost,
    # and POST /generate logs a line per task (see the logging HOWTO, Optimization).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # trio-websocket logs every frame at debug; keep it to warnings.
    logging.getLogger("trio-websocket").setLevel(logging.WARNING)
