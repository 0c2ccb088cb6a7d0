"""A task whose lease expired while no live worker is left to claim it (its only
worker was killed or stopped) ends `backend_unavailable` after `backend_wait_timeout`,
as a waiting task does; a worker that comes within the limit claims it instead, and
the end is one script a claim excludes (real redis-server, real daemons; see
daemon/shared/wait_limit.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import coredis
import pytest
import trio
from coredis.response.types import StreamPendingExt

from daemon.shared.store import GROUP, SharedRecord, SharedStore, text
from daemon.shared.wait_limit import WaitLimit
from daemon.tasks.restore import record_of
from protocol import task
from tests.daemon.harness import read_events
from tests.daemon.redis_server import redis_server
from tests.daemon.test_restart import generate, sampling
from tests.daemon.test_shared import front, last, simulator, worker
from tests.daemon.test_shared_wait_limit import (
    STAMPED,
    ends_written,
    errors_counted,
    stamp_key,
    status_of,
    until_stamped,
)

PREFIX = "p"
NOW = 1_795_632_898.0
GRAPH = {"1": {"class_type": "KSampler", "inputs": {}}}
LEASE = 15.0
KEY = f"{PREFIX}:idempotency:k"


# -- the end script, in process (the sweep runs in the test)


@asynccontextmanager
async def orphaned(tmp_path: Path) -> AsyncIterator[tuple[SharedStore, WaitLimit, str]]:
    """A task a worker `dead` took and left past its lease (no worker published): the
    store, a sweeper that stamped it, and the task's queue entry."""
    async with redis_server(tmp_path / "redis") as server:
        client: coredis.Redis[bytes] = coredis.Redis.from_url(server.url)
        async with client:
            store = SharedStore(client, PREFIX, retention=60)
            await store.ensure_queue()
            spec = task.TaskSpec(task_id="t", prompt_id="prompt-t", graph=GRAPH)
            state = replace(task.new_task(spec, NOW), version=1)
            # Made with an Idempotency-Key: its end is kept beside it.
            await store.submit(state, task.render(state, NOW), claim=(KEY, b"t", 600))
            taken = await client.xreadgroup(GROUP, "dead", {store.queue_key: ">"}, count=1)
            assert taken is not None
            entry = text(next(iter(taken.values()))[0].identifier)
            assert await store.take_waiting("t")
            # Its lease expired (as a worker stopping marks it, HAND_OVER in worker.py).
            await client.xclaim(
                store.queue_key, GROUP, "dead", 0, [entry], idle=int(LEASE * 1000) + 1000
            )
            limit = WaitLimit(store, limit=120, interval=1, lease_timeout=LEASE)
            await limit.sweep()
            assert await client.smembers(store.stamped_key) == {b"t"}
            # As if the first front saw it unrunnable longer than the limit ago.
            since = (await client.time()).timestamp() - 1000
            await client.set(store.unrunnable_key("t"), f"{since:.6f}")
            yield store, limit, entry


async def claim(store: SharedStore, consumer: str) -> list[str]:
    reply = await store.redis.xautoclaim(
        store.queue_key, GROUP, consumer, int(LEASE * 1000), "0-0", count=10
    )
    return [text(entry.identifier) for entry in reply[1]]


async def leases(store: SharedStore) -> list[tuple[str, str]]:
    """The queue's pending entries and their consumers."""
    pending = await store.redis.xpending(store.queue_key, GROUP, "-", "+", 10)
    assert isinstance(pending, tuple)
    return [
        (text(p.identifier), text(p.consumer)) for p in pending if isinstance(p, StreamPendingExt)
    ]


async def test_the_end_of_an_orphan_a_worker_claimed_just_before_does_nothing(
    tmp_path: Path,
) -> None:
    async with orphaned(tmp_path) as (store, limit, entry):
        assert await limit.orphans(set()) == {"t": entry}
        assert await claim(store, "alive") == [entry]
        assert not await limit.end_orphan("t", entry, "no worker is running")
        assert await store.outcome("t") is None  # (made empty, for its end to fill in)
        latest = await store.latest("t")
        assert latest is not None
        assert not latest.terminal
        assert await leases(store) == [(entry, "alive")]
        await limit.sweep()  # its lease is fresh: no orphan, nothing ended
        assert await limit.orphans(set()) == {}
        still = await store.latest("t")
        assert still is not None
        assert not still.terminal


async def test_an_orphan_ends_once_and_no_worker_claims_it_afterwards(tmp_path: Path) -> None:
    async with orphaned(tmp_path) as (store, limit, entry):
        ended: list[task.TaskState] = []
        limit.on_task_end = ended.append
        await limit.sweep()
        assert len(ended) == 1
        latest = await store.latest("t")
        assert latest is not None
        assert latest.terminal
        assert latest.payload["error"]["code"] == "backend_unavailable", latest.payload
        outcome = await store.outcome("t")
        assert outcome is not None
        assert outcome["error"]["code"] == "backend_unavailable"
        assert await claim(store, "alive") == []
        assert await leases(store) == []
        assert not await store.redis.exists([store.unrunnable_key("t")])
        assert await store.redis.smembers(store.stamped_key) == set()
        assert not await limit.end_orphan("t", entry, "no worker is running")
        await limit.sweep()
        assert len(ended) == 1


