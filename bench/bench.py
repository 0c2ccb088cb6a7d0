"""Benchmarks: how fast the daemon answers, relays and fans out.

    make bench        (or: python -m bench.bench)

The daemon runs as its own process (so its CPU and memory are its own); the
simulator and the load run in this process, all on 127.0.0.1. Three figures:

1. POST /generate latency (202 answered, task journalled) at a concurrency.
2. Relay latency: the simulator releases one sampler step -> the SSE client
   holds the new progress event (ComfyUI WS frame -> parse -> state machine ->
   SSE write -> client parse).
3. Fan-out: N SSE subscribers on one task; per step, the time until the last
   of them has the event; and the daemon's memory per open stream.
4. Relay latency again in shared mode (redis-server, a worker daemon and a
   front daemon): what the Redis hop adds to figure 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from daemon.http.client import http_request, open_stream
from daemon.simulator import ComfySimulator, SimulatorConfig
from protocol.sse import SSEDecoder
from tests.daemon.process import DaemonProcess, daemon_process
from tests.daemon.redis_server import redis_server

SAMPLER_STEPS = 20  # the built-in txt2img graph's KSampler
SETTINGS = ("log_level=info", "max_connections=20000", "queue_poll_interval=1")


def percentiles(samples: Sequence[float]) -> str:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return (
        f"p50 {at(0.50):7.2f} ms   p95 {at(0.95):7.2f} ms   p99 {at(0.99):7.2f} ms   "
        f"max {ordered[-1] * 1000:7.2f} ms   (n={len(ordered)})"
    )


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


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


async def bench_generate(url: str, sim: ComfySimulator, requests: int, concurrency: int) -> str:
    # The GPU is busy: prompts queue up in ComfyUI while we submit (as in real use,
    # where a generation takes seconds); then they are let through.
    sim.set_manual_steps(True)
    samples: list[float] = []
    limiter = trio.CapacityLimiter(concurrency)

    async def one() -> None:
        async with limiter:
            start = time.perf_counter()
            await post_generate(url)
            samples.append(time.perf_counter() - start)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(requests):
            nursery.start_soon(one)
    elapsed = time.perf_counter() - started
    await wait_idle(sim)
    return (
        f"POST /generate, {requests} requests, concurrency {concurrency}: "
        f"{requests / elapsed:.0f} req/s\n    {percentiles(samples)}"
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


async def bench_relay(url: str, sim: ComfySimulator, tasks: int) -> str:
    samples: list[float] = []
    for _ in range(tasks):
        task_id = await sampling_task(url, sim)
        subscriber = Subscriber()
        async with trio.open_nursery() as nursery:
            ready = trio.Event()
            nursery.start_soon(subscriber.run, url, task_id, ready)
            await ready.wait()
            for value in range(1, SAMPLER_STEPS + 1):
                start = time.perf_counter()
                sim.grant_steps(1)
                samples.append(await subscriber.wait_for(value) - start)
            sim.grant_steps(1000)
            nursery.cancel_scope.cancel()
    return f"relay, one sampler step -> SSE client, {tasks} tasks:\n    {percentiles(samples)}"


async def bench_fanout(daemon: DaemonProcess, sim: ComfySimulator, clients: int) -> str:
    url = daemon.url
    task_id = await sampling_task(url, sim)
    before = rss_kib(daemon.process.pid)
    subscribers = [Subscriber() for _ in range(clients)]
    worst: list[float] = []
    everyone: list[float] = []
    async with trio.open_nursery() as nursery:
        for subscriber in subscribers:
            ready = trio.Event()
            nursery.start_soon(subscriber.run, url, task_id, ready)
            await ready.wait()
        after = rss_kib(daemon.process.pid)
        steps = SAMPLER_STEPS
        for value in range(1, steps + 1):
            start = time.perf_counter()
            sim.grant_steps(1)
            times = [await s.wait_for(value) - start for s in subscribers]
            worst.append(max(times))
            everyone.extend(times)
        sim.grant_steps(1000)
        nursery.cancel_scope.cancel()
    per_stream = (after - before) / clients
    return (
        f"fan-out, {clients} SSE subscribers on one task, {steps} steps:\n"
        f"    every delivery: {percentiles(everyone)}\n"
        f"    last subscriber per step: median {statistics.median(worst) * 1000:.1f} ms, "
        f"max {max(worst) * 1000:.1f} ms\n"
        f"    daemon memory: {before / 1024:.1f} MiB idle, {after / 1024:.1f} MiB with "
        f"{clients} streams ({per_stream:.1f} KiB per stream)"
    )


async def bench(requests: int, concurrency: int, relay_tasks: int, clients: int) -> list[str]:
    results = []
    with tempfile.TemporaryDirectory(prefix="comfy-progress-bench-") as tmp:
        sim = ComfySimulator(SimulatorConfig(step_time=0.001))
        async with trio.open_nursery() as nursery:
            await nursery.start(sim.run, ("127.0.0.1", 0))
            async with daemon_process(Path(tmp), sim.url, *SETTINGS) as daemon:
                results.append(await bench_generate(daemon.url, sim, 1 * requests // 5, 1))
                results.append(await bench_generate(daemon.url, sim, requests, concurrency))
                results.append(await bench_relay(daemon.url, sim, relay_tasks))
                results.append(await bench_fanout(daemon, sim, clients))
            results.append(await bench_relay_shared(Path(tmp), sim, relay_tasks))
            nursery.cancel_scope.cancel()
    return results


async def bench_relay_shared(tmp: Path, sim: ComfySimulator, tasks: int) -> str:
    """The relay figure again with Redis between: worker -> Redis Stream -> front."""
    async with redis_server(tmp / "redis") as redis:
        shared = (*SETTINGS, f"redis_url={redis.url}")
        async with (
            daemon_process(tmp / "worker", sim.url, *shared, "role=worker", worker=True),
            daemon_process(tmp / "front", None, *shared, "role=front") as front,
        ):
            figure = await bench_relay(front.url, sim, tasks)
    return figure.replace("relay,", "relay through Redis (worker -> Redis -> front),", 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--relay-tasks", type=int, default=10)
    parser.add_argument("--clients", type=int, default=1000)
    args = parser.parse_args()
    for line in trio.run(bench, args.requests, args.concurrency, args.relay_tasks, args.clients):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
