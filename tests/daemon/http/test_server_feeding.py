"""The same pipelined input fed whole, byte by byte and split anywhere gives the same answers."""

from __future__ import annotations

import re

import trio
import trio.testing

from daemon.http import HttpServer, Request, Response, Router
from tests.daemon.http.helpers import read_until_eof, serve_in_memory

PIPELINE = (
    b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    b"GET /echo?x=1 HTTP/1.1\r\nHost: t\r\n\r\n"
    b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nConnection: close\r\n\r\nend"
)
_DATE = re.compile(rb"date: [^\r]*\r\n", re.IGNORECASE)


def make_server() -> HttpServer:
    async def echo(request: Request) -> Response:
        await trio.lowlevel.checkpoint()
        return Response(
            200, [], request.method.encode() + b" " + request.target.encode() + b" " + request.body
        )

    router = Router()
    router.add("GET", "/echo", echo)
    router.add("POST", "/echo", echo)
    return HttpServer(router)


async def exchange(server: HttpServer, pieces: list[bytes]) -> bytes:
    async with trio.open_nursery() as nursery:
        client = serve_in_memory(nursery, server)
        for piece in pieces:
            await client.send_all(piece)
            await trio.testing.wait_all_tasks_blocked()
        answer = await read_until_eof(client)
        await client.aclose()
    return _DATE.sub(b"", answer)


async def test_input_split_anywhere_gives_the_same_answers() -> None:
    server = make_server()
    whole = await exchange(server, [PIPELINE])
    assert whole.count(b"HTTP/1.1 200 OK") == 3
    assert b"POST /echo hello world" in whole
    assert b"GET /echo?x=1 " in whole
    assert whole.endswith(b"POST /echo end")

    assert await exchange(server, [bytes([b]) for b in PIPELINE]) == whole
    for cut in range(1, len(PIPELINE)):
        assert await exchange(server, [PIPELINE[:cut], PIPELINE[cut:]]) == whole, cut


async def test_a_body_of_tiny_chunks_lets_other_tasks_run_while_it_is_read() -> None:
    # 20,000 one-byte chunks come in two reads, each some 10,000 h11 events: read
    # in one go they held the event loop (every other connection) for a second.
    chunks = 20_000
    body = b"1\r\nx\r\n" * chunks + b"0\r\n\r\n"
    head = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    handled = trio.Event()
    turns = 0  # how often another task got to run while the body was read

    async def echo(request: Request) -> Response:
        handled.set()
        await trio.lowlevel.checkpoint()
        return Response(200, [], b"%d" % len(request.body))

    async def other_task() -> None:
        nonlocal turns
        while not handled.is_set():
            turns += 1
            await trio.lowlevel.checkpoint()

    router = Router()
    router.add("POST", "/echo", echo, max_body=chunks)
    async with trio.open_nursery() as nursery:
        client, server_end = trio.testing.memory_stream_pair()
        # All of it is there before the server reads: it never waits for input,
        # so the other task runs only when the server lets it.
        await client.send_all(head + body)
        nursery.start_soon(HttpServer(router).serve_connection, server_end)
        nursery.start_soon(other_task)
        await handled.wait()
        await client.send_eof()
        answer = await read_until_eof(client)
    assert answer.endswith(b"\r\n\r\n20000")
    assert turns >= chunks // 100, turns
