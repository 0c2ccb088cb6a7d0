"""The simulator against the live-ComfyUI transcripts (tests/fixtures/comfyui).

The capture ran its scenarios one after another on one server, so cache state,
the `number` counter, file counters and history carry over from file to file.
Each test therefore replays every earlier scenario too, on a fresh simulator,
and compares all of them: frames per socket (type, data keys and values up to
ids and timestamps), binary frames, HTTP statuses, headers and bodies.
"""

from __future__ import annotations

import pytest
import trio

from daemon.simulator import ComfySimulator, SimulatorConfig
from tests.simulator.replay import SCENARIOS, Replayer, hints_for


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_transcript_replays_identically(scenario: str, nursery: trio.Nursery) -> None:
    with trio.fail_after(60):
        sim = ComfySimulator(SimulatorConfig(manual_steps=True, seed=7))
        port = await nursery.start(sim.run, ("127.0.0.1", 0))
        replayer = Replayer(sim, port, nursery)
        for name in SCENARIOS[: SCENARIOS.index(scenario) + 1]:
            await replayer.run(name, hints_for(name, replayer))
