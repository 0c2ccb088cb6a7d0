"""ConnectionTakeover and ReplayStream: a trio-websocket server behind HttpServer."""

from __future__ import annotations

import trio
import trio.testing
import trio_websocket

from daemon.http import (
    ConnectionTakeover,
    HttpServer,
    ReplayStream,
    Request,
    Router,
    http_request,
)
from tests.daemon.http.helpers import H11Client, serve_in_memory, start_server


async def websocket_echo(stream: trio.abc.Stream, raw: bytes) -> None:
    async with trio.open_nursery() as nursery:
        request = await trio_websocket.wrap_server_stream(nursery, ReplayStream(stream, raw))
        assert request.path == "/ws"
        connection = await request.accept()
        try:
            while True:
                message = await connection.get_message()
                assert isinstance(message, str)
                await connection.send_message(f"echo: {message}")
        except trio_websocket.ConnectionClosed:
            pass


async def take_over(request: Request) -> ConnectionTakeover:
    return ConnectionTakeover(websocket_echo)


async def test_websocket_handshake_works_through_a_takeover(nursery: trio.Nursery) -> None:
    router = Router()
    router.add("GET", "/ws", take_over)
    running = await start_server(nursery, router)
    url = f"ws://{running.host}:{running.port}/ws"
    async with trio_websocket.open_websocket_url(url) as websocket:
        await websocket.send_message("hello")
        assert await websocket.get_message() == "echo: hello"
        await websocket.send_message("again")
        assert await websocket.get_message() == "echo: again"


async def test_the_new_owner_gets_the_request_head_and_what_followed(
    nursery: trio.Nursery,
) -> None:
    raw_seen: list[bytes] = []
    replayed: list[bytes] = []
    second = b"GET /raw HTTP/1.1\r\nHost: t\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
    expected = second + b"EXTRA BYTES" + b"LATER"

    async def record(stream: trio.abc.Stream, raw: bytes) -> None:
        raw_seen.append(raw)
        replay = ReplayStream(stream, raw)
        data = b""
        while len(data) < len(expected):
            data += await replay.receive_some()
        replayed.append(data)
        await replay.send_all(b"taken over")

    async def handler(request: Request) -> ConnectionTakeover:
        return ConnectionTakeover(record)

    router = Router()
    router.add("GET", "/raw", handler)
    stream = serve_in_memory(nursery, HttpServer(router))
    # A normal request first, so the takeover is not the connection's first cycle.
    client = H11Client(stream)
    head, _ = await client.request("GET", "/ping")
    assert head.status_code == 404
    await stream.send_all(second + b"EXTRA BYTES")
    await trio.testing.wait_all_tasks_blocked()
    await stream.send_all(b"LATER")
    assert await stream.receive_some() == b"taken over"
    # In memory, head and extra bytes arrive in one read: the owner gets both.
    assert raw_seen == [second + b"EXTRA BYTES"]
    assert replayed == [expected]


async def test_a_request_with_a_body_cannot_be_taken_over(nursery: trio.Nursery) -> None:
    called = False

    async def owner(stream: trio.abc.Stream, raw: bytes) -> None:
        nonlocal called
        called = True
        await trio.lowlevel.checkpoint()

    async def handler(request: Request) -> ConnectionTakeover:
        return ConnectionTakeover(owner)

    router = Router()
    router.add("POST", "/raw", handler)
    running = await start_server(nursery, router)
    response = await http_request("POST", f"{running.url}/raw", body=b"payload")
    assert response.status == 500
    assert not called


async def test_replay_stream_serves_the_prefix_first() -> None:
    client, server = trio.testing.memory_stream_pair()
    replay = ReplayStream(server, b"abcdef")
    await client.send_all(b"live")
    assert await replay.receive_some(4) == b"abcd"
    assert await replay.receive_some() == b"ef"
    assert await replay.receive_some() == b"live"
    await replay.send_all(b"back")
    assert await client.receive_some() == b"back"
    await replay.aclose()
    assert await client.receive_some() == b""


async def test_replay_stream_rejects_a_zero_max_bytes() -> None:
    _, server = trio.testing.memory_stream_pair()
    replay = ReplayStream(server, b"abc")
    try:
        await replay.receive_some(0)
    except ValueError:
        pass
    else:
        raise AssertionError("receive_some(0) must raise ValueError")
