"""A minimal h11-over-trio HTTP/1.1 front for the simulator.

It reads whole requests, hands them to a handler and writes whole responses,
with keep-alive. A Takeover result gets the raw stream plus the request bytes
(head re-serialised from h11's event, then whatever h11 had buffered), for the
WebSocket upgrade. `reject(request)` lets the simulator reset connections
(RST) to play a ComfyUI that is down.

Why not daemon/http: the daemon's HTTP client talks to this server in every
test, so the two sides are kept apart on purpose, like the simulator and
protocol/: a misreading of HTTP in daemon/http cannot hide behind the same
misreading on the other end of the wire. It is also tiny (whole requests,
whole responses) and has to do what a real server must not (reset on demand).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
import trio

from daemon.simulator.httptypes import HttpRequest, HttpResponse, Takeover, text_response

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
IDLE_TIMEOUT = 75.0  # aiohttp's keep-alive default
READ_TIMEOUT = 30.0


def parse_target(target: str) -> tuple[str, dict[str, str]]:
    """(percent-decoded path, first value of each query parameter, blanks kept)."""
    parts = urlsplit(target)
    query: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        query.setdefault(key, value)
    return unquote(parts.path) or "/", query


def reset_connection(stream: trio.abc.Stream) -> None:
    """Make the coming close send RST instead of FIN (SO_LINGER 0)."""
    if isinstance(stream, trio.SocketStream):
        with contextlib.suppress(OSError):
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class HttpTransport:
    """Serves `handler` on trio listeners."""

    def __init__(
        self,
        handler: Callable[[HttpRequest], Awaitable[HttpResponse | Takeover]],
        *,
        reject: Callable[[HttpRequest], bool] = lambda _request: False,
        max_body: int = 110 * 1024 * 1024,
    ) -> None:
        self._handler = handler
        self._reject = reject
        self._max_body = max_body

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """One TCP connection: requests until close, error, idle timeout or takeover."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        try:
            while True:
                head: h11.Request | None = None
                request: HttpRequest | None = None
                with trio.move_on_after(IDLE_TIMEOUT):
                    event = await self._next_event(stream, conn)
                    if isinstance(event, h11.Request):
                        head = event
                        with trio.fail_after(READ_TIMEOUT):
                            request = await self._read_request(stream, conn, event)
                if head is None or request is None:
                    return  # closed, idle too long, or gone mid-body
                if self._reject(request):
                    reset_connection(stream)
                    return
                result = await self._handler(request)
                if isinstance(result, Takeover):
                    raw = _request_head(head) + conn.trailing_data[0]
                    await result.handler(stream, raw)
                    return
                await self._send_response(stream, conn, request, result)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            await self._protocol_error(stream, conn, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    @staticmethod
    async def _next_event(stream: trio.abc.Stream, conn: h11.Connection) -> object:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(bytes(await stream.receive_some(65536)))

    async def _read_request(
        self, stream: trio.abc.Stream, conn: h11.Connection, event: h11.Request
    ) -> HttpRequest | None:
        body = bytearray()
        if conn.they_are_waiting_for_100_continue:
            await stream.send_all(
                conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
            )
        while True:
            part = await self._next_event(stream, conn)
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > self._max_body:
                    await self._send_response(
                        stream, conn, None, text_response(413, "413: Request Entity Too Large")
                    )
                    return None
            elif isinstance(part, h11.EndOfMessage):
                break
            else:
                return None  # the client went away mid-body
        path, query = parse_target(event.target.decode("latin-1"))
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
        return HttpRequest(event.method.decode("ascii"), path, query, headers, bytes(body))

    @staticmethod
    async def _send_response(
        stream: trio.abc.Stream,
        conn: h11.Connection,
        request: HttpRequest | None,
        response: HttpResponse,
    ) -> None:
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
        headers.append((b"content-length", str(len(response.body)).encode()))
        try:
            reason = HTTPStatus(response.status).phrase.encode()
        except ValueError:
            reason = b""
        data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
        if response.body and (request is None or request.method != "HEAD"):
            data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data or b"")

    async def _protocol_error(
        self, stream: trio.abc.Stream, conn: h11.Connection, exc: h11.RemoteProtocolError
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status = exc.error_status_hint
        response = text_response(status, f"{status}: {HTTPStatus(status).phrase}")
        with contextlib.suppress(
            h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            await self._send_response(stream, conn, None, response)


def _request_head(event: h11.Request) -> bytes:
    lines = [event.method + b" " + event.target + b" HTTP/" + event.http_version]
    lines.extend(name + b": " + value for name, value in event.headers.raw_items())
    return b"\r\n".join(lines) + b"\r\n\r\n"
