"""Shared mode: which prompts the tasks in Redis still follow (real redis-server).

A restarted worker reads every record (SharedStore.task_records) and keeps the
prompts its journal says it gave up on that one of them still follows
(restore.still_followed), before it removes any from their ComfyUI
(daemon/app.py, _restore_shared_abandoned)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import coredis

from daemon.shared.store import SharedRecord, SharedStore, glob_escaped
from daemon.tasks.restore import record_of, still_followed
from protocol import task
from tests.daemon.redis_server import redis_server

NOW = 1_795_632_898.0
GPU1 = "http://gpu1:8188"
GPU2 = "http://gpu2:8188"
PREFIX = "cp[1]"  # glob characters: its keys must not be read as a pattern


def record(task_id: str, prompt_id: str, backend: str, phase: task.Phase) -> SharedRecord:
    spec = task.TaskSpec(task_id=task_id, prompt_id=prompt_id, graph={})
    kept = replace(record_of(task.new_task(spec, NOW), backend), phase=phase.value, submitted=True)
    return SharedRecord(kept, holder="w1", backend_url=backend)


async def test_only_an_unfinished_task_s_current_prompt_there_counts(tmp_path: Path) -> None:
    async with redis_server(tmp_path / "redis") as server:
        redis: coredis.Redis[bytes] = coredis.Redis.from_url(server.url)
        async with redis:
            store = SharedStore(redis, PREFIX, retention=60)
            await store.save(record("a", "p-running", GPU1, task.Phase.RUNNING))
            await store.save(record("b", "p-finished", GPU1, task.Phase.COMPLETED))
            await store.save(record("c", "p-elsewhere", GPU2, task.Phase.WAITING))
            # Another service on the same Redis (a prefix the pattern [1] would match).
            other = SharedStore(redis, "cp1", retention=60)
            await other.save(record("d", "p-other-service", GPU1, task.Phase.RUNNING))
            await redis.set(store.task_key("e"), b"not a record")  # skipped, not fatal
            asked = {
                (GPU1, "p-running"),
                (GPU1, "p-finished"),
                (GPU1, "p-elsewhere"),
                (GPU1, "p-other-service"),
                (GPU1, "p-unknown"),
            }
            followed = still_followed(await store.task_records())
            assert followed & asked == {(GPU1, "p-running")}


def test_a_glob_pattern_of_a_literal_matches_only_it() -> None:
    assert glob_escaped("cp[1]:task:") == "cp\\[1\\]:task:"
    assert glob_escaped("a*b?c\\d") == "a\\*b\\?c\\\\d"
    assert glob_escaped("comfy-progress:task:") == "comfy-progress:task:"
