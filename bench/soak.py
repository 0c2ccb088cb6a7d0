"""Soak run: 200 tasks through faults; every client must see its task end.

    make soak        (or: python -m bench.soak --tasks 200)

What happens, all on 127.0.0.1:
- two ComfyUI simulators (`--backends`) run in this process, as the daemon's
  pool; the daemon runs as a real
  process (so it can be killed), on a fixed port so clients can come back;
- `--tasks` POST /generate requests, each with an Idempotency-Key (a POST
  whose answer is lost is retried with the same key, as a careful client
  would), and for each task a client that follows /progress like a browser
  does: reconnect with backoff, resume with Last-Event-ID, stop at the
  terminal event;
- chaos: random WebSocket drops, one restart of the first simulator (ComfyUI
  forgets its queue: those tasks are resubmitted), and one kill -9 of the
  daemon followed by a restart.

It prints the tally; "lost" tasks (the daemon forgot them) and clients that
saw no terminal event must both be 0, and the exit status says so.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from daemon.http.client import HttpClientError, http_request, open_stream
from daemon.simulator import ComfySimulator, SimulatorConfig
from protocol.sse import SSEDecoder
from tests.daemon.process import DaemonProcess, daemon_process

CLIENT_DEADLINE = 300.0  # a client gives up on its task after this long


@dataclass
class Tally:
    submitted: int = 0
    completed: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    lost: list[str] = field(default_factory=list)  # the daemon answered 404 for them
    no_terminal: list[str] = field(default_factory=list)  # clients that never saw the end
    reconnects: int = 0  # SSE reconnections made by the clients


@dataclass
class Cluster:
    sims: list[ComfySimulator]
    data_dir: Path
    port: int
    daemon: DaemonProcess | None = None
    up: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def free_port() -> int:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


async def submit(cluster: Cluster, index: int) -> str | None:
    """POST /generate until it is answered; the same key makes retries safe."""
    key = f"soak-{index}-{secrets.token_hex(4)}"
    body = json.dumps({"prompt": f"soak {index}", "seed": index}).encode()
    for _ in range(120):
        try:
            response = await http_request(
                "POST",
                f"{cluster.url}/generate",
                headers=(("Content-Type", "application/json"), ("Idempotency-Key", key)),
                body=body,
                timeout=10,
            )
        except HttpClientError:
            await cluster.up.wait()
            await trio.sleep(0.2)
            continue
        if response.status == 202:
            task_id: str = response.json()["taskId"]
            return task_id
        await trio.sleep(0.5)
    return None


async def follow(cluster: Cluster, task_id: str, tally: Tally) -> None:
    """A browser-like SSE client: reconnect with backoff, resume with Last-Event-ID."""
    last_id: str | None = None
    delay = 0.1
    deadline = trio.current_time() + CLIENT_DEADLINE
    while trio.current_time() < deadline:
        headers = () if last_id is None else (("Last-Event-ID", last_id),)
        try:
            async with open_stream(
                "GET", f"{cluster.url}/progress/{task_id}", headers=headers
            ) as response:
                if response.status == 404:
                    tally.lost.append(task_id)
                    return
                decoder = SSEDecoder()
                async for chunk in response.chunks:
                    for event in decoder.feed(chunk):
                        last_id = event.id or last_id
                        delay = 0.1
                        if event.event == "complete":
                            tally.completed += 1
                            return
                        if event.event == "error-event":
                            error = json.loads(event.data)["error"]
                            tally.errors[f"{error['code']}: {error['message']}"] += 1
                            return
        except HttpClientError:
            pass
        tally.reconnects += 1
        await trio.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(delay * 2, 2.0)
    tally.no_terminal.append(task_id)


async def chaos(cluster: Cluster, tasks: int, tally: Tally) -> None:
    """Drops all along; a ComfyUI restart at ~40 %; a daemon kill -9 at ~60 %."""
    restarted = killed = False
    while True:
        await trio.sleep(random.uniform(0.5, 2.0))
        done = tally.submitted
        if not restarted and done >= tasks * 0.4:
            print(f"chaos: simulator restart after {done} submissions", file=sys.stderr)
            cluster.sims[0].restart()
            restarted = True
        elif not killed and done >= tasks * 0.6 and cluster.daemon is not None:
            print(f"chaos: kill -9 of the daemon after {done} submissions", file=sys.stderr)
            cluster.up = trio.Event()
            cluster.daemon.kill()
            killed = True
        else:
            random.choice(cluster.sims).drop_websockets()


async def run_daemon(cluster: Cluster, settings: tuple[str, ...], stop: trio.Event) -> None:
    """Keep the daemon running (restart it when it dies) until `stop`."""
    while not stop.is_set():
        urls = [sim.url for sim in cluster.sims]
        pool = (f"comfy_urls={','.join(urls[1:])}",)
        async with daemon_process(cluster.data_dir, urls[0], *settings, *pool) as daemon:
            cluster.daemon = daemon
            cluster.up.set()
            async with trio.open_nursery() as nursery:

                async def end_on_stop() -> None:
                    await stop.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(end_on_stop)
                await daemon.wait()
                nursery.cancel_scope.cancel()
        cluster.daemon = None


async def soak(tasks: int, rate: float, step_time: float, backends: int) -> Tally:
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="comfy-progress-soak-") as tmp:
        sims = [ComfySimulator(SimulatorConfig(step_time=step_time)) for _ in range(backends)]
        async with trio.open_nursery() as nursery:
            for sim in sims:
                await nursery.start(sim.run, ("127.0.0.1", 0))
            port = await free_port()
            cluster = Cluster(sims=sims, data_dir=Path(tmp), port=port)
            settings = (
                f"listen=127.0.0.1:{port}",
                "reconnect_initial_delay=0.1",
                "reconnect_max_delay=1",
                "queue_poll_interval=0.5",
                "comfy_silence_timeout=5",
                "shutdown_grace=2",
                "log_level=info",  # the harness waits for the "listening on" line
            )
            stop = trio.Event()
            nursery.start_soon(run_daemon, cluster, settings, stop)
            await cluster.up.wait()
            async with trio.open_nursery() as trouble:
                trouble.start_soon(chaos, cluster, tasks, tally)
                async with trio.open_nursery() as clients:
                    for index in range(tasks):
                        task_id = await submit(cluster, index)
                        if task_id is None:
                            tally.no_terminal.append(f"(request {index} never answered)")
                            continue
                        tally.submitted += 1
                        clients.start_soon(follow, cluster, task_id, tally)
                        await trio.sleep(1 / rate)
                trouble.cancel_scope.cancel()  # every client has its answer
            stop.set()
            nursery.cancel_scope.cancel()
    return tally


def report(tally: Tally, seconds: float) -> str:
    lines = [
        f"tasks submitted:                      {tally.submitted}",
        f"tasks completed:                      {tally.completed}",
        f"tasks ended in error:                 {sum(tally.errors.values())}",
    ]
    lines += [f"    {count:4d} x {reason}" for reason, count in tally.errors.most_common()]
    lines += [
        f"tasks lost:                           {len(tally.lost)}",
        f"clients that saw no terminal event:   {len(tally.no_terminal)}",
        f"SSE reconnections by clients:         {tally.reconnects}",
        f"wall time:                            {seconds:.0f} s",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--rate", type=float, default=8.0, help="submissions per second")
    parser.add_argument("--step-time", type=float, default=0.01, help="simulator step time (s)")
    parser.add_argument("--backends", type=int, default=2, help="simulators in the pool")
    args = parser.parse_args()
    started = time.monotonic()
    tally = trio.run(soak, args.tasks, args.rate, args.step_time, args.backends)
    print(report(tally, time.monotonic() - started))
    ok = not tally.lost and not tally.no_terminal and tally.submitted == args.tasks
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
