"""Several backends: dispatch, capability routing and failover, with real simulators.

Simulators run in manual-step mode where a test needs a task parked at a known
point; tests wait for states (signals, events), never for time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from daemon.http.client import http_request
from daemon.ops.systemd import status_line
from daemon.signals import Signal
from daemon.simulator import SimulatorConfig
from daemon.simulator.png import encode_png
from daemon.tasks.actor import TaskActor
from daemon.tasks.broadcast import Broadcaster
from protocol import task
from tests.daemon.harness import FAST, Pool, payloads, read_events, running_process_pool

SAMPLER = "3"  # the KSampler node of the built-in txt2img graph
MANUAL = SimulatorConfig(step_time=0.01, manual_steps=True)
NO_INPAINT = SimulatorConfig(step_time=0.01, hidden_nodes=("VAEEncodeForInpaint",))


async def wait_until(pool: Pool[Any], condition: Callable[[], bool]) -> None:
    """Until `condition()` holds; re-checked on every task or backend change."""
    signals = (pool.app.registry.changed, pool.app.pool.changed)
    while not condition():
        # The counts as the condition was checked: a waiter starts a scheduler
        # round later, and a change fired meanwhile must not be missed.
        seen = [signal.count for signal in signals]
        async with trio.open_nursery() as nursery:

            async def wake(signal: Signal, count: int) -> None:
                if signal.count == count:
                    await signal.wait()
                nursery.cancel_scope.cancel()

            for signal, count in zip(signals, seen, strict=True):
                nursery.start_soon(wake, signal, count)


async def wait_state(actor: TaskActor, predicate: Callable[[task.TaskState], bool]) -> None:
    while not predicate(actor.state):
        latest = actor.broadcaster.latest
        await actor.broadcaster.wait_newer(latest.version if latest else None)


def actor_of(pool: Pool[Any], task_id: str) -> TaskActor:
    actor = pool.app.registry.get(task_id)
    assert actor is not None
    return actor


async def queue_of(url: str) -> tuple[int, int]:
    """(running, pending) in that ComfyUI's queue."""
    reply = (await http_request("GET", f"{url}/queue", timeout=10)).json()
    return len(reply["queue_running"]), len(reply["queue_pending"])


async def test_dispatch_spreads_work_and_respects_max_pending(tmp_path: Path) -> None:
    async with running_process_pool(
        tmp_path, [MANUAL, MANUAL, MANUAL], backend_max_pending=2
    ) as pool:
        await pool.all_read()
        task_ids = [await pool.generate(seed=n) for n in range(7)]
        actors = [actor_of(pool, t) for t in task_ids]
        await wait_until(pool, lambda: sum(a.state.submitted for a in actors) == 6)
        # Two per ComfyUI (one running, one next); the seventh waits in our queue.
        for sim in pool.simulators:
            assert await queue_of(sim.url) == (1, 1)
        waiting = [a for a in actors if not a.state.submitted]
        assert len(waiting) == 1
        latest = waiting[0].broadcaster.latest
        assert latest is not None
        # First in our queue, behind the two prompts in the ComfyUI it will go to.
        assert latest.payload["queue"] == {"position": 3, "ahead": 2}
        assert latest.payload["phase"] == "queued"
        backends = (await pool.request("GET", "/backends")).json()
        assert [b["tasks"] for b in backends["backends"]] == [2, 2, 2]
        assert backends["waiting"] == 1
        for sim in pool.simulators:
            await sim.set_manual_steps(False)
        for actor in actors:
            await actor.finished.wait()
        assert all(a.state.phase is task.Phase.COMPLETED for a in actors)
        used = {a.backend_name for a in actors}
        assert used == {sim.url for sim in pool.simulators}


async def upload_source(pool: Pool[Any]) -> str:
    picture = encode_png(16, 16, [bytes((10, 200, 30)) * 16] * 16)
    response = await http_request(
        "POST",
        f"{pool.url}/upload",
        headers=(("Content-Type", "image/png"),),
        body=picture,
        timeout=10,
    )
    assert response.status == 201, response.body
    url: str = response.json()["imageUrl"]
    return url


