"""Who may talk to the daemon: Host, Origin, CORS and API tokens, in front of the router.

A browser lets any page send some requests to any address (a form POST, a
`fetch` in no-cors mode), and DNS rebinding makes a hostile name resolve to
127.0.0.1. So every request passes here first, in this order:

1. ``Host`` must be in ``allowed_hosts`` when that is set (421 otherwise); one
   without a port is at the scheme's default (as browsers leave it out).
2. A request carrying ``Origin`` must come from the daemon's own origin or
   one in ``allowed_origins`` (403 otherwise, refused here, not only by the
   browser). The own origin is the one the request itself names: ``Host``
   with the scheme ``X-Forwarded-Proto`` gives (plain ``http`` without it),
   so the page works served directly and through a proxy that passes the
   client's ``Host`` (nginx: ``$http_host``, which keeps the port).
3. A CORS preflight (``OPTIONS`` with ``Access-Control-Request-Method``)
   from an allowed origin is answered here (204).
4. With ``api_tokens`` set, POST and DELETE need ``Authorization: Bearer``
   with one of them (401 otherwise). Reading stays open: a task's stream and
   status are guarded by its 128-bit id.

A client waiting for ``100 Continue`` hears these refusals (and the route's
own, such as a wrong Content-Type) before it sends its body.

Answers to listed origins carry the CORS headers a ``fetch`` and an
``EventSource`` need, also the errors the HTTP layer answers itself once it has
read the head (413, 408, 500: ``error_headers``). Every answer says ``Vary: Origin``.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import re
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from daemon.http.router import Router
from daemon.http.types import (
    HandlerResult,
    Request,
    Response,
    StreamingResponse,
    error_response,
)

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"http": 80, "https": 443}
PREFLIGHT_MAX_AGE = 600  # seconds a browser may reuse a preflight answer
ALLOWED_METHODS = "GET, HEAD, POST, DELETE"
ALLOWED_HEADERS = "Content-Type, Authorization, Idempotency-Key, Last-Event-ID"
# Beyond the CORS-safelisted ones (Content-Type, Cache-Control...): what the
# page reads from our answers.
EXPOSED_HEADERS = "Location, Retry-After, Idempotent-Replayed, WWW-Authenticate"
NEEDS_TOKEN = frozenset({"POST", "DELETE"})
REALM = 'Bearer realm="comfy-progress"'

_Result = TypeVar("_Result", bound=Response | StreamingResponse)

Origin = tuple[str, str, int]  # (scheme, host, port), lower-case, port made explicit


def parse_origin(value: str) -> Origin | None:
    """'https://Example.com' -> ('https', 'example.com', 443); None when it is no http(s) origin."""
    try:
        parts = urllib.parse.urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return None
    return scheme, parts.hostname.lower(), port if port is not None else DEFAULT_PORTS[scheme]


def split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header: 'Example.com:8080' -> ('example.com', 8080), '[::1]' -> ('::1', None)."""
    value = value.strip().lower()
    match = re.fullmatch(r"(\[[0-9a-f:.]+\]|[^\s\[\]:/@]+)(?::(\d{1,5}))?", value)
    if match is None:
        return None
    port = int(match.group(2)) if match.group(2) else None
    if port is not None and port > 65535:
        return None
    return match.group(1).strip("[]"), port


def own_origin(request: Request) -> Origin | None:
    """The origin this request was sent to, as its Host (and X-Forwarded-Proto) say."""
    host = split_host(request.headers.get("host", ""))
    if host is None:
        return None
    forwarded = request.headers.get("x-forwarded-proto", "http").split(",", 1)[0].strip().lower()
    scheme = forwarded if forwarded in DEFAULT_PORTS else "http"
    name, port = host
    return scheme, name, port if port is not None else DEFAULT_PORTS[scheme]


@dataclass(frozen=True)
class AccessSettings:
    allowed_origins: tuple[str, ...] = ()  # "https://app.example" (besides the daemon's own)
    allowed_hosts: tuple[str, ...] = ()  # "comfy.example", "127.0.0.1:8000"; empty: any
    api_tokens: tuple[str, ...] = ()  # empty: no token needed


