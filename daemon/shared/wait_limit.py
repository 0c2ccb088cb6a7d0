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

An orphan is in the same situation: a task a worker took whose lease expired (the
worker was killed, or stopped with SIGTERM, which marks its leases expired at once)
while no live worker claims it. A live worker with room claims such an entry
(XAUTOCLAIM) before it reads a new one, so an orphan that some live worker could run
is queueing for a busy worker; one that none can run gets the same stamp, listed the
same way, and ends `backend_unavailable` at the same limit. A sweep finds orphans with
one XPENDING ... IDLE `lease_timeout` (the entries whose lease is fresh cost nothing),
reads each entry's task id once, and leaves out a task still in the waiting set (its
taker died before it took it out: the wait there counts). MARK writes an orphan's stamp
only while its entry is pending past the lease, and END_ORPHAN ends it only while it
still is and the stamp is `limit` old, acknowledging and deleting the entry in the same
step: a worker's claim (which resets the entry's idle time, and then drops the stamp)
before the end makes it do nothing, and no XAUTOCLAIM finds the entry after it. The end
is written as the waiting end is (record, stream entry, outcome beside its
Idempotency-Key), so the task's viewers on every front get it, but it follows the state
its worker last wrote in the record (started, nodes done, overall progress), not a
fresh one: it shows how far the task got. The preview of the attempt its worker left
goes. Its prompt stays on that worker's ComfyUI: no front has a ComfyUI, and a live
worker connected to that one would have claimed the task and followed the prompt.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Final

import trio
from coredis.exceptions import RedisError, StreamConsumerGroupError

