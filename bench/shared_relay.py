"""What the Redis hop of the shared mode adds to a progress event's delivery.

    python -m bench.shared_relay [--tasks 10]

The same measurement twice, all on 127.0.0.1 with the simulator and the SSE
client in this process: one daemon on its own (simulator -> daemon -> client),
then redis-server, a worker daemon and a front daemon (simulator -> worker ->
Redis Stream -> front -> client). Per sampler step: from the simulator
releasing it to the client holding the progress event.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from daemon.http.client import http_request, open_stream
from daemon.simulator import ComfySimulator, SimulatorConfig
from protocol.sse import SSEDecoder
from tests.daemon.process import daemon_process
from tests.daemon.redis_server import redis_server

SAMPLER_STEPS = 20  # the built-in txt2img graph's KSampler
STEP_INTERVAL = 0.02
SETTINGS = ("queue_poll_interval=1",)


def percentiles(samples: Sequence[float]) -> str:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return (
        f"p50 {at(0.50):7.2f} ms   p95 {at(0.95):7.2f} ms   p99 {at(0.99):7.2f} ms   "
        f"max {ordered[-1] * 1000:7.2f} ms   (n={len(ordered)})"
    )


class Subscriber:
    """One SSE connection that timestamps each event's arrival."""

    def __init__(self) -> None:
        self.arrivals: dict[int, float] = {}
        self.changed = trio.Event()

    async def run(self, url: str, task_id: str, ready: trio.Event | None = None) -> None:
        decoder = SSEDecoder()
        async with open_stream("GET", f"{url}/progress/{task_id}", timeout_connect=60) as r:
            async for chunk in r.chunks:
                now = time.perf_counter()
                for event in decoder.feed(chunk):
                    value = json.loads(event.data)["progress"]["currentValue"]
                    self.arrivals.setdefault(int(value), now)
                    if ready is not None:
                        ready.set()
                self.changed.set()
                self.changed = trio.Event()

    async def wait_for(self, value: int) -> float:
        while value not in self.arrivals:
            await self.changed.wait()
        return self.arrivals[value]


async def post_generate(url: str) -> str:
    response = await http_request(
        "POST",
        f"{url}/generate",
        headers=[("Content-Type", "application/json")],
        body=json.dumps({"prompt": "bench"}).encode(),
        timeout=30,
    )
    assert response.status == 202, response.body
    task_id: str = response.json()["taskId"]
    return task_id


async def wait_idle(sim: ComfySimulator) -> None:
    """Until the simulator runs nothing and has nothing queued."""
    sim.set_manual_steps(False)
    while True:
        queue = (await http_request("GET", f"{sim.url}/queue")).json()
        if not queue["queue_running"] and not queue["queue_pending"]:
            return
        await trio.sleep(0.05)


async def sampling_task(url: str, sim: ComfySimulator) -> str:
    """A fresh task parked at its sampler's first step (manual steps)."""
    await wait_idle(sim)
    sim.set_manual_steps(True)
    task_id = await post_generate(url)
    probe = Subscriber()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe.run, url, task_id)
        # The simulator has no event for "a step is parked"; poll it.
        while not sim.waiting_for_step:  # noqa: ASYNC110
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    return task_id


async def relay(url: str, sim: ComfySimulator, tasks: int) -> list[float]:
    samples: list[float] = []
    for _ in range(tasks):
        task_id = await sampling_task(url, sim)
        subscriber = Subscriber()
        async with trio.open_nursery() as nursery:
            ready = trio.Event()
            nursery.start_soon(subscriber.run, url, task_id, ready)
            await ready.wait()
            for value in range(1, SAMPLER_STEPS + 1):
                # 50 steps/s: below the actor's publish rate (100/s), so no step is
                # held back by the pacer, as with a real sampler.
                await trio.sleep(STEP_INTERVAL)
                start = time.perf_counter()
                sim.grant_steps(1)
                samples.append(await subscriber.wait_for(value) - start)
            sim.grant_steps(1000)
            nursery.cancel_scope.cancel()
    return samples


async def bench(tasks: int) -> list[str]:
    lines = []
    with tempfile.TemporaryDirectory(prefix="comfy-progress-bench-") as name:
        tmp = Path(name)
        sim = ComfySimulator(SimulatorConfig(step_time=0.001))
        async with trio.open_nursery() as nursery:
            await nursery.start(sim.run, ("127.0.0.1", 0))
            async with daemon_process(tmp / "alone", sim.url, *SETTINGS) as daemon:
                alone = await relay(daemon.url, sim, tasks)
            lines.append(f"relay, one daemon:\n    {percentiles(alone)}")
            async with redis_server(tmp / "redis") as redis:
                shared = (*SETTINGS, f"redis_url={redis.url}")
                async with (
                    daemon_process(tmp / "worker", sim.url, *shared, "role=worker", worker=True),
                    daemon_process(tmp / "front", None, *shared, "role=front") as front,
                ):
                    through = await relay(front.url, sim, tasks)
            lines.append(f"relay, worker -> Redis -> front:\n    {percentiles(through)}")
            nursery.cancel_scope.cancel()
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=10, help="tasks of 20 sampler steps each")
    args = parser.parse_args()
    for line in trio.run(bench, args.tasks):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
