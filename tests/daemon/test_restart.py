"""Daemon restarts: kill -9 and SIGTERM, with the simulator (ComfyUI) living on.

The daemon runs as a real process; the simulator runs in the test, so it
keeps running prompts while the daemon is down, as a real ComfyUI would.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from daemon.http.client import http_request, open_stream
from daemon.simulator import ComfySimulator, SimulatorConfig
from protocol.sse import ServerSentEvent
from tests.daemon.harness import read_events
from tests.daemon.process import daemon_process

SETTINGS = ("reconnect_initial_delay=0.05", "queue_poll_interval=0.05", "shutdown_grace=2")


@asynccontextmanager
async def simulator() -> AsyncIterator[ComfySimulator]:
    sim = ComfySimulator(SimulatorConfig(step_time=0.01))
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.run, ("127.0.0.1", 0))
        sim.set_manual_steps(True)
        yield sim
        nursery.cancel_scope.cancel()


async def generate(url: str) -> str:
    response = await http_request(
        "POST",
        f"{url}/generate",
        headers=[("Content-Type", "application/json")],
        body=json.dumps({"prompt": "a red fox"}).encode(),
        timeout=10,
    )
    assert response.status == 202, response.body
    task_id: str = response.json()["taskId"]
    return task_id


def sampling(event: ServerSentEvent) -> bool:
    node_type: str | None = json.loads(event.data)["progress"].get("nodeType")
    return node_type == "KSampler"


async def test_kill_9_mid_task_then_restart_completes_the_task(tmp_path: Path) -> None:
    async with simulator() as sim:
        async with daemon_process(tmp_path, sim.url, *SETTINGS) as first:
            task_id = await generate(first.url)
            seen = await read_events(first.url, task_id, stop_after=sampling)
            first.kill()
            assert await first.wait() == -9
        last_id = int(seen[-1].id or 0)
        sim.grant_steps(5)  # ComfyUI goes on while we are away
        async with daemon_process(tmp_path, sim.url, *SETTINGS) as second:
            follow = trio.Event()
            events: list[ServerSentEvent] = []
            async with trio.open_nursery() as nursery:

                async def reconnect() -> None:
                    events.extend(
                        await read_events(
                            second.url, task_id, last_event_id=last_id, first_event=follow
                        )
                    )

                nursery.start_soon(reconnect)
                await follow.wait()
                sim.grant_steps(1000)
            assert all(int(e.id or 0) > last_id for e in events)  # ids kept rising
            done = json.loads(events[-1].data)
            assert done["status"] == "completed", done
            image = await http_request("GET", second.url + done["result"]["imageUrl"], timeout=10)
            assert image.status == 200

        # Finished tasks are served after a restart too, images included.
        async with daemon_process(tmp_path, sim.url, *SETTINGS) as third:
            status = await http_request("GET", f"{third.url}/tasks/{task_id}", timeout=10)
            assert status.json()["status"] == "completed"
            again = await read_events(third.url, task_id)
            assert [e.event for e in again] == ["complete"]
            image = await http_request("GET", third.url + done["result"]["imageUrl"], timeout=10)
            assert image.status == 200
            assert image.body.startswith(b"\x89PNG")


def preview_url_of(event: ServerSentEvent) -> str | None:
    preview = json.loads(event.data).get("progress", {}).get("preview")
    return None if preview is None else str(preview["url"])


async def test_a_preview_url_after_a_restart_names_no_image_announced_before(
    tmp_path: Path,
) -> None:
    """A page that stays open across a restart has loaded the first daemon's preview
    URLs; a browser shows the image it has for a URL it loaded (without asking, Cache-
    Control or not). So the restarted daemon's previews must come under new URLs (its
    preview versions started at 1 again: `?v=1` was the first daemon's first image)."""
    config = SimulatorConfig(step_time=0.01, sampler_previews=True, preview_size=64)
    sim = ComfySimulator(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.run, ("127.0.0.1", 0))
        sim.set_manual_steps(True)
        async with daemon_process(tmp_path, sim.url, *SETTINGS) as first:
            task_id = await generate(first.url)
            seen = await read_events(first.url, task_id, stop_after=sampling)
            sim.grant_steps(1)  # one sampler step: one preview
            seen += await read_events(
                first.url,
                task_id,
                last_event_id=int(seen[-1].id or 0),
                stop_after=lambda e: preview_url_of(e) is not None,
            )
            before = {preview_url_of(e) for e in seen} - {None}
            first.kill()
            assert await first.wait() == -9
        async with daemon_process(tmp_path, sim.url, *SETTINGS) as second:
            follow = trio.Event()

            async def grant_once_following() -> None:
                await follow.wait()
                sim.grant_steps(1)  # the next step: another image

            async with trio.open_nursery() as steps:
                steps.start_soon(grant_once_following)
                after = await read_events(
                    second.url,
                    task_id,
                    last_event_id=int(seen[-1].id or 0),
                    first_event=follow,
                    stop_after=lambda e: preview_url_of(e) is not None,
                )
            url = preview_url_of(after[-1])
            assert url is not None
            assert url not in before, (url, before)
            sim.grant_steps(1000)
            done = await read_events(second.url, task_id, last_event_id=int(after[-1].id or 0))
            assert json.loads(done[-1].data)["status"] == "completed"
        nursery.cancel_scope.cancel()


