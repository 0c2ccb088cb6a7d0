"""Signal: a repeatable event, the daemon's one way to say "something changed".

Backends, the pool, the dispatcher, the registry, the image store and each
task's broadcaster fire one; whoever waits wakes, and `count` lets a waiter
tell whether a fire came while it was not waiting.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

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


class TurnByTurnWaker:
    """Sets events `per_turn` at a time, from its own task (`run`), in the order given.

    Thousands of tasks may wait for one change (every prompt a ComfyUI holds
    for us waits for its socket to close or open; every task in the daemon's
    queue for what the backends can run), and waking them all at once is one
    scheduler batch of thousands of task steps: no I/O meanwhile. Set a turn
    at a time, with a checkpoint between two turns, each turn's tasks run in
    the next batch. A task woken late sees the state as it is by then, as
    after any wait.
    """

    def __init__(self, per_turn: int) -> None:
        self.per_turn = per_turn
        self._to_wake: collections.deque[trio.Event] = collections.deque()
        self._queued: set[trio.Event] = set()  # (changes in a row queue each once)
        self._more = trio.Event()

    def wake(self, events: Iterable[trio.Event]) -> None:
        """Set these, after those still waiting their turn (each event once)."""
        for event in events:
            if event not in self._queued:
                self._queued.add(event)
                self._to_wake.append(event)
        self._more.set()

    async def run(self) -> None:
        while True:
            await self._more.wait()
            self._more = trio.Event()
            to_wake = self._to_wake
            while to_wake:
                for _ in range(min(self.per_turn, len(to_wake))):
                    event = to_wake.popleft()
                    self._queued.discard(event)
                    event.set()
                await trio.lowlevel.checkpoint()


class TurnByTurnSignal:
    """Like `Signal`, but a fire wakes its waiters `per_turn` at a time, oldest
    first (a `TurnByTurnWaker`: the owner runs `run`)."""

    def __init__(self, per_turn: int) -> None:
        self.count = 0
        self._waiting: dict[trio.Event, None] = {}  # (ordered: a dict, not a set)
        self._waker = TurnByTurnWaker(per_turn)

    def fire(self) -> None:
        self.count += 1
        self._waker.wake(self._waiting)
        self._waiting.clear()

    async def wait(self) -> None:
        woken = trio.Event()
        self._waiting[woken] = None
        try:
            await woken.wait()
        finally:
            self._waiting.pop(woken, None)  # (cancelled before the fire came)

    async def run(self) -> None:
        """Forever: wake the waiters of each fire, a turn at a time."""
        await self._waker.run()
