"""Test helpers: a running server on a real port, an in-memory listener, an h11 test client."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import h11
import trio
import trio.testing

from daemon.http import Handler, HttpLimits, HttpServer


@dataclass
class RunningServer:
    """An HttpServer serving on 127.0.0.1 (real socket) until `stopped` is set."""

    server: HttpServer
    host: str
    port: int
    stopped: trio.Event

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream(self.host, self.port)


async def start_server(
    nursery: trio.Nursery,
    handler: Handler,
    limits: HttpLimits | None = None,
    *,
    on_rejected: Callable[[int], None] | None = None,
) -> RunningServer:
    """Start `handler` behind an HttpServer on a free port; ready when this returns."""
    server = HttpServer(handler, limits, on_rejected=on_rejected)
    stopped = trio.Event()

    async def run(*, task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        try:
            await server.run(listeners, task_status=task_status)
        finally:
            stopped.set()

    addresses: list[tuple[str, int]] = await nursery.start(run)
    host, port = addresses[0]
    return RunningServer(server, host, port, stopped)


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose connections are in-memory stream pairs (for autojump_clock tests)."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](0)
        self.closed = False

    async def connect(self) -> trio.abc.Stream:
        """Open a connection; returns the client end."""
        client, server = trio.testing.memory_stream_pair()
        await self._send.send(server)
        return client

    async def accept(self) -> trio.abc.Stream:
        try:
            return await self._receive.receive()
        except trio.ClosedResourceError:
            raise trio.ClosedResourceError("listener closed") from None

    async def aclose(self) -> None:
        self.closed = True
        self._receive.close()
        await trio.lowlevel.checkpoint()


def serve_in_memory(
    nursery: trio.Nursery, server: HttpServer, *, lockstep: bool = False
) -> trio.abc.Stream:
    """Serve one in-memory connection with `server`; returns the client end."""
    pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    client, server_end = pair()
    nursery.start_soon(functools.partial(server.serve_connection, server_end, peer="test"))
    return client


class H11Client:
    """A real h11 client over any trio stream, for driving the server step by step."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    async def send(self, *events: h11.Event) -> None:
        await self.stream.send_all(b"".join(self.h11.send(event) or b"" for event in events))

    async def send_request(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        *,
        http_version: str = "1.1",
    ) -> None:
        all_headers = [("host", "test"), *headers]
        if body and not any(k.lower() == "transfer-encoding" for k, _ in headers):
            all_headers.append(("content-length", str(len(body))))
        events: list[h11.Event] = [
            h11.Request(
                method=method, target=target, headers=all_headers, http_version=http_version
            )
        ]
        if body:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        await self.send(*events)

    def pretend_sent(self, method: str = "GET") -> None:
        """Move h11 as if a request was sent (for requests written as raw bytes)."""
        self.h11.send(h11.Request(method=method, target="/", headers=[("host", "test")]))
        self.h11.send(h11.EndOfMessage())

    async def next_event(self) -> h11.Event:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                self.h11.receive_data(bytes(data))
                continue
            assert isinstance(event, h11.Event)
            return event

    async def read_head(self) -> h11.Response:
        event = await self.next_event()
        assert isinstance(event, h11.Response), event
        return event

    async def read_body(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            event = await self.next_event()
            if isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            assert isinstance(event, h11.Data), event
            chunks.append(bytes(event.data))

    async def read_response(self) -> tuple[h11.Response, bytes]:
        head = await self.read_head()
        return head, await self.read_body()

    async def request(
        self, method: str, target: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
    ) -> tuple[h11.Response, bytes]:
        await self.send_request(method, target, headers, body)
        return await self.read_response()


def header(response: h11.Response, name: str) -> str | None:
    """One header of an h11 response, decoded."""
    wanted = name.lower().encode("ascii")
    for key, value in response.headers:
        if key == wanted:
            return value.decode("latin-1")
    return None


async def read_until_eof(stream: trio.abc.Stream) -> bytes:
    """Everything the peer sends until it closes (a reset counts as close)."""
    chunks = []
    while True:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            break
        if not data:
            break
        chunks.append(bytes(data))
    return b"".join(chunks)
