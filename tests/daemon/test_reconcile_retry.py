"""A reconcile that fails while ComfyUI's socket is up is tried again.

After a reconnect each task asks /queue and /history how its prompt stands; if
that request fails (a blip, a 5xx, garbage), no reconnect will ask again, and
a prompt that finished while we were away sends no frame ever again. A relay
between the daemon and a real simulator breaks the connection in ways the
simulator cannot: the network down while ComfyUI keeps working, then every
GET /queue failing while the WebSocket is back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from daemon.http.client import http_request
from daemon.simulator import ComfySimulator, SimulatorConfig
from protocol import task
from tests.daemon.comfy_relay import comfy_relay
from tests.daemon.harness import payloads, running_daemon
from tests.daemon.test_pool import wait_state
from tests.simulator.test_workflows import txt2img

MANUAL = SimulatorConfig(step_time=0.01, manual_steps=True)


@pytest.mark.guard(30)  # (before the fix the task waited forever: this fails it)
async def test_a_reconcile_that_fails_with_the_socket_back_is_asked_again(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        sim = ComfySimulator(MANUAL)
        port = await nursery.start(sim.run, ("127.0.0.1", 0))
        async with (
            comfy_relay(port) as relay,
            running_daemon(
                tmp_path, simulator=None, comfy_url=relay.url, comfy_connect_timeout=1
            ) as daemon,
        ):
            await daemon.app.pool.wait_all_read()
            # Someone else's prompt runs (parked at its first step); ours waits behind
            # it in ComfyUI's queue, so the backend watches no prompt of ours for silence.
            body = json.dumps({"prompt": txt2img(steps=2, width=64, height=64)})
            foreign = await http_request("POST", f"{sim.url}/prompt", body=body.encode())
            assert foreign.status == 200, foreign.body
            task_id = await daemon.generate()
            actor = daemon.app.registry.get(task_id)
            assert actor is not None
            await wait_state(actor, lambda s: s.queue is not None and s.queue.ahead == 1)
            relay.go_down()
            await wait_state(actor, lambda s: s.phase is task.Phase.WAITING)
            # Both prompts finish while the daemon cannot see it.
            sim.set_manual_steps(False)
            await sim.engine.history.wait_for(actor.prompt_id)
            relay.failing = b"GET /queue"
            relay.come_back()
            await relay.failed_one.wait()  # the reconcile after the reconnect failed
            relay.failing = None
            data = payloads(await daemon.events(task_id))
        nursery.cancel_scope.cancel()
    assert data[-1]["status"] == "completed"
    assert len(data[-1]["result"]["imageUrls"]) == 1