INPAINT_AREA = {"x": 0, "y": 0, "width": 8, "height": 8}


async def test_a_node_class_on_one_backend_only_always_goes_there(tmp_path: Path) -> None:
    async with running_process_pool(tmp_path, [NO_INPAINT, NO_INPAINT, FAST]) as pool:
        await pool.all_read()
        image = await upload_source(pool)
        inpaints = [
            await pool.generate(workflow="inpaint", image=image, inpaintArea=INPAINT_AREA, seed=n)
            for n in range(3)
        ]
        plain = [await pool.generate(seed=n) for n in range(3)]
        for task_id in inpaints + plain:
            assert payloads(await read_events(pool.url, task_id))[-1]["status"] == "completed"
        assert {actor_of(pool, t).backend_name for t in inpaints} == {pool.simulators[2].url}
        backends = (await pool.request("GET", "/backends")).json()["backends"]
        assert backends[0]["capabilities"]["missingNodeClasses"] == ["VAEEncodeForInpaint"]
        assert backends[2]["capabilities"]["missingNodeClasses"] == []


async def test_a_node_class_no_backend_has_is_a_422(tmp_path: Path) -> None:
    async with running_process_pool(tmp_path, [NO_INPAINT, NO_INPAINT, NO_INPAINT]) as pool:
        await pool.all_read()
        image = await upload_source(pool)
        response = await pool.request(
            "POST",
            "/generate",
            {"prompt": "a hat", "workflow": "inpaint", "image": image, "inpaintArea": INPAINT_AREA},
        )
        assert response.status == 422, response.body
        error = response.json()["error"]
        assert "node class VAEEncodeForInpaint" in error["message"]
        assert set(error["details"]["backends"]) == {s.url for s in pool.simulators}
        for sim in pool.simulators:
            assert await queue_of(sim.url) == (0, 0)


async def test_a_restarted_backend_s_task_is_resubmitted_and_completes(tmp_path: Path) -> None:
    async with running_process_pool(tmp_path, [MANUAL, MANUAL, MANUAL]) as pool:
        await pool.all_read()
        task_id = await pool.generate()
        actor = actor_of(pool, task_id)
        await wait_state(actor, lambda s: s.current_node == SAMPLER)
        first_prompt, seed = actor.prompt_id, actor.state.spec.seed
        sim = next(s for s in pool.simulators if s.url == actor.backend_name)
        # Every snapshot as it is published: the requeued one may be replaced (by
        # the next submission) before this task gets to look at the latest.
        published: list[Any] = []

        def keep(broadcaster: Broadcaster) -> None:
            assert broadcaster.latest is not None
            published.append(broadcaster.latest.payload)

        actor.broadcaster.watchers.append(keep)
        await sim.restart()  # forgets its queue, as ComfyUI does
        await wait_state(actor, lambda s: s.prompt_id != first_prompt)
        while not any(p.get("phase") == "requeued" for p in published):
            latest = actor.broadcaster.latest
            await actor.broadcaster.wait_newer(latest.version if latest else None)
        requeued = next(p for p in published if p.get("phase") == "requeued")
        assert requeued["progress"]["currentStep"].startswith("Requeued")
        assert requeued["progress"]["overall"]["nodesDone"] == 0  # from the start again
        for each in pool.simulators:
            await each.set_manual_steps(False)
        data = payloads(await read_events(pool.url, task_id))
        assert data[-1]["status"] == "completed"
        assert data[-1]["result"]["seed"] == seed  # the same seed, under a new prompt_id
        assert actor.attempts == 2
        # One image per task: the old prompt is nowhere, the new one ran once.
        histories = [
            (await http_request("GET", f"{s.url}/history", timeout=10)).json()
            for s in pool.simulators
        ]
        prompts = [p for history in histories for p in history]
        assert prompts == [actor.prompt_id]


