"""Every size and time limit of the HTTP server, in one frozen value."""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class HttpLimits:
    """Limits of the HTTP server; each names what happens when it is hit.

    Times are seconds on the Trio clock. The request timeouts are deadlines for
    a whole phase (not per read), so a client trickling one byte at a time
    cannot hold a connection open; none of them covers the handler or a
    streaming response.
    """

    # Request line + headers; larger -> 431 (h11's max_incomplete_event_size).
    max_header_bytes: int = 16 * KiB
    # Request body, unless the route says otherwise; larger -> 413. Checked
    # against Content-Length before reading and while reading chunked bodies.
    max_body_bytes: int = 1 * MiB
    # From connect (first request) or first byte (later requests) to the end
    # of the headers -> 408. A connection that sends nothing at all within it
    # is closed without an answer.
    header_read_timeout: float = 10.0
    # From the end of the headers to the end of the body -> 408.
    body_read_timeout: float = 30.0
    # Idle time between requests on a keep-alive connection; then close quietly.
    keep_alive_timeout: float = 5.0
    # Each write to the socket: a response head, a streamed chunk, or a 64 KiB
    # slice of a larger body (so a slow but steady reader is not cut off).
    write_timeout: float = 10.0
    # Open connections; beyond it a connection gets a 503 and is closed.
    max_connections: int = 10_000
    # On close we half-close and read what the client still sends for up to
    # this long, so it sees our last response instead of a TCP reset.
    close_linger_timeout: float = 2.0

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_body_bytes", "max_connections"):
            if getattr(self, name) < 0:
                raise ValueError(f"HttpLimits.{name} must not be negative")
        for name in (
            "header_read_timeout",
            "body_read_timeout",
            "keep_alive_timeout",
            "write_timeout",
            "close_linger_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"HttpLimits.{name} must be positive")
