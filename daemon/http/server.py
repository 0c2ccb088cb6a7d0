"""HTTP/1.1 server over h11 and trio: accept loop, request cycle, graceful shutdown.

One task per connection runs request/response cycles in the style of h11's
``examples/trio-server.py``: read a whole request (head under
``header_read_timeout``, body under ``body_read_timeout`` and the route's size
limit), call the handler, write the response (each write under
``write_timeout``), then either start the next cycle (keep-alive, pipelining)
or close. Streaming responses run with no request timeout at all.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import h11
import trio

from daemon.http.connection import (
    ConnectionBodyWriter,
    ConnectionLost,
    H11Connection,
)
from daemon.http.limits import HttpLimits
from daemon.http.target import BadTarget, check_form, decode_path, parse_query, split_target
from daemon.http.types import (
    BodyLimitProvider,
    ClientGone,
    Handler,
    HandlerResult,
    Headers,
    HeadersForErrors,
    RefusalBeforeBody,
    Request,
    Response,
    StreamBody,
    StreamingResponse,
    error_response,
)

__all__ = ["HttpLimits", "HttpServer"]

logger = logging.getLogger(__name__)

# accept() errors that mean "out of resources for now": wait and retry
# (the same list as trio.serve_listeners).
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_BACKOFF = 0.1
# Connections past max_connections answered 503 at once: each keeps its descriptor
# while it lingers (up to close_linger_timeout); the rest are closed unanswered,
# so a flood cannot take the descriptors the daemon keeps for its own files.
_MAX_REJECTING = 32

_MESSAGES = {
    400: "malformed request",
    408: "request timeout",
    413: "request body too large",
    431: "request header fields too large",
    500: "internal server error",
    501: "transfer coding not implemented (only chunked)",
    503: "server is at its connection limit",
    505: "HTTP version not supported (only HTTP/1.x)",
}
_BODYLESS_STATUSES = frozenset({204, 304})
_JOIN_ON_LOOP_BYTES = 1024 * 1024  # larger bodies are put together in a worker thread
# Body events read from one buffer before others may run (a few ms of h11's work).
_EVENTS_PER_CHECKPOINT = 64


class _Rejected(Exception):
    """The request cannot be read or served: answer `status` and close. `request`:
    its head (empty body), once it was read."""

    def __init__(self, status: int, request: Request | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.message = _MESSAGES.get(status, "bad request")
        self.request = request


class _AnsweredBeforeBody(Exception):
    """The handler refused the request from its head: answer `response` and close."""

    def __init__(self, request: Request, response: Response) -> None:
        super().__init__(response.status)
        self.request = request
        self.response = response


class HttpServer:
    """An HTTP/1.1 server calling one :data:`~daemon.http.types.Handler` per request.

    Start it with ``await nursery.start(server.run, listeners)``; stop it with
    :meth:`begin_shutdown` (graceful) or by cancelling ``run``.
    """

    def __init__(
        self,
        handler: Handler,
        limits: HttpLimits | None = None,
        *,
        server_header: str = "comfy-progress",
        on_rejected: Callable[[int], None] | None = None,
    ) -> None:
        """`on_rejected(status)` hears of each request answered before it reached
        the handler (malformed, too slow, too large, or over the connection limit)."""
        self._handler = handler
        # The optional hook, looked up once: a runtime Protocol check costs ~10 us a request.
        self._body_limits: BodyLimitProvider | None = (
            handler if isinstance(handler, BodyLimitProvider) else None
        )
        self._refusals: RefusalBeforeBody | None = (
            handler if isinstance(handler, RefusalBeforeBody) else None
        )
        self._error_headers: HeadersForErrors | None = (
            handler if isinstance(handler, HeadersForErrors) else None
        )
        self._on_rejected = on_rejected
        self._limits = limits if limits is not None else HttpLimits()
        self._server_header = server_header
        self._active_connections = 0
        self._rejecting = 0  # overflow connections being answered 503
        # Cancel scopes of connections waiting for a request: shutdown closes them.
        self._idle_scopes: set[trio.CancelScope] = set()
        self._shutdown_deadline: float | None = None
        self._accept_scope: trio.CancelScope | None = None
        self._handler_nursery: trio.Nursery | None = None

    @property
    def limits(self) -> HttpLimits:
        """The limits this server enforces."""
        return self._limits

    @property
    def active_connections(self) -> int:
        """Connections being served now (rejected overflow connections not included)."""
        return self._active_connections

    @property
    def shutting_down(self) -> bool:
        """True once :meth:`begin_shutdown` has been called."""
        return self._shutdown_deadline is not None

    # ------------------------------------------------------------ lifecycle

    async def run(
        self,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and serve connections until cancelled or shut down.

        Calls ``task_status.started(addresses)`` once accepting, with the bound
        ``(host, port)`` of every TCP listener (Unix sockets and other listeners
        add nothing).
        Takes ownership of `listeners` and closes them when accepting stops.
        After :meth:`begin_shutdown`, returns once every connection has ended.
        """
        if not listeners:
            raise ValueError("HttpServer.run() needs at least one listener")
        addresses = [_bound_address(listener) for listener in listeners]
        try:
            # Nesting as in hypercorn's run.py: shutdown cancels the accept
            # scope at once and gives the handler nursery a deadline.
            async with trio.open_nursery() as handler_nursery:
                self._handler_nursery = handler_nursery
                with trio.CancelScope() as accept_scope:
                    self._accept_scope = accept_scope
                    if self._shutdown_deadline is not None:
                        self._apply_shutdown(self._shutdown_deadline)
                    async with trio.open_nursery() as accept_nursery:
                        for listener in listeners:
                            accept_nursery.start_soon(self._accept_loop, listener, handler_nursery)
                        task_status.started([a for a in addresses if a is not None])
        finally:
            self._handler_nursery = None
            self._accept_scope = None

    def begin_shutdown(self, grace: float) -> None:
        """Stop accepting, close idle connections, cancel the rest after `grace` s.

        Requests in flight may finish within the grace period (their responses
        say ``Connection: close``); streams still running at the
        deadline are cancelled. ``run()`` returns when all connections ended.
        Calling it again can only bring the deadline closer.
        """
        deadline = trio.current_time() + grace
        if self._shutdown_deadline is not None:
            deadline = min(deadline, self._shutdown_deadline)
        self._shutdown_deadline = deadline
        self._apply_shutdown(deadline)

    def _apply_shutdown(self, deadline: float) -> None:
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        if self._handler_nursery is not None:
            scope = self._handler_nursery.cancel_scope
            scope.deadline = min(scope.deadline, deadline)
        for idle_scope in self._idle_scopes:
            idle_scope.cancel()

    async def _accept_loop(
        self, listener: trio.abc.Listener[trio.abc.Stream], handler_nursery: trio.Nursery
    ) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    logger.error(
                        "accept() failed (%s); retrying in %.1f s",
                        os.strerror(exc.errno or 0),
                        _ACCEPT_BACKOFF,
                    )
                    await trio.sleep(_ACCEPT_BACKOFF)
                    continue
                # Counted here, not in the task, so a burst of accepts cannot
                # overshoot the limit before the tasks start.
                if self._active_connections >= self._limits.max_connections:
                    handler_nursery.start_soon(self._reject_overloaded, stream)
                else:
                    self._active_connections += 1
                    handler_nursery.start_soon(
                        functools.partial(
                            self.serve_connection, stream, peer=_peer_name(stream), counted=True
                        )
                    )

    async def _reject_overloaded(self, stream: trio.abc.Stream) -> None:
        logger.warning("connection limit (%d) reached; answering 503", self._limits.max_connections)
        self._report_rejected(503)
        if self._rejecting >= _MAX_REJECTING:
            await trio.aclose_forcefully(stream)
            return
        self._rejecting += 1
        connection = H11Connection(stream, self._limits, server_header=self._server_header)
        async with stream:
            try:
                await connection.send_error(503, _MESSAGES[503])
                await connection.close_gracefully()
            except ConnectionLost:
                logger.debug("overflow connection left before its 503")
            except Exception:
                logger.exception("answering 503 failed")
            finally:
                self._rejecting -= 1

    def _report_rejected(self, status: int) -> None:
        if self._on_rejected is not None:
            self._on_rejected(status)

    # ------------------------------------------------------------ one connection

    async def serve_connection(
        self, stream: trio.abc.Stream, *, peer: str = "unknown", counted: bool = False
    ) -> None:
        """Serve requests on one connection until it closes; always closes `stream`.

        ``run()`` calls this for every accepted connection (`counted`: it is in
        ``active_connections``); tests call it directly on in-memory streams.
        Never raises except ``trio.Cancelled``.
        """
        connection = H11Connection(stream, self._limits, server_header=self._server_header)
        try:
            lingers = await self._serve_requests(connection, peer)
            if lingers and not connection.may_close_at_once():
                await connection.close_gracefully()
        except Exception:
            # A bug here must not take the whole server down with it.
            logger.exception("HTTP connection from %s failed", peer)
        finally:
            if counted:
                self._active_connections -= 1
            if isinstance(stream, trio.SocketStream):
                # What its aclose() does, without the two scheduler rounds that
                # aclose_forcefully() costs: a thousand streams end together.
                stream.socket.close()
            else:
                await trio.aclose_forcefully(stream)

    async def _serve_requests(self, connection: H11Connection, peer: str) -> bool:
        """Run request/response cycles; True when the connection should linger on close."""
        connected_at = trio.current_time()
        first = True
        try:
            while True:
                try:
                    request = await self._read_request(connection, peer, first, connected_at)
                except _Rejected as rejection:
                    self._report_rejected(rejection.status)
                    headers = self._headers_for_error(rejection.request)
                    await connection.send_error(rejection.status, rejection.message, headers)
                    return True
                except _AnsweredBeforeBody as early:
                    # The body stays unread, so the connection cannot carry another request.
                    await self._send_whole(connection, early.request, early.response, close=True)
                    return True
                if request is None:
                    return True
                first = False
                result = await self._call_handler(request)
                if isinstance(result, StreamingResponse):
                    # A stream may stay open for hours: keep only the request line.
                    request = _request_line(request)
                    return await self._send_streaming(connection, request, result)
                await self._send_whole(connection, request, result)
                if len(request.body) > _JOIN_ON_LOOP_BYTES:
                    # Freeing megabytes costs milliseconds (munmap): not on the loop.
                    last_reference = [request]
                    del request
                    await trio.to_thread.run_sync(last_reference.clear)
                if not connection.start_next_cycle():
                    return True
        except ConnectionLost:
            return False

    # ------------------------------------------------------------ reading a request

    async def _read_request(
        self, connection: H11Connection, peer: str, first: bool, connected_at: float
    ) -> Request | None:
        """Read one whole request; None when the connection should close quietly.

        Raises :class:`_Rejected` for requests to answer with an error.
        """
        connection.begin_cycle()
        limits = self._limits
        if first:
            head_deadline = connected_at + limits.header_read_timeout
            idle_deadline = head_deadline
        else:
            idle_deadline = trio.current_time() + limits.keep_alive_timeout
        if connection.has_unread_input:
            # Pipelined: served without waiting, so let others run first.
            await trio.lowlevel.checkpoint()
        elif not await self._wait_for_input(connection, idle_deadline, keep_alive=not first):
            return None
        if not first:
            # Keep-alive requests get their head timeout from their first byte.
            head_deadline = trio.current_time() + limits.header_read_timeout
        try:
            # A timeout scope only when there is something to wait for.
            event = connection.buffered_event()
            if event is None:
                with trio.fail_at(head_deadline):
                    event = await connection.next_event()
            if isinstance(event, h11.ConnectionClosed):
                return None
            if not isinstance(event, h11.Request):
                raise RuntimeError(f"expected a request head, got {event!r}")
            if connection.head_size > limits.max_header_bytes:
                # h11 only bounds *incomplete* heads; a whole one can arrive in one read.
                raise _Rejected(431)
            if not event.http_version.startswith(b"1."):
                # h11 passes any digit.digit version. RFC 9110 6.2: a higher 1.x
                # minor is served as 1.1; another major is refused (15.6.6).
                raise _Rejected(505)
            method, target, path, query = self._request_line(event)
            limit = self._body_limit_for(method, target)
            declared = _declared_length(event)
            if declared is not None and declared > limit:
                # Refused before reading (and before 100 Continue is sent).
                raise _Rejected(413, _request(event, method, target, path, query, b"", peer))
            if self._refusals is not None and connection.h11.they_are_waiting_for_100_continue:
                self._refuse_before_body(_request(event, method, target, path, query, b"", peer))
            try:
                body = await self._read_body(
                    connection, limit, trio.current_time() + limits.body_read_timeout
                )
            except (_Rejected, trio.TooSlowError) as exc:
                status = exc.status if isinstance(exc, _Rejected) else 408
                head = _request(event, method, target, path, query, b"", peer)
                raise _Rejected(status, head) from None
        except h11.RemoteProtocolError as exc:
            logger.debug("bad request from %s: %s", peer, exc)
            raise _Rejected(exc.error_status_hint) from None
        except trio.TooSlowError:
            raise _Rejected(408) from None
        return _request(event, method, target, path, query, body, peer)

    def _refuse_before_body(self, request: Request) -> None:
        """Raise _AnsweredBeforeBody when the handler refuses `request` from its head."""
        assert self._refusals is not None
        try:
            refusal = self._refusals.refuse_before_body(request)
        except Exception:
            # The handler itself still runs, and answers, once the body is read.
            logger.exception("refuse_before_body failed for %s %s", request.method, request.target)
            return
        if refusal is not None:
            raise _AnsweredBeforeBody(request, refusal)

    async def _wait_for_input(
        self, connection: H11Connection, deadline: float, *, keep_alive: bool
    ) -> bool:
        """Wait (idle) for the first bytes of a request; False on timeout or shutdown."""
        if self.shutting_down:
            return False
        with trio.CancelScope(deadline=deadline) as idle_scope:
            self._idle_scopes.add(idle_scope)
            try:
                # Between keep-alive requests the next one is seldom there yet.
                await connection.receive(wait_first=keep_alive)
            finally:
                self._idle_scopes.discard(idle_scope)
        return not idle_scope.cancelled_caught

    async def _read_body(self, connection: H11Connection, limit: int, deadline: float) -> bytes:
        """The whole body, by `deadline` (TooSlowError otherwise)."""
        chunks: list[bytes] = []
        size = 0
        events = 0
        while True:
            event = connection.buffered_event()
            if event is None:
                with trio.fail_at(deadline):
                    event = await connection.next_event()
            elif (events := events + 1) % _EVENTS_PER_CHECKPOINT == 0:
                # A chunked body of tiny chunks is thousands of events per read.
                await trio.lowlevel.checkpoint()
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise _Rejected(413)
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                if size > _JOIN_ON_LOOP_BYTES:
                    # Joining 20 MiB costs ~14 ms (fresh pages); bytes.join drops the GIL.
                    return await trio.to_thread.run_sync(b"".join, chunks)
                return b"".join(chunks)
            else:
                raise RuntimeError(f"unexpected {event!r} while reading a request body")

    @staticmethod
    def _request_line(event: h11.Request) -> tuple[str, str, str, Mapping[str, str]]:
        """(method, target, decoded path, query) of a request head; 400 for a bad
        path or a target in a form the server does not serve."""
        # h11 guarantees ASCII for the method, target and header names.
        method = event.method.decode("ascii")
        target = event.target.decode("ascii")
        try:
            check_form(method, target)
            raw_path, raw_query = split_target(target)
            path = decode_path(raw_path)
        except BadTarget:
            raise _Rejected(400) from None
        return method, target, path, parse_query(raw_query)

    def _body_limit_for(self, method: str, target: str) -> int:
        if self._body_limits is not None:
            limit = self._body_limits.body_limit_for(method, target)
            if limit is not None:
                return limit
        return self._limits.max_body_bytes

    # ------------------------------------------------------------ answering

    async def _call_handler(self, request: Request) -> HandlerResult:
        try:
            # Typed as object: handlers written without mypy may return anything.
            result: object = await self._handler(request)
        except Exception:
            logger.exception("handler failed for %s %s", request.method, request.target)
            return self._error(request, 500)
        if not isinstance(result, Response | StreamingResponse):
            logger.error(
                "handler for %s %s returned %r, not a response",
                request.method,
                request.target,
                result,
            )
            return self._error(request, 500)
        return result

    def _headers_for_error(self, request: Request | None) -> Sequence[tuple[str, str]]:
        """The handler's headers for an error answered here (none before a head was read)."""
        if self._error_headers is None or request is None:
            return ()
        try:
            return self._error_headers.error_headers(request)
        except Exception:
            logger.exception("error_headers failed for %s %s", request.method, request.target)
            return ()

    def _error(self, request: Request, status: int) -> Response:
        response = error_response(status, _MESSAGES[status])
        headers = self._headers_for_error(request)
        return dataclasses.replace(response, headers=[*response.headers, *headers])

    async def _send_whole(
        self,
        connection: H11Connection,
        request: Request,
        response: Response,
        *,
        close: bool = False,
    ) -> None:
        # RFC 9112 section 6.1: after a request framed by both Content-Length and
        # Transfer-Encoding, close (a proxy in front may have framed it otherwise).
        close = close or self.shutting_down or _has_ambiguous_framing(request)
        try:
            events = _whole_response_events(connection, request, response, close=close)
        except (h11.LocalProtocolError, ValueError) as exc:
            # UnicodeEncodeError is a ValueError: a header we cannot encode.
            logger.error("invalid response to %s %s: %s", request.method, request.target, exc)
            fallback = error_response(500, _MESSAGES[500])
            events = _whole_response_events(connection, request, fallback, close=close)
        await connection.send(*events)

    async def _send_streaming(
        self, connection: H11Connection, request: Request, response: StreamingResponse
    ) -> bool:
        """Send a streaming response; True when it ended normally.

        The connection is closed afterwards rather than reused: while the
        stream ran, the disconnect watcher consumed (and dropped) whatever the
        client sent, so h11 no longer knows where the next request starts.
        SSE clients reconnect per stream anyway.
        """
        try:
            head = connection.response_head(
                response.status,
                response.headers,
                content_length=response.content_length,
                close=True,
            )
        except (h11.LocalProtocolError, ValueError) as exc:
            logger.error("invalid response to %s %s: %s", request.method, request.target, exc)
            await self._send_whole(connection, request, error_response(500, _MESSAGES[500]))
            return True
        if request.method == "HEAD" or response.status in _BODYLESS_STATUSES:
            await connection.send(head, h11.EndOfMessage())
            return True
        await connection.send(head)
        del head  # not held for the stream's lifetime
        writer = ConnectionBodyWriter(connection)
        if response.watches_peer:
            # The body notices the client leaving itself: no watcher task beside
            # it, and (inline here) no extra frame for a stream open for hours.
            try:
                await response.stream(writer)
            except Exception as exc:  # noqa: BLE001 - logged there
                _log_stream_failure(request, exc)
                return False
            finally:
                writer.close()
        elif not await self._run_watched(connection, request, response.stream, writer):
            return False
        if not connection.body_ended_by_sink:
            await connection.send(h11.EndOfMessage())
        # (Else its bytes went out with the last write, and as the connection
        # closes next, h11 need not hear of it: that costs a thousand ending
        # streams as much as writing their last event.)
        return True

    async def _run_watched(
        self,
        connection: H11Connection,
        request: Request,
        stream: StreamBody,
        writer: ConnectionBodyWriter,
    ) -> bool:
        """Run a streaming body while watching for the client to leave.

        True when the body returned normally. When the client disconnects, the
        watcher cancels the body at once.
        """
        # Stays False when the watcher cancels the body (the nursery absorbs that).
        finished = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_when_peer_leaves, connection, nursery.cancel_scope)
            finished = await _call_stream(request, stream, writer)
            nursery.cancel_scope.cancel()
        return finished