class AccessPolicy:
    """A Handler in front of another: checks Host, Origin and tokens, answers CORS.

    `on_refused(status)` hears of each request refused here (for metrics).
    """

    def __init__(
        self,
        inner: Router,
        settings: AccessSettings,
        *,
        on_refused: Callable[[int], None] | None = None,
    ) -> None:
        self.inner = inner
        self.on_refused = on_refused
        self._origins: set[Origin] = set()
        for text in settings.allowed_origins:
            origin = parse_origin(text)
            if origin is None:
                raise ValueError(f"allowed_origins: {text!r} is not an http(s) origin")
            self._origins.add(origin)
        self._hosts: set[tuple[str, int | None]] = set()  # a None port: any port
        for text in settings.allowed_hosts:
            host = split_host(text)
            if host is None:
                raise ValueError(f"allowed_hosts: {text!r} is not a host name")
            self._hosts.add(host)
        self._tokens = tuple(token.encode() for token in settings.api_tokens)

    def body_limit_for(self, method: str, target: str) -> int | None:
        return self.inner.body_limit_for(method, target)

    async def __call__(self, request: Request) -> HandlerResult:
        screened = self._screen(request)
        if isinstance(screened, Response):
            return screened
        cors = screened
        if _is_preflight(request):
            return Response(204, [*cors, *self._preflight_headers(), ("Vary", "Origin")])
        if (refusal := self._token_refusal(request, cors)) is not None:
            return refusal
        return _with_headers(await self.inner(request), cors)

    def error_headers(self, request: Request) -> list[tuple[str, str]]:
        """For the errors the HTTP layer answers itself (413, 408, 500): the CORS
        headers a listed origin's page needs to read them, and ``Vary: Origin``.
        Nothing is refused or counted here: the request is being refused already."""
        origin_header = request.headers.get("origin")
        vary = [("Vary", "Origin")]
        if origin_header is None or not self._host_allowed(request):
            return vary
        if parse_origin(origin_header) not in self._origins:
            return vary
        return [*self._cors_headers(origin_header), *vary]

    def refuse_before_body(self, request: Request) -> Response | None:
        """What ``__call__`` refuses from the head alone (Host, Origin, token, then
        the route's own check), for a client waiting for ``100 Continue``."""
        screened = self._screen(request)
        if isinstance(screened, Response):
            return screened
        if _is_preflight(request):
            return None  # answered once the (empty) body is read
        if (refusal := self._token_refusal(request, screened)) is not None:
            return refusal
        refusal = self.inner.refuse_before_body(request)
        return None if refusal is None else _with_headers(refusal, screened)

    def _screen(self, request: Request) -> Response | list[tuple[str, str]]:
        """The refusal for a Host or Origin not allowed, else the CORS headers to add."""
        if not self._host_allowed(request):
            return self._refuse(
                request,
                421,
                "this daemon does not serve that host name",
                {"host": request.headers.get("host"), "setting": "allowed_hosts"},
            )
        origin_header = request.headers.get("origin")
        listed = False
        if origin_header is not None:
            origin = parse_origin(origin_header)
            listed = origin is not None and origin in self._origins
            if not listed and (origin is None or origin != own_origin(request)):
                return self._refuse(
                    request,
                    403,
                    "requests from this origin are not allowed",
                    {"origin": origin_header, "setting": "allowed_origins"},
                )
        return self._cors_headers(origin_header) if origin_header and listed else []

    def _token_refusal(self, request: Request, cors: list[tuple[str, str]]) -> Response | None:
        if self._tokens and request.method in NEEDS_TOKEN:
            refusal = self._check_token(request)
            if refusal is not None:
                return _with_headers(refusal, cors)
        return None

    def _host_allowed(self, request: Request) -> bool:
        if not self._hosts:
            return True
        # The port made explicit: a Host without one names the scheme's default.
        origin = own_origin(request)
        if origin is None:
            return False
        _, name, port = origin
        return (name, None) in self._hosts or (name, port) in self._hosts

    def _check_token(self, request: Request) -> Response | None:
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            challenge = REALM
            message = "this daemon needs an API token (Authorization: Bearer <token>)"
        elif _matches_any(given.strip(), self._tokens):
            return None
        else:
            challenge = f'{REALM}, error="invalid_token"'
            message = "the API token is not valid"
        if self.on_refused is not None:
            self.on_refused(401)
        refusal = error_response(401, message, {"setting": "api_tokens"})
        return dataclasses.replace(
            refusal, headers=[*refusal.headers, ("WWW-Authenticate", challenge)]
        )

    def _refuse(self, request: Request, status: int, message: str, details: object) -> Response:
        # The Origin and Host are named: they are what an operator adds to the settings.
        named = "origin" if status == 403 else "host"
        log.info(
            "refused %s %s (%s %s): %s",
            request.method,
            request.path,
            named,
            request.headers.get(named),
            message,
            extra={"client": request.peer, "status": status},
        )
        if self.on_refused is not None:
            self.on_refused(status)
        return _with_vary(error_response(status, message, details))

    @staticmethod
    def _cors_headers(origin: str) -> list[tuple[str, str]]:
        return [
            ("Access-Control-Allow-Origin", origin.strip()),
            ("Access-Control-Expose-Headers", EXPOSED_HEADERS),
        ]

    @staticmethod
    def _preflight_headers() -> list[tuple[str, str]]:
        return [
            ("Access-Control-Allow-Methods", ALLOWED_METHODS),
            ("Access-Control-Allow-Headers", ALLOWED_HEADERS),
            ("Access-Control-Max-Age", str(PREFLIGHT_MAX_AGE)),
        ]


def _matches_any(given: str, tokens: Iterable[bytes]) -> bool:
    """Constant-time comparison against every token (no early exit on a match)."""
    candidate = given.encode("utf-8", "surrogateescape")
    found = False
    for token in tokens:
        found |= hmac.compare_digest(candidate, token)
    return found


def _with_vary(response: Response) -> Response:
    return dataclasses.replace(response, headers=[*response.headers, ("Vary", "Origin")])


def _is_preflight(request: Request) -> bool:
    return request.method == "OPTIONS" and "access-control-request-method" in request.headers


def _with_headers(result: _Result, extra: list[tuple[str, str]]) -> _Result:
    """`result` with `extra` headers and Vary: Origin (the answer depends on Origin)."""
    return dataclasses.replace(result, headers=[*result.headers, *extra, ("Vary", "Origin")])