async def test_a_websocket_cut_shorter_than_lost_after_reconciles_there(tmp_path: Path) -> None:
    async with running_process_pool(tmp_path, [MANUAL, MANUAL, MANUAL]) as pool:
        await pool.all_read()
        task_id = await pool.generate()
        actor = actor_of(pool, task_id)
        await wait_state(actor, lambda s: s.current_node == SAMPLER)
        prompt_id, backend_name = actor.prompt_id, actor.backend_name
        sim = next(s for s in pool.simulators if s.url == backend_name)
        await sim.reject_connections(3600)  # socket cut, reconnects refused
        await wait_state(actor, lambda s: s.phase is task.Phase.WAITING)
        latest = actor.broadcaster.latest
        assert latest is not None
        assert latest.payload["progress"]["currentStep"] == "Waiting for ComfyUI to come back..."
        assert latest.payload["progress"]["etaSeconds"] is None
        await sim.grant_steps(1000)
        await sim.wait_for_history(prompt_id)  # it finished while we were away
        await sim.reject_connections(0)
        data = payloads(await read_events(pool.url, task_id))
        assert data[-1]["status"] == "completed"
        assert (actor.prompt_id, actor.backend_name, actor.attempts) == (
            prompt_id,
            backend_name,
            1,
        )


async def test_kill_9_of_a_backend_mid_task_resubmits_to_another(tmp_path: Path) -> None:
    async with running_process_pool(tmp_path, [MANUAL, FAST, FAST], backend_lost_after=0.5) as pool:
        doomed, survivors = pool.simulators[0], pool.simulators[1:]
        await pool.all_read()
        task_id = await pool.generate()  # ties go to the first backend
        actor = actor_of(pool, task_id)
        await wait_state(actor, lambda s: s.current_node == SAMPLER)
        assert actor.backend_name == doomed.url
        seen: list[dict[str, Any]] = []
        following = trio.Event()
        async with trio.open_nursery() as nursery:

            async def follow() -> None:
                events = await read_events(pool.url, task_id, first_event=following)
                seen.extend(payloads(events))

            nursery.start_soon(follow)
            await following.wait()
            doomed.kill()
        phases = [d.get("phase") for d in seen]
        assert "waiting" in phases  # at once, not a frozen last step
        assert "requeued" in phases
        assert phases.index("waiting") < phases.index("requeued")
        assert seen[-1]["status"] == "completed"
        assert actor.backend_name in {sim.url for sim in survivors}
        assert actor.attempts == 2


async def test_a_backend_back_with_the_abandoned_attempt_has_it_interrupted(
    tmp_path: Path,
) -> None:
    async with running_process_pool(
        tmp_path, [MANUAL, FAST], backend_lost_after=0.3, comfy_connect_timeout=1
    ) as pool:
        await pool.all_read()
        task_id = await pool.generate()
        actor = actor_of(pool, task_id)
        await wait_state(actor, lambda s: s.current_node == SAMPLER)
        away, old_prompt = pool.simulators[0], actor.prompt_id
        assert actor.backend_name == away.url
        await away.reject_connections(3600)  # gone, but still running the prompt
        data = payloads(await read_events(pool.url, task_id))
        assert data[-1]["status"] == "completed"
        assert actor.backend_name == pool.simulators[1].url
        assert pool.app.pool.abandoned(pool.app.pool.backends[0]) == {old_prompt}
        await away.reject_connections(0)
        await wait_until(pool, lambda: not pool.app.pool.abandoned(pool.app.pool.backends[0]))
        await away.grant_steps(1000)  # the parked step moves on, and sees the interrupt
        await away.wait_for_history(old_prompt)
        history = await http_request("GET", f"{away.url}/history/{old_prompt}", timeout=10)
        status = history.json()[old_prompt]["status"]
        assert status["completed"] is False
        assert any(m[0] == "execution_interrupted" for m in status["messages"])
        assert await queue_of(away.url) == (0, 0)
        assert len(data[-1]["result"]["imageUrls"]) == 1


