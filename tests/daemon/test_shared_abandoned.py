"""Shared mode: a prompt a worker gave up on, while the task's record in Redis still
names it (real redis-server, real daemon processes, an in-test simulator)."""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import trio

from daemon.http.client import http_request
from daemon.simulator import ComfySimulator
from tests.daemon.harness import read_events
from tests.daemon.redis_server import redis_server
from tests.daemon.test_shared import (
    front,
    history_ids,
    killed_mid_task,
    last,
    simulator,
    worker,
)
from tests.simulator.test_workflows import txt2img

KEPT = b"abandoned prompt(s) are followed again by their task: kept"


async def post_prompt(sim: ComfySimulator) -> str:
    """A prompt straight to ComfyUI, that no task of ours names; its id."""
    body = json.dumps({"prompt": txt2img(steps=2, width=64, height=64)})
    reply = await http_request("POST", f"{sim.url}/prompt", body=body.encode())
    assert reply.status == 200, reply.body
    prompt_id: str = reply.json()["prompt_id"]
    return prompt_id


async def test_a_prompt_given_up_just_before_a_kill_9_stays_while_its_task_follows_it(
    tmp_path: Path,
) -> None:
    """A worker killed between giving its task's prompt up (in its own journal) and
    storing the task's next prompt id (in Redis) leaves both behind: the record names
    the prompt, and the worker that takes the task over follows it again. The
    restarted worker must not remove it: that would interrupt the task's own prompt
    and make it start over (or end `lost` with resubmission off). A prompt it gave up
    that no task names still goes."""
    async with (
        redis_server(tmp_path / "redis") as redis,
        simulator(manual=True) as sim,  # parks the prompt at its first step
        front(tmp_path, "f", redis.url) as entry,
    ):
        task_id, seen = await killed_mid_task(tmp_path, "w", redis.url, sim.url, entry.url)
        (prompt_id,) = [item.prompt_id for item in sim.engine.queue.running()]
        orphan = await post_prompt(sim)  # waits behind it
        journal = tmp_path / "w" / "journal.sqlite3"
        with closing(sqlite3.connect(journal)) as db:  # what the kill left in it
            for given_up in (prompt_id, orphan):
                db.execute(
                    "INSERT INTO abandoned_prompts VALUES (?, ?, ?)",
                    (sim.url, given_up, time.time()),
                )
            db.commit()
        async with worker(tmp_path, "w", redis.url, sim.url) as restarted:
            # Either it says it keeps the prompt, or it has asked ComfyUI to stop it.
            while KEPT not in restarted.output:  # (no signal across processes)
                assert not sim.engine.executor.interrupt_requested, restarted.log()
                await trio.sleep(0.05)
            while sim.engine.queue.pending():  # noqa: ASYNC110 (the orphan goes)
                await trio.sleep(0.05)
            sim.grant_steps(1000)
            rest = await read_events(entry.url, task_id, last_event_id=int(seen[-1].id or 0))
        assert not sim.engine.executor.interrupt_requested
        assert last(rest)["status"] == "completed", last(rest)
        # The task's prompt ran to its end once (not resubmitted); the orphan never ran.
        assert await history_ids(sim) == [prompt_id]
        reply = await http_request("GET", f"{sim.url}/history/{prompt_id}", timeout=10)
        messages = reply.json()[prompt_id]["status"]["messages"]
        assert not any(message[0] == "execution_interrupted" for message in messages)
    with closing(sqlite3.connect(journal)) as db:  # kept for good: a third start leaves it
        assert db.execute("SELECT * FROM abandoned_prompts").fetchall() == []