async def test_an_orphan_s_end_shows_how_far_its_worker_got(tmp_path: Path) -> None:
    """The end follows the state the worker last wrote (its record), as the worker's own
    end would: when the task started and its overall progress, not a task that never
    left the queue (0 %, never started)."""
    async with orphaned(tmp_path) as (store, limit, entry):
        shared = await store.load("t")
        assert shared is not None
        spec = task.TaskSpec(task_id="t", prompt_id="prompt-t", graph=GRAPH)
        running = replace(
            task.new_task(spec, NOW),
            stage=task.Stage.RUNNING,
            version=2,
            started_at=NOW + 1,
            current_node="1",
            overall_percentage=40.0,
        )
        record = SharedRecord(record_of(running, backend="http://gpu"), holder="dead")
        written = await store.write_held("dead", entry, record, task.render(running, NOW + 2))
        assert written.written
        await limit.sweep()
        latest = await store.latest("t")
        assert latest is not None
        assert latest.terminal
        assert latest.version == 3
        assert latest.payload["error"]["code"] == "backend_unavailable"
        assert latest.payload["progress"]["overall"]["percentage"] == 40
        ended = await store.load("t")
        assert ended is not None
        assert ended.finished
        assert ended.record.state["startedAt"] == NOW + 1


async def test_an_orphan_whose_task_is_gone_is_acknowledged_not_visited_again(
    tmp_path: Path,
) -> None:
    """As a worker claiming it would: an entry whose task ended or was forgotten (its
    worker died before acknowledging it) goes, and its stamp with it."""
    async with orphaned(tmp_path) as (store, limit, _entry):
        await store.redis.delete([store.task_key("t")])
        await limit.sweep()
        assert await leases(store) == []
        assert await claim(store, "alive") == []
        assert not await store.redis.exists([store.unrunnable_key("t")])
        assert await store.redis.smembers(store.stamped_key) == set()
        assert await limit.orphans(set()) == {}


async def test_the_worker_that_left_an_orphan_writes_nothing_past_its_end(
    tmp_path: Path,
) -> None:
    """Back from a partition longer than the lease and the limit, the worker finds its
    entry pending for nobody (as when Redis lost it), but the task has ended: a newer
    snapshot of its copy is refused, and the end stays the task's last word."""
    async with orphaned(tmp_path) as (store, limit, entry):
        await limit.sweep()
        ended = await store.latest("t")
        assert ended is not None
        assert ended.terminal
        shared = await store.load("t")
        assert shared is not None
        spec = task.TaskSpec(task_id="t", prompt_id="prompt-t", graph=GRAPH)
        copy = replace(task.new_task(spec, NOW), version=ended.version + 5)
        written = await store.write_held("dead", entry, shared, task.render(copy, NOW))
        assert not written.written
        assert await store.latest("t") == ended
        record = await store.load("t")
        assert record is not None
        assert record.finished


# -- real daemons


@pytest.mark.parametrize("stop", ["kill", "terminate"])
async def test_a_task_whose_only_worker_left_ends_backend_unavailable_on_every_front(
    tmp_path: Path, stop: str
) -> None:
    limit = ("backend_wait_timeout=1",)  # lease_timeout=1 (tests/daemon/test_shared.py)
    with trio.fail_after(60):
        async with (
            redis_server(tmp_path / "redis") as redis,
            simulator(manual=True),
            front(tmp_path, "f1", redis.url, *limit) as first,
            front(tmp_path, "f2", redis.url, *limit) as second,
        ):
            async with simulator(manual=True) as sim:
                async with worker(tmp_path, "w", redis.url, sim.url) as only:
                    task_id = await generate(first.url)
                    seen = await read_events(first.url, task_id, stop_after=sampling)
                    if stop == "kill":
                        only.kill()
                    else:
                        only.terminate()
                    await only.wait()
                after = int(seen[-1].id or 0)
                ends = [
                    last(await read_events(f.url, task_id, last_event_id=after))
                    for f in (first, second)
                ]
            for end in [*ends, *[await status_of(f.url, task_id) for f in (first, second)]]:
                assert end["status"] == "error", end
                assert end["error"]["code"] == "backend_unavailable"
                assert "its worker left it" in end["error"]["details"]
            while await errors_counted(first, second) == 0:  # noqa: ASYNC110 (another process)
                await trio.sleep(0.05)
            assert await errors_counted(first, second) == 1
            client = coredis.Redis.from_url(redis.url)
            async with client:
                assert await ends_written(client, task_id) == 1
                # The end shows how far the worker got: the last snapshot it wrote.
                _, before = await client.xrevrange(f"comfy-progress:events:{task_id}", count=2)
                reached = json.loads(before.field_values[b"p"])["progress"]["overall"]
                assert reached["nodesDone"] > 0, reached
                assert [end["progress"]["overall"] for end in ends] == [reached, reached]
                pending = await client.xpending("comfy-progress:queue", GROUP)
                assert pending.pending == 0  # type: ignore[union-attr]
                assert not await client.exists([stamp_key(task_id)])


async def test_a_worker_back_within_the_limit_claims_the_orphan_and_completes_it(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        async with (
            redis_server(tmp_path / "redis") as redis,
            simulator(manual=True) as sim,
            front(tmp_path, "f", redis.url, "backend_wait_timeout=30") as entry,
        ):
            async with worker(tmp_path, "w1", redis.url, sim.url) as doomed:
                task_id = await generate(entry.url)
                seen = await read_events(entry.url, task_id, stop_after=sampling)
                doomed.kill()
                await doomed.wait()
            client = coredis.Redis.from_url(redis.url)
            async with client:
                await until_stamped(client, task_id)  # its wait with no worker counts
                async with worker(tmp_path, "w2", redis.url, sim.url):
                    sim.grant_steps(10_000)
                    rest = await read_events(
                        entry.url, task_id, last_event_id=int(seen[-1].id or 0)
                    )
                assert last(rest)["status"] == "completed", last(rest)
                assert await ends_written(client, task_id) == 1
                assert not await client.exists([stamp_key(task_id)])
                assert task_id.encode() not in await client.smembers(STAMPED)
            assert await errors_counted(entry) == 0
