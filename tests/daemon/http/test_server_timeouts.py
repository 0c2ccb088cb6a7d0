"""Server timeouts on in-memory streams under autojump_clock (exact, instant, no real I/O)."""

from __future__ import annotations

import contextlib
import functools
import logging

import h11
import pytest
import trio
import trio.testing

from daemon.http import (
    BodyWriter,
    ClientGone,
    HttpLimits,
    HttpServer,
    Request,
    Response,
    Router,
    StreamingResponse,
)
from tests.daemon.http.helpers import H11Client, header, read_until_eof, serve_in_memory

LIMITS = HttpLimits(
    header_read_timeout=10.0,
    body_read_timeout=20.0,
    keep_alive_timeout=5.0,
    write_timeout=3.0,
    close_linger_timeout=1.0,
)


async def ok(request: Request) -> Response:
    return Response(200, [], b"ok:" + request.body)


def make_server(router: Router | None = None) -> HttpServer:
    if router is None:
        router = Router()
        router.add("GET", "/", ok)
        router.add("POST", "/", ok)
    return HttpServer(router, LIMITS)


async def test_partial_head_gets_408_at_the_header_deadline(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    stream = serve_in_memory(nursery, make_server())
    start = trio.current_time()
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n")
    raw = await read_until_eof(stream)
    assert raw.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b'"request timeout"' in raw
    # Answered and half-closed at the deadline.
    assert trio.current_time() - start == pytest.approx(10.0)


async def test_a_trickling_head_cannot_extend_the_deadline(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    stream = serve_in_memory(nursery, make_server())
    start = trio.current_time()
    client = H11Client(stream)
    client.pretend_sent()

    async def trickle() -> None:
        # One byte a second, until the server stops listening.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            for byte in b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"z" * 100:
                await stream.send_all(bytes([byte]))
                await trio.sleep(1.0)

    nursery.start_soon(trickle)
    head = await client.read_head()
    assert head.status_code == 408
    assert trio.current_time() - start == pytest.approx(10.0)


async def test_silent_connection_closes_quietly_at_the_header_deadline(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    stream = serve_in_memory(nursery, make_server())
    start = trio.current_time()
    assert await read_until_eof(stream) == b""
    assert trio.current_time() - start == pytest.approx(10.0)


async def test_partial_body_gets_408_at_the_body_deadline(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    stream = serve_in_memory(nursery, make_server())
    client = H11Client(stream)
    client.pretend_sent("POST")
    await stream.send_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n")
    head_sent = trio.current_time()
    await stream.send_all(b"abc")
    head = await client.read_head()
    assert head.status_code == 408
    assert header(head, "connection") == "close"
    assert trio.current_time() - head_sent == pytest.approx(20.0)


async def test_keep_alive_connection_closes_after_idle_timeout(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    stream = serve_in_memory(nursery, make_server())
    client = H11Client(stream)
    head, body = await client.request("GET", "/")
    assert (head.status_code, body) == (200, b"ok:")
    answered = trio.current_time()
    # No 408 for an idle connection: just the end of the stream.
    assert await read_until_eof(stream) == b""
    assert trio.current_time() - answered == pytest.approx(5.0)


async def test_keep_alive_request_gets_a_fresh_head_deadline_from_its_first_byte(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    stream = serve_in_memory(nursery, make_server())
    client = H11Client(stream)
    await client.request("GET", "/")
    client.h11.start_next_cycle()
    await trio.sleep(4.0)  # idle, but under keep_alive_timeout
    started = trio.current_time()
    await stream.send_all(b"GET / HTTP/1.1\r\n")
    client.pretend_sent()
    head = await client.read_head()
    assert head.status_code == 408
    assert trio.current_time() - started == pytest.approx(10.0)


async def test_slow_handler_is_not_covered_by_request_timeouts(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    async def slow(request: Request) -> Response:
        await trio.sleep(30.0)  # longer than every request timeout
        return Response(200, [], b"late")

    router = Router()
    router.add("GET", "/slow", slow)
    stream = serve_in_memory(nursery, make_server(router))
    head, body = await H11Client(stream).request("GET", "/slow")
    assert (head.status_code, body) == (200, b"late")


async def test_streaming_phase_is_not_covered_by_request_timeouts(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    async def events(writer: BodyWriter) -> None:
        for index in range(3):
            if index:
                await trio.sleep(25.0)  # longer than every request timeout
            await writer.send(b"event %d\n" % index)

    async def handler(request: Request) -> StreamingResponse:
        return StreamingResponse(200, [("content-type", "text/plain")], events)

    router = Router()
    router.add("GET", "/events", handler)
    stream = serve_in_memory(nursery, make_server(router))
    head, body = await H11Client(stream).request("GET", "/events")
    assert head.status_code == 200
    assert body == b"event 0\nevent 1\nevent 2\n"


async def test_response_to_a_peer_that_does_not_read_hits_the_write_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def big(request: Request) -> Response:
        return Response(200, [], b"x" * 100_000)

    router = Router()
    router.add("GET", "/big", big)
    server = make_server(router)
    client_end, server_end = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(H11Client(client_end).send_request, "GET", "/big")
        start = trio.current_time()
        # The client never reads: serve_connection gives up and returns.
        await server.serve_connection(server_end, peer="test")
        assert trio.current_time() - start == pytest.approx(3.0)


async def test_stream_write_to_a_peer_that_does_not_read_raises_client_gone(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    outcome: list[BaseException] = []
    first_sent = trio.Event()

    async def events(writer: BodyWriter) -> None:
        await writer.send(b"first")
        first_sent.set()
        try:
            await writer.send(b"second")
        except ClientGone as exc:
            outcome.append(exc)
            raise
        with pytest.raises(ClientGone):
            await writer.send(b"third")

    async def handler(request: Request) -> StreamingResponse:
        return StreamingResponse(200, [], events)

    router = Router()
    router.add("GET", "/events", handler)
    server = make_server(router)
    client_end, server_end = trio.testing.lockstep_stream_pair()
    done = trio.Event()

    async def serve() -> None:
        await server.serve_connection(server_end, peer="test")
        done.set()

    nursery.start_soon(serve)
    client = H11Client(client_end)
    await client.send_request("GET", "/events")
    assert (await client.read_head()).status_code == 200
    chunk = await client.next_event()
    assert isinstance(chunk, h11.Data)
    assert chunk.data == b"first"
    await first_sent.wait()
    stopped_reading = trio.current_time()
    await done.wait()
    assert len(outcome) == 1
    assert trio.current_time() - stopped_reading == pytest.approx(3.0)


async def test_a_slow_but_steady_reader_gets_a_large_body(
    autojump_clock: trio.testing.MockClock,
) -> None:
    body = bytes(range(256)) * 1200  # ~300 KiB: several write slices

    async def big(request: Request) -> Response:
        return Response(200, [], body)

    router = Router()
    router.add("GET", "/big", big)
    server = make_server(router)
    client_end, server_end = trio.testing.lockstep_stream_pair()
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(server.serve_connection, server_end, peer="test"))
        await client_end.send_all(b"GET /big HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        start = trio.current_time()
        while True:
            # 32 KiB a second: each 64 KiB write slice is taken within 2 s,
            # under write_timeout (3 s).
            await trio.sleep(1.0)
            data = await client_end.receive_some(32 * 1024)
            if not data:
                break
            received += data
        # Far longer than one write_timeout in total, yet nothing timed out.
        assert trio.current_time() - start > 3 * LIMITS.write_timeout
    assert bytes(received).endswith(body)


async def test_client_gone_from_a_nursery_in_the_stream_is_not_logged_as_an_error(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ended = trio.Event()

    async def events(writer: BodyWriter) -> None:
        try:
            async with trio.open_nursery() as inner:

                async def write_forever() -> None:
                    while True:
                        await writer.send(b"tick")
                        await trio.sleep(1.0)

                inner.start_soon(write_forever)
        finally:
            ended.set()

    async def handler(request: Request) -> StreamingResponse:
        return StreamingResponse(200, [], events)

    router = Router()
    router.add("GET", "/events", handler)
    client = H11Client(serve_in_memory(nursery, make_server(router), lockstep=True))
    with caplog.at_level(logging.DEBUG, logger="daemon.http.server"):
        await client.send_request("GET", "/events")
        assert (await client.read_head()).status_code == 200
        # Stop reading: the next write times out inside the stream's own nursery.
        await ended.wait()
    assert any("client left" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
