"""The values handlers see and return: requests, responses, headers, errors.

Nothing here does I/O. The server (``server.py``) turns h11 events into a
:class:`Request` and a handler's answer back into h11 events.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, TypeAlias, overload, runtime_checkable

_NO_PARAMS: Mapping[str, str] = MappingProxyType({})


class Headers:
    """Immutable, case-insensitive, multi-value HTTP headers.

    Iterating yields ``(name, value)`` pairs in their original order; names are
    kept as given (h11 hands them over lower-cased).
    """

    __slots__ = ("_first", "_items")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: tuple[tuple[str, str], ...] = tuple(items)
        # Lower-cased name -> its first value, made on the first get(): a request's
        # headers are looked up ten times or so, each a scan of them all otherwise.
        self._first: dict[str, str] | None = None

    @overload
    def get(self, name: str) -> str | None: ...
    @overload
    def get(self, name: str, default: str) -> str: ...
    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of header `name`, or `default` when it is absent."""
        first = self._first
        if first is None:
            first = self._first = {}
            for key, value in self._items:
                first.setdefault(key.lower(), value)
        return first.get(name.lower(), default)

    def get_all(self, name: str) -> list[str]:
        """Every value of header `name`, in order (empty when absent)."""
        wanted = name.lower()
        return [value for key, value in self._items if key.lower() == wanted]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headers):
            return NotImplemented
        return [(k.lower(), v) for k, v in self._items] == [(k.lower(), v) for k, v in other._items]

    __hash__ = None  # type: ignore[assignment]  # mutable-looking API; never a dict key

    def __repr__(self) -> str:
        return f"Headers({list(self._items)!r})"


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request, body read in full (bounded by the route's limit)."""

    method: str  # "GET"
    target: str  # raw request target: "/progress/abc?lastEventId=3"
    path: str  # percent-decoded path without the query: "/progress/abc"
    query: Mapping[str, str]  # first value of each query parameter
    headers: Headers  # case-insensitive: headers.get("last-event-id")
    body: bytes  # the whole body
    peer: str  # "127.0.0.1:53412"
    path_params: Mapping[str, str] = field(default_factory=lambda: _NO_PARAMS)  # by the Router
    http_version: str = "1.1"  # "1.0" or "1.1"


@dataclass(frozen=True)
class Response:
    """A whole response. The server sets Content-Length (and drops the body for HEAD)."""

    status: int
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""


class BodyWriter(Protocol):
    """Where a :class:`StreamingResponse` writes its body, one chunk at a time."""

    async def send(self, data: bytes) -> None:
        """Write `data` to the client.

        Runs under ``fail_after(limits.write_timeout)``; raises
        :class:`ClientGone` when the peer is gone or too slow to read.
        """
        ...


StreamBody: TypeAlias = Callable[[BodyWriter], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class StreamingResponse:
    """A response whose body is written over time (e.g. Server-Sent Events).

    No Content-Length: h11 uses chunked encoding for HTTP/1.1 peers and a
    close-delimited body for HTTP/1.0 peers. The server keeps reading the
    socket while `stream` runs and cancels `stream` as soon as the client goes
    away (EOF or a connection error). Returning from `stream` ends the body.
    The connection is closed afterwards. For HEAD the headers are sent and
    `stream` is never called.
    """

    status: int
    headers: Sequence[tuple[str, str]]
    stream: StreamBody
    # Known in advance (a file): sent as Content-Length instead of chunked framing;
    # `stream` must then write exactly that many bytes.
    content_length: int | None = None
    # True: `stream` notices the client leaving itself, through the writer's
    # `wait_until_peer_leaves()`, and the server runs no watcher task beside it
    # (a long-lived stream then costs one task, not two).
    watches_peer: bool = False


class ClientGone(Exception):
    """The client went away (or stopped reading) while we were writing to it."""


HandlerResult: TypeAlias = Response | StreamingResponse
Handler: TypeAlias = Callable[[Request], Awaitable[HandlerResult]]


@runtime_checkable
class BodyLimitProvider(Protocol):
    """Optional hook on a Handler: the body limit of a request, asked before its body is read.

    ``body_limit_for(method, target)`` gets the request method and the raw
    request target and returns a byte limit, or None for the server default
    (``HttpLimits.max_body_bytes``). The Router implements it from ``max_body=``.
    """

    def body_limit_for(self, method: str, target: str) -> int | None: ...


@runtime_checkable
class RefusalBeforeBody(Protocol):
    """Optional hook on a Handler: an answer decided from the request head alone.

    Asked only when the client waits for ``100 Continue`` before sending its
    body (``Expect: 100-continue``). ``refuse_before_body(request)`` gets the
    request with an empty body and returns the answer the handler would give
    whatever the body (a refused token, a wrong Content-Type), or None. The
    server then sends that answer instead of 100 and closes the connection, so
    the client sends no body for nothing (RFC 9110 10.1.1).
    """

    def refuse_before_body(self, request: Request) -> Response | None: ...


@runtime_checkable
class HeadersForErrors(Protocol):
    """Optional hook on a Handler: headers for the errors the server answers itself
    once it has read a request's head (413 body too large, 408 body too slow, 500 the
    handler failed), which never pass through the handler. ``error_headers(request)``
    gets the request with an empty body; CORS headers, say, so that a page of an
    allowed origin can read why it was refused.
    """

    def error_headers(self, request: Request) -> Sequence[tuple[str, str]]: ...


# json.dumps with these options builds an encoder per call; one does for all.
_COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def json_response(status: int, obj: Any, headers: Sequence[tuple[str, str]] = ()) -> Response:
    """A JSON response (compact UTF-8, ``application/json``)."""
    body = _COMPACT_JSON.encode(obj).encode("utf-8")
    return Response(
        status=status,
        headers=[("content-type", "application/json"), *headers],
        body=body,
    )


def error_response(status: int, message: str, details: Any = None) -> Response:
    """The one error shape of the API: ``{"error": {"message": ..., "details": ...}}``."""
    return json_response(status, {"error": {"message": message, "details": details}})


def unavailable(reason: str, retry_after: int = 5) -> Response:
    """503 with the reason and a Retry-After (seconds)."""
    busy = error_response(503, reason)
    return Response(busy.status, [*busy.headers, ("Retry-After", str(retry_after))], busy.body)
