"""Several daemons sharing tasks through a real redis-server (issue 14).

Daemons are real processes (fronts serve HTTP, workers take work); the simulators
run in the test (manual steps where the test needs a task to stay mid-run).
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import coredis
import trio
from coredis.response.types import StreamPendingExt

from daemon.http.client import ClientResponse, http_request, open_stream
from daemon.shared.store import SharedStore, image_key
from daemon.simulator import ComfySimulator, SimulatorConfig
from daemon.simulator.png import encode_png
from protocol import progress as pg
from protocol import task
from protocol.sse import ServerSentEvent, SSEDecoder
from tests.daemon.comfy_relay import comfy_relay
from tests.daemon.harness import read_events
from tests.daemon.process import DaemonProcess, daemon_process
from tests.daemon.redis_proxy import redis_proxy
from tests.daemon.redis_server import RedisServer, redis_server
from tests.daemon.test_faults import two_image_workflow
from tests.daemon.test_metrics import P, Scrape
from tests.daemon.test_restart import generate, sampling

SETTINGS = (
    "reconnect_initial_delay=0.05",
    "queue_poll_interval=0.05",
    "shutdown_grace=2",
    "lease_timeout=1",
    "backend_lost_after=1",
)


@asynccontextmanager
async def simulator(
    *, manual: bool, hidden: tuple[str, ...] = (), previews: bool = False
) -> AsyncIterator[ComfySimulator]:
    config = SimulatorConfig(step_time=0.01, hidden_nodes=hidden, sampler_previews=previews)
    sim = ComfySimulator(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.run, ("127.0.0.1", 0))
        sim.set_manual_steps(manual)
        yield sim
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def front(
    tmp_path: Path, name: str, redis_url: str, *extra: str
) -> AsyncIterator[DaemonProcess]:
    settings = (*SETTINGS, f"redis_url={redis_url}", "role=front", *extra)
    async with daemon_process(tmp_path / name, None, *settings) as daemon:
        yield daemon


@asynccontextmanager
async def worker(
    tmp_path: Path, name: str, redis_url: str, *comfy_urls: str, extra: tuple[str, ...] = ()
) -> AsyncIterator[DaemonProcess]:
    settings = (*SETTINGS, f"redis_url={redis_url}", "role=worker", *extra)
    if len(comfy_urls) > 1:
        settings = (*settings, f"comfy_urls={','.join(comfy_urls[1:])}")
    async with daemon_process(tmp_path / name, comfy_urls[0], *settings, worker=True) as daemon:
        yield daemon


@asynccontextmanager
async def one_worker_two_fronts(
    tmp_path: Path, *, manual: bool
) -> AsyncIterator[tuple[RedisServer, ComfySimulator, DaemonProcess, DaemonProcess]]:
    """The smallest service: redis-server, a simulator behind one worker, two fronts."""
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=manual) as sim,
        worker(tmp_path, "w", redis.url, sim.url),
        front(tmp_path, "f1", redis.url) as first,
        front(tmp_path, "f2", redis.url) as second,
    ):
        yield redis, sim, first, second


@asynccontextmanager
async def two_comfys_one_front(
    tmp_path: Path,
) -> AsyncIterator[tuple[RedisServer, ComfySimulator, ComfySimulator, DaemonProcess]]:
    """redis-server, a ComfyUI that parks its prompts (the one a worker will lose),
    another that runs them, and one front."""
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=True) as lost_sim,
        simulator(manual=False) as other_sim,
        front(tmp_path, "f", redis.url) as entry,
    ):
        yield redis, lost_sim, other_sim, entry


async def step_once_interrupted(sim: ComfySimulator) -> None:
    """Once the daemon asked ComfyUI to interrupt, let one step run: ComfyUI sees an
    interrupt at its next progress tick (the simulator has no signal for the POST
    /interrupt arriving; look)."""
    while not sim.engine.executor.interrupt_requested:  # noqa: ASYNC110
        await trio.sleep(0.01)
    sim.grant_steps(1)


def last(events: list[ServerSentEvent]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(events[-1].data)
    return data


async def history_ids(sim: ComfySimulator) -> list[str]:
    reply = await http_request("GET", f"{sim.url}/history", timeout=10)
    return list(reply.json())


async def test_a_front_that_never_saw_a_task_answers_for_it_and_serves_its_image(
    tmp_path: Path,
) -> None:
    async with one_worker_two_fronts(tmp_path, manual=False) as (
        _redis,
        _sim,
        first,
        second,
    ):
        task_id = await generate(first.url)
        events = await read_events(second.url, task_id)
        done = last(events)
        assert done["status"] == "completed", done
        status = await http_request("GET", f"{second.url}/tasks/{task_id}", timeout=10)
        assert status.status == 200
        assert status.json()["status"] == "completed"
        assert status.json()["version"] == int(events[-1].id or 0)
        # A reader that has the end is told so (204), on any front, and not kept open.
        for daemon in (second, first):
            url = f"{daemon.url}/progress/{task_id}"
            headers = (("Last-Event-ID", events[-1].id or ""),)
            async with open_stream("GET", url, headers=headers) as resumed:
                assert resumed.status == 204
        for daemon in (second, first):
            image = await http_request("GET", daemon.url + done["result"]["imageUrl"], timeout=10)
            assert image.status == 200
            assert image.body.startswith(b"\x89PNG")
        unknown = await http_request("GET", f"{second.url}/tasks/no-such-task", timeout=10)
        assert unknown.status == 404


async def test_a_stream_whose_front_died_resumes_on_another_with_last_event_id(
    tmp_path: Path,
) -> None:
    async with one_worker_two_fronts(tmp_path, manual=True) as (
        _redis,
        sim,
        doomed,
        survivor,
    ):
        task_id = await generate(doomed.url)
        seen = await read_events(doomed.url, task_id, stop_after=sampling)
        doomed.kill()
        assert await doomed.wait() == -9
        last_id = int(seen[-1].id or 0)
        following = trio.Event()
        resumed: list[ServerSentEvent] = []
        async with trio.open_nursery() as nursery:

            async def follow() -> None:
                resumed.extend(
                    await read_events(
                        survivor.url, task_id, last_event_id=last_id, first_event=following
                    )
                )

            nursery.start_soon(follow)
            await following.wait()
            sim.grant_steps(1000)
        assert all(int(e.id or 0) > last_id for e in resumed)  # nothing seen twice
        assert last(resumed)["status"] == "completed"


async def killed_mid_task(
    tmp_path: Path, name: str, redis_url: str, comfy_url: str, entry_url: str
) -> tuple[str, list[ServerSentEvent]]:
    """A new task (POSTed to `entry_url`) whose worker is killed -9 once it samples:
    the task's id and the events seen until then."""
    async with worker(tmp_path, name, redis_url, comfy_url) as doomed:
        task_id = await generate(entry_url)
        seen = await read_events(entry_url, task_id, stop_after=sampling)
        doomed.kill()
        assert await doomed.wait() == -9
    return task_id, seen


