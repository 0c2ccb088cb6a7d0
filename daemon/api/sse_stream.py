"""SSE streams: every connection reading a task, written by its publisher.

Fan-out is the daemon's hot path (one ComfyUI step, a thousand readers), so
it costs at most one task switch per publish, not one per reader: a publish
is written, framed once per body framing (`Snapshot.chunk`, or `.sse` when
close-delimited), to each reader's socket with one non-blocking write: by
the publisher itself for up to `YIELD_EVERY` readers, else by the hub's
fan-out loop, which yields to the event loop every `YIELD_EVERY` writes. A
reader whose socket took only part of a chunk (or none) becomes *busy*: its
own task waits for writability, finishes that chunk, then writes the newest
snapshot. A reader never gets a backlog, only the latest state, and the
terminal snapshot is the last one published, so nobody skips it (its chunk
also ends the chunked body). A reader that stays unwritable for the write
timeout is cut off.

Heartbeats come from one hub loop that sleeps until the earliest deadline:
each stream gets `: heartbeat` `heartbeat_interval` s after its last write.

Readers whose connection offers no socket (in-memory streams in tests) take
the same route through their own task and `BodyWriter.send`.

An idle stream costs one sleeping task, asleep in the hub's `IdleSockets`
(one epoll set for every idle socket, daemon/http/idle_sockets.py) until the
client sends something or leaves (it reads and drops the input), or the hub
wakes it (`_Subscriber.wake`): to write, or once the end is out (in slices,
after any pending fan-out), to close its connection.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
from collections.abc import Awaitable, Callable

import trio

from daemon.http.connection import SocketSink
from daemon.http.idle_sockets import IdleSockets
from daemon.http.types import BodyWriter, ClientGone
from daemon.signals import Signal
from daemon.tasks.broadcast import Broadcaster, Snapshot
from protocol.sse import encode_comment, encode_retry

log = logging.getLogger(__name__)

HEARTBEAT = encode_comment("heartbeat")
HEARTBEAT_CHUNK = b"%x\r\n%b\r\n" % (len(HEARTBEAT), HEARTBEAT)
YIELD_EVERY = 250  # writes between checkpoints: a new request waits ~1 slice per step
# Ended streams whose tasks are woken per scheduler round to close their
# connections (~50 us each): small, so a fan-out never waits long behind them.
END_SLICE = 32


class _Subscriber:
    """One stream's place in the hub: what it has, and whether its task must act."""

    __slots__ = (
        "active",
        "broadcaster",
        "busy",
        "chunked",
        "done",
        "failure",
        "fd",
        "heartbeat_due",
        "hub",
        "last_write",
        "pending",
        "pending_snapshot",
        "scope",
        "sink",
        "version",
    )

    def __init__(
        self,
        hub: StreamHub,
        broadcaster: Broadcaster,
        version: int | None,
        sink: SocketSink | None,
    ) -> None:
        self.hub = hub
        self.broadcaster = broadcaster
        self.version = -1 if version is None else version
        self.sink = sink
        # Copied from the sink for the fan-out loop, which writes to fd itself.
        self.fd = sink.fd if sink is not None else -1
        self.chunked = sink.chunked if sink is not None else False
        self.active = True  # attached to the hub (False: never touch the socket again)
        self.busy = False  # its own task is writing: the loops leave it alone
        self.done = False  # the terminal snapshot is out
        self.failure: ClientGone | None = None
        self.heartbeat_due = False
        self.last_write = trio.current_time()
        self.pending: memoryview | None = None  # the unwritten rest of a chunk
        self.pending_snapshot: Snapshot | None = None  # None: the chunk is a heartbeat
        # The scope its task sleeps in; cancelling it wakes the task (no Event,
        # no second task: the same wait notices the client leaving).
        self.scope: trio.CancelScope | None = None

    def _hand_over(self) -> None:
        self.busy = True
        self.wake()

    def wake(self) -> None:
        """Wake the stream's task wherever it waits: asleep as idle, or in its scope."""
        if self.scope is not None:
            self.scope.cancel()
        elif self.fd >= 0:
            self.hub.idle.wake(self.fd)

    def offer(self, snapshot: Snapshot, now: float) -> None:
        """Write `snapshot` now if the socket takes it (the fan-out loop's call)."""
        if self.busy or snapshot.version <= self.version:
            return
        if self.sink is None:
            self._hand_over()
        else:
            self._write(snapshot.chunk if self.chunked else snapshot.sse, snapshot, now)

    def heartbeat(self, now: float) -> None:
        if self.busy:
            return
        if self.sink is None:
            self.heartbeat_due = True
            self._hand_over()
        else:
            self._write(HEARTBEAT_CHUNK if self.chunked else HEARTBEAT, None, now)

    def _write(self, data: bytes, snapshot: Snapshot | None, now: float) -> None:
        assert self.sink is not None
        try:
            taken = self.sink.write_nowait(data)
        except ClientGone as exc:
            self.fail(exc)
            return
        if taken == len(data):
            self.last_write = now
            self._written(snapshot)
        else:
            self.partial(data, taken, snapshot, now)

    def fail(self, exc: ClientGone) -> None:
        self.failure = exc
        self._hand_over()

    def partial(self, data: bytes, taken: int, snapshot: Snapshot | None, now: float) -> None:
        """The socket took `taken` bytes of `data`: our task writes the rest."""
        if taken:
            self.last_write = now
        self.pending = memoryview(data)[taken:]
        self.pending_snapshot = snapshot
        self._hand_over()

    def _written(self, snapshot: Snapshot | None) -> None:
        if snapshot is None:
            self.hub.heartbeats_sent += 1
            return
        self.version = snapshot.version
        self.hub.events_sent += 1
        if snapshot.terminal:
            self.done = True
            if self.sink is not None:
                self.sink.body_ended()  # (a terminal Snapshot.chunk ends a chunked body)
            self._hand_over()

    async def finish_pending(self) -> None:
        """Write the rest of a chunk the socket took only in part, waiting as needed."""
        assert self.sink is not None
        while self.pending is not None:
            await self.sink.wait_writable()
            taken = self.sink.write_nowait(self.pending)
            if taken:
                self.last_write = trio.current_time()
            if taken == len(self.pending):
                self.pending = None
                self._written(self.pending_snapshot)
            else:
                self.pending = self.pending[taken:]

    async def write_through(self, writer: BodyWriter) -> None:
        """Without a socket: write the newest snapshot (and a due heartbeat) via `writer`."""
        while not self.done:
            latest = self.broadcaster.latest
            if latest is not None and latest.version > self.version:
                await writer.send(latest.sse)
                self.last_write = trio.current_time()
                self._written(latest)
            elif self.heartbeat_due:
                self.heartbeat_due = False
                await writer.send(HEARTBEAT)
                self.last_write = trio.current_time()
                self._written(None)
            else:
                return


