"""The benchmark's processes: the daemon and the fake ComfyUI, and how busy they are."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

REPO_ROOT = Path(__file__).resolve().parents[1]
DAEMON_SETTINGS = (
    "log_level=info",
    "max_connections=30000",
    "max_tasks=20000",
    # The generate scenario holds 2,000 prompts queued at once.
    "max_queued_tasks=20000",
    "queue_poll_interval=1",
)
# The fake ComfyUI holds every prompt of a scenario in its own queue and then
# plays them at once: the daemon must hand them all over, not two at a time.
EVERY_PROMPT_TO_COMFY = ("backend_max_pending=20000",)
Address = tuple[str, int]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def request(
    address: Address, method: str, path: str, body: object = None, timeout: float = 120
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_until_up(address: Address, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited early:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError):
            if request(address, "GET", "/healthz", timeout=2)[0] == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"did not come up:\n{log.read_text(errors='replace')[-3000:]}")


@contextlib.contextmanager
def fake_comfy() -> Iterator[Address]:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.fake_comfy"], cwd=REPO_ROOT, stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        yield ("127.0.0.1", int(line.rsplit(" ", 1)[1]))
    finally:
        process.terminate()
        process.wait()


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    address: Address
    unix_path: str | None = None  # its Unix socket too, when it has one

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        # utime and stime are fields 14 and 15 (1-based); fields[0] here is field 3.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def daemon_process(
    data_dir: Path,
    comfy: Address,
    settings: tuple[str, ...] = DAEMON_SETTINGS,
    *,
    unix_socket: bool = False,
) -> Iterator[Daemon]:
    """The daemon on a free port of 127.0.0.1; with `unix_socket`, also on
    `data_dir`/http.sock: both handed over by socket activation, as systemd does."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "daemon.log"
    command = [
        sys.executable, "-m", "daemon.cli", "serve",
        "--listen", f"127.0.0.1:{port}",
        "--comfy-url", f"http://{comfy[0]}:{comfy[1]}",
        "--data-dir", str(data_dir),
        *(arg for setting in settings for arg in ("--set", setting)),
    ]  # fmt: skip
    with contextlib.ExitStack() as sockets:
        unix_path = str(data_dir / "http.sock") if unix_socket else None
        pass_fds, in_child = sockets.enter_context(_activation(port, unix_path))
        with log.open("wb") as out:
            process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=pass_fds,
                preexec_fn=in_child,  # (before the CPU sampler's thread starts)
            )
    try:
        address = ("127.0.0.1", port)
        wait_until_up(address, process, log)
        while json.loads(request(address, "GET", "/readyz")[1])["ready"] is not True:
            time.sleep(0.05)
        yield Daemon(process, address, unix_path)
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def _activation(
    port: int, unix_path: str | None
) -> Iterator[tuple[tuple[int, ...], Callable[[], None] | None]]:
    """Popen's pass_fds and preexec_fn that hand the child a listening TCP socket on
    127.0.0.1:`port` and a Unix one at `unix_path` as fds 3 and 4, with LISTEN_FDS as
    systemd sets it (LISTEN_PID must be the child's own pid, so it is set in the
    child). Without `unix_path`: nothing (the daemon binds `--listen` itself)."""
    if unix_path is None:
        yield (), None
        return
    with (
        socket.create_server(("127.0.0.1", port), backlog=4096) as tcp,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix,
    ):
        unix.bind(unix_path)
        unix.listen(4096)
        fds = (tcp.fileno(), unix.fileno())

        def in_child() -> None:
            moved = [os.dup(fd) for fd in fds]  # out of the way of 3 and 4 first
            for target, fd in enumerate(moved, 3):
                os.dup2(fd, target)
            for fd in {*moved, *fds} - {3, 4}:
                os.close(fd)
            os.environ.update(
                LISTEN_PID=str(os.getpid()), LISTEN_FDS="2", LISTEN_FDNAMES="http:http-unix"
            )

        # Popen closes every fd not in pass_fds after preexec_fn: keep 3 and 4.
        yield (3, 4, *fds), in_child


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def machine_busy(since: tuple[int, int]) -> float:
    """The share of all CPUs busy since `since` (machine_ticks())."""
    busy, total = machine_ticks()
    return (busy - since[0]) / max(1, total - since[1])


class HasCpu(Protocol):
    def cpu_seconds(self) -> float: ...


class CpuSampler(threading.Thread):
    """Samples a process's (the daemon's) CPU seconds every 5 ms, to read them at any
    past moment."""

    def __init__(self, daemon: HasCpu) -> None:
        super().__init__(daemon=True)
        self._daemon = daemon
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.005):
            self.samples.append((time.monotonic(), self._daemon.cpu_seconds()))

    def at(self, moment: float) -> float:
        """The CPU seconds used by `moment` (the last sample taken at or before it)."""
        value = self.samples[0][1]
        for when, cpu in self.samples:
            if when > moment:
                break
            value = cpu
        return value