async def test_kill_9_of_a_worker_mid_task_another_resubmits_it_and_completes(
    tmp_path: Path,
) -> None:
    async with two_comfys_one_front(tmp_path) as (redis, lost_sim, other_sim, entry):
        async with worker(tmp_path, "w1", redis.url, lost_sim.url) as doomed:
            task_id = await generate(entry.url)
            seen = await read_events(entry.url, task_id, stop_after=sampling)
            async with worker(tmp_path, "w2", redis.url, other_sim.url) as replacement:
                doomed.kill()
                assert await doomed.wait() == -9
                rest = await read_events(entry.url, task_id, last_event_id=int(seen[-1].id or 0))
        # The other worker cannot reach the first ComfyUI: it resubmits the task
        # under a new prompt. (Its `requeued` snapshot is not always in the stream:
        # the worker's mirror and the front both pass on the newest snapshot, and
        # a quick resubmission replaces it.)
        assert b"resubmitting as cp-" in replacement.output, replacement.log()
        assert last(rest)["status"] == "completed"
        assert len(await history_ids(other_sim)) == 1


async def test_kill_9_of_a_worker_another_on_the_same_comfyui_reattaches_to_the_prompt(
    tmp_path: Path,
) -> None:
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=True) as sim,
        front(tmp_path, "f", redis.url) as entry,
    ):
        task_id, seen = await killed_mid_task(tmp_path, "w1", redis.url, sim.url, entry.url)
        sim.grant_steps(1000)  # ComfyUI finishes the prompt while no worker follows it
        async with worker(tmp_path, "w2", redis.url, sim.url):
            rest = await read_events(entry.url, task_id, last_event_id=int(seen[-1].id or 0))
        assert last(rest)["status"] == "completed"
        assert len(await history_ids(sim)) == 1  # reconciled through /history, not resubmitted


async def test_kill_9_of_a_worker_with_resubmission_off_ends_the_task_lost(
    tmp_path: Path,
) -> None:
    async with two_comfys_one_front(tmp_path) as (redis, lost_sim, other_sim, entry):
        off = ("resubmit_lost=false",)
        async with worker(tmp_path, "w1", redis.url, lost_sim.url, extra=off) as doomed:
            task_id = await generate(entry.url)
            seen = await read_events(entry.url, task_id, stop_after=sampling)
            async with worker(tmp_path, "w2", redis.url, other_sim.url, extra=off):
                doomed.kill()
                assert await doomed.wait() == -9
                rest = await read_events(entry.url, task_id, last_event_id=int(seen[-1].id or 0))
        assert last(rest)["status"] == "error"
        assert last(rest)["error"]["code"] == "lost"
        assert await history_ids(other_sim) == []


async def test_cancel_on_any_front_reaches_the_worker_that_holds_the_task(
    tmp_path: Path,
) -> None:
    async with one_worker_two_fronts(tmp_path, manual=True) as (
        _redis,
        sim,
        first,
        second,
    ):
        task_id = await generate(first.url)
        seen = await read_events(first.url, task_id, stop_after=sampling)
        cancel = await http_request("DELETE", f"{second.url}/tasks/{task_id}", timeout=10)
        assert cancel.status == 202
        await step_once_interrupted(sim)
        rest = await read_events(first.url, task_id, last_event_id=int(seen[-1].id or 0))
        assert last(rest)["status"] == "error"
        assert last(rest)["error"]["code"] == "cancelled"
        again = await http_request("DELETE", f"{second.url}/tasks/{task_id}", timeout=10)
        assert again.status == 200
        assert again.json()["cancelled"] is False


async def test_a_cancel_after_the_stream_ended_answers_ended_before_the_record_says_so(
    tmp_path: Path,
) -> None:
    """A worker appends a task's end to its stream, then saves its record: in between,
    a DELETE on a front whose viewers already saw the end must not answer 'cancelling'."""
    async with (
        redis_server(tmp_path / "redis") as redis,
        front(tmp_path, "f", redis.url) as entry,
    ):
        task_id = await generate(entry.url)  # no worker: its record stays `queued`
        client = coredis.Redis.from_url(redis.url)
        async with client:
            store = SharedStore(client, "comfy-progress", retention=60)
            shared, latest = await store.load(task_id), await store.latest(task_id)
            assert shared is not None
            assert latest is not None
            spec = task.spec_from_json(shared.record.spec)
            state = replace(task.new_task(spec, shared.record.created_at), version=latest.version)
            state, effects = task.apply(state, task.Failed("comfy_error", "it broke"), 0.0)
            [end] = [e.message for e in effects if isinstance(e, task.Publish)]
            await store.append(task_id, end)  # the worker's record save has not come yet
        cancel = await http_request("DELETE", f"{entry.url}/tasks/{task_id}", timeout=10)
        assert cancel.status == 200
        assert cancel.json()["cancelled"] is False
        assert cancel.json()["status"] == "error"


async def scrape(daemon_url: str) -> Scrape:
    reply = await http_request("GET", f"{daemon_url}/metrics", timeout=10)
    assert reply.status == 200
    return Scrape(reply.body.decode())


def ends_counted(scraped: Scrape, outcome: str, code: str | None = None) -> float:
    """Task ends this daemon counted with `outcome` (and error `code`): both metrics agree."""
    ends = scraped.value(P("generation_duration_seconds_count"), outcome=outcome)
    if code is not None:
        assert scraped.value(P("task_errors_total"), code=code) == ends, scraped.text
    return ends


