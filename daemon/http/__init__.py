"""Generic HTTP/1.1 over h11 and trio: server, router, static files, client.

This layer knows nothing about ComfyUI, tasks or SSE payloads.
"""

from daemon.http.client import (
    BodyChunks,
    ClientResponse,
    HttpClientError,
    StreamedResponse,
    http_request,
    open_stream,
)
from daemon.http.limits import HttpLimits
from daemon.http.router import Router
from daemon.http.server import HttpServer
from daemon.http.static import StaticFiles, content_type_for
from daemon.http.types import (
    BodyLimitProvider,
    BodyWriter,
    ClientGone,
    Handler,
    HandlerResult,
    Headers,
    RefusalBeforeBody,
    Request,
    Response,
    StreamBody,
    StreamingResponse,
    error_response,
    json_response,
)

__all__ = [
    "BodyChunks",
    "BodyLimitProvider",
    "BodyWriter",
    "ClientGone",
    "ClientResponse",
    "Handler",
    "HandlerResult",
    "Headers",
    "HttpClientError",
    "HttpLimits",
    "HttpServer",
    "RefusalBeforeBody",
    "Request",
    "Response",
    "Router",
    "StaticFiles",
    "StreamBody",
    "StreamedResponse",
    "StreamingResponse",
    "content_type_for",
    "error_response",
    "http_request",
    "json_response",
    "open_stream",
]
