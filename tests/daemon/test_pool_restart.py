"""A daemon with three backends killed with -9 and started again: each task resumes on
the backend the journal says it was sent to (the daemon and the simulators are real
processes; the simulators keep their prompts while the daemon is down, as ComfyUI would)."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from daemon.http.client import http_request
from daemon.simulator import SimulatorConfig
from tests.daemon.harness import read_events
from tests.daemon.process import daemon_process, simulator_processes
from tests.daemon.test_restart import SETTINGS, generate, sampling

MANUAL = SimulatorConfig(step_time=0.01, manual_steps=True)


async def history_ids(url: str) -> list[str]:
    return list((await http_request("GET", f"{url}/history", timeout=10)).json())


async def all_backends_read(url: str) -> None:
    """Across a process boundary there is no signal to wait on: ask until both are read."""
    while True:
        reply = (await http_request("GET", f"{url}/backends", timeout=10)).json()
        if all(b["connected"] and b["capabilities"] for b in reply["backends"]):
            return
        await trio.sleep(0.05)


async def test_kill_9_with_tasks_on_two_backends_resumes_each_on_its_own(tmp_path: Path) -> None:
    async with simulator_processes([MANUAL, MANUAL, MANUAL]) as sims:
        settings = (*SETTINGS, f"comfy_urls={sims[1].url},{sims[2].url}")
        async with daemon_process(tmp_path, sims[0].url, *settings) as first:
            await all_backends_read(first.url)
            tasks = [await generate(first.url) for _ in range(2)]
            for task_id in tasks:
                await read_events(first.url, task_id, stop_after=sampling)
            backends = (await http_request("GET", f"{first.url}/backends", timeout=10)).json()
            loads = [b["tasks"] for b in backends["backends"]]
            assert sorted(loads) == [0, 1, 1]  # on two backends, one each
            first.kill()
            assert await first.wait() == -9
        async with daemon_process(tmp_path, sims[0].url, *settings) as second:
            results: dict[str, str] = {}
            async with trio.open_nursery() as nursery:

                async def finish(task_id: str, started: trio.Event) -> None:
                    events = await read_events(second.url, task_id, first_event=started)
                    results[task_id] = json.loads(events[-1].data)["status"]

                for task_id in tasks:
                    started = trio.Event()
                    nursery.start_soon(finish, task_id, started)
                    await started.wait()
                for sim in sims:
                    await sim.grant_steps(1000)
            assert results == dict.fromkeys(tasks, "completed")
        # Each ComfyUI that had a prompt ran exactly that one: nothing was resubmitted.
        ran = [len(await history_ids(sim.url)) for sim in sims]
        assert ran == [1 if load else 0 for load in loads]
