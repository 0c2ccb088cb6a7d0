"""GET /queue against the real simulator, decoded a slice of items at a time."""

from __future__ import annotations

import trio

from daemon.comfy.http_api import ComfyHttp
from daemon.simulator import ComfySimulator, SimulatorConfig
from protocol import comfy
from tests.simulator.conftest import probe_graph


async def test_a_queue_read_in_slices_lists_every_prompt_in_order() -> None:
    with trio.fail_after(30):
        await _read_in_slices()


async def _read_in_slices() -> None:
    async with trio.open_nursery() as nursery:
        # Manual steps: the first prompt starts and stays; the others wait behind it.
        simulator = ComfySimulator(SimulatorConfig(manual_steps=True))
        port = await nursery.start(simulator.run, ("127.0.0.1", 0))
        http = ComfyHttp(f"http://127.0.0.1:{port}", timeout=10, max_image_bytes=1 << 20)
        http.queue_items_per_turn = 2  # 7 items: four slices
        ids = [f"prompt-{n}" for n in range(7)]
        for n, prompt_id in enumerate(ids):
            reply = await http.submit(probe_graph(color=n), client_id="c", prompt_id=prompt_id)
            assert isinstance(reply, comfy.PromptAccepted)
        snapshot = await http.queue()
        # (The first is running, or about to be: either way it comes first.)
        assert snapshot.running + snapshot.pending == tuple(ids)
        assert len(snapshot.running) <= 1
        position = snapshot.position_of("prompt-6")
        assert position is not None
        assert position.position == 7
        http.pool.close()
        nursery.cancel_scope.cancel()
