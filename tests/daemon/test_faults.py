"""Nothing lost: ComfyUI faults injected in the real simulator, over real sockets.

The simulator runs in manual-step mode so each fault lands at a known point of
the generation (the sampler's first step); tests wait for states, not time.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import trio.testing
import trio_websocket

from daemon.comfy.backend import ComfyBackend
from daemon.simulator import ComfySimulator
from daemon.tasks.actor import TaskActor
from protocol import task
from tests.daemon.comfy_relay import comfy_relay
from tests.daemon.harness import FAST, Daemon, payloads, running_daemon
from tests.protocol.workflow_samples import txt2img_definition

SAMPLER = "3"  # the KSampler node of the built-in txt2img graph


async def wait_state(actor: TaskActor, predicate: Callable[[task.TaskState], bool]) -> None:
    """Wait until the task's state satisfies `predicate` (woken by each publish)."""
    while not predicate(actor.state):
        latest = actor.broadcaster.latest
        await actor.broadcaster.wait_newer(latest.version if latest else None)


async def wait_reconnected(backend: ComfyBackend, before: int) -> None:
    while backend.reconnects <= before:
        await backend.reconnected.wait()


async def wait_disconnected(backend: ComfyBackend) -> None:
    while backend.is_connected():
        await backend.connected_changed.wait()


async def start_sampling(daemon: Daemon) -> tuple[str, TaskActor, ComfySimulator]:
    """A task parked at its sampler's first step."""
    sim = daemon.simulator
    assert sim is not None
    sim.set_manual_steps(True)
    task_id = await daemon.generate()
    actor = daemon.app.registry.get(task_id)
    assert actor is not None
    await wait_state(actor, lambda s: s.current_node == SAMPLER)
    return task_id, actor, sim


