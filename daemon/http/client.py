"""A small HTTP/1.1 client over h11 and trio (ComfyUI calls, SSE readers, tests).

`http_request` and `open_stream` use one connection per request
(``Connection: close``); a :class:`ConnectionPool` keeps connections open for
the next request (ComfyUI's API, called for every task). ``http://`` only. Every
failure reaches the caller as one :class:`HttpClientError` naming the method
and URL; trio, h11 and socket exceptions are translated here, at the edge.
"""

from __future__ import annotations

import json
import os
import select
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

from daemon.http.limits import KiB, MiB
from daemon.http.types import Headers

_RECEIVE_SIZE = 64 * KiB
_USER_AGENT = "comfy-progress"
# Headers the client owns; callers' values for them are ignored.
_OWN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})

_JOIN_ON_LOOP_BYTES = 1024 * 1024  # larger response bodies are joined in a worker thread
_SEND_SLICE_BYTES = 256 * 1024


# Takes a response body's chunks as they arrive; it must not block (it may raise,
# which ends the request: the connection is closed).
BodySink = Callable[[bytes], None]


class HttpClientError(Exception):
    """A request failed: connect error, timeout, protocol error or oversized response."""

    def __init__(self, method: str, url: str, reason: str) -> None:
        super().__init__(f"{method} {url}: {reason}")
        self.method = method
        self.url = url
        self.reason = reason


class ResponseTooLarge(HttpClientError):
    """The response body is larger than the caller's `max_response_bytes`."""


