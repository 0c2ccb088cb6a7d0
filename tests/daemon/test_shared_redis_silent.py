"""Shared mode: a connection to Redis that goes silent without a reset (a network
split, a dead NAT entry) does not stall a daemon's blocking reads for ever (real
redis-server, real daemon processes, a relay that can go silent, an in-test simulator)."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from daemon.http.client import open_stream
from protocol.sse import ServerSentEvent, SSEDecoder
from tests.daemon.harness import read_events
from tests.daemon.redis_proxy import silent_proxy
from tests.daemon.redis_server import redis_server
from tests.daemon.test_restart import generate, sampling
from tests.daemon.test_shared import front, last, simulator, worker


async def test_a_front_whose_blocking_read_went_silent_still_ends_its_viewer_s_stream(
    tmp_path: Path,
) -> None:
    async with (
        redis_server(tmp_path / "redis") as redis,
        silent_proxy(redis.port) as proxy,
        simulator(manual=True) as sim,
        worker(tmp_path, "w", redis.url, sim.url),
        front(tmp_path, "f", proxy.url) as entry,
    ):
        task_id = await generate(entry.url)
        async with open_stream("GET", f"{entry.url}/progress/{task_id}") as response:
            assert response.status == 200
            chunks = aiter(response.chunks)
            decoder = SSEDecoder()
            seen: list[ServerSentEvent] = []
            while not (seen and sampling(seen[-1])):
                seen += decoder.feed(await anext(chunks))
            # The front's reader waits in XREAD BLOCK: its answer will never come.
            proxy.silence()
            sim.grant_steps(10_000)  # the worker ends the task, straight to Redis
            with trio.fail_after(40):  # a read that waits for ever never sees the end
                async for chunk in chunks:
                    seen += decoder.feed(chunk)
        assert json.loads(seen[-1].data)["status"] == "completed", seen[-1].data


async def test_a_worker_whose_connections_went_silent_takes_the_next_task(
    tmp_path: Path,
) -> None:
    async with (
        redis_server(tmp_path / "redis") as redis,
        silent_proxy(redis.port) as proxy,
        simulator(manual=False) as sim,
        front(tmp_path, "f", redis.url) as entry,
        worker(tmp_path, "w", proxy.url, sim.url),
    ):
        first = await generate(entry.url)
        assert last(await read_events(entry.url, first))["status"] == "completed"
        # Idle now, its take loop waits in XREADGROUP BLOCK: no answer will come.
        proxy.silence()
        task_id = await generate(entry.url)
        with trio.fail_after(40):  # a take that waits for ever never runs it
            done = await read_events(entry.url, task_id)
        assert last(done)["status"] == "completed"