async def _call_stream(request: Request, stream: StreamBody, writer: ConnectionBodyWriter) -> bool:
    """Run a streaming body; True when it returned normally."""
    try:
        await stream(writer)
        return True
    except Exception as exc:  # noqa: BLE001 - logged there
        _log_stream_failure(request, exc)
        return False
    finally:
        writer.close()


def _log_stream_failure(request: Request, exc: Exception) -> None:
    if _is_client_gone(exc):
        logger.debug("client left during %s %s", request.method, request.target)
    else:
        logger.exception("streaming response to %s %s failed", request.method, request.target)


_NO_HEADERS = Headers(())
_NO_QUERY: Mapping[str, str] = MappingProxyType({})


def _request_line(request: Request) -> Request:
    """Method and target only: what a long stream keeps of its request (for logs)."""
    return dataclasses.replace(
        request, path="", headers=_NO_HEADERS, query=_NO_QUERY, body=b"", path_params=_NO_QUERY
    )


def _is_client_gone(exc: Exception) -> bool:
    """ClientGone, alone or as the only kind in a group (from a nursery in the stream)."""
    if isinstance(exc, ExceptionGroup):
        _, rest = exc.split(ClientGone)
        return rest is None
    return isinstance(exc, ClientGone)


async def _cancel_when_peer_leaves(connection: H11Connection, scope: trio.CancelScope) -> None:
    await connection.wait_until_peer_leaves()
    scope.cancel()


