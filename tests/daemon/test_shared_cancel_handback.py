"""Shared mode: a cancel of a task that its worker is giving back to the queue (its
ComfyUI went away). Real redis-server, real daemon processes, an in-test simulator;
relays hold one daemon's Redis command back, so that each test decides what happens
first: the worker putting the task back in line, or the front setting its cancel key."""

from __future__ import annotations

from pathlib import Path

import coredis
import trio

from daemon.http.client import ClientResponse, http_request
from tests.daemon.harness import read_events
from tests.daemon.redis_proxy import redis_proxy
from tests.daemon.redis_server import redis_server
from tests.daemon.test_restart import generate, sampling
from tests.daemon.test_shared import front, last, simulator, worker
from tests.daemon.test_shared_cancel_claim import held_once

# The front ends a task no live worker can run after this long: without the cancel,
# the end the tests would see instead (backend_unavailable).
FRONT_LIMIT = "backend_wait_timeout=3"
# The worker gives the task back long before it would give up on it itself, and with
# room for one prompt it does not read the queue again while it runs one (a take
# would read the cancel key too: here the task must wait in line with nobody to take it).
WORKER_LIMIT = ("backend_wait_timeout=30", "backend_max_pending=1")


def hands_back(data: bytes) -> bool:
    """The script that gives a held task back to the queue (store.HAND_BACK)."""
    return b"redis.call('DEL', KEYS[6])" in data and b"KEYS[8]" in data


def sets_the_cancel_key(data: bytes) -> bool:
    """A front's request_cancel: SET {prefix}:cancel:{id} (RESP)."""
    return b"\r\nSET\r\n" in data and b":cancel:" in data


async def test_a_cancel_set_while_the_worker_gives_the_task_back_ends_it_cancelled(
    tmp_path: Path,
) -> None:
    """The front finds the task held (not waiting), sets its cancel key, tells the
    worker (whose copy has stopped already) and answers 202; then the worker puts it
    back in line. The worker, told by the script that the key is set, ends it there:
    it must not wait on (showing `requeued`) until the wait limit ends it otherwise."""
    handing_back = trio.Event()
    answered = trio.Event()
    cancelled: list[ClientResponse] = []

    async def after_the_cancel() -> None:
        handing_back.set()
        await answered.wait()

    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=True) as cut_sim,
        front(tmp_path, "f", redis.url, FRONT_LIMIT) as entry,
        redis_proxy(redis.port, held_once(hands_back), after_the_cancel) as url,
        worker(tmp_path, "w1", url, cut_sim.url, extra=WORKER_LIMIT),
    ):
        with trio.fail_after(30):
            task_id = await generate(entry.url)
            await read_events(entry.url, task_id, stop_after=sampling)
            cut_sim.reject_connections(3600)  # gone for good: the task goes back
            await handing_back.wait()
            cancelled.append(await http_request("DELETE", f"{entry.url}/tasks/{task_id}"))
            answered.set()
            end = last(await read_events(entry.url, task_id))
    [answer] = cancelled
    assert answer.status == 202, answer.body
    assert end["error"]["code"] == "cancelled", end


async def test_a_task_given_back_before_its_cancel_key_was_set_ends_cancelled(
    tmp_path: Path,
) -> None:
    """The other order: the front found the task held, then the worker put it back in
    line before the front's cancel key was set (so the worker saw none). The front,
    finding the task without a holder once the key is set, ends it in line."""
    key_sent = trio.Event()

    def sent(data: bytes) -> None:
        if sets_the_cancel_key(data):
            key_sent.set()

    async def after_the_front_looked() -> None:
        await key_sent.wait()

    async with redis_server(tmp_path / "redis") as redis:
        client = coredis.Redis.from_url(redis.url)

        async def once_back_in_line() -> None:
            # In another process's Redis: no signal to wait on, ask.
            while await client.zscore("comfy-progress:waiting", task_ids[0]) is None:  # noqa: ASYNC110
                await trio.sleep(0.02)

        task_ids: list[str] = []
        async with (
            client,
            simulator(manual=True) as cut_sim,
            redis_proxy(
                redis.port, held_once(sets_the_cancel_key), once_back_in_line, sent
            ) as front_url,
            front(tmp_path, "f", front_url, FRONT_LIMIT) as entry,
            redis_proxy(redis.port, held_once(hands_back), after_the_front_looked) as url,
            worker(tmp_path, "w1", url, cut_sim.url, extra=WORKER_LIMIT),
        ):
            with trio.fail_after(30):
                task_ids.append(await generate(entry.url))
                await read_events(entry.url, task_ids[0], stop_after=sampling)
                cut_sim.reject_connections(3600)  # gone for good: the task goes back
                answer = await http_request("DELETE", f"{entry.url}/tasks/{task_ids[0]}")
                end = last(await read_events(entry.url, task_ids[0]))
    assert answer.status == 202, answer.body
    assert end["error"]["code"] == "cancelled", end
