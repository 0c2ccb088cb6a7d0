"""The daemon as a real process (for kill -9, SIGTERM and restart tests), driven from Trio."""

from __future__ import annotations

import re
import resource
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

REPO_ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(rb"listening on (http://\S+) ")


@dataclass
class DaemonProcess:
    process: trio.Process
    url: str = ""
    output: bytearray = field(default_factory=bytearray)
    exited: trio.Event = field(default_factory=trio.Event)

    def kill(self) -> None:
        """kill -9: no chance to clean up."""
        self.process.kill()

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    async def wait(self) -> int:
        return await self.process.wait()

    def log(self) -> str:
        return self.output[-6000:].decode(errors="replace")


async def _read_output(daemon: DaemonProcess, listening: trio.Event) -> None:
    stdout = daemon.process.stdout
    assert stdout is not None
    async with stdout:
        while chunk := await stdout.receive_some(65536):
            daemon.output += chunk
            match = LISTENING.search(daemon.output)
            if match and not listening.is_set():
                daemon.url = match.group(1).decode()
                listening.set()
    daemon.exited.set()
    listening.set()


def _limit_open_files(limits: tuple[int, int]) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)


@asynccontextmanager
async def daemon_process(
    data_dir: Path, comfy_url: str, *settings: str, open_files: tuple[int, int] | None = None
) -> AsyncIterator[DaemonProcess]:
    """`comfy-progress serve` on 127.0.0.1:0 against `comfy_url`; `settings` are KEY=VALUE.

    `open_files` is the (soft, hard) RLIMIT_NOFILE the daemon starts with.
    """
    command = [
        sys.executable,
        "-m",
        "daemon.cli",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--comfy-url",
        comfy_url,
        "--data-dir",
        str(data_dir),
        *(arg for setting in settings for arg in ("--set", setting)),
    ]
    process = await trio.lowlevel.open_process(
        command,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=None if open_files is None else partial(_limit_open_files, open_files),
    )
    daemon = DaemonProcess(process)
    listening = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_output, daemon, listening)
        try:
            with trio.fail_after(30):
                await listening.wait()
            if not daemon.url:
                raise RuntimeError(f"the daemon did not start:\n{daemon.log()}")
            yield daemon
        finally:
            with trio.move_on_after(20, shield=True):
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                    with trio.move_on_after(15):
                        await process.wait()
                if process.returncode is None:
                    process.kill()
                await process.wait()
                await daemon.exited.wait()
