"""Network faults between the daemon and a ComfyUI that keeps working.

A relay between the daemon and a real simulator breaks the connection in ways
the simulator cannot: the network down while ComfyUI keeps its state, one kind
of request failing while the WebSocket is up, a request that arrives but whose
answer never comes back.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path

import pytest
import trio
import trio.testing

from daemon.http.client import http_request
from daemon.simulator import ComfySimulator, SimulatorConfig
from daemon.tasks.actor import TaskActor
from protocol import task
from tests.daemon.comfy_relay import ComfyRelay, comfy_relay
from tests.daemon.harness import (
    FAST,
    Daemon,
    payloads,
    read_events,
    running_daemon,
    running_pool,
)
from tests.daemon.test_pool import wait_state
from tests.protocol.workflow_samples import txt2img_definition
from tests.simulator.test_workflows import txt2img

MANUAL = SimulatorConfig(step_time=0.01, manual_steps=True)


@asynccontextmanager
async def relayed_simulator(
    config: SimulatorConfig,
) -> AsyncIterator[tuple[ComfySimulator, ComfyRelay]]:
    """A simulator, and the relay in front of it (`relay.url` is the daemon's ComfyUI)."""
    async with trio.open_nursery() as nursery:
        sim = ComfySimulator(config)
        port = await nursery.start(sim.run, ("127.0.0.1", 0))
        async with comfy_relay(port) as relay:
            yield sim, relay
        nursery.cancel_scope.cancel()


async def post_foreign_prompt(sim: ComfySimulator) -> None:
    """Someone else's prompt, straight to ComfyUI (a MANUAL one parks at its first step)."""
    body = json.dumps({"prompt": txt2img(steps=2, width=64, height=64)})
    foreign = await http_request("POST", f"{sim.url}/prompt", body=body.encode())
    assert foreign.status == 200, foreign.body


async def assert_interrupted_there(sim: ComfySimulator, prompt_id: str) -> None:
    """The prompt parked there moves on, and ends interrupted: it made no image."""
    sim.grant_steps(1000)
    await sim.engine.history.wait_for(prompt_id)
    history = sim.engine.history.get(prompt_id)[prompt_id]
    assert any(m[0] == "execution_interrupted" for m in history["status"]["messages"])


async def running_task(daemon: Daemon) -> TaskActor:
    """A new task of `daemon`, once its prompt runs in ComfyUI."""
    await daemon.app.pool.wait_all_read()
    actor = daemon.app.registry.get(await daemon.generate())
    assert actor is not None
    await wait_state(actor, lambda s: s.phase is task.Phase.RUNNING)
    return actor


@pytest.mark.guard(30)  # (before the fix the task waited forever: this fails it)
async def test_a_reconcile_that_fails_with_the_socket_back_is_asked_again(
    tmp_path: Path,
) -> None:
    # After a reconnect each task asks /queue and /history how its prompt stands;
    # when that fails, no reconnect asks again, and a prompt that finished while
    # we were away sends no frame ever again.
    async with (
        relayed_simulator(MANUAL) as (sim, relay),
        running_daemon(
            tmp_path, simulator=None, comfy_url=relay.url, comfy_connect_timeout=1
        ) as daemon,
    ):
        await daemon.app.pool.wait_all_read()
        # Someone else's prompt runs (parked at its first step); ours waits behind
        # it in ComfyUI's queue, so the backend watches no prompt of ours for silence.
        await post_foreign_prompt(sim)
        task_id = await daemon.generate()
        actor = daemon.app.registry.get(task_id)
        assert actor is not None
        await wait_state(actor, lambda s: s.queue is not None and s.queue.ahead == 1)
        relay.go_down()
        await wait_state(actor, lambda s: s.phase is task.Phase.WAITING)
        # Both prompts finish while the daemon cannot see it.
        sim.set_manual_steps(False)
        await sim.engine.history.wait_for(actor.prompt_id)
        relay.failing = b"GET /queue"
        relay.come_back()
        await relay.failed_one.wait()  # the reconcile after the reconnect failed
        relay.failing = None
        data = payloads(await daemon.events(task_id))
    assert data[-1]["status"] == "completed"
    assert len(data[-1]["result"]["imageUrls"]) == 1


async def test_a_cancel_while_the_post_dies_with_its_backend_ends_the_task_cancelled(
    tmp_path: Path,
) -> None:
    async with (
        relayed_simulator(MANUAL) as (sim, relay),
        running_daemon(
            tmp_path, simulator=None, comfy_url=relay.url, comfy_connect_timeout=1
        ) as daemon,
    ):
        pool = daemon.app.pool
        await pool.wait_all_read()
        # ComfyUI takes the prompt, then the network dies before its answer.
        relay.dies_after = b"POST /prompt"
        task_id = await daemon.generate()
        await relay.died.wait()
        queue = sim.engine.queue
        (posted,) = [i.prompt_id for i in (*queue.running(), *queue.pending())]
        response = await daemon.request("DELETE", f"/tasks/{task_id}")
        assert response.status == 202
        # At once, not after backend_wait_timeout as `backend_unavailable`.
        data = payloads(await daemon.events(task_id))
        assert data[-1]["error"]["code"] == "cancelled"
        # The prompt that did arrive goes once the backend is back.
        relay.dies_after = None
        relay.come_back()
        while pool.abandoned(pool.backends[0]):
            await pool.changed.wait()
        await assert_interrupted_there(sim, posted)
        assert (await http_request("GET", f"{sim.url}/queue")).json() == {
            "queue_running": [],
            "queue_pending": [],
        }


def refused_workflow(tmp_path: Path) -> Path:
    """A workflows folder with `refused`: a graph ComfyUI rejects at POST /prompt
    (a batch of 0 latents: below EmptyLatentImage's minimum, 400 with node_errors)."""
    definition = txt2img_definition()
    graph = definition["graph"]
    graph["5"]["inputs"]["batch_size"] = 0
    # Stock ComfyUI nodes only (the sample's decoder is made up).
    graph["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
    del definition["parameters"]["tiled"]
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "refused.json").write_text(json.dumps(definition), encoding="utf-8")
    return workflows


async def test_a_cancel_while_the_post_is_answered_with_a_rejection_ends_the_task_cancelled(
    tmp_path: Path,
) -> None:
    workflows = refused_workflow(tmp_path)
    async with (
        relayed_simulator(FAST) as (_, relay),
        running_daemon(
            tmp_path, simulator=None, comfy_url=relay.url, workflows_dir=str(workflows)
        ) as daemon,
    ):
        await daemon.app.pool.wait_all_read()
        relay.hold_answers(b"POST /prompt")
        task_id = await daemon.generate(workflow="refused", width=64)
        await relay.holding.wait()  # ComfyUI's 400 is on its way back
        response = await daemon.request("DELETE", f"/tasks/{task_id}")
        assert response.status == 202
        assert response.json()["status"] == "cancelling"
        relay.release()
        data = payloads(await daemon.events(task_id))
        status = (await daemon.request("GET", f"/tasks/{task_id}")).json()
    # The cancel the 202 promised, not `rejected`; why ComfyUI refused it stays told.
    for end in (data[-1], status):
        assert end["error"]["code"] == "cancelled", end
        assert "batch_size" in end["error"]["details"], end


@pytest.mark.guard(30)  # (before the fix the task tried the same backend forever)
async def test_a_backend_whose_post_prompt_fails_gives_its_task_to_another(
    tmp_path: Path,
) -> None:
    async with (
        relayed_simulator(FAST) as (_, relay),  # its POST /prompt breaks
        running_pool(tmp_path, [FAST], first_urls=(relay.url,)) as pool,
    ):
        await pool.all_read()
        # Its WebSocket is fine; its POST /prompt handler raises every time.
        relay.answers_500 = b"POST /prompt"
        task_id = await pool.generate()
        data = payloads(await read_events(pool.url, task_id))
        assert data[-1]["status"] == "completed"
        actor = pool.app.registry.get(task_id)
        assert actor is not None
        assert actor.backend_name == pool.simulators[0].url
        assert relay.answered_500 >= 1


@pytest.mark.guard(30)  # (before the fix the task tried again every second, forever)
async def test_a_task_no_backend_takes_ends_backend_unavailable(tmp_path: Path) -> None:
    async with (
        relayed_simulator(FAST) as (_, relay),  # its POST /prompt breaks
        running_daemon(
            tmp_path, simulator=None, comfy_url=relay.url, backend_wait_timeout=3.0
        ) as daemon,
    ):
        await daemon.app.pool.wait_all_read()
        relay.answers_500 = b"POST /prompt"
        task_id = await daemon.generate()
        data = payloads(await daemon.events(task_id))
    error = data[-1]["error"]
    assert error["code"] == "backend_unavailable"
    assert "500" in error["details"]
    assert relay.answered_500 >= 2  # tried again before giving up


async def test_waiting_for_room_between_failed_posts_does_not_count_as_failing(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    # A POST that failed once, a long wait for the backend's room, one more failed
    # POST: the task has not been failing for backend_wait_timeout, and goes on.
    mock_clock.rate = 1.0  # real time, plus the jump below
    async with (
        relayed_simulator(MANUAL) as (sim, relay),
        running_daemon(
            tmp_path,
            simulator=None,
            comfy_url=relay.url,
            backend_max_pending=1,
            backend_wait_timeout=2.0,
        ) as daemon,
    ):
        await daemon.app.pool.wait_all_read()
        relay.answers_500 = b"POST /prompt"
        first = await daemon.generate()
        await relay.until_answered_500(1)
        relay.answers_500 = None
        # Another task takes the backend's only place (parked at its first step).
        second = daemon.app.registry.get(await daemon.generate())
        assert second is not None
        await wait_state(second, lambda s: s.phase is task.Phase.RUNNING)
        dispatcher = daemon.app.dispatcher
        while first not in {t.task_id for t in dispatcher.tickets()}:
            await dispatcher.queued.wait()
        mock_clock.jump(3.0)  # the first waits for room longer than the timeout
        relay.answers_500 = b"POST /prompt"
        sim.set_manual_steps(False)  # the second ends, and makes room
        await relay.until_answered_500(2)
        relay.answers_500 = None  # the next POST, a second later, is taken
        data = payloads(await daemon.events(first))
    assert data[-1]["status"] == "completed", data[-1]


@pytest.mark.guard(30)
async def test_a_post_whose_answer_is_lost_leaves_no_second_image(tmp_path: Path) -> None:
    # ComfyUI took the prompt, but its answer and then the whole backend are gone:
    # the daemon cannot tell whether it arrived, and runs the task elsewhere. The
    # copy left on the first backend must not run too once it is back.
    async with (
        relayed_simulator(MANUAL) as (first, relay),  # parks the prompt at its first step
        running_pool(tmp_path, [FAST], first_urls=(relay.url,), comfy_connect_timeout=1) as pool,
    ):
        await pool.all_read()
        relay.dies_after = b"POST /prompt"
        task_id = await pool.generate()
        actor = pool.app.registry.get(task_id)
        assert actor is not None
        await relay.died.wait()
        queue = first.engine.queue
        (left_there,) = [i.prompt_id for i in (*queue.running(), *queue.pending())]
        data = payloads(await read_events(pool.url, task_id))
        assert data[-1]["status"] == "completed"
        assert len(data[-1]["result"]["imageUrls"]) == 1
        assert actor.backend_name == pool.simulators[0].url
        relay.dies_after = None
        relay.come_back()
        backends = pool.app.pool
        comeback = backends.backends[0]
        while backends.abandoned(comeback) or not backends.takes_work(comeback):
            await backends.changed.wait()
        await assert_interrupted_there(first, left_there)


@pytest.mark.guard(30)  # (before the fix the task waited for room forever: this fails it)
async def test_a_cancel_while_a_lost_attempt_is_dropped_ends_the_task_cancelled(
    tmp_path: Path,
) -> None:
    async with (
        relayed_simulator(MANUAL) as (sim, relay),
        running_daemon(
            tmp_path,
            simulator=None,
            comfy_url=relay.url,
            comfy_connect_timeout=1,
            reconnect_initial_delay=0.1,
            reconnect_max_delay=0.5,
            backend_max_pending=1,
        ) as daemon,
    ):
        actor = await running_task(daemon)
        task_id = actor.task_id
        relay.go_down()
        await wait_state(actor, lambda s: s.phase is task.Phase.WAITING)
        # ComfyUI restarts while the daemon cannot see it (our prompt is gone), and
        # someone else's prompt takes its only place (parked at its first step).
        sim.restart()
        await post_foreign_prompt(sim)
        lost = actor._lost  # the attempt's: set once it is found lost
        assert lost is not None
        relay.come_back()
        await lost.wait()
        # The attempt is being dropped (to be resubmitted): the cancel comes now.
        actor.cancel()
        data = payloads(await daemon.events(task_id))
    assert data[-1]["error"]["code"] == "cancelled", data[-1]


async def test_a_cancel_while_a_restored_task_looks_for_its_prompt_removes_it(
    tmp_path: Path,
) -> None:
    # The daemon stopped after ComfyUI took a prompt but before it heard so: the
    # restored task asks ComfyUI whether it has it. A cancel meanwhile must not
    # leave it there.
    async with relayed_simulator(MANUAL) as (sim, relay):
        # Someone else's prompt runs (parked at its first step): ours waits behind it.
        await post_foreign_prompt(sim)
        queue = sim.engine.queue
        settings = {"comfy_url": relay.url, "backend_max_pending": 3}
        async with running_daemon(tmp_path, simulator=None, **settings) as before:
            await before.app.pool.wait_all_read()
            relay.hold_answers(b"POST /prompt")
            task_id = await before.generate()
            await relay.holding.wait()  # ComfyUI took it; the daemon stops unaware
        (posted,) = [i.prompt_id for i in queue.pending()]
        relay.hold_answers(b"GET /queue")
        async with running_daemon(tmp_path, simulator=None, **settings) as after:
            await relay.holding.wait()  # the restored task asks whether ComfyUI has it
            await after.app.pool.wait_all_read()
            response = await after.request("DELETE", f"/tasks/{task_id}")
            assert response.status == 202
            relay.release()
            data = payloads(await after.events(task_id))
    assert data[-1]["error"]["code"] == "cancelled", data[-1]
    assert posted not in [i.prompt_id for i in (*queue.running(), *queue.pending())]


@pytest.mark.guard(30)
async def test_a_restored_task_that_cannot_ask_for_its_prompt_hears_the_new_one(
    tmp_path: Path,
) -> None:
    # The daemon stopped after ComfyUI took a prompt but before it heard so, and
    # the restored task cannot ask ComfyUI whether it has it (its /queue does not
    # answer) while the socket is up: the task goes on under a new prompt id, and
    # must hear that prompt's frames, not the old one's.
    async with relayed_simulator(MANUAL) as (sim, relay):
        # Someone else's prompt runs (parked at its first step): ours waits behind it.
        await post_foreign_prompt(sim)
        queue = sim.engine.queue
        settings = {"comfy_url": relay.url, "backend_max_pending": 3, "comfy_http_timeout": 1}
        async with running_daemon(tmp_path, simulator=None, **settings) as before:
            await before.app.pool.wait_all_read()
            relay.hold_answers(b"POST /prompt")
            task_id = await before.generate()
            await relay.holding.wait()  # ComfyUI took it; the daemon stops unaware
        (first_prompt,) = [i.prompt_id for i in queue.pending()]
        relay.hold_answers(b"GET /queue")  # answered after comfy_http_timeout
        async with running_daemon(tmp_path, simulator=None, **settings) as after:
            actor = after.app.registry.get(task_id)
            assert actor is not None
            await after.app.pool.wait_all_read()
            await wait_state(actor, lambda s: s.submitted and s.prompt_id != first_prompt)
            relay.release()
            pool = after.app.pool
            while pool.abandoned(pool.backends[0]):  # the old prompt is deleted there
                await pool.changed.wait()
            sim.set_manual_steps(False)
            data = payloads(await after.events(task_id))
    # The new prompt's sampler steps reached the task as they ran.
    assert any(d["progress"]["currentValue"] > 0 for d in data if d["status"] == "in-progress")
    assert data[-1]["status"] == "completed", data[-1]
    assert first_prompt not in prompts_in(sim)


@pytest.mark.guard(30)  # (before the fix the prompt stayed there until a reconnect)
async def test_a_post_whose_answer_is_lost_while_the_socket_stays_up_leaves_no_second_image(
    tmp_path: Path,
) -> None:
    # As above, but only HTTP fails: the backend stays connected, and no reconnect
    # comes to remove what it holds.
    async with (
        relayed_simulator(MANUAL) as (first, relay),  # parks the prompt at its first step
        running_pool(tmp_path, [FAST], first_urls=(relay.url,)) as pool,
    ):
        await pool.all_read()
        relay.dies_after, relay.stays_up = b"POST /prompt", True
        relay.failing = b"GET /queue"  # nor can it be asked whether it took it
        task_id = await pool.generate()
        await relay.failed_one.wait()
        relay.dies_after = relay.failing = None
        queue = first.engine.queue
        (left_there,) = [i.prompt_id for i in (*queue.running(), *queue.pending())]
        data = payloads(await read_events(pool.url, task_id))
        assert data[-1]["status"] == "completed"
        backends = pool.app.pool
        while backends.abandoned(backends.backends[0]):
            await backends.changed.wait()
        assert backends.backends[0].is_connected()
        await assert_interrupted_there(first, left_there)


@pytest.mark.guard(30)
async def test_a_prompt_abandoned_while_its_backend_is_away_goes_after_a_restart(
    tmp_path: Path,
) -> None:
    # A cancel while the backend is away leaves its prompt there to remove once
    # it is back; the daemon restarts before it is. The journal keeps the prompt.
    async with relayed_simulator(MANUAL) as (sim, relay):  # parks the prompt at its first step
        settings = {"comfy_url": relay.url, "comfy_connect_timeout": 1}
        async with running_daemon(tmp_path, simulator=None, **settings) as before:
            actor = await running_task(before)
            task_id, prompt_id = actor.task_id, actor.prompt_id
            relay.go_down()
            await wait_state(actor, lambda s: s.phase is task.Phase.WAITING)
            response = await before.request("DELETE", f"/tasks/{task_id}")
            assert response.status == 202
            data = payloads(await before.events(task_id))
            assert data[-1]["error"]["code"] == "cancelled"
            pool = before.app.pool
            assert pool.abandoned(pool.backends[0]) == {prompt_id}
        # ComfyUI still runs it (parked), unseen by the daemon that is gone.
        assert [i.prompt_id for i in sim.engine.queue.running()] == [prompt_id]
        async with running_daemon(tmp_path, simulator=None, **settings) as after:
            pool = after.app.pool
            assert pool.abandoned(pool.backends[0]) == {prompt_id}
            relay.come_back()
            while pool.abandoned(pool.backends[0]):
                await pool.changed.wait()
            await assert_interrupted_there(sim, prompt_id)
            assert (await http_request("GET", f"{sim.url}/queue")).json() == {
                "queue_running": [],
                "queue_pending": [],
            }
    # Removed: the journal no longer holds it, a third start has nothing to remove.
    with closing(sqlite3.connect(tmp_path / "data" / "journal.sqlite3")) as db:
        assert db.execute("SELECT * FROM abandoned_prompts").fetchall() == []


async def test_an_abandoned_prompt_a_restored_task_follows_is_not_removed(
    tmp_path: Path,
) -> None:
    # A daemon killed between giving a prompt up and journalling its task's next
    # one leaves both: the task's record wins, the restored task follows it again.
    async with relayed_simulator(MANUAL) as (sim, relay):  # parks the prompt at its first step
        settings = {"comfy_url": relay.url, "comfy_connect_timeout": 1}
        async with running_daemon(tmp_path, simulator=None, **settings) as before:
            actor = await running_task(before)
            task_id, prompt_id = actor.task_id, actor.prompt_id
        journal = tmp_path / "data" / "journal.sqlite3"
        with closing(sqlite3.connect(journal)) as db:
            db.execute(
                "INSERT INTO abandoned_prompts VALUES (?, ?, ?)",
                (relay.url, prompt_id, time.time()),
            )
            db.commit()
        async with running_daemon(tmp_path, simulator=None, **settings) as after:
            pool = after.app.pool
            assert pool.abandoned(pool.backends[0]) == frozenset()
            await pool.wait_all_read()
            sim.set_manual_steps(False)
            data = payloads(await after.events(task_id))
    assert data[-1]["status"] == "completed", data[-1]
    history = sim.engine.history.get(prompt_id)[prompt_id]
    assert not any(m[0] == "execution_interrupted" for m in history["status"]["messages"])
    with closing(sqlite3.connect(journal)) as db:
        assert db.execute("SELECT * FROM abandoned_prompts").fetchall() == []


def prompts_in(sim: ComfySimulator) -> set[str]:
    """Every prompt ComfyUI holds or held: queued, running, or in its history."""
    queue = sim.engine.queue
    held = {i.prompt_id for i in (*queue.running(), *queue.pending())}
    return held | set(sim.engine.history.list(None, 0))


@pytest.mark.guard(30)
async def test_a_new_prompt_id_reaches_comfyui_only_once_the_journal_holds_it(
    tmp_path: Path,
) -> None:
    # The answer to the first POST is lost and ComfyUI cannot be asked: the task goes
    # on under a new prompt id. Killed right after POSTing that one, a restarted
    # daemon would find the old id in its journal, follow the old prompt, and leave
    # the new one to run there too: a second image. So the POST waits for the disk.
    async with (
        relayed_simulator(MANUAL) as (sim, relay),  # parks the prompt at its first step
        running_daemon(tmp_path, simulator=None, comfy_url=relay.url) as daemon,
    ):
        await daemon.app.pool.wait_all_read()
        registry, journal = daemon.app.registry, daemon.app.journal
        relay.dies_after, relay.stays_up = b"POST /prompt", True
        relay.failing = b"GET /queue"  # nor can it be asked whether it took the prompt
        async with trio.open_nursery() as nursery:
            async with journal._lock:  # a fault below the unit: a disk that stalls
                nursery.start_soon(daemon.generate)  # (its 202 waits for the disk too)
                while not registry.actors():
                    await registry.changed.wait()
                (actor,) = registry.actors()
                first_prompt = actor.prompt_id
                await relay.failed_one.wait()
                relay.dies_after = relay.failing = None
                await wait_state(actor, lambda s: s.prompt_id != first_prompt)
                # Its next attempt, after SUBMIT_RETRY_DELAY (no event tells of it).
                while actor.attempts < 2:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                await trio.testing.wait_all_tasks_blocked()  # a POST would be there by now
                assert actor.prompt_id not in prompts_in(sim)
                assert first_prompt in prompts_in(sim)
            # On disk now: the POST goes.
            sim.set_manual_steps(False)
            data = payloads(await read_events(daemon.url, actor.task_id))
    assert data[-1]["status"] == "completed", data[-1]
    assert actor.prompt_id in prompts_in(sim)
