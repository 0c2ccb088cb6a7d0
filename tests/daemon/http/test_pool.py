"""The keep-alive connection pool used for ComfyUI's API."""

from __future__ import annotations

import json

import pytest
import trio

from daemon.http.client import ConnectionPool, HttpClientError
from tests.daemon.http.test_client import start_raw_server


class CountingServer:
    """Answers every request on a connection with its connection and request numbers;
    closes a connection after `requests_per_connection` answers (without saying so)."""

    def __init__(self, requests_per_connection: int = 1000) -> None:
        self.connections = 0
        self.requests_per_connection = requests_per_connection
        self.closed = 0  # connections this side has closed

    async def talk(self, stream: trio.SocketStream) -> None:
        await self._answer(stream)
        await stream.aclose()  # on loopback our FIN is in the peer's socket when this returns
        self.closed += 1

    async def _answer(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        buffer = b""
        for answered in range(self.requests_per_connection):
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                buffer += await stream.receive_some(65536)
            buffer = buffer[length:]
            body = json.dumps({"connection": number, "request": answered}).encode()
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)
            )


async def test_requests_reuse_one_connection(nursery: trio.Nursery) -> None:
    server = CountingServer()
    url = await start_raw_server(nursery, server.talk)
    pool = ConnectionPool()
    answers = [(await pool.request("GET", f"{url}/x")).json() for _ in range(5)]
    answers.append((await pool.request("POST", f"{url}/x", body=b"{}")).json())
    assert [a["connection"] for a in answers] == [1] * 6
    assert [a["request"] for a in answers] == list(range(6))
    assert pool.opened == 1
    pool.close()


async def test_a_connection_the_server_closed_is_not_reused(nursery: trio.Nursery) -> None:
    server = CountingServer(requests_per_connection=1)
    url = await start_raw_server(nursery, server.talk)
    pool = ConnectionPool()
    first = (await pool.request("GET", f"{url}/x")).json()
    while server.closed < 1:  # noqa: ASYNC110 - nothing to wait on but the server's count
        await trio.sleep(0.001)
    second = (await pool.request("POST", f"{url}/x", body=b"{}")).json()
    assert (first["connection"], second["connection"]) == (1, 2)
    pool.close()


async def test_idle_connections_expire(nursery: trio.Nursery, autojump_clock: object) -> None:
    server = CountingServer()
    url = await start_raw_server(nursery, server.talk)
    pool = ConnectionPool(idle_timeout=4.0)
    await pool.request("GET", f"{url}/x")
    await trio.sleep(5.0)
    answer = (await pool.request("GET", f"{url}/x")).json()
    assert answer["connection"] == 2
    pool.close()


async def test_a_post_on_a_dropped_connection_is_not_sent_twice(nursery: trio.Nursery) -> None:
    received: list[bytes] = []

    async def answer_once_then_drop(stream: trio.SocketStream) -> None:
        data = await stream.receive_some(65536)
        received.append(data)
        if len(received) == 1:
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            # Swallow the next request and close without an answer.
            received.append(await stream.receive_some(65536))

    url = await start_raw_server(nursery, answer_once_then_drop)
    pool = ConnectionPool()
    await pool.request("GET", f"{url}/x")
    with pytest.raises(HttpClientError):
        await pool.request("POST", f"{url}/x", body=b"{}")
    assert sum(1 for r in received if r.startswith(b"POST")) == 1
    pool.close()