async def test_cancel_while_the_backend_is_away_ends_the_task_at_once(tmp_path: Path) -> None:
    async with running_process_pool(tmp_path, [MANUAL]) as pool:
        await pool.all_read()
        task_id = await pool.generate()
        actor = actor_of(pool, task_id)
        await wait_state(actor, lambda s: s.current_node == SAMPLER)
        sim, prompt_id = pool.simulators[0], actor.prompt_id
        await sim.reject_connections(3600)
        await wait_state(actor, lambda s: s.phase is task.Phase.WAITING)
        response = await pool.request("DELETE", f"/tasks/{task_id}")
        assert response.status == 202
        data = payloads(await read_events(pool.url, task_id))
        assert data[-1]["error"]["code"] == "cancelled"
        await sim.reject_connections(0)
        await wait_until(pool, lambda: not pool.app.pool.abandoned(pool.app.pool.backends[0]))
        await sim.grant_steps(1000)
        await sim.wait_for_history(prompt_id)  # interrupted once the backend was back
        assert await queue_of(sim.url) == (0, 0)


async def test_a_workflow_class_no_backend_has_is_logged_at_first_contact(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_process_pool(tmp_path, [NO_INPAINT, NO_INPAINT]) as pool:
        await pool.app.workflows_checked.wait()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "workflow 'inpaint'" in w and "uses class VAEEncodeForInpaint" in w for w in warnings
    ), warnings


async def test_readiness_metrics_and_status_with_one_backend_down(tmp_path: Path) -> None:
    probe = trio.socket.socket()
    await probe.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    probe.close()  # nothing listens there
    async with running_process_pool(tmp_path, [FAST], first_urls=(dead,)) as pool:
        live = pool.app.pool.backends[1]
        while not pool.app.pool.takes_work(live):
            await pool.app.pool.changed.wait()
        ready = await pool.request("GET", "/readyz")
        assert ready.status == 200
        assert (ready.json()["backendsUp"], ready.json()["backends"]) == (1, 2)
        metrics = (await pool.request("GET", "/metrics")).body.decode()
        assert f'comfy_progress_backend_up{{backend="{dead}"}} 0' in metrics
        assert f'comfy_progress_backend_up{{backend="{live.name}"}} 1' in metrics
        assert f'comfy_progress_backend_load{{backend="{live.name}"}} 0' in metrics
        assert "1 of 2 backends up" in status_line(pool.app.service_status(), pool.url)
        backends = (await pool.request("GET", "/backends")).json()["backends"]
        assert backends[0]["connected"] is False
        assert "refused" in backends[0]["lastError"].lower()
        assert backends[0]["capabilities"] is None
        # Work goes to the backend that is up.
        task_id = await pool.generate()
        assert payloads(await read_events(pool.url, task_id))[-1]["status"] == "completed"
        assert actor_of(pool, task_id).backend_name == live.name


async def test_without_resubmit_a_backend_away_past_lost_after_ends_the_task_lost(
    tmp_path: Path,
) -> None:
    async with running_process_pool(
        tmp_path, [MANUAL, FAST], backend_lost_after=0.3, resubmit_lost=False
    ) as pool:
        await pool.all_read()
        task_id = await pool.generate()
        actor = actor_of(pool, task_id)
        await wait_state(actor, lambda s: s.current_node == SAMPLER)
        away, prompt_id = pool.simulators[0], actor.prompt_id
        await away.reject_connections(3600)  # gone, but still running the prompt
        data = payloads(await read_events(pool.url, task_id))
        assert data[-1]["error"]["code"] == "lost"
        assert "was away for 0.3 s" in data[-1]["error"]["details"]
        assert actor.attempts == 1
        # Nobody waits for that prompt any more: once its ComfyUI is back, it goes.
        assert pool.app.pool.abandoned(pool.app.pool.backends[0]) == {prompt_id}
        await away.reject_connections(0)
        await wait_until(pool, lambda: not pool.app.pool.abandoned(pool.app.pool.backends[0]))
        await away.grant_steps(1000)  # the parked step moves on, and sees the interrupt
        await away.wait_for_history(prompt_id)
        history = await http_request("GET", f"{away.url}/history/{prompt_id}", timeout=10)
        assert history.json()[prompt_id]["status"]["completed"] is False
        assert await queue_of(away.url) == (0, 0)
