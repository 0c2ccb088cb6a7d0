"""Benchmark: what live previews cost the daemon (not pass/fail; figures only).

    python -m bench.previews      (another helper wires it into `make bench`)

The fan-out shape of bench.bench, twice: N SSE viewers follow tasks whose
sampler runs at a steady pace, first with a simulator that sends no previews,
then with one that sends a 512x512 JPEG preview per step, and there one viewer
in ten fetches every preview it is told of (`progress.preview.url`). The
figures are the daemon's CPU time (its own process, /proc/PID/stat) per progress
event delivered to a viewer, and per viewer per sampler step (a preview
announcement is one more event). Then the cost of one preview fetch against one
fetch of a small static file (the page's CSS), in daemon CPU per request.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from daemon.http.client import http_request, open_stream
from daemon.simulator import ComfySimulator, SimulatorConfig
from protocol.sse import SSEDecoder
from tests.daemon.process import DaemonProcess, daemon_process

SETTINGS = ("log_level=info", "max_connections=20000", "queue_poll_interval=1")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SAMPLER_STEPS = 20  # the built-in txt2img graph's KSampler

JSON = (("Content-Type", "application/json"),)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class Tally:
    progress_events: int = 0
    preview_fetches: int = 0
    preview_bytes: int = 0


async def view(url: str, task_id: str, tally: Tally, *, fetches: bool, ready: trio.Event) -> None:
    """Follow one task's stream to its end; fetch each announced preview if `fetches`."""
    decoder = SSEDecoder()
    seen_version = 0
    async with open_stream("GET", f"{url}/progress/{task_id}", timeout_connect=60) as response:
        ready.set()
        async for chunk in response.chunks:
            for event in decoder.feed(chunk):
                payload = json.loads(event.data)
                if event.event != "progress":
                    return
                tally.progress_events += 1
                preview = payload["progress"].get("preview")
                if fetches and preview is not None and preview["version"] > seen_version:
                    seen_version = preview["version"]
                    image = await http_request("GET", url + preview["url"])
                    if image.status == 200:
                        tally.preview_fetches += 1
                        tally.preview_bytes += len(image.body)


@asynccontextmanager
async def setup(previews: bool) -> AsyncIterator[tuple[DaemonProcess, ComfySimulator]]:
    # Previews only, as ComfyUI's own KSampler sends them (no progress texts).
    config = SimulatorConfig(step_time=0.05, sampler_previews=previews)
    sim = ComfySimulator(config)
    with tempfile.TemporaryDirectory(prefix="comfy-progress-bench-") as tmp:
        async with trio.open_nursery() as nursery:
            await nursery.start(sim.run, ("127.0.0.1", 0))
            async with daemon_process(Path(tmp), sim.url, *SETTINGS) as daemon:
                yield daemon, sim
            nursery.cancel_scope.cancel()


async def fanout(daemon: DaemonProcess, viewers: int, tasks: int, fetch_every: int) -> str:
    tally = Tally()
    start = cpu_seconds(daemon.process.pid)
    for _ in range(tasks):
        reply = await http_request(
            "POST",
            f"{daemon.url}/generate",
            headers=JSON,
            body=json.dumps({"prompt": "bench"}).encode(),
        )
        task_id = reply.json()["taskId"]
        async with trio.open_nursery() as nursery:
            for i in range(viewers):
                ready = trio.Event()
                fetches = fetch_every > 0 and i % fetch_every == 0
                nursery.start_soon(
                    partial(view, daemon.url, task_id, tally, fetches=fetches, ready=ready)
                )
                await ready.wait()
    used = cpu_seconds(daemon.process.pid) - start
    per_event = used / max(1, tally.progress_events) * 1e6
    per_step = used / (viewers * tasks * SAMPLER_STEPS) * 1e6
    line = (
        f"{tally.progress_events} progress events to {viewers} viewers x {tasks} tasks: "
        f"daemon CPU {used:.2f} s, {per_event:.1f} µs per delivered event, "
        f"{per_step:.1f} µs per viewer per sampler step"
    )
    if tally.preview_fetches:
        line += (
            f"; {tally.preview_fetches} preview fetches "
            f"({tally.preview_bytes / tally.preview_fetches / 1024:.1f} KiB each)"
        )
    return line


async def fetch_cost(daemon: DaemonProcess, path: str, count: int) -> float:
    """Daemon CPU µs per GET of `path`, one request at a time."""
    start = cpu_seconds(daemon.process.pid)
    for _ in range(count):
        response = await http_request("GET", daemon.url + path)
        assert response.status == 200, (path, response.status)
    return (cpu_seconds(daemon.process.pid) - start) / count * 1e6


async def preview_vs_static(daemon: DaemonProcess, sim: ComfySimulator, count: int) -> str:
    sim.set_manual_steps(True)
    reply = await http_request(
        "POST",
        f"{daemon.url}/generate",
        headers=JSON,
        body=json.dumps({"prompt": "bench"}).encode(),
    )
    task_id = reply.json()["taskId"]
    sim.grant_steps(1)
    # Another process: there is no event to wait on.
    while (await http_request("GET", f"{daemon.url}/tasks/{task_id}/preview")).status != 200:  # noqa: ASYNC110
        await trio.sleep(0.01)
    preview = await fetch_cost(daemon, f"/tasks/{task_id}/preview", count)
    static = await fetch_cost(daemon, "/css/app.css", count)
    sim.set_manual_steps(False)
    sim.grant_steps(1000)
    return (
        f"one GET, daemon CPU: preview {preview:.0f} µs, small static file (app.css) "
        f"{static:.0f} µs ({count} each)"
    )


async def bench(viewers: int, tasks: int, fetches: int) -> list[str]:
    results = []
    async with setup(previews=False) as (daemon, _):
        results.append("previews off: " + await fanout(daemon, viewers, tasks, 0))
    async with setup(previews=True) as (daemon, sim):
        results.append("previews on:  " + await fanout(daemon, viewers, tasks, 10))
        results.append(await preview_vs_static(daemon, sim, fetches))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--viewers", type=int, default=200)
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--fetches", type=int, default=1000)
    args = parser.parse_args()
    for line in trio.run(bench, args.viewers, args.tasks, args.fetches):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
