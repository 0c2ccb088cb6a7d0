"""Method + path routing with ``{name}`` segments; itself a Handler.

Patterns are matched segment by segment on the raw path, each segment
percent-decoded on its own:

- ``{name}`` matches exactly one non-empty segment;
- ``{name...}`` (last segment only) matches the rest of the path, zero or more
  segments, joined with ``/`` (for static files);
- anything else matches the segment literally.

Routes are tried in the order they were added. A path that matches some
route but not the method gets 405 with ``Allow``; HEAD is served by the GET
route when there is no HEAD route. Unknown paths get 404. A route may also
answer from the request head alone (``check_head``), for clients waiting for
``100 Continue``.

An optional observer hears of every answer: ``observer(method, pattern,
status)``, with the matched route's pattern (None for 404/405), so metrics
can count requests by route without one series per task id.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeAlias

from daemon.http.target import BadTarget, path_segments, split_target
from daemon.http.types import (
    Handler,
    HandlerResult,
    Request,
    Response,
    StreamingResponse,
    error_response,
)

# (method, route pattern or None when no route matched, status)
RouteObserver: TypeAlias = Callable[[str, str | None, int], None]
# A route's answer from the request head alone (its body empty), or None.
HeadCheck: TypeAlias = Callable[[Request], Response | None]

_FOUND_CACHE_SIZE = 256  # lookups kept (targets with ids in them do not repeat)
_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)(\.\.\.)?\}$")


@dataclass(frozen=True)
class _Segment:
    text: str  # the literal, or the parameter name
    is_param: bool
    is_rest: bool = False


@dataclass(frozen=True)
class _Route:
    method: str
    pattern: str
    segments: tuple[_Segment, ...]
    handler: Handler
    max_body: int | None
    check_head: HeadCheck | None

    def match(self, segments: list[str]) -> dict[str, str] | None:
        params: dict[str, str] = {}
        for index, segment in enumerate(self.segments):
            if segment.is_rest:
                params[segment.text] = "/".join(segments[index:])
                return params
            if index >= len(segments):
                return None
            value = segments[index]
            if segment.is_param:
                if not value:
                    return None
                params[segment.text] = value
            elif value != segment.text:
                return None
        return params if len(segments) == len(self.segments) else None


def _compile(pattern: str) -> tuple[_Segment, ...]:
    if not pattern.startswith("/"):
        raise ValueError(f"route pattern {pattern!r} must start with '/'")
    compiled: list[_Segment] = []
    names: set[str] = set()
    parts = pattern.split("/")[1:]
    for index, part in enumerate(parts):
        found = _PARAM.match(part)
        if found is None:
            if "{" in part or "}" in part:
                raise ValueError(f"route pattern {pattern!r}: bad segment {part!r}")
            compiled.append(_Segment(part, is_param=False))
            continue
        name, rest = found.group(1), found.group(2) is not None
        if name in names:
            raise ValueError(f"route pattern {pattern!r}: parameter {name!r} used twice")
        if rest and index != len(parts) - 1:
            raise ValueError(f"route pattern {pattern!r}: {{{name}...}} must be last")
        names.add(name)
        compiled.append(_Segment(name, is_param=True, is_rest=rest))
    return tuple(compiled)


class Router:
    """Dispatch requests to handlers by method and path pattern.

    A Router is a Handler (``await router(request)``) and tells the server each
    route's body limit before the body is read (``body_limit_for``).
    """

    def __init__(self, *, observer: RouteObserver | None = None) -> None:
        self._routes: list[_Route] = []
        self._observer = observer
        # Lookups by (method, target): the server asks for the body limit, then
        # the router serves the same request; and most targets repeat.
        self._found: dict[tuple[str, str], tuple[_Route, dict[str, str]] | list[str]] = {}

    def add(
        self,
        method: str,
        pattern: str,
        handler: Handler,
        *,
        max_body: int | None = None,
        check_head: HeadCheck | None = None,
    ) -> None:
        """Route `method` requests matching `pattern` to `handler`.

        `max_body` overrides the server's ``max_body_bytes`` for this route
        (raise it for uploads, lower it for small JSON bodies). `check_head`
        gives the answer `handler` would give from the head alone (a 415 for
        the wrong Content-Type), or None: a client waiting for ``100 Continue``
        then gets it without sending its body (``refuse_before_body``).
        """
        if max_body is not None and max_body < 0:
            raise ValueError("max_body must not be negative")
        route = _Route(method.upper(), pattern, _compile(pattern), handler, max_body, check_head)
        self._routes.append(route)
        self._found.clear()

    def body_limit_for(self, method: str, target: str) -> int | None:
        """The body limit of the route that would serve this request, if it has one."""
        found = self._find(method, target)
        return found[0].max_body if isinstance(found, tuple) else None

    def refuse_before_body(self, request: Request) -> Response | None:
        """The matching route's `check_head` answer for a body-less `request`, if any."""
        found = self._find(request.method, request.target)
        if not isinstance(found, tuple):
            return None
        route, params = found
        if route.check_head is None:
            return None
        if params:
            request = dataclasses.replace(request, path_params=MappingProxyType(params))
        refusal = route.check_head(request)
        if refusal is not None:
            self._observe(request.method, route.pattern, refusal.status)
        return refusal

    async def __call__(self, request: Request) -> HandlerResult:
        """Serve `request` with the matching route, or answer 404/405."""
        found = self._find(request.method, request.target)
        if isinstance(found, tuple):
            route, params = found
            routed = (
                dataclasses.replace(request, path_params=MappingProxyType(params))
                if params or request.path_params
                else request
            )
            try:
                result = await route.handler(routed)
            except Exception:
                self._observe(request.method, route.pattern, 500)  # the server answers 500
                raise
            self._observe(request.method, route.pattern, _status_of(result))
            return result
        if found:
            allowed = ", ".join(found)
            response = error_response(405, "method not allowed", {"allowed": list(found)})
            self._observe(request.method, None, 405)
            return dataclasses.replace(response, headers=[*response.headers, ("allow", allowed)])
        self._observe(request.method, None, 404)
        return error_response(404, "not found", {"path": request.path})

    def _observe(self, method: str, pattern: str | None, status: int) -> None:
        if self._observer is not None:
            self._observer(method, pattern, status)

    def _find(self, method: str, target: str) -> tuple[_Route, dict[str, str]] | list[str]:
        """The route and its parameters, or the methods allowed on this path (maybe none).
        Callers only read what this returns: it may be handed out again."""
        key = (method, target)
        found = self._found.get(key)
        if found is None:
            if len(self._found) >= _FOUND_CACHE_SIZE:
                self._found.clear()
            found = self._found[key] = self._lookup(method, target)
        return found

    def _lookup(self, method: str, target: str) -> tuple[_Route, dict[str, str]] | list[str]:
        try:
            segments = path_segments(split_target(target)[0])
        except BadTarget:
            return []
        matches = [
            (route, params)
            for route in self._routes
            if (params := route.match(segments)) is not None
        ]
        for route, params in matches:
            if route.method == method:
                return route, params
        if method == "HEAD":
            for route, params in matches:
                if route.method == "GET":
                    return route, params
        allowed = {route.method for route, _ in matches}
        if "GET" in allowed:
            allowed.add("HEAD")
        return sorted(allowed)


def _status_of(result: object) -> int:
    if isinstance(result, Response | StreamingResponse):
        return result.status
    return 500  # not a response: the server answers 500
