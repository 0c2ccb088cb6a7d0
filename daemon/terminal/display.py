"""What the terminal client shows on stderr while a task runs.

On a terminal: one line redrawn in place (carriage return, erase to the end
of the line), with the step text, a bar, the percentage, the running node's
step count, the ETA and the time so far:

    Sampling image...  [██████████████░░░░░░]  71%  12/20  ETA 0:04  (6 s)

Anywhere else (a log file, a pipe, CI) redrawing makes a mess, so it prints
plain lines instead, and few of them: one when the step changes and one each
time the running node passes another quarter of its steps.

A node's own progress text (`progress.text`, e.g. a sampler's "step 3/20 ·
denoising") follows the step count, control characters removed (it comes from
ComfyUI's nodes and must not move the cursor or recolour the terminal).

The bar shows `progress.overall.percentage` when the daemon sends it (the
per-node `percentage` starts again at every node), held below 100 until the
task completes. The ETA is the daemon's `progress.etaSeconds` when it has
one, else the client's own estimate from the running node's step rate.
"""

from __future__ import annotations

import math
import os
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TextIO

from protocol.progress import TickOrigin, eta_seconds

BAR_WIDTH: Final = 20
PLAIN_MILESTONE: Final = 25.0  # plain mode: a line per this many percent of a node
DEFAULT_COLUMNS: Final = 80
MAX_TEXT: Final = 120  # characters of a node's progress text shown


