"""A worker's side of the shared queue: take work when a backend has room, hold
a lease on it, and claim the tasks of workers whose leases expired.

The queue is a Redis Stream with one consumer group; an entry pending for a
consumer is that worker's lease. The worker keeps its leases fresh (XCLAIM by
itself, which resets the entry's idle time, only while the entry is still its
own: a Lua script checks the owner first). A worker that stops doing so (kill -9,
a partition) leaves entries idle; after `lease_timeout` another worker's
XAUTOCLAIM takes them and runs them as restored tasks: when it reaches the same
ComfyUI it re-attaches to the prompt there (/history), otherwise the task is
resubmitted (or ends `lost` with `resubmit_lost` off), as after a restart.
With no live worker left to claim it, a front ends it `backend_unavailable` once no
live worker could run it for `backend_wait_timeout` (wait_limit.py: in one step that
a claim excludes, and that acknowledges the entry).

A task of ours that waits in our dispatcher while none of our backends can
take it (they are away: the task was taken just before, or its prompt was lost
with its backend) goes back to the queue at once rather than after
`backend_wait_timeout`: our copy stops without ending the task, and any worker
with a live backend takes it from the stream's newest version on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Final

import anyio
import trio
from coredis.exceptions import RedisError, StreamConsumerGroupError

from daemon.comfy.capabilities import needs_of
from daemon.shared.capabilities import capabilities_to_json
from daemon.shared.ending import cancel_in_line
from daemon.shared.mirror import TaskMirror
from daemon.shared.store import (
    CANCEL_ASKED,
    GROUP,
    SILENT_GRACE,
    SharedRecord,
    SharedStore,
    text,
)
from daemon.shared.worker_registry import publish, withdraw
from daemon.signals import Signal
from protocol import task

if TYPE_CHECKING:
    from daemon.comfy.dispatch import Dispatcher
    from daemon.tasks.actor import TaskActor
    from daemon.tasks.registry import TaskRegistry

log = logging.getLogger(__name__)

TAKE_BLOCK_MS: Final = 2000
RETRY_DELAY: Final = 1.0
HAND_BACK_TIMEOUT: Final = 2.0
# What a last word to Redis at a stop may fail with: Redis' own errors, and a pooled
# connection whose tasks the stop's cancellation is tearing down (coredis hands it out
# until they are gone; seen when the daemon is cancelled from outside, in process).
STOP_ERRORS: Final = (RedisError, anyio.ClosedResourceError, anyio.BrokenResourceError)
BOUNCE_MAX_DELAY: Final = 8.0  # the longest pause before reading a task we put back again
BOUNCES_REMEMBERED: Final = 1000
GONE_BACKEND: Final = "gone:"  # the name a claimed task's unreachable backend gets

# Refresh the leases that are still ours (KEYS[1] the queue, ARGV[1] us, then entry ids).
# An entry pending for nobody is kept: Redis lost it (restarted without its data),
# no other worker holds the task, and our copy runs it to its end. (A claimer that
# already ended it wrote a newer version: our next write is refused.)
REFRESH_LEASES: Final = """
local mine = {}
for i = 2, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], 'workers', ARGV[i], ARGV[i], 1)
  if pending[1] and pending[1][2] == ARGV[1] then
    redis.call('XCLAIM', KEYS[1], 'workers', ARGV[1], 0, ARGV[i], 'JUSTID')
    table.insert(mine, ARGV[i])
  elseif not pending[1] then
    table.insert(mine, ARGV[i])
  end
end
return mine
"""


# Stopping: our leases past their timeout, so a claimer takes them now (KEYS[1] the
# queue, ARGV[1] us, ARGV[2] the idle time to give them in ms, then entry ids). Only
# the entries still pending for us: one another worker claimed while we were cut off
# from Redis is its lease, not ours to hand over. Returns how many were handed over.
HAND_OVER: Final = """
local handed = 0
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], 'workers', ARGV[i], ARGV[i], 1)
  if pending[1] and pending[1][2] == ARGV[1] then
    redis.call('XCLAIM', KEYS[1], 'workers', ARGV[1], 0, ARGV[i], 'IDLE', ARGV[2], 'JUSTID')
    handed = handed + 1
  end
