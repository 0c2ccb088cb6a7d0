"""A task no live worker can run ends `backend_unavailable` after `backend_wait_timeout`,
as a daemon alone ends one that no connected backend can run.

Every `interval` each front looks at the service's waiting set (tasks never taken, or
given back). A task that some live worker's ready backend (connected, read, and
lacking nothing the task needs) could run is queueing as usual: its stamp goes. One
that none can run (no worker published, their ComfyUIs are away, or they lack what
it needs) gets a stamp `{p}:unrunnable:{id}`: Redis' clock when a front first saw it
so, written (SET NX) only while it still waits, in one script for all. Once a stamp
is `limit` old the front ends the task with one script that, only while the task
still waits, the stamp is still that old and the stream's newest version is the one
the end follows, takes it out of the waiting set and writes its end (stream entry,
record, and the outcome kept beside its Idempotency-Key, if one made it). A worker
takes a task by taking it out of that set first, and another front ends it only the
same way: the task either runs or ends, once.

The ids that have a stamp are listed in the set `{p}:unrunnable`: every script that
writes a stamp adds its id, every one that deletes it removes the id, in the same
step. A sweep reads the waiting ids and that set and sends to a script only the
tasks no live worker can run, the stamped ones some worker can run now (their stamp
goes), and the stamped ones no longer waiting; a waiting task that can run and has no
stamp (a backlog queueing for busy workers) costs Redis nothing but its id in the
ZRANGE. A stamp expires long after the limit (nobody swept meanwhile); its id stays
listed until a sweep finds the task runnable (it goes) or not waiting with the stamp
gone (the id goes), or finds it unrunnable still (a new stamp). A stamp of a task no
longer waiting stays until it expires: a worker putting the task back in line holds
it out of the waiting set for a moment.

The stamp goes when a worker adopts the task or gives it back (a new wait starts), or
when some worker could run it; else it expires long after the limit. A worker that
takes the task only to put it back in line (it cannot run it) leaves the stamp, so
its bounces do not keep the task waiting for ever. Fronts and workers restarting
within the limit lose nothing: the stamp and the set are in Redis.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Final

import trio
from coredis.exceptions import RedisError

from daemon.comfy.capabilities import Capabilities, Needs, needs_of
from daemon.shared.capabilities import ready_from_json
from daemon.shared.ending import VERSION_RETRIES, ended_while_waiting
from daemon.shared.store import (
    END_WAITING,
    STREAM_LENGTH,
    SharedStore,
    entry_id,
    payload_json,
    text,
)
from daemon.shared.worker_registry import by_backend, published
from protocol import task

log = logging.getLogger(__name__)

BATCH: Final = 500  # waiting tasks per script call
STAMP_SLACK: Final = 600  # seconds a stamp outlives the limit when nobody refreshes it
MESSAGE: Final = "No ComfyUI that can run this task is available"

# What a sweep saw of a task it sends to MARK.
UNRUNNABLE: Final = "unrunnable"  # waiting, no live worker can run it, its id listed
UNLISTED: Final = "unlisted"  # the same, its id not in the stamped set (yet)
RUNNABLE: Final = "runnable"  # listed, waiting, and some live worker can run it now
GONE: Final = "gone"  # listed, not waiting

# KEYS[1] the waiting set, KEYS[2] the stamped set, then one stamp per task; ARGV[1]
# the stamp's TTL, ARGV[2] the limit, then per task its id and what the sweep saw.
# Returns the ids whose stamp is `limit` old. A stamp and its id in the set come and
# go together; a stamp of a task not waiting stays (a worker putting it back in line
# holds it out of the waiting set meanwhile): only an expired one's id goes.
MARK: Final = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
local due = {}
for i = 3, #KEYS do
  local id = ARGV[2 * i - 3]
  local seen = ARGV[2 * i - 2]
  if seen == 'runnable' then
    redis.call('DEL', KEYS[i])
    redis.call('SREM', KEYS[2], id)
  elseif seen == 'gone' then
    if not redis.call('ZSCORE', KEYS[1], id) and redis.call('EXISTS', KEYS[i]) == 0 then
      redis.call('SREM', KEYS[2], id)
    end
  elseif redis.call('ZSCORE', KEYS[1], id) then
    local since = redis.call('GET', KEYS[i])
    if not since then
      redis.call('SET', KEYS[i], string.format('%.6f', t), 'EX', ARGV[1])
      redis.call('SADD', KEYS[2], id)
    else
      redis.call('EXPIRE', KEYS[i], ARGV[1])
      if seen == 'unlisted' then redis.call('SADD', KEYS[2], id) end
      if t - tonumber(since) >= tonumber(ARGV[2]) then table.insert(due, id) end
    end
  end
end
return due
"""

# END_WAITING (a waiting task's end, in one step; the end kept beside its
# Idempotency-Key too), only while the task's stamp is `limit` old (ARGV[9], by
# Redis' clock). 1: ended; 0: not waiting, or not unrunnable that long (any more);
# -1: the stream moved on (a queue position): build the end again.
END: Final = (
    """
local since = redis.call('GET', KEYS[4])
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
if not since or t - tonumber(since) < tonumber(ARGV[9]) then return 0 end
"""
    + END_WAITING
)


