"""Shared mode: a cancel of a waiting task that a worker holds out of line for a moment
(it took the task and puts it back: it cannot run it). Real redis-server, real daemon
processes, in-test simulators; a relay holds the worker's put-back until the front
answered the cancel."""

from __future__ import annotations

from pathlib import Path

import trio

from daemon.http.client import ClientResponse, http_request
from daemon.simulator import ComfySimulator, SimulatorConfig
from tests.daemon.harness import read_events
from tests.daemon.redis_proxy import redis_proxy
from tests.daemon.redis_server import redis_server
from tests.daemon.test_restart import generate
from tests.daemon.test_shared import front, last, simulator, until_published, worker
from tests.daemon.test_shared_cancel_claim import held_once
from tests.daemon.test_shared_wait_limit import until_a_backend_is_away


def puts_back(data: bytes) -> bool:
    """The script that puts a task back in line (store.PUT_BACK; HAND_BACK, which does
    the same and more, names six keys)."""
    return b"redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])" in data and b"KEYS[6]" not in data


async def test_a_cancel_while_a_worker_puts_the_task_back_in_line_ends_it_cancelled(
    tmp_path: Path,
) -> None:
    """The front finds the task out of the waiting set (a worker that lacks a node took
    it), sets the cancel key and answers 202; then the worker puts the task back in
    line. The task must end `cancelled`, not wait on (here until the wait limit ends
    it `backend_unavailable`; with a busy worker able to run it, until that one has
    room) while its viewers see it queued."""
    away = ComfySimulator(SimulatorConfig(step_time=0.01))
    gone = trio.CancelScope()

    async def serve_until_gone(*, task_status: trio.TaskStatus[int]) -> None:
        with gone:
            await away.run(("127.0.0.1", 0), task_status=task_status)

    cancelled: list[ClientResponse] = []
    task_ids: list[str] = []
    putting_back = trio.Event()
    answered = trio.Event()

    async def after_the_cancel() -> None:
        putting_back.set()
        await answered.wait()

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_until_gone)
        async with (
            redis_server(tmp_path / "redis") as redis,
            simulator(manual=False, hidden=("EmptyLatentImage",)) as lacking,
            front(tmp_path, "f", redis.url, "backend_wait_timeout=3") as entry,
            redis_proxy(redis.port, held_once(puts_back), after_the_cancel) as url,
            worker(tmp_path, "w1", url, lacking.url),
            worker(tmp_path, "w2", redis.url, away.url),
        ):
            await until_published(redis.url, 2)
            gone.cancel()  # w2 still publishes its reading: the front takes the task
            await until_a_backend_is_away(redis.url)
            with trio.fail_after(30):
                task_ids.append(await generate(entry.url))
                await putting_back.wait()
                cancelled.append(
                    await http_request("DELETE", f"{entry.url}/tasks/{task_ids[0]}", timeout=10)
                )
                answered.set()
                end = last(await read_events(entry.url, task_ids[0]))
    [answer] = cancelled
    assert answer.status == 202, answer.body
    assert end["status"] == "error", end
    assert end["error"]["code"] == "cancelled", end
