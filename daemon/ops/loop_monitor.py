"""A Trio instrument that keeps the longest steps of the event loop.

One task step is the code a task runs between two checkpoints; while it runs,
nothing else on the loop does (no request is read, no heartbeat is sent). The
monitor times every step in CPU time of the loop's thread (what the step cost,
whatever else the machine does) and in wall time, and keeps the `keep`
longest by CPU time, with the task's name. `make bench-loop` prints them
during hostile uploads; tests use `steps` and the names.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import trio


@dataclass(frozen=True, order=True, slots=True)
class Step:
    cpu: float  # seconds of CPU time of the loop's thread
    wall: float  # seconds of wall time
    task: str  # the task's name (its function, for most tasks)


class LoopMonitor(trio.abc.Instrument):
    """Install with `trio.lowlevel.add_instrument(monitor)` (or `with monitor.installed():`)."""

    def __init__(self, keep: int = 10) -> None:
        self.keep = keep
        self.steps = 0
        self._longest: list[Step] = []  # a min-heap of the longest `keep` steps
        # None when the step began before the monitor was installed.
        self._started: tuple[float, float] | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = (time.thread_time(), time.perf_counter())

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._started is None:
            return
        cpu_start, wall_start = self._started
        self._started = None
        step = Step(time.thread_time() - cpu_start, time.perf_counter() - wall_start, task.name)
        self.steps += 1
        if len(self._longest) < self.keep:
            heapq.heappush(self._longest, step)
        elif step.cpu > self._longest[0].cpu:
            heapq.heapreplace(self._longest, step)

    def longest(self) -> list[Step]:
        """The longest steps seen, longest first."""
        return sorted(self._longest, reverse=True)

    def reset(self) -> None:
        self.steps = 0
        self._longest = []

    @contextmanager
    def installed(self) -> Iterator[LoopMonitor]:
        """Watch the running loop inside the `with` block."""
        trio.lowlevel.add_instrument(self)
        try:
            yield self
        finally:
            trio.lowlevel.remove_instrument(self)
