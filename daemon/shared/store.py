"""The Redis layout of the shared service, and the few operations on it.

{p}:task:{id}      JSON: the task's record (spec, phase, backend, holder)
{p}:events:{id}    Stream of the task's snapshots, entry id `<version>-0`, trimmed:
                   SSE ids mean the same on every daemon, and a stale writer's
                   older version is refused by Redis itself
{p}:queue          Stream of new task ids; consumer group `workers`: an entry
                   pending for a consumer is that worker's lease
{p}:waiting        sorted set of task ids not yet taken (positions, counts, and
                   the atomic hand-over between a cancel and a take: ZREM wins once)
{p}:cancel:{id}    a cancel asked while a worker held the task (for a claimer)
{p}:inbox:{daemon} Stream each daemon reads: cancels for its tasks, wake-ups
{p}:image:{name}   an image's bytes, expiring with the image retention (an inpainting
                   source: not before a task queued with it could still be waiting)
{p}:preview:{id}   a running task's newest preview (type, ETag, bytes)
{p}:caps:{daemon}  what a worker's backends can run (expires unless refreshed)
{p}:workers        sorted set of the daemon ids that published caps, scored by when
                   their key expires (Redis' clock; see worker_registry.py)
{p}:unrunnable:{id}  when a front first saw this waiting task (or this orphan: its
                   lease expired, and no live worker claimed it) with no live worker
                   able to run it (Redis' clock; see wait_limit.py)
{p}:unrunnable     set of the ids that have such a stamp: every script that writes
                   or deletes a stamp adds or removes its id in the same step, so a
                   sweep visits the stamped tasks, not every waiting one
{p}:idempotency:{sha256 of the key}  the task an Idempotency-Key made (written with
                   the task, in one step: a key names only a task that was queued)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any, Final

import coredis
from coredis.exceptions import (
    ResponseError,
    StreamConsumerGroupError,
    StreamDuplicateConsumerGroupError,
)
from coredis.response.types import StreamPending

from daemon.tasks.broadcast import Snapshot, encode_snapshot
from daemon.tasks.journal import TaskRecord, state_json_from_message
from daemon.tasks.restore import record_of
from protocol import task

log = logging.getLogger(__name__)

GROUP: Final = "workers"
STREAM_LENGTH: Final = 8  # latest-snapshot semantics: a few recent entries, not a history
RUNNING_TTL: Final = 24 * 3600  # a task nobody ends still goes away eventually
PREVIEW_TTL: Final = 600  # a preview nobody replaces (its worker died) goes soon
SCAN_READ_BATCH: Final = 500  # task records per SCAN step and MGET (task_records)
# Redis answers a blocking read (XREAD/XREADGROUP BLOCK) when its BLOCK time is up;
# no answer this much later means the connection went silent without a reset (a
# network split): nothing is in flight, so TCP would never notice. Cancelled at
# that point, the read's connection is dropped (coredis closes a cancelled
# blocking command's connection) and the next read opens a new one.
SILENT_GRACE: Final = 5.0

# A source image outlives the wait of the task queued with it (KEYS[key]: the image;
# ARGV[flag]: '1' when the task has one; ARGV[ttl]: the seconds a waiting task's record
# lives): its expiry is pushed out to that, never brought nearer; none stays none.
# Else a task waiting longer than `image_retention` (shared mode suggests a short one)
# would end `source_unavailable` when a worker takes it. It replaces the line
# `-- KEEP_SOURCE` of SUBMIT and HAND_BACK.
KEEP_SOURCE: Final = """
if ARGV[{flag}] == '1' then
  local left = redis.call('TTL', KEYS[{key}])
  if left >= 0 and left < tonumber(ARGV[{ttl}]) then
    redis.call('EXPIRE', KEYS[{key}], ARGV[{ttl}])
  end
