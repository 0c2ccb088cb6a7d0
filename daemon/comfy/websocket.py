"""trio-websocket, read a burst at a time.

trio-websocket's reader task hands each message to its channel with `await
send()`, one scheduler round per message, and each `get_message()` is
another: 20 frames that arrived in one read of the socket cost 20 rounds
(about 20 µs a frame, as much as parsing and applying it). Here the reader
hands a message over without a checkpoint while the channel has room (it
still checkpoints once per read of the socket, and waits when the channel
is full), and `get_messages()` takes every message already waiting: a burst
costs one round, and the consumer sees the frames read together as one batch.

A binary message over `max_message_size` (a preview too big to keep) is
dropped as it arrives, and the connection stays: trio-websocket would close it
(1009), losing the frames behind it, once per such preview.

This leans on private names of trio-websocket 0.12: `_send_channel` and
`_recv_channel`, and `_reader_task` and `_open_handshake` (as its own
`wrap_client_stream` uses them), and `_handle_message_event` with its
`_message_size`, `_message_parts` and `_max_message_size`;
tests/daemon/test_websocket_batches.py and tests/daemon/test_previews.py fail
if they change.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import BytesMessage, TextMessage

log = logging.getLogger(__name__)

Message = str | bytes

# The most messages one batch takes. The consumer applies a batch without
# yielding (30-40 µs a frame): this bounds that to ~10 ms however far behind it
# fell; one 16 KiB read of progress frames is ~150.
MAX_BATCH = 256


class _HandOver:
    """The reader's end of the message channel: `send` without a checkpoint while
    the channel has room (the reader checkpoints on every read of the socket)."""

    __slots__ = ("_channel",)

    def __init__(self, channel: trio.MemorySendChannel[Message]) -> None:
        self._channel = channel

    async def send(self, message: Message) -> None:
        try:
            self._channel.send_nowait(message)
        except trio.WouldBlock:
            await self._channel.send(message)  # full: wait, as trio-websocket would

    async def aclose(self) -> None:
        await self._channel.aclose()

    async def __aenter__(self) -> _HandOver:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class BatchingWebSocket(trio_websocket.WebSocketConnection):
    """A client WebSocket whose messages can be taken a batch at a time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._send_channel = _HandOver(self._send_channel)  # type: ignore[assignment]
        self.ended_before_handshake = False
        self._dropping = False  # the rest of a too big binary message is skipped
        self.dropped_messages = 0

    async def _handle_message_event(self, event: BytesMessage | TextMessage) -> None:
        if isinstance(event, BytesMessage) and (
            self._dropping or self._message_size + len(event.data) > self._max_message_size
        ):
            # A binary frame (a preview) too big to keep: dropped, not the connection.
            # (A text frame that big still closes it: its end of a prompt would be lost.)
            if not self._dropping:
                self.dropped_messages += 1
                log.warning("dropping a binary message over %d bytes", self._max_message_size)
            self._dropping = not event.message_finished
            self._message_size = 0
            self._message_parts = []
            return
        await super()._handle_message_event(event)

    async def _reader_task(self) -> None:
        # trio-websocket 0.12 sets _open_handshake only when the server accepts:
        # when the peer closes first (a TCP proxy or SSH tunnel whose far end is
        # down), its wrap_client_stream waits out the whole connect timeout.
        try:
            await super()._reader_task()
        finally:
            if not self._open_handshake.is_set():
                self.ended_before_handshake = True
                self._open_handshake.set()  # (wakes wrap_client_stream, which raises)

    async def get_messages(self, limit: int = MAX_BATCH) -> list[Message]:
        """The messages waiting, in order, at most `limit`: at least one (waited
        for). Raises `ConnectionClosed` as `get_message` does, once nothing is left."""
        messages: list[Message] = [await self.get_message()]
        receive = self._recv_channel.receive_nowait
        while len(messages) < limit:
            try:
                messages.append(receive())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break  # (closed: the next get_message raises ConnectionClosed)
        return messages


async def wrap_client_stream(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    host: str,
    resource: str,
    *,
    max_message_size: int,
    message_queue_size: int,
    receive_buffer_size: int,
) -> BatchingWebSocket:
    """trio_websocket.wrap_client_stream, making a BatchingWebSocket."""
    ws = BatchingWebSocket(
        stream,
        WSConnection(ConnectionType.CLIENT),
        host=host,
        path=resource,
        message_queue_size=message_queue_size,
        max_message_size=max_message_size,
        receive_buffer_size=receive_buffer_size,
    )
    nursery.start_soon(ws._reader_task)
    await ws._open_handshake.wait()
    if ws.ended_before_handshake:
        raise trio_websocket.HandshakeError(
            "the connection closed before the WebSocket handshake was answered"
        )
    return ws
