"""The task registry: every task by id, the limits on them, and the nursery the
actors live in.

A finished task stays readable for `retention` seconds, then the registry
forgets it (404 afterwards).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable

import trio

from daemon.comfy.capabilities import Needs
from daemon.comfy.dispatch import Dispatcher
from daemon.images.previews import PreviewStore
from daemon.images.store import ImageStore
from daemon.signals import Signal
from daemon.tasks.actor import TaskActor, TaskSettings, new_prompt_id
from daemon.tasks.journal import (
    FLUSH_TIMEOUT,
    UNREADABLE_KEPT_FOR,
    UNREADABLE_TABLE,
    Journal,
    JournalUnavailable,
    TaskRecord,
)
from daemon.tasks.restore import restored_task
from protocol import task

log = logging.getLogger(__name__)


def client_at_limit(limit: int) -> str:
    """Why a client's task was refused (429), here and in shared mode."""
    return (
        f"you have {limit} unfinished tasks, the most one client may have; "
        "try again when one has ended"
    )


class TooManyTasks(Exception):
    """The registry is full; the client should retry later (503)."""


class QueueFull(Exception):
    """Too many unfinished tasks, in all or for this client; retry later (429)."""


def new_task_id(now: float) -> str:
    """Milliseconds since the epoch, then 128 random bits, URL-safe."""
    return f"{int(now * 1000):x}-{secrets.token_urlsafe(16)}"


def _ignore(actor: TaskActor) -> None:
    """No one listens (one function for every actor, not a lambda each)."""


