"""The daemon's WebSocket client to ComfyUI, against trio-websocket's server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio_websocket

from daemon.comfy.websocket import ComfySocket, HandshakeFailed, WebSocketClosed


async def serve(
    nursery: trio.Nursery, handler: Callable[[trio_websocket.WebSocketConnection], Awaitable[None]]
) -> int:
    async def accept(request: trio_websocket.WebSocketRequest) -> None:
        await handler(await request.accept())

    server = await nursery.start(trio_websocket.serve_websocket, accept, "127.0.0.1", 0, None)
    return int(server.port)


async def connect(port: int) -> tuple[trio.SocketStream, ComfySocket]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    ws = ComfySocket(stream, max_message_bytes=1024)
    try:
        await ws.open(f"127.0.0.1:{port}", "/ws?clientId=x")
    except BaseException:
        await stream.aclose()
        raise
    return stream, ws


async def read_until_closed(ws: ComfySocket, received: list[str | bytes]) -> None:
    while True:
        received += await ws.messages()


async def test_a_burst_of_messages_comes_out_whole_and_in_order(nursery: trio.Nursery) -> None:
    sent = trio.Event()
    done = trio.Event()

    async def burst(ws: trio_websocket.WebSocketConnection) -> None:
        for n in range(50):
            await ws.send_message(f"frame {n}")
        await ws.send_message(b"\x00\x01binary")
        sent.set()
        await done.wait()

    port = await serve(nursery, burst)
    stream, ws = await connect(port)
    await sent.wait()
    received = await ws.messages()
    while len(received) < 51:
        received += await ws.messages()
    assert received == [f"frame {n}" for n in range(50)] + [b"\x00\x01binary"]
    done.set()
    await stream.aclose()


async def test_messages_before_a_close_are_delivered_then_it_raises(nursery: trio.Nursery) -> None:
    async def two_then_close(ws: trio_websocket.WebSocketConnection) -> None:
        await ws.send_message("one")
        await ws.send_message("two")
        await ws.aclose(code=1001, reason="going away")

    port = await serve(nursery, two_then_close)
    stream, ws = await connect(port)
    received: list[str | bytes] = []
    with pytest.raises(WebSocketClosed, match="1001"):
        await read_until_closed(ws, received)
    assert received == ["one", "two"]
    await stream.aclose()


async def test_our_close_is_confirmed_by_the_server(nursery: trio.Nursery) -> None:
    closed_by_peer = trio.Event()

    async def wait_for_close(ws: trio_websocket.WebSocketConnection) -> None:
        try:
            await ws.get_message()
        except trio_websocket.ConnectionClosed:
            closed_by_peer.set()

    port = await serve(nursery, wait_for_close)
    stream, ws = await connect(port)
    with trio.fail_after(10):
        await ws.aclose()
    await closed_by_peer.wait()
    await stream.aclose()


async def test_an_oversized_message_closes_the_socket(nursery: trio.Nursery) -> None:
    async def huge(ws: trio_websocket.WebSocketConnection) -> None:
        await ws.send_message("x" * 5000)
        await trio.sleep_forever()

    port = await serve(nursery, huge)
    stream, ws = await connect(port)
    with pytest.raises(WebSocketClosed, match="exceeded 1024 bytes"):
        await ws.messages()
    await stream.aclose()


async def test_a_plain_http_server_is_a_failed_handshake(nursery: trio.Nursery) -> None:
    async def http(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await nursery.start(trio.serve_listeners, http, listeners)
    with pytest.raises(HandshakeFailed, match="404"):
        await connect(port)
