"""GET /queue against the real simulator, decoded as it arrives."""

from __future__ import annotations

import json

import trio

from daemon.comfy.http_api import ComfyHttp
from daemon.http.client import http_request
from daemon.simulator import ComfySimulator, SimulatorConfig
from protocol import comfy
from tests.simulator.conftest import probe_graph


async def test_a_queue_read_as_it_arrives_lists_every_prompt_in_order() -> None:
    with trio.fail_after(30):
        await _read_as_it_arrives()


async def _read_as_it_arrives() -> None:
    async with trio.open_nursery() as nursery:
        # Manual steps: the first prompt starts and stays; the others wait behind it.
        simulator = ComfySimulator(SimulatorConfig(manual_steps=True))
        port = await nursery.start(simulator.run, ("127.0.0.1", 0))
        http = ComfyHttp(f"http://127.0.0.1:{port}", timeout=10, max_image_bytes=1 << 20)
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


async def test_a_queue_larger_than_any_one_answer_cap_still_gives_every_place() -> None:
    # Prompts queued from ComfyUI's own page carry the page's whole workflow in
    # extra_data (tens of KiB to MiBs each): some thousands of them, or as here a
    # few of MiBs, make GET /queue tens of MiB. Only numbers and ids are needed.
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            simulator = ComfySimulator(SimulatorConfig(manual_steps=True))
            port = await nursery.start(simulator.run, ("127.0.0.1", 0))
            url = f"http://127.0.0.1:{port}"
            http = ComfyHttp(url, timeout=30, max_image_bytes=1 << 20)
            page_workflow = {"nodes": ["x" * 1024] * 1024}  # 1 MiB
            for n in range(20):
                body = {
                    "prompt": probe_graph(color=n),
                    "client_id": "page",
                    "prompt_id": f"from-the-page-{n}",
                    "extra_data": {"extra_pnginfo": {"workflow": page_workflow}},
                }
                answer = await http_request("POST", url + "/prompt", body=json.dumps(body).encode())
                assert answer.status == 200, answer.body
            reply = await http.submit(probe_graph(color=99), client_id="c", prompt_id="ours")
            assert isinstance(reply, comfy.PromptAccepted)
            snapshot = await http.queue()
            position = snapshot.position_of("ours")
            assert position is not None
            assert position.position == 21
            http.pool.close()
            nursery.cancel_scope.cancel()
