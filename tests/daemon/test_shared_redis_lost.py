"""Shared mode: Redis restarted without its data (no persistence, a flush, a failover
to an empty replica) loses what it held, but the service takes new tasks again once
it is back, and a task running meanwhile still ends for its viewer (real
redis-server, real daemon processes, an in-test simulator)."""

from __future__ import annotations

import json
from pathlib import Path

import coredis
import trio
from coredis.response.types import StreamPendingExt

from daemon.http.client import http_request
from tests.daemon.harness import held_stream, read_events
from tests.daemon.redis_server import redis_server
from tests.daemon.test_restart import generate, sampling
from tests.daemon.test_shared import (
    ends_counted,
    front,
    history_ids,
    last,
    leases,
    leases_after_refreshes,
    scrape,
    simulator,
    worker,
)


async def until_leased(client: coredis.Redis[bytes]) -> StreamPendingExt:
    """The first lease in the queue, once there is one."""
    while not (pending := await leases(client)):  # noqa: ASYNC110 (across processes)
        await trio.sleep(0.05)
    return pending[0]


async def test_redis_back_without_its_data_takes_new_tasks_and_ends_the_running_one(
    tmp_path: Path,
) -> None:
    async with (
        redis_server(tmp_path / "redis") as redis,  # no AOF, no snapshots: a restart is empty
        simulator(manual=True) as sim,
        worker(tmp_path, "w", redis.url, sim.url),
        front(tmp_path, "f", redis.url) as entry,
    ):
        running = await generate(entry.url)
        async with held_stream(entry.url, running) as stream:
            await stream.until(sampling)
            async with trio.open_nursery() as nursery:
                await redis.stop()
                await redis.start(nursery)  # same port, nothing kept: no queue, no group
                nursery.cancel_scope.cancel()
            after = await generate(entry.url)
            client = coredis.Redis.from_url(redis.url)
            async with client:
                # The worker took the new task from the queue made again, and refreshed
                # its leases since: the running task's entry is one Redis forgot.
                lease = await until_leased(client)
                await leases_after_refreshes(client, lease, 2)
            sim.grant_steps(10_000)
            with trio.fail_after(60):  # a dropped task would never end
                await stream.to_end()
        assert last(stream.seen)["status"] == "completed", stream.seen[-1].data
        assert last(await read_events(entry.url, after))["status"] == "completed"
        assert len(await history_ids(sim)) == 2


async def test_a_waiting_task_redis_forgot_ends_lost_for_its_viewer(tmp_path: Path) -> None:
    """No worker had taken it: nobody would ever write its end, so the front streaming
    it writes one (code `lost`), for its viewer and for any later GET. That front's
    metrics count it (as a cancel or the wait limit there), and a DELETE is told the
    task already ended, not that it is unknown (the end is all Redis holds of it)."""
    async with (
        redis_server(tmp_path / "redis") as redis,
        front(tmp_path, "f", redis.url) as entry,  # no worker: the task waits
    ):
        task_id = await generate(entry.url)
        async with held_stream(entry.url, task_id) as stream:
            await stream.until(lambda event: json.loads(event.data).get("queue"))  # seen waiting
            client = coredis.Redis.from_url(redis.url)
            async with client:
                await client.flushall()
            with trio.fail_after(20):  # a stream kept open with heartbeats never ends
                await stream.to_end()
        assert last(stream.seen)["error"]["code"] == "lost", stream.seen[-1].data
        assert last(await read_events(entry.url, task_id))["error"]["code"] == "lost"
        assert ends_counted(await scrape(entry.url), "error", "lost") == 1
        status = await http_request("GET", f"{entry.url}/tasks/{task_id}", timeout=10)
        assert status.status == 200
        assert status.json()["error"]["code"] == "lost"
        cancel = await http_request("DELETE", f"{entry.url}/tasks/{task_id}", timeout=10)
        assert cancel.status == 200, cancel.body
        assert cancel.json()["cancelled"] is False
        assert cancel.json()["status"] == "error"
