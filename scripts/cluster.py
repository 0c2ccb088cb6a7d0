"""`make cluster`: the shared mode on one machine, to look at and to try.

    redis-server (AOF on)  <- 2 front daemons (role=front) <- nginx (one upstream with both)
                           <- 2 worker daemons (role=worker) -> 2 ComfyUI simulators

Prints the page's URL (nginx, under /comfy/) and runs until Ctrl-C; every process
logs to its own file under the cluster's directory. Needs redis-server and nginx
(scripts/test-deps installs both).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
SITE = REPO / "systemd" / "nginx-comfy-progress.conf"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")
    if found is None:
        sys.exit(f"make cluster needs {name} (run scripts/test-deps as root to install it)")
    return found


class Cluster:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.processes: list[trio.Process] = []

    async def start(self, name: str, command: list[str], ready: bytes) -> str:
        """Start a process, its output into NAME.log; returns the first group of `ready`."""
        log = (self.directory / f"{name}.log").open("wb")
        process = await trio.lowlevel.open_process(
            command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.processes.append(process)
        assert process.stdout is not None
        seen = b""
        with trio.fail_after(30):
            while (match := re.search(ready, seen)) is None:
                chunk = await process.stdout.receive_some(65536)
                if not chunk:
                    sys.exit(f"{name} stopped; see {self.directory / name}.log")
                log.write(chunk)
                log.flush()
                seen += chunk
        self._nursery.start_soon(self._drain, process, log)
        return match.group(1).decode()

    async def _drain(self, process: trio.Process, log: object) -> None:
        assert process.stdout is not None
        while chunk := await process.stdout.receive_some(65536):
            log.write(chunk)  # type: ignore[attr-defined]
            log.flush()  # type: ignore[attr-defined]

    async def run(self, port: int) -> None:
        python = sys.executable
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            redis_port = free_port()
            await self.start(
                "redis",
                [binary("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1",
                 "--dir", str(self.directory), "--save", "", "--appendonly", "yes",
                 "--appendfsync", "everysec"],
                rb"(Ready) to accept connections",
            )  # fmt: skip
            redis_url = f"redis://127.0.0.1:{redis_port}"
            shared = ["--set", f"redis_url={redis_url}"]
            serve = [python, "-m", "daemon.cli", "serve", "--listen", "127.0.0.1:0"]
            for n in (1, 2):
                sim = await self.start(
                    f"simulator{n}",
                    [python, "-m", "daemon.cli", "simulate-comfy", "--listen", "127.0.0.1:0"],
                    rb"simulator listening on (http://[0-9.:]+)",
                )
                await self.start(
                    f"worker{n}",
                    [*serve, "--comfy-url", sim, "--data-dir", str(self.directory / f"worker{n}"),
                     *shared, "--set", "role=worker"],
                    rb"worker ready, health and metrics on (http://\S+) ",
                )  # fmt: skip
            fronts = []
            for n in (1, 2):
                url = await self.start(
                    f"front{n}",
                    [*serve, "--data-dir", str(self.directory / f"front{n}"), *shared,
                     "--set", "role=front"],
                    rb"listening on (http://\S+) ",
                )  # fmt: skip
                fronts.append(url.removeprefix("http://"))
            await self.start_nginx(port, fronts)
            print(f"cluster ready: http://127.0.0.1:{port}/comfy/", flush=True)
            print(f"  fronts {', '.join(fronts)}; redis {redis_url}", flush=True)
            print(f"  logs in {self.directory}; Ctrl-C stops everything", flush=True)

    async def start_nginx(self, port: int, fronts: list[str]) -> None:
        servers = "".join(f"    server {front};\n" for front in fronts)
        site = SITE.read_text()
        site = re.sub(r"^\s*server\s+127\.0\.0\.1:8000;\n", servers, site, flags=re.M)
        site = re.sub(
            r"^(\s*)listen\s+80 default_server;", rf"\1listen 127.0.0.1:{port};", site, flags=re.M
        )
        site = re.sub(r"^\s*listen\s+\[::\]:80[^;]*;\n", "", site, flags=re.M)
        prefix = self.directory / "nginx"
        prefix.mkdir()
        (prefix / "site.conf").write_text(site)
        user = "user root;\n" if os.geteuid() == 0 else ""
        (prefix / "nginx.conf").write_text(
            f"daemon off;\n{user}pid {prefix}/nginx.pid;\nerror_log stderr notice;\n"
            "events { worker_connections 4096; }\n"
            f"http {{\n access_log {prefix}/access.log;\n client_body_temp_path {prefix}/body;\n"
            f" proxy_temp_path {prefix}/proxy;\n fastcgi_temp_path {prefix}/fastcgi;\n"
            f" uwsgi_temp_path {prefix}/uwsgi;\n scgi_temp_path {prefix}/scgi;\n"
            f" include /etc/nginx/mime.types;\n include {prefix}/site.conf;\n}}\n"
        )
        await self.start(
            "nginx",
            [binary("nginx"), "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
            rb"(start) worker process",
        )

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)


async def main(port: int) -> None:
    directory = Path(tempfile.mkdtemp(prefix="comfy-progress-cluster-"))
    cluster = Cluster(directory)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cluster.run, port)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()
    finally:
        cluster.stop()
        with trio.move_on_after(15, shield=True):
            for process in cluster.processes:
                await process.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080, help="nginx's port (default 8080)")
    trio.run(main, parser.parse_args().port)
