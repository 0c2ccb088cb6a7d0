"""Shared mode: a worker whose ComfyUI went away gives its waiting task back to the
queue, and another worker with a live backend runs it (real redis-server, real
daemon processes, in-test simulators)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import coredis
import trio

from daemon.http.client import http_request
from daemon.shared.worker import BOUNCE_MAX_DELAY, bounce_delay
from daemon.simulator import ComfySimulator
from tests.daemon.harness import read_events
from tests.daemon.process import DaemonProcess
from tests.daemon.redis_server import RedisServer, redis_server
from tests.daemon.test_restart import generate, sampling
from tests.daemon.test_shared import (
    front,
    history_ids,
    image_key_of,
    inpaint_request,
    last,
    post,
    simulator,
    until_first_preview,
    until_logged,
    upload_picture,
    worker,
)

# Without the hand-back the task would wait this long in its worker and then end
# `backend_unavailable`: the outcome, not the time, is what fails then.
SLOW_TO_GIVE_UP = ("backend_wait_timeout=30",)


@asynccontextmanager
async def worker_to_lose_its_comfyui(
    tmp_path: Path,
) -> AsyncIterator[
    tuple[RedisServer, ComfySimulator, ComfySimulator, DaemonProcess, DaemonProcess]
]:
    """redis-server, a ComfyUI that parks its prompts (the one the worker will lose),
    another that runs them (for a second worker), a front, and the first worker."""
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=True) as cut_sim,
        simulator(manual=False) as other_sim,
        front(tmp_path, "f", redis.url) as entry,
        worker(tmp_path, "w1", redis.url, cut_sim.url, extra=SLOW_TO_GIVE_UP) as first,
    ):
        yield redis, cut_sim, other_sim, entry, first


async def test_tasks_whose_worker_lost_its_comfyui_complete_on_another_worker(
    tmp_path: Path,
) -> None:
    async with worker_to_lose_its_comfyui(tmp_path) as (redis, cut_sim, other_sim, entry, first):
        running = await generate(entry.url)
        seen = await read_events(entry.url, running, stop_after=sampling)
        behind = await generate(entry.url)  # the worker takes it too: ComfyUI holds two
        while cut_sim.engine.queue.remaining() < 2:  # noqa: ASYNC110 (no signal for it)
            await trio.sleep(0.01)
        async with worker(tmp_path, "w2", redis.url, other_sim.url, extra=SLOW_TO_GIVE_UP):
            cut_sim.reject_connections(3600)  # gone for good: its prompts are lost there
            rest = await read_events(entry.url, running, last_event_id=int(seen[-1].id or 0))
            second = await read_events(entry.url, behind)
        assert last(rest)["status"] == "completed", last(rest)
        assert last(second)["status"] == "completed", last(second)
        phases = [json.loads(e.data).get("phase") for e in rest]
        assert "requeued" in phases, phases
        assert phases.index("requeued") < phases.index("running"), phases
        ids = [int(e.id or 0) for e in [*seen, *rest]]
        assert ids == sorted(set(ids))  # one rising sequence across both workers
        assert len(await history_ids(other_sim)) == 2
        assert first.output.count(b"gave the task back to the shared queue") == 2


def test_a_task_put_back_again_and_again_is_read_again_later_each_time_up_to_a_cap() -> None:
    delays = [bounce_delay(times) for times in range(1, 10)]
    assert delays[0] == 0  # the first time, another task may be next in line: read on
    assert delays[1] > 0  # the same task straight back: nothing else waits, pause
    assert delays == sorted(delays)
    assert len(set(delays)) > 3  # it backs off, not a fixed pause
    assert delays[-1] == BOUNCE_MAX_DELAY


async def test_a_task_given_back_shows_no_preview_while_it_waits_nor_once_cancelled(
    tmp_path: Path,
) -> None:
    """The worker gave the task back after its ComfyUI sent a preview: the task waits
    anew (its snapshots announce no preview), and a front's cancel ends it there. Its
    old preview must not be served meanwhile nor after the end (it stayed in Redis
    until it expired: only a worker's write of the end deleted it)."""
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=True, previews=True) as cut_sim,
        front(tmp_path, "f", redis.url) as entry,
        worker(tmp_path, "w1", redis.url, cut_sim.url, extra=SLOW_TO_GIVE_UP) as first,
    ):
        task_id = await generate(entry.url)
        _, preview_path = await until_first_preview(entry.url, task_id, cut_sim)
        url = entry.url + preview_path
        assert (await http_request("GET", url, timeout=10)).status == 200
        cut_sim.reject_connections(3600)  # gone for good: the task goes back to the queue
        with trio.fail_after(30):
            await until_logged(first, b"gave the task back to the shared queue")
        assert (await http_request("GET", url, timeout=10)).status == 404
        cancel = await http_request("DELETE", f"{entry.url}/tasks/{task_id}", timeout=10)
        assert cancel.status in (200, 202), cancel.body
        done = await read_events(entry.url, task_id)
        assert last(done)["error"]["code"] == "cancelled", last(done)
        assert (await http_request("GET", url, timeout=10)).status == 404


async def test_a_task_given_back_keeps_its_source_image_for_its_new_wait(
    tmp_path: Path,
) -> None:
    """Given back when its source's copy in Redis is about to expire (it ran long), the
    task may wait as long again: the copy lives as long as it can, and the task runs."""
    async with worker_to_lose_its_comfyui(tmp_path) as (redis, cut_sim, other_sim, entry, first):
        upload = await upload_picture(entry.url)
        assert upload.status == 201
        key = image_key_of(upload.json()["imageUrl"])
        status, reply = await post(entry.url, inpaint_request(upload.json()["imageUrl"]))
        assert status == 202, reply
        task_id = reply["taskId"]
        seen = await read_events(entry.url, task_id, stop_after=sampling)
        client = coredis.Redis.from_url(redis.url)
        async with client:
            assert await client.expire(key, 60)  # its retention nearly over
            cut_sim.reject_connections(3600)  # gone for good: the task goes back to the queue
            with trio.fail_after(30):
                await until_logged(first, b"gave the task back to the shared queue")
            assert await client.ttl(key) > 3600
        async with worker(tmp_path, "w2", redis.url, other_sim.url, extra=SLOW_TO_GIVE_UP):
            rest = await read_events(entry.url, task_id, last_event_id=int(seen[-1].id or 0))
        assert last(rest)["status"] == "completed", last(rest)
        assert len(await history_ids(other_sim)) == 1
