"""Socket activation for real: the test owns the listening socket, as systemd does.

The daemon gets it as fd 3 with LISTEN_FDS=1, LISTEN_FDNAMES=http and
LISTEN_PID set to its own pid (tests.ops.service_exec does what systemd does
between fork and exec), and must serve on it, ignoring `listen`.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import trio

from daemon.http.client import http_request
from tests.ops.harness import (
    REPO_ROOT,
    NotifySocket,
    daemon_environ,
    follow,
    free_port,
    generate,
    listening_socket,
    payload,
    running_daemon,
    short_directory,
)

FAST_SIMULATOR = ("--simulate", "--set", "simulator_step_time=0.01")
# `listen` must be ignored under socket activation: this address cannot be
# bound here (TEST-NET-1), so a daemon that tried would fail to start.
UNBINDABLE = ("--listen", "192.0.2.1:9")
UNIX_BASE = "http://localhost"  # the Host of requests sent over a Unix socket


async def test_serves_on_the_inherited_socket_across_restarts(tmp_path: Path) -> None:
    with listening_socket() as sock:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        for run in range(2):  # the socket outlives the daemon, as systemd's does
            async with running_daemon(
                tmp_path, *FAST_SIMULATOR, *UNBINDABLE, listen_socket=sock, wait_ready=False
            ) as daemon:
                # Sent before the daemon is up: it waits in the socket's backlog.
                health = await http_request("GET", f"{url}/healthz", timeout=30)
                assert health.status == 200, daemon.log()
                await daemon.wait_ready()
                assert daemon.url == url
                assert "socket activation: serving on ('127.0.0.1'" in daemon.log()

                # A whole generation on the inherited socket: POST, SSE, image.
                reply = await generate(url)
                events, complete = await follow(f"{url}/progress/{reply['taskId']}")
                assert complete
                assert [e.event for e in events][-1] == "complete", events
                image_url = payload(events[-1])["result"]["imageUrl"]
                image = await http_request("GET", f"{url}{image_url}", timeout=10)
                assert image.status == 200
                assert image.body.startswith(b"\x89PNG\r\n\x1a\n")

                daemon.terminate()
                await daemon.process.wait()
                assert daemon.process.returncode == 0, f"run {run}:\n{daemon.log()}"


async def test_serves_on_an_inherited_unix_socket_and_leaves_its_file(tmp_path: Path) -> None:
    """ListenStream=/run/comfy-progress/http.sock: the file is systemd's, never removed."""
    with short_directory() as directory:
        path = directory / "http.sock"
        with listening_socket(path) as sock:
            async with running_daemon(
                tmp_path, *FAST_SIMULATOR, *UNBINDABLE, listen_socket=sock
            ) as daemon:
                assert daemon.url == f"unix:{path}"
                assert f"socket activation: serving on {path} (http)" in daemon.log()
                reply = await generate(UNIX_BASE, unix_socket=str(path))
                events, complete = await follow(
                    f"{UNIX_BASE}/progress/{reply['taskId']}", unix_socket=str(path)
                )
                assert complete
                assert [e.event for e in events][-1] == "complete", events
                daemon.terminate()
                await daemon.process.wait()
                assert daemon.process.returncode == 0, daemon.log()
            assert path.exists()  # systemd's socket outlives the daemon


async def test_refuses_an_inherited_socket_it_cannot_serve_on(tmp_path: Path) -> None:
    # A datagram socket (a wrong ListenDatagram= unit): a clear error, exit 2.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        async with running_daemon(
            tmp_path, *FAST_SIMULATOR, listen_socket=udp, wait_ready=False
        ) as daemon:
            await daemon.process.wait()
            assert daemon.process.returncode == 2
            assert "must be a TCP or Unix stream socket" in daemon.log()
            assert daemon.drain() == []  # never READY


async def test_with_systemds_own_socket_activate_tool(tmp_path: Path) -> None:
    """systemd-socket-activate (package systemd) implements the LISTEN_* protocol itself."""
    tool = shutil.which("systemd-socket-activate")
    assert tool, "systemd-socket-activate is missing (Debian package systemd; .ci/run installs it)"
    port = free_port()
    notify = NotifySocket()
    serve = [sys.executable, "-m", "daemon.cli", "serve", *FAST_SIMULATOR, *UNBINDABLE]
    serve += ["--data-dir", str(tmp_path / "data")]
    env = daemon_environ({"NOTIFY_SOCKET": notify.address})
    command = [tool, "-l", f"127.0.0.1:{port}", "--fdname=http", "-E", "NOTIFY_SOCKET"]
    command += ["-E", "PATH", *serve]
    process = await trio.lowlevel.open_process(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        async with trio.open_nursery() as nursery:
            listening = trio.Event()

            async def read_stderr() -> None:
                # The tool binds, says so, and execs the daemon (which inherits
                # this pipe) on the first connection: keep it drained.
                assert process.stderr is not None
                said = b""
                async for chunk in process.stderr:
                    said = (said + chunk)[-4096:]
                    if re.search(rb"Listening on 127\.0\.0\.1:\d+ as 3", said):
                        listening.set()
                listening.set()  # ended: the request below says how

            nursery.start_soon(read_stderr)
            await listening.wait()
            health = await http_request("GET", f"http://127.0.0.1:{port}/healthz", timeout=30)
            assert health.status == 200
            while (note := notify.receive_nowait()) is None or note.fields.get("READY") != "1":
                await notify.wait_readable()
            assert note.pid == process.pid  # exec'd: the tool's pid is the daemon's
            assert f"serving http://127.0.0.1:{port};" in note.fields["STATUS"]
            process.terminate()
            await process.wait()
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
        notify.close()
    assert process.returncode == 0
