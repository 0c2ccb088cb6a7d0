"""One blocking XREAD per daemon over every task stream its clients watch.

However many SSE clients of this daemon watch a task, Redis sees one reader
(this loop) for it: each new entry is published to a local `Broadcaster`,
and the existing SSE code fans it out. The same read also takes this daemon's
inbox (cancels for tasks it runs, and the wake-up sent when a new stream
joins the set, so the blocked read restarts with it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

import trio
from coredis.exceptions import RedisError

from daemon.shared.store import (
    SILENT_GRACE,
    STREAM_LENGTH,
    SharedStore,
    entry_id,
    snapshot_from_entry,
    text,
)
from daemon.tasks.broadcast import Broadcaster, Snapshot

log = logging.getLogger(__name__)

BLOCK_MS: Final = 5000
RETRY_INITIAL: Final = 0.1
RETRY_MAX: Final = 5.0


@dataclass
class _Watch:
    broadcaster: Broadcaster = field(default_factory=Broadcaster)
    watchers: int = 0


class StreamWatcher:
    def __init__(
        self,
        store: SharedStore,
        *,
        daemon_id: str,
        on_message: Callable[[dict[str, str]], None],
    ) -> None:
        self.store = store
        self.daemon_id = daemon_id
        self.on_message = on_message
        self._watched: dict[str, _Watch] = {}
        self._changed = trio.Event()
        self.reads = 0

    def snapshots(self) -> list[tuple[str, Snapshot]]:
        """The newest snapshot of every task this daemon reads now."""
        return [
            (task_id, latest)
            for task_id, watch in self._watched.items()
            if (latest := watch.broadcaster.latest) is not None
        ]

    def current(self, task_id: str) -> Snapshot | None:
        """The newest snapshot of a task this daemon already reads (None: not watched)."""
        watch = self._watched.get(task_id)
        return watch.broadcaster.latest if watch is not None else None

    @asynccontextmanager
    async def watching(self, task_id: str, first: Snapshot) -> AsyncIterator[Broadcaster]:
        """A local broadcaster of the task's stream, while the caller needs it."""
        watch = self._watched.get(task_id)
        if watch is None:
            watch = self._watched[task_id] = _Watch()
            watch.broadcaster.publish(first)
            if not first.terminal:
                await self._restart_read()
        else:
            self._offer(watch.broadcaster, first)
        watch.watchers += 1
        try:
            yield watch.broadcaster
        finally:
            watch.watchers -= 1
            if watch.watchers == 0 and self._watched.get(task_id) is watch:
                del self._watched[task_id]

    async def _restart_read(self) -> None:
        self._changed.set()
        try:
            await self.store.send(self.daemon_id, {"kind": "wake"})
        except RedisError as exc:
            log.warning("cannot wake the stream reader: %s", exc)

    @staticmethod
    def _offer(broadcaster: Broadcaster, snapshot: Snapshot) -> None:
        latest = broadcaster.latest
        if latest is None or (not latest.terminal and snapshot.version > latest.version):
            broadcaster.publish(snapshot)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        inbox = self.store.inbox_key(self.daemon_id)
        inbox_last = "0-0"  # a daemon's id is new at each start: its inbox starts empty
        task_status.started()
        delay = RETRY_INITIAL
        while True:
            streams: dict[str, str] = {inbox: inbox_last}
            for task_id, watch in self._watched.items():
                latest = watch.broadcaster.latest
                if latest is not None and not latest.terminal:
                    streams[self.store.events_key(task_id)] = entry_id(latest.version)
            self._changed = trio.Event()
            try:
                with trio.move_on_after(BLOCK_MS / 1000 + SILENT_GRACE) as read:
                    reply = await self.store.redis.xread(
                        streams,
                        count=STREAM_LENGTH,
                        block=BLOCK_MS,
                    )
                if read.cancelled_caught:
                    log.warning("no answer from Redis to a blocking read; reading again")
                    continue
            except RedisError as exc:
                log.warning("reading task streams from Redis failed (retrying): %s", exc)
                await trio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)
                continue
            delay = RETRY_INITIAL
            self.reads += 1
            for key, entries in (reply or {}).items():
                if not entries:
                    continue
                name = text(key)
                if name == inbox:
                    inbox_last = text(entries[-1].identifier)
                    for entry in entries:
                        fields = {text(k): text(v) for k, v in entry.field_values.items()}
                        self.on_message(fields)
                    continue
                watching = self._watched.get(self.store.task_of_events_key(name))
                if watching is not None:
                    last = entries[-1]
                    self._offer(
                        watching.broadcaster,
                        snapshot_from_entry(last.identifier, last.field_values),
                    )
