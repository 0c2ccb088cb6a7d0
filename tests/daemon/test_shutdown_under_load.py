"""SIGTERM while tasks are being created and finished: the daemon exits 0.

The journal used to be closed while task actors still recorded, and the
flusher's `assert self._db` made the process exit 1 (about one run in six).
Each round here keeps several clients posting while prompts finish, sends
SIGTERM in the middle of it, and wants exit status 0 and a clean log.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio

from daemon.http.client import HttpClientError, http_request
from daemon.simulator import ComfySimulator, SimulatorConfig
from tests.daemon.process import daemon_process

ROUNDS = 4
CLIENTS = 6
ACCEPTED_BEFORE_SIGTERM = 40


async def post_until_refused(url: str, accepted: list[str], enough: trio.Event) -> None:
    body = json.dumps({"prompt": "a red fox", "steps": 1}).encode()
    while True:
        try:
            response = await http_request(
                "POST",
                f"{url}/generate",
                headers=(("Content-Type", "application/json"),),
                body=body,
                timeout=10,
            )
        except HttpClientError:
            return  # the daemon stopped listening
        if response.status == 202:
            accepted.append(response.json()["taskId"])
            if len(accepted) >= ACCEPTED_BEFORE_SIGTERM:
                enough.set()


async def test_sigterm_while_tasks_record_exits_zero(tmp_path: Path) -> None:
    sim = ComfySimulator(SimulatorConfig(step_time=0.0))
    with trio.fail_after(120):
        async with trio.open_nursery() as outer:
            await outer.start(sim.run, ("127.0.0.1", 0))
            for _ in range(ROUNDS):
                settings = ("queue_poll_interval=0.01", "shutdown_grace=1")
                async with daemon_process(tmp_path / "data", sim.url, *settings) as daemon:
                    accepted: list[str] = []
                    enough = trio.Event()
                    async with trio.open_nursery() as clients:
                        for _ in range(CLIENTS):
                            clients.start_soon(post_until_refused, daemon.url, accepted, enough)
                        await enough.wait()
                        daemon.terminate()
                    status = await daemon.wait()
                    assert status == 0, daemon.log()
                    assert "Traceback" not in daemon.log(), daemon.log()
            outer.cancel_scope.cancel()