async def test_websocket_drop_mid_task_reconnects_and_completes(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        task_id, _, sim = await start_sampling(daemon)
        backend = daemon.app.backend
        before = backend.reconnects
        sim.drop_websockets()
        await wait_reconnected(backend, before)
        routed = backend.router.events_routed
        seen: list[dict[str, Any]] = []
        following = trio.Event()
        async with trio.open_nursery() as nursery:

            async def follow() -> None:
                seen.extend(payloads(await daemon.events(task_id, first_event=following)))

            nursery.start_soon(follow)
            await following.wait()
            sim.set_step_time(0.02)  # ticks far enough apart for the reader to see them
            sim.set_manual_steps(False)
        assert seen[-1]["status"] == "completed"
        # The same client id came back, so live progress resumed (not just the end):
        # the 19 remaining ticks arrived as frames and the reader saw several of them.
        assert backend.router.events_routed - routed >= 19
        sampled = {
            d["progress"]["currentValue"]
            for d in seen
            if d["status"] == "in-progress" and d["progress"].get("node") == SAMPLER
        }
        assert len(sampled) >= 5


async def test_after_a_reconnect_prompts_still_queued_reconcile_without_asking_history(
    tmp_path: Path,
) -> None:
    # ComfyUI may hold thousands of our prompts: a GET /history for each after
    # every reconnect was thousands of requests (and connections) at once. One
    # /queue reading answers for every prompt still there.
    queued = 12
    async with running_daemon(tmp_path, backend_max_pending=queued + 1) as daemon:
        _, head, sim = await start_sampling(daemon)  # parked: nothing can finish
        backend = daemon.app.backend
        actors = []
        for _ in range(queued):
            actor = daemon.app.registry.get(await daemon.generate())
            assert actor is not None
            actors.append(actor)
        for actor in actors:
            await wait_state(actor, lambda s: s.submitted)
        asked: list[str] = []
        history = backend.http.history

        async def counted_history(prompt_id: str) -> Any:
            asked.append(prompt_id)
            return await history(prompt_id)

        backend.http.history = counted_history  # type: ignore[method-assign]
        reads, before = backend.queue_reads, backend.reconnects
        sim.drop_websockets()
        await wait_reconnected(backend, before)
        # The simulator runs in this Trio loop: idle means every reconcile is done.
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert asked == []
        assert backend.queue_reads - reads <= 3  # not one per task
        assert head.state.phase is task.Phase.RUNNING
        assert all(actor.state.phase is task.Phase.QUEUED for actor in actors)


async def test_prompt_that_finished_while_we_were_away_completes_with_its_image(
    tmp_path: Path,
) -> None:
    async with running_daemon(tmp_path) as daemon:
        task_id, actor, sim = await start_sampling(daemon)
        backend = daemon.app.backend
        before = backend.reconnects
        sim.reject_connections(3600)  # ComfyUI unreachable: socket cut, reconnects refused
        await wait_disconnected(backend)
        sim.grant_steps(1000)
        await sim.wait_for_history(actor.prompt_id)  # it finished; nobody heard the frames
        sim.reject_connections(0)
        await wait_reconnected(backend, before)
        data = payloads(await daemon.events(task_id))
        assert data[-1]["status"] == "completed"
        image = await daemon.request("GET", data[-1]["result"]["imageUrl"])
        assert image.status == 200
        assert image.body.startswith(b"\x89PNG")


async def test_comfyui_restart_loses_the_prompt_and_says_so(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, resubmit_lost=False) as daemon:
        task_id, _, sim = await start_sampling(daemon)
        sim.restart()
        data = payloads(await daemon.events(task_id))
        assert data[-1]["status"] == "error"
        assert data[-1]["error"]["code"] == "lost"
        assert "lost by ComfyUI" in data[-1]["error"]["message"]


async def test_zombie_socket_is_detected_probed_and_replaced(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, comfy_silence_timeout=0.3) as daemon:
        task_id, _, sim = await start_sampling(daemon)
        backend = daemon.app.backend
        before = backend.reconnects
        # FACTS §7: a second socket with our client id steals the registration and,
        # once closed, leaves ours open but silent. No error shows anywhere.
        async with trio_websocket.open_websocket_url(
            f"{daemon.bound.comfy_url.replace('http', 'ws')}/ws?clientId={backend.client_id}"
        ) as thief:
            await thief.get_message()  # its first status frame: registered
        sim.grant_steps(1000)  # the prompt finishes; our silent socket hears nothing
        await wait_reconnected(backend, before)  # silence noticed, socket replaced
        data = payloads(await daemon.events(task_id))
        assert data[-1]["status"] == "completed"


async def test_interrupt_from_elsewhere_is_interrupted(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        task_id, actor, sim = await start_sampling(daemon)
        await daemon.app.backend.http.interrupt(actor.prompt_id)  # someone else's doing
        sim.grant_steps(1000)
        events = await daemon.events(task_id)
        error = json.loads(events[-1].data)["error"]
        assert error["code"] == "interrupted"
        assert error["nodeType"] == "KSampler"


async def test_queue_position_while_waiting_behind_another_prompt(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        first, _, sim = await start_sampling(daemon)
        second = await daemon.generate()
        actor = daemon.app.registry.get(second)
        assert actor is not None
        await wait_state(actor, lambda s: s.queue is not None and s.queue.ahead == 1)
        status = (await daemon.request("GET", f"/tasks/{second}")).json()
        assert status["progress"]["currentStep"] == "Queued (1 ahead)"
        assert status["queue"] == {"position": 2, "ahead": 1}
        sim.grant_steps(1000)
        assert payloads(await daemon.events(first))[-1]["status"] == "completed"
        sim.grant_steps(1000)
        assert payloads(await daemon.events(second))[-1]["status"] == "completed"


async def test_cancel_a_queued_task_removes_it_from_comfyui(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        first, _, sim = await start_sampling(daemon)
        second = await daemon.generate()
        actor = daemon.app.registry.get(second)
        assert actor is not None
        await wait_state(actor, lambda s: s.queue is not None)
        response = await daemon.request("DELETE", f"/tasks/{second}")
        assert response.status == 202
        data = payloads(await daemon.events(second))
        assert data[-1]["error"]["code"] == "cancelled"
        queue = await daemon.app.backend.http.queue()
        assert actor.prompt_id not in queue.pending
        sim.grant_steps(1000)
        assert payloads(await daemon.events(first))[-1]["status"] == "completed"
        assert await daemon.app.backend.http.history(actor.prompt_id) is None  # never ran


def two_image_workflow(tmp_path: Path) -> Path:
    """A workflows folder with `two`: txt2img saving two images, fetched in turn."""
    definition = txt2img_definition()
    graph = definition["graph"]
    graph["5"]["inputs"]["batch_size"] = 2
    graph["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
    del definition["parameters"]["tiled"]
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "two.json").write_text(json.dumps(definition), encoding="utf-8")
    return workflows


async def test_a_cancel_while_the_images_are_fetched_ends_the_task_at_once(
    tmp_path: Path,
) -> None:
    """ComfyUI has finished the prompt and the daemon is fetching its images: the
    DELETE's 202 promises `cancelled`, so the task ends so at once (it used to
    complete with its images), and the image it had stored goes with it."""
    workflows = two_image_workflow(tmp_path)
    with trio.fail_after(30):  # a hang guard
        async with trio.open_nursery() as nursery:
            sim = ComfySimulator(FAST)
            port = await nursery.start(sim.run, ("127.0.0.1", 0))
            async with (
                comfy_relay(port) as relay,
                running_daemon(
                    tmp_path, simulator=None, comfy_url=relay.url, workflows_dir=str(workflows)
                ) as daemon,
            ):
                relay.hold_answers(b"GET /view?filename=ComfyUI_00002_")
                task_id = await daemon.generate(workflow="two", width=64)
                actor = daemon.app.registry.get(task_id)
                assert actor is not None
                await relay.holding.wait()  # the first image is stored, the second held
                assert actor.state.fetching_outputs
                (stored,) = actor.outputs_saved
                path = daemon.app.images.directory / stored
                assert path.exists()
                response = await daemon.request("DELETE", f"/tasks/{task_id}")
                assert response.status == 202
                assert response.json()["status"] == "cancelling"
                status = (await daemon.request("GET", f"/tasks/{task_id}")).json()
                data = payloads(await daemon.events(task_id))  # ends with no image released
                while path.exists():  # deleted once the actor has wound up
                    await trio.lowlevel.checkpoint()
                assert stored not in daemon.app.registry.images_in_use()
                image = await daemon.request("GET", f"/image/{stored}")
                again = await daemon.request("DELETE", f"/tasks/{task_id}")
                relay.release()
            nursery.cancel_scope.cancel()
    assert status["status"] == "error"
    assert status["error"]["code"] == "cancelled"
    assert data[-1]["status"] == "error"
    assert data[-1]["error"]["code"] == "cancelled"
    assert all(p["status"] != "completed" for p in data)
    assert image.status == 404
    assert again.status == 200
    assert again.json()["cancelled"] is False


async def test_a_fetch_retried_keeps_no_second_copy_of_an_image_it_stored(
    tmp_path: Path,
) -> None:
    """The second image's GET /view fails once: the retry fetches only what is
    missing, and no copy of the first image stays behind that no task names."""
    workflows = two_image_workflow(tmp_path)
    with trio.fail_after(30):  # a hang guard
        async with trio.open_nursery() as nursery:
            sim = ComfySimulator(FAST)
            port = await nursery.start(sim.run, ("127.0.0.1", 0))
            async with (
                comfy_relay(port) as relay,
                running_daemon(
                    tmp_path, simulator=None, comfy_url=relay.url, workflows_dir=str(workflows)
                ) as daemon,
            ):
                relay.answers_500 = b"GET /view?filename=ComfyUI_00002_"
                task_id = await daemon.generate(workflow="two", width=64)
                await relay.until_answered_500(1)  # the first image is stored already
                relay.answers_500 = None  # the retry, a second later, gets both
                last = payloads(await daemon.events(task_id))[-1]
                directory = daemon.app.images.directory
                on_disk = sorted(p.name for p in directory.iterdir() if p.suffix == ".png")
            nursery.cancel_scope.cancel()
    assert last["status"] == "completed", last
    assert on_disk == sorted(url.rsplit("/", 1)[1] for url in last["result"]["imageUrls"])


async def test_idempotency_key_returns_the_same_task(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        body = {"prompt": "a red fox", "seed": 5}
        key = (("Idempotency-Key", "order-42"),)
        first = await daemon.request("POST", "/generate", body, headers=key)
        again = await daemon.request("POST", "/generate", body, headers=key)
        assert first.status == again.status == 202
        assert first.json()["taskId"] == again.json()["taskId"]
        assert again.headers.get("idempotent-replayed") == "true"
        other = await daemon.request("POST", "/generate", {**body, "seed": 6}, headers=key)
        assert other.status == 422
        # Keys are guessable ('1', 'order-42'): the refusal names no one's task.
        assert first.json()["taskId"] not in other.body.decode(), other.body
        bad = await daemon.request("POST", "/generate", body, headers=(("Idempotency-Key", ""),))
        assert bad.status == 400
        assert daemon.app.registry.created == 1
        await daemon.events(first.json()["taskId"])
        history = await daemon.request_comfy("GET", "/history")
        assert len(history.json()) == 1  # one prompt reached ComfyUI


async def test_an_actor_crash_ends_every_stream_with_internal(tmp_path: Path) -> None:
    # A ComfyUI node fails with a message holding a lone surrogate (a file name
    # decoded with surrogateescape, say); ComfyUI sends it as "\udcff". The
    # error message cannot be encoded for the stream, so the actor crashes at
    # the very transition that ends the task.
    async with running_daemon(tmp_path) as daemon:
        sim = daemon.simulator
        assert sim is not None
        save = sim.catalogue["SaveImage"]

        async def broken_save(ctx: Any, inputs: dict[str, Any]) -> Any:
            raise OSError("cannot write /out/caf\udcff.png")

        sim.catalogue["SaveImage"] = dataclasses.replace(save, run=broken_save)
        task_id = await daemon.generate()
        with trio.fail_after(30):  # a hang guard: on the old code the streams never end
            async with trio.open_nursery() as nursery:
                streams: list[list[dict[str, Any]]] = []

                async def follow() -> None:
                    streams.append(payloads(await daemon.events(task_id)))

                for _ in range(3):
                    nursery.start_soon(follow)
        for seen in streams:
            assert seen[-1]["status"] == "error"
            assert seen[-1]["error"]["code"] == "internal"
        status = await daemon.request("GET", f"/tasks/{task_id}")
        assert status.json()["error"]["code"] == "internal"
        cancel = await daemon.request("DELETE", f"/tasks/{task_id}")
        assert cancel.json()["status"] == "error"
        assert cancel.json()["cancelled"] is False


async def wait_forgotten(daemon: Daemon, task_id: str) -> None:
    while daemon.app.registry.get(task_id) is not None:
        await daemon.app.registry.changed.wait()


async def test_idempotency_key_replayed_after_its_task_was_forgotten(tmp_path: Path) -> None:
    body = {"prompt": "a red fox", "seed": 5}
    key = (("Idempotency-Key", "order-43"),)
    async with running_daemon(tmp_path, task_retention=0.0) as daemon:
        first = await daemon.request("POST", "/generate", body, headers=key)
        assert first.status == 202
        task_id = first.json()["taskId"]
        final = payloads(await daemon.events(task_id))[-1]
        await wait_forgotten(daemon, task_id)
        assert (await daemon.request("GET", f"/tasks/{task_id}")).status == 404
        # Not "queued" with a taskId that 404s: the outcome the key led to.
        again = await daemon.request("POST", "/generate", body, headers=key)
        assert again.status == 200
        assert again.headers.get("idempotent-replayed") == "true"
        outcome = again.json()
        assert outcome["taskId"] == task_id
        assert outcome["status"] == "completed"
        assert outcome["result"] == final["result"]
        assert daemon.app.registry.created == 1
    # After a restart the key and its outcome are still known (journal).
    async with running_daemon(tmp_path, task_retention=0.0) as daemon:
        replayed = await daemon.request("POST", "/generate", body, headers=key)
        assert replayed.status == 200
        assert replayed.json() == outcome
        assert daemon.app.registry.created == 0


async def test_a_key_journalled_without_an_outcome_is_410_after_its_task_is_gone(
    tmp_path: Path,
) -> None:
    """Keys from journals that kept no outcomes: the task is gone, how it ended unknown."""
    body = {"prompt": "a red fox", "seed": 5}
    key = (("Idempotency-Key", "order-44"),)
    async with running_daemon(tmp_path, task_retention=0.0) as daemon:
        first = await daemon.request("POST", "/generate", body, headers=key)
        task_id = first.json()["taskId"]
        await daemon.events(task_id)
        await wait_forgotten(daemon, task_id)
    db = sqlite3.connect(tmp_path / "data" / "journal.sqlite3")
    db.execute("UPDATE idempotency SET outcome = NULL")
    db.commit()
    db.close()
    async with running_daemon(tmp_path, task_retention=0.0) as daemon:
        gone = await daemon.request("POST", "/generate", body, headers=key)
        assert gone.status == 410
        assert gone.json()["error"]["details"] == {"field": "Idempotency-Key", "taskId": task_id}
        assert daemon.app.registry.created == 0


async def test_a_restart_while_the_images_are_fetched_leaves_no_copy_named_by_nothing(
    tmp_path: Path,
) -> None:
    """The daemon stops with the first image stored and the second on its way: the
    restarted daemon completes the task with the image already stored, and no
    image stays on disk that no task names (until image_retention, 7 days)."""
    workflows = two_image_workflow(tmp_path)
    with trio.fail_after(30):  # a hang guard
        async with trio.open_nursery() as nursery:
            sim = ComfySimulator(FAST)
            port = await nursery.start(sim.run, ("127.0.0.1", 0))
            async with comfy_relay(port) as relay:
                settings = {
                    "comfy_url": relay.url,
                    "workflows_dir": str(workflows),
                    "reconnect_initial_delay": 0.05,
                }
                async with running_daemon(tmp_path, simulator=None, **settings) as before:
                    relay.hold_answers(b"GET /view?filename=ComfyUI_00002_")
                    task_id = await before.generate(workflow="two", width=64)
                    actor = before.app.registry.get(task_id)
                    assert actor is not None
                    await relay.holding.wait()  # the first image is stored, the second held
                    (stored,) = actor.outputs_saved
                    await before.app.journal.flush()
                relay.release()
                async with running_daemon(tmp_path, simulator=None, **settings) as after:
                    last = payloads(await after.events(task_id))[-1]
                    directory = after.app.images.directory
                    on_disk = sorted(p.name for p in directory.iterdir() if p.suffix == ".png")
            nursery.cancel_scope.cancel()
    assert last["status"] == "completed", last
    names = [url.rsplit("/", 1)[1] for url in last["result"]["imageUrls"]]
    assert on_disk == sorted(names)
    assert names[0] == stored  # the image stored before the restart is the result's


async def test_an_output_image_over_max_image_bytes_ends_the_task_at_once(
    tmp_path: Path,
) -> None:
    # Fetching it again cannot help: no retry for backend_wait_timeout, each one
    # downloading up to max_image_bytes again.
    async with running_daemon(tmp_path, max_image_bytes=100, max_upload_bytes=100) as daemon:
        http = daemon.app.backend.http
        view = http.view
        fetched: list[str] = []

        async def counted_view(image: Any) -> bytes:
            fetched.append(image.filename)
            return await view(image)

        http.view = counted_view  # type: ignore[method-assign]
        last = payloads(await daemon.events(await daemon.generate()))[-1]
    assert last["status"] == "error", last
    assert last["error"]["code"] == "output_unavailable"
    assert last["error"]["message"] == "The output image is too large"
    assert "max_image_bytes (100 bytes)" in last["error"]["details"]
    assert len(fetched) == 1


async def test_a_cancel_comfyui_does_not_answer_ends_the_task_and_the_prompt_goes_later(
    tmp_path: Path,
) -> None:
    # ComfyUI's WebSocket is up, its GET /queue fails: the cancel cannot find the
    # prompt. The task ends cancelled (it stayed "Cancelling..." and the prompt
    # ran to its end once ComfyUI got to it); the prompt is removed once it answers.
    with trio.fail_after(30):  # a hang guard
        async with trio.open_nursery() as nursery:
            sim = ComfySimulator(dataclasses.replace(FAST, manual_steps=True))
            port = await nursery.start(sim.run, ("127.0.0.1", 0))
            async with (
                comfy_relay(port) as relay,
                running_daemon(tmp_path, simulator=None, comfy_url=relay.url) as daemon,
            ):
                first = daemon.app.registry.get(await daemon.generate())
                assert first is not None
                await wait_state(first, lambda s: s.current_node == SAMPLER)
                second = daemon.app.registry.get(await daemon.generate())
                assert second is not None
                await wait_state(second, lambda s: s.submitted)  # queued behind the first
                relay.failing = b"GET /queue"
                response = await daemon.request("DELETE", f"/tasks/{second.task_id}")
                assert response.status == 202
                await second.finished.wait()
                relay.failing = None
                while any(i.prompt_id == second.prompt_id for i in sim.engine.queue.pending()):  # noqa: ASYNC110
                    await trio.sleep(0.01)
                sim.grant_steps(1000)
                await first.finished.wait()
                history = (await daemon.request_comfy("GET", "/history")).json()
            nursery.cancel_scope.cancel()
    assert second.state.error is not None
    assert second.state.error.code == "cancelled"
    assert first.state.phase is task.Phase.COMPLETED
    assert second.prompt_id not in history  # it never ran
