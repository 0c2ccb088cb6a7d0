"""The daemon's queue: tasks wait here until a backend has room for them.

Room means the backend's ComfyUI holds fewer than `max_pending` prompts,
running and pending, ours and anyone else's (default 2: one running and one
next, so the GPU never idles between prompts and the order stays ours).
Whenever something changes (a `status` frame, a connect, a reading, a new
task), the least loaded backend with room takes the oldest waiting task it
can run; a task only another backend can run does not hold up the line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from daemon.comfy.backend import ComfyBackend
from daemon.comfy.capabilities import Needs
from daemon.comfy.pool import BackendPool
from daemon.comfy.routing import Signal

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Ticket:
    """One task's place in the queue."""

    task_id: str
    needs: Needs
    on_position: Callable[[int], None] = lambda ahead: None  # tasks ahead of it in our queue
    backend: ComfyBackend | None = None
    assigned: trio.Event = field(default_factory=trio.Event)
    ahead: int | None = None


class Dispatcher:
    def __init__(self, pool: BackendPool, *, max_pending: int) -> None:
        self.pool = pool
        self.max_pending = max_pending
        self._waiting: list[Ticket] = []
        self.queued = Signal()  # a task began waiting here (shared mode may hand it back)

    def __len__(self) -> int:
        return len(self._waiting)

    def tickets(self) -> list[Ticket]:
        """The tasks waiting here, oldest first."""
        return list(self._waiting)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self.pool.changed.wait()
            self.dispatch()

    async def take(self, ticket: Ticket) -> ComfyBackend:
        """Wait in line until a backend is handed to this ticket (reserved for it: the
        caller submits, then calls `release`)."""
        self._waiting.append(ticket)
        try:
            self.dispatch()
            if not ticket.assigned.is_set():
                self.queued.fire()
            await ticket.assigned.wait()
        except BaseException:
            if ticket.backend is not None:  # handed a backend, but the taker is gone
                self.release(ticket.backend)
            raise
        finally:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
                self._positions()
        assert ticket.backend is not None
        return ticket.backend

    def release(self, backend: ComfyBackend) -> None:
        """The submission a `take` reserved room for is over (sent or not)."""
        backend.reserved = max(0, backend.reserved - 1)
        self.pool.changed.fire()

    def dispatch(self) -> None:
        """Hand out every task that some backend has room for, now (never awaits)."""
        while self._waiting:
            chosen = self._next_assignment()
            if chosen is None:
                break
            backend, ticket = chosen
            self._waiting.remove(ticket)
            backend.reserved += 1
            ticket.backend = backend
            ticket.assigned.set()
        self._positions()

    def _next_assignment(self) -> tuple[ComfyBackend, Ticket] | None:
        with_room = [
            b for b in self.pool.backends if self.pool.takes_work(b) and b.load() < self.max_pending
        ]
        # Least loaded first; configuration order breaks ties.
        for backend in sorted(with_room, key=lambda b: b.load()):
            for ticket in self._waiting:
                if self.pool.can_run(backend, ticket.needs):
                    return backend, ticket
        return None

    def _positions(self) -> None:
        for ahead, ticket in enumerate(self._waiting):
            if ticket.ahead != ahead:
                ticket.ahead = ahead
                ticket.on_position(ahead)

    def runnable_now(self, needs: Needs) -> bool:
        """Is some connected, read backend able to run this (room or not)?"""
        return any(
            self.pool.takes_work(b) and self.pool.can_run(b, needs) for b in self.pool.backends
        )
