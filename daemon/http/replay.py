"""A stream that first replays bytes already read, for ConnectionTakeover."""

from __future__ import annotations

import trio


class ReplayStream(trio.abc.Stream):
    """Serve `prefix` from :meth:`receive_some` before reading from `stream`.

    The HTTP server has already read a request's head when a handler takes the
    connection over; wrapping the raw stream in this lets another protocol
    library (trio-websocket) read the handshake again from the start. Writes
    and closing go straight to `stream`.
    """

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = memoryview(bytes(prefix))

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The next replayed bytes, then whatever `stream` yields."""
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if not self._prefix:
            return bytes(await self._stream.receive_some(max_bytes))
        await trio.lowlevel.checkpoint()
        size = len(self._prefix) if max_bytes is None else max_bytes
        chunk, self._prefix = self._prefix[:size], self._prefix[size:]
        return bytes(chunk)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write to the wrapped stream."""
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """Delegate to the wrapped stream."""
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Close the wrapped stream."""
        self._prefix = memoryview(b"")
        await self._stream.aclose()
