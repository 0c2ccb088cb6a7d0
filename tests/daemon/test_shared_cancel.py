"""A cancel through the shared store, against a real Redis."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import coredis

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