@dataclass(frozen=True)
class ClientResponse:
    """A whole response."""

    status: int
    headers: Headers
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON (raises ValueError if it is not JSON)."""
        return json.loads(self.body)

    def text(self) -> str:
        """The body decoded as UTF-8 (invalid bytes replaced)."""
        return self.body.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class _Url:
    host: str
    port: int
    target: str
    host_header: str


def _parse_url(method: str, url: str) -> _Url:
    try:
        parts = urlsplit(url)
        port = parts.port or 80
    except ValueError as exc:
        raise HttpClientError(method, url, f"invalid URL ({exc})") from None
    if parts.scheme != "http":
        raise HttpClientError(method, url, "only http:// URLs are supported")
    if not parts.hostname:
        raise HttpClientError(method, url, "the URL has no host")
    host = parts.hostname
    shown_host = f"[{host}]" if ":" in host else host
    host_header = shown_host if port == 80 else f"{shown_host}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Url(host, port, target, host_header)


@contextmanager
def _errors_named(method: str, url: str) -> Iterator[None]:
    """Translate trio, socket and h11 exceptions into HttpClientError."""
    try:
        yield
    except trio.TooSlowError:
        raise HttpClientError(method, url, "timed out") from None
    except OSError as exc:  # connect errors: refused, unreachable, DNS
        raise HttpClientError(method, url, f"cannot connect ({exc})") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise HttpClientError(method, url, f"connection lost ({exc})") from None
    except h11.ProtocolError as exc:
        raise HttpClientError(method, url, f"HTTP protocol error ({exc})") from None


class _ClientConnection:
    """h11 client state over one trio stream."""

    def __init__(self, stream: trio.abc.Stream, *, keep_alive: bool = False) -> None:
        self._stream = stream
        self._h11 = h11.Connection(h11.CLIENT)
        self._received_any = False
        self.keep_alive = keep_alive

    @property
    def peer_closed(self) -> bool:
        return self._h11.trailing_data[1]

    @property
    def received_any(self) -> bool:
        return self._received_any

    def next_cycle(self) -> bool:
        """Ready the connection for another request, if both sides allow it."""
        if self._h11.our_state is not h11.DONE or self._h11.their_state is not h11.DONE:
            return False
        try:
            self._h11.start_next_cycle()
        except h11.LocalProtocolError:
            return False
        self._received_any = False
        return True

    async def send_request(
        self, method: str, url: _Url, headers: Sequence[tuple[str, str]], body: bytes
    ) -> None:
        request_headers = [("host", url.host_header)]
        request_headers += [(k, v) for k, v in headers if k.lower() not in _OWN_HEADERS]
        if not any(k.lower() == "user-agent" for k, _ in request_headers):
            request_headers.append(("user-agent", _USER_AGENT))
        if body or method in _METHODS_WITH_BODY:
            request_headers.append(("content-length", str(len(body))))
        if not self.keep_alive:
            request_headers.append(("connection", "close"))
        head = self._h11.send(
            h11.Request(
                method=method,
                target=url.target,
                headers=[(k.encode("ascii"), v.encode("latin-1")) for k, v in request_headers],
            )
        )
        # The body is sent as it is, not joined to the head: a 20 MiB copy on
        # the event loop costs over 10 ms.
        parts = [head or b""]
        if body:
            parts += self._h11.send_with_data_passthrough(h11.Data(data=body)) or []
        parts.append(self._h11.send(h11.EndOfMessage()) or b"")
        if sum(map(len, parts)) <= _SEND_SLICE_BYTES:
            # A small request goes out whole, in one segment: with one write
            # when the socket takes it now (no trip through the scheduler).
            parts = [self._write_nowait(b"".join(parts))]
        try:
            for part in parts:
                with memoryview(part) as view:
                    # In slices: one send of megabytes into a roomy loopback buffer
                    # would be one long step of the event loop.
                    for start in range(0, len(view), _SEND_SLICE_BYTES):
                        await self._stream.send_all(view[start : start + _SEND_SLICE_BYTES])
        except trio.BrokenResourceError:
            # The server may have answered early (413, say) and closed while
            # we were still sending: go on and read that answer.
            self._h11.send_failed()

    def _write_nowait(self, data: bytes) -> bytes:
        """Write what a plain TCP socket takes now; what is left to send."""
        stream = self._stream
        if not isinstance(stream, trio.SocketStream):
            return data
        try:
            taken = os.write(stream.socket.fileno(), data)
        except BlockingIOError:
            return data
        except OSError:
            # As a failed send_all: the server may have answered and closed already.
            self._h11.send_failed()
            return b""
        return data[taken:]

    async def next_event(self) -> h11.Event:
        while True:
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await self._stream.receive_some(_RECEIVE_SIZE)
                except trio.BrokenResourceError:
                    data = b""
                self._received_any = self._received_any or bool(data)
                self._h11.receive_data(bytes(data))
                continue
            assert isinstance(event, h11.Event)  # a client never sees PAUSED
            return event

    async def read_head(self) -> h11.Response:
        while True:
            try:
                event = await self.next_event()
            except h11.RemoteProtocolError:
                if self.peer_closed and not self._received_any:
                    raise h11.RemoteProtocolError(
                        "the server closed the connection without answering"
                    ) from None
                raise
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):
                raise h11.RemoteProtocolError(f"expected a response, got {event!r}")


def _headers_of(event: h11.Response) -> Headers:
    return Headers((k.decode("ascii"), v.decode("latin-1")) for k, v in event.headers)


async def http_request(
    method: str,
    url: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    # A parameter rather than the caller's cancel scope, so the timeout becomes
    # an HttpClientError that names the URL, like every other failure here.
    timeout: float = 30.0,  # noqa: ASYNC109
    max_response_bytes: int = 16 * MiB,
    unix_socket: str | None = None,
) -> ClientResponse:
    """Send one request on a new connection and read the whole response.

    `timeout` bounds the whole exchange (connect, send, receive). Raises
    :class:`HttpClientError` on connect failure, timeout, a protocol error,
    or a body larger than `max_response_bytes`. With `unix_socket` the
    connection goes to that AF_UNIX path; the URL still gives Host and target.
    """
    method = method.upper()
    parsed = _parse_url(method, url)
    with _errors_named(method, url), trio.fail_after(timeout):
        stream = await _connect(parsed, unix_socket)
        async with stream:
            connection = _ClientConnection(stream)
            return await _exchange(
                connection, method, url, parsed, headers, body, max_response_bytes
            )


async def _connect(parsed: _Url, unix_socket: str | None) -> trio.SocketStream:
    if unix_socket is not None:
        return await trio.open_unix_socket(unix_socket)
    return await trio.open_tcp_stream(parsed.host, parsed.port)


async def _exchange(
    connection: _ClientConnection,
    method: str,
    url: str,
    parsed: _Url,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    max_response_bytes: int,
    body_sink: BodySink | None = None,
) -> ClientResponse:
    """One request and its whole response on `connection` (a 200's body given
    to `body_sink` instead, if there is one)."""
    await connection.send_request(method, parsed, headers, body)
    head = await connection.read_head()
    sink = body_sink if head.status_code == 200 else None
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await connection.next_event()
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > max_response_bytes:
                raise ResponseTooLarge(
                    method, url, f"response body larger than {max_response_bytes} bytes"
                )
            if sink is not None:
                sink(bytes(event.data))
            else:
                chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    if size > _JOIN_ON_LOOP_BYTES:
        # bytes.join drops the GIL: a large image is put together off the loop.
        body = await trio.to_thread.run_sync(b"".join, chunks)
    else:
        body = b"".join(chunks)
    return ClientResponse(head.status_code, _headers_of(head), body)


_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


class ConnectionPool:
    """Keep-alive connections for many small requests to a few servers.

    A connection goes back to the pool when its response ended cleanly and
    both sides allow another request; at most `max_idle` per server wait
    there, each for at most `idle_timeout` s (well under the server's own
    keep-alive timeout, so the server rarely closes one under us). Before
    reuse, a connection with pending input (the server's EOF) is dropped. A
    reused connection that fails before any answer is retried once on a new
    one, for idempotent methods only: a POST may have arrived.
    """

    def __init__(self, *, max_idle: int = 64, idle_timeout: float = 4.0) -> None:
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._idle: dict[tuple[str, int], list[tuple[float, trio.SocketStream, _ClientConnection]]]
        self._idle = {}
        self.opened = 0  # connections opened (for tests and curiosity)

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        timeout: float = 30.0,  # noqa: ASYNC109 - see http_request
        max_response_bytes: int = 16 * MiB,
        body_sink: BodySink | None = None,
    ) -> ClientResponse:
        """Like :func:`http_request`, on a pooled connection. With `body_sink`, a 200's
        body goes to it chunk by chunk as it arrives (the response's `body` is
        empty): a long answer is decoded without ever being whole in memory."""
        method = method.upper()
        parsed = _parse_url(method, url)
        key = (parsed.host, parsed.port)
        with _errors_named(method, url), trio.fail_after(timeout):
            reused = self._take(key)
            if reused is not None:
                stream, connection = reused
                try:
                    response = await _exchange(
                        connection, method, url, parsed, headers, body, max_response_bytes,
                        body_sink,
                    )  # fmt: skip
                except (trio.BrokenResourceError, h11.RemoteProtocolError):
                    stream.socket.close()
                    if method not in _IDEMPOTENT or connection.received_any:
                        raise
                except BaseException:
                    stream.socket.close()
                    raise
                else:
                    self._give_back(key, stream, connection)
                    return response
            stream = await trio.open_tcp_stream(parsed.host, parsed.port)
            self.opened += 1
            connection = _ClientConnection(stream, keep_alive=True)
            try:
                response = await _exchange(
                    connection, method, url, parsed, headers, body, max_response_bytes,
                    body_sink,
                )  # fmt: skip
            except BaseException:
                stream.socket.close()
                raise
            self._give_back(key, stream, connection)
            return response

    def _take(self, key: tuple[str, int]) -> tuple[trio.SocketStream, _ClientConnection] | None:
        idle = self._idle.get(key)
        now = trio.current_time()
        while idle:
            since, stream, connection = idle.pop()
            if now - since < self.idle_timeout and not _has_input(stream):
                return stream, connection
            stream.socket.close()
        return None

    def _give_back(
        self, key: tuple[str, int], stream: trio.SocketStream, connection: _ClientConnection
    ) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < self.max_idle and connection.next_cycle():
            idle.append((trio.current_time(), stream, connection))
        else:
            stream.socket.close()

    def close(self) -> None:
        """Close every idle connection."""
        for idle in self._idle.values():
            for _, stream, _ in idle:
                stream.socket.close()
        self._idle.clear()


def _has_input(stream: trio.SocketStream) -> bool:
    """Is there something to read (an idle connection's EOF, or stray bytes)?"""
    poller = select.poll()
    poller.register(stream.socket.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class BodyChunks:
    """The body of a streamed response: an async iterator of chunks as they arrive.

    Iteration ends at the end of the body or when the server closes the
    connection; :attr:`complete` is True only in the first case.
    """

    def __init__(self, connection: _ClientConnection, method: str, url: str) -> None:
        self._connection = connection
        self._method = method
        self._url = url
        self._ended = False
        self.complete = False

    def __aiter__(self) -> BodyChunks:
        return self

    async def __anext__(self) -> bytes:
        while not self._ended:
            try:
                with _errors_named(self._method, self._url):
                    event = await self._connection.next_event()
            except HttpClientError:
                if not self._connection.peer_closed:
                    raise
                # EOF in the middle of the body: the stream just ends.
                self._ended = True
                break
            if isinstance(event, h11.Data):
                if event.data:
                    return bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                self._ended = True
                self.complete = isinstance(event, h11.EndOfMessage)
        await trio.lowlevel.checkpoint()
        raise StopAsyncIteration


@dataclass(frozen=True)
class StreamedResponse:
    """A response whose body is read as it arrives: ``async for chunk in response.chunks``.

    The iteration ends at the end of the body or when the server closes the
    connection; ``response.chunks.complete`` tells which (True: whole body).
    """

    status: int
    headers: Headers
    chunks: BodyChunks


@asynccontextmanager
async def open_stream(
    method: str,
    url: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    timeout_connect: float = 10.0,
    unix_socket: str | None = None,
) -> AsyncIterator[StreamedResponse]:
    """Send a request and yield the response as soon as its head has arrived.

    `timeout_connect` bounds connecting, sending and reading the response
    head; reading the body has no timeout (wrap it in your own cancel scope).
    The connection is closed when the ``async with`` block exits.
    `unix_socket`: as for :func:`http_request`.
    """
    method = method.upper()
    parsed = _parse_url(method, url)
    with _errors_named(method, url), trio.fail_after(timeout_connect):
        stream = await _connect(parsed, unix_socket)
    async with stream:
        connection = _ClientConnection(stream)
        with _errors_named(method, url), trio.fail_after(timeout_connect):
            await connection.send_request(method, parsed, headers, body)
            head = await connection.read_head()
        yield StreamedResponse(
            head.status_code, _headers_of(head), BodyChunks(connection, method, url)
        )
