"""The request/response values between the route handlers and the transport.

Shaped after daemon/http's Request/Response so the transport can be swapped
without touching routes.py; the WebSocket upgrade (Takeover) is the
simulator's own.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio


@dataclass(frozen=True)
class HttpRequest:
    """A whole HTTP request."""

    method: str
    path: str  # percent-decoded, no query
    query: Mapping[str, str]  # first value of each parameter, blanks kept
    headers: Sequence[tuple[str, str]]  # names lower-cased, order kept
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The first value of a header (case-insensitive), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True)
class HttpResponse:
    """A whole HTTP response; the transport adds Content-Length."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


@dataclass(frozen=True)
class Takeover:
    """Hand the connection over (WebSocket): handler(stream, raw request bytes)."""

    handler: Callable[[trio.abc.Stream, bytes], Awaitable[None]]


JSON_TYPE = "application/json; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"


def json_response(obj: Any, status: int = 200) -> HttpResponse:
    """aiohttp's web.json_response: json.dumps with default separators."""
    return HttpResponse(status, (("Content-Type", JSON_TYPE),), json.dumps(obj).encode())


def empty_response(status: int = 200) -> HttpResponse:
    """web.Response(status=...): no body."""
    return HttpResponse(status)


def text_response(
    status: int, text: str, headers: tuple[tuple[str, str], ...] = ()
) -> HttpResponse:
    """A text/plain response such as aiohttp's "404: Not Found"."""
    return HttpResponse(status, (("Content-Type", TEXT_TYPE), *headers), text.encode())


# What aiohttp answers when a handler raises (s9: malformed JSON, non-object prompt).
INTERNAL_ERROR = text_response(500, "500 Internal Server Error\n\nServer got itself in trouble")
