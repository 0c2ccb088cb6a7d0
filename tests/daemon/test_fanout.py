"""The SSE fan-out fast path over real sockets: one loop writes each snapshot to
every reader's socket; a reader that cannot take it finishes in its own task.

The server here is the daemon's HttpServer with the daemon's StreamHub behind
one route; the test publishes snapshots itself, so it controls exactly what
each reader could have seen.
"""

from __future__ import annotations

import functools
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import h11
import pytest
import trio
import trio.lowlevel

from daemon.api import sse_stream
from daemon.api.sse_stream import HEARTBEAT, StreamHub
from daemon.http import HttpLimits
from daemon.http.client import open_stream
from daemon.http.types import Request, Response, StreamingResponse
from daemon.tasks.broadcast import Broadcaster, Snapshot
from protocol.sse import ServerSentEvent, SSEDecoder, encode_event, parse_last_event_id
from tests.daemon.http.helpers import RunningServer, start_server

HEADERS = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]


def snapshot(version: int, *, terminal: bool = False, padding: int = 0) -> Snapshot:
    event = "complete" if terminal else "progress"
    payload = {"v": version, "pad": "x" * padding}
    data = json.dumps(payload)
    sse = encode_event(ServerSentEvent(data=data, event=event, id=str(version)))
    return Snapshot(version, event, payload, sse, terminal)


class Feed:
    """One task's broadcaster behind GET /progress, served by a real HttpServer."""

    def __init__(self, hub: StreamHub) -> None:
        self.hub = hub
        self.broadcaster = Broadcaster()
        self.broadcaster.publish(snapshot(0))

    async def handler(self, request: Request) -> Response | StreamingResponse:
        last_id = parse_last_event_id(
            request.headers.get("last-event-id"), request.query.get("lastEventId")
        )
        return StreamingResponse(
            status=200,
            headers=HEADERS,
            stream=functools.partial(self.hub.stream, self.broadcaster, last_id),
            watches_peer=True,
        )

    def publish(self, version: int, **kwargs: object) -> None:
        self.broadcaster.publish(snapshot(version, **kwargs))  # type: ignore[arg-type]

    async def wait_for_readers(self, count: int) -> None:
        while self.broadcaster.readers < count:  # noqa: ASYNC110 - nothing to wait on
            await trio.sleep(0.001)


@asynccontextmanager
async def serving(
    *, heartbeat: float = 30.0, write_timeout: float = 10.0
) -> AsyncIterator[tuple[Feed, RunningServer]]:
    hub = StreamHub(heartbeat_interval=heartbeat, retry_ms=1000)
    feed = Feed(hub)
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, feed.handler, HttpLimits(write_timeout=write_timeout))
        yield feed, server
        nursery.cancel_scope.cancel()


async def read_events(url: str, headers: tuple[tuple[str, str], ...] = ()) -> list[ServerSentEvent]:
    """Every event of one stream, through an h11 client (so chunk framing is checked)."""
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    async with open_stream("GET", url, headers=headers) as response:
        async for chunk in response.chunks:
            events.extend(decoder.feed(chunk))
        assert response.chunks.complete, "the chunked body ended properly (last-chunk)"
    return events


@pytest.mark.parametrize(
    "slice_size",
    [
        250,  # 30 readers: the publisher writes them itself
        7,  # the fan-out loop, in slices of 7 writes with checkpoints between
    ],
)
async def test_every_reader_sees_rising_ids_and_ends_with_the_terminal_event(
    monkeypatch: pytest.MonkeyPatch, slice_size: int
) -> None:
    monkeypatch.setattr(sse_stream, "YIELD_EVERY", slice_size)
    async with serving() as (feed, server):
        results: list[list[ServerSentEvent]] = []

        async def reader() -> None:
            results.append(await read_events(f"{server.url}/progress"))

        async with trio.open_nursery() as nursery:
            for _ in range(30):
                nursery.start_soon(reader)
            await feed.wait_for_readers(30)
            for version in range(1, 300):
                feed.publish(version)
                if version % 7 == 0:
                    await trio.lowlevel.checkpoint()  # let some go out; the rest are coalesced
            feed.publish(300, terminal=True)
    assert len(results) == 30
    for events in results:
        ids = [int(e.id or -1) for e in events]
        assert ids == sorted(set(ids)), "ids rise, none repeated"
        assert ids[-1] == 300
        assert events[-1].event == "complete"
        assert all(e.event == "progress" for e in events[:-1])