class TaskRegistry:
    """All tasks by id; runs each actor in its own nursery slot, then forgets it."""

    def __init__(
        self,
        *,
        dispatcher: Dispatcher,
        images: ImageStore,
        settings: TaskSettings,
        journal: Journal | None = None,
        wall_clock: Callable[[], float] = time.time,
        on_task_end: Callable[[TaskActor], None] | None = None,
        previews: PreviewStore | None = None,
        on_publish: Callable[[TaskActor], None] | None = None,
        until_shared_written: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        """`on_publish(actor)` hears of every actor's change (the shared mirror), and
        `until_shared_written(task_id)` returns once the changes it heard are in Redis;
        `on_task_end(actor)` is called once when a task of this process ends
        (not for tasks restored from the journal already finished)."""
        self.dispatcher = dispatcher
        self.on_task_end = on_task_end
        self.images = images
        self.settings = settings
        self.journal = journal
        self.wall_clock = wall_clock
        self.previews = previews if previews is not None else PreviewStore()
        self.on_publish = on_publish
        self.until_shared_written = until_shared_written
        self._tasks: dict[str, TaskActor] = {}
        self._nursery: trio.Nursery | None = None
        self._stopped = trio.Event()
        # Unfinished tasks -> the client key they count against (None: no client).
        self._unfinished: dict[str, str | None] = {}
        self._unfinished_by_client: dict[str, int] = {}
        self.created = 0
        self.restored = 0
        self.changed = Signal()  # a task was added, changed state or was forgotten
        # Snapshot ids of restored tasks must rise above anything sent before the
        # restart, even when the journal lagged behind the last publish (kill -9):
        # each start is a new epoch, and a run sends fewer than 2**32 snapshots
        # per task.
        self.restored_version_base = (journal.epoch << 32) if journal is not None else 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep(math.inf)
        finally:
            self._nursery = None
            self._stopped.set()

    async def stop(self) -> None:
        """Cancel every actor and wait until they have all ended (their last
        journal records are made by then). Unfinished tasks stay in the journal."""
        if self._nursery is None:
            return
        self._nursery.cancel_scope.cancel()
        await self._stopped.wait()

    def __len__(self) -> int:
        return len(self._tasks)

    def get(self, task_id: str) -> TaskActor | None:
        return self._tasks.get(task_id)

    def actors(self) -> list[TaskActor]:
        return list(self._tasks.values())

    def images_in_use(self) -> set[str]:
        """Images no retention may delete: sources and results of the tasks held."""
        names: set[str] = set()
        for actor in self._tasks.values():
            names.update(actor.source_images)
            names.update(actor.outputs_saved)
            names.update(actor.state.image_files)
        return names

    def _journal_change(self, actor: TaskActor) -> None:
        if self.journal is not None:
            record = actor.record()
            client = self._unfinished.get(actor.task_id)
            if client is not None:
                # So that a restart still counts it against its client.
                record = dataclasses.replace(record, client=client)
            self.journal.record(record)
        self.changed.fire()

    @property
    def unfinished(self) -> int:
        """Tasks waiting or running (what max_queued bounds)."""
        return len(self._unfinished)

    def _settle(self, task_id: str) -> None:
        if task_id not in self._unfinished:
            return
        client = self._unfinished.pop(task_id)
        if client is not None:
            left = self._unfinished_by_client[client] - 1
            if left:
                self._unfinished_by_client[client] = left
            else:
                del self._unfinished_by_client[client]

    def _check_room(self, client: str | None) -> None:
        settings = self.settings
        if len(self._unfinished) >= settings.max_queued:
            raise QueueFull(
                f"{len(self._unfinished)} tasks are waiting or running (the most the daemon "
                "takes); try again later"
            )
        limit = settings.max_queued_per_client
        if client is not None and limit and self._unfinished_by_client.get(client, 0) >= limit:
            raise QueueFull(client_at_limit(limit))

    def _actor_changed(self, actor: TaskActor) -> None:
        if actor.is_done():
            self._settle(actor.task_id)
        self._journal_change(actor)
        if self.on_publish is not None:
            self.on_publish(actor)
        # Actors report only from handle(), which ignores events once the task
        # has ended: the change that ends a task is reported exactly once.
        if actor.is_done() and self.on_task_end is not None:
            self.on_task_end(actor)

    async def _until_stored(self, task_id: str) -> None:
        """Until every change of the task reported so far is in the journal (with
        `until_shared_written`: in Redis). A store that cannot write, or not within
        FLUSH_TIMEOUT, is logged and not waited for: the task goes on."""
        try:
            with trio.move_on_after(FLUSH_TIMEOUT) as waited:
                if self.journal is not None:
                    await self.journal.flush()
                if self.until_shared_written is not None:
                    await self.until_shared_written(task_id)
        except JournalUnavailable as exc:
            log.error("task %s goes on unjournalled: %s", task_id, exc)
            return
        if waited.cancelled_caught:
            log.error("task %s goes on: its change was not stored in %g s", task_id, FLUSH_TIMEOUT)

    def _new_actor(self, state: task.TaskState, **kwargs: object) -> TaskActor:
        return TaskActor(
            state,
            dispatcher=self.dispatcher,
            images=self.images,
            settings=self.settings,
            wall_clock=self.wall_clock,
            on_change=self._actor_changed,
            on_publish=self.on_publish or _ignore,
            previews=self.previews,
            until_stored=(
                self._until_stored
                if self.journal is not None or self.until_shared_written is not None
                else None
            ),
            **kwargs,  # type: ignore[arg-type]
        )

    def create(
        self,
        spec_for: Callable[[str, str, int], task.TaskSpec],
        *,
        client: str | None = None,
        needs: Needs | None = None,
    ) -> TaskActor:
        """Make a task: `spec_for(task_id, prompt_id, uid)` builds its spec.

        `client` is the key a per-client limit counts by (see daemon/api/clients.py);
        `needs`, what its graph needs from a backend, when the caller knows already.
        Raises TooManyTasks or QueueFull when there is no room.
        """
        if self._nursery is None:
            raise RuntimeError("the registry is not running")
        if len(self._tasks) >= self.settings.max_tasks:
            raise TooManyTasks(f"{len(self._tasks)} tasks are being tracked; try again later")
        self._check_room(client)
        now = self.wall_clock()
        task_id = new_task_id(now)
        prompt_id = new_prompt_id()
        spec = spec_for(task_id, prompt_id, int(now * 1000))
        actor = self._new_actor(task.new_task(spec, now), fresh=True, needs=needs)
        self._start(actor, self.settings.retention, client=client)
        return actor

    def adopt(
        self, state: task.TaskState, *, resumed: bool = False, backend_name: str | None = None
    ) -> TaskActor:
        """Run a task another daemon created (taken from the shared queue, or claimed
        after its worker's lease expired); `state.version` is the stream's newest."""
        if self._nursery is None:
            raise RuntimeError("the registry is not running")
        actor = self._new_actor(state, resumed=resumed, backend_name=backend_name)
        self._start(actor, self.settings.retention)
        return actor

    def restore(self, records: list[TaskRecord]) -> None:
        """Bring back the journal's tasks: finished ones until their time is up,
        unfinished ones re-attached to their ComfyUI prompts."""
        if self._nursery is None:
            raise RuntimeError("the registry is not running")
        now = self.wall_clock()
        for record in records:
            try:
                actor = self._restored_actor(record, now)
            except (KeyError, ValueError, TypeError) as exc:
                where = ""
                if self.journal is not None:
                    # Once: not read again at the next start, kept for inspection.
                    self.journal.set_aside(record.task_id, f"cannot restore: {exc}")
                    where = f"; its journal row moves to the table {UNREADABLE_TABLE} of"
                    where += f" {self.journal.path} (kept {UNREADABLE_KEPT_FOR // 86400:.0f} days)"
                log.warning(
                    "cannot restore task %s: %s%s",
                    record.task_id,
                    exc,
                    where,
                    extra={"task_id": record.task_id},
                )
                continue
            if actor is None:
                if self.journal is not None:
                    self.journal.forget(record.task_id)
                continue
            retention = self.settings.retention
            if record.finished_at is not None:
                retention = max(0.0, retention - (now - record.finished_at))
            self._start(actor, retention, client=record.client)
            self.restored += 1

    def _restored_actor(self, record: TaskRecord, now: float) -> TaskActor | None:
        backends = self.dispatcher.pool.backends
        restored = restored_task(
            record,
            now,
            retention=self.settings.retention,
            version_base=self.restored_version_base,
            first_backend=backends[0].name if backends else None,
        )
        if restored is None:
            return None
        return self._new_actor(
            restored.state,
            first_message=restored.first_message,
            resumed=restored.resumed,
            backend_name=restored.backend_name,
            outputs=restored.outputs,
        )

    def _start(self, actor: TaskActor, retention: float, *, client: str | None = None) -> None:
        assert self._nursery is not None
        self._tasks[actor.task_id] = actor
        if not actor.is_done():
            self._unfinished[actor.task_id] = client
            if client is not None:
                self._unfinished_by_client[client] = self._unfinished_by_client.get(client, 0) + 1
        self.created += 1
        self._journal_change(actor)
        self._nursery.start_soon(self._run_actor, actor, retention)

    async def _run_actor(self, actor: TaskActor, retention: float) -> None:
        try:
            await actor.run()
        except Exception:
            log.exception("task actor crashed", extra=actor.log_fields)
            # The error message names nothing of the request, so it always
            # encodes; handle() publishes it before anything else can fail.
            try:
                actor.handle(task.Failed("internal", "Internal error in the daemon"))
            except Exception:
                # Not into the registry's nursery: that would stop every task.
                log.exception("could not record the crashed task's end")
        self.previews.drop(actor.task_id)
        if actor.state.phase is task.Phase.ERROR:
            await actor.discard_outputs()  # cancelled or failed while fetching them
        if actor.moved:
            self._tasks.pop(actor.task_id, None)
            self._settle(actor.task_id)
            self.changed.fire()
            return
        if not actor.state.phase.is_terminal:
            return  # cancelled by shutdown: the journal keeps it for the next start
        await trio.sleep(retention)
        self._tasks.pop(actor.task_id, None)
        self.changed.fire()
        if self.journal is not None:
            self.journal.forget(actor.task_id)
