"""QueuePlaces: one GET /queue reader per backend tells each prompt queued there its place."""

from __future__ import annotations

import collections
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

import daemon.workflows
from daemon.comfy.backend import BackendSettings, ComfyBackend
from daemon.comfy.queue_places import PLACES_PER_TURN, SAFETY_POLL, Follower, QueueReading, Tell
from daemon.simulator import ComfySimulator, SimulatorConfig
from protocol import comfy
from tests.daemon.harness import Steps

# The shipped text-to-image workflow's graph, as it is: ComfyUI validates what it queues.
GRAPH = json.loads((Path(daemon.workflows.__file__).parent / "txt2img.json").read_text())["graph"]
HELD = SimulatorConfig(step_time=0.01, manual_steps=True)  # the head runs, parked; the rest wait


@asynccontextmanager
async def backend_holding(prompts: int) -> AsyncIterator[tuple[ComfyBackend, list[str]]]:
    """A running backend (its socket open, its QueuePlaces running) whose ComfyUI
    holds `prompts` of ours, in order; nothing follows them yet."""
    async with trio.open_nursery() as nursery:
        simulator = ComfySimulator(HELD)
        port = await nursery.start(simulator.run, ("127.0.0.1", 0))
        backend = ComfyBackend(BackendSettings(url=f"http://127.0.0.1:{port}"))
        ids = [f"prompt-{n}" for n in range(prompts)]
        for prompt_id in ids:
            reply = await backend.http.submit(GRAPH, client_id="c", prompt_id=prompt_id)
            assert isinstance(reply, comfy.PromptAccepted)
        await nursery.start(backend.run)
        await backend.wait_connected()
        yield backend, ids
        nursery.cancel_scope.cancel()


async def test_every_prompt_followed_is_told_its_place_a_turn_at_a_time() -> None:
    # One change of a long queue moves every place, and each place told is a
    # publish: thousands told in one go held up every stream.
    count = 2 * PLACES_PER_TURN + 50
    async with backend_holding(count) as (backend, ids):
        places = backend.queue_places
        told: dict[str, comfy.QueuePosition | None] = {}
        told_in_step: list[int] = []
        followers: dict[str, Follower] = {}
        steps = Steps()

        def once(prompt_id: str) -> Tell:
            def tell(reading: QueueReading) -> bool:
                told[prompt_id] = reading.snapshot.position_of(prompt_id)
                told_in_step.append(steps.current)
                if prompt_id == ids[1]:
                    places.unfollow(followers[ids[-1]])  # told in a later turn: not any more
                return False  # once is enough: told nothing more

            return tell

        for prompt_id in ids:
            followers[prompt_id] = places.follow(once(prompt_id))
        assert len(places) == count
        trio.lowlevel.add_instrument(steps)
        try:
            while len(told) < count - 1:
                await trio.lowlevel.checkpoint()
        finally:
            trio.lowlevel.remove_instrument(steps)
    assert told[ids[0]] == comfy.QueuePosition(True, 0)  # the head runs
    assert [told[prompt_id] for prompt_id in ids[1:-1]] == [
        comfy.QueuePosition(False, n) for n in range(1, count - 1)
    ]
    assert ids[-1] not in told
    assert len(places) == 0  # each said False, or was unfollowed
    assert places.places_told == count - 1
    per_step = collections.Counter(told_in_step)
    assert max(per_step.values()) == PLACES_PER_TURN
    assert len(per_step) == 3  # 100, 100 and 49 (the last was unfollowed)


async def test_a_prompt_is_told_only_readings_asked_for_after_it_was_followed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with backend_holding(2) as (backend, ids):
        places = backend.queue_places
        readings: dict[str, list[QueueReading]] = {prompt_id: [] for prompt_id in ids}
        told = {prompt_id: trio.Event() for prompt_id in ids}

        def keep(prompt_id: str) -> Tell:
            def tell(reading: QueueReading) -> bool:
                readings[prompt_id].append(reading)
                told[prompt_id].set()
                return True

            return tell

        places.follow(keep(ids[0]))
        await told[ids[0]].wait()
        first = readings[ids[0]][0]
        places.follow(keep(ids[1]))
        # No status frame comes (the head is parked, nothing is added): the second
        # prompt is read for all the same, at the next reading, not at the safety poll.
        await told[ids[1]].wait()
    assert readings[ids[1]][0].started > first.started
    # The next reading came after the spacing (1 s), not at the safety poll (10 s).
    assert readings[ids[1]][0].taken_at - first.taken_at < SAFETY_POLL
