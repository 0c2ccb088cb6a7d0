"""WebSocket clients: the sid registry, message routing and one session per socket.

Routing copies ComfyUI's PromptServer (FACTS §2, §6, §7):

- `sockets` maps a sid (the `?clientId=`, or a made-up 32-hex id) to ONE socket.
  A second socket with the same id replaces the first in the map, so the first
  gets nothing more, broadcasts included; when any socket of that id closes, its
  cleanup removes whatever the map holds for the id, so the newer socket goes
  silent too. That is the duplicate-clientId trap the daemon must survive.
- send(event, data, sid): sid None broadcasts to the map; a sid not in the map
  drops the frame (no queueing, no replay).
- Only the FIRST text message a client sends can negotiate feature flags.

Each socket has its own bounded outbound channel and writer task, so frames
reach one socket in the order they were produced.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import trio_websocket

from daemon.simulator.control import SimulatorControls
from daemon.simulator.frames import text_frame

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0


class ReplayStream(trio.abc.Stream):
    """A stream that first hands out bytes already read (the HTTP upgrade request)."""

    def __init__(self, stream: trio.abc.Stream, replay: bytes) -> None:
        self._stream = stream
        self._buffer = replay

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._buffer:
            size = len(self._buffer) if max_bytes is None else max_bytes
            chunk, self._buffer = self._buffer[:size], self._buffer[size:]
            await trio.lowlevel.checkpoint()
            return chunk
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._stream.aclose()


@dataclass(eq=False)
class _Socket:
    """One live WebSocket: its outbound queue and the scope that can cut it."""

    sid: str
    outbox: trio.MemorySendChannel[str | bytes]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def drop(self) -> None:
        """Close abruptly: no close frame, the TCP connection just ends."""
        self.scope.cancel()


class Hub:
    """The registry of WebSocket clients plus ComfyUI's per-server execution state."""

    def __init__(
        self,
        controls: SimulatorControls,
        rng: random.Random,
        *,
        server_features: dict[str, Any],
        queue_size: int = 10_000,
        feature_flags: bool = True,
    ) -> None:
        self._controls = controls
        self._rng = rng
        self._features = server_features
        self._queue_size = queue_size
        self._feature_flags = feature_flags  # False: a ComfyUI from before feature flags
        self.sockets: dict[str, _Socket] = {}
        self.metadata: dict[str, dict[str, Any]] = {}
        self._live: set[_Socket] = set()
        # PromptServer.client_id / last_node_id: whose prompt runs, which node.
        self.client_id: Any = None
        self.last_node_id: str | None = None
        self.queue_info: Callable[[], dict[str, Any]] = lambda: {
            "exec_info": {"queue_remaining": 0}
        }

    # ------------------------------------------------------------ routing

    def send_json(self, event: str, data: Any, sid: Any = None) -> None:
        """A JSON text frame to `sid`'s socket, or to every socket when sid is None."""
        self._route(text_frame(event, data), sid)

    def send_binary(self, frame: bytes, sid: Any = None) -> None:
        """A binary frame to `sid`'s socket, or to every socket when sid is None."""
        self._route(frame, sid)

    def _route(self, message: str | bytes, sid: Any) -> None:
        if self._controls.silent:
            return  # go_silent: sockets stay open, nothing is delivered
        if sid is None:
            targets = list(self.sockets.values())
        else:
            try:
                target = self.sockets.get(sid)
            except TypeError:  # an unhashable client_id can match no socket
                target = None
            targets = [target] if target is not None else []
        for sock in targets:
            try:
                sock.outbox.send_nowait(message)
            except trio.WouldBlock:
                logger.warning("client %s does not read its frames; dropping it", sock.sid)
                sock.drop()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def supports_preview_metadata(self, sid: Any) -> bool:
        """feature_flags.supports_feature(..., "supports_preview_metadata")."""
        try:
            meta = self.metadata.get(sid)
        except TypeError:
            return False
        if meta is None:
            return False
        flags = meta.get("feature_flags", {})
        return isinstance(flags, dict) and flags.get("supports_preview_metadata", False) is True

    # ------------------------------------------------------------ knobs

    def live_count(self) -> int:
        """Open WebSocket connections, registered or not."""
        return len(self._live)

    def drop_all(self) -> None:
        """Cut every WebSocket at once, without close frames."""
        for sock in list(self._live):
            sock.drop()

    def new_sid(self) -> str:
        """A made-up sid: 32 hex digits, like uuid4().hex."""
        return f"{self._rng.getrandbits(128):032x}"

    # ------------------------------------------------------------ sessions

    async def run_websocket(self, stream: trio.abc.Stream, raw: bytes, client_id: str) -> None:
        """Take over a connection whose upgrade request is in `raw`, and serve it."""
        replay = ReplayStream(stream, raw)
        try:
            async with trio.open_nursery() as nursery:
                ws: trio_websocket.WebSocketConnection | None = None
                with trio.move_on_after(HANDSHAKE_TIMEOUT):
                    request = await trio_websocket.wrap_server_stream(nursery, replay)
                    ws = await request.accept()
                if ws is not None:
                    await self._session(ws, client_id)
                nursery.cancel_scope.cancel()  # stop trio-websocket's reader task
        finally:
            await trio.aclose_forcefully(replay)

    async def _session(self, ws: trio_websocket.WebSocketConnection, client_id: str) -> None:
        sid = client_id or self.new_sid()
        outbox, inbox = trio.open_memory_channel[str | bytes](self._queue_size)
        sock = _Socket(sid, outbox)
        self.sockets.pop(sid, None)
        self.sockets[sid] = sock
        self.metadata[sid] = {"feature_flags": {}}
        self._live.add(sock)
        self.send_json("status", {"status": self.queue_info(), "sid": sid}, sid)
        if self.client_id == sid and self.last_node_id is not None:
            self.send_json("executing", {"node": self.last_node_id}, sid)
        try:
            with sock.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write, ws, inbox)
                    await self._read(ws, sid)
                    nursery.cancel_scope.cancel()
        finally:
            self._live.discard(sock)
            outbox.close()
            # Faithful to ComfyUI: this removes whatever is registered under sid now,
            # even a newer socket that took the id over (FACTS §7).
            self.sockets.pop(sid, None)
            self.metadata.pop(sid, None)

    @staticmethod
    async def _write(
        ws: trio_websocket.WebSocketConnection, inbox: trio.MemoryReceiveChannel[str | bytes]
    ) -> None:
        async with inbox:
            async for message in inbox:
                try:
                    await ws.send_message(message)
                except trio_websocket.ConnectionClosed:
                    return

    async def _read(self, ws: trio_websocket.WebSocketConnection, sid: str) -> None:
        first_message = True
        while True:
            try:
                message = await ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            if not isinstance(message, str):
                continue
            try:
                data = json.loads(message)
            except ValueError:
                continue  # ComfyUI logs and ignores it; the next one may still be "first"
            try:
                negotiating = first_message and self._feature_flags
                if negotiating and data.get("type") == "feature_flags":
                    self.metadata[sid]["feature_flags"] = data.get("data", {})
                    self.send_json("feature_flags", dict(self._features), sid)
                first_message = False
            except (AttributeError, KeyError, TypeError):
                continue  # e.g. a JSON array: ComfyUI's handler catches and logs it
