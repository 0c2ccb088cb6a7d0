"""Run `comfy-progress generate` as a real process; a TCP proxy that cuts a stream."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trio

# The installed console script, next to the interpreter running the tests:
# what a user runs, entry point included.
CLI = Path(sys.executable).parent / "comfy-progress"


async def run_generate(
    *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """`env`: variables added to the test's own environment."""
    assert CLI.exists(), f"{CLI} is missing: run `make setup`"
    return await trio.run_process(
        [str(CLI), "generate", *args],
        env={**os.environ, **env} if env is not None else None,
        stdin=b"",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


@dataclass
class Output:
    """Bytes read from a child's pipe so far; `wait_for` a pattern to appear."""

    data: bytearray = field(default_factory=bytearray)
    _grew: trio.Event = field(default_factory=trio.Event)
    closed: bool = False

    async def read_all(self, stream: trio.abc.ReceiveStream) -> None:
        async with stream:
            while chunk := await stream.receive_some(65536):
                self.data += chunk
                self._grew.set()
                self._grew = trio.Event()
        self.closed = True
        self._grew.set()

    async def wait_for(self, pattern: bytes) -> re.Match[bytes]:
        while True:
            found = re.search(pattern, self.data)
            if found is not None:
                return found
            assert not self.closed, f"{pattern!r} never came:\n{self.text()}"
            await self._grew.wait()

    def text(self) -> str:
        return self.data.decode(errors="replace")


def check_png(data: bytes) -> tuple[int, int]:
    """Walk a PNG's chunks (CRCs, IHDR first, IEND last, IDAT inflates); its size."""
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), data[:16]
    position = 8
    kinds: list[bytes] = []
    compressed = b""
    width = height = 0
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        if kind == b"IDAT":
            compressed += body
        kinds.append(kind)
        position += 12 + length
    assert kinds[0] == b"IHDR"
    assert kinds[-1] == b"IEND"
    assert zlib.decompress(compressed)
    return width, height


# One whole progress event as the daemon writes it (event, id, data, blank line).
WHOLE_EVENT = re.compile(rb"event: progress\nid: \d+\ndata: [^\n]*\n\n")


class CuttingProxy:
    """A TCP proxy to the daemon that cuts the first progress stream after one event.

    Every connection carries one request (our client says `Connection: close`);
    `heads` keeps each request's head as the proxy saw it.
    """

    def __init__(self, upstream_port: int, *, cuts: int = 1) -> None:
        self.upstream_port = upstream_port
        self.cuts_left = cuts
        self.heads: list[bytes] = []

    async def serve(self, client: trio.SocketStream) -> None:
        async with client:
            head = bytearray()
            while b"\r\n\r\n" not in head:
                data = await client.receive_some(65536)
                if not data:
                    return
                head += data
            self.heads.append(bytes(head[: head.index(b"\r\n\r\n")]))
            cut = head.startswith(b"GET /progress/") and self.cuts_left > 0
            if cut:
                self.cuts_left -= 1
            upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
            async with upstream, trio.open_nursery() as nursery:
                await upstream.send_all(bytes(head))
                nursery.start_soon(_pump, client, upstream)
                seen = bytearray()
                async for piece in upstream:
                    await client.send_all(piece)
                    seen += piece
                    if cut and WHOLE_EVENT.search(seen):
                        break  # closing both ends: the client sees the stream stop mid-body
                nursery.cancel_scope.cancel()

    def progress_heads(self) -> list[bytes]:
        return [head for head in self.heads if head.startswith(b"GET /progress/")]


async def _pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    try:
        async for data in source:
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
