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
from protocol.sse import SSEEncodingError

GRAPH = {
    "3": {"class_type": "KSampler", "inputs": {"steps": 5000}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
}


def submitted_actor(
    backend: ComfyBackend, tmp_path: Path, *, task_id: str = "t", prompt_id: str = "p"
) -> TaskActor:
    """A task submitted to `backend` before a restart: it re-attaches and takes frames."""
    spec = task.TaskSpec(task_id=task_id, prompt_id=prompt_id, graph=GRAPH)
    state = task.resumed_task(
        spec, phase=task.Phase.QUEUED, version=0, submitted=True, created_at=0.0
    )
    return TaskActor(
        state,
        dispatcher=Dispatcher(BackendPool([backend], classes=()), max_pending=2),
        backend_name=backend.name,
        images=ImageStore(tmp_path),
        settings=TaskSettings(),
        wall_clock=trio.current_time,
        resumed=True,
    )


async def test_a_burst_of_frames_is_a_handful_of_publishes(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    # Nothing listens on port 9: the actor's calls to ComfyUI fail and it waits;
    # how it takes frames is all this test is about.
    backend = ComfyBackend(BackendSettings(url="http://127.0.0.1:9"))
    actor = submitted_actor(backend, tmp_path)
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
        # All in one go, as the consumer does with frames read together: each is
        # applied as it comes (none waits in a buffer that could fill up).
        for value in range(1, frames + 1):
            backend.router.dispatch(comfy.Progress("p", "3", value, frames))
        await trio.sleep(1.0)  # the pacer's last wait
        nursery.cancel_scope.cancel()
    latest = actor.broadcaster.latest
    assert latest is not None
    assert json.loads(latest.sse.split(b"data: ")[1])["progress"]["currentValue"] == frames
    assert len(publishes) <= 10, f"{len(publishes)} publishes for {frames} frames"
    assert publishes == sorted(set(publishes))


async def test_a_frame_that_breaks_the_actor_ends_the_actor_not_the_consumer(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    # The consumer applies frames by calling the actor: what that raises must
    # come out of the actor's own run (the registry ends the task with
    # `internal`), never out of the call, which would close the WebSocket.
    backend = ComfyBackend(BackendSettings(url="http://127.0.0.1:9"))
    actor = submitted_actor(backend, tmp_path)
    unencodable = comfy.ExecutionError("p", "3", "KSampler", "caf\udcff", "OSError")
    failure: list[BaseException] = []

    async def run_actor() -> None:
        try:
            await actor.run()
        except Exception as exc:  # noqa: BLE001 - what the test looks at
            failure.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_actor)
        await trio.testing.wait_all_tasks_blocked()
        backend.router.dispatch(comfy.ExecutionStart("p"))
        backend.router.dispatch(unencodable)  # does not raise here
        backend.router.dispatch(comfy.Progress("p", "3", 1, 10))  # nor later ones
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert len(failure) == 1
    assert isinstance(failure[0], ExceptionGroup)
    assert failure[0].subgroup(SSEEncodingError) is not None
    assert not actor.is_done()  # the registry's fallback ends it (tests/daemon/test_faults.py)
