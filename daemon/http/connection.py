"""I/O adapter: h11 <-> trio, one per connection.

The shape is h11's ``examples/trio-server.py`` (``TrioHTTPWrapper``), with the
pitfalls handled: NEED_DATA and 100-continue in :meth:`H11Connection.next_event`,
EOF and connection errors fed to h11 as ``receive_data(b"")``, ``send_failed()``
on any failed or cancelled write, and errors sent only from IDLE/SEND_RESPONSE.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import termios
import time
from collections.abc import Sequence
from email.utils import formatdate
from http import HTTPStatus

import h11
import trio

from daemon.http.limits import HttpLimits, KiB, MiB
from daemon.http.types import ClientGone, error_response

RECEIVE_SIZE = 64 * KiB
# Large writes go out in slices, each under its own write_timeout: the timeout
# then means "no progress for that long", not "the whole body in that long".
WRITE_SLICE = 64 * KiB
# While lingering on close, stop reading after this much input.
_LINGER_MAX_BYTES = 1 * MiB
# A request's first bytes kept to tell a HEAD (blank lines may come before it).
HEAD_START_BYTES = 64
# Framing is ours: these headers from a handler are dropped.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})


class ConnectionLost(Exception):
    """The peer is gone or did not read a write in time; the connection is dead."""


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of `status` (empty for unknown codes)."""
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


_date_cache: tuple[int, bytes] = (-1, b"")
# Response heads made lately, by everything they are made from (see response_head).
_heads: dict[tuple[object, ...], h11.Response] = {}
_HEADS_KEPT = 256