end
"""

# A task back into the queue, only while its entry is still ours (KEYS: queue, waiting,
# record, unrunnable stamp, stamped set, preview; ARGV: us, entry, task id, created_at,
# record JSON, record TTL). Its wait starts anew: the stamp of an earlier wait goes, and
# the preview its lost attempt showed (a waiting task has none; a front's cancel ends it
# without a worker's write to delete it). KEYS[7], ARGV[7]: its source image (KEEP_SOURCE).
# 2 instead of 1 when its cancel key (KEYS[8]) is set: a front's cancel found it out of
# line, so the worker that gave it back ends it there (ending.cancel_waiting).
CANCEL_ASKED: Final = 2  # what hand_back returns when the task's cancel key is set
HAND_BACK: Final = """
local pending = redis.call('XPENDING', KEYS[1], 'workers', ARGV[2], ARGV[2], 1)
if not (pending[1] and pending[1][2] == ARGV[1]) then return 0 end
redis.call('SET', KEYS[3], ARGV[5], 'EX', ARGV[6])
-- KEEP_SOURCE
redis.call('DEL', KEYS[6])
redis.call('DEL', KEYS[4])
redis.call('SREM', KEYS[5], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
redis.call('XADD', KEYS[1], '*', 'task', ARGV[3])
redis.call('XACK', KEYS[1], 'workers', ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if redis.call('EXISTS', KEYS[8]) == 1 then return 2 end
return 1
""".replace("-- KEEP_SOURCE\n", KEEP_SOURCE.format(key=7, flag=7, ttl=6))

# A task a worker took and cannot run, back in line in one step, only while its entry is
# still ours (KEYS: queue, waiting, cancel key; ARGV: us, entry, task id, created_at): a
# worker dying between the new entry and the old one's XACK would leave two, and two
# workers could run the task (one reading the new entry, one claiming the old). Its
# stamp stays. 2: a cancel was asked while the task was out of line (the front found it
# not waiting), nothing done: the worker keeps it and ends it, else it would wait on.
PUT_BACK: Final = """
local pending = redis.call('XPENDING', KEYS[1], 'workers', ARGV[2], ARGV[2], 1)
if not (pending[1] and pending[1][2] == ARGV[1]) then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then return 2 end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
redis.call('XADD', KEYS[1], '*', 'task', ARGV[3])
redis.call('XACK', KEYS[1], 'workers', ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""

# A worker's write of a task it holds, only while its lease is its own (KEYS: queue,
# events, record, cancel key, preview; ARGV: us, the lease's entry, the snapshot's entry
# id ('': the record only), event, payload, MAXLEN, events TTL, record JSON, record TTL,
# preview ('': unchanged, 'set', 'drop'), its type, ETag, bytes, preview TTL). 0: the
# entry is pending for another worker (it claimed the task: ours is a stale copy),
# nothing written (no preview either: a front would serve it as the task's); 1:
# written; 2: written, and a cancel was asked (a front sets the key, then reads the
# holder: it read a record that did not name us yet, so this is how the cancel reaches
# us). An entry pending for nobody is written to (Redis lost it, see REFRESH_LEASES in
# worker.py), unless the stream's newest entry is an end (ARGV[16]: the progress
# event's name) other than this very snapshot: a front ended the task its worker
# left (wait_limit.py), acknowledging the entry, and that worker, back from a
# partition, would write past the end. An id not past the stream's newest fails the
# XADD before anything is written (StaleWrite), unless that entry is this very
# snapshot: a write retried after its answer was lost (coredis retries a command on a
# new connection) is not taken for another daemon's. The preview goes in the same step
# as the snapshot announcing it, so a viewer reading that snapshot finds it. KEYS[6],
# ARGV[15] ('1': the snapshot is the end): a task made with an Idempotency-Key keeps
# its end beside the key.
WRITE_HELD: Final = """
local pending = redis.call('XPENDING', KEYS[1], 'workers', ARGV[2], ARGV[2], 1)
if pending[1] and pending[1][2] ~= ARGV[1] then return 0 end
if not pending[1] then
  local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if newest[1] and newest[1][2][2] ~= ARGV[16] and newest[1][1] ~= ARGV[3] then return 0 end
end
if ARGV[3] ~= '' then
  local same = redis.call('XRANGE', KEYS[2], ARGV[3], ARGV[3])
  if not (same[1] and same[1][2][4] == ARGV[5]) then
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[6], ARGV[3], 'e', ARGV[4], 'p', ARGV[5])
  end
  redis.call('EXPIRE', KEYS[2], ARGV[7])
end
redis.call('SET', KEYS[3], ARGV[8], 'EX', ARGV[9])
if ARGV[10] == 'set' then
  redis.call('HSET', KEYS[5], 'type', ARGV[11], 'etag', ARGV[12], 'data', ARGV[13])
  redis.call('EXPIRE', KEYS[5], ARGV[14])
elseif ARGV[10] == 'drop' then
  redis.call('DEL', KEYS[5])
end
if ARGV[15] == '1' then redis.call('SET', KEYS[6], ARGV[5], 'XX', 'KEEPTTL') end
if redis.call('EXISTS', KEYS[4]) == 1 then return 2 end
return 1
"""

# The end of a task no worker holds, written (KEYS[2] its events, [3] its record,
# [4] its stamp, [5] the stamped set, [6] its outcome; ARGV as END_WAITING's) unless
# the stream moved on meanwhile (-1: build the end again). Shared by END_WAITING and
# wait_limit.END_ORPHAN, which check first what makes the task theirs to end.
WRITE_END: Final = """
local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if not newest[1] or newest[1][1] ~= ARGV[2] then return -1 end
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[6], ARGV[3], 'e', ARGV[4], 'p', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[8])
redis.call('SET', KEYS[3], ARGV[7], 'EX', ARGV[8])
redis.call('DEL', KEYS[4])
redis.call('SREM', KEYS[5], ARGV[1])
redis.call('SET', KEYS[6], ARGV[5], 'XX', 'KEEPTTL')
"""

# The end of a task no worker took, in one step, only while it waits and the stream's
# newest entry is the one its end follows (KEYS: waiting set, events, record, stamp,
# stamped set; ARGV: task id, that newest entry id, the end's entry id, event, payload,
# MAXLEN, record JSON, TTL of both). 1: ended; 0: not waiting (a worker took it, or
# its taker died and a claimer runs it: never both ended here and run); -1: the stream
# moved on (a queue position): build the end again. KEYS[6]: the task's outcome (kept
# when an Idempotency-Key made it).
END_WAITING: Final = (
    """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
"""
    + WRITE_END
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""
)

# A new task in one step with its Idempotency-Key's claim (KEYS: record, events,
# waiting set, queue, the key's claim (the record again when there is no key); ARGV:
# task id, record JSON, record TTL, its first entry id, event, payload, MAXLEN,
# events TTL, created_at, the claim ('': no key), the claim's TTL). A key already
# claimed: nothing written, that claim returned. The claim is written last: a key
# never names a task that did not reach the queue (a Redis refusing a write midway).
# With a key, the task's outcome (KEYS[7]) is made empty, for its end to fill in:
# the key outlives the task, and a retry after that is told how it ended. KEYS[8],
# ARGV[13]: its source image (KEEP_SOURCE).
SUBMIT: Final = """
if ARGV[10] ~= '' then
  local claimed = redis.call('GET', KEYS[5])
  if claimed then return claimed end
end
local limit = tonumber(ARGV[12])
if limit > 0 and redis.call('ZCARD', KEYS[6]) >= limit then return -1 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[7], ARGV[4], 'e', ARGV[5], 'p', ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[8])
redis.call('ZADD', KEYS[3], ARGV[9], ARGV[1])
-- KEEP_SOURCE
redis.call('XADD', KEYS[4], '*', 'task', ARGV[1])
if ARGV[10] ~= '' then
  redis.call('SET', KEYS[7], '', 'EX', ARGV[11])
  redis.call('SET', KEYS[5], ARGV[10], 'EX', ARGV[11])
end
if limit > 0 then
  redis.call('ZADD', KEYS[6], ARGV[9], ARGV[1])
  redis.call('EXPIRE', KEYS[6], ARGV[3])
end
return false
""".replace("-- KEEP_SOURCE\n", KEEP_SOURCE.format(key=8, flag=13, ttl=3))

# A client's ended and forgotten tasks out of its set (KEYS: the set, then each task's
# events; ARGV: the progress event's name, then the task ids). A task has ended when its
# stream's newest entry is not progress: its end is appended before its record is saved.
PRUNE_CLIENT: Final = """
local pruned = 0
for i = 2, #ARGV do
  local newest = redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', 1)
  if not newest[1] or newest[1][2][2] ~= ARGV[1] then
    pruned = pruned + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return pruned
"""

# A task's wait is over (KEYS: its unrunnable stamp, the stamped set; ARGV: task id).
FORGET_WAIT: Final = """
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""


class ClientAtLimit(Exception):
    """The client already has max_queued_tasks_per_client tasks in its set (429)."""


class StaleWrite(Exception):
    """Redis refused a snapshot older than the stream's newest: another daemon holds the task."""


def payload_json(message: task.TaskMessage) -> str:
    """A stream entry's `p` field: the snapshot's payload, compact."""
    return json.dumps(message.payload, separators=(",", ":"))


def image_key(prefix: str, name: str) -> str:
    """An image's bytes in Redis (daemon.shared.images writes and reads them)."""
    return f"{prefix}:image:{name}"


def entry_id(version: int) -> str:
    return f"{version}-0"


def glob_escaped(literal: str) -> str:
    """`literal` as a Redis MATCH pattern that matches only itself."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in literal)


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def version_of(identifier: bytes | str) -> int:
    return int(text(identifier).split("-", 1)[0])


@dataclass(frozen=True, slots=True)
class ClientLimit:
    """max_queued_tasks_per_client across the service: a client's key, and its limit."""

    client: str
    limit: int


@dataclass(frozen=True, slots=True)
class HeldWrite:
    written: bool  # False: the lease is another worker's, nothing was written
    cancel_asked: bool  # a front asked to cancel the task (its key is there)


@dataclass(frozen=True, slots=True)
class SharedPreview:
    media_type: str
    etag: str  # names the worker's preview store and the version: never reused
    data: bytes


@dataclass(frozen=True, slots=True)
class SharedRecord:
    """A task's record in Redis: the journal's record plus who holds it where."""

    record: TaskRecord
    holder: str | None = None  # the daemon id of the worker running it
    backend_url: str | None = None  # the ComfyUI the current attempt was submitted to

    def to_json(self) -> bytes:
        return json.dumps(
            {
                # (Its client is the journal's: Redis counts a client's tasks itself.)
                "record": {
                    k: v for k, v in dataclasses.asdict(self.record).items() if k != "client"
                },
                "holder": self.holder,
                "backendUrl": self.backend_url,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> SharedRecord:
        data = json.loads(raw)
        fields = dict(data["record"])
        if "message" in fields:
            # Written by a daemon that kept the last message, not the state's fields.
            fields["state"] = state_json_from_message(
                spec=fields["spec"],
                phase=fields["phase"],
                submitted=fields["submitted"],
                version=fields["version"],
                created_at=fields["created_at"],
                finished_at=fields["finished_at"],
                message=fields.pop("message"),
            )
        return cls(TaskRecord(**fields), data.get("holder"), data.get("backendUrl"))

    @property
    def finished(self) -> bool:
        return task.Phase(self.record.phase).is_terminal


def snapshot_from_entry(identifier: bytes | str, fields: Any) -> Snapshot:
    message = task.TaskMessage(
        event=fields[b"e"].decode(),
        version=version_of(identifier),
        payload=json.loads(fields[b"p"]),
    )
    return encode_snapshot(message)


class SharedStore:
    def __init__(self, redis: coredis.Redis[bytes], prefix: str, *, retention: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self.retention = retention

    # -- key names

    def task_key(self, task_id: str) -> str:
        return f"{self.prefix}:task:{task_id}"

    def outcome_key(self, task_id: str) -> str:
        """How a task made with an Idempotency-Key ended: its last payload ('' until then)."""
        return f"{self.prefix}:outcome:{task_id}"

    def client_key(self, client: str) -> str:
        """The set of a client's tasks (daemon.api.clients: its address or token digest)."""
        return f"{self.prefix}:client:{client}"

    def image_key(self, name: str) -> str:
        return image_key(self.prefix, name)

    def events_key(self, task_id: str) -> str:
        return f"{self.prefix}:events:{task_id}"

    def task_of_events_key(self, key: bytes | str) -> str:
        return text(key).removeprefix(f"{self.prefix}:events:")

    @property
    def queue_key(self) -> str:
        return f"{self.prefix}:queue"

    @property
    def waiting_key(self) -> str:
        return f"{self.prefix}:waiting"

    def cancel_key(self, task_id: str) -> str:
        return f"{self.prefix}:cancel:{task_id}"

    def inbox_key(self, daemon_id: str) -> str:
        return f"{self.prefix}:inbox:{daemon_id}"

    def preview_key(self, task_id: str) -> str:
        return f"{self.prefix}:preview:{task_id}"

    def capabilities_key(self, daemon_id: str) -> str:
        return f"{self.prefix}:caps:{daemon_id}"

    def unrunnable_key(self, task_id: str) -> str:
        return f"{self.prefix}:unrunnable:{task_id}"

    @property
    def stamped_key(self) -> str:
        """The set of the task ids that have an `unrunnable_key`."""
        return f"{self.prefix}:unrunnable"

    # -- setup

    async def ensure_queue(self) -> None:
        with contextlib.suppress(StreamDuplicateConsumerGroupError):  # another daemon made it
            await self.redis.xgroup_create(self.queue_key, GROUP, identifier="0", mkstream=True)

    # -- tasks

    async def load(self, task_id: str) -> SharedRecord | None:
        raw = await self.redis.get(self.task_key(task_id))
        return SharedRecord.from_json(raw) if raw is not None else None

    async def task_records(self) -> list[TaskRecord]:
        """Every task record Redis holds that can be read: a SCAN, for the rare start
        that needs them all (a worker with abandoned prompts to check)."""
        pattern = glob_escaped(self.task_key("")) + "*"
        keys = [key async for key in self.redis.scan_iter(match=pattern, count=SCAN_READ_BATCH)]
        records = []
        for start in range(0, len(keys), SCAN_READ_BATCH):
            for raw in await self.redis.mget(keys[start : start + SCAN_READ_BATCH]):
                if raw is None:
                    continue  # (expired since the SCAN)
                try:
                    records.append(SharedRecord.from_json(raw).record)
                except (ValueError, KeyError, TypeError):
                    continue  # unreadable: no worker can take its task either
        return records

    async def latest(self, task_id: str) -> Snapshot | None:
        entries = await self.redis.xrevrange(self.events_key(task_id), count=1)
        if not entries:
            return None
        return snapshot_from_entry(entries[0].identifier, entries[0].field_values)

    async def save(self, shared: SharedRecord) -> None:
        ttl = int(self.retention) + 1 if shared.finished else RUNNING_TTL
        await self.redis.set(self.task_key(shared.record.task_id), shared.to_json(), ex=ttl)

    async def append(self, task_id: str, message: task.TaskMessage) -> None:
        """XADD with the explicit id `<version>-0`; StaleWrite when a newer one (or
        another at this version) is there. This very entry there already is a write
        retried after its answer was lost: done."""
        key = self.events_key(task_id)
        identifier = entry_id(message.version)
        payload = payload_json(message)
        try:
            await self.redis.xadd(
                key,
                {"e": message.event, "p": payload},
                identifier=identifier,
                trim_strategy=coredis.PureToken.MAXLEN,
                threshold=STREAM_LENGTH,
            )
        except ResponseError as exc:
            if "equal or smaller" not in str(exc):
                raise
            there = await self.redis.xrange(key, identifier, identifier)
            if not (there and there[0].field_values.get(b"p") == payload.encode()):
                raise StaleWrite(f"{task_id} version {message.version}") from None
        ttl = int(self.retention) + 1 if message.is_terminal else RUNNING_TTL
        await self.redis.expire(key, ttl)
        if message.is_terminal:  # kept beside its Idempotency-Key, if one made it
            await self.redis.set(
                self.outcome_key(task_id), payload, condition=coredis.PureToken.XX, keepttl=True
            )

    async def outcome(self, task_id: str) -> dict[str, Any] | None:
        """How a task made with an Idempotency-Key ended (None: not known)."""
        raw = await self.redis.get(self.outcome_key(task_id))
        return json.loads(raw) if raw else None

    async def write_held(
        self,
        daemon_id: str,
        lease: str,
        shared: SharedRecord,
        message: task.TaskMessage | None,
        *,
        preview: SharedPreview | None = None,
        drop_preview: bool = False,
    ) -> HeldWrite:
        """A worker's snapshot (None: none new), record and newest preview (None:
        unchanged; `drop_preview`: the task ended, or a new attempt announces none
        yet) of a task it holds, in one step, only while the queue entry `lease` is
        still `daemon_id`'s (else nothing is written: another worker claimed it; or,
        pending for nobody, a front ended the task after its lease), and whether a
        cancel was asked.
        StaleWrite when a newer snapshot is there."""
        task_id = shared.record.task_id
        snapshot: list[str] = ["", "", ""]
        if message is not None:
            snapshot = [entry_id(message.version), message.event, payload_json(message)]
        image: list[str | bytes] = ["", "", "", ""]
        if drop_preview:
            image = ["drop", "", "", ""]
        elif preview is not None:
            image = ["set", preview.media_type, preview.etag, preview.data]
        ended = int(self.retention) + 1
        events_ttl = ended if message is not None and message.is_terminal else RUNNING_TTL
        try:
            done = await self.redis.eval(
                WRITE_HELD,
                keys=[
                    self.queue_key,
                    self.events_key(task_id),
                    self.task_key(task_id),
                    self.cancel_key(task_id),
                    self.preview_key(task_id),
                    self.outcome_key(task_id),
                ],
                args=[
                    daemon_id,
                    lease,
                    *snapshot,
                    STREAM_LENGTH,
                    events_ttl,
                    shared.to_json(),
                    ended if shared.finished else RUNNING_TTL,
                    *image,
                    PREVIEW_TTL,
                    "1" if message is not None and message.is_terminal else "",
                    task.EVENT_PROGRESS,
                ],
            )
        except ResponseError as exc:
            if "equal or smaller" in str(exc):
                raise StaleWrite(f"{task_id} version {message and message.version}") from None
            raise
        return HeldWrite(written=done != 0, cancel_asked=done == 2)

    async def save_preview(self, task_id: str, preview: SharedPreview) -> None:
        key = self.preview_key(task_id)
        fields = {"type": preview.media_type, "etag": preview.etag, "data": preview.data}
        await self.redis.hset(key, fields)  # type: ignore[arg-type]
        await self.redis.expire(key, PREVIEW_TTL)

    async def load_preview(self, task_id: str) -> SharedPreview | None:
        fields = await self.redis.hgetall(self.preview_key(task_id))
        if not fields or b"data" not in fields:
            return None
        return SharedPreview(text(fields[b"type"]), text(fields[b"etag"]), fields[b"data"])

    async def drop_preview(self, task_id: str) -> None:
        await self.redis.delete([self.preview_key(task_id)])

    async def submit(
        self,
        state: task.TaskState,
        message: task.TaskMessage,
        claim: tuple[str, bytes, int] | None = None,
        client: ClientLimit | None = None,
    ) -> bytes | None:
        """A new task: its record, its first snapshot, and its place in the queue, in
        one step with `claim` (an Idempotency-Key's: Redis key, value, TTL) and the
        client's set of tasks. None: done; else the claim that key already had, and
        nothing was written. ClientAtLimit: the client's set is full, nothing written."""
        record = record_of(state, backend=None)
        task_key = self.task_key(state.task_id)
        claimed = await self.redis.eval(
            SUBMIT,
            keys=[
                task_key,
                self.events_key(state.task_id),
                self.waiting_key,
                self.queue_key,
                claim[0] if claim is not None else task_key,
                self.client_key(client.client) if client is not None else task_key,
                self.outcome_key(state.task_id),
                self._source_key(state.spec.source_image, task_key),
            ],
            args=[
                state.task_id,
                SharedRecord(record).to_json(),
                RUNNING_TTL,
                entry_id(message.version),
                message.event,
                payload_json(message),
                STREAM_LENGTH,
                RUNNING_TTL,
                repr(state.created_at),
                claim[1] if claim is not None else b"",
                claim[2] if claim is not None else 0,
                client.limit if client is not None else 0,
                "1" if state.spec.source_image is not None else "",
            ],
        )
        if claimed == -1:
            raise ClientAtLimit
        return claimed if isinstance(claimed, bytes) else None

    async def prune_client(self, client: str) -> int:
        """Drop the ended and forgotten tasks from `client`'s set; how many went. Two
        round trips whatever the limit: a client refused at its limit costs little."""
        key = self.client_key(client)
        task_ids = [text(t) for t in await self.redis.zrange(key, 0, -1)]
        if not task_ids:
            return 0
        pruned = await self.redis.eval(
            PRUNE_CLIENT,
            keys=[key, *(self.events_key(task_id) for task_id in task_ids)],
            args=[task.EVENT_PROGRESS, *task_ids],
        )
        return int(pruned)  # type: ignore[arg-type]

    async def requeue(self, daemon_id: str, entry: str, task_id: str, created_at: float) -> bool:
        """Back into the queue (a worker that cannot run it took it), its entry acknowledged,
        in one step; nothing when the entry is no longer `daemon_id`'s. False (nothing
        done, the entry still ours) when a cancel was asked: the task is to end."""
        done = await self.redis.eval(
            PUT_BACK,
            keys=[self.queue_key, self.waiting_key, self.cancel_key(task_id)],
            args=[daemon_id, entry, task_id, repr(created_at)],
        )
        return done != 2

    async def hand_back(self, daemon_id: str, entry: str, shared: SharedRecord) -> int:
        """Back into the queue from a worker that cannot run it now, in one step: its
        record (no holder), its place in the waiting set, a new queue entry, the old
        one acknowledged. 0 (nothing done) when the entry is no longer `daemon_id`'s;
        1 done; CANCEL_ASKED done, and a cancel was asked (its key is set)."""
        record = shared.record
        source = record.spec.get("sourceImage")
        done = await self.redis.eval(
            HAND_BACK,
            keys=[
                self.queue_key,
                self.waiting_key,
                self.task_key(record.task_id),
                self.unrunnable_key(record.task_id),
                self.stamped_key,
                self.preview_key(record.task_id),
                self._source_key(source, self.task_key(record.task_id)),
                self.cancel_key(record.task_id),
            ],
            args=[
                daemon_id,
                entry,
                record.task_id,
                repr(record.created_at),
                shared.to_json(),
                RUNNING_TTL,
                "1" if source is not None else "",
            ],
        )
        return int(done)  # type: ignore[arg-type]

    def _source_key(self, source: str | None, otherwise: str) -> str:
        """A script's key for a task's source image; `otherwise` (any key of the task,
        left alone) when it has none, so the script names no key it does not touch."""
        return self.image_key(source) if source is not None else otherwise

    async def waiting_count(self) -> int:
        return await self.redis.zcard(self.waiting_key)

    async def ahead_of(self, task_id: str) -> int | None:
        """Tasks before this one in the shared queue (None: not waiting there)."""
        rank = await self.redis.zrank(self.waiting_key, task_id)
        return rank if isinstance(rank, int) else None

    async def unfinished_count(self) -> int:
        """Tasks waiting in the queue or held by a worker, over the whole service."""
        try:
            pending = await self.redis.xpending(self.queue_key, GROUP)
        except StreamConsumerGroupError:
            # Redis lost the queue (restarted without its data, flushed): make it
            # again, or the next task waits in a stream no group reads.
            await self.ensure_queue()
            return await self.waiting_count()
        held = pending.pending if isinstance(pending, StreamPending) else len(pending)
        return await self.waiting_count() + held

    async def take_waiting(self, task_id: str) -> bool:
        """Out of the waiting set; True for exactly one caller (a taker; a front's
        cancel takes it out inside END_WAITING)."""
        return bool(await self.redis.zrem(self.waiting_key, [task_id]))

    async def end_waiting(self, shared: SharedRecord, message: task.TaskMessage, after: int) -> int:
        """End a task no worker took with `message`, following the stream's version
        `after`: 1 ended; 0 not waiting (a worker has it); -1 the stream moved on."""
        task_id = shared.record.task_id
        done = await self.redis.eval(
            END_WAITING,
            keys=[
                self.waiting_key,
                self.events_key(task_id),
                self.task_key(task_id),
                self.unrunnable_key(task_id),
                self.stamped_key,
                self.outcome_key(task_id),
            ],
            args=[
                task_id,
                entry_id(after),
                entry_id(message.version),
                message.event,
                payload_json(message),
                STREAM_LENGTH,
                shared.to_json(),
                int(self.retention) + 1,
            ],
        )
        return int(done)  # type: ignore[arg-type]

    async def forget_wait(self, task_id: str) -> None:
        """A worker adopted the task (or it ended): no wait of it counts any more."""
        await self.redis.eval(
            FORGET_WAIT, keys=[self.unrunnable_key(task_id), self.stamped_key], args=[task_id]
        )

    async def request_cancel(self, task_id: str, holder: str | None, ttl: float) -> None:
        await self.redis.set(self.cancel_key(task_id), b"1", ex=max(1, int(ttl)))
        if holder is not None:
            await self.send(holder, {"kind": "cancel", "task": task_id})

    async def cancel_requested(self, task_id: str) -> bool:
        (asked,) = await self.cancels_requested([task_id])
        return asked

    async def cancels_requested(self, task_ids: list[str]) -> list[bool]:
        """Whether a cancel was asked for each of these tasks, in one round trip."""
        values = await self.redis.mget([self.cancel_key(t) for t in task_ids])
        return [value is not None for value in values]

    async def send(self, daemon_id: str, fields: dict[str, str]) -> None:
        key = self.inbox_key(daemon_id)
        await self.redis.xadd(
            key,
            fields,
            trim_strategy=coredis.PureToken.MAXLEN,
            trim_operator=coredis.PureToken.APPROXIMATELY,
            threshold=1000,
        )
        await self.redis.expire(key, RUNNING_TTL)
