"""Shared mode: a worker POSTs a task's new prompt id only once Redis holds it (real
redis-server behind a proxy that can hold the worker's writes; the worker runs in
this process, so the test sees its attempts; a front process; the simulator behind
a relay that loses an answer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from tests.daemon.harness import read_events, running_daemon
from tests.daemon.redis_proxy import redis_proxy
from tests.daemon.redis_server import redis_server
from tests.daemon.test_comfy_network import MANUAL, prompts_in, relayed_simulator
from tests.daemon.test_restart import generate
from tests.daemon.test_shared import front, last


@pytest.mark.guard(60)
async def test_a_worker_posts_a_new_prompt_id_only_once_redis_holds_it(tmp_path: Path) -> None:
    # The answer to the first POST is lost and ComfyUI cannot be asked: the task goes
    # on under a new prompt id. Were the worker killed right after POSTing it, the
    # worker that claims the task would read the old id in Redis and follow the old
    # prompt, and the new one would run there too: a second image.
    release = trio.Event()
    lost_answer = trio.Event()

    def held(data: bytes) -> bool:
        # Once the answer is lost, the worker's writes of the task wait (a slow Redis).
        return lost_answer.is_set() and b"comfy-progress:task:" in data

    async with (
        redis_server(tmp_path / "redis") as redis,
        relayed_simulator(MANUAL) as (sim, relay),  # parks the prompt at its first step
        redis_proxy(redis.port, held, release.wait) as slow_redis,
        front(tmp_path, "f", redis.url) as entry,
        running_daemon(
            tmp_path / "w",
            simulator=None,
            comfy_url=relay.url,
            redis_url=slow_redis,
            role="worker",
        ) as worker,
    ):
        await worker.app.pool.wait_all_read()
        relay.dies_after, relay.stays_up = b"POST /prompt", True
        relay.failing = b"GET /queue"  # nor can it be asked whether it took the prompt
        task_id = await generate(entry.url)
        await relay.died.wait()
        lost_answer.set()
        await relay.failed_one.wait()
        relay.dies_after = relay.failing = None
        actor = worker.app.registry.get(task_id)
        assert actor is not None
        # Its next attempt, after SUBMIT_RETRY_DELAY (no event tells of it).
        while actor.attempts < 2:  # noqa: ASYNC110
            await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()  # a POST would be there by now
        assert len(prompts_in(sim)) == 1
        assert actor.prompt_id not in prompts_in(sim)
        release.set()  # in Redis now: the POST goes
        sim.set_manual_steps(False)
        events = await read_events(entry.url, task_id)
        assert last(events)["status"] == "completed", last(events)
        assert actor.prompt_id in prompts_in(sim)
        # As SIGTERM stops it (its last words to Redis may meet a connection being torn
        # down; before STOP_ERRORS in worker.py, about every other stop raised here).
        await worker.app.shutdown()
