"""Dispatch never gives a ComfyUI more than `backend_max_pending` prompts, however
its `status` frames and our POST replies interleave (two connections: a frame
ComfyUI sent before it queued our prompt can arrive after the reply)."""

from __future__ import annotations

from pathlib import Path

import trio

from daemon.simulator import ComfySimulator, SimulatorConfig
from tests.daemon.harness import running_pool
from tests.daemon.test_pool import MANUAL, SAMPLER, actor_of, wait_state

FAST = SimulatorConfig(step_time=0.002)


async def test_a_burst_never_puts_more_than_max_pending_prompts_into_comfyui(
    tmp_path: Path,
) -> None:
    async with running_pool(tmp_path, [FAST], backend_max_pending=2) as pool:
        await pool.all_read()
        task_ids = [await pool.generate(seed=10 + n, steps=3) for n in range(40)]
        with trio.fail_after(60):
            for task_id in task_ids:
                await actor_of(pool, task_id).finished.wait()
        assert pool.simulators[0].engine.queue.most <= 2  # room: backend_max_pending


async def test_a_prompt_re_attached_after_a_restart_is_part_of_the_load_floor(
    tmp_path: Path,
) -> None:
    # A status frame sent before ComfyUI queued a prompt of ours can arrive after
    # the reply to that POST and under-count the queue: the prompts ComfyUI holds
    # for us are the floor of its load. Those re-attached after a restart too.
    async with trio.open_nursery() as nursery:
        simulator = ComfySimulator(MANUAL)
        url = f"http://127.0.0.1:{await nursery.start(simulator.run, ('127.0.0.1', 0))}"
        async with running_pool(tmp_path, [], first_urls=(url,)) as before:
            await before.all_read()
            task_id = await before.generate(seed=1)
            await wait_state(actor_of(before, task_id), lambda s: s.current_node == SAMPLER)
        # The daemon stopped without a word to ComfyUI (as if killed); a new one
        # finds the task in its journal and follows the same prompt.
        async with running_pool(tmp_path, [], first_urls=(url,)) as after:
            await after.all_read()
            actor = actor_of(after, task_id)
            await wait_state(actor, lambda s: s.current_node == SAMPLER)
            backend = after.app.pool.backends[0]
            backend.queue_remaining = 0  # the stale frame: "nothing queued"
            assert backend.load() == 1
        nursery.cancel_scope.cancel()
