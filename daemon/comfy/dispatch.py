"""The daemon's queue: tasks wait here until a backend has room for them.

Room means the backend's ComfyUI holds fewer than `max_pending` prompts,
running and pending, ours and anyone else's (default 2: one running and one
next, so the GPU never idles between prompts and the order stays ours).
Whenever something changes (a `status` frame, a connect, a reading, a new
task), the least loaded backend with room takes the oldest waiting task it
can run; a task only another backend can run does not hold up the line.

A waiting task is told how many prompts will run before it: the tasks ahead
of it here plus the prompts already in the ComfyUI it will go to (the
smallest `load()` among the backends that take work and can run it; none
such, e.g. all disconnected: the tasks ahead of it here only). A task waits
here only while those backends are full, so counting only our queue would
tell the first one "0 ahead" and then, once in ComfyUI's queue, "1 ahead".
A load read from `status` frames wobbles (a frame ComfyUI sent before our
POST arrived after it, or after its reply), so a waiting task's count never
rises with a load: it rises only when what the backends can run changed (a
connect, a disconnect, a reading), as it does when one comes back.

Costs stay flat with a long queue: a new ticket is told its own position
only (nobody else's changed), the positions behind a ticket that left are
told once per batch of departures (a shutdown that cancels a thousand
waiting tasks tells each position once, not a thousand times), and tasks
waiting for a backend that can run them are woken only when what the
backends can run changed (`availability`), not on every `status` frame.
Counts are worked out for every waiting ticket again only when a load fell
or what the backends can run changed (the backends' part once per distinct
`needs`), and told only where they changed. In a saturated steady state a
backend's load stays at `max_pending` (a finished prompt is replaced within
the same look) and this adds nothing; where loads wobble, it adds at most
one pass per `status` frame, the same order as the pass every departure
from the head of the line costs anyway.

Telling a position is the task's whole publish (~35 µs: state, message,
snapshot), and a departure from the head changes every position behind it:
with 2,000 waiting, 55-80 ms in one go, during which no progress reached any
stream. A look tells at most `POSITIONS_PER_TURN` tasks; the rest are told
by the dispatcher's own task, a turn at a time, the scheduler running others
in between. Waking every waiting task when what the backends can run changed
goes the same way, `WAKES_PER_TURN` a turn, by a `TurnByTurnWaker` (one that
no backend can run any more publishes `waiting`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from daemon.comfy.backend import ComfyBackend
from daemon.comfy.capabilities import Needs
from daemon.comfy.pool import BackendPool
from daemon.signals import Signal, TurnByTurnWaker

log = logging.getLogger(__name__)

POSITIONS_PER_TURN = 200  # positions told between two checkpoints (~7 ms)
WAKES_PER_TURN = 100  # tasks woken a turn (each runs its own step next turn: ~70 us)


@dataclass(eq=False, slots=True)
class Ticket:
    """One task's place in the queue."""

    task_id: str
    needs: Needs
    # Prompts that run before it: tasks ahead of it in our queue + those in its ComfyUI.
    on_position: Callable[[int], None] = lambda ahead: None
    backend: ComfyBackend | None = None
    # Set when a backend is handed to it and when what the backends can run
    # changed (`availability`): one event to wait on for both, so a queued task
    # needs no helper task of its own. Whoever waits replaces it after waking.
    wakeup: trio.Event = field(default_factory=trio.Event)
    ahead: int | None = None
    # Backends (names) its task's POST /prompt failed at: passed over while
    # another that takes work can run it.
    avoid: frozenset[str] = frozenset()