async def test_a_task_cancelled_before_any_worker_took_it_ends_at_once_counted_by_its_front(
    tmp_path: Path,
) -> None:
    async with (
        redis_server(tmp_path / "redis") as redis,
        front(tmp_path, "f", redis.url) as entry,
    ):
        task_id = await generate(entry.url)  # no worker yet
        behind = await generate(entry.url)
        status = (await http_request("GET", f"{entry.url}/tasks/{behind}", timeout=10)).json()
        assert status["queue"] == {"position": 2, "ahead": 1}  # the service's queue
        assert status["progress"]["currentStep"] == "Queued (1 ahead)"  # and its step says so
        cancel = await http_request("DELETE", f"{entry.url}/tasks/{task_id}", timeout=10)
        assert cancel.status == 202
        events = await read_events(entry.url, task_id)
        assert last(events)["error"]["code"] == "cancelled"
        # The front ended it: its metrics count the end, as a daemon alone counts its own.
        assert ends_counted(await scrape(entry.url), "cancelled", "cancelled") == 1
        async with (
            simulator(manual=False) as sim,
            worker(tmp_path, "w", redis.url, sim.url) as work,
        ):
            # The worker skips it and runs the two others.
            later = await generate(entry.url)
            for waited in (behind, later):
                assert last(await read_events(entry.url, waited))["status"] == "completed"
            assert len(await history_ids(sim)) == 2
            at_worker = await scrape(work.url)
            assert ends_counted(at_worker, "cancelled", "cancelled") == 0  # counted once
            assert ends_counted(at_worker, "completed") == 2
        at_front = await scrape(entry.url)
        assert ends_counted(at_front, "cancelled", "cancelled") == 1
        assert ends_counted(at_front, "completed") == 0  # the worker ran them


async def test_get_task_gives_the_place_in_line_it_has_now_not_the_one_last_streamed(
    tmp_path: Path,
) -> None:
    """GET /tasks/{id} of a task waiting in the service's queue reads its place from
    Redis each time: a place a front streamed earlier goes stale once the front stops
    watching, and a task a worker gave back (requeued) waits in line too."""
    async with (
        redis_server(tmp_path / "redis") as redis,
        front(tmp_path, "f2", redis.url) as entry,
    ):
        async with front(tmp_path, "f1", redis.url) as watched_on:
            first, second, third = [await generate(entry.url) for _ in range(3)]
            async with open_stream("GET", f"{watched_on.url}/progress/{third}") as stream:
                decoder = SSEDecoder()
                placed = False
                async for chunk in stream.chunks:
                    for event in decoder.feed(chunk):
                        placed = placed or json.loads(event.data)["queue"] is not None
                    if placed:
                        break
        # The front that published the place is gone; two tasks ahead leave the line.
        for task_id in (first, second):
            cancel = await http_request("DELETE", f"{entry.url}/tasks/{task_id}", timeout=10)
            assert cancel.status == 202
        status = (await http_request("GET", f"{entry.url}/tasks/{third}", timeout=10)).json()
        assert status["queue"] == {"position": 1, "ahead": 0}
        assert status["progress"]["currentStep"] == pg.queued_step(0)
        # A task a worker gave back: requeued, no place in its snapshot.
        given_back = await generate(entry.url)
        client: coredis.Redis[bytes] = coredis.Redis.from_url(redis.url)
        async with client:
            store = SharedStore(client, "comfy-progress", retention=60)
            shared, latest = await store.load(given_back), await store.latest(given_back)
            assert shared is not None
            assert latest is not None
            spec = task.spec_from_json(shared.record.spec)
            state = replace(task.new_task(spec, shared.record.created_at), version=latest.version)
            state, effects = task.apply(state, task.Requeued("p2", "ComfyUI went away"), 0.0)
            [requeued] = [e.message for e in effects if isinstance(e, task.Publish)]
            await store.append(given_back, requeued)
        status = (await http_request("GET", f"{entry.url}/tasks/{given_back}", timeout=10)).json()
        assert status["phase"] == "requeued"
        assert status["queue"] == {"position": 2, "ahead": 1}
        assert status["progress"]["currentStep"] == pg.requeued_step(1)


def files_in(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir()] if folder.exists() else []


async def stored_images(redis_url: str, folder: Path) -> list[str]:
    """The images a worker keeps: its files, and their copies in Redis."""
    client = coredis.Redis.from_url(redis_url)
    async with client:
        keys = [key async for key in client.scan_iter(match="comfy-progress:image:*")]
    return [*files_in(folder), *(key.decode() for key in keys)]


async def until_no_images(redis_url: str, folder: Path) -> None:
    """Across a process boundary there is no signal to wait on: ask until they are gone."""
    while True:
        if not await stored_images(redis_url, folder):
            return
        await trio.sleep(0.05)


async def test_a_cancel_while_a_worker_fetches_the_images_ends_the_task_at_once(
    tmp_path: Path,
) -> None:
    """The front's DELETE reaches the worker's actor through its inbox: the task ends
    `cancelled` while its second image is still held, and the first goes, file and
    Redis copy."""
    workflows = f"workflows_dir={two_image_workflow(tmp_path)}"
    images = tmp_path / "w" / "images"
    with trio.fail_after(60):  # a hang guard
        async with redis_server(tmp_path / "redis") as redis, simulator(manual=False) as sim:
            assert sim.port is not None
            async with (
                comfy_relay(sim.port) as relay,
                front(tmp_path, "f", redis.url, workflows) as entry,
                worker(tmp_path, "w", redis.url, relay.url, extra=(workflows,)),
            ):
                relay.hold_answers(b"GET /view?filename=ComfyUI_00002_")
                status, accepted = await post(entry.url, {"prompt": "a fox", "workflow": "two"})
                assert status == 202, accepted
                task_id = accepted["taskId"]
                await relay.holding.wait()  # the first image is stored, the second held
                assert len(await stored_images(redis.url, images)) == 2  # its file and its copy
                cancel = await http_request("DELETE", f"{entry.url}/tasks/{task_id}", timeout=10)
                assert cancel.status == 202
                events = await read_events(entry.url, task_id)  # with the image still held
                state = await http_request("GET", f"{entry.url}/tasks/{task_id}", timeout=10)
                await until_no_images(redis.url, images)
                relay.release()
    assert last(events)["status"] == "error"
    assert last(events)["error"]["code"] == "cancelled"
    assert state.json()["error"]["code"] == "cancelled"


def image_key_of(image_url: str) -> str:
    return image_key("comfy-progress", image_url.rsplit("/", 1)[1])


async def until_expired_in_redis(redis_url: str, image_url: str) -> None:
    """Across a process boundary there is no signal to wait on: ask until it is gone."""
    key = image_key_of(image_url)
    client = coredis.Redis.from_url(redis_url)
    async with client:
        while True:
            if not await client.exists([key]):
                return
            await trio.sleep(0.05)


PICTURE = encode_png(16, 16, [bytes((10, 200, 30)) * 16] * 16)


async def upload_picture(url: str) -> ClientResponse:
    """POST /upload of a small PNG to the front at `url`."""
    return await http_request(
        "POST",
        f"{url}/upload",
        headers=(("Content-Type", "image/png"),),
        body=PICTURE,
        timeout=10,
    )


def inpaint_request(image_url: str) -> dict[str, Any]:
    """A /generate body that needs `image_url` as its source."""
    return {
        "prompt": "a hat",
        "workflow": "inpaint",
        "image": image_url,
        "inpaintArea": {"x": 0, "y": 0, "width": 8, "height": 8},
    }