def _http_date() -> bytes:
    """The Date header's value, formatted once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode("ascii"))
    return _date_cache[1]


def _read_nowait(fd: int) -> bytes | None:
    """What a non-blocking socket holds now: None when nothing yet; b"" at EOF or
    on a connection error (as `receive` treats them)."""
    try:
        return os.read(fd, RECEIVE_SIZE)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def peer_left(fd: int) -> bool:
    """Read (and drop) what the peer sent on a non-blocking socket, once: True when
    it has left (EOF or a connection error), False when it is still there."""
    return _read_nowait(fd) == b""


async def _read_when_readable(socket: trio.socket.SocketType) -> bytes:
    """Wait until `socket` is readable, then read what it holds (b"": the peer left)."""
    while True:
        await trio.lowlevel.wait_readable(socket)
        data = _read_nowait(socket.fileno())
        if data is not None:
            return data


class H11Connection:
    """One server-side HTTP/1.1 connection: an h11 state machine over a trio stream.

    There is one writer per connection: everything is written through
    :meth:`send`, from one task at a time.
    """

    __slots__ = (
        "_broken",
        "_head_read",
        "_head_start",
        "_limits",
        "_request_method",
        "_server_header",
        "body_ended_by_sink",
        "chunked_body",
        "h11",
        "stream",
    )

    def __init__(self, stream: trio.abc.Stream, limits: HttpLimits, *, server_header: str) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self._limits = limits
        self._server_header = server_header
        # Bytes read for the current request's head (and what came with them),
        # and the first of them: enough to tell a HEAD before h11 parsed it.
        self._head_read = 0
        self._head_start = b""
        # The method of the current request once h11 has parsed its head.
        self._request_method: bytes | None = None
        self._broken = False
        # How the current response's body is framed: chunked (HTTP/1.1 peers)
        # or close-delimited (HTTP/1.0); set when its head is sent.
        self.chunked_body = False
        # A SocketSink wrote the body's end itself (see SocketSink.body_ended).
        self.body_ended_by_sink = False

    # ------------------------------------------------------------ reading

    def begin_cycle(self) -> None:
        """Start counting the bytes of a new request's head.

        At the start of a cycle h11's unprocessed buffer is exactly the start
        of the next request (pipelined bytes), so counting begins with it.
        """
        pending = self.h11.trailing_data[0]
        self._head_read = len(pending)
        self._head_start = bytes(pending[:HEAD_START_BYTES])
        self._request_method = None

    @property
    def head_size(self) -> int:
        """Bytes of the request head, valid right after h11 returned the Request."""
        return self._head_read - len(self.h11.trailing_data[0])

    @property
    def has_unread_input(self) -> bool:
        """True when h11 already holds input (pipelined bytes or EOF) to process."""
        data, closed = self.h11.trailing_data
        return bool(data) or closed

    async def receive(self, *, wait_first: bool = False) -> None:
        """Read once from the peer into h11; EOF and connection errors become EOF.

        `wait_first`: the peer has probably sent nothing yet (a keep-alive
        connection between requests), so wait until the socket is readable and
        then read, instead of a read that fails first (a syscall and an exception).
        """
        stream = self.stream
        data: bytes | bytearray
        if wait_first and isinstance(stream, trio.SocketStream):
            data = await _read_when_readable(stream.socket)
        else:
            try:
                data = await stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
        if self.h11.their_state is h11.IDLE:  # still reading the head
            self._head_read += len(data)
            if len(self._head_start) < HEAD_START_BYTES:
                self._head_start += data[: HEAD_START_BYTES - len(self._head_start)]
        self.h11.receive_data(bytes(data))

    async def next_event(self) -> h11.Event:
        """The next event from the peer, reading as needed.

        Sends ``100 Continue`` when the client waits for it before its body.
        """
        while True:
            event = self.buffered_event()
            if event is not None:
                return event
            if self.h11.they_are_waiting_for_100_continue:
                await self.send(h11.InformationalResponse(status_code=100, headers=[]))
            await self.receive()

    def buffered_event(self) -> h11.Event | None:
        """The next event if h11 can make it from the input it holds; None when it
        needs more (no I/O: a caller can skip its read timeout when this answers)."""
        event = self.h11.next_event()
        if event is h11.NEED_DATA:
            return None
        if event is h11.PAUSED:
            # The server answers each request before reading the next one,
            # and start_next_cycle() clears PAUSED; reaching this is a bug.
            raise RuntimeError("h11 is PAUSED: next_event() called after the request ended")
        assert isinstance(event, h11.Event)
        if isinstance(event, h11.Request):
            self._request_method = event.method
        return event

    async def wait_until_peer_leaves(self) -> None:
        """Read and drop input until EOF or a connection error.

        Used while a streaming response runs: the peer sends nothing we need,
        and its EOF is how we learn that it left.
        """
        if self.h11.trailing_data[1]:
            await trio.lowlevel.checkpoint()
            return
        if isinstance(self.stream, trio.SocketStream):
            # Straight at the socket: no timeout scope or checkpoint per read.
            socket = self.stream.socket
            while await _read_when_readable(socket):
                pass  # input while a response streams: dropped
            return
        while True:
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return

    # ------------------------------------------------------------ writing

    async def send(self, *events: h11.Event) -> None:
        """Serialize `events` and write them, each slice within ``write_timeout``.

        Raises :class:`ConnectionLost` when the peer is gone or too slow. On any
        failed write (cancellation included) h11 is told with ``send_failed()``,
        since part of the data may have gone out.
        """
        if self._broken:
            raise ConnectionLost("connection already failed")
        parts = [self.h11.send(event) or b"" for event in events]
        if isinstance(events[0], h11.Response):
            self.chunked_body = b"\r\ntransfer-encoding: chunked\r\n" in parts[0].lower()
        data = memoryview(b"".join(parts))
        # What the socket takes at once needs no timeout, nor a trip through the
        # scheduler (the common case: a whole small response).
        taken = self._write_nowait(data)
        if taken == len(data):
            return
        data = data[taken:]
        try:
            for start in range(0, len(data), WRITE_SLICE):
                with trio.fail_after(self._limits.write_timeout):
                    await self.stream.send_all(data[start : start + WRITE_SLICE])
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._mark_send_failed()
            raise ConnectionLost(type(exc).__name__) from None
        except BaseException:
            self._mark_send_failed()
            raise

    def _write_nowait(self, data: memoryview) -> int:
        """Write what a plain TCP socket takes now; 0 for other streams."""
        stream = self.stream
        if not isinstance(stream, trio.SocketStream) or not data:
            return 0
        try:
            return os.write(stream.socket.fileno(), data)
        except BlockingIOError:
            return 0
        except OSError as exc:  # the peer is gone (or the socket closed under us)
            self._mark_send_failed()
            raise ConnectionLost(type(exc).__name__) from None

    def _mark_send_failed(self) -> None:
        self._broken = True
        self.h11.send_failed()

    def response_head(
        self,
        status: int,
        headers: Sequence[tuple[str, str]],
        *,
        content_length: int | None,
        close: bool,
    ) -> h11.Response:
        """The h11 response head: the handler's headers plus ours.

        Adds Date and Server unless present, sets Content-Length when given
        (otherwise h11 picks chunked or close-delimited framing), and adds
        ``Connection: close`` when `close`. Raises ``h11.LocalProtocolError``,
        ``UnicodeEncodeError`` or ``ValueError`` for headers that cannot be sent.
        """
        # Most responses repeat one of a few heads within a second (the Date
        # changes once a second): h11 validates each header of a new head, so a
        # head made before is reused (it is immutable, and h11 sends a copy).
        date = _http_date()
        key: tuple[object, ...] | None
        key = (status, tuple(headers), content_length, close, date, self._server_header)
        try:
            head = _heads.get(key)
        except TypeError:  # an unhashable header pair (a list, say): made afresh
            head, key = None, None
        if head is None:
            head = self._new_response_head(
                status, headers, content_length=content_length, close=close, date=date
            )
            if key is not None:
                if len(_heads) >= _HEADS_KEPT:
                    _heads.clear()
                _heads[key] = head
        return head

    def _new_response_head(
        self,
        status: int,
        headers: Sequence[tuple[str, str]],
        *,
        content_length: int | None,
        close: bool,
        date: bytes,
    ) -> h11.Response:
        out: list[tuple[bytes, bytes]] = []
        seen: set[str] = set()
        for name, value in headers:
            lower = name.lower()
            if lower in _FRAMING_HEADERS or (close and lower == "connection"):
                continue
            seen.add(lower)
            out.append((name.encode("ascii"), value.encode("latin-1")))
        if "date" not in seen:
            out.append((b"date", date))
        if "server" not in seen and self._server_header:
            out.append((b"server", self._server_header.encode("latin-1")))
        if content_length is not None:
            out.append((b"content-length", str(content_length).encode("ascii")))
        if close:
            out.append((b"connection", b"close"))
        return h11.Response(status_code=status, headers=out, reason=reason_phrase(status))

    async def send_error(
        self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Answer `status` with the JSON error body, `headers` and ``Connection: close``.

        Only possible while h11 is IDLE or SEND_RESPONSE on our side (otherwise
        part of another response is out already); silently skipped then.
        """
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        response = error_response(status, message)
        response_headers = [*response.headers, *headers]
        if self._answering_head():
            # No body for a HEAD. When h11 has not parsed the head it does not
            # know it is a HEAD: no length then either (the close ends it).
            length = len(response.body) if self._request_method is not None else None
            head = self.response_head(status, response_headers, content_length=length, close=True)
            await self.send(head, h11.EndOfMessage())
            return
        head = self.response_head(
            status, response_headers, content_length=len(response.body), close=True
        )
        await self.send(head, h11.Data(data=response.body), h11.EndOfMessage())

    def _answering_head(self) -> bool:
        """True when the request being answered is a HEAD (parsed, or only begun)."""
        if self._request_method is not None:
            return self._request_method == b"HEAD"
        return self._head_start.lstrip(b"\r\n").startswith(b"HEAD ")

    def start_next_cycle(self) -> bool:
        """Reset h11 for the next request on this connection, if both sides allow it."""
        if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
            return False
        try:
            self.h11.start_next_cycle()
        except h11.ProtocolError:
            return False
        return True

    # ------------------------------------------------------------ closing

    def may_close_at_once(self) -> bool:
        """A SocketSink ended the body and nothing is unread: a close now sends
        our FIN after the data (no reset), nothing to drain."""
        return self.body_ended_by_sink and _unread_bytes(self.stream) == 0

    async def close_gracefully(self) -> None:
        """Half-close, then read and drop what the peer still sends, for a while.

        Closing a socket with unread input makes the kernel send a reset, which
        can destroy our last response before the client reads it.
        """
        with (
            trio.move_on_after(self._limits.close_linger_timeout),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            if isinstance(self.stream, trio.abc.HalfCloseableStream):
                await self.stream.send_eof()
            drained = 0
            while drained < _LINGER_MAX_BYTES:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                if not data:
                    break
                drained += len(data)


def _unread_bytes(stream: trio.abc.Stream) -> int:
    """Bytes waiting in a socket's receive queue (-1: unknown)."""
    if not isinstance(stream, trio.SocketStream):
        return -1
    try:
        buffer = fcntl.ioctl(stream.socket.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return -1
    return int.from_bytes(buffer, sys.byteorder, signed=True)


class SocketSink:
    """Non-blocking writes of pre-framed body bytes straight to a connection's socket.

    The fast path of a streaming response: a publisher writes the same bytes to
    many sockets without a task switch per socket. The bytes must already
    carry the body's framing (`chunked`); h11 does not see them, which is fine
    because neither framing counts body bytes. The caller keeps the one-writer
    rule: a write that was taken only in part must be finished before
    anything else is written.
    """

    __slots__ = ("_connection", "_socket", "chunked", "fd", "write_timeout")

    def __init__(self, connection: H11Connection, socket: trio.socket.SocketType) -> None:
        self._connection = connection
        self._socket = socket
        self.fd = socket.fileno()  # for os.write in a publisher's loop (see `failed`)
        self.chunked = connection.chunked_body
        self.write_timeout = connection._limits.write_timeout

    def frame(self, data: bytes) -> bytes:
        """`data` as one piece of this body (a chunk, or as is when close-delimited)."""
        return b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data

    def write_nowait(self, data: bytes | memoryview) -> int:
        """Write what the socket takes now; how many bytes it took (0: none).

        Raises ClientGone when the connection is broken.
        """
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise self.failed(exc) from None

    def body_ended(self) -> None:
        """The bytes written ended the body (a chunked body's last-chunk was in
        them; a close-delimited one ends as the connection closes): the server
        writes nothing more, and closes at once if the client sent nothing."""
        self._connection.body_ended_by_sink = True

    def peer_left(self) -> bool:
        """Read (and drop) what the client sent, once: True when it has left."""
        return peer_left(self.fd)

    def failed(self, exc: OSError) -> ClientGone:
        """A write to `fd` failed with `exc`: the connection is dead; what to raise."""
        self._connection._mark_send_failed()
        return ClientGone(f"client went away ({exc.strerror})")

    async def wait_writable(self) -> None:
        """Until the socket can take more; ClientGone after `write_timeout` without."""
        try:
            with trio.fail_after(self.write_timeout):
                await trio.lowlevel.wait_writable(self._socket)
        except trio.TooSlowError:
            self._connection._mark_send_failed()
            raise ClientGone("client stopped reading") from None
        except trio.ClosedResourceError:
            raise ClientGone("connection closed") from None


class ConnectionBodyWriter:
    """The :class:`~daemon.http.types.BodyWriter` of a streaming response."""

    __slots__ = ("_connection", "_open", "wait_until_peer_leaves")

    def __init__(self, connection: H11Connection) -> None:
        self._connection = connection
        self._open = True
        # Read and drop the client's input until it leaves (for `watches_peer`
        # streams); the connection's own method, so a waiting stream holds one
        # frame less.
        self.wait_until_peer_leaves = connection.wait_until_peer_leaves

    def socket_sink(self) -> SocketSink | None:
        """The fast path to the socket, when the connection is a plain TCP socket."""
        stream = self._connection.stream
        if not self._open or not isinstance(stream, trio.SocketStream):
            return None
        return SocketSink(self._connection, stream.socket)

    async def send(self, data: bytes) -> None:
        """Write one chunk; raises ClientGone when the peer is gone or too slow."""
        if not self._open:
            raise ClientGone("the response has already ended")
        if not data:
            # An empty chunk would end a chunked body; there is nothing to send.
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._connection.send(h11.Data(data=data))
        except ConnectionLost as exc:
            raise ClientGone(f"client went away or stopped reading ({exc})") from None

    def close(self) -> None:
        """Refuse further writes (the stream function has returned)."""
        self._open = False
