"""Signal: a repeatable event, the daemon's one way to say "something changed".

Backends, the pool, the dispatcher, the registry, the image store and each
task's broadcaster fire one; whoever waits wakes, and `count` lets a waiter
tell whether a fire came while it was not waiting.
"""

from __future__ import annotations

import trio


class Signal:
    """A repeatable event: `fire()` wakes everyone waiting right now."""

    def __init__(self) -> None:
        # Made by the first waiter: a fire with nobody waiting allocates nothing.
        self._event: trio.Event | None = None
        self.count = 0

    def fire(self) -> None:
        self.count += 1
        event, self._event = self._event, None
        if event is not None:
            event.set()

    async def wait(self) -> None:
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()
