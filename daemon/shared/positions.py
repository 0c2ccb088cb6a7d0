"""Queue positions in the progress stream of tasks no worker holds.

A task waiting in the shared queue (never taken yet, or given back by a
worker whose ComfyUI went away) has no actor anywhere, so the fronts its
viewers watch it on publish its place in line: every `interval`, each front
looks up (ZRANK) the waiting tasks it streams and, when the place changed,
appends the same snapshot with the new `queue` block (and the step text that
goes with it) as the next version. The
append is a Lua script that writes only while the task is still in the
waiting set: a worker takes a task by removing it from that set first and only
then reads the stream's newest version, so a position never races a worker's
first snapshot. Two fronts writing the same version: Redis keeps the first.

A task this front saw waiting, at its newest version, that left the waiting set
with no worker writing since may be one Redis forgot: see forgotten.py.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Final

import trio
from coredis.exceptions import RedisError

from daemon.shared.forgotten import end_if_forgotten
from daemon.shared.store import STREAM_LENGTH, SharedStore, entry_id
from daemon.shared.watch import StreamWatcher
from protocol import progress as pg
from protocol import task
from protocol.task import iso_timestamp

log = logging.getLogger(__name__)

# The phases of a task waiting in the shared queue, and the step each shows
# with its place in line (as a task in a daemon's own queue does).
WAITING_STEPS: Final = {"queued": pg.queued_step, "requeued": pg.requeued_step}

APPEND_WHILE_WAITING: Final = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local added = redis.pcall('XADD', KEYS[2], 'MAXLEN', ARGV[5], ARGV[2], 'e', ARGV[3], 'p', ARGV[4])
if type(added) == 'table' and added.err then return 0 end
return 1
"""


class QueuePositions:
    def __init__(
        self,
        store: SharedStore,
        watcher: StreamWatcher,
        *,
        interval: float,
        on_task_end: Callable[[task.TaskState], None] = lambda state: None,
    ) -> None:
        """`on_task_end(state)`: a task this front ended `lost` (its metrics)."""
        self.store = store
        self.watcher = watcher
        self.interval = interval
        self.on_task_end = on_task_end
        self.published = 0
        self.ended_lost = 0
        # task id -> the newest version at which this front saw it in the waiting set
        self._waiting_at: dict[str, int] = {}
        # task id -> when it was created (its score there): what a lost end still knows
        self._created: dict[str, float] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            try:
                await self.update()
            except RedisError as exc:
                log.warning("cannot publish queue positions: %s", exc)

    async def update(self) -> None:
        watched = self.watcher.snapshots()
        self._waiting_at = {
            task_id: self._waiting_at[task_id]
            for task_id, _ in watched
            if task_id in self._waiting_at
        }
        self._created = {t: self._created[t] for t in self._waiting_at if t in self._created}
        for task_id, snapshot in watched:
            payload = snapshot.payload
            phase = payload.get("phase")
            # Queued: never taken yet; requeued: a worker gave it back (its ComfyUI went).
            if snapshot.terminal or phase not in WAITING_STEPS:
                continue
            ahead = await self.store.ahead_of(task_id)
            if ahead is None:
                # A worker has it (or it ended), or Redis forgot it: a worker that
                # took it wrote a newer version, or keeps its record.
                if snapshot.version <= self._waiting_at.get(task_id, 0):
                    now = time.time()
                    created_at = self._created.get(task_id, now)
                    ended = await end_if_forgotten(
                        self.store, task_id, snapshot.version, created_at, now
                    )
                    if ended is not None:
                        self.ended_lost += 1
                        self.on_task_end(ended)
                        log.warning("Redis lost waiting task %s: it ends lost", task_id)
                continue
            self._waiting_at[task_id] = max(self._waiting_at.get(task_id, 0), snapshot.version)
            if task_id not in self._created:
                score = await self.store.redis.zscore(self.store.waiting_key, task_id)
                if score is not None:
                    self._created[task_id] = float(score)
            queue = {"position": ahead + 1, "ahead": ahead}
            if payload.get("queue") == queue:
                continue
            progress = {**payload["progress"], "currentStep": WAITING_STEPS[phase](ahead)}
            data = {
                **payload,
                "progress": progress,
                "queue": queue,
                "timestamp": iso_timestamp(time.time()),
            }
            written = await self.store.redis.eval(
                APPEND_WHILE_WAITING,
                keys=[self.store.waiting_key, self.store.events_key(task_id)],
                args=[
                    task_id,
                    entry_id(snapshot.version + 1),
                    snapshot.event,
                    json.dumps(data, separators=(",", ":"), ensure_ascii=False),
                    STREAM_LENGTH,
                ],
            )
            if written == 1:
                self.published += 1
                self._waiting_at[task_id] = snapshot.version + 1
