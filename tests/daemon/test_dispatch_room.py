"""Dispatch never gives a ComfyUI more than `backend_max_pending` prompts, however
its `status` frames and our POST replies interleave (two connections: a frame
ComfyUI sent before it queued our prompt can arrive after the reply)."""

from __future__ import annotations

from pathlib import Path

import trio

from daemon.simulator import SimulatorConfig
from tests.daemon.harness import running_pool
from tests.daemon.test_pool import actor_of

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
