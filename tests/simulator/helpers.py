"""Test clients for the simulator: a tiny h11 HTTP client and a WebSocket recorder.

(Stand-ins until the project's own daemon/http client lands.)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import h11
import trio
import trio_websocket


class ConnectionFailed(Exception):
    """The server reset or closed the connection instead of answering."""


@dataclass(frozen=True)
class Reply:
    """An HTTP response."""

    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def http(
    port: int,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    body: bytes | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> Reply:
    """One request on a fresh connection to 127.0.0.1:port."""
    if body is None:
        body = b"" if json_body is None else json.dumps(json_body).encode()
    headers = headers or []
    all_headers = [("Connection", "close")]
    if not any(name.lower() == "host" for name, _ in headers):
        all_headers.insert(0, ("Host", f"127.0.0.1:{port}"))
    if json_body is not None:
        all_headers.append(("Content-Type", "application/json"))
    all_headers += headers
    all_headers.append(("Content-Length", str(len(body))))
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError as exc:
        raise ConnectionFailed(str(exc)) from exc
    conn = h11.Connection(h11.CLIENT)
    async with stream:
        try:
            request = h11.Request(method=method, target=path, headers=all_headers)
            await stream.send_all(conn.send(request) + (conn.send(h11.Data(data=body)) or b""))
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
            response: h11.Response | None = None
            data = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    data += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
        except (OSError, trio.BrokenResourceError, h11.RemoteProtocolError) as exc:
            raise ConnectionFailed(repr(exc)) from exc
    if response is None:
        raise ConnectionFailed("no response")
    reply_headers = {k.decode().lower(): v.decode() for k, v in response.headers}
    return Reply(response.status_code, reply_headers, bytes(data))


@dataclass(frozen=True)
class Binary:
    """A decoded binary frame."""

    event_type: int
    second_u32: int
    payload: bytes  # everything after the first 8 bytes

    @classmethod
    def parse(cls, frame: bytes) -> Binary:
        event_type, second = struct.unpack(">II", frame[:8])
        return cls(event_type, second, frame[8:])


@dataclass
class WsClient:
    """A WebSocket connection that records every frame it receives."""

    ws: trio_websocket.WebSocketConnection
    stream: trio.abc.Stream
    frames: list[str | bytes] = field(default_factory=list)
    closed: trio.Event = field(default_factory=trio.Event)
    close_code: int | None = None
    _changed: trio.Event = field(default_factory=trio.Event)

    async def pump(self) -> None:
        try:
            while True:
                self.frames.append(await self.ws.get_message())
                self._notify()
        except trio_websocket.ConnectionClosed as exc:
            self.close_code = exc.reason.code if exc.reason is not None else None
        finally:
            # trio-websocket leaves the socket open after an abnormal closure.
            await trio.aclose_forcefully(self.stream)
            self.closed.set()
            self._notify()

    def _notify(self) -> None:
        event, self._changed = self._changed, trio.Event()
        event.set()

    async def wait_frames(self, count: int) -> None:
        """Until at least `count` frames arrived (fails if the socket closes first)."""
        while len(self.frames) < count:
            if self.closed.is_set():
                raise AssertionError(f"socket closed after {len(self.frames)} frames")
            await self._changed.wait()

    async def wait_for(self, event_type: str, **fields: Any) -> int:
        """Index of the first JSON frame of `event_type` whose data has `fields`."""
        index = 0
        while True:
            await self.wait_frames(index + 1)
            frame = self.frames[index]
            if isinstance(frame, str):
                msg = json.loads(frame)
                data = msg["data"]
                if msg["type"] == event_type and all(data.get(k) == v for k, v in fields.items()):
                    return index
            index += 1

    def messages(self) -> list[dict[str, Any]]:
        """The JSON frames so far."""
        return [json.loads(f) for f in self.frames if isinstance(f, str)]

    def types(self) -> list[str]:
        """The frame types so far; binary frames as "binary:N"."""
        out = []
        for f in self.frames:
            if isinstance(f, str):
                out.append(json.loads(f)["type"])
            else:
                out.append(f"binary:{Binary.parse(f).event_type}")
        return out


async def ws_connect(
    nursery: trio.Nursery,
    port: int,
    client_id: str | None = None,
    *,
    path: str = "/ws",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> WsClient:
    """Open a recording WebSocket client; its reader runs in `nursery`."""
    resource = path if client_id is None else f"{path}?clientId={client_id}"
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        # trio-websocket waits forever if the connection dies mid-handshake.
        with trio.fail_after(10):
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, f"127.0.0.1:{port}", resource, extra_headers=headers or []
            )
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    client = WsClient(ws, stream)
    nursery.start_soon(client.pump)
    return client
