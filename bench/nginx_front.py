"""nginx in front of the daemon, as shipped (systemd/nginx-comfy-progress.conf),
for the benchmark's fanout_nginx rows: what the whole relay costs, daemon and
nginx together, with nginx reaching the daemon over loopback TCP or its Unix
socket. The site file is rendered and run by the ops tests' harness, so the
benchmark proxies through exactly what those tests check."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.ops.harness import nginx_process

CONNECTIONS = 10_000  # per worker: 4,000 subscribers and their 4,000 upstream connections


@dataclass
class NginxCpu:
    """CPU seconds of nginx's master and its workers (read from /proc)."""

    pids: tuple[int, ...]

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def nginx_front(workdir: Path, upstream: int | Path) -> Iterator[tuple[tuple[str, int], NginxCpu]]:
    """nginx on a free port of 127.0.0.1 proxying to `upstream` (the daemon's port on
    127.0.0.1, or its Unix socket): yields its address and its processes' CPU."""
    workdir.mkdir(parents=True, exist_ok=True)
    with nginx_process(workdir, upstream, connections=CONNECTIONS) as nginx:
        master = int((nginx.prefix / "nginx.pid").read_text())
        yield ("127.0.0.1", nginx.port), NginxCpu((master, *_workers(master)))


def _workers(master: int) -> list[int]:
    """The master's worker processes: it logs that it starts them a moment before
    they exist, so wait for them (a few ms)."""
    children = Path(f"/proc/{master}/task/{master}/children")
    deadline = time.monotonic() + 10
    while not (found := children.read_text().split()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nginx (pid {master}) started no worker")
        time.sleep(0.005)
    return [int(pid) for pid in found]