async def test_a_partial_write_is_finished_before_anything_newer() -> None:
    async with serving() as (feed, server):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((server.host, server.port))
        sock.sendall(b"GET /progress HTTP/1.1\r\nHost: t\r\n\r\n")
        await feed.wait_for_readers(1)
        # Each snapshot is far larger than the socket buffers: writes are partial.
        for version in range(1, 40):
            feed.publish(version, padding=200_000)
            await trio.lowlevel.checkpoint()
        feed.publish(40, terminal=True)
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/progress", headers=[("Host", "t")]))
        client.send(h11.EndOfMessage())
        body = bytearray()
        sock.setblocking(False)
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                await trio.sleep(0.001)
                continue
            client.receive_data(data)
            done = False
            while (event := client.next_event()) is not h11.NEED_DATA:
                if isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    done = True
                    break
            if done or not data:
                break
        sock.close()
    events = SSEDecoder().feed(bytes(body))
    ids = [int(e.id or -1) for e in events]
    assert ids == sorted(set(ids))
    assert ids[-1] == 40
    for sse in events:  # every event arrived whole: its JSON is intact
        assert json.loads(sse.data)["v"] == int(sse.id or -1)
    assert len(ids) < 41, "a slow reader skips to the newest instead of a backlog"


async def test_a_reader_that_stops_reading_is_cut_off_and_holds_up_no_one() -> None:
    async with serving(write_timeout=0.5) as (feed, server):
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect((server.host, server.port))
        stalled.sendall(b"GET /progress HTTP/1.1\r\nHost: t\r\n\r\n")
        await feed.wait_for_readers(1)
        received: list[list[ServerSentEvent]] = []
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                received.append(await read_events(f"{server.url}/progress"))

            nursery.start_soon(reader)
            await feed.wait_for_readers(2)
            for version in range(1, 20):
                feed.publish(version, padding=100_000)
                await trio.sleep(0.01)
            # The stalled reader cannot have taken much: the other one gets the end.
            feed.publish(20, terminal=True)
        assert [e.id for e in received[0]][-1] == "20"
        # The stalled one is cut off after the write timeout: the server lets go of it.
        while feed.broadcaster.readers:  # noqa: ASYNC110
            await trio.sleep(0.05)
        assert feed.hub.open_streams == 0
        stalled.close()


async def test_http_1_0_readers_get_a_close_delimited_body() -> None:
    async with serving() as (feed, server):
        stream = await server.connect()
        await stream.send_all(b"GET /progress HTTP/1.0\r\nHost: t\r\n\r\n")
        await feed.wait_for_readers(1)
        for version in range(1, 5):
            feed.publish(version)
            await trio.lowlevel.checkpoint()
        feed.publish(5, terminal=True)
        raw = bytearray()
        while data := await stream.receive_some(65536):
            raw += data
        await stream.aclose()
    head, _, body = bytes(raw).partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    events = SSEDecoder().feed(body)  # no chunk sizes in between
    assert [e.id for e in events][-1] == "5"
    assert body.startswith(b"retry: 1000\n\n")


