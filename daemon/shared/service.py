"""The shared mode's services for one daemon, composed from its configuration.

    front   serves HTTP: submits to the shared queue, answers any task from Redis
    worker  takes work for its backends, mirrors its tasks to Redis
    both    (default) the two

Every role runs the stream watcher: a front for its SSE readers, a worker for
its inbox (cancels of the tasks it holds).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import coredis
import trio
from coredis.exceptions import RedisError

from daemon.shared.ending import WaitingEnd, cancel_in_line, cancel_waiting
from daemon.shared.idempotency import SharedIdempotencyKeys
from daemon.shared.mirror import TaskMirror
from daemon.shared.positions import QueuePositions
from daemon.shared.store import RUNNING_TTL, ClientAtLimit, ClientLimit, SharedStore
from daemon.shared.wait_limit import WaitLimit, sweep_interval
from daemon.shared.watch import StreamWatcher
from daemon.shared.worker import SharedWorker
from daemon.tasks.broadcast import Snapshot
from protocol import task

if TYPE_CHECKING:
    from daemon.comfy.dispatch import Dispatcher
    from daemon.config import Config
    from daemon.tasks.registry import TaskRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SharedCancel:
    """What a cancel found: `ended` is the phase the task had already ended in
    (nothing to cancel), None when it is being cancelled now."""

    ended: str | None


def new_daemon_id() -> str:
    """Unique per process start: the consumer name of its leases, the key of its inbox."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class SharedService:
    def __init__(
        self,
        config: Config,
        redis: coredis.Redis[bytes],
        daemon_id: str,
        *,
        on_task_end: Callable[[task.TaskState], None] = lambda state: None,
    ) -> None:
        """`on_task_end(state)`: Redis took this daemon's write of a task's end: its own
        actor's (not the end of a copy whose lease another worker claimed meanwhile), or
        one it made while no worker held the task (a cancel, the wait limit, Redis
        forgot it). Counted there, each end is counted once in the service."""
        self.config = config
        self.on_task_end = on_task_end
        self.redis = redis
        self.daemon_id = daemon_id
        self.store = SharedStore(redis, config.redis_prefix, retention=config.task_retention)
        self.idempotency = SharedIdempotencyKeys(redis, config.redis_prefix)
        self.takes_work = config.role != "front"
        self.serves_http = config.role != "worker"
        self.worker: SharedWorker | None = None
        self.mirror = TaskMirror(
            self.store, daemon_id=self.daemon_id, on_finished=self._finished, on_lost=self._lost
        )
        self.watcher = StreamWatcher(self.store, daemon_id=self.daemon_id, on_message=self._message)
        self.positions = QueuePositions(
            self.store,
            self.watcher,
            interval=max(0.05, config.queue_poll_interval),
            on_task_end=on_task_end,
        )
        limit = config.backend_wait_timeout
        self.wait_limit = WaitLimit(
            self.store,
            limit=limit,
            interval=sweep_interval(limit),
            lease_timeout=config.lease_timeout,
            on_task_end=on_task_end,
        )

    def _finished(self, state: task.TaskState) -> None:
        if self.worker is not None:
            self.worker.finished(state.task_id)
        self.on_task_end(state)

    def _lost(self, task_id: str) -> None:
        if self.worker is not None:
            self.worker.lost(task_id)

    def _message(self, fields: dict[str, str]) -> None:
        if fields.get("kind") == "cancel" and self.worker is not None:
            self.worker.cancel(fields.get("task", ""))

    async def run(
        self,
        registry: TaskRegistry,
        dispatcher: Dispatcher,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        while True:  # the queue and its group, before the first POST or take
            try:
                await self.store.ensure_queue()
                break
            except RedisError as exc:
                log.warning("Redis is not reachable yet (%s); retrying", exc)
                await trio.sleep(1.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.mirror.run)
            await nursery.start(self.watcher.run)
            if self.serves_http:
                await nursery.start(self.positions.run)
                await nursery.start(self.wait_limit.run)
            if self.takes_work and dispatcher.pool.backends:
                self.worker = SharedWorker(
                    self.store,
                    self.mirror,
                    daemon_id=self.daemon_id,
                    registry=registry,
                    dispatcher=dispatcher,
                    lease_timeout=self.config.lease_timeout,
                    on_waiting_end=self.on_task_end,
                )
                await nursery.start(self.worker.run)
            log.info(
                "sharing tasks through Redis as %s (role %s)", self.daemon_id, self.config.role
            )
            task_status.started()

    # -- what the routes ask of any task

    async def submit(
        self,
        spec: task.TaskSpec,
        now: float,
        key: tuple[str, bytes] | None = None,
        client: ClientLimit | None = None,
    ) -> str | None:
        """A new task into the shared queue (version 1: stream ids start at 1-0). With
        `key` (an Idempotency-Key and the request's body): the task that key already
        made, and nothing is queued (RequestError 422 when made for another body).
        With `client`: ClientAtLimit when that client has its limit of unfinished
        tasks, counted over every front."""
        state = replace(task.new_task(spec, now), version=1)
        claim = None if key is None else self.idempotency.claim(*key, spec.task_id)
        message = task.render(state, now)
        try:
            claimed = await self.store.submit(state, message, claim, client)
        except ClientAtLimit:
            assert client is not None
            # Tasks leave a client's set here, lazily: whichever daemon ended a task,
            # the set is only read when it looks full.
            if not await self.store.prune_client(client.client):
                raise
            claimed = await self.store.submit(state, message, claim, client)
        if claimed is None or key is None:
            return None
        return self.idempotency.existing(claimed, key[1])

    async def latest(self, task_id: str) -> Snapshot | None:
        return await self.store.latest(task_id)

    async def outcome(self, task_id: str) -> dict[str, Any] | None:
        """How a task an Idempotency-Key made ended, kept as long as the key (None: not
        known: it never ended, or its key was claimed by a version that kept none)."""
        return await self.store.outcome(task_id)

    async def cancel(self, task_id: str, now: float) -> SharedCancel | None:
        """Cancel a task held anywhere; None when unknown."""
        shared = await self.store.load(task_id)
        latest = await self.store.latest(task_id)
        if shared is None:
            # A waiting task Redis forgot has only the `lost` end a front wrote.
            if latest is not None and latest.terminal:
                return SharedCancel(ended=str(latest.payload["status"]))
            return None
        if latest is None:
            return SharedCancel(ended=None)
        if shared.finished:
            return SharedCancel(ended=shared.record.phase)
        if latest.terminal:
            # Its worker appends the end before it saves the record: the stream says first.
            return SharedCancel(ended=str(latest.payload["status"]))
        # Not yet taken by any worker? Then end it here, in one step that only
        # writes while it still waits: a worker's take (its ZREM) and a claimer
        # that finds the task not ended (its taker died before that ZREM) exclude it.
        found = await cancel_waiting(self.store, shared, latest, now)
        if found is not None:
            return self._cancel_found(found)
        # The key lives as long as an unfinished record: a claimer may take the task
        # only when a worker has room, however long after its holder died.
        await self.store.request_cancel(task_id, shared.holder, ttl=RUNNING_TTL)
        # A worker that took the task after we read its record may have named
        # itself since: read the holder again, now that the key is set, and tell
        # that one too. (One that names itself later still finds the key: the
        # write that names it reads the key, and so does every lease refresh.)
        again = await self.store.load(task_id)
        holder = again.holder if again is not None else None
        if holder is not None and holder != shared.holder:
            await self.store.send(holder, {"kind": "cancel", "task": task_id})
        # No holder: its worker gave it back to the queue (its backends went away) after
        # our first look and before it could see the key, so end it in line now. (A
        # worker giving it back after the key was set ends it itself.)
        elif holder is None and (ended := await cancel_in_line(self.store, task_id, now)):
            self.on_task_end(ended.state)
        return SharedCancel(ended=None)

    def _cancel_found(self, found: WaitingEnd | Snapshot) -> SharedCancel:
        if isinstance(found, WaitingEnd):
            self.on_task_end(found.state)  # it ended here: no worker's metrics count it
            return SharedCancel(ended=None)
        return SharedCancel(ended=str(found.payload["status"]))  # it ended meanwhile

    async def ready(self) -> bool:
        try:
            await self.redis.ping()
        except RedisError:
            return False
        return True
