"""A task no live worker can run ends `backend_unavailable` after `backend_wait_timeout`
in shared mode too (real redis-server, real daemons; see daemon/shared/wait_limit.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import coredis
import trio

from daemon.http.client import http_request
from daemon.simulator import ComfySimulator, SimulatorConfig
from tests.daemon.harness import read_events
from tests.daemon.process import DaemonProcess
from tests.daemon.redis_monitor import monitored, run_together
from tests.daemon.redis_server import RedisServer, redis_server
from tests.daemon.test_restart import generate, sampling
from tests.daemon.test_shared import (
    ends_counted,
    front,
    history_ids,
    last,
    published_workers,
    scrape,
    simulator,
    until_forgotten,
    until_published,
    worker,
)

PREFIX = "comfy-progress"
STAMPED = f"{PREFIX}:unrunnable"  # the set of the stamped task ids


def stamp_key(task_id: str) -> str:
    return f"{PREFIX}:unrunnable:{task_id}"


async def status_of(url: str, task_id: str) -> dict[str, Any]:
    reply = await http_request("GET", f"{url}/tasks/{task_id}", timeout=10)
    assert reply.status == 200
    body: dict[str, Any] = reply.json()
    return body


async def ends_written(client: coredis.Redis[bytes], task_id: str) -> int:
    """Terminal snapshots in the task's stream (it keeps the newest few: all of these)."""
    entries = await client.xrange(f"{PREFIX}:events:{task_id}")
    ended = ("completed", "error")
    return sum(json.loads(e.field_values[b"p"])["status"] in ended for e in entries)


async def errors_counted(*fronts: DaemonProcess) -> float:
    """backend_unavailable ends over these fronts' metrics (the one that ended a task
    counts it right after Redis said so: a viewer may see the end first)."""
    return sum([ends_counted(await scrape(f.url), "error", "backend_unavailable") for f in fronts])


async def until_stamped(client: coredis.Redis[bytes], task_id: str) -> None:
    """Until a front counts the task's wait (across a process boundary: ask)."""
    while not await client.exists([stamp_key(task_id)]):  # noqa: ASYNC110
        await trio.sleep(0.05)


async def until_a_backend_is_away(redis_url: str) -> None:
    """Until a worker published that one of its backends takes no work now."""
    client = coredis.Redis.from_url(redis_url)
    async with client:
        while True:
            for key in [key async for key in client.scan_iter(match=f"{PREFIX}:caps:*")]:
                raw = await client.get(key)
                if raw is not None and not all(b["ready"] for b in json.loads(raw).values()):
                    return
            await trio.sleep(0.05)


async def test_a_task_no_worker_takes_ends_backend_unavailable_once_over_two_fronts_counted_once(
    tmp_path: Path,
) -> None:
    limit = ("backend_wait_timeout=1",)
    async with (
        redis_server(tmp_path / "redis") as redis,
        front(tmp_path, "f1", redis.url, *limit) as first,
        front(tmp_path, "f2", redis.url, *limit) as second,
    ):
        task_id = await generate(first.url)  # no worker at all
        seen: dict[str, dict[str, Any]] = {}

        async def view(daemon_url: str) -> None:
            seen[daemon_url] = last(await read_events(daemon_url, task_id))

        async with trio.open_nursery() as nursery:  # a viewer on each front
            nursery.start_soon(view, first.url)
            nursery.start_soon(view, second.url)
        for end in [*seen.values(), *[await status_of(f.url, task_id) for f in (first, second)]]:
            assert end["status"] == "error", end
            assert end["error"]["code"] == "backend_unavailable"
            assert "no worker is running" in end["error"]["details"]
        # The front that ended it counts it in its metrics, the other does not.
        while await errors_counted(first, second) == 0:  # noqa: ASYNC110 (another process)
            await trio.sleep(0.05)
        assert await errors_counted(first, second) == 1
        client = coredis.Redis.from_url(redis.url)
        async with client:
            assert await ends_written(client, task_id) == 1
            assert not await client.exists([stamp_key(task_id)])
            assert await client.zcard(f"{PREFIX}:waiting") == 0
        async with simulator(manual=False) as sim, worker(tmp_path, "w", redis.url, sim.url):
            # The ended task's queue entry reaches this worker first: it skips it.
            later = await generate(second.url)
            assert last(await read_events(second.url, later))["status"] == "completed"
            assert len(await history_ids(sim)) == 1
        assert (await status_of(first.url, task_id))["error"]["code"] == "backend_unavailable"
        assert await errors_counted(first, second) == 1


async def test_a_key_whose_task_ended_at_the_limit_and_was_forgotten_is_told_so(
    tmp_path: Path,
) -> None:
    """The front that ends a waiting task at the limit keeps its end beside the task's
    Idempotency-Key, as a worker or a cancel does: a retry after the task is
    forgotten gets that end, not a 410 saying it is unknown."""
    with trio.fail_after(30):
        async with (
            redis_server(tmp_path / "redis") as redis,
            front(tmp_path, "f", redis.url, "backend_wait_timeout=1", "task_retention=0") as entry,
        ):
            body = json.dumps({"prompt": "a red fox", "seed": 7}).encode()
            headers = [("Content-Type", "application/json"), ("Idempotency-Key", "limit-1")]
            accepted = await http_request(
                "POST", f"{entry.url}/generate", headers=headers, body=body, timeout=10
            )
            assert accepted.status == 202
            task_id = accepted.json()["taskId"]
            end = last(await read_events(entry.url, task_id))
            assert end["error"]["code"] == "backend_unavailable", end
            await until_forgotten(entry.url, task_id)
            retried = await http_request(
                "POST", f"{entry.url}/generate", headers=headers, body=body, timeout=10
            )
    assert retried.status == 200, retried.body
    assert retried.headers.get("idempotent-replayed") == "true"
    outcome = retried.json()
    assert (outcome["taskId"], outcome["status"]) == (task_id, "error")
    assert outcome["error"]["code"] == "backend_unavailable"


