"""A burst of ComfyUI frames becomes a few publishes, and the newest state wins."""

from __future__ import annotations

import json
from pathlib import Path

import trio
import trio.testing

from daemon.comfy.backend import BackendSettings, ComfyBackend
from daemon.comfy.dispatch import Dispatcher
from daemon.comfy.pool import BackendPool
from daemon.images.store import ImageStore
from daemon.tasks.actor import TaskActor, TaskSettings
from daemon.tasks.broadcast import Broadcaster
from protocol import comfy, task

GRAPH = {
    "3": {"class_type": "KSampler", "inputs": {"steps": 5000}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
}


async def test_a_burst_of_frames_is_a_handful_of_publishes(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    # Nothing listens on port 9: the actor's calls to ComfyUI fail and it waits;
    # its frame pump is all this test is about.
    backend = ComfyBackend(BackendSettings(url="http://127.0.0.1:9"))
    spec = task.TaskSpec(task_id="t", prompt_id="p", graph=GRAPH)
    state = task.resumed_task(
        spec, phase=task.Phase.QUEUED, version=0, submitted=True, created_at=0.0
    )
    actor = TaskActor(
        state,
        dispatcher=Dispatcher(BackendPool([backend], classes=()), max_pending=2),
        backend_name=backend.name,
        images=ImageStore(tmp_path),
        settings=TaskSettings(),
        wall_clock=trio.current_time,
        resumed=True,
    )
    publishes: list[int] = []

    def count(broadcaster: Broadcaster) -> None:
        assert broadcaster.latest is not None
        publishes.append(broadcaster.latest.version)

    actor.broadcaster.watchers.append(count)
    frames = 5000
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run)
        await trio.testing.wait_all_tasks_blocked()
        backend.router.dispatch(comfy.ExecutionStart("p"))
        backend.router.dispatch(comfy.Executing("3", "p"))
        for value in range(1, frames + 1):
            backend.router.dispatch(comfy.Progress("p", "3", value, frames))
            if value % 100 == 0:  # the route's buffer is bounded; let the pump drain
                await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(1.0)  # the pacer's last wait
        nursery.cancel_scope.cancel()
    latest = actor.broadcaster.latest
    assert latest is not None
    assert json.loads(latest.sse.split(b"data: ")[1])["progress"]["currentValue"] == frames
    assert len(publishes) <= 10, f"{len(publishes)} publishes for {frames} frames"
    assert publishes == sorted(set(publishes))