async def test_a_task_whose_source_image_redis_lost_while_it_waited_ends_at_once_saying_so(
    tmp_path: Path,
) -> None:
    """Not after backend_wait_timeout as if ComfyUI had refused the prompt. (Redis drops
    it: evicted under maxmemory, or deleted by an operator; it no longer expires.)"""
    with trio.fail_after(30):  # backend_wait_timeout is 120 s
        async with (
            redis_server(tmp_path / "redis") as redis,
            simulator(manual=False) as sim,
            front(tmp_path, "f", redis.url) as entry,
        ):
            upload = await upload_picture(entry.url)
            assert upload.status == 201
            image_url = upload.json()["imageUrl"]
            status, reply = await post(entry.url, inpaint_request(image_url))
            assert status == 202, reply
            client = coredis.Redis.from_url(redis.url)
            async with client:  # no worker has taken it yet
                assert await client.delete([image_key_of(image_url)]) == 1
            async with worker(tmp_path, "w", redis.url, sim.url):
                events = await read_events(entry.url, reply["taskId"])
            assert await history_ids(sim) == []
    error = last(events)["error"]
    assert error["code"] == "source_unavailable"
    assert image_url in error["details"]


async def test_a_source_image_outlives_image_retention_while_its_task_waits(
    tmp_path: Path,
) -> None:
    """Queued with a task, the source's copy in Redis lives as long as the task can
    wait: a task still in line when image_retention is over runs with it."""
    with trio.fail_after(30):
        async with (
            redis_server(tmp_path / "redis") as redis,
            simulator(manual=False) as sim,
            front(tmp_path, "f", redis.url, "image_retention=1") as entry,
        ):
            source = await upload_picture(entry.url)
            other = await upload_picture(entry.url)  # no task names it
            assert source.status == other.status == 201
            image_url = source.json()["imageUrl"]
            status, reply = await post(entry.url, inpaint_request(image_url))
            assert status == 202, reply
            # image_retention is over for both uploads once the later one is gone.
            await until_expired_in_redis(redis.url, other.json()["imageUrl"])
            async with worker(tmp_path, "w", redis.url, sim.url, extra=("image_retention=1",)):
                events = await read_events(entry.url, reply["taskId"])
            assert len(await history_ids(sim)) == 1
    assert last(events)["status"] == "completed", last(events)


async def test_an_upload_redis_cannot_hold_is_refused_503_with_the_reason(
    tmp_path: Path,
) -> None:
    """Redis keeps every image in memory: once it is full, an upload says so (503),
    and leaves no file behind that only this front would serve."""
    with trio.fail_after(30):
        async with (
            redis_server(tmp_path / "redis") as redis,
            front(tmp_path, "f", redis.url) as entry,
        ):
            client = coredis.Redis.from_url(redis.url)
            async with client:
                await client.config_set({"maxmemory": "1", "maxmemory-policy": "noeviction"})
            refused = await upload_picture(entry.url)
    assert refused.status == 503, refused.body
    assert "OOM" in refused.json()["error"]["message"]
    assert refused.headers.get("retry-after") is not None
    assert files_in(tmp_path / "f" / "images") == []


async def test_a_source_image_unreadable_while_redis_is_down_is_503_not_400(
    tmp_path: Path,
) -> None:
    """The image is there, Redis just does not answer: try again, not "no such image"."""
    with trio.fail_after(30):
        async with (
            redis_server(tmp_path / "redis") as redis,
            front(tmp_path, "f1", redis.url) as first,
            front(tmp_path, "f2", redis.url) as second,
        ):
            upload = await upload_picture(first.url)
            assert upload.status == 201
            await redis.stop()
            # Its copy is in Redis only.
            status, reply = await post(second.url, inpaint_request(upload.json()["imageUrl"]))
    assert status == 503, reply
    assert "Redis" in reply["error"]["message"]


async def test_an_image_only_redis_holds_is_503_while_redis_is_down_not_404(
    tmp_path: Path,
) -> None:
    """Another front's upload: this one serves it from Redis, and while Redis does not
    answer says "try again", not "no such image"."""
    with trio.fail_after(30):
        async with (
            redis_server(tmp_path / "redis") as redis,
            front(tmp_path, "f1", redis.url) as first,
            front(tmp_path, "f2", redis.url) as second,
        ):
            upload = await upload_picture(first.url)
            assert upload.status == 201
            await redis.stop()
            image = await http_request("GET", second.url + upload.json()["imageUrl"], timeout=10)
    assert image.status == 503, image.body
    assert image.headers.get("retry-after") == "5"
    assert "Redis" in image.json()["error"]["message"]


async def test_a_task_read_while_redis_is_down_is_503_with_retry_after(tmp_path: Path) -> None:
    """Reading, streaming, cancelling or previewing a task the front must ask Redis
    about: "try again" (503, Retry-After), as POST /generate says, not a 500."""
    with trio.fail_after(30):
        async with (
            redis_server(tmp_path / "redis") as redis,
            front(tmp_path, "f", redis.url) as entry,
        ):
            task_id = await generate(entry.url)
            await redis.stop()
            replies = [
                await http_request(method, f"{entry.url}{path}", timeout=10)
                for method, path in [
                    ("GET", f"/tasks/{task_id}"),
                    ("GET", f"/progress/{task_id}"),
                    ("DELETE", f"/tasks/{task_id}"),
                    ("GET", f"/tasks/{task_id}/preview"),
                ]
            ]
    for reply in replies:
        assert reply.status == 503, reply.body
        assert reply.headers.get("retry-after") == "5"
        assert "unreachable" in reply.json()["error"]["message"]


async def published_workers(redis_url: str) -> int:
    client = coredis.Redis.from_url(redis_url)
    async with client:
        return len([key async for key in client.scan_iter(match="comfy-progress:caps:*")])


async def until_published(redis_url: str, workers: int) -> None:
    """Across a process boundary there is no signal to wait on: ask until they are there."""
    while True:
        if await published_workers(redis_url) >= workers:
            return
        await trio.sleep(0.05)


async def post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    response = await http_request(
        "POST",
        f"{url}/generate",
        headers=[("Content-Type", "application/json")],
        body=json.dumps(body).encode(),
        timeout=10,
    )
    return response.status, response.json()