async def test_a_task_waiting_for_a_busy_worker_waits_past_the_limit(tmp_path: Path) -> None:
    limit = 0.5
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=True) as sim,
        front(tmp_path, "f", redis.url, f"backend_wait_timeout={limit}") as entry,
        worker(tmp_path, "w", redis.url, sim.url, extra=("backend_max_pending=1",)),
    ):
        running = await generate(entry.url)
        await read_events(entry.url, running, stop_after=sampling)
        behind = await generate(entry.url)  # waits: the only worker is busy
        client = coredis.Redis.from_url(redis.url)
        async with client:
            # Several limits by Redis' clock (the one the fronts' stamps use).
            until = (await client.time()).timestamp() + 4 * limit
            while (await client.time()).timestamp() < until:
                assert not await client.exists([stamp_key(behind)])
                await trio.sleep(0.05)
            waiting = await status_of(entry.url, behind)
            assert (waiting["status"], waiting["phase"]) == ("in-progress", "queued")
        sim.grant_steps(10_000)
        for task_id in (running, behind):
            assert last(await read_events(entry.url, task_id))["status"] == "completed"


async def test_a_worker_back_within_the_limit_runs_the_waiting_task(tmp_path: Path) -> None:
    # A rolling restart: the only worker goes, a task waits (and its wait is counted),
    # a new worker comes. The limit only needs to outlast a worker's start.
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=False) as sim,
        front(tmp_path, "f", redis.url, "backend_wait_timeout=30") as entry,
    ):
        async with worker(tmp_path, "w1", redis.url, sim.url) as first:
            done = await generate(entry.url)
            assert last(await read_events(entry.url, done))["status"] == "completed"
            first.terminate()
            assert await first.wait() == 0
        assert await published_workers(redis.url) == 0  # it withdrew what it could run
        task_id = await generate(entry.url)
        client = coredis.Redis.from_url(redis.url)
        async with client:
            await until_stamped(client, task_id)
            assert await client.smembers(STAMPED) == {task_id.encode()}
            async with (
                monitored(redis.port) as commands,
                worker(tmp_path, "w2", redis.url, sim.url),
            ):
                assert last(await read_events(entry.url, task_id))["status"] == "completed"
            assert not await client.exists([stamp_key(task_id)])
            assert not await client.exists([STAMPED])
        # The worker that adopted it dropped the stamp and its id in one script.
        stamp = ("DEL", stamp_key(task_id))
        assert run_together(commands, stamp, ("SREM", STAMPED, task_id))
        assert len(await history_ids(sim)) == 2


@asynccontextmanager
async def lacking_and_away(
    tmp_path: Path, limit: float
) -> AsyncIterator[tuple[RedisServer, ComfySimulator, DaemonProcess]]:
    """A front and two workers: one's ComfyUI lacks a node the default workflow needs
    (it takes such a task and puts it back in line, again and again); the other's,
    which could run it, went away after it was read (its worker still publishes that
    reading, so the front accepts the task)."""
    away = ComfySimulator(SimulatorConfig(step_time=0.01))
    gone = trio.CancelScope()

    async def serve_until_gone(*, task_status: trio.TaskStatus[int]) -> None:
        with gone:
            await away.run(("127.0.0.1", 0), task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_until_gone)
        async with (
            redis_server(tmp_path / "redis") as redis,
            simulator(manual=False, hidden=("EmptyLatentImage",)) as lacking,
            front(tmp_path, "f", redis.url, f"backend_wait_timeout={limit}") as entry,
            worker(tmp_path, "w1", redis.url, lacking.url),
            worker(tmp_path, "w2", redis.url, away.url),
        ):
            await until_published(redis.url, 2)
            gone.cancel()
            await until_a_backend_is_away(redis.url)
            yield redis, lacking, entry


async def queue_entries_added(client: coredis.Redis[bytes]) -> int:
    info = await client.xinfo_stream(f"{PREFIX}:queue")
    return info["entries-added"]


async def test_workers_that_cannot_run_a_task_do_not_keep_it_waiting(tmp_path: Path) -> None:
    async with lacking_and_away(tmp_path, 1) as (redis, lacking, entry):
        task_id = await generate(entry.url)
        end = last(await read_events(entry.url, task_id))
        assert end["error"]["code"] == "backend_unavailable", end
        assert "lacks node class EmptyLatentImage" in end["error"]["details"]
        assert await history_ids(lacking) == []
        client = coredis.Redis.from_url(redis.url)
        async with client:
            assert await queue_entries_added(client) > 1  # it was put back in line


async def test_a_task_put_back_in_line_waits_on_from_where_it_was(tmp_path: Path) -> None:
    """The worker that lacks the node takes the task and puts it back: its wait goes on
    (a stamp renewed by each bounce would keep it in the queue for ever)."""
    async with lacking_and_away(tmp_path, 60) as (redis, _lacking, entry):
        task_id = await generate(entry.url)
        client = coredis.Redis.from_url(redis.url)
        async with client:
            await until_stamped(client, task_id)
            since = await client.get(stamp_key(task_id))
            added = await queue_entries_added(client)
            while await queue_entries_added(client) == added:  # noqa: ASYNC110 (put back again)
                await trio.sleep(0.05)
            assert await client.get(stamp_key(task_id)) == since
            assert await client.smembers(STAMPED) == {task_id.encode()}
