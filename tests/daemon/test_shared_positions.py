"""Queue positions that fronts append for tasks no worker holds (real redis-server)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import coredis

from daemon.shared.positions import QueuePositions
from daemon.shared.store import SharedStore
from daemon.shared.watch import StreamWatcher
from daemon.tasks.broadcast import encode_snapshot
from protocol import progress as pg
from protocol import task
from tests.daemon.redis_server import redis_server

NOW = 1_795_632_898.0


async def test_a_task_given_back_shows_its_place_in_the_shared_queue(tmp_path: Path) -> None:
    """A task a worker gave back (its ComfyUI went away) waits in the shared queue
    with no actor anywhere: the front streaming it appends its place in line and
    the step that says so, as for a task never taken."""
    async with redis_server(tmp_path / "redis") as server:
        redis: coredis.Redis[bytes] = coredis.Redis.from_url(server.url)
        async with redis:
            store = SharedStore(redis, "test", retention=60)
            watcher = StreamWatcher(store, daemon_id="f1", on_message=lambda fields: None)
            positions = QueuePositions(store, watcher, interval=1.0)
            first: dict[str, task.TaskMessage] = {}
            for n, task_id in enumerate(["older", "fresh", "given-back"]):
                spec = task.TaskSpec(task_id=task_id, prompt_id=f"p{n}", graph={})
                state = replace(task.new_task(spec, NOW + n), version=1)
                first[task_id] = task.render(state, NOW)
                await store.submit(state, first[task_id])
            # What the worker published as it gave the task back: requeued, no place.
            spec = task.TaskSpec(task_id="given-back", prompt_id="p2", graph={})
            state = replace(task.new_task(spec, NOW + 2), version=1)
            state, effects = task.apply(state, task.Requeued("p3", "ComfyUI went away"), NOW)
            (message,) = [e.message for e in effects if isinstance(e, task.Publish)]
            assert message.payload["phase"] == "requeued"
            assert message.payload["queue"] is None
            await store.append("given-back", message)
            async with (
                watcher.watching("fresh", encode_snapshot(first["fresh"])),
                watcher.watching("given-back", encode_snapshot(message)),
            ):
                await positions.update()
            latest = await store.latest("given-back")
            assert latest is not None
            assert latest.version == message.version + 1
            assert latest.payload["phase"] == "requeued"
            assert latest.payload["queue"] == {"position": 3, "ahead": 2}
            assert latest.payload["progress"]["currentStep"] == pg.requeued_step(2)
            fresh = await store.latest("fresh")
            assert fresh is not None
            assert fresh.payload["queue"] == {"position": 2, "ahead": 1}
            assert fresh.payload["progress"]["currentStep"] == pg.queued_step(1)


async def test_a_waiting_task_redis_forgot_ends_lost_as_old_as_the_task(tmp_path: Path) -> None:
    """The front that writes the `lost` end tells its metrics, with the task's creation
    time (its score in the waiting set, read while it waited): the record is gone."""
    async with redis_server(tmp_path / "redis") as server:
        redis: coredis.Redis[bytes] = coredis.Redis.from_url(server.url)
        async with redis:
            store = SharedStore(redis, "test", retention=60)
            watcher = StreamWatcher(store, daemon_id="f1", on_message=lambda fields: None)
            ended: list[task.TaskState] = []
            positions = QueuePositions(store, watcher, interval=1.0, on_task_end=ended.append)
            spec = task.TaskSpec(task_id="forgotten", prompt_id="p0", graph={})
            state = replace(task.new_task(spec, NOW), version=1)
            first = task.render(state, NOW)
            await store.submit(state, first)
            async with watcher.watching("forgotten", encode_snapshot(first)):
                await positions.update()  # seen waiting: its place appended
                placed = await store.latest("forgotten")
                assert placed is not None
                assert placed.payload["queue"] == {"position": 1, "ahead": 0}
                await redis.flushall()
                # What the front's reader would pass on (none runs here): the place.
                async with watcher.watching("forgotten", placed):
                    await positions.update()
            [lost] = ended
            assert lost.error is not None
            assert lost.error.code == "lost"
            assert lost.created_at == NOW
            end = await store.latest("forgotten")
            assert end is not None
            assert end.terminal
            assert end.payload["error"]["code"] == "lost"