async def test_a_front_refuses_what_no_worker_can_run_and_an_upload_reaches_any_worker(
    tmp_path: Path,
) -> None:
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=False, hidden=("VAEEncodeForInpaint",)) as plain_sim,
        simulator(manual=False) as full_sim,
        front(tmp_path, "f1", redis.url) as first,
        front(tmp_path, "f2", redis.url) as second,
    ):
        upload = await upload_picture(first.url)
        assert upload.status == 201
        inpaint = inpaint_request(upload.json()["imageUrl"])
        async with worker(tmp_path, "w1", redis.url, plain_sim.url):
            await until_published(redis.url, 1)
            service = (await http_request("GET", f"{second.url}/backends", timeout=10)).json()
            [(name, reading)] = service["service"]["backends"].items()
            assert name.endswith(f"/{plain_sim.url}")  # daemon id / backend
            assert reading["missingNodeClasses"] == ["VAEEncodeForInpaint"]
            status, reply = await post(second.url, inpaint)
            assert status == 422, reply
            assert "node class VAEEncodeForInpaint" in reply["error"]["message"]
            async with worker(tmp_path, "w2", redis.url, full_sim.url):
                await until_published(redis.url, 2)
                status, reply = await post(second.url, inpaint)  # the upload went to f1
                assert status == 202, reply
                events = await read_events(first.url, reply["taskId"])
        assert last(events)["status"] == "completed"
        assert len(await history_ids(full_sim)) == 1
        assert await history_ids(plain_sim) == []


async def test_an_idempotency_key_retried_at_another_front_is_the_same_task(
    tmp_path: Path,
) -> None:
    async with one_worker_two_fronts(tmp_path, manual=False) as (
        _redis,
        sim,
        first,
        second,
    ):
        body = json.dumps({"prompt": "a red fox", "seed": 7}).encode()
        headers = [("Content-Type", "application/json"), ("Idempotency-Key", "retry-1")]
        replies: list[Any] = []
        async with trio.open_nursery() as nursery:  # twins at both fronts at once

            async def send(url: str) -> None:
                replies.append(
                    await http_request(
                        "POST", f"{url}/generate", headers=headers, body=body, timeout=10
                    )
                )

            for daemon in (first, second, first, second):
                nursery.start_soon(send, daemon.url)
        assert [r.status for r in replies] == [202] * 4
        assert len({r.json()["taskId"] for r in replies}) == 1
        assert sum(r.headers.get("idempotent-replayed") == "true" for r in replies) == 3
        other = json.dumps({"prompt": "a blue fox", "seed": 7}).encode()
        misused = await http_request(
            "POST", f"{second.url}/generate", headers=headers, body=other, timeout=10
        )
        assert misused.status == 422
        task_id = replies[0].json()["taskId"]
        assert task_id not in misused.body.decode(), misused.body  # names no one's task
        assert last(await read_events(second.url, task_id))["status"] == "completed"
        assert len(await history_ids(sim)) == 1


def has_preview(event: ServerSentEvent) -> bool:
    return "preview" in json.loads(event.data)["progress"]


async def until_first_preview(
    url: str, task_id: str, sim: ComfySimulator
) -> tuple[list[ServerSentEvent], str]:
    """Follow the task on the front at `url` and grant `sim` (manual, with previews) one
    sampler step once the stream is open: its events up to the one announcing that
    step's preview, and the preview's path."""
    following = trio.Event()
    async with trio.open_nursery() as nursery:

        async def grant_once_following() -> None:
            await following.wait()
            sim.grant_steps(1)  # one sampler step: one preview

        nursery.start_soon(grant_once_following)
        seen = await read_events(url, task_id, first_event=following, stop_after=has_preview)
    path: str = json.loads(seen[-1].data)["progress"]["preview"]["url"]
    return seen, path


async def test_a_running_task_s_preview_is_served_by_every_front(tmp_path: Path) -> None:
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=True, previews=True) as sim,
        worker(tmp_path, "w", redis.url, sim.url),
        front(tmp_path, "f1", redis.url) as first,
        front(tmp_path, "f2", redis.url) as second,
    ):
        task_id = await generate(first.url)
        _, url = await until_first_preview(first.url, task_id, sim)
        preview = await http_request("GET", second.url + url, timeout=10)
        assert preview.status == 200
        assert preview.headers.get("content-type") == "image/jpeg"
        assert preview.body.startswith(b"\xff\xd8")
        etag = preview.headers.get("etag") or ""
        again = await http_request(
            "GET", second.url + url, headers=[("If-None-Match", etag)], timeout=10
        )
        assert again.status == 304
        sim.grant_steps(1000)
        done = await read_events(second.url, task_id)
        assert last(done)["status"] == "completed"
        gone = await http_request("GET", second.url + url, timeout=10)
        assert gone.status == 404


async def test_a_dead_worker_s_preview_goes_when_the_task_ends_on_another(
    tmp_path: Path,
) -> None:
    """The worker that put the task's preview in Redis dies; another runs the task to
    its end without sending a preview of its own. The preview route answers 404 for
    the ended task, not the dead worker's last preview (kept until it expired: only
    the worker that wrote a preview used to drop it)."""
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=True, previews=True) as lost_sim,
        simulator(manual=False) as other_sim,
        front(tmp_path, "f", redis.url) as entry,
        worker(tmp_path, "w1", redis.url, lost_sim.url) as doomed,
    ):
        task_id = await generate(entry.url)
        seen, preview_path = await until_first_preview(entry.url, task_id, lost_sim)
        url = entry.url + preview_path
        assert (await http_request("GET", url, timeout=10)).status == 200
        async with worker(tmp_path, "w2", redis.url, other_sim.url):
            doomed.kill()
            assert await doomed.wait() == -9
            rest = await read_events(entry.url, task_id, last_event_id=int(seen[-1].id or 0))
            assert last(rest)["status"] == "completed"
            gone = await http_request("GET", url, timeout=10)
            assert gone.status == 404


def requeued(event: ServerSentEvent) -> bool:
    return bool(json.loads(event.data).get("phase") == "requeued")


async def test_a_task_resubmitted_by_its_worker_serves_no_preview_of_the_lost_attempt(
    tmp_path: Path,
) -> None:
    """The worker's ComfyUI restarts after it sent a preview: the worker resubmits
    the task, whose snapshots announce no preview until the new attempt sends one.
    No front serves the lost attempt's image meanwhile (it stayed in Redis)."""
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=True, previews=True) as sim,
        worker(tmp_path, "w", redis.url, sim.url),
        front(tmp_path, "f", redis.url) as entry,
    ):
        task_id = await generate(entry.url)
        seen, preview_path = await until_first_preview(entry.url, task_id, sim)
        url = entry.url + preview_path
        assert (await http_request("GET", url, timeout=10)).status == 200
        sim.restart()  # forgets its queue, as ComfyUI does: the prompt is lost
        again = await read_events(
            entry.url, task_id, last_event_id=int(seen[-1].id or 0), stop_after=requeued
        )
        assert not has_preview(again[-1])
        assert (await http_request("GET", url, timeout=10)).status == 404
        sim.grant_steps(1000)
        done = await read_events(entry.url, task_id, last_event_id=int(again[-1].id or 0))
        assert last(done)["status"] == "completed"


