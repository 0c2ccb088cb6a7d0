"""Fixtures: a running simulator on 127.0.0.1 (port 0) with test clients."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

from daemon.simulator import ComfySimulator, SimulatorConfig
from tests.simulator.helpers import Reply, WsClient, http, ws_connect


def probe_graph(
    *, steps: int = 3, delay: float = 0.3, color: int = 0, prefix: str = "probe"
) -> dict[str, Any]:
    """The capture's EmptyImage -> SlowProgress -> SaveImage graph."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color},
        },
        "2": {
            "class_type": "SlowProgress",
            "inputs": {"image": ["1", 0], "steps": steps, "delay": delay},
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


@dataclass
class Harness:
    """A running simulator plus helpers to talk to it."""

    sim: ComfySimulator
    port: int
    nursery: trio.Nursery

    async def http(self, method: str, path: str, **kwargs: Any) -> Reply:
        return await http(self.port, method, path, **kwargs)

    async def connect(self, client_id: str | None = None, *, path: str = "/ws") -> WsClient:
        client = await ws_connect(self.nursery, self.port, client_id, path=path)
        await client.wait_frames(1)  # the status{sid} greeting
        return client

    async def submit(
        self, graph: dict[str, Any], client_id: str | None = None, **extra: Any
    ) -> str:
        body: dict[str, Any] = {"prompt": graph, **extra}
        if client_id is not None:
            body["client_id"] = client_id
        reply = await self.http("POST", "/prompt", json_body=body)
        assert reply.status == 200, reply.body
        prompt_id: str = reply.json()["prompt_id"]
        return prompt_id

    async def settle(self) -> None:
        """Until every task is blocked: all frames sent so far have been received."""
        await trio.testing.wait_all_tasks_blocked(0.0005)

    async def steps_until(self, done: Callable[[], bool]) -> None:
        """Manual mode: grant steps one at a time until `done()`."""
        while True:
            await self.settle()
            if done():
                return
            assert self.sim.waiting_for_step, "nothing is running"
            self.sim.grant_steps(1)

    async def finish(self, prompt_id: str) -> None:
        """Manual mode: run the prompt to its end."""
        await self.steps_until(lambda: prompt_id in self.sim.engine.history)

    async def history(self, prompt_id: str) -> dict[str, Any]:
        entry: dict[str, Any] = (await self.http("GET", f"/history/{prompt_id}")).json()
        return entry


@pytest.fixture
def start_sim(nursery: trio.Nursery) -> Callable[..., Awaitable[Harness]]:
    """`await start_sim(config)`: a simulator that lives until the test ends."""

    async def start(config: SimulatorConfig | None = None) -> Harness:
        sim = ComfySimulator(config or SimulatorConfig(step_time=0.01, seed=1))
        port = await nursery.start(sim.run, ("127.0.0.1", 0))
        return Harness(sim, port, nursery)

    return start
