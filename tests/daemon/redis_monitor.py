"""What a real redis-server runs, in order, through MONITOR: a test can see which
commands ran inside one script (atomically) and which went one by one."""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

# `+1700000000.123456 [0 127.0.0.1:5555] "DEL" "key"`; a script's commands say `[0 lua]`.
LINE = re.compile(rb"^\+[0-9.]+ \[\d+ ([^\]]+)\] (.*)$")
ARGUMENT = re.compile(rb'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class Command:
    source: str  # the client's address, or "lua" inside a script
    args: tuple[str, ...]  # the command's name in upper case, then its arguments

    @property
    def in_script(self) -> bool:
        return self.source == "lua"


def parse(line: bytes) -> Command | None:
    match = LINE.match(line)
    if match is None:
        return None
    args = [a.decode(errors="replace") for a in ARGUMENT.findall(match.group(2))]
    return Command(match.group(1).decode(), (args[0].upper(), *args[1:]))


@asynccontextmanager
async def monitored(port: int) -> AsyncIterator[list[Command]]:
    """The commands Redis runs while the block runs (all of them: the block's end waits
    until a marker sent after it came through)."""
    commands: list[Command] = []
    marker = f"end-of-monitor-{secrets.token_hex(4)}"
    seen_marker = trio.Event()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:
        await stream.send_all(b"MONITOR\r\n")
        buffer = bytearray()
        while b"\r\n" not in buffer:
            buffer += await stream.receive_some(65536)
        assert buffer.startswith(b"+OK\r\n"), buffer
        del buffer[:5]

        async def read() -> None:
            while True:
                while b"\r\n" in buffer:
                    line, _, rest = bytes(buffer).partition(b"\r\n")
                    buffer[:] = rest
                    if (command := parse(line)) is None:
                        continue
                    if command.args == ("ECHO", marker):
                        seen_marker.set()
                        return
                    commands.append(command)
                chunk = await stream.receive_some(65536)
                assert chunk, "redis-server closed the MONITOR connection"
                buffer.extend(chunk)

        nursery.start_soon(read)
        yield commands
        other = await trio.open_tcp_stream("127.0.0.1", port)
        async with other:
            await other.send_all(f"ECHO {marker}\r\n".encode())
            await seen_marker.wait()


def run_together(commands: list[Command], first: tuple[str, ...], second: tuple[str, ...]) -> bool:
    """Whether every `second` Redis ran came right after a `first`, both in one script."""
    at = [i for i, c in enumerate(commands) if c.args == second]
    return bool(at) and all(
        i > 0 and commands[i].in_script and commands[i - 1].in_script
        and commands[i - 1].args == first
        for i in at
    )  # fmt: skip
