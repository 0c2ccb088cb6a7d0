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
"""

from __future__ import annotations

import json
import logging
import time
from typing import Final

import trio
from coredis.exceptions import RedisError

from daemon.shared.store import STREAM_LENGTH, SharedStore, entry_id
from daemon.shared.watch import StreamWatcher
from protocol import progress as pg
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
    def __init__(self, store: SharedStore, watcher: StreamWatcher, *, interval: float) -> None:
        self.store = store
        self.watcher = watcher
        self.interval = interval
        self.published = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            try:
                await self.update()
            except RedisError as exc:
                log.warning("cannot publish queue positions: %s", exc)

    async def update(self) -> None:
        for task_id, snapshot in self.watcher.snapshots():
            payload = snapshot.payload
            phase = payload.get("phase")
            # Queued: never taken yet; requeued: a worker gave it back (its ComfyUI went).
            if snapshot.terminal or phase not in WAITING_STEPS:
                continue
            ahead = await self.store.ahead_of(task_id)
            if ahead is None:
                continue  # a worker has it (or it ended)
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
            self.published += int(written == 1)