def format_duration(seconds: float, *, round_up: bool = False) -> str:
    """0:07, 1:05, 1:02:03. ETAs round up, so a last second shows as 0:01, not 0:00."""
    total = max(0, math.ceil(seconds) if round_up else math.floor(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


def bar(percentage: float, *, unicode: bool, width: int = BAR_WIDTH) -> str:
    filled = round(max(0.0, min(100.0, percentage)) / 100 * width)
    full, empty = ("█", "░") if unicode else ("#", "-")
    return "[" + full * filled + empty * (width - filled) + "]"


def printable(text: str) -> str:
    """The text without control characters (escape sequences, newlines), shortened."""
    kept = "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c for c in text)
    kept = " ".join(kept.split())
    return kept if len(kept) <= MAX_TEXT else kept[: MAX_TEXT - 1] + "…"


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


@dataclass(frozen=True, slots=True)
class Progress:
    """The fields of one daemon message that the display uses."""

    status: str  # in-progress | completed | error
    step: str
    node_percentage: float
    value: float
    maximum: float
    overall: float | None
    eta: float | None
    node: str | None
    text: str | None = None  # the running node's progress text

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Progress:
        progress = payload.get("progress")
        block: Mapping[str, Any] = progress if isinstance(progress, Mapping) else {}
        overall_block = block.get("overall")
        overall = (
            _number(overall_block.get("percentage")) if isinstance(overall_block, Mapping) else None
        )
        node = block.get("node")
        text = block.get("text")
        return cls(
            status=str(payload.get("status", "in-progress")),
            step=str(block.get("currentStep") or "Working..."),
            node_percentage=_number(block.get("percentage")) or 0.0,
            value=_number(block.get("currentValue")) or 0.0,
            maximum=_number(block.get("maxValue")) or 0.0,
            overall=overall,
            eta=_number(block.get("etaSeconds")),
            node=str(node) if node is not None else None,
            text=printable(text) or None if isinstance(text, str) else None,
        )

    @property
    def bar_percentage(self) -> float:
        if self.status == "completed":
            return 100.0
        shown = self.overall if self.overall is not None else self.node_percentage
        return min(shown, 99.0)


class RateEstimator:
    """An ETA from the running node's step rate, for when the daemon sends none."""

    def __init__(self) -> None:
        self._origin: TickOrigin | None = None
        self._key: tuple[str | None, str, float] | None = None

    def estimate(self, progress: Progress, now: float) -> float | None:
        key = (progress.node, progress.step, progress.maximum)
        if key != self._key or self._origin is None or progress.value < self._origin.value:
            # A new node (or a restart of this one): its first tick is the base.
            self._key = key
            self._origin = TickOrigin(progress.node, now, progress.value)
            return None
        return eta_seconds(self._origin, now, progress.value, progress.maximum)


def terminal_columns(stream: TextIO) -> int:
    """The terminal's width: $COLUMNS, else the terminal's own, else 80."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        return DEFAULT_COLUMNS
    return columns or DEFAULT_COLUMNS


class Display:
    """Draws progress on `stream`: redrawn in place on a terminal, plain lines elsewhere."""

    def __init__(self, stream: TextIO, *, tty: bool, clock: Callable[[], float]) -> None:
        self.stream = stream
        self.tty = tty
        self.clock = clock
        self.started = clock()
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        self.unicode = encoding.startswith("utf")
        self._rates = RateEstimator()
        self._latest: Progress | None = None
        self._eta: float | None = None
        self._eta_at = 0.0
        self._drawn = False  # a redrawn line is on the screen (tty)
        self._plain_step: str | None = None  # plain mode: the step and quarter last printed
        self._plain_mark = 0.0
        self._note = ""
        # The daemon keeps the last node's step count in later messages (a
        # decoder step still says 20/20): show a count only under the step
        # that made it.
        self._count: tuple[float, float] = (0.0, 0.0)
        self._count_step: str | None = None

    # -- what happened

    def update(self, payload: Mapping[str, Any]) -> None:
        """A message from the daemon arrived."""
        now = self.clock()
        progress = Progress.from_payload(payload)
        estimate = self._rates.estimate(progress, now)
        self._eta = progress.eta if progress.eta is not None else estimate
        self._eta_at = now
        if (progress.value, progress.maximum) != self._count:
            self._count = (progress.value, progress.maximum)
            self._count_step = progress.step
        self._latest = progress
        self._note = ""
        if self.tty:
            self._redraw()
        else:
            self._plain(progress)

    def note(self, text: str) -> None:
        """A passing remark (reconnecting...): in the bar on a terminal, else a line."""
        if self.tty:
            self._note = text
            self._redraw()
        else:
            self.message(text)

    def tick(self) -> None:
        """Redraw with the time moved on (the ETA counts down between messages)."""
        if self.tty and self._latest is not None:
            self._redraw()

    def message(self, text: str) -> None:
        """A line of its own; the bar (if any) is finished first so it is not overwritten."""
        self.finish()
        self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """End the redrawn line, keeping its last state on the screen."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    # -- drawing

    def line(self) -> str:
        """The status line as it stands now."""
        progress = self._latest
        elapsed = self.clock() - self.started
        if progress is None:
            return f"{self._note or 'Waiting...'}  ({format_duration(elapsed)})"
        parts = [
            progress.step,
            " " + bar(progress.bar_percentage, unicode=self.unicode),
            f"{progress.bar_percentage:3.0f}%",
        ]
        if self._shows_count(progress):
            parts.append(f"{progress.value:.0f}/{progress.maximum:.0f}")
        if progress.text and progress.status == "in-progress":
            parts.append(progress.text)
        remaining = self.remaining()
        if remaining is not None and progress.status == "in-progress":
            parts.append(f"ETA {format_duration(remaining, round_up=True)}")
        parts.append(f"({format_duration(elapsed)})")
        if self._note:
            parts.append(self._note)
        return "  ".join(parts)

    def _shows_count(self, progress: Progress) -> bool:
        return progress.maximum > 0 and progress.step == self._count_step

    def remaining(self) -> float | None:
        if self._eta is None:
            return None
        return max(0.0, self._eta - (self.clock() - self._eta_at))

    def _redraw(self) -> None:
        # Never wider than the terminal: a wrapped line cannot be redrawn in place.
        width = max(10, terminal_columns(self.stream) - 1)
        self.stream.write("\r" + self.line()[:width] + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def _plain(self, progress: Progress) -> None:
        terminal = progress.status != "in-progress"
        mark = progress.node_percentage // PLAIN_MILESTONE * PLAIN_MILESTONE
        if progress.step == self._plain_step and mark <= self._plain_mark and not terminal:
            return
        self._plain_step = progress.step
        self._plain_mark = mark
        elapsed = format_duration(self.clock() - self.started)
        text = f"[{elapsed}] {progress.step}"
        if self._shows_count(progress) and not terminal:
            text += f" {progress.value:.0f}/{progress.maximum:.0f}"
        text += f" ({progress.bar_percentage:.0f}%)"
        remaining = self.remaining()
        if remaining is not None and not terminal:
            text += f" ETA {format_duration(remaining, round_up=True)}"
        if progress.text and not terminal:
            text += f" · {progress.text}"
        self.message(text)
