"""How many prompts a queued task is told are ahead of it: the tasks ahead of it in
the daemon's queue plus the prompts already in the ComfyUI it will go to, so the
count only goes down on its way from our queue through ComfyUI's to running."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
import trio.testing

from daemon.http.client import http_request
from daemon.simulator import SimulatorConfig
from daemon.tasks.actor import TaskActor
from tests.daemon.harness import Pool, payloads, read_events, running_pool
from tests.daemon.test_pool import actor_of, wait_state, wait_until
from tests.simulator.test_workflows import txt2img

MANUAL = SimulatorConfig(step_time=0.01, manual_steps=True)
STEPS = 2  # sampler steps per prompt: granting them finishes exactly one prompt


def told_ahead(events: list[dict[str, Any]]) -> list[int]:
    """The `ahead` counts a stream showed, in order, with -1 for running (repeats merged)."""
    counts: list[int] = []
    for event in events:
        if event.get("phase") == "queued" and event.get("queue") is not None:
            count = event["queue"]["ahead"]
        elif event.get("phase") == "running":
            count = -1
        else:
            continue
        if not counts or counts[-1] != count:
            counts.append(count)
    return counts


def ahead_of(actor: TaskActor) -> int | None:
    """What the task shows as ahead of it now (None: no queue place, e.g. running)."""
    queue = actor.state.queue
    return None if queue is None else queue.ahead


async def finish_running_prompt(pool: Pool[Any], actor: TaskActor) -> None:
    pool.simulators[0].grant_steps(STEPS)
    await actor.finished.wait()


async def test_a_task_waiting_in_our_queue_counts_the_prompts_its_comfyui_holds(
    tmp_path: Path,
) -> None:
    # A parked prompt sends no frames: the silence probe must not replace the socket.
    async with running_pool(tmp_path, [MANUAL], comfy_silence_timeout=3600) as pool:
        await pool.all_read()
        first = actor_of(pool, await pool.generate(seed=1, steps=STEPS))
        second = actor_of(pool, await pool.generate(seed=2, steps=STEPS))
        await wait_state(second, lambda s: s.submitted)  # ComfyUI holds two (max_pending)
        third_id = await pool.generate(seed=3, steps=STEPS)
        fourth_id = await pool.generate(seed=4, steps=STEPS)
        third, fourth = actor_of(pool, third_id), actor_of(pool, fourth_id)
        streams: dict[str, list[dict[str, Any]]] = {}
        async with trio.open_nursery() as nursery:

            async def follow(task_id: str, live: trio.Event) -> None:
                streams[task_id] = payloads(await read_events(pool.url, task_id, first_event=live))

            for task_id in (third_id, fourth_id):
                live = trio.Event()
                nursery.start_soon(follow, task_id, live)
                await live.wait()
            # First in our queue, yet two prompts run or wait before it in its ComfyUI.
            assert (ahead_of(third), ahead_of(fourth)) == (2, 3)
            status = (await pool.request("GET", f"/tasks/{third_id}")).json()
            assert status["progress"]["currentStep"] == "Queued (2 ahead)"
            assert status["queue"] == {"position": 3, "ahead": 2}

            await finish_running_prompt(pool, first)
            # The third went into ComfyUI's queue behind the second: 1 ahead (GET /queue).
            await wait_state(third, lambda s: s.submitted and s.queue is not None)
            await wait_state(third, lambda s: s.queue is None or s.queue.ahead != 2)
            assert (ahead_of(third), ahead_of(fourth)) == (1, 2)

            await finish_running_prompt(pool, second)
            await wait_state(fourth, lambda s: s.submitted and s.queue is not None)
            await wait_state(fourth, lambda s: s.queue is None or s.queue.ahead != 2)
            assert ahead_of(fourth) == 1

            await finish_running_prompt(pool, third)
            await finish_running_prompt(pool, fourth)
        # What each stream showed only went down, to running.
        assert told_ahead(streams[third_id]) == [2, 1, -1]
        assert told_ahead(streams[fourth_id]) == [3, 2, 1, -1]


async def test_with_no_backend_connected_only_our_queue_counts(tmp_path: Path) -> None:
    async with running_pool(tmp_path, [MANUAL], comfy_silence_timeout=3600) as pool:
        await pool.all_read()
        await pool.generate(seed=1, steps=STEPS)
        second = actor_of(pool, await pool.generate(seed=2, steps=STEPS))
        await wait_state(second, lambda s: s.submitted)  # ComfyUI holds two (max_pending)
        waiting = [actor_of(pool, await pool.generate(seed=n, steps=STEPS)) for n in (3, 4)]
        assert [ahead_of(a) for a in waiting] == [2, 3]
        backend = pool.app.pool.backends[0]
        pool.simulators[0].reject_connections(3600)  # the backend goes away
        await wait_until(pool, lambda: not backend.is_connected())
        # Nothing is known to be ahead of them but our own queue.
        await wait_until(pool, lambda: ahead_of(waiting[0]) != 2)
        assert [ahead_of(a) for a in waiting] == [0, 1]


async def test_a_waiting_tasks_count_does_not_rise_with_a_load(tmp_path: Path) -> None:
    """A load read from `status` frames wobbles (frames race our POST replies), so a
    rise in it is not told, even when a later fall has counts worked out again. Here
    the rise is real, two prompts of another client: the count stays short of them
    until the task is in ComfyUI's queue (read from /queue), and never goes up."""
    async with running_pool(tmp_path, [MANUAL], comfy_silence_timeout=3600) as pool:
        await pool.all_read()
        first = actor_of(pool, await pool.generate(seed=1, steps=STEPS))
        second = actor_of(pool, await pool.generate(seed=2, steps=STEPS))
        await wait_state(second, lambda s: s.submitted)
        third_id = await pool.generate(seed=3, steps=STEPS)
        third = actor_of(pool, third_id)
        fourth = actor_of(pool, await pool.generate(seed=4, steps=STEPS))
        assert (ahead_of(third), ahead_of(fourth)) == (2, 3)
        streamed: list[dict[str, Any]] = []
        async with trio.open_nursery() as nursery:
            live = trio.Event()

            async def follow() -> None:
                streamed.extend(payloads(await read_events(pool.url, third_id, first_event=live)))

            nursery.start_soon(follow)
            await live.wait()
            simulator = pool.simulators[0]
            backend = pool.app.pool.backends[0]
            for seed in (5, 6):  # not the same graph twice: ComfyUI would run it from cache
                graph = txt2img(seed=seed, steps=STEPS, width=64, height=64)
                body = json.dumps({"prompt": graph})
                reply = await http_request("POST", f"{simulator.url}/prompt", body=body.encode())
                assert reply.status == 200, reply.body
            await wait_until(pool, lambda: backend.queue_remaining == 4)
            await finish_running_prompt(pool, first)  # the load falls from 4 to 3
            await wait_until(pool, lambda: backend.queue_remaining == 3)
            await trio.testing.wait_all_tasks_blocked()  # the dispatcher has looked
            assert (ahead_of(third), ahead_of(fourth)) == (2, 3)

            await finish_running_prompt(pool, second)  # the stranger's prompts run
            simulator.grant_steps(STEPS)  # the first of them ends: room for the third
            await wait_state(third, lambda s: s.submitted and s.queue is not None)
            await wait_state(third, lambda s: s.queue is None or s.queue.ahead != 2)
            assert (ahead_of(third), ahead_of(fourth)) == (1, 2)
            simulator.grant_steps(STEPS)  # the second of them ends
            await finish_running_prompt(pool, third)
            await finish_running_prompt(pool, fourth)
        assert told_ahead(streamed) == [2, 1, -1]