async def test_resume_by_last_event_id_sends_only_newer_snapshots() -> None:
    async with serving() as (feed, server):
        for version in range(1, 8):
            feed.publish(version)
        got: list[list[ServerSentEvent]] = []

        async def reader(last_id: str) -> None:
            got.append(await read_events(f"{server.url}/progress", (("Last-Event-ID", last_id),)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, "7")
            await feed.wait_for_readers(1)
            feed.publish(8, terminal=True)
    assert [e.id for e in got[0]] == ["8"]


async def test_a_quiet_fast_path_stream_gets_heartbeats() -> None:
    async with serving(heartbeat=0.05) as (feed, server):
        stream = await server.connect()
        await stream.send_all(b"GET /progress HTTP/1.1\r\nHost: t\r\n\r\n")
        raw = bytearray()
        while raw.count(HEARTBEAT) < 3:
            raw += await stream.receive_some(65536)
        await stream.aclose()
    assert feed.hub.heartbeats_sent >= 3


async def test_a_reader_that_leaves_is_let_go_at_once() -> None:
    async with serving(heartbeat=3600.0) as (feed, server):
        streams = [await server.connect() for _ in range(3)]
        for stream in streams:
            await stream.send_all(b"GET /progress HTTP/1.1\r\nHost: t\r\n\r\n")
        await feed.wait_for_readers(3)
        await streams[0].aclose()
        # No write would tell (no heartbeat for an hour): its own wait notices.
        while feed.broadcaster.readers > 2:  # noqa: ASYNC110
            await trio.sleep(0.001)
        assert feed.hub.open_streams == 2
        for stream in streams[1:]:
            await stream.aclose()


async def test_closing_ended_streams_waits_for_the_next_fan_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A task's readers all end at once and the next task's first step comes
    right behind: that step goes out before the ended connections are closed
    (closing a thousand takes tens of ms), not after."""
    monkeypatch.setattr(sse_stream, "YIELD_EVERY", 2)  # 4 readers: the fan-out loop, 2 slices
    monkeypatch.setattr(sse_stream, "END_SLICE", 1)
    order: list[str] = []
    write_batch = StreamHub._write_batch

    def logged_write_batch(hub: StreamHub, snap: Snapshot, readers: list[object]) -> None:
        order.append(f"write {snap.event} {snap.version}")
        write_batch(hub, snap, readers)  # type: ignore[arg-type]

    wake = sse_stream._Subscriber.wake  # (here only the ender wakes a stream's task)
    all_woken = trio.Event()

    def logged_wake(subscriber: sse_stream._Subscriber) -> None:
        order.append("close")
        wake(subscriber)
        if order.count("close") == 4:
            all_woken.set()

    monkeypatch.setattr(StreamHub, "_write_batch", logged_write_batch)
    monkeypatch.setattr(sse_stream._Subscriber, "wake", logged_wake)
    hub = StreamHub(heartbeat_interval=30.0, retry_ms=1000)
    ending, following = Feed(hub), Feed(hub)  # two tasks' broadcasters, one hub

    async def handler(request: Request) -> Response | StreamingResponse:
        feed = following if request.target.startswith("/next") else ending
        return await feed.handler(request)

    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, handler)
        streams = [await server.connect() for _ in range(8)]
        for k, stream in enumerate(streams):
            path = "/next" if k % 2 else "/progress"
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        await ending.wait_for_readers(4)
        await following.wait_for_readers(4)
        order.clear()
        ending.publish(100, terminal=True)
        following.publish(1)
        await all_woken.wait()
        for stream in streams:
            await stream.aclose()
        nursery.cancel_scope.cancel()
    first_close = order.index("close")
    assert order[:first_close] == [
        "write complete 100",
        "write complete 100",
        "write progress 1",
        "write progress 1",
    ]


async def test_streams_that_ended_are_not_held_until_their_heartbeat() -> None:
    """A client that opens and drops streams over and over: each ended stream
    (its subscriber, broadcaster and socket objects) stayed in the heartbeat
    heap until its deadline, up to 30 s later, so memory grew with the rate."""
    async with serving(heartbeat=3600.0) as (feed, server):
        staying = await server.connect()
        await staying.send_all(b"GET /progress HTTP/1.1\r\nHost: t\r\n\r\n")
        await feed.wait_for_readers(1)
        for _ in range(300):
            stream = await server.connect()
            await stream.send_all(b"GET /progress HTTP/1.1\r\nHost: t\r\n\r\n")
            await feed.wait_for_readers(2)
            await stream.aclose()
            while feed.broadcaster.readers > 1:  # noqa: ASYNC110 - nothing to wait on
                await trio.sleep(0.001)
        held = len(feed.hub._heartbeats)
        assert held <= 2 * feed.hub.open_streams + 64, f"{held} heartbeat entries for 1 stream"
        # The stream that stayed still gets its heartbeats.
        assert any(entry[2].active for entry in feed.hub._heartbeats)
        await staying.aclose()
