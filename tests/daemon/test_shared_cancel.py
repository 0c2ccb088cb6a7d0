"""A cancel through the shared store, against a real Redis."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import coredis
import pytest

from daemon.shared.service import SharedService
from protocol import task
from tests.daemon.harness import daemon_config
from tests.daemon.redis_server import redis_server

NOW = 1_795_632_898.0


async def test_a_cancel_after_the_stream_ended_says_it_ended_before_the_record_does(
    tmp_path: Path,
) -> None:
    """The holder appends a task's last message, then saves its finished record: a
    cancel in between must not answer "cancelling" for a task that has ended."""
    async with redis_server(tmp_path / "redis") as server:
        redis: coredis.Redis[bytes] = coredis.Redis.from_url(server.url)
        async with redis:
            await cancel_between_the_end_and_the_record(
                SharedService(daemon_config(tmp_path, redis_url=server.url), redis, "d1")
            )


async def cancel_between_the_end_and_the_record(service: SharedService) -> None:
    spec = task.TaskSpec(task_id="t", prompt_id="p", graph={})
    state = replace(task.new_task(spec, NOW), version=1)
    await service.store.submit(state, task.render(state, NOW))
    _, effects = task.apply(state, task.Failed("lost", "The prompt was lost"), NOW + 1)
    (end,) = [e.message for e in effects if isinstance(e, task.Publish)]
    await service.store.append("t", end)  # the record still says queued
    found = await service.cancel("t", NOW + 2)
    assert found is not None
    assert found.ended == "error"


async def test_a_cancel_reaches_a_holder_that_named_itself_while_it_was_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The front reads the record (no holder yet: a worker has just taken the task),
    and the worker names itself before the front sets the cancel key: the front
    reads the holder again and tells that worker."""
    async with redis_server(tmp_path / "redis") as server:
        redis: coredis.Redis[bytes] = coredis.Redis.from_url(server.url)
        async with redis:
            service = SharedService(daemon_config(tmp_path, redis_url=server.url), redis, "f1")
            store = service.store
            spec = task.TaskSpec(task_id="t", prompt_id="p", graph={})
            state = replace(task.new_task(spec, NOW), version=1)
            await store.submit(state, task.render(state, NOW))
            assert await store.take_waiting("t")  # a worker took it; the record names nobody
            request_cancel = store.request_cancel

            async def holder_named_meanwhile(task_id: str, holder: str | None, ttl: float) -> None:
                shared = await store.load(task_id)
                assert shared is not None
                assert shared.holder is None
                await store.save(replace(shared, holder="w1"))
                await request_cancel(task_id, holder, ttl)

            monkeypatch.setattr(store, "request_cancel", holder_named_meanwhile)
            found = await service.cancel("t", NOW + 1)
            assert found is not None
            assert found.ended is None
            inbox = await redis.xrange(store.inbox_key("w1"))
            assert [dict(entry.field_values) for entry in inbox] == [
                {b"kind": b"cancel", b"task": b"t"}
            ]