async def test_a_live_worker_keeps_its_lease_however_long_its_task_runs(tmp_path: Path) -> None:
    # The holder refreshes every 0.125 s; the idle worker claims a lease idle for 2 s:
    # only a stall of the holder longer than that would (rightly) move the task. The
    # holder's ComfyUI takes one prompt at a time, so it reads (and XAUTOCLAIMs, which
    # would renew its own lease too) nothing while it runs this one: only its refreshes
    # keep the lease.
    holder = ("lease_timeout=0.5", "backend_max_pending=1")
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=True) as busy_sim,
        simulator(manual=False) as idle_sim,
        front(tmp_path, "f", redis.url) as entry,
        worker(tmp_path, "w1", redis.url, busy_sim.url, extra=holder),
    ):
        task_id = await generate(entry.url)
        seen = await read_events(entry.url, task_id, stop_after=sampling)
        client = coredis.Redis.from_url(redis.url)
        async with (
            client,
            worker(tmp_path, "w2", redis.url, idle_sim.url, extra=("lease_timeout=2",)),
        ):
            [lease] = await leases(client)
            # 20 refreshes, each after the holder's lease_timeout / 4: past the idle
            # worker's lease, which it would have claimed had the holder not refreshed.
            held = await leases_after_refreshes(client, lease, 20)
            assert [(p.identifier, p.consumer) for p in held] == [
                (lease.identifier, lease.consumer)
            ]
            busy_sim.grant_steps(1000)
            rest = await read_events(entry.url, task_id, last_event_id=int(seen[-1].id or 0))
        phases = {json.loads(e.data).get("phase") for e in rest}
        assert "requeued" not in phases
        assert last(rest)["status"] == "completed"
        assert await history_ids(idle_sim) == []
        assert len(await history_ids(busy_sim)) == 1


QUEUE = "comfy-progress:queue"


async def leases(client: coredis.Redis[bytes]) -> list[StreamPendingExt]:
    """The shared queue's pending entries: each a worker's lease on a task."""
    pending = await client.xpending(QUEUE, "workers", "-", "+", 100)
    assert isinstance(pending, tuple)
    return [p for p in pending if isinstance(p, StreamPendingExt)]


async def leases_after_refreshes(
    client: coredis.Redis[bytes], lease: StreamPendingExt, refreshes: int
) -> list[StreamPendingExt]:
    """The queue's leases once the holder of `lease` was seen refreshing it `refreshes`
    times (each refresh resets its idle time; a refresh missed between two looks only
    makes this wait longer), or as soon as that lease is gone or changed hands."""
    seen = 0
    idle = lease.idle
    while True:
        pending = await leases(client)
        if [(p.identifier, p.consumer) for p in pending] != [(lease.identifier, lease.consumer)]:
            return pending
        if pending[0].idle < idle:
            seen += 1
            if seen >= refreshes:
                return pending
        idle = pending[0].idle
        await trio.sleep(0.02)


async def test_a_worker_that_outlived_its_own_lease_keeps_the_task(tmp_path: Path) -> None:
    """A worker slower than its lease (load, a Redis restart) claims its own entry back
    with XAUTOCLAIM: it must keep holding it, not acknowledge it as someone else's."""
    long_lease = ("lease_timeout=600",)  # its own refresh stays out of the way
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=True) as sim,
        front(tmp_path, "f", redis.url) as entry,
        worker(tmp_path, "w", redis.url, sim.url, extra=long_lease),
    ):
        task_id = await generate(entry.url)
        seen = await read_events(entry.url, task_id, stop_after=sampling)
        client = coredis.Redis.from_url(redis.url)
        async with client:
            [lease] = await leases(client)
            # Idle past the lease, still the worker's (as after a stall).
            await client.xclaim(
                QUEUE, "workers", lease.consumer, 0, [lease.identifier], idle=700_000, justid=True
            )
            while True:  # until its next XAUTOCLAIM took it (or dropped it)
                pending = await leases(client)
                if not pending or pending[0].delivered > lease.delivered:
                    break
                await trio.sleep(0.05)
            assert [(p.identifier, p.consumer) for p in pending] == [
                (lease.identifier, lease.consumer)
            ]
        sim.grant_steps(1000)
        rest = await read_events(entry.url, task_id, last_event_id=int(seen[-1].id or 0))
        assert last(rest)["status"] == "completed"


async def test_a_worker_stopped_with_sigterm_hands_its_task_over_at_once(tmp_path: Path) -> None:
    long_lease = ("lease_timeout=600",)  # a claim after the lease would outlast the test
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=True) as stopped_sim,
        simulator(manual=False) as other_sim,
        front(tmp_path, "f", redis.url) as entry,
    ):
        async with worker(tmp_path, "w1", redis.url, stopped_sim.url, extra=long_lease) as first:
            task_id = await generate(entry.url)
            seen = await read_events(entry.url, task_id, stop_after=sampling)
            async with worker(tmp_path, "w2", redis.url, other_sim.url, extra=long_lease):
                first.terminate()
                assert await first.wait() == 0
                rest = await read_events(entry.url, task_id, last_event_id=int(seen[-1].id or 0))
        assert last(rest)["status"] == "completed"
        assert len(await history_ids(other_sim)) == 1


async def test_a_cancel_while_the_holder_is_dead_reaches_the_worker_that_claims_it(
    tmp_path: Path,
) -> None:
    async with two_comfys_one_front(tmp_path) as (redis, lost_sim, other_sim, entry):
        async with worker(tmp_path, "w1", redis.url, lost_sim.url) as doomed:
            task_id = await generate(entry.url)
            seen = await read_events(entry.url, task_id, stop_after=sampling)
            doomed.kill()
            assert await doomed.wait() == -9
        cancel = await http_request("DELETE", f"{entry.url}/tasks/{task_id}", timeout=10)
        assert cancel.status == 202  # its holder is gone: the claimer gets the cancel
        async with worker(tmp_path, "w2", redis.url, other_sim.url):
            rest = await read_events(entry.url, task_id, last_event_id=int(seen[-1].id or 0))
        assert last(rest)["error"]["code"] == "cancelled"
        assert await history_ids(other_sim) == []


