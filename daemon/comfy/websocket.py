"""The daemon's WebSocket client to ComfyUI, on wsproto directly.

Frame intake is on the hot path: a burst of progress frames arrives in a few
socket reads, and each read's messages are handed over together (one task
switch per read, not per message), so the task actor can apply them all
before it publishes once. The client does what ComfyUI's socket needs and no
more: the opening handshake, text and binary messages (bounded in size),
pongs, and the closing handshake.
"""

from __future__ import annotations

import trio
import wsproto
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

RECEIVE_SIZE = 64 * 1024


class HandshakeFailed(Exception):
    """The server did not accept the WebSocket (an HTTP error, or not a WebSocket)."""


class WebSocketClosed(Exception):
    """The WebSocket is closed (by the server, by us, or the connection broke)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ComfySocket:
    """One client WebSocket over a trio stream (the caller owns and closes the stream)."""

    def __init__(self, stream: trio.abc.Stream, *, max_message_bytes: int) -> None:
        self._stream = stream
        self._ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self._max_message_bytes = max_message_bytes
        self._parts: list[str | bytes] = []
        self._size = 0
        self._ready: list[str | bytes] = []
        self._closed: WebSocketClosed | None = None
        self._close_event: CloseConnection | None = None  # the server's Close, to answer

    async def _send(self, event: wsproto.events.Event) -> None:
        await self._stream.send_all(self._ws.send(event))

    async def _receive(self) -> bytes:
        try:
            return bytes(await self._stream.receive_some(RECEIVE_SIZE))
        except trio.BrokenResourceError:
            return b""

    async def open(self, host: str, resource: str) -> None:
        """The opening handshake; raises HandshakeFailed or WebSocketClosed."""
        await self._send(Request(host=host, target=resource))
        while True:
            data = await self._receive()
            if not data:
                raise WebSocketClosed("the server closed the connection during the handshake")
            self._ws.receive_data(data)
            events = list(self._ws.events())
            for index, event in enumerate(events):
                if isinstance(event, AcceptConnection):
                    self._take(events[index + 1 :])  # frames right behind the 101
                    return
                if isinstance(event, RejectConnection | RejectData):
                    status = getattr(event, "status_code", "?")
                    raise HandshakeFailed(f"the server refused the WebSocket (HTTP {status})")

    async def messages(self) -> list[str | bytes]:
        """The messages that arrived with the next read (at least one); text as str.

        Raises WebSocketClosed once the socket is closed and every message
        received before the close has been returned.
        """
        while not self._ready:
            if self._closed is not None:
                raise self._closed
            data = await self._receive()
            self._ws.receive_data(data if data else None)
            if not data:
                self._closed = WebSocketClosed("connection lost")
            pings = self._take(list(self._ws.events()))
            for ping in pings:
                await self._send(ping.response())
            close = self._close_event
            if close is not None and self._ws.state is ConnectionState.REMOTE_CLOSING:
                await self._send(close.response())
        ready, self._ready = self._ready, []
        return ready

    def _take(self, events: list[wsproto.events.Event]) -> list[Ping]:
        """Collect finished messages from wsproto's events; returns the pings to answer."""
        pings = []
        for event in events:
            if isinstance(event, TextMessage | BytesMessage):
                self._size += len(event.data)
                if self._size > self._max_message_bytes:
                    self._closed = WebSocketClosed(
                        f"a message exceeded {self._max_message_bytes} bytes"
                    )
                    break
                self._parts.append(
                    event.data if isinstance(event, TextMessage) else bytes(event.data)
                )
                if event.message_finished:
                    if isinstance(event, TextMessage):
                        self._ready.append("".join(p for p in self._parts if isinstance(p, str)))
                    else:
                        self._ready.append(b"".join(p for p in self._parts if isinstance(p, bytes)))
                    self._parts, self._size = [], 0
            elif isinstance(event, Ping):
                pings.append(event)
            elif isinstance(event, CloseConnection):
                self._close_event = event
                reason = f": {event.reason}" if event.reason else ""
                self._closed = WebSocketClosed(f"closed by the server ({event.code}{reason})")
        return pings

    async def aclose(self) -> None:
        """The closing handshake: send Close, then wait for the server's Close (or EOF).

        Bound it with a timeout: a server that never answers keeps it waiting.
        """
        if self._ws.state is ConnectionState.OPEN:
            await self._send(CloseConnection(code=1000))
        while self._ws.state is not ConnectionState.CLOSED:
            data = await self._receive()
            self._ws.receive_data(data if data else None)
            self._take(list(self._ws.events()))
            if not data:
                break
        self._closed = self._closed or WebSocketClosed("closed by us")
