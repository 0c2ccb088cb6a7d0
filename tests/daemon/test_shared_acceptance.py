"""Issue 14's acceptance runs: many tasks and viewers over two fronts and two workers,
a front killed under its viewers, Redis restarted mid-run, and one Redis reader per
front however many viewers it has. Real processes, real simulators, real redis-server."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import coredis
import pytest
import trio

from daemon.http.client import HttpClientError, http_request, open_stream
from protocol.sse import ServerSentEvent, SSEDecoder
from tests.daemon.process import DaemonProcess
from tests.daemon.redis_server import redis_server
from tests.daemon.test_restart import generate, sampling
from tests.daemon.test_shared import (
    front,
    history_ids,
    one_worker_two_fronts,
    simulator,
    worker,
)

SHARING = re.compile(rb"sharing tasks through Redis as (\S+) ")


class Viewer:
    """An EventSource: reads a task's stream, and when the connection breaks reconnects
    (to the next front) with Last-Event-ID, until the terminal event."""

    def __init__(self, task_id: str, fronts: list[DaemonProcess], first: int = 0) -> None:
        self.task_id = task_id
        self.fronts = fronts
        self.turn = first
        self.events: list[ServerSentEvent] = []
        self.connected = trio.Event()
        self.reconnects = 0

    @property
    def last_id(self) -> int | None:
        return int(self.events[-1].id or 0) if self.events else None

    def ended(self) -> bool:
        return bool(self.events) and self.events[-1].event in ("complete", "error-event")

    async def run(self) -> None:
        while not self.ended():
            url = self.fronts[self.turn % len(self.fronts)].url
            headers = () if self.last_id is None else (("Last-Event-ID", str(self.last_id)),)
            decoder = SSEDecoder()
            try:
                async with open_stream(
                    "GET", f"{url}/progress/{self.task_id}", headers=headers
                ) as response:
                    assert response.status == 200
                    async for chunk in response.chunks:
                        for event in decoder.feed(chunk):
                            self.events.append(event)
                            self.connected.set()
            except HttpClientError:
                pass
            if not self.ended():
                self.reconnects += 1
                self.turn += 1


def payload(event: ServerSentEvent) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(event.data)
    return data


@pytest.mark.guard(300)
async def test_200_tasks_over_two_fronts_and_two_workers_each_run_once(tmp_path: Path) -> None:
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=False) as first_sim,
        simulator(manual=False) as second_sim,
        worker(tmp_path, "w1", redis.url, first_sim.url),
        worker(tmp_path, "w2", redis.url, second_sim.url),
        front(tmp_path, "f1", redis.url) as first,
        front(tmp_path, "f2", redis.url) as second,
    ):
        fronts = [first, second]
        viewers: list[Viewer] = []
        async with trio.open_nursery() as nursery:
            for n in range(200):
                task_id = await generate(fronts[n % 2].url)
                for v in range(20):  # ten viewers on each front
                    viewer = Viewer(task_id, fronts, first=v)
                    viewers.append(viewer)
                    nursery.start_soon(viewer.run)
        assert all(v.reconnects == 0 for v in viewers)
        finals = [payload(v.events[-1]) for v in viewers]
        assert all(f["status"] == "completed" for f in finals)
        images = {f["taskId"]: f["result"]["imageUrl"] for f in finals}
        assert len(images) == 200
        sample = sorted(images)[::40]
        for task_id in sample:  # each image from the front that did not take the POST
            image = await http_request("GET", second.url + images[task_id], timeout=10)
            assert image.status == 200
        ran_first, ran_second = await history_ids(first_sim), await history_ids(second_sim)
        assert len(ran_first) + len(ran_second) == 200  # no task ran twice
        assert ran_first
        assert ran_second


async def test_kill_9_of_a_front_its_100_viewers_resume_on_the_other(tmp_path: Path) -> None:
    async with one_worker_two_fronts(tmp_path, manual=True) as (
        _redis,
        sim,
        doomed,
        survivor,
    ):
        task_id = await generate(doomed.url)
        viewers = [Viewer(task_id, [doomed, survivor]) for _ in range(100)]
        async with trio.open_nursery() as nursery:
            for viewer in viewers:
                nursery.start_soon(viewer.run)
            for viewer in viewers:
                await viewer.connected.wait()
            doomed.kill()
            assert await doomed.wait() == -9
            sim.grant_steps(1000)
        for viewer in viewers:
            ids = [int(e.id or 0) for e in viewer.events]
            assert ids == sorted(set(ids))  # resumed where it was: nothing twice
            assert viewer.events[-1].event == "complete"
            assert viewer.reconnects == 1


# Four processes, a Redis restart and the reconnects after it: slow on a loaded machine.
@pytest.mark.guard(150)
async def test_redis_restarted_cleanly_mid_run_loses_no_accepted_task(tmp_path: Path) -> None:
    async with (
        redis_server(tmp_path / "redis", appendonly=True) as redis,
        simulator(manual=True) as sim,
        worker(tmp_path, "w", redis.url, sim.url),
        front(tmp_path, "f", redis.url) as entry,
    ):
        tasks = [await generate(entry.url) for _ in range(3)]
        async with open_stream("GET", f"{entry.url}/progress/{tasks[0]}") as response:
            decoder = SSEDecoder()
            running = False
            async for chunk in response.chunks:
                running = any(sampling(e) for e in decoder.feed(chunk))
                if running:
                    break
        async with trio.open_nursery() as nursery:
            await redis.stop()
            await redis.start(nursery)  # same port, same AOF file
            nursery.cancel_scope.cancel()
        viewers = [Viewer(task_id, [entry]) for task_id in tasks]
        async with trio.open_nursery() as nursery:
            for viewer in viewers:
                nursery.start_soon(viewer.run)
            for viewer in viewers:
                await viewer.connected.wait()
            sim.grant_steps(10_000)
        assert [payload(v.events[-1])["status"] for v in viewers] == ["completed"] * 3
        assert len(await history_ids(sim)) == 3


def daemon_id(daemon: DaemonProcess) -> str:
    match = SHARING.search(daemon.output)
    assert match is not None
    return match.group(1).decode()


def blocked_in_xread(connection: dict[str, Any]) -> bool:
    return connection["cmd"] == "xread" and "b" in connection["flags"]


async def until_each_blocked_in_xread(redis_url: str, names: list[str]) -> list[dict[str, Any]]:
    """CLIENT LIST once every named daemon's stream reader is blocked in its XREAD (between
    two reads it is not, for a moment): across processes there is no signal, so ask again."""
    client = coredis.Redis.from_url(redis_url)
    async with client:
        while True:
            listed = [dict(c) for c in await client.client_list()]
            blocked = {c["name"] for c in listed if blocked_in_xread(c)}
            if blocked.issuperset(names):
                return listed
            await trio.sleep(0.05)


@pytest.mark.guard(180)
async def test_5000_viewers_over_two_fronts_are_one_redis_reader_per_front(
    tmp_path: Path,
) -> None:
    async with one_worker_two_fronts(tmp_path, manual=True) as (
        redis,
        sim,
        first,
        second,
    ):
        fronts = [first, second]
        task_id = await generate(first.url)
        viewers = [Viewer(task_id, fronts, first=n) for n in range(5000)]
        async with trio.open_nursery() as nursery:
            for viewer in viewers:
                nursery.start_soon(viewer.run)
            for viewer in viewers:
                await viewer.connected.wait()
            sim.grant_steps(3)  # progress flows to every viewer, then stops: readers block
            names = [daemon_id(daemon) for daemon in fronts]
            listed = await until_each_blocked_in_xread(redis.url, names)
            sim.grant_steps(1000)
        for name in names:
            connections = [c for c in listed if c["name"] == name]
            # A pool of connections (the first requests' reads came at once), not one per viewer.
            assert len(connections) < 50
            # CLIENT LIST's `cmd` is a connection's last command, and each XREAD takes
            # whichever pooled connection is free: count the ones blocked in one now.
            assert len([c for c in connections if blocked_in_xread(c)]) == 1
        assert all(v.events[-1].event == "complete" for v in viewers)
