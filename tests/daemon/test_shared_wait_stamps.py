"""The set of stamped task ids (`{p}:unrunnable`, daemon/shared/wait_limit.py): a sweep
touches only the tasks no live worker can run and the stamped ones, and every stamp
comes and goes with its id in the set, in one script (real redis-server; the sweep
runs in the test, a worker's capabilities are published as a worker does)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import coredis

from daemon.comfy.capabilities import Capabilities
from daemon.shared.capabilities import capabilities_to_json
from daemon.shared.store import GROUP, SharedRecord, SharedStore, text
from daemon.shared.wait_limit import WaitLimit
from daemon.shared.worker_registry import publish
from protocol import task
from tests.daemon.redis_monitor import monitored, run_together
from tests.daemon.redis_server import RedisServer, redis_server

PREFIX = "p"
NOW = 1_795_632_898.0
RUNS = {"1": {"class_type": "KSampler", "inputs": {}}}  # every worker here has it
LACKS = {"1": {"class_type": "Missing", "inputs": {}}}  # no worker here has it
# Commands that name one task: a sweep that sends any for a task it need not touch
# does work per waiting task.
PER_TASK = {"DEL", "GET", "SET", "EXPIRE", "ZSCORE", "EXISTS", "SADD", "SREM"}


@asynccontextmanager
async def shared_store(tmp_path: Path) -> AsyncIterator[tuple[RedisServer, SharedStore]]:
    async with redis_server(tmp_path / "redis") as server:
        client: coredis.Redis[bytes] = coredis.Redis.from_url(server.url)
        async with client:
            store = SharedStore(client, PREFIX, retention=60)
            await store.ensure_queue()
            yield server, store


async def submit(store: SharedStore, task_id: str, graph: dict[str, Any]) -> None:
    spec = task.TaskSpec(task_id=task_id, prompt_id=f"prompt-{task_id}", graph=graph)
    state = replace(task.new_task(spec, NOW), version=1)
    await store.submit(state, task.render(state, NOW))


async def a_worker_can_run_all_but_missing(store: SharedStore) -> None:
    reading = Capabilities(frozenset({"KSampler"}), frozenset({"Missing"}), None)
    await publish(store, "w", capabilities_to_json({"b": reading}, {"b"}), ttl=600)


async def stamped(store: SharedStore) -> set[str]:
    return {text(m) for m in await store.redis.smembers(store.stamped_key)}


async def stamp_keys(store: SharedStore) -> set[str]:
    keys = store.redis.scan_iter(match=f"{store.unrunnable_key('')}*")
    return {text(k).removeprefix(store.unrunnable_key("")) async for k in keys}


async def expire_stamp(store: SharedStore, task_id: str) -> None:
    """As Redis expires a stamp nobody refreshed: the key goes, nothing else."""
    await store.redis.pexpire(store.unrunnable_key(task_id), 1)
    while await store.redis.exists([store.unrunnable_key(task_id)]):
        await store.redis.ping()


def sweeper(store: SharedStore, limit: float = 120) -> WaitLimit:
    return WaitLimit(store, limit=limit, interval=1, lease_timeout=15)


async def test_a_sweep_over_a_runnable_backlog_sends_nothing_per_task_and_stamps_nothing(
    tmp_path: Path,
) -> None:
    async with shared_store(tmp_path) as (server, store):
        backlog = [f"t{n}" for n in range(1200)]  # over two of MARK's batches
        for task_id in backlog:
            await submit(store, task_id, RUNS)
        await submit(store, "lacking", LACKS)
        await a_worker_can_run_all_but_missing(store)
        limit = sweeper(store)
        await limit.sweep()  # the first reads what each task needs
        async with monitored(server.port) as commands:
            await limit.sweep()
        # Only the task no worker can run was visited (ZSCORE, GET, EXPIRE).
        touched = [c for c in commands if c.args[0] in PER_TASK]
        assert {c.args[1] for c in touched} == {store.waiting_key, store.unrunnable_key("lacking")}
        assert len(touched) == 3, touched
        assert len(commands) < 20, commands
        assert await stamp_keys(store) == {"lacking"}
        assert await stamped(store) == {"lacking"}


async def test_a_task_that_became_runnable_loses_its_stamp_and_its_set_entry(
    tmp_path: Path,
) -> None:
    async with shared_store(tmp_path) as (server, store):
        await submit(store, "runs", RUNS)
        await submit(store, "lacks", LACKS)
        limit = sweeper(store)
        await limit.sweep()  # no worker: neither can run
        assert await stamp_keys(store) == await stamped(store) == {"runs", "lacks"}
        await a_worker_can_run_all_but_missing(store)
        async with monitored(server.port) as commands:
            await limit.sweep()
        assert await stamp_keys(store) == await stamped(store) == {"lacks"}
        runs = store.unrunnable_key("runs")
        assert run_together(commands, ("DEL", runs), ("SREM", store.stamped_key, "runs"))


async def test_a_stamp_that_expired_leaves_the_set_on_the_next_sweep(tmp_path: Path) -> None:
    async with shared_store(tmp_path) as (_server, store):
        for task_id, graph in (("taken", RUNS), ("runs", RUNS), ("lacks", LACKS)):
            await submit(store, task_id, graph)
        limit = sweeper(store)
        await limit.sweep()
        assert await stamped(store) == {"taken", "runs", "lacks"}
        # A worker took one and dropped it (its record had ended): it no longer waits.
        assert await store.take_waiting("taken")
        await a_worker_can_run_all_but_missing(store)
        for task_id in ("taken", "runs", "lacks"):
            await expire_stamp(store, task_id)
        before = await store.redis.time()
        await limit.sweep()
        # Gone, or runnable now: the id goes. Still unrunnable: a new stamp, listed.
        assert await stamped(store) == await stamp_keys(store) == {"lacks"}
        since = await store.redis.get(store.unrunnable_key("lacks"))
        assert since is not None
        assert float(since) >= before.timestamp()


async def test_a_stamp_of_a_task_out_of_the_waiting_set_for_a_moment_stays(
    tmp_path: Path,
) -> None:
    """A worker that cannot run the task takes it out of the waiting set and puts it
    back: a sweep meanwhile keeps its stamp (its wait goes on) and its id listed."""
    async with shared_store(tmp_path) as (_server, store):
        await submit(store, "bounced", LACKS)
        limit = sweeper(store)
        await limit.sweep()
        since = await store.redis.get(store.unrunnable_key("bounced"))
        assert since is not None
        taken = await store.redis.xreadgroup(GROUP, "w", {store.queue_key: ">"}, count=1)
        [[entry]] = (taken or {}).values()
        assert await store.take_waiting("bounced")  # the worker's take
        await limit.sweep()
        await store.requeue("w", text(entry.identifier), "bounced", NOW)  # ... and its put-back
        await limit.sweep()
        assert await store.redis.get(store.unrunnable_key("bounced")) == since
        assert await stamped(store) == {"bounced"}


async def test_an_adopted_or_given_back_or_ended_task_leaves_the_set_with_its_stamp(
    tmp_path: Path,
) -> None:
    async with shared_store(tmp_path) as (server, store):
        for task_id in ("adopted", "given-back", "ended"):
            await submit(store, task_id, RUNS)
        limit = sweeper(store, limit=0)  # no worker: each is due once stamped
        await limit.sweep()  # stamps; the next sweep would end all three
        assert await stamped(store) == {"adopted", "given-back", "ended"}
        taken = await store.redis.xreadgroup(GROUP, "w", {store.queue_key: ">"}, count=3)
        entries = {
            text(entry.field_values[b"task"]): text(entry.identifier)
            for stream in (taken or {}).values()
            for entry in stream
        }
        async with monitored(server.port) as commands:
            assert await store.take_waiting("adopted")
            await store.forget_wait("adopted")  # as a worker adopts a task
            assert await store.take_waiting("given-back")
            shared = await store.load("given-back")
            assert shared is not None
            assert await store.hand_back("w", entries["given-back"], SharedRecord(shared.record))
            # The given-back task waits anew, unstamped; the sweep ends only "ended".
            await limit.sweep()
        assert await stamped(store) == await stamp_keys(store) == {"given-back"}
        ended = await store.latest("ended")
        assert ended is not None
        assert ended.payload["status"] == "error"
        for task_id in ("adopted", "given-back", "ended"):
            stamp = store.unrunnable_key(task_id)
            assert run_together(commands, ("DEL", stamp), ("SREM", store.stamped_key, task_id))