async def test_task_finished_while_the_daemon_was_dead(tmp_path: Path) -> None:
    async with simulator() as sim:
        async with daemon_process(tmp_path, sim.url, *SETTINGS) as first:
            task_id = await generate(first.url)
            await read_events(first.url, task_id, stop_after=sampling)
            first.kill()
            await first.wait()
        prompt_id = await only_prompt_id(sim)
        sim.grant_steps(1000)
        await sim.wait_for_history(prompt_id)
        async with daemon_process(tmp_path, sim.url, *SETTINGS) as second:
            events = await read_events(second.url, task_id)
            assert json.loads(events[-1].data)["status"] == "completed"


async def only_prompt_id(sim: ComfySimulator) -> str:
    queue = await http_request("GET", f"{sim.url}/queue", timeout=10)
    running = queue.json()["queue_running"]
    assert len(running) == 1
    prompt_id: str = running[0][1]
    return prompt_id


async def test_sigterm_drains_streams_and_exits_zero(tmp_path: Path) -> None:
    async with simulator() as sim:
        async with daemon_process(tmp_path, sim.url, *SETTINGS) as first:
            task_id = await generate(first.url)
            raw = bytearray()
            async with open_stream("GET", f"{first.url}/progress/{task_id}") as stream:
                async for chunk in stream.chunks:
                    raw += chunk
                    if b"KSampler" in raw and not first.exited.is_set():
                        first.terminate()
                        break
                async for chunk in stream.chunks:  # the rest, until the daemon closes it
                    raw += chunk
            with trio.fail_after(10):
                assert await first.wait() == 0, first.log()
            assert raw.endswith(b"retry: 2000\n\n")  # come back later
            assert b"event: complete" not in raw
        # The task was journalled; the next daemon finishes it.
        async with daemon_process(tmp_path, sim.url, *SETTINGS) as second:
            follow = trio.Event()
            events: list[ServerSentEvent] = []
            async with trio.open_nursery() as nursery:

                async def reconnect() -> None:
                    events.extend(await read_events(second.url, task_id, first_event=follow))

                nursery.start_soon(reconnect)
                await follow.wait()
                sim.grant_steps(1000)
            assert json.loads(events[-1].data)["status"] == "completed"


async def test_a_cancel_answered_202_survives_a_kill_9_right_after(tmp_path: Path) -> None:
    async with simulator() as sim:
        async with daemon_process(tmp_path, sim.url, *SETTINGS) as first:
            task_id = await generate(first.url)
            seen = await read_events(first.url, task_id, stop_after=sampling)
            cancel = await http_request("DELETE", f"{first.url}/tasks/{task_id}", timeout=10)
            assert cancel.status == 202, cancel.body
            first.kill()
            assert await first.wait() == -9
        with trio.fail_after(30):  # a lost cancel: the task would wait for steps forever
            async with daemon_process(tmp_path, sim.url, *SETTINGS) as second:
                # ComfyUI sees an interrupt at its next step: only once one was asked
                # (the simulator's flag has no event to wait on).
                while not sim.engine.executor.interrupt_requested:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                sim.grant_steps(1)
                events = await read_events(second.url, task_id, last_event_id=int(seen[-1].id or 0))
        done = json.loads(events[-1].data)
        assert done["status"] == "error", done
        assert done["error"]["code"] == "cancelled", done