class Dispatcher:
    def __init__(self, pool: BackendPool, *, max_pending: int) -> None:
        self.pool = pool
        self.max_pending = max_pending
        self._waiting: list[Ticket] = []
        # Tickets from this index on may have been told an outdated position.
        self._stale_from = 0
        # The backends as positions were last worked out: when a load fell or
        # what they can run changed, every waiting ticket's count may have.
        self._told_availability: tuple[object, ...] = ()
        self._told_loads: tuple[int, ...] = ()
        # A look stopped after POSITIONS_PER_TURN: the positions from _stale_from
        # on are told next turn (may they rise, as in the look that stopped?).
        self._untold = False
        self._untold_may_rise = False
        self._follow_up = Signal()  # positions left untold
        # Wakes the waiting tasks when what the backends can run changed.
        self._waker = TurnByTurnWaker(WAKES_PER_TURN)
        # Fired when a backend started or stopped taking work, or what it can run
        # changed: then `runnable_now` may answer differently.
        self.availability = Signal()
        self._available: tuple[object, ...] = ()
        self.queued = Signal()  # a task began waiting here (shared mode may hand it back)

    def __len__(self) -> int:
        return len(self._waiting)

    def tickets(self) -> list[Ticket]:
        """The tasks waiting here, oldest first."""
        return list(self._waiting)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow_up_a_turn_at_a_time)
            nursery.start_soon(self._waker.run)
            task_status.started()
            while True:
                await self.pool.changed.wait()
                self.dispatch()
                available = self._told_availability  # (dispatch() has just worked it out)
                if available != self._available:
                    self._available = available
                    self.availability.fire()
                    self._waker.wake(ticket.wakeup for ticket in self._waiting)

    async def _follow_up_a_turn_at_a_time(self) -> None:
        """Tell the positions a look left untold, POSITIONS_PER_TURN a turn."""
        while True:
            if not self._untold:
                await self._follow_up.wait()
            await trio.lowlevel.checkpoint()
            if self._untold:
                self._positions()

    def _availability(self) -> tuple[object, ...]:
        """What `runnable_now` depends on. The connection counter, not the state:
        a disconnect and reconnect between two looks still counts as a change."""
        pool = self.pool
        return tuple(
            (
                b.connected_changed.count,
                b.is_connected(),
                b.queue_remaining is None,
                pool.capabilities.get(b.name),
            )
            for b in pool.backends
        )

    async def take(self, ticket: Ticket) -> ComfyBackend:
        """Wait in line until a backend is handed to this ticket (reserved for it: the
        caller submits, then calls `release`)."""
        self.enter(ticket)
        try:
            while ticket.backend is None:
                await ticket.wakeup.wait()
                ticket.wakeup = trio.Event()
        except BaseException:
            if ticket.backend is not None:  # handed a backend, but the taker is gone
                self.release(ticket.backend)
            raise
        finally:
            self.withdraw(ticket)
        return ticket.backend

    def enter(self, ticket: Ticket) -> None:
        """Join the line; `ticket.backend` is set (and `wakeup`) once one is handed over,
        maybe at once. Whoever enters must `withdraw` (or `release` what it was handed)."""
        self._waiting.append(ticket)
        self._stale_from = min(self._stale_from, len(self._waiting) - 1)
        self.dispatch()
        if ticket.backend is None:
            self.queued.fire()

    def withdraw(self, ticket: Ticket) -> None:
        """Leave the line without a backend (nothing to do once one was handed over)."""
        if ticket.backend is None:  # still in line (dispatch() takes it out as it assigns)
            self._drop(ticket)
            # Those behind it learn their positions when the dispatcher looks
            # again: once for every ticket that left meanwhile.
            self.pool.changed.fire()

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
            self._drop(ticket)
            backend.reserved += 1
            ticket.backend = backend
            ticket.wakeup.set()
        self._positions()

    def _next_assignment(self) -> tuple[ComfyBackend, Ticket] | None:
        with_room = [
            b for b in self.pool.backends if self.pool.takes_work(b) and b.load() < self.max_pending
        ]
        # Least loaded first; configuration order breaks ties.
        for backend in sorted(with_room, key=lambda b: b.load()):
            for ticket in self._waiting:
                if self.pool.can_run(backend, ticket.needs) and not self._elsewhere(
                    ticket, backend
                ):
                    return backend, ticket
        return None

    def _elsewhere(self, ticket: Ticket, backend: ComfyBackend) -> bool:
        """Does the ticket wait for another backend? Its task's POST failed at this one,
        and another that takes work can run it (room or not)."""
        if backend.name not in ticket.avoid:
            return False
        pool = self.pool
        return any(
            b.name not in ticket.avoid and pool.takes_work(b) and pool.can_run(b, ticket.needs)
            for b in pool.backends
        )

    def _drop(self, ticket: Ticket) -> None:
        index = self._waiting.index(ticket)
        del self._waiting[index]
        self._stale_from = min(self._stale_from, index)

    def _positions(self) -> None:
        """Tell every ticket whose position changed its new one (POSITIONS_PER_TURN
        at most: then `_follow_up_a_turn_at_a_time` goes on next turn)."""
        waiting = self._waiting
        start = self._stale_from
        availability = self._availability()
        loads = tuple(b.load() for b in self.pool.backends)
        rise = availability != self._told_availability
        may_rise = rise or (self._untold and self._untold_may_rise)
        if rise or any(new < old for new, old in zip(loads, self._told_loads, strict=False)):
            start = 0
        self._told_availability, self._told_loads = availability, loads
        bases: dict[Needs, int] = {}  # tickets mostly share a few graphs' needs
        told = 0
        for index in range(start, len(waiting)):
            if told == POSITIONS_PER_TURN:
                self._stale_from = index
                self._untold, self._untold_may_rise = True, may_rise
                self._follow_up.fire()
                return
            ticket = waiting[index]
            base = bases.get(ticket.needs)
            if base is None:
                base = bases[ticket.needs] = self._held_before(ticket.needs)
            ahead = index + base
            told_before = ticket.ahead
            if told_before is not None and ahead > told_before and not may_rise:
                continue  # a load wobbled up: keep the lower count
            if told_before != ahead:
                ticket.ahead = ahead
                ticket.on_position(ahead)
                told += 1
        self._stale_from = len(waiting)
        self._untold = False

    def _held_before(self, needs: Needs) -> int:
        """Prompts in the ComfyUI a task with these needs will go to (the least loaded
        one that can run it: dispatch's choice); 0 when none takes work now."""
        pool = self.pool
        return min(
            (b.load() for b in pool.backends if pool.takes_work(b) and pool.can_run(b, needs)),
            default=0,
        )

    def runnable_now(self, needs: Needs) -> bool:
        """Is some connected, read backend able to run this (room or not)?"""
        return any(
            self.pool.takes_work(b) and self.pool.can_run(b, needs) for b in self.pool.backends
        )