async def test_a_cancel_that_reached_no_inbox_is_found_by_its_key(tmp_path: Path) -> None:
    """A front that read the record before the worker named itself (and read it
    again too early) leaves only the cancel key: the worker reads the keys of
    the tasks it runs with every lease refresh, and cancels."""
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=True) as sim,
        front(tmp_path, "f", redis.url) as entry,
        worker(tmp_path, "w", redis.url, sim.url),
    ):
        task_id = await generate(entry.url)
        seen = await read_events(entry.url, task_id, stop_after=sampling)
        client = coredis.Redis.from_url(redis.url)
        async with client:
            # What such a front leaves behind: the key, and no message in any inbox.
            await client.set(f"comfy-progress:cancel:{task_id}", b"1", ex=60)
        with trio.fail_after(30):
            await step_once_interrupted(sim)
        rest = await read_events(entry.url, task_id, last_event_id=int(seen[-1].id or 0))
        assert last(rest)["error"]["code"] == "cancelled"


async def test_a_cancel_asked_before_the_claim_reaches_no_comfyui_however_slow_redis_is(
    tmp_path: Path,
) -> None:
    """The claimer checks for a cancel before its actor runs: while Redis is slow to
    answer that check, the claimed task must not be resubmitted to the claimer's ComfyUI."""
    async with two_comfys_one_front(tmp_path) as (redis, lost_sim, other_sim, entry):
        async with worker(tmp_path, "w1", redis.url, lost_sim.url) as doomed:
            task_id = await generate(entry.url)
            seen = await read_events(entry.url, task_id, stop_after=sampling)
            doomed.kill()
            assert await doomed.wait() == -9
        cancel = await http_request("DELETE", f"{entry.url}/tasks/{task_id}", timeout=10)
        assert cancel.status == 202
        cancel_key = f"comfy-progress:cancel:{task_id}".encode()

        async def until_a_prompt_arrives() -> None:
            # Hold the check until the claimer's ComfyUI got a prompt; one that never
            # comes (the fixed daemon) is waited for a while, then the check goes on.
            with trio.move_on_after(3):
                while other_sim.engine.number == 0:  # noqa: ASYNC110
                    await trio.sleep(0.01)

        async with (
            redis_proxy(redis.port, lambda data: cancel_key in data, until_a_prompt_arrives) as url,
            worker(tmp_path, "w2", url, other_sim.url),
        ):
            rest = await read_events(entry.url, task_id, last_event_id=int(seen[-1].id or 0))
        assert last(rest)["error"]["code"] == "cancelled"
        assert await history_ids(other_sim) == []


def queue_of(event: ServerSentEvent) -> Any:
    return json.loads(event.data).get("queue")


async def test_a_waiting_task_s_stream_shows_its_place_in_the_service_s_queue(
    tmp_path: Path,
) -> None:
    async with (
        redis_server(tmp_path / "redis") as redis,
        front(tmp_path, "f1", redis.url) as first,
        front(tmp_path, "f2", redis.url) as second,
    ):
        ahead = [await generate(first.url) for _ in range(2)]  # no worker yet
        task_id = await generate(second.url)
        events = await read_events(first.url, task_id, stop_after=lambda e: queue_of(e) is not None)
        assert queue_of(events[-1]) == {"position": 3, "ahead": 2}
        cancel = await http_request("DELETE", f"{second.url}/tasks/{ahead[0]}", timeout=10)
        assert cancel.status == 202
        events = await read_events(
            second.url,
            task_id,
            last_event_id=int(events[-1].id or 0),
            stop_after=lambda e: queue_of(e) == {"position": 2, "ahead": 1},
        )
        ids = [int(e.id or 0) for e in events]
        assert ids == sorted(set(ids))
        async with simulator(manual=False) as sim, worker(tmp_path, "w", redis.url, sim.url):
            done = await read_events(first.url, task_id, last_event_id=ids[-1])
            assert last(done)["status"] == "completed"
            assert len(await history_ids(sim)) == 2


async def test_max_queued_tasks_counts_the_whole_service_s_queue(tmp_path: Path) -> None:
    async with (
        redis_server(tmp_path / "redis") as redis,
        front(tmp_path, "f1", redis.url, "max_queued_tasks=2") as first,
        front(tmp_path, "f2", redis.url, "max_queued_tasks=2") as second,
    ):
        await generate(first.url)
        await generate(second.url)
        refused = await http_request(
            "POST",
            f"{first.url}/generate",
            headers=[("Content-Type", "application/json")],
            body=json.dumps({"prompt": "a third fox"}).encode(),
            timeout=10,
        )
        assert refused.status == 429
        assert refused.headers.get("retry-after") is not None


async def test_a_retry_with_its_idempotency_key_is_its_task_even_when_the_queue_is_full(
    tmp_path: Path,
) -> None:
    """The retry submits nothing, so the service's queue limit does not refuse it."""
    async with (
        redis_server(tmp_path / "redis") as redis,
        front(tmp_path, "f1", redis.url, "max_queued_tasks=1") as first,
        front(tmp_path, "f2", redis.url, "max_queued_tasks=1") as second,
    ):
        body = json.dumps({"prompt": "a red fox", "seed": 7}).encode()
        headers = [("Content-Type", "application/json"), ("Idempotency-Key", "full-1")]
        accepted = await http_request(
            "POST", f"{first.url}/generate", headers=headers, body=body, timeout=10
        )
        assert accepted.status == 202
        for daemon in (first, second):  # the queue is full now: one task waits
            retried = await http_request(
                "POST", f"{daemon.url}/generate", headers=headers, body=body, timeout=10
            )
            assert retried.status == 202, retried.json()
            assert retried.json()["taskId"] == accepted.json()["taskId"]
            assert retried.headers.get("idempotent-replayed") == "true"


async def until_forgotten(daemon_url: str, task_id: str) -> None:
    """Across a process boundary there is no signal to wait on: ask until it 404s."""
    while True:
        response = await http_request("GET", f"{daemon_url}/tasks/{task_id}", timeout=10)
        if response.status == 404:
            return
        await trio.sleep(0.05)


