"""Live previews end to end: the real daemon, the real simulator, real sockets.

The simulator runs in manual-step mode, so each sampler step happens when the
test grants it and every wait below is for an event, not for time.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from daemon.comfy.backend import MAX_MESSAGE_BYTES
from daemon.http.client import http_request
from daemon.simulator import SimulatorConfig
from daemon.simulator.frames import preview_with_metadata_frame
from daemon.tasks.actor import TaskActor
from protocol import task
from protocol.imagesize import image_info
from tests.daemon.harness import Daemon, running_daemon, running_pool
from tests.simulator.helpers import ws_connect
from tests.simulator.test_workflows import txt2img

MANUAL = SimulatorConfig(
    manual_steps=True, sampler_previews=True, sampler_progress_text=True, preview_size=128
)
LEGACY = SimulatorConfig(
    manual_steps=True, sampler_previews=True, preview_metadata=False, preview_size=128
)
Payload = dict[str, Any]


async def snapshot_where(actor: TaskActor, wanted: Callable[[Payload], bool]) -> Payload:
    """The first snapshot (the latest one included) that satisfies `wanted`."""
    version: int | None = None
    while True:
        snapshot = await actor.broadcaster.wait_newer(version)
        if wanted(dict(snapshot.payload)):
            return dict(snapshot.payload)
        version = snapshot.version


def preview_of(payload: Payload) -> Payload | None:
    preview: Payload | None = payload.get("progress", {}).get("preview")
    return preview


async def start_task(daemon: Daemon, **fields: Any) -> TaskActor:
    task_id = await daemon.generate(steps=3, **fields)
    actor = daemon.app.registry.get(task_id)
    assert actor is not None
    return actor


async def announced_preview(actor: TaskActor, newer_than: int = 0) -> Payload:
    """The first preview announced past `newer_than`: named by the version of the
    snapshot that announced it (this one, or one a later snapshot replaced)."""
    version: int | None = None
    while True:
        snapshot = await actor.broadcaster.wait_newer(version)
        preview = preview_of(dict(snapshot.payload))
        if preview is not None and preview["version"] > newer_than:
            assert preview["version"] <= snapshot.version
            assert preview["url"] == f"/tasks/{actor.task_id}/preview?v={preview['version']}"
            return preview
        version = snapshot.version


async def step_until_preview(daemon: Daemon, actor: TaskActor) -> Payload:
    assert daemon.simulator is not None
    daemon.simulator.grant_steps(1)
    return await announced_preview(actor)


async def test_type_4_previews_reach_the_task_whose_prompt_they_name(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, simulator=MANUAL) as daemon:
        assert daemon.simulator is not None
        first = await start_task(daemon, seed=1)
        second = await start_task(daemon, seed=2)
        preview = await step_until_preview(daemon, first)
        # The daemon asked for metadata on connect, so ComfyUI sent type 4 frames.
        assert daemon.simulator.hub.supports_preview_metadata(daemon.app.backend.client_id)
        response = await daemon.request("GET", preview["url"])
        assert response.status == 200
        assert response.headers.get("content-type") == "image/jpeg"
        assert image_info(response.body).format == "jpeg"
        assert response.headers.get("etag") == f'"preview-{daemon.app.previews.boot}-1"'
        # The queued task got none of them.
        assert (await daemon.request("GET", f"/tasks/{second.task_id}/preview")).status == 404
        assert second.previews.get(second.task_id) is None

        daemon.simulator.grant_steps(2)
        await first.finished.wait()
        assert (await daemon.request("GET", preview["url"])).status == 404  # ended: dropped
        assert daemon.app.previews.get(first.task_id) is None

        preview = await step_until_preview(daemon, second)
        assert (await daemon.request("GET", preview["url"])).status == 200
        daemon.simulator.grant_steps(100)
        await second.finished.wait()


async def test_a_preview_is_revalidated_with_its_etag(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, simulator=MANUAL) as daemon:
        actor = await start_task(daemon)
        preview = await step_until_preview(daemon, actor)
        url = daemon.url + preview["url"]
        etag = f'"preview-{daemon.app.previews.boot}-1"'
        again = await http_request("GET", url, headers=[("If-None-Match", etag)])
        assert again.status == 304
        assert again.body == b""
        # The same version from another daemon process is another image.
        other = await http_request("GET", url, headers=[("If-None-Match", '"preview-0000-1"')])
        assert other.status == 200


async def test_legacy_type_1_previews_belong_to_the_running_prompt(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, simulator=LEGACY) as daemon:
        assert daemon.simulator is not None
        actor = await start_task(daemon)
        preview = await step_until_preview(daemon, actor)
        assert not daemon.simulator.hub.supports_preview_metadata(daemon.app.backend.client_id)
        response = await daemon.request("GET", preview["url"])
        assert response.status == 200
        assert response.headers.get("content-type") == "image/jpeg"
        daemon.simulator.grant_steps(1)
        await announced_preview(actor, newer_than=preview["version"])
        assert actor.state.value == 2
        stored = actor.previews.get(actor.task_id)
        assert stored is not None
        assert stored.version == 2
        daemon.simulator.grant_steps(100)
        await actor.finished.wait()


async def test_progress_text_of_another_clients_prompt_is_not_ours(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, simulator=MANUAL) as daemon, trio.open_nursery() as nursery:
        simulator = daemon.simulator
        assert simulator is not None
        port = int(daemon.bound.comfy_url.rsplit(":", 1)[1])
        # Someone else's prompt runs first; ComfyUI broadcasts its progress texts.
        stranger = await ws_connect(nursery, port, "stranger")
        body = json.dumps(
            {"prompt": txt2img(steps=2, width=64, height=64), "client_id": "stranger"}
        )
        submitted = await http_request(
            "POST", daemon.bound.comfy_url + "/prompt", body=body.encode()
        )
        foreign = submitted.json()["prompt_id"]
        ours = await start_task(daemon)
        simulator.grant_steps(2)
        await stranger.wait_for("executing", node=None, prompt_id=foreign)
        texts = [f for f in stranger.frames if isinstance(f, bytes) and f[3] == 3]
        assert len(texts) == 2  # the texts were sent, to every socket
        # Our prompt's execution_start follows them on the daemon's socket: by the
        # time our task runs, the daemon has seen both texts.
        await snapshot_where(ours, lambda p: p.get("phase") == "running")
        assert ours.state.text is None
        # Our own texts are ours.
        simulator.grant_steps(1)
        payload = await snapshot_where(ours, lambda p: "text" in p["progress"])
        assert payload["progress"]["text"] == "step 1/3"
        simulator.grant_steps(100)
        await ours.finished.wait()
        await stranger.ws.aclose()


async def test_a_preview_over_the_per_task_limit_is_not_kept(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, simulator=MANUAL, preview_max_task_bytes=100) as daemon:
        assert daemon.simulator is not None
        actor = await start_task(daemon)
        daemon.simulator.grant_steps(1)
        await snapshot_where(actor, lambda p: p["progress"].get("currentValue") == 1)
        daemon.simulator.grant_steps(1)
        payload = await snapshot_where(actor, lambda p: p["progress"].get("currentValue") == 2)
        assert preview_of(payload) is None
        assert daemon.app.previews.refused >= 1
        assert (await daemon.request("GET", f"/tasks/{actor.task_id}/preview")).status == 404
        daemon.simulator.grant_steps(100)
        await actor.finished.wait()


async def test_preview_of_an_unknown_task_is_404(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, simulator=MANUAL) as daemon:
        response = await daemon.request("GET", "/tasks/nope/preview")
        assert response.status == 404
        assert response.json()["error"]["message"] == "no preview"


@pytest.mark.parametrize("config", [MANUAL, LEGACY], ids=["type-4", "legacy-type-1"])
async def test_previews_reach_the_right_task_when_two_run_on_two_backends(
    tmp_path: Path, config: SimulatorConfig
) -> None:
    # One prompt per ComfyUI, so both tasks run at once, one on each backend.
    async with running_pool(tmp_path, [config, config], backend_max_pending=1) as pool:
        await pool.all_read()
        actors = []
        for seed in (1, 2):
            task_id = await pool.generate(seed=seed, steps=3)
            actor = pool.app.registry.get(task_id)
            assert actor is not None
            actors.append(actor)
        for actor in actors:
            await snapshot_where(actor, lambda p: p.get("phase") == "running")
        by_url = {actor.backend_name: actor for actor in actors}
        assert set(by_url) == {sim.url for sim in pool.simulators}
        first_sim, second_sim = pool.simulators
        on_first, on_second = by_url[first_sim.url], by_url[second_sim.url]

        # A step on the first ComfyUI: only the task running there gets a preview.
        first_sim.grant_steps(1)
        await announced_preview(on_first)
        assert (await pool.request("GET", f"/tasks/{on_first.task_id}/preview")).status == 200
        assert (await pool.request("GET", f"/tasks/{on_second.task_id}/preview")).status == 404
        assert on_second.state.value == 0

        # Then one on the second: its own task, its own first preview.
        second_sim.grant_steps(1)
        await announced_preview(on_second)
        stored = on_second.previews.get(on_second.task_id)
        assert stored is not None
        assert stored.version == 1
        first = await pool.request("GET", f"/tasks/{on_first.task_id}/preview")
        assert first.headers.get("etag", "").endswith('-1"')  # the first task's is unchanged
        for sim in pool.simulators:
            sim.set_manual_steps(False)
        for actor in actors:
            await actor.finished.wait()
        assert all(a.state.phase is task.Phase.COMPLETED for a in actors)


async def test_the_total_preview_budget_evicts_the_stalest_task_s_preview(
    tmp_path: Path,
) -> None:
    async with running_pool(tmp_path, [MANUAL, MANUAL], backend_max_pending=1) as pool:
        await pool.all_read()
        store = pool.app.previews
        actors = []
        for _ in range(2):  # the same seed: both backends draw the same preview
            task_id = await pool.generate(seed=7, steps=3)
            actor = pool.app.registry.get(task_id)
            assert actor is not None
            actors.append(actor)
        for actor in actors:
            await snapshot_where(actor, lambda p: p.get("phase") == "running")
        by_url = {actor.backend_name: actor for actor in actors}
        first_sim, second_sim = pool.simulators
        older, newer = by_url[first_sim.url], by_url[second_sim.url]
        first_sim.grant_steps(1)
        await snapshot_where(older, lambda p: preview_of(p) is not None)
        kept = store.get(older.task_id)
        assert kept is not None
        size = len(kept.data)
        # Room for one preview of this size, not two.
        store.max_total_bytes = size + size // 2
        second_sim.grant_steps(1)
        await snapshot_where(newer, lambda p: preview_of(p) is not None)
        assert store.evicted == 1
        assert store.total_bytes == size
        assert (await pool.request("GET", f"/tasks/{older.task_id}/preview")).status == 404
        assert (await pool.request("GET", f"/tasks/{newer.task_id}/preview")).status == 200
        for sim in pool.simulators:
            sim.set_manual_steps(False)
        for actor in actors:
            await actor.finished.wait()


async def test_a_preview_over_the_message_limit_is_dropped_and_the_connection_stays(
    tmp_path: Path,
) -> None:
    """A preview bigger than the WebSocket message limit (ComfyUI with a large preview
    size, a PNG) is dropped like one over the per-task limit: the connection stays, so
    the frames after it arrive (trio-websocket closed it with 1009, losing them, and
    every such step of the sampler cost a reconnect)."""
    async with running_daemon(tmp_path, simulator=MANUAL) as daemon:
        assert daemon.simulator is not None
        actor = await start_task(daemon)
        first = await step_until_preview(daemon, actor)
        backend = daemon.app.backend
        huge = b"\xff\xd8" + bytes(MAX_MESSAGE_BYTES)
        meta = {"prompt_id": actor.state.prompt_id, "image_type": "image/jpeg"}
        daemon.simulator.hub.send_binary(preview_with_metadata_frame(huge, meta), backend.client_id)
        small = b"\xff\xd8small"
        daemon.simulator.hub.send_binary(
            preview_with_metadata_frame(small, meta), backend.client_id
        )
        with trio.fail_after(30):  # a hang guard: on the old code the small one is lost
            await announced_preview(actor, newer_than=first["version"])
        assert (await daemon.request("GET", f"/tasks/{actor.task_id}/preview")).body == small
        assert backend.reconnects == 0
        assert backend.is_connected()
        daemon.simulator.grant_steps(100)
        await actor.finished.wait()


async def test_a_resubmitted_task_serves_no_preview_of_its_lost_attempt(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, simulator=MANUAL) as daemon:
        assert daemon.simulator is not None
        actor = await start_task(daemon)
        lost_prompt = actor.prompt_id
        first = await step_until_preview(daemon, actor)
        assert (await daemon.request("GET", first["url"])).status == 200
        daemon.simulator.restart()  # forgets its queue, as ComfyUI does: the prompt is lost
        requeued = await snapshot_where(actor, lambda payload: actor.prompt_id != lost_prompt)
        assert preview_of(requeued) is None
        # The lost attempt's image is not the task's preview any more.
        assert (await daemon.request("GET", first["url"])).status == 404
        assert daemon.app.previews.get(actor.task_id) is None

        daemon.simulator.grant_steps(1)
        second = await announced_preview(actor, newer_than=first["version"])
        response = await daemon.request("GET", second["url"])
        assert response.status == 200
        # Versions still only grow: the new image is never taken for the old one.
        assert response.headers.get("etag") == f'"preview-{daemon.app.previews.boot}-2"'
        daemon.simulator.grant_steps(100)
        await actor.finished.wait()


@pytest.mark.parametrize("config", [MANUAL, LEGACY], ids=["progress-text", "legacy-type-1"])
async def test_texts_and_legacy_previews_of_a_prompt_that_started_while_we_were_away(
    tmp_path: Path, config: SimulatorConfig
) -> None:
    # Neither names its prompt: they belong to the prompt running for us. When it
    # started while the socket was away, the reconcile after the reconnect is what
    # says it runs.
    config = dataclasses.replace(config, sampler_progress_text=True)
    async with running_daemon(tmp_path, simulator=config) as daemon, trio.open_nursery() as nursery:
        simulator = daemon.simulator
        assert simulator is not None
        backend = daemon.app.backend
        port = int(daemon.bound.comfy_url.rsplit(":", 1)[1])
        stranger = await ws_connect(nursery, port, "stranger")
        body = json.dumps(
            {"prompt": txt2img(steps=2, width=64, height=64), "client_id": "stranger"}
        )
        await http_request("POST", daemon.bound.comfy_url + "/prompt", body=body.encode())
        ours = await start_task(daemon)
        while not ours.state.submitted:  # noqa: ASYNC110 (in ComfyUI's queue)
            await trio.sleep(0.01)
        reconnects = backend.reconnects
        simulator.reject_connections(3600)  # our socket is cut, and stays away
        while backend.is_connected():
            await backend.connected_changed.wait()
        simulator.grant_steps(2)  # the stranger's prompt ends; ours starts unheard
        engine = simulator.engine
        while not (engine.running_prompt_id == ours.prompt_id and simulator.gate.parked):  # noqa: ASYNC110
            await trio.sleep(0.01)
        simulator.reject_connections(0)
        while backend.reconnects == reconnects:
            await backend.reconnected.wait()
        await snapshot_where(ours, lambda p: p.get("phase") == "running")
        # A legacy preview follows its step's `progress`: the next step's comes after it.
        simulator.grant_steps(2)
        await snapshot_where(ours, lambda p: p["progress"].get("currentValue") == 2)
        if config.preview_metadata:
            assert ours.state.text == ("3", "step 2/3")  # the sampler's
        else:
            assert ours.previews.get(ours.task_id) is not None
        simulator.grant_steps(100)
        await ours.finished.wait()
        await stranger.ws.aclose()
