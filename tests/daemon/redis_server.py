"""A real redis-server (Debian's) for the shared-mode tests, on a free port of 127.0.0.1.

No system service: each test starts its own, in its own directory, and kills it at
the end. Snapshots are off; AOF only where a test restarts Redis and needs it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

READY = b"Ready to accept connections"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RedisServer:
    directory: Path
    port: int
    appendonly: bool
    process: trio.Process | None = None
    output: bytearray = field(default_factory=bytearray)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    async def start(self, nursery: trio.Nursery) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        command = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
        ]  # fmt: skip
        self.output = bytearray()
        self.process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        ready = trio.Event()
        nursery.start_soon(self._read, self.process, ready)
        with trio.fail_after(20):
            await ready.wait()
        if READY not in self.output:
            raise RuntimeError(f"redis-server did not start:\n{self.output.decode()}")

    async def _read(self, process: trio.Process, ready: trio.Event) -> None:
        assert process.stdout is not None
        async with process.stdout:
            while chunk := await process.stdout.receive_some(65536):
                self.output += chunk
                if READY in self.output:
                    ready.set()
        ready.set()

    async def stop(self) -> None:
        """SIGTERM: a clean shutdown (with AOF on, everything acknowledged is kept)."""
        process = self.process
        if process is not None and process.returncode is None:
            process.terminate()
            with trio.move_on_after(15, shield=True):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


@asynccontextmanager
async def redis_server(directory: Path, *, appendonly: bool = False) -> AsyncIterator[RedisServer]:
    await trio.Path(directory).mkdir(parents=True, exist_ok=True)
    server = RedisServer(directory, free_port(), appendonly)
    async with trio.open_nursery() as nursery:
        try:
            await server.start(nursery)
            yield server
        finally:
            with trio.move_on_after(20, shield=True):
                await server.stop()
