"""Streaming responses on real sockets: incremental delivery, disconnects, errors, HEAD."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from daemon.http import (
    BodyWriter,
    Request,
    Router,
    StreamingResponse,
    open_stream,
)
from tests.daemon.http.helpers import H11Client, header, read_until_eof, start_server


class StreamProbe:
    """A streaming handler whose every step the test can see and control."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.finished = trio.Event()
        self.cleaned_up = trio.Event()
        self.called = False
        self.cancelled = False

    async def handler(self, request: Request) -> StreamingResponse:
        return StreamingResponse(200, [("content-type", "text/event-stream")], self.stream)

    async def stream(self, writer: BodyWriter) -> None:
        self.called = True
        try:
            await writer.send(b"data: first\n\n")
            await self.release.wait()
            await writer.send(b"data: second\n\n")
            self.finished.set()
        except trio.Cancelled:
            self.cancelled = True
            raise
        finally:
            self.cleaned_up.set()


def app(probe: StreamProbe) -> Router:
    router = Router()
    router.add("GET", "/events", probe.handler)
    return router


async def test_chunks_arrive_before_the_stream_ends(nursery: trio.Nursery) -> None:
    probe = StreamProbe()
    running = await start_server(nursery, app(probe))
    async with open_stream("GET", f"{running.url}/events") as response:
        assert response.status == 200
        assert response.headers.get("content-type") == "text/event-stream"
        assert response.headers.get("transfer-encoding") == "chunked"
        assert response.headers.get("content-length") is None
        assert response.headers.get("connection") == "close"
        chunks = response.chunks
        assert await chunks.__anext__() == b"data: first\n\n"
        assert not probe.finished.is_set()
        probe.release.set()
        rest = [chunk async for chunk in chunks]
        assert rest == [b"data: second\n\n"]
        assert chunks.complete
    assert probe.finished.is_set()
    assert not probe.cancelled


async def test_client_disconnect_cancels_the_stream_at_once(nursery: trio.Nursery) -> None:
    probe = StreamProbe()
    running = await start_server(nursery, app(probe))
    async with open_stream("GET", f"{running.url}/events") as response:
        assert await response.chunks.__anext__() == b"data: first\n\n"
    # The stream is waiting on `release`, which nobody sets: only the
    # disconnect can end it.
    await probe.cleaned_up.wait()
    assert probe.cancelled
    assert not probe.finished.is_set()


async def test_a_client_leaving_mid_stream_is_no_error(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    # The disconnect watcher cancels the body: that is how a stream ends when
    # its client leaves, and the connection then ends quietly.
    probe = StreamProbe()
    running = await start_server(nursery, app(probe))
    with caplog.at_level(logging.ERROR, logger="daemon.http.server"):
        async with open_stream("GET", f"{running.url}/events") as response:
            assert await response.chunks.__anext__() == b"data: first\n\n"
        await probe.cleaned_up.wait()
        # Nothing is left to wait for once the body is cancelled: the connection ends.
        await trio.testing.wait_all_tasks_blocked()
    assert running.server.active_connections == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_client_half_close_counts_as_leaving(nursery: trio.Nursery) -> None:
    probe = StreamProbe()
    running = await start_server(nursery, app(probe))
    async with await running.connect() as stream:
        client = H11Client(stream)
        await client.send_request("GET", "/events")
        assert (await client.read_head()).status_code == 200
        await stream.send_eof()
        await probe.cleaned_up.wait()
    assert probe.cancelled


async def test_stream_error_truncates_the_response_and_is_logged(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    async def failing(writer: BodyWriter) -> None:
        await writer.send(b"partial")
        raise RuntimeError("stream broke")

    async def handler(request: Request) -> StreamingResponse:
        return StreamingResponse(200, [], failing)

    router = Router()
    router.add("GET", "/fail", handler)
    running = await start_server(nursery, router)
    with caplog.at_level(logging.ERROR, logger="daemon.http.server"):
        async with open_stream("GET", f"{running.url}/fail") as response:
            chunks = [chunk async for chunk in response.chunks]
            # No terminating chunk: the client can tell the body is cut short.
            assert not response.chunks.complete
    assert chunks == [b"partial"]
    assert any("GET /fail" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_http_1_0_stream_is_close_delimited(nursery: trio.Nursery) -> None:
    probe = StreamProbe()
    probe.release.set()
    running = await start_server(nursery, app(probe))
    async with await running.connect() as stream:
        await stream.send_all(b"GET /events HTTP/1.0\r\n\r\n")
        raw = await read_until_eof(stream)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert b"content-length" not in head.lower()
    assert body == b"data: first\n\ndata: second\n\n"


async def test_head_of_a_stream_sends_headers_and_never_runs_it(nursery: trio.Nursery) -> None:
    probe = StreamProbe()
    running = await start_server(nursery, app(probe))
    async with await running.connect() as stream:
        client = H11Client(stream)
        head, body = await client.request("HEAD", "/events")
    assert head.status_code == 200
    assert header(head, "content-type") == "text/event-stream"
    assert body == b""
    assert not probe.called


async def test_empty_chunks_are_skipped(nursery: trio.Nursery) -> None:
    async def sparse(writer: BodyWriter) -> None:
        await writer.send(b"")
        await writer.send(b"x")
        await writer.send(b"")

    async def handler(request: Request) -> StreamingResponse:
        return StreamingResponse(200, [], sparse)

    router = Router()
    router.add("GET", "/sparse", handler)
    running = await start_server(nursery, router)
    async with open_stream("GET", f"{running.url}/sparse") as response:
        assert [chunk async for chunk in response.chunks] == [b"x"]
        assert response.chunks.complete
