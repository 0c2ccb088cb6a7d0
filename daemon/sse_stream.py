"""One SSE connection reading one task: the current snapshot, then each newer one.

One writer per connection: the heartbeat is written by the same loop that
writes events (a `move_on_after` around the wait), so the heartbeat timer lives
and dies with the connection and two writes never overlap.
"""

from __future__ import annotations

import math

import trio

from daemon.broadcast import Broadcaster
from daemon.http.types import BodyWriter
from protocol.sse import encode_comment, encode_retry

HEARTBEAT = encode_comment("heartbeat")


class StreamHub:
    """Tracks open SSE streams so shutdown can tell each one to come back later."""

    def __init__(self, *, heartbeat_interval: float, retry_ms: int) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.retry_ms = retry_ms
        self.draining = False
        self._scopes: set[trio.CancelScope] = set()
        self.events_sent = 0
        self.heartbeats_sent = 0

    @property
    def open_streams(self) -> int:
        return len(self._scopes)

    def drain(self) -> None:
        """End every stream with a `retry:` hint (SIGTERM); new streams end at once."""
        self.draining = True
        for scope in list(self._scopes):
            scope.cancel()

    async def stream(
        self, broadcaster: Broadcaster, last_event_id: int | None, writer: BodyWriter
    ) -> None:
        """Write the task's snapshots until the terminal one (or until we drain)."""
        latest = broadcaster.latest
        if last_event_id is not None and latest is not None and last_event_id > latest.version:
            # An id from the future (e.g. our journal was lost): start over.
            last_event_id = None
        broadcaster.readers += 1
        try:
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                if self.draining:
                    scope.cancel()
                await self._pump(broadcaster, last_event_id, writer)
            if scope.cancelled_caught and self.draining:
                with trio.move_on_after(1.0):
                    await writer.send(encode_retry(self.retry_ms))
        finally:
            self._scopes.discard(scope)
            broadcaster.readers -= 1

    async def _pump(
        self, broadcaster: Broadcaster, version: int | None, writer: BodyWriter
    ) -> None:
        # Pace the browser's automatic reconnects.
        await writer.send(encode_retry(self.retry_ms))
        while True:
            snapshot = None
            with trio.move_on_after(self.heartbeat_interval or math.inf):
                snapshot = await broadcaster.wait_newer(version)
            if snapshot is None:
                await writer.send(HEARTBEAT)
                self.heartbeats_sent += 1
                continue
            await writer.send(snapshot.sse)
            self.events_sent += 1
            version = snapshot.version
            if snapshot.terminal:
                return
