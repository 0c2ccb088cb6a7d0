"""HttpServer.run() readiness and begin_shutdown(): idle connections, in-flight work, grace."""

from __future__ import annotations

import h11
import pytest
import trio
import trio.testing

from daemon.http import (
    BodyWriter,
    HttpLimits,
    HttpServer,
    Request,
    Response,
    Router,
    StreamingResponse,
    http_request,
)
from tests.daemon.http.helpers import (
    H11Client,
    MemoryListener,
    header,
    read_until_eof,
    start_server,
)


class Probes:
    def __init__(self) -> None:
        self.in_handler = trio.Event()
        self.release = trio.Event()
        self.streaming = trio.Event()
        self.stream_ended_at: float | None = None
        self.stream_cancelled = False

    def router(self) -> Router:
        async def hello(request: Request) -> Response:
            return Response(200, [], b"hello")

        async def slow(request: Request) -> Response:
            self.in_handler.set()
            await self.release.wait()
            return Response(200, [], b"finished")

        async def forever(writer: BodyWriter) -> None:
            try:
                await writer.send(b"tick")
                self.streaming.set()
                await trio.sleep_forever()
            except trio.Cancelled:
                self.stream_cancelled = True
                raise
            finally:
                self.stream_ended_at = trio.current_time()

        async def events(request: Request) -> StreamingResponse:
            return StreamingResponse(200, [], forever)

        router = Router()
        router.add("GET", "/", hello)
        router.add("GET", "/slow", slow)
        router.add("GET", "/events", events)
        return router


async def run_in_memory(
    nursery: trio.Nursery, server: HttpServer, listener: MemoryListener
) -> trio.Event:
    """Start server.run on `listener`; the returned event is set when run() returns."""
    returned = trio.Event()

    async def run(*, task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
        await server.run([listener], task_status=task_status)
        returned.set()

    addresses = await nursery.start(run)
    assert addresses == []  # memory listeners have no socket address
    return returned


async def test_run_reports_the_bound_address_and_serves(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, Probes().router())
    assert running.host == "127.0.0.1"
    assert running.port > 0
    response = await http_request("GET", running.url + "/")
    assert response.body == b"hello"


async def test_shutdown_closes_idle_connections_and_returns(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = HttpServer(Probes().router())
    listener = MemoryListener()
    returned = await run_in_memory(nursery, server, listener)
    stream = await listener.connect()
    client = H11Client(stream)
    head, _ = await client.request("GET", "/")
    assert head.status_code == 200
    never_used = await listener.connect()  # accepted, no request yet
    await trio.testing.wait_all_tasks_blocked()

    start = trio.current_time()
    server.begin_shutdown(grace=30.0)
    for client_end in (stream, never_used):
        assert await read_until_eof(client_end) == b""
        await client_end.aclose()  # as a real client does on EOF: ends the server's linger
    await returned.wait()
    assert trio.current_time() == pytest.approx(start)  # no waiting for the grace period
    assert listener.closed
    assert server.active_connections == 0


async def test_in_flight_request_finishes_within_grace_with_connection_close(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    probes = Probes()
    server = HttpServer(probes.router())
    listener = MemoryListener()
    returned = await run_in_memory(nursery, server, listener)
    client = H11Client(await listener.connect())
    await client.send_request("GET", "/slow")
    await probes.in_handler.wait()

    server.begin_shutdown(grace=30.0)
    await trio.sleep(10.0)
    probes.release.set()
    head, body = await client.read_response()
    assert (head.status_code, body) == (200, b"finished")
    assert header(head, "connection") == "close"
    await returned.wait()


async def test_streams_are_cancelled_when_the_grace_period_ends(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    probes = Probes()
    server = HttpServer(probes.router())
    listener = MemoryListener()
    returned = await run_in_memory(nursery, server, listener)
    client = H11Client(await listener.connect())
    await client.send_request("GET", "/events")
    assert (await client.read_head()).status_code == 200
    await probes.streaming.wait()

    start = trio.current_time()
    server.begin_shutdown(grace=7.0)
    await returned.wait()
    assert probes.stream_cancelled
    assert probes.stream_ended_at == pytest.approx(start + 7.0)
    # The body was cut off: data, then the end of the stream without the last chunk.
    event = await client.next_event()
    assert isinstance(event, h11.Data)
    with pytest.raises(h11.RemoteProtocolError):
        await client.next_event()


async def test_a_second_shutdown_call_can_only_shorten_the_grace(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    probes = Probes()
    server = HttpServer(probes.router())
    listener = MemoryListener()
    returned = await run_in_memory(nursery, server, listener)
    client = H11Client(await listener.connect())
    await client.send_request("GET", "/events")
    await probes.streaming.wait()

    start = trio.current_time()
    server.begin_shutdown(grace=20.0)
    server.begin_shutdown(grace=5.0)
    server.begin_shutdown(grace=50.0)
    await returned.wait()
    assert probes.stream_ended_at == pytest.approx(start + 5.0)


async def test_shutdown_before_run_returns_at_once(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = HttpServer(Probes().router())
    server.begin_shutdown(grace=5.0)
    listener = MemoryListener()
    returned = await run_in_memory(nursery, server, listener)
    await returned.wait()
    assert listener.closed


async def test_after_shutdown_the_port_refuses_connections(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, Probes().router())
    async with await running.connect() as idle:
        running.server.begin_shutdown(grace=5.0)
        assert await read_until_eof(idle) == b""
    await running.stopped.wait()
    with pytest.raises(OSError, match=str(running.port)):
        await trio.open_tcp_stream(running.host, running.port)


async def test_connection_slots_are_freed_when_connections_end(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = HttpServer(Probes().router(), HttpLimits(max_connections=1))
    listener = MemoryListener()
    await run_in_memory(nursery, server, listener)
    first = await listener.connect()
    head, _ = await H11Client(first).request("GET", "/")
    assert head.status_code == 200
    assert server.active_connections == 1

    overflow = await listener.connect()
    assert (await read_until_eof(overflow)).startswith(b"HTTP/1.1 503 ")
    await overflow.aclose()

    await first.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert server.active_connections == 0
    head, body = await H11Client(await listener.connect()).request("GET", "/")
    assert (head.status_code, body) == (200, b"hello")


async def test_run_needs_a_listener() -> None:
    with pytest.raises(ValueError, match="listener"):
        await HttpServer(Probes().router()).run([])
