"""Copies this daemon's task actors to Redis: their snapshots and their records.

Actors never await Redis: they mark themselves dirty, and one writer task
sends the newest snapshot and record of each dirty task. Like a slow SSE
reader, the writer skips intermediate progress snapshots when Redis is slower
than the actor (the stream holds latest-snapshot semantics anyway); the
terminal snapshot is the last one any actor publishes, so it is always sent.
While Redis is away the writer keeps the dirty set and retries with backoff.
A stopped actor (another daemon holds its task, or it went back to the queue)
is mirrored no more: only what it marked before it stopped is still written.

A task's snapshot and record are written in one step that checks the lease (the
task's queue entry) is still ours: a worker whose lease another worker claimed
(it was cut off from Redis, or stalled, past `lease_timeout`) writes nothing more
of that task, however its writes and its lease refresh meet in Redis. One
writer per task's stream: the claimer's first write is never refused for a
version the stale copy wrote after the claim. The task's preview goes in that
step too (a stale copy's would be served as the task's; and a viewer that reads
a snapshot announcing a preview finds it); the end deletes it, and so does a
new attempt's first write (the requeued task announces no preview).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio
from coredis.exceptions import RedisError

from daemon.api.preview_route import etag_of
from daemon.shared.store import SharedPreview, SharedRecord, SharedStore, StaleWrite
from daemon.signals import Signal
from protocol import task

if TYPE_CHECKING:
    from daemon.tasks.actor import TaskActor

log = logging.getLogger(__name__)

RETRY_INITIAL = 0.1
RETRY_MAX = 5.0


class TaskMirror:
    def __init__(
        self,
        store: SharedStore,
        *,
        daemon_id: str,
        on_finished: Callable[[task.TaskState], None] = lambda state: None,
        on_lost: Callable[[str], None] = lambda task_id: None,
    ) -> None:
        """`on_finished(state)`: the task's end is written; `on_lost(id)`: a write found the
        task's lease another worker's, or its stream past us (our copy stopped; its
        entry is not ours to refresh or acknowledge)."""
        self.store = store
        self.daemon_id = daemon_id
        self.on_finished = on_finished
        self.on_lost = on_lost
        self._dirty: dict[str, tuple[TaskActor, int]] = {}  # task id -> (actor, its mark)
        self._marks = 0
        self._written: dict[str, int] = {}  # task id -> newest version in Redis
        self._leases: dict[str, str] = {}  # task id -> its queue entry (our lease)
        self._previews: dict[str, int] = {}  # task id -> preview version in Redis
        self._wake = trio.Event()
        self._writing: str | None = None  # the task being written right now
        self._wrote = Signal()  # a write (or a failed try) is over
        self.stale = 0

    def adopt(self, task_id: str, version: int, lease: str) -> None:
        """This daemon now runs the task, whose stream already holds `version`, under
        the queue entry `lease`."""
        self._written[task_id] = version
        self._leases[task_id] = lease
        # Redis may hold the last holder's preview: the first write that announces
        # none (a new attempt) deletes it.
        self._previews[task_id] = 0

    def changed(self, actor: TaskActor) -> None:
        """An actor published or changed what its record holds (never awaits)."""
        if actor.moved:
            return  # not ours any more: a later write would race its next holder's
        self._marks += 1
        self._dirty[actor.task_id] = (actor, self._marks)
        self._wake.set()

    async def until_written(self, task_id: str) -> None:
        """Until what the task's actor marked so far is in Redis (or stopped: not ours)."""
        while task_id in self._dirty or self._writing == task_id:
            await self._wrote.wait()

    async def release(self, task_id: str) -> None:
        """Until what the task's (stopped) actor marked is in Redis; then forget the task:
        the next worker to take it writes from the stream's newest version on."""
        await self.until_written(task_id)
        self._written.pop(task_id, None)
        self._leases.pop(task_id, None)
        self._previews.pop(task_id, None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        delay = RETRY_INITIAL
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._dirty:
                task_id, (actor, mark) = next(iter(self._dirty.items()))
                self._writing = task_id
                try:
                    await self._write(actor)
                except RedisError as exc:
                    log.warning("cannot write task %s to Redis (retrying): %s", task_id, exc)
                    await trio.sleep(delay)
                    delay = min(RETRY_MAX, delay * 2)
                    continue
                finally:
                    self._writing = None
                    self._wrote.fire()
                delay = RETRY_INITIAL
                # Marked again while we wrote? Then it stays dirty for another round.
                if self._dirty.get(task_id, (None, 0))[1] == mark:
                    del self._dirty[task_id]

    async def _write(self, actor: TaskActor) -> None:
        if actor.moved and actor.task_id not in self._leases:
            return  # stopped for a lease or a version another daemon has: not ours
        message = actor.last_message
        record = actor.record()
        task_id = actor.task_id
        ended = message.is_terminal
        preview = None if ended else self._new_preview(actor)
        # The end deletes the preview, and so does a new attempt (requeued) until it
        # sends its own: the lost attempt's image is not the task's preview any more.
        drop_preview = ended or (actor.state.preview_version is None and task_id in self._previews)
        # A backend's name is its URL: what a claimer compares with its own.
        finished = task.Phase(record.phase).is_terminal
        holder = None if finished else self.daemon_id
        shared = SharedRecord(record, holder=holder, backend_url=record.backend)
        new = message if message.version > self._written.get(task_id, 0) else None
        lease = self._leases.get(task_id)
        try:
            if lease is None:  # not taken from a queue entry: no lease to check
                # The preview first: a viewer fetches it as soon as a snapshot announces it.
                if drop_preview:
                    await self.store.drop_preview(task_id)
                elif preview is not None:
                    await self.store.save_preview(task_id, preview[1])
                if new is not None:
                    await self.store.append(task_id, new)
                await self.store.save(shared)
            else:
                # The preview in the same step, only while the lease is ours: a stale
                # copy's would be served as the preview of a task another worker runs.
                written = await self.store.write_held(
                    self.daemon_id,
                    lease,
                    shared,
                    new,
                    preview=preview[1] if preview is not None else None,
                    drop_preview=drop_preview,
                )
                if not written.written:
                    self._stop(actor, "its lease is another worker's")
                    self.on_lost(task_id)
                    return
                if written.cancel_asked and not (
                    actor.is_done() or actor.moved or actor.state.cancel_requested
                ):
                    # Asked while we took the task, before this record named us: the
                    # front read no holder of ours, and our take read no key yet.
                    log.info("cancel found by its key", extra={"task_id": task_id})
                    actor.cancel()
        except StaleWrite:
            # Another daemon wrote past us (a claimer, or a front that ended the
            # task): not ours to run, and its entry not ours to keep. Let go, not
            # acknowledged: a claimer takes it after the lease, and acknowledges
            # it when it finds the task ended.
            self._stop(actor, "moved to another daemon")
            self.on_lost(task_id)
            return
        if new is not None:
            self._written[task_id] = new.version
        if preview is not None:
            self._previews[task_id] = preview[0]
        if drop_preview:
            self._previews.pop(task_id, None)
        if finished:
            self._written.pop(task_id, None)
            self._leases.pop(task_id, None)
            self.on_finished(actor.state)

    def _stop(self, actor: TaskActor, why: str) -> None:
        self.stale += 1
        log.warning("task %s %s; stopping our copy", actor.task_id, why)
        self.forget(actor.task_id)
        actor.stop()

    def forget(self, task_id: str) -> None:
        """Another daemon holds the task now: write nothing more of our (stopped) copy."""
        self._written.pop(task_id, None)
        self._leases.pop(task_id, None)
        self._previews.pop(task_id, None)

    def _new_preview(self, actor: TaskActor) -> tuple[int, SharedPreview] | None:
        """The task's newest preview, once a snapshot announced one, if Redis does not
        have it yet (its version, and what every daemon's preview route serves)."""
        task_id = actor.task_id
        preview = actor.previews.get(task_id)
        if actor.state.preview_version is None or preview is None:
            return None
        if self._previews.get(task_id) == preview.version:
            return None
        etag = etag_of(actor.previews.boot, preview.version)
        return preview.version, SharedPreview(preview.media_type, etag, preview.data)
