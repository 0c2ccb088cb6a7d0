"""`comfy-progress serve --listen unix:/path` as a process, and the shipped nginx site in front.

The nginx site is rendered with its commented `server unix:` alternative in
place of the TCP upstream line (tests.ops.harness.render_site).
"""

from __future__ import annotations

import socket
from pathlib import Path

import trio

from tests.ops.harness import (
    NginxProcess,
    follow,
    generate,
    listening_socket,
    run_nginx,
    running_daemon,
    short_directory,
)

FAST_SIMULATOR = ("--simulate", "--set", "simulator_step_time=0.01")


async def test_serves_on_its_own_socket_and_removes_it_on_sigterm(tmp_path: Path) -> None:
    with short_directory() as directory:
        path = directory / "http.sock"
        async with running_daemon(tmp_path, *FAST_SIMULATOR, listen=f"unix:{path}") as daemon:
            assert daemon.url == f"unix:{path}"  # STATUS=serving unix:/...; ...
            assert f"listening on unix:{path} (ComfyUI at" in daemon.log()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(str(path))
            daemon.terminate()
            await daemon.process.wait()
            assert daemon.process.returncode == 0, daemon.log()
        assert not path.exists()


async def test_a_path_another_daemon_answers_on_stops_the_start(tmp_path: Path) -> None:
    with short_directory() as directory:
        path = directory / "http.sock"
        with listening_socket(path):
            async with running_daemon(
                tmp_path, *FAST_SIMULATOR, listen=f"unix:{path}", wait_ready=False
            ) as daemon:
                await daemon.process.wait()
                assert daemon.process.returncode == 1
                assert f"cannot listen on {path}: already in use" in daemon.log()
                assert daemon.drain() == []  # never READY
            assert path.exists()  # the other daemon's socket is left alone


async def test_nginx_streams_sse_to_complete_over_the_unix_socket(tmp_path: Path) -> None:
    with short_directory() as directory:
        path = directory / "http.sock"
        async with (
            running_daemon(
                tmp_path, *FAST_SIMULATOR, "--set", "trusted_proxies=unix", listen=f"unix:{path}"
            ),
            trio.open_nursery() as nursery,
        ):
            nginx: NginxProcess = await nursery.start(run_nginx, tmp_path, path)
            site = f"{nginx.url}/comfy"
            reply = await generate(site)
            events, complete = await follow(f"{site}/progress/{reply['taskId']}")
            nursery.cancel_scope.cancel()
    assert complete
    assert [e.event for e in events][-1] == "complete", events
    assert len([e for e in events if e.event == "progress"]) > 1, events