def _whole_response_events(
    connection: H11Connection, request: Request, response: Response, *, close: bool
) -> list[h11.Event]:
    bodiless = response.status in _BODYLESS_STATUSES
    head = connection.response_head(
        response.status,
        response.headers,
        content_length=None if bodiless else len(response.body),
        close=close,
    )
    events: list[h11.Event] = [head]
    if response.body and not bodiless and request.method != "HEAD":
        events.append(h11.Data(data=response.body))
    events.append(h11.EndOfMessage())
    return events


def _request(
    event: h11.Request,
    method: str,
    target: str,
    path: str,
    query: Mapping[str, str],
    body: bytes,
    peer: str,
) -> Request:
    return Request(
        method=method,
        target=target,
        path=path,
        query=query,
        headers=Headers(
            (name.decode("ascii"), value.decode("latin-1")) for name, value in event.headers
        ),
        body=body,
        peer=peer,
        http_version=event.http_version.decode("ascii"),
    )


def _declared_length(event: h11.Request) -> int | None:
    for name, value in event.headers:
        if name == b"content-length":
            return int(value)  # h11 has validated it
    return None


def _has_ambiguous_framing(request: Request) -> bool:
    return "transfer-encoding" in request.headers and "content-length" in request.headers


def _format_address(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


UNIX_PEER = "unix"  # the peer name of every connection on a Unix socket (it has no address)


def _peer_name(stream: trio.abc.Stream) -> str:
    if not isinstance(stream, trio.SocketStream):
        return "unknown"
    if stream.socket.family == socket.AF_UNIX:
        return UNIX_PEER
    try:
        return _format_address(stream.socket.getpeername())
    except OSError:
        return "unknown"


def _bound_address(listener: trio.abc.Listener[trio.abc.Stream]) -> tuple[str, int] | None:
    if not isinstance(listener, trio.SocketListener):
        return None
    address = listener.socket.getsockname()
    if isinstance(address, tuple):
        return str(address[0]), int(address[1])
    return None
