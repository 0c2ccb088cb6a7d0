"""sd_notify for real: the test owns the notify socket, the daemon is a real process.

The daemon runs as `Type=notify` + `WatchdogSec=` start it: NOTIFY_SOCKET (an
abstract "@" address), WATCHDOG_USEC and WATCHDOG_PID set to its own pid.
Every message must come from the daemon's main pid (NotifyAccess=main).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import trio

from daemon.http.client import http_request
from tests.ops.harness import (
    DaemonExited,
    DaemonProcess,
    Notification,
    listening_socket,
    running_daemon,
)

WATCHDOG_USEC = 1_000_000  # pings expected every 0.5 s, never more than 1 s apart
FAST_SIMULATOR = ("--simulate", "--set", "simulator_step_time=0.01")


def status(note: Notification) -> str:
    return note.fields.get("STATUS", "")


async def generate(daemon: DaemonProcess) -> str:
    response = await http_request(
        "POST",
        f"{daemon.url}/generate",
        headers=[("Content-Type", "application/json")],
        body=b'{"prompt": "a red fox"}',
        timeout=10,
    )
    assert response.status == 202, response.body
    task_id: str = response.json()["taskId"]
    return task_id


async def test_ready_status_watchdog_and_stopping(tmp_path: Path) -> None:
    async with running_daemon(
        tmp_path,
        *FAST_SIMULATOR,
        env={"WATCHDOG_USEC": str(WATCHDOG_USEC)},
        pid_env=["WATCHDOG_PID"],
        wait_ready=False,
    ) as daemon:
        # READY=1 is the first message, sent when everything is up: the HTTP
        # server answers at once and ComfyUI (the simulator) is connected.
        ready = await daemon.wait_ready()
        assert daemon.notifications == [ready]
        health = await http_request("GET", f"{daemon.url}/healthz", timeout=5)
        assert health.status == 200
        readyz = await http_request("GET", f"{daemon.url}/readyz", timeout=5)
        assert readyz.status == 200, readyz.body
        assert status(ready) == (
            f"serving {daemon.url}; ComfyUI {daemon.comfy_url} connected; 0 tasks running, 0 queued"
        )

        # WATCHDOG=1 at half of WATCHDOG_USEC, from the main process.
        pings: list[float] = []
        while len(pings) < 3:
            await daemon.wait_for(lambda n: n.fields.get("WATCHDOG") == "1")
            pings.append(trio.current_time())
        gaps = [later - earlier for earlier, later in itertools.pairwise(pings)]
        assert all(gap < WATCHDOG_USEC / 1e6 for gap in gaps), gaps

        # STATUS follows the tasks: one held running by the simulator, then done.
        await daemon.sim_control(manual_steps=True)
        await generate(daemon)
        await daemon.wait_for(lambda n: "; 1 task running, 0 queued" in status(n))
        await daemon.sim_control(grant_steps=1000)
        await daemon.wait_for(lambda n: "; 0 tasks running, 0 queued" in status(n))

        # SIGTERM: STOPPING=1, then a clean exit.
        daemon.terminate()
        stopping = await daemon.wait_for(lambda n: n.fields.get("STOPPING") == "1")
        assert status(stopping).startswith("stopping: draining")
        await daemon.process.wait()
        assert daemon.process.returncode == 0, daemon.log()

    senders = {note.pid for note in daemon.notifications}
    assert senders == {daemon.pid}, "NotifyAccess=main accepts only the main process"
    # STATUS changes only before STOPPING=1: the last word is the shutdown's.
    assert daemon.notifications.index(stopping) == max(
        i for i, note in enumerate(daemon.notifications) if "STATUS" in note.fields
    )


async def test_no_watchdog_pings_when_the_watchdog_belongs_to_another_process(
    tmp_path: Path,
) -> None:
    # WATCHDOG_PID names another process (here: the test) - sd_watchdog_enabled()
    # says no, so the daemon must not ping even though WATCHDOG_USEC is set.
    env = {"WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())}
    async with running_daemon(tmp_path, *FAST_SIMULATOR, env=env) as daemon:
        # A whole task runs (many times the 50 ms a ping would take) ...
        await daemon.sim_control(manual_steps=True)
        await generate(daemon)
        await daemon.wait_for(lambda n: "; 1 task running, 0 queued" in status(n))
        await daemon.sim_control(grant_steps=1000)
        await daemon.wait_for(lambda n: "; 0 tasks running, 0 queued" in status(n))
        daemon.terminate()
        await daemon.wait_for(lambda n: n.fields.get("STOPPING") == "1")
        await daemon.process.wait()
        assert daemon.process.returncode == 0, daemon.log()
        # ... and of all it sent, not one was WATCHDOG=1.
        assert not [n for n in daemon.drain() if "WATCHDOG" in n.fields]


async def test_without_notify_socket_nothing_is_sent_and_nothing_fails(tmp_path: Path) -> None:
    # Outside systemd there is nothing to notify: the daemon runs and stops as
    # usual. It is socket-activated here only so the test knows where it will
    # answer: the first request waits in the socket's backlog until it does.
    with listening_socket() as sock:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with running_daemon(
            tmp_path,
            *FAST_SIMULATOR,
            listen_socket=sock,
            env={"NOTIFY_SOCKET": ""},
            wait_ready=False,
        ) as daemon:
            health = await http_request("GET", f"{url}/healthz", timeout=30)
            assert health.status == 200
            daemon.terminate()
            await daemon.process.wait()
            assert daemon.process.returncode == 0, daemon.log()
            assert daemon.drain() == []
    assert "sd_notify" not in daemon.log()


async def test_sigterm_while_starting_stops_at_once_and_never_says_ready(tmp_path: Path) -> None:
    # A ComfyUI that accepts the connection and never answers the WebSocket
    # handshake holds the start (up to comfy_connect_timeout). `systemctl stop`
    # meanwhile: the daemon must stop there, not finish starting (listen, READY=1
    # after STOPPING=1) and then wait out shutdown_grace with nothing to drain.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    comfy_url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    accepted = trio.Event()
    release = trio.Event()

    async def silent_comfy() -> None:
        async with listeners[0]:
            while True:
                stream = await listeners[0].accept()
                accepted.set()
                await release.wait()  # then the handshake fails at once
                await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(silent_comfy)
        async with running_daemon(
            tmp_path, "--comfy-url", comfy_url, "--set", "shutdown_grace=600", wait_ready=False
        ) as daemon:
            await accepted.wait()
            daemon.terminate()
            stopping = await daemon.wait_for(lambda n: n.fields.get("STOPPING") == "1")
            release.set()
            try:
                while True:  # to its exit, not one READY=1
                    note = await daemon.notification()
                    assert note.fields.get("READY") != "1", f"READY after STOPPING:\n{daemon.log()}"
            except DaemonExited:
                pass
            assert daemon.process.returncode == 0, daemon.log()
            assert "listening on" not in daemon.log()
            assert status(stopping) == "stopping: stopped while starting"
        nursery.cancel_scope.cancel()