from daemon.comfy.capabilities import Capabilities, Needs, needs_of
from daemon.shared.capabilities import ready_from_json
from daemon.shared.ending import (
    VERSION_RETRIES,
    WaitingEnd,
    ended_after_its_worker,
    ended_while_waiting,
)
from daemon.shared.store import (
    END_WAITING,
    GROUP,
    STREAM_LENGTH,
    WRITE_END,
    SharedRecord,
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

# KEYS[1] the waiting set, KEYS[2] the stamped set, KEYS[3] the queue, then one stamp
# per task; ARGV[1] the stamp's TTL, ARGV[2] the limit, ARGV[3] the lease in ms, then
# per task its id, what the sweep saw, and its queue entry ('' for a task in the
# waiting set; else an orphan: it waits while that entry is pending past the lease).
# Returns the ids whose stamp is `limit` old. A stamp and its id in the set come and
# go together; a stamp of a task not waiting stays (a worker putting it back in line
# holds it out of the waiting set meanwhile): only an expired one's id goes.
MARK: Final = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
local due = {}
for i = 4, #KEYS do
  local id = ARGV[3 * i - 8]
  local seen = ARGV[3 * i - 7]
  local entry = ARGV[3 * i - 6]
  local waits
  if entry == '' then
    waits = redis.call('ZSCORE', KEYS[1], id)
  else
    waits = redis.call('XPENDING', KEYS[3], 'workers', 'IDLE', ARGV[3], entry, entry, 1)[1]
  end
  if seen == 'runnable' then
    redis.call('DEL', KEYS[i])
    redis.call('SREM', KEYS[2], id)
  elseif seen == 'gone' then
    if not waits and redis.call('EXISTS', KEYS[i]) == 0 then
      redis.call('SREM', KEYS[2], id)
    end
  elseif waits then
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

# Goes on only while the task's stamp (KEYS[4]) is `limit` old (ARGV[9], by Redis'
# clock); else the script answers 0.
STAMP_DUE: Final = """
local since = redis.call('GET', KEYS[4])
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
if not since or t - tonumber(since) < tonumber(ARGV[9]) then return 0 end
"""

# END_WAITING (a waiting task's end, in one step; the end kept beside its
# Idempotency-Key too), only while the task's stamp is `limit` old. 1: ended; 0: not
# waiting, or not unrunnable that long (any more); -1: the stream moved on (a queue
# position): build the end again.
END: Final = STAMP_DUE + END_WAITING

# The end of an orphan (KEYS: queue, events, record, stamp, stamped set, outcome,
# waiting set, preview; ARGV: task id, the stream's newest entry id, the end's entry
# id, event, payload, MAXLEN, record JSON, TTL of both, the limit, the queue entry,
# the lease in ms), in one step, only while that entry is still pending past the
# lease (a worker's claim resets its idle time: then nothing) and the stamp is
# `limit` old (Redis' clock). The entry is acknowledged and deleted in the same step:
# no XAUTOCLAIM finds it afterwards. 1: ended; 0: claimed (or acknowledged), or not
# unrunnable that long (any more); -1: the stream moved on: build the end again.
END_ORPHAN: Final = (
    """
local pending = redis.call('XPENDING', KEYS[1], 'workers', 'IDLE', ARGV[11], ARGV[10], ARGV[10], 1)
if not pending[1] then return 0 end
"""
    + STAMP_DUE
    + WRITE_END
    + """
redis.call('ZREM', KEYS[7], ARGV[1])
redis.call('DEL', KEYS[8])
redis.call('XACK', KEYS[1], 'workers', ARGV[10])
redis.call('XDEL', KEYS[1], ARGV[10])
return 1
"""
)


# An orphan that has ended already (or whose record went): its entry acknowledged and
# deleted and its stamp gone, only while the entry is still pending past the lease
# (KEYS: queue, stamp, stamped set; ARGV: task id, the entry, the lease in ms).
DROP_ORPHAN: Final = """
local pending = redis.call('XPENDING', KEYS[1], 'workers', 'IDLE', ARGV[3], ARGV[2], ARGV[2], 1)
if not pending[1] then return 0 end
redis.call('XACK', KEYS[1], 'workers', ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""


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
        lease_timeout: float,
        on_task_end: Callable[[task.TaskState], None] = lambda state: None,
    ) -> None:
        self.store = store
        self.on_task_end = on_task_end  # a task this front ended (its metrics)
        self.limit = limit
        self.interval = interval
        self.lease_ms = int(lease_timeout * 1000)
        self._needs: dict[str, Needs] = {}  # task id -> what it needs (its spec's graph)
        self._entries: dict[str, str] = {}  # queue entry id -> its task id (never changes)

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
        orphans = await self.orphans(set(waiting))
        candidates = [*waiting, *orphans]
        self._needs = {t: self._needs[t] for t in candidates if t in self._needs}
        reasons: dict[str, str | None] = {}
        if candidates:
            workers = await published(store)
            ready = by_backend(workers, ready_from_json)
            if ready:
                await self._read_needs([t for t in candidates if t not in self._needs])
            reasons = {t: self._why_unrunnable(t, len(workers), ready) for t in candidates}
        visits = [*self._to_visit(reasons, stamped)]
        for start in range(0, len(visits), BATCH):
            batch = visits[start : start + BATCH]
            args: list[str | int | float] = [
                int(self.limit) + STAMP_SLACK,
                self.limit,
                self.lease_ms,
            ]
            for task_id, seen in batch:
                args += [task_id, seen, orphans.get(task_id, "")]
            due = await store.redis.eval(
                MARK,
                keys=[
                    store.waiting_key,
                    store.stamped_key,
                    store.queue_key,
                    *[store.unrunnable_key(t) for t, _ in batch],
                ],
                args=args,
            )
            for task_id in map(text, due or ()):  # type: ignore[arg-type]
                why = reasons.get(task_id) or "no worker can run it"
                if task_id in orphans:
                    await self.end_orphan(task_id, orphans[task_id], why)
                else:
                    await self._end(task_id, why)

    async def orphans(self, waiting: set[str]) -> dict[str, str]:
        """The tasks whose queue entry is pending past the lease (its worker died or
        stopped, and no live worker claimed it yet): task id -> entry id. One XPENDING
        with IDLE: the entries whose lease is fresh cost nothing; an entry's task id is
        read once (XRANGE) and remembered. A task in the waiting set is not one (its
        taker died before taking it out of the set): the wait there counts for it."""
        store = self.store
        try:
            pending = await store.redis.xpending(
                store.queue_key, GROUP, "-", "+", BATCH, idle=self.lease_ms
            )
        except StreamConsumerGroupError:
            return {}  # Redis lost the queue: nothing is pending (a take makes it again)
        entries = [text(p.identifier) for p in pending]  # type: ignore[union-attr]
        self._entries = {e: self._entries[e] for e in entries if e in self._entries}
        orphans: dict[str, str] = {}
        for entry in entries:
            if entry not in self._entries:
                found = await store.redis.xrange(store.queue_key, entry, entry)
                if not found:
                    continue  # deleted without its acknowledgement: no task to end
                self._entries[entry] = text(found[0].field_values[b"task"])
            task_id = self._entries[entry]
            if task_id not in waiting:
                orphans.setdefault(task_id, entry)
        return orphans

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
        details = f"waited {self.limit:g} s in the service's queue: {why}"
        await self._write_end(
            task_id,
            END,
            [store.waiting_key, store.events_key(task_id)],
            [],
            [],
            details,
            ended_while_waiting,
        )

    async def end_orphan(self, task_id: str, entry: str, why: str) -> bool:
        """End an orphan (a task whose lease expired with no live worker to claim it)
        whose stamp is `limit` old, its queue entry acknowledged in the same step
        (END_ORPHAN); True when this call ended it. Nothing when a worker claimed the
        entry meanwhile, or it is no longer idle past the lease."""
        store = self.store
        details = f"its worker left it, and for {self.limit:g} s no live worker took it: {why}"
        done = await self._write_end(
            task_id,
            END_ORPHAN,
            [store.queue_key, store.events_key(task_id)],
            [store.waiting_key, store.preview_key(task_id)],
            [entry, self.lease_ms],
            details,
            ended_after_its_worker,
        )
        if done is None:
            # Ended (its worker died before it acknowledged the entry) or forgotten:
            # what a worker claiming it would do, so that no sweep comes back to it.
            await store.redis.eval(
                DROP_ORPHAN,
                keys=[store.queue_key, store.unrunnable_key(task_id), store.stamped_key],
                args=[task_id, entry, self.lease_ms],
            )
        return bool(done)

    async def _write_end(
        self,
        task_id: str,
        script: str,
        head: list[str],
        tail: list[str],
        extra: list[str | int],
        details: str,
        build: Callable[[SharedRecord, int, list[task.TaskEvent], float], WaitingEnd],
    ) -> bool | None:
        """Run an end script (END or END_ORPHAN: keys `head`, the task's record, stamp,
        the stamped set, its outcome, then `tail`; args the end `build` makes, then
        `extra`) until the stream did not move on meanwhile. True when it ended the
        task; None when there is nothing to end (it has ended, or its record or stream
        is gone)."""
        store = self.store
        for _ in range(VERSION_RETRIES):
            shared = await store.load(task_id)
            latest = await store.latest(task_id)
            if shared is None or latest is None or shared.finished or latest.terminal:
                return None
            failed = task.Failed("backend_unavailable", MESSAGE, details)
            record, message, state = build(shared, latest.version, [failed], time.time())
            done = await store.redis.eval(
                script,
                keys=[
                    *head,
                    store.task_key(task_id),
                    store.unrunnable_key(task_id),
                    store.stamped_key,
                    store.outcome_key(task_id),
                    *tail,
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
                    *extra,
                ],
            )
            if done != -1:
                if done == 1:
                    self.on_task_end(state)
                    log.warning(
                        "ended backend_unavailable: %s", details, extra={"task_id": task_id}
                    )
                return done == 1
        return False