class StreamHub:
    """All open SSE streams: the fan-out and heartbeat loops, and shutdown's drain."""

    def __init__(self, *, heartbeat_interval: float, retry_ms: int) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.retry_ms = retry_ms
        self.draining = False
        self._open = 0
        self.idle = IdleSockets()  # where idle streams sleep
        self.events_sent = 0
        self.heartbeats_sent = 0
        self._subscribers: dict[Broadcaster, dict[_Subscriber, None]] = {}
        self._dirty: dict[Broadcaster, None] = {}  # published since the loop last looked
        self._fanout_wake = trio.Event()
        self._fanning = False  # a fan-out round is under way
        self._fanout_idle = Signal()
        self._heartbeats: list[tuple[float, int, _Subscriber]] = []  # a heap by deadline
        self._heartbeat_added = trio.Event()
        self._sequence = itertools.count()
        self._loops_started = False
        # Streams whose end is out, waiting for their task to be woken (in slices).
        self._to_end: collections.deque[_Subscriber] = collections.deque()
        self._ender_wake = trio.Event()

    @property
    def open_streams(self) -> int:
        return self._open

    def is_draining(self) -> bool:
        """A method, so type checkers re-read it after an await."""
        return self.draining

    def drain(self) -> None:
        """End every stream with a `retry:` hint (SIGTERM); new streams end at once."""
        self.draining = True
        for readers in self._subscribers.values():
            for subscriber in readers:
                subscriber.wake()

    async def stream(
        self, broadcaster: Broadcaster, last_event_id: int | None, writer: BodyWriter
    ) -> None:
        """Write the task's snapshots until the terminal one (or until we drain)."""
        latest = broadcaster.latest
        if last_event_id is not None and latest is not None and last_event_id > latest.version:
            # An id from the future (e.g. our journal was lost): start over.
            last_event_id = None
        self._start_loops()
        broadcaster.readers += 1
        self._open += 1
        try:
            # Pace the browser's automatic reconnects (and, when draining, the return).
            await writer.send(encode_retry(self.retry_ms))
            if self.draining:
                return
            sink_of: Callable[[], SocketSink | None] | None = getattr(writer, "socket_sink", None)
            sink = sink_of and sink_of()
            subscriber = _Subscriber(self, broadcaster, last_event_id, sink)
            self._attach(subscriber)
            try:
                # The stream's own task, inline (one frame less for hours): asleep
                # unless the loops hand it work, the client leaves, or we drain.
                latest = broadcaster.latest
                if latest is not None:
                    subscriber.offer(latest, trio.current_time())
                while not subscriber.done and not self.is_draining():
                    if sink is not None and not subscriber.busy:
                        # Asleep with the hub's other idle sockets; input, EOF or
                        # the hub (work to do, or drain) wakes it.
                        await self.idle.sleep(sink.fd)
                        if not subscriber.done and sink.peer_left():
                            raise ClientGone("client went away")
                        continue  # (done: the end is out; the hub woke us to close)
                    with trio.CancelScope() as scope:  # the hub cancels it to wake us
                        subscriber.scope = scope
                        if subscriber.busy:
                            await self._work(subscriber, writer)
                        else:
                            await self._wait_without_socket(writer)
                            if not subscriber.done:
                                raise ClientGone("client went away")
                    subscriber.scope = None
            finally:
                self._detach(subscriber)
            if self.is_draining() and not subscriber.done:
                with trio.move_on_after(1.0):
                    if subscriber.pending is not None:
                        await subscriber.finish_pending()
                    if not subscriber.done:  # (a finished chunk may have been the end)
                        await writer.send(encode_retry(self.retry_ms))
        finally:
            self._open -= 1
            broadcaster.readers -= 1

    @staticmethod
    async def _wait_without_socket(writer: BodyWriter) -> None:
        """A stream with no socket of its own (in-memory, in tests): until its peer
        leaves (when the writer can tell), else until cancelled."""
        wait_for_peer: Callable[[], Awaitable[None]] | None = getattr(
            writer, "wait_until_peer_leaves", None
        )
        if wait_for_peer is None:
            await trio.sleep_forever()
        else:
            await wait_for_peer()

    async def _work(self, subscriber: _Subscriber, writer: BodyWriter) -> None:
        """What the loops handed a stream's task: the socket was full, or it
        failed, or the end is out, or (no socket) something is to be written."""
        if subscriber.failure is not None:
            raise subscriber.failure
        if subscriber.sink is None:
            await subscriber.write_through(writer)
        else:
            await subscriber.finish_pending()
        if subscriber.done:
            return
        subscriber.busy = False
        latest = subscriber.broadcaster.latest
        if latest is not None:
            subscriber.offer(latest, trio.current_time())  # may hand it back

    # ------------------------------------------------------------ the hub's loops

    def _attach(self, subscriber: _Subscriber) -> None:
        broadcaster = subscriber.broadcaster
        readers = self._subscribers.get(broadcaster)
        if readers is None:
            readers = self._subscribers[broadcaster] = {}
            broadcaster.watchers.append(self._published)
        readers[subscriber] = None
        if self.heartbeat_interval > 0:
            deadline = subscriber.last_write + self.heartbeat_interval
            heapq.heappush(self._heartbeats, (deadline, next(self._sequence), subscriber))
            self._heartbeat_added.set()

    def _detach(self, subscriber: _Subscriber) -> None:
        # Before the connection closes its socket: the fd may be reused at once.
        subscriber.active = False
        self._drop_ended_heartbeats()
        broadcaster = subscriber.broadcaster
        readers = self._subscribers.get(broadcaster)
        if readers is None:
            return
        readers.pop(subscriber, None)
        if not readers:
            del self._subscribers[broadcaster]
            broadcaster.watchers.remove(self._published)

    def _drop_ended_heartbeats(self) -> None:
        """Ended streams wait in the heap for their deadline (a heap cannot drop
        one entry cheaply): once they outnumber the open ones, rebuild it without
        them, so that streams opened and dropped fast are not held for 30 s."""
        heap = self._heartbeats
        if len(heap) > 2 * self._open + 64:
            heap[:] = [entry for entry in heap if entry[2].active]
            heapq.heapify(heap)

    def _published(self, broadcaster: Broadcaster) -> None:
        readers = self._subscribers.get(broadcaster)
        latest = broadcaster.latest
        if readers and latest is not None and len(readers) <= YIELD_EVERY:
            # Few readers: the publisher writes them itself, now (no task switch;
            # a round the loop has under way skips readers that have it).
            self._write_batch(latest, list(readers))
        else:
            self._dirty[broadcaster] = None
            self._fanout_wake.set()

    def _start_loops(self) -> None:
        if not self._loops_started:
            self._loops_started = True
            trio.lowlevel.spawn_system_task(self._forever, self._fan_out, name="sse fan-out")
            trio.lowlevel.spawn_system_task(self._forever, self._beat, name="sse heartbeats")
            trio.lowlevel.spawn_system_task(self._forever, self._end, name="sse stream ends")

    async def _forever(self, loop: Callable[[], Awaitable[None]]) -> None:
        # A system task must not raise: a bug in one round is logged, the loop goes on.
        while True:
            try:
                await loop()
            except Exception:
                log.exception("SSE hub loop failed; continuing")
                await trio.sleep(0.1)

    async def _fan_out(self) -> None:
        """Write each newly published snapshot to every reader that can take it now."""
        while True:
            await self._fanout_wake.wait()
            self._fanout_wake = trio.Event()
            self._fanning = True
            try:
                while self._dirty:
                    broadcaster = next(iter(self._dirty))
                    del self._dirty[broadcaster]
                    readers = self._subscribers.get(broadcaster)
                    if readers:
                        await self._write_all(broadcaster, list(readers))
            finally:
                self._fanning = False
                self._fanout_idle.fire()

    async def _write_all(self, broadcaster: Broadcaster, readers: list[_Subscriber]) -> None:
        """One round: the snapshot to every reader, a checkpoint every YIELD_EVERY."""
        snapshot = broadcaster.latest
        assert snapshot is not None
        for start in range(0, len(readers), YIELD_EVERY):
            if start:
                await trio.lowlevel.checkpoint()
            # The round goes on with the same snapshot: everyone gets each step
            # while the loop keeps up; a newer one is the next round's.
            self._write_batch(snapshot, readers[start : start + YIELD_EVERY])

    def _write_batch(self, snapshot: Snapshot, readers: list[_Subscriber]) -> None:
        # The hot loop: per reader one os.write of bytes framed once, nothing else
        # unless the socket cannot take them (then the reader's own task goes on).
        write = os.write
        sent = 0
        ending = False
        now = trio.current_time()
        for subscriber in readers:
            if subscriber.busy or not subscriber.active or subscriber.version >= snapshot.version:
                continue
            if subscriber.fd < 0:
                subscriber.offer(snapshot, now)
                continue
            data = snapshot.chunk if subscriber.chunked else snapshot.sse
            try:
                taken = write(subscriber.fd, data)
            except BlockingIOError:
                taken = 0
            except OSError as exc:
                assert subscriber.sink is not None
                subscriber.fail(subscriber.sink.failed(exc))
                continue
            if taken == len(data):
                subscriber.last_write = now
                subscriber.version = snapshot.version
                sent += 1
                if snapshot.terminal:
                    subscriber.done = True
                    sink = subscriber.sink
                    assert sink is not None
                    sink.body_ended()  # (a terminal Snapshot.chunk ends a chunked body)
                    self._to_end.append(subscriber)
                    ending = True
            else:
                subscriber.partial(data, taken, snapshot, now)
        self.events_sent += sent
        if ending:
            self._ender_wake.set()

    async def _end(self) -> None:
        """Wake the tasks of streams whose end is out, END_SLICE per scheduler round,
        and none while a fan-out round waits or runs.

        Each then closes its connection. A task's thousand readers end
        together, and the next task's first steps come right behind: closing
        them all at once would hold those steps up by the whole teardown
        (~20 us each); this way a fan-out waits for one slice at most.
        """
        while True:
            await self._ender_wake.wait()
            self._ender_wake = trio.Event()
            while self._to_end:
                while self._fanning or self._dirty:
                    await self._fanout_idle.wait()
                for _ in range(min(END_SLICE, len(self._to_end))):
                    subscriber = self._to_end.popleft()
                    if subscriber.active:  # (else its socket, and maybe fd, is gone)
                        subscriber.wake()
                await trio.lowlevel.checkpoint()

    async def _beat(self) -> None:
        """Sleep until the earliest heartbeat deadline; beat the streams that are due."""
        heap = self._heartbeats
        interval = self.heartbeat_interval
        while True:
            if not heap:
                await self._heartbeat_added.wait()
                self._heartbeat_added = trio.Event()
                continue
            # New streams are due `interval` from now, never before the earliest.
            await trio.sleep_until(heap[0][0])
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, _, subscriber = heapq.heappop(heap)
                if not subscriber.active or subscriber.done:
                    continue
                due = subscriber.last_write + interval
                if due <= now:
                    subscriber.heartbeat(now)
                    due = now + interval
                heapq.heappush(heap, (due, next(self._sequence), subscriber))
