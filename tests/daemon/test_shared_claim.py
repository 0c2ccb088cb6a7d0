"""Shared mode: a worker killed at an awkward moment of taking a task (real
redis-server, real daemon processes, in-test simulators; a relay holds the dying
worker's command so the test decides where it dies)."""

from __future__ import annotations

from pathlib import Path

import coredis
import trio

from tests.daemon.harness import read_events
from tests.daemon.redis_proxy import redis_proxy
from tests.daemon.redis_server import redis_server
from tests.daemon.test_restart import generate
from tests.daemon.test_shared import (
    QUEUE,
    front,
    history_ids,
    last,
    leases,
    simulator,
    until_published,
    worker,
)
from tests.daemon.test_shared_wait_limit import until_a_backend_is_away

WAITING = "comfy-progress:waiting"


async def until_no_lease(client: coredis.Redis[bytes]) -> None:
    """Until the queue's entries are all acknowledged (the claimer's end of the task)."""
    while await leases(client):  # noqa: ASYNC110 (no signal across processes)
        await trio.sleep(0.05)


async def test_a_task_whose_taker_died_before_taking_it_out_of_line_runs_once_and_leaves_it(
    tmp_path: Path,
) -> None:
    """The worker got the queue entry (XREADGROUP) and died before its ZREM took the
    task out of the waiting set: the worker that claims the entry after the lease takes
    it out of line too, else the ended task waits there for ever, counted by
    max_queued_tasks and ahead of every later task."""
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=False) as sim,
        front(tmp_path, "f", redis.url, "max_queued_tasks=1") as entry,
    ):
        taking = trio.Event()

        async def die_there() -> None:
            taking.set()
            await trio.sleep_forever()

        def takes_out_of_line(data: bytes) -> bool:
            return b"ZREM" in data and WAITING.encode() in data

        async with (
            redis_proxy(redis.port, takes_out_of_line, die_there) as url,
            worker(tmp_path, "w1", url, sim.url) as doomed,
        ):
            task_id = await generate(entry.url)
            await taking.wait()
            doomed.kill()
            assert await doomed.wait() == -9
        async with worker(tmp_path, "w2", redis.url, sim.url):
            done = await read_events(entry.url, task_id)
            assert last(done)["status"] == "completed", last(done)
            client = coredis.Redis.from_url(redis.url)
            async with client:
                await until_no_lease(client)
                assert await client.zrange(WAITING, 0, -1) == ()
            # Nothing waits or runs: the service takes a task again.
            after = await generate(entry.url)
            assert last(await read_events(entry.url, after))["status"] == "completed"
        assert len(await history_ids(sim)) == 2


async def until_all_delivered(client: coredis.Redis[bytes]) -> None:
    """Until the workers' group has read every entry of the queue."""
    while True:
        [group] = await client.xinfo_groups(QUEUE)
        stream = await client.xinfo_stream(QUEUE)
        generated: object = stream["last-generated-id"]  # bytes, whatever the stubs say
        if group[b"last-delivered-id"] == generated:
            return
        await trio.sleep(0.05)


async def test_a_task_whose_taker_died_while_putting_it_back_runs_on_one_worker(
    tmp_path: Path,
) -> None:
    """A worker that cannot run the task puts it back in line: a new queue entry, the
    old one acknowledged. Killed between the two, it left both: one worker ran the task
    from the new entry, and another claimed the old one after the lease and ran it too."""
    never_claims = ("lease_timeout=600",)
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=False, hidden=("EmptyLatentImage",)) as lacking,
        simulator(manual=True) as first_sim,
        simulator(manual=False) as claimer_sim,
        front(tmp_path, "f", redis.url) as entry,
        worker(tmp_path, "w2", redis.url, first_sim.url, extra=never_claims),
    ):
        await until_published(redis.url, 1)  # the front takes the task: w2 could run it
        first_sim.reject_connections(3600)  # ... but now has no room: w1 takes it
        await until_a_backend_is_away(redis.url)
        putting_back = trio.Event()

        async def die_there() -> None:
            putting_back.set()
            await trio.sleep_forever()

        async with (
            redis_proxy(redis.port, lambda data: b"XACK" in data, die_there) as url,
            worker(tmp_path, "w1", url, lacking.url) as doomed,
        ):
            task_id = await generate(entry.url)
            await putting_back.wait()
            doomed.kill()
            assert await doomed.wait() == -9
        first_sim.reject_connections(0)  # w2 takes work again: whatever is in line
        client = coredis.Redis.from_url(redis.url)
        async with client:
            await until_all_delivered(client)
        # The dead worker's entry, claimed after the lease by a worker that can run it.
        async with worker(tmp_path, "w3", redis.url, claimer_sim.url):
            done = await read_events(entry.url, task_id)
        assert last(done)["status"] == "completed", last(done)
        assert len(await history_ids(claimer_sim)) == 1
        assert first_sim.engine.number == 0  # w2 never had it
        assert await history_ids(lacking) == []
