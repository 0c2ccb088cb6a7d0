"""A task waiting in the daemon's queue: no helper task of its own, and the
backend_wait_timeout rules (give up, come back in time, nobody can ever run it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
import trio.testing

from daemon.comfy.backend import BackendSettings, ComfyBackend
from daemon.comfy.capabilities import Capabilities
from daemon.comfy.dispatch import Dispatcher
from daemon.comfy.pool import BackendPool
from daemon.images.store import ImageStore
from daemon.simulator import SimulatorConfig
from daemon.tasks.actor import TaskActor, TaskSettings
from protocol import task
from protocol.progress import STEP_WAITING_FOR_BACKEND
from tests.daemon.harness import (
    FAST,
    payloads,
    read_events,
    running_pool,
    running_process_pool,
)
from tests.daemon.test_pool import actor_of, wait_state, wait_until

GRAPH = {
    "3": {"class_type": "KSampler", "inputs": {"steps": 5}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
}
MANUAL = SimulatorConfig(step_time=0.01, manual_steps=True)


def actor_tasks() -> dict[str, trio.lowlevel.Task]:
    """Every running actor's own Trio task, by task id."""
    found: dict[str, trio.lowlevel.Task] = {}
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        current = pending.pop()
        assert current is not None
        frame = getattr(current.coro, "cr_frame", None)
        actor = frame.f_locals.get("actor") if frame is not None else None
        if current.coro.__qualname__ == "TaskRegistry._run_actor" and actor is not None:
            found[actor.task_id] = current
        pending.extend(
            child for nursery in current.child_nurseries for child in nursery.child_tasks
        )
    return found


async def test_a_task_waiting_in_the_daemon_queue_runs_no_helper_task(tmp_path: Path) -> None:
    async with running_pool(tmp_path, [MANUAL], backend_max_pending=1) as pool:
        await pool.all_read()
        running = actor_of(pool, await pool.generate(seed=0))
        await wait_state(running, lambda s: s.submitted)
        queued = [actor_of(pool, await pool.generate(seed=n)) for n in range(1, 4)]
        await wait_until(pool, lambda: len(pool.app.dispatcher) == 3)
        await trio.testing.wait_all_tasks_blocked()
        tasks = actor_tasks()
        for actor in queued:
            assert actor.state.phase is task.Phase.QUEUED
            # The actor's own task waits for its turn itself: no nursery, no helpers.
            assert tasks[actor.task_id].child_nurseries == []
            # Nor has it made what an attempt needs (thousands may wait at once).
            assert actor._preview_throttle is None
            assert actor._lost is None
            assert actor._reconcile_requested is None
        assert tasks[running.task_id].child_nurseries != []  # the followed prompt has helpers


def attempt_tasks(actor: TaskActor) -> set[str]:
    """What the actor's current attempt runs beside it, by coroutine name."""
    assert actor._nursery is not None
    return {child.coro.__qualname__ for child in actor._nursery.child_tasks}


async def test_a_prompt_queued_in_comfyui_starts_its_on_demand_tasks_only_when_needed(
    tmp_path: Path,
) -> None:
    # Thousands of prompts may wait in ComfyUI's queue: while nothing happens to
    # one, its attempt runs only what watches the backend; the backend's one
    # reader tells it its place.
    async with running_pool(tmp_path, [MANUAL], backend_max_pending=5) as pool:
        await pool.all_read()
        await pool.generate(seed=0)  # runs (a step at a time, when told): the head
        queued = actor_of(pool, await pool.generate(seed=1))
        await wait_state(queued, lambda s: s.submitted)
        await trio.testing.wait_all_tasks_blocked()
        watchers = {"TaskActor._watch_backend"}
        assert attempt_tasks(queued) == watchers
        # Asked to reconcile, it starts the reconciler, once, and keeps it.
        queued.request_reconcile()
        queued.request_reconcile()
        await trio.testing.wait_all_tasks_blocked()
        assert attempt_tasks(queued) == watchers | {"TaskActor._reconcile_loop"}
        assert queued.state.phase is task.Phase.QUEUED  # the reconcile found it queued


def unread_backend_actor(tmp_path: Path, **settings: Any) -> tuple[TaskActor, BackendPool]:
    """A new task whose only backend never connects (nothing listens on port 9)."""
    backend = ComfyBackend(BackendSettings(url="http://127.0.0.1:9"))
    pool = BackendPool([backend], classes=("KSampler", "SaveImage"))
    spec = task.TaskSpec(task_id="t", prompt_id="p", graph=GRAPH)
    actor = TaskActor(
        task.new_task(spec, 0.0),
        dispatcher=Dispatcher(pool, max_pending=2),
        images=ImageStore(tmp_path),
        settings=TaskSettings(**settings),
        wall_clock=trio.current_time,
    )
    return actor, pool


async def test_without_a_backend_the_task_waits_then_fails_after_the_timeout(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    actor, _ = unread_backend_actor(tmp_path, backend_wait_timeout=30.0)
    started = trio.current_time()
    await actor.run()
    assert actor.state.error is not None
    assert actor.state.error.code == "backend_unavailable"
    assert trio.current_time() - started == 30.0


async def test_when_every_backend_lacks_a_node_the_queued_task_ends_rejected(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    actor, pool = unread_backend_actor(tmp_path, backend_wait_timeout=30.0)
    # A reading taken after the task was accepted: this ComfyUI has no KSampler.
    pool.capabilities[pool.backends[0].name] = Capabilities(
        present=frozenset({"SaveImage"}), absent=frozenset({"KSampler"}), checkpoints=None
    )
    started = trio.current_time()
    await actor.run()
    assert actor.state.error is not None
    assert actor.state.error.code == "rejected"
    assert "node class KSampler" in actor.state.error.details
    assert trio.current_time() == started  # at once, not after the timeout


async def test_a_backend_back_within_the_timeout_runs_the_waiting_task(tmp_path: Path) -> None:
    async with running_process_pool(tmp_path, [FAST], backend_wait_timeout=60.0) as pool:
        await pool.all_read()
        backend = pool.app.pool.backends[0]
        await pool.simulators[0].reject_connections(3600)
        await wait_until(pool, lambda: not backend.is_connected())
        task_id = await pool.generate()
        actor = actor_of(pool, task_id)
        await wait_state(actor, lambda s: s.step == STEP_WAITING_FOR_BACKEND)
        await pool.simulators[0].reject_connections(0)
        data = payloads(await read_events(pool.url, task_id))
        assert data[-1]["status"] == "completed"
        assert actor.attempts == 1