end
return handed
"""


class SharedWorker:
    def __init__(
        self,
        store: SharedStore,
        mirror: TaskMirror,
        *,
        daemon_id: str,
        registry: TaskRegistry,
        dispatcher: Dispatcher,
        lease_timeout: float,
        on_waiting_end: Callable[[task.TaskState], None] = lambda state: None,
    ) -> None:
        """`on_waiting_end(state)`: a task given back that this worker ended in line (a
        cancel asked meanwhile): no actor of ours counts it."""
        self.store = store
        self.on_waiting_end = on_waiting_end
        self.mirror = mirror
        self.daemon_id = daemon_id
        self.registry = registry
        self.dispatcher = dispatcher
        self.pool = dispatcher.pool
        self.lease_timeout = lease_timeout
        self._held: dict[str, str] = {}  # task id -> its queue entry id
        self._nursery: trio.Nursery | None = None
        self.taken = 0
        self.claimed = 0
        self.bounced = 0
        self.returned = 0  # held tasks given back because our backends could not take them
        self._bounces: dict[str, int] = {}  # task id -> times we put it back in line
        self._last_bounced = ""

    @property
    def held(self) -> int:
        return len(self._held)

    def finished(self, task_id: str) -> None:
        """The mirror wrote a task's end: give its queue entry back (XACK, XDEL)."""
        entry = self._held.pop(task_id, None)
        if entry is not None and self._nursery is not None:
            self._nursery.start_soon(self._done, entry)

    def lost(self, task_id: str) -> None:
        """Our copy stopped (the mirror found the lease another worker's, or the stream
        past us): refresh the entry no more. Not acknowledged: its holder does that, or
        whoever claims it after the lease (and finds the task ended, or runs it)."""
        self._held.pop(task_id, None)

    def cancel(self, task_id: str) -> None:
        actor = self.registry.get(task_id)
        if actor is not None and not actor.moved:  # a moved task's holder has the cancel key
            actor.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._take_loop)
                nursery.start_soon(self._lease_loop)
                nursery.start_soon(self._capabilities_loop)
                nursery.start_soon(self._return_loop)
                task_status.started()
        finally:
            with trio.move_on_after(HAND_BACK_TIMEOUT, shield=True):
                await self._hand_back()
                await self._unpublish()

    async def _hand_back(self) -> None:
        """Stopping (SIGTERM): our unfinished tasks' entries get an idle time past the
        lease, so another worker claims them now rather than after `lease_timeout`
        (only those still ours: see HAND_OVER)."""
        if not self._held:
            return
        try:
            handed = await self.store.redis.eval(
                HAND_OVER,
                keys=[self.store.queue_key],
                args=[
                    self.daemon_id,
                    int(self.lease_timeout * 1000) + 1000,
                    *self._held.values(),
                ],
            )
        except STOP_ERRORS as exc:
            log.warning("cannot hand our tasks back: %r", exc)
            return
        log.info("handed %s task(s) back to the shared queue", handed)

    async def _unpublish(self) -> None:
        """Stopping: our backends run nothing more (fronts count waits from now on)."""
        try:
            await withdraw(self.store, self.daemon_id)
        except STOP_ERRORS as exc:
            log.warning("cannot withdraw what our backends can run: %r", exc)

    async def _done(self, entry: str) -> None:
        try:
            await self.store.redis.xack(self.store.queue_key, GROUP, [entry])
            await self.store.redis.xdel(self.store.queue_key, [entry])
        except RedisError as exc:
            log.warning("cannot acknowledge queue entry %s: %s", entry, exc)

    # -- room: the pool's dispatch rule

    def has_room(self) -> bool:
        if len(self.dispatcher):
            return False  # a task of ours already waits for a backend
        return any(
            self.pool.takes_work(b) and b.load() < self.dispatcher.max_pending
            for b in self.pool.backends
        )

    async def _wait_for_room(self) -> None:
        while not self.has_room():
            with trio.move_on_after(1.0):
                await self.pool.changed.wait()

    async def _wait_dispatched(self, actor: TaskActor) -> None:
        """Until the task holds a backend (or waits for one, ended, or went back to the
        queue): then look for room."""
        while (
            actor.backend is None
            and not actor.is_done()
            and not actor.moved
            and not len(self.dispatcher)
        ):
            with trio.move_on_after(0.5):
                await self.registry.changed.wait()

    # -- taking and claiming

    async def _take_loop(self) -> None:
        again = ""  # a task we put back: read at once, another may be next in line
        while True:
            await self._wait_for_room()
            bounced = self.bounced
            try:
                actor = await self._take_one()
            except RedisError as exc:
                log.warning("taking work from Redis failed (retrying): %s", exc)
                if isinstance(exc, StreamConsumerGroupError):
                    # Redis lost the queue (restarted without its data, flushed):
                    # without its group no worker would read a task again.
                    with contextlib.suppress(RedisError):
                        await self.store.ensure_queue()
                await trio.sleep(RETRY_DELAY)
                continue
            if actor is not None:
                await self._wait_dispatched(actor)
            elif self.bounced != bounced:
                # Not ours to run. The same task again next means nothing else waits for
                # us: pause, longer each time it comes back, unless a new task arrives.
                task_id = self._last_bounced
                if task_id != again:
                    again = task_id
                elif await self._back_off(bounce_delay(self._bounces.get(task_id, 1))):
                    again = ""

    async def _back_off(self, delay: float) -> bool:
        """Wait up to `delay`; True as soon as the service's waiting set grows."""
        with trio.move_on_after(delay):
            try:
                before = await self.store.waiting_count()
                while True:
                    await trio.sleep(RETRY_DELAY)
                    if await self.store.waiting_count() > before:
                        return True
            except RedisError as exc:
                log.warning("cannot read the shared queue's length: %s", exc)
                await trio.sleep(delay)
        return False

    async def _take_one(self) -> TaskActor | None:
        # Expired leases first: those tasks waited longest.
        reply = await self.store.redis.xautoclaim(
            self.store.queue_key,
            GROUP,
            self.daemon_id,
            int(self.lease_timeout * 1000),
            "0-0",
            count=1,
        )
        claimed = reply[1]
        if claimed:
            entry = claimed[0]
            return await self._adopt(text(entry.identifier), entry.field_values, claimed=True)
        with trio.move_on_after(TAKE_BLOCK_MS / 1000 + SILENT_GRACE) as read:
            taken = await self.store.redis.xreadgroup(
                GROUP,
                self.daemon_id,
                {self.store.queue_key: ">"},
                count=1,
                block=TAKE_BLOCK_MS,
            )
        if read.cancelled_caught:
            # An entry Redis gave us over the silent connection is a lease nobody
            # refreshes: after lease_timeout it is claimed (by us too), not lost.
            log.warning("no answer from Redis to a blocking take; taking again")
            return None
        for entries in (taken or {}).values():
            for entry in entries:
                return await self._adopt(text(entry.identifier), entry.field_values, claimed=False)
        return None

    async def _adopt(self, entry: str, fields: object, *, claimed: bool) -> TaskActor | None:
        task_id = fields[b"task"].decode()  # type: ignore[index]
        if claimed and self._held.get(task_id) == entry:
            # Our own lease ran out (we were slower than lease_timeout, or Redis was
            # away): the claim renewed it. Acknowledging it would drop the task's lease.
            return None
        # A claimed entry's taker may have died between reading it and this ZREM: the
        # task would wait in line for ever (counted, ahead of every other). Ours now.
        if not await self.store.take_waiting(task_id) and not claimed:
            await self._done(entry)  # cancelled while it waited
            return None
        shared = await self.store.load(task_id)
        latest = await self.store.latest(task_id)
        if shared is None or latest is None or shared.finished or latest.terminal:
            await self._done(entry)  # expired, or ended before its worker acknowledged it
            return None
        if not claimed and self._runs_nowhere_here(shared):
            # Another worker's backends may have what this workflow needs: back in line,
            # unless it was cancelled meanwhile (then ours: our actor ends it at once).
            created_at = shared.record.created_at
            if await self.store.requeue(self.daemon_id, entry, task_id, created_at):
                self.bounced += 1
                self._count_bounce(task_id)
                return None
        await self.store.forget_wait(task_id)  # ours now: its wait in the queue is over
        # Asked before the actor exists, and told to it before it first runs (no
        # await in between): a fresh actor submits within a few scheduler steps,
        # sooner than Redis would answer.
        cancel_requested = await self.store.cancel_requested(task_id)
        if self.registry.get(task_id) is not None:
            await self._done(entry)
            return None
        actor = self._actor_for(shared, latest.version, claimed=claimed)
        self._bounces.pop(task_id, None)
        self._held[task_id] = entry
        self.mirror.adopt(task_id, latest.version, entry)
        self.mirror.changed(actor)  # the record names us as the holder now
        if cancel_requested:
            actor.cancel()
        if claimed:
            self.claimed += 1
            log.info(
                "claimed task from %s (lease expired)",
                shared.holder or "a worker",
                extra={"task_id": task_id, "backend": shared.backend_url or ""},
            )
        else:
            self.taken += 1
        return actor

    def _count_bounce(self, task_id: str) -> None:
        self._bounces[task_id] = self._bounces.pop(task_id, 0) + 1  # newest last
        self._last_bounced = task_id
        if len(self._bounces) > BOUNCES_REMEMBERED:
            del self._bounces[next(iter(self._bounces))]

    def _runs_nowhere_here(self, shared: SharedRecord) -> bool:
        """No backend of ours that takes work now can run it: taken, it would only wait
        here (and go back to the queue at once, see _return_loop)."""
        return not self.dispatcher.runnable_now(needs_of(shared.record.spec["graph"]))

    def _actor_for(self, shared: SharedRecord, version: int, *, claimed: bool) -> TaskActor:
        record = shared.record
        spec = task.spec_from_json(record.spec)
        phase = task.Phase(record.phase)
        if not claimed or not record.submitted:
            # Not yet submitted anywhere: a fresh start, through our dispatcher.
            state = replace(
                task.new_task(spec, record.created_at),
                version=version,
                cancel_requested=False,
            )
            return self.registry.adopt(state)
        state = task.resumed_task(
            spec,
            phase=phase,
            version=version,
            submitted=record.submitted,
            created_at=record.created_at,
        )
        # Ours when we reach the same ComfyUI (re-attach, reconcile through /history);
        # else a name no backend has: the task resubmits (or ends `lost`).
        url = shared.backend_url
        name = url if self.pool.get(url) is not None else f"{GONE_BACKEND}{url}"
        return self.registry.adopt(state, resumed=True, backend_name=name)

    # -- tasks our backends cannot take now go back to the queue

    def _stranded(self) -> list[TaskActor]:
        """Held tasks waiting in our dispatcher that none of our backends can take now
        (none connected, or the connected ones lack what the task needs)."""
        stranded = []
        for ticket in self.dispatcher.tickets():
            actor = self.registry.get(ticket.task_id)
            if (
                actor is not None
                and ticket.task_id in self._held
                and not actor.is_done()
                and not actor.moved
                and not self.dispatcher.runnable_now(ticket.needs)
            ):
                stranded.append(actor)
        return stranded

    async def _return_loop(self) -> None:
        signals = (self.pool.changed, self.dispatcher.queued)
        while True:
            seen = [(signal, signal.count) for signal in signals]
            stranded = self._stranded()
            for actor in stranded:
                await self._return(actor)
            if not stranded:
                await _fired_since(seen)

    async def _return(self, actor: TaskActor) -> None:
        """Stop our copy, let the mirror write what it showed, then requeue the task
        (only while its entry is still ours: a claimer's lease wins)."""
        task_id = actor.task_id
        actor.stop()
        while self.registry.get(task_id) is actor:
            # Until the registry forgot it: a retake would look like a duplicate.
            await self.registry.changed.wait()
        await self.mirror.release(task_id)
        shared = SharedRecord(actor.record())  # no holder, no backend: it waits anew
        while (entry := self._held.get(task_id)) is not None:
            try:
                returned = await self.store.hand_back(self.daemon_id, entry, shared)
            except RedisError as exc:
                log.warning("cannot give task %s back to the queue (retrying): %s", task_id, exc)
                await trio.sleep(RETRY_DELAY)
                continue
            if self._held.get(task_id) == entry:
                del self._held[task_id]
            if returned:
                self.returned += 1
                log.info(
                    "gave the task back to the shared queue: no backend of ours can take it",
                    extra={"task_id": task_id},
                )
            if returned == CANCEL_ASKED:
                await self._end_cancelled(task_id)
            return

    async def _end_cancelled(self, task_id: str) -> None:
        """A front's cancel found the task out of line while we gave it back (it set the
        key and told our copy, stopped already): end it in line now. A worker that
        takes it first reads the key too, and Redis lets only one of them end it."""
        try:
            ended = await cancel_in_line(self.store, task_id, time.time())
        except RedisError as exc:
            # Then the wait limit ends it, or a worker that takes it reads the key.
            log.warning("cannot end the cancelled task %s: %s", task_id, exc)
            return
        if ended is not None:
            self.on_waiting_end(ended.state)

    # -- leases

    async def _lease_loop(self) -> None:
        interval = self.lease_timeout / 4
        while True:
            await trio.sleep(interval)
            if self._held:
                await self._refresh_leases()
                await self._read_missed_cancels()

    async def _capabilities_loop(self) -> None:
        """What our backends can run, and which take work now: published as soon as it
        changes (a front counts how long a task waits with no worker able to run it),
        and again every lease_timeout/4 so that it outlives no dead worker for long."""
        interval = self.lease_timeout / 4
        published = b""
        refresh_at = -math.inf
        while True:
            seen = [(self.pool.changed, self.pool.changed.count)]
            if self.pool.capabilities:
                ready = [b.name for b in self.pool.backends if self.pool.takes_work(b)]
                body = capabilities_to_json(self.pool.capabilities, ready=ready)
                if body != published or trio.current_time() >= refresh_at:
                    try:
                        ttl = int(self.lease_timeout * 3) + 1
                        await publish(self.store, self.daemon_id, body, ttl=ttl)
                        published = body
                    except RedisError as exc:
                        log.warning("cannot publish what our backends can run: %s", exc)
                        published = b""
                    refresh_at = trio.current_time() + interval
            # Nothing read yet: until something is (a failed SET: retried at refresh_at).
            with trio.move_on_at(refresh_at if self.pool.capabilities else math.inf):
                await _fired_since(seen)

    async def _refresh_leases(self) -> None:
        entries = dict(self._held)
        try:
            mine = await self.store.redis.eval(
                REFRESH_LEASES,
                keys=[self.store.queue_key],
                args=[self.daemon_id, *entries.values()],
            )
        except RedisError as exc:
            log.warning("cannot refresh leases: %s", exc)
            return
        still = {m.decode() if isinstance(m, bytes) else str(m) for m in mine or ()}  # type: ignore[union-attr]
        for task_id, entry in entries.items():
            if entry not in still and self._held.get(task_id) == entry:
                # Another worker claimed it while we were silent: it is theirs.
                del self._held[task_id]
                self.mirror.forget(task_id)
                actor = self.registry.get(task_id)
                # Also a copy that ended meanwhile (its end not written yet, Redis away):
                # not stopped, the mirror would write that end with no lease to check.
                if actor is not None and not actor.moved:
                    log.warning("lost the lease on task %s; stopping our copy", task_id)
                    actor.stop()

    async def _read_missed_cancels(self) -> None:
        """A cancel asked in the moment we took a task, before our record named us as
        its holder, reached no inbox; its key is there all the same. So with every
        lease refresh, read the keys of the tasks we run that are not cancelling."""
        running = [
            task_id
            for task_id in self._held
            if (actor := self.registry.get(task_id)) is not None
            and not actor.is_done()
            and not actor.state.cancel_requested
        ]
        if not running:
            return
        try:
            asked = await self.store.cancels_requested(running)
        except RedisError as exc:
            log.warning("cannot read cancel requests: %s", exc)
            return
        for task_id, cancelled in zip(running, asked, strict=True):
            if cancelled:
                log.info("cancel found by its key", extra={"task_id": task_id})
                self.cancel(task_id)


def bounce_delay(times: int) -> float:
    """The pause after putting the same task back `times` times: none the first time
    (another task may be next), then 1 s, 2 s, 4 s, ... up to BOUNCE_MAX_DELAY."""
    if times < 2:
        return 0.0
    return min(BOUNCE_MAX_DELAY, RETRY_DELAY * (1 << min(times - 2, 16)))


async def _fired_since(seen: list[tuple[Signal, int]]) -> None:
    """Until one of the signals fires, or has fired since it showed that count."""
    async with trio.open_nursery() as nursery:

        async def wait(signal: Signal, count: int) -> None:
            if signal.count == count:
                await signal.wait()
            nursery.cancel_scope.cancel()

        for signal, count in seen:
            nursery.start_soon(wait, signal, count)
