"""Shared mode: a write Redis applied whose answer was lost, sent again (real redis-server).

coredis sends a command again over a new connection when the old one is lost
before its answer. The snapshot's stream entry has an explicit id (its version):
sent again it was refused as "equal or smaller", which the worker took for
another daemon writing past it, stopping its copy of a task that was its own."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import coredis
import pytest

from daemon.shared.store import SharedRecord, SharedStore, StaleWrite, text
from daemon.tasks.restore import record_of
from protocol import task
from tests.daemon.redis_server import redis_server

NOW = 1_795_632_898.0
NOT_PENDING = "0-1"  # a lease pending for nobody: written to, as after Redis lost it


def snapshot(version: int, step: str) -> tuple[task.TaskState, task.TaskMessage]:
    spec = task.TaskSpec(task_id="t", prompt_id="p", graph={})
    state = replace(task.new_task(spec, NOW), version=version, step=step)
    return state, task.render(state, NOW)


async def entries(redis: coredis.Redis[bytes]) -> list[str]:
    return [text(e.identifier) for e in await redis.xrange("test:events:t")]


async def test_a_snapshot_written_again_is_not_taken_for_another_daemon_s(
    tmp_path: Path,
) -> None:
    async with redis_server(tmp_path / "redis") as server:
        redis: coredis.Redis[bytes] = coredis.Redis.from_url(server.url)
        async with redis:
            store = SharedStore(redis, "test", retention=60)
            await store.ensure_queue()
            state, first = snapshot(1, "Queued")
            await store.submit(state, first)

            state, second = snapshot(2, "Sampling")
            await store.append("t", second)
            await store.append("t", second)  # the same entry again: done, not stale
            assert await entries(redis) == ["1-0", "2-0"]

            state, third = snapshot(3, "Decoding")
            record = SharedRecord(record_of(state, None), holder="w1")
            for _ in range(2):
                written = await store.write_held("w1", NOT_PENDING, record, third)
                assert written.written
            assert await entries(redis) == ["1-0", "2-0", "3-0"]

            # Another snapshot at a version already there is still another daemon's.
            _, other = snapshot(3, "Saving image...")
            with pytest.raises(StaleWrite):
                await store.write_held("w1", NOT_PENDING, record, other)
            with pytest.raises(StaleWrite):
                await store.append("t", other)
            _, older = snapshot(2, "Sampling")
            with pytest.raises(StaleWrite):
                await store.append("t", replace(older, payload={**older.payload, "x": 1}))
            assert await entries(redis) == ["1-0", "2-0", "3-0"]
