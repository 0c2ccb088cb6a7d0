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


class TurnByTurnSignal:
    """Like `Signal`, but a fire wakes its waiters `per_turn` at a time.

    Thousands may wait on one (every prompt a ComfyUI holds for us waits for its
    socket to close or open), and waking them all at once is one scheduler
    batch of thousands of task steps: no I/O meanwhile. The owner runs `run`,
    which wakes the waiters of each fire in turns, with a checkpoint between
    two turns, oldest waiter first. A waiter woken late sees the state as it
    is by then, as after any wait.
    """

    def __init__(self, per_turn: int) -> None:
        self.per_turn = per_turn
        self.count = 0
        self._waiting: dict[trio.Event, None] = {}  # (ordered: a dict, not a set)
        self._to_wake: list[trio.Event] = []
        self._fired = trio.Event()

    def fire(self) -> None:
        self.count += 1
        self._to_wake.extend(self._waiting)
        self._waiting.clear()
        self._fired.set()

    async def wait(self) -> None:
        woken = trio.Event()
        self._waiting[woken] = None
        try:
            await woken.wait()
        finally:
            self._waiting.pop(woken, None)  # (cancelled before the fire came)

    async def run(self) -> None:
        """Forever: wake the waiters of each fire, `per_turn` a turn."""
        while True:
            await self._fired.wait()
            self._fired = trio.Event()
            while self._to_wake:
                turn = self._to_wake[: self.per_turn]
                del self._to_wake[: self.per_turn]
                for woken in turn:
                    woken.set()
                await trio.lowlevel.checkpoint()