def sweep_interval(limit: float) -> float:
    """How often a front looks: a tenth of the limit, between 50 ms and 1 s."""
    return min(1.0, max(0.05, limit / 10))


class WaitLimit:
    def __init__(
        self,
        store: SharedStore,
        *,
        limit: float,
        interval: float,
        on_task_end: Callable[[task.TaskState], None] = lambda state: None,
    ) -> None:
        self.store = store
        self.on_task_end = on_task_end  # a task this front ended (its metrics)
        self.limit = limit
        self.interval = interval
        self._needs: dict[str, Needs] = {}  # task id -> what it needs (its spec's graph)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            try:
                await self.sweep()
            except RedisError as exc:
                log.warning("cannot check how long waiting tasks waited: %s", exc)

    async def sweep(self) -> None:
        store = self.store
        waiting = [text(m) for m in await store.redis.zrange(store.waiting_key, 0, -1)]
        stamped = {text(m) for m in await store.redis.smembers(store.stamped_key)}
        self._needs = {t: self._needs[t] for t in waiting if t in self._needs}
        reasons: dict[str, str | None] = {}
        if waiting:
            workers = await published(store)
            ready = by_backend(workers, ready_from_json)
            if ready:
                await self._read_needs([t for t in waiting if t not in self._needs])
            reasons = {t: self._why_unrunnable(t, len(workers), ready) for t in waiting}
        visits = [*self._to_visit(reasons, stamped)]
        for start in range(0, len(visits), BATCH):
            batch = visits[start : start + BATCH]
            args: list[str | int | float] = [int(self.limit) + STAMP_SLACK, self.limit]
            for task_id, seen in batch:
                args += [task_id, seen]
            due = await store.redis.eval(
                MARK,
                keys=[
                    store.waiting_key,
                    store.stamped_key,
                    *[store.unrunnable_key(t) for t, _ in batch],
                ],
                args=args,
            )
            for task_id in map(text, due or ()):  # type: ignore[arg-type]
                await self._end(task_id, reasons.get(task_id) or "no worker can run it")

    @staticmethod
    def _to_visit(reasons: dict[str, str | None], stamped: set[str]) -> Iterator[tuple[str, str]]:
        """The tasks MARK must see, with what the sweep saw of each; none of the waiting
        ones that some live worker can run and that have no stamp."""
        for task_id, why in reasons.items():
            if why is not None:
                yield task_id, UNRUNNABLE if task_id in stamped else UNLISTED
            elif task_id in stamped:
                yield task_id, RUNNABLE
        for task_id in stamped:
            if task_id not in reasons:
                yield task_id, GONE

    async def _read_needs(self, task_ids: list[str]) -> None:
        for start in range(0, len(task_ids), BATCH):
            batch = task_ids[start : start + BATCH]
            raws = await self.store.redis.mget([self.store.task_key(t) for t in batch])
            for task_id, raw in zip(batch, raws, strict=True):
                if raw is not None:
                    spec = json.loads(raw)["record"]["spec"]
                    self._needs[task_id] = needs_of(spec["graph"])

    def _why_unrunnable(
        self, task_id: str, workers: int, ready: dict[str, Capabilities]
    ) -> str | None:
        """Why no live worker can run the task now; None when one can (or we cannot tell:
        its record is gone, and a worker that takes it drops it)."""
        if workers == 0:
            return "no worker is running"
        if not ready:
            return "no worker's ComfyUI is connected"
        if (needs := self._needs.get(task_id)) is None:
            return None
        lacking = set()
        for reading in ready.values():
            missing = reading.missing(needs)
            if missing is None:
                return None
            lacking.add(missing)
        return f"every connected ComfyUI lacks {', '.join(sorted(lacking))}"

    async def _end(self, task_id: str, why: str) -> None:
        store = self.store
        for _ in range(VERSION_RETRIES):
            shared = await store.load(task_id)
            latest = await store.latest(task_id)
            if shared is None or latest is None or shared.finished or latest.terminal:
                return
            details = f"waited {self.limit:g} s in the service's queue: {why}"
            failed = task.Failed("backend_unavailable", MESSAGE, details)
            record, message, state = ended_while_waiting(
                shared, latest.version, [failed], time.time()
            )
            done = await store.redis.eval(
                END,
                keys=[
                    store.waiting_key,
                    store.events_key(task_id),
                    store.task_key(task_id),
                    store.unrunnable_key(task_id),
                    store.stamped_key,
                    store.outcome_key(task_id),
                ],
                args=[
                    task_id,
                    entry_id(latest.version),
                    entry_id(message.version),
                    message.event,
                    payload_json(message),
                    STREAM_LENGTH,
                    record.to_json(),
                    int(store.retention) + 1,
                    self.limit,
                ],
            )
            if done != -1:
                if done == 1:
                    self.on_task_end(state)
                    log.warning(
                        "ended backend_unavailable: %s", details, extra={"task_id": task_id}
                    )
                return