async def test_a_key_retried_after_its_task_was_forgotten_is_told_how_it_ended(
    tmp_path: Path,
) -> None:
    """Not a 202 with a taskId that 404s: the outcome its worker kept beside the key."""
    forget = "task_retention=0"
    with trio.fail_after(30):
        async with (
            redis_server(tmp_path / "redis") as redis,
            simulator(manual=False) as sim,
            worker(tmp_path, "w", redis.url, sim.url, extra=(forget,)),
            front(tmp_path, "f", redis.url, forget) as entry,
        ):
            body = json.dumps({"prompt": "a red fox", "seed": 7}).encode()
            headers = [("Content-Type", "application/json"), ("Idempotency-Key", "gone-1")]
            accepted = await http_request(
                "POST", f"{entry.url}/generate", headers=headers, body=body, timeout=10
            )
            assert accepted.status == 202
            task_id = accepted.json()["taskId"]
            assert last(await read_events(entry.url, task_id))["status"] == "completed"
            await until_forgotten(entry.url, task_id)
            retried = await http_request(
                "POST", f"{entry.url}/generate", headers=headers, body=body, timeout=10
            )
            assert len(await history_ids(sim)) == 1
    assert retried.status == 200, retried.body
    assert retried.headers.get("idempotent-replayed") == "true"
    outcome = retried.json()
    assert (outcome["taskId"], outcome["status"]) == (task_id, "completed")
    assert outcome["result"]["imageUrl"], outcome


async def test_a_key_whose_waiting_task_was_cancelled_and_forgotten_says_so(
    tmp_path: Path,
) -> None:
    """A front's cancel ends a waiting task (no worker writes it): its end is kept too;
    a key whose outcome is not known (claimed by an older version) is 410."""
    forget = "task_retention=0"
    with trio.fail_after(30):
        async with (
            redis_server(tmp_path / "redis") as redis,
            front(tmp_path, "f", redis.url, forget) as entry,
        ):
            body = json.dumps({"prompt": "a red fox", "seed": 7}).encode()
            headers = [("Content-Type", "application/json"), ("Idempotency-Key", "gone-2")]
            accepted = await http_request(
                "POST", f"{entry.url}/generate", headers=headers, body=body, timeout=10
            )
            assert accepted.status == 202
            task_id = accepted.json()["taskId"]
            cancel = await http_request("DELETE", f"{entry.url}/tasks/{task_id}", timeout=10)
            assert cancel.status == 202, cancel.body
            await until_forgotten(entry.url, task_id)
            retried = await http_request(
                "POST", f"{entry.url}/generate", headers=headers, body=body, timeout=10
            )
            assert retried.status == 200, retried.body
            outcome = retried.json()
            assert (outcome["status"], outcome["error"]["code"]) == ("error", "cancelled")
            client = coredis.Redis.from_url(redis.url)
            async with client:
                store = SharedStore(client, "comfy-progress", retention=60)
                await client.delete([store.outcome_key(task_id)])
            unknown = await http_request(
                "POST", f"{entry.url}/generate", headers=headers, body=body, timeout=10
            )
    assert unknown.status == 410, unknown.body
    assert unknown.json()["error"]["details"] == {"field": "Idempotency-Key", "taskId": task_id}


async def test_a_key_whose_task_never_reached_the_queue_may_be_retried(
    tmp_path: Path,
) -> None:
    """Redis took the key's claim, then refused the task (here: its ACL, as a full or
    failing Redis would): the 503 says try again, and the retry must make the task, not
    be told of one that does not exist (for the key's 24 hours)."""
    with trio.fail_after(30):
        async with (
            redis_server(tmp_path / "redis") as redis,
            front(tmp_path, "f", redis.url) as entry,
        ):
            client = coredis.Redis.from_url(redis.url)
            body = json.dumps({"prompt": "a red fox", "seed": 7}).encode()
            headers = [("Content-Type", "application/json"), ("Idempotency-Key", "half-1")]
            async with client:
                await client.acl_setuser("default", "-xadd", "-del")
                refused = await http_request(
                    "POST", f"{entry.url}/generate", headers=headers, body=body, timeout=10
                )
                await client.acl_setuser("default", "+@all")
            retried = await http_request(
                "POST", f"{entry.url}/generate", headers=headers, body=body, timeout=10
            )
            assert retried.status == 202, retried.body
            status = await http_request(
                "GET", f"{entry.url}/tasks/{retried.json()['taskId']}", timeout=10
            )
    assert refused.status == 503, refused.body
    assert retried.headers.get("idempotent-replayed") is None
    assert status.status == 200, status.body


async def until_logged(daemon: DaemonProcess, text: bytes) -> None:
    """Across a process boundary there is no signal to wait on: read its log until then."""
    while True:
        if text in daemon.output:
            return
        await trio.sleep(0.05)


async def test_a_stale_worker_s_writes_are_refused_and_it_stops_its_copy(tmp_path: Path) -> None:
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=True) as first_sim,
        simulator(manual=False) as second_sim,
        front(tmp_path, "f", redis.url) as entry,
        worker(tmp_path, "w1", redis.url, first_sim.url) as stale,
    ):
        task_id = await generate(entry.url)
        await read_events(entry.url, task_id, stop_after=sampling)
        async with worker(tmp_path, "w2", redis.url, second_sim.url):
            stale.process.send_signal(signal.SIGSTOP)  # frozen past its lease
            try:
                done = await read_events(entry.url, task_id)
            finally:
                stale.process.send_signal(signal.SIGCONT)
            assert last(done)["status"] == "completed"
            first_sim.grant_steps(1000)  # the stale copy goes on, and writes
            await until_logged(stale, b"stopping our copy")
            status = await http_request("GET", f"{entry.url}/tasks/{task_id}", timeout=10)
            assert status.json()["status"] == "completed"
            assert status.json()["version"] == int(done[-1].id or 0)  # nothing overwritten


async def test_a_worker_serves_health_readiness_backends_and_metrics_only(
    tmp_path: Path,
) -> None:
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=False) as sim,
        worker(tmp_path, "w", redis.url, sim.url) as work,
        front(tmp_path, "f", redis.url) as entry,
    ):
        task_id = await generate(entry.url)
        assert last(await read_events(entry.url, task_id))["status"] == "completed"
        assert (await http_request("GET", f"{work.url}/healthz", timeout=10)).status == 200
        ready = await http_request("GET", f"{work.url}/readyz", timeout=10)
        assert ready.status == 200
        assert ready.json()["backend"] == sim.url
        backends = (await http_request("GET", f"{work.url}/backends", timeout=10)).json()
        assert [b["url"] for b in backends["backends"]] == [sim.url]
        metrics = (await http_request("GET", f"{work.url}/metrics", timeout=10)).body.decode()
        assert f'comfy_progress_backend_up{{backend="{sim.url}"}} 1' in metrics
        # The task ran on the worker: its metrics count it.
        ran = 'comfy_progress_generation_duration_seconds_count{outcome="completed"} 1.0'
        assert ran in metrics
        # No API and no pages on a worker.
        for method, path in (("POST", "/generate"), ("GET", "/"), ("GET", f"/tasks/{task_id}")):
            reply = await http_request(method, work.url + path, timeout=10)
            assert reply.status in (404, 405), (path, reply.status)
