"""A task submitted behind another shows its place at the next reading, not at the
safety poll: on a mock clock that jumps only while the daemon is idle, so the
real simulator's sockets keep their timing and the daemon's timers are virtual."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from daemon.comfy.backend import BackendSettings, ComfyBackend
from daemon.comfy.queue_places import moment
from daemon.simulator import ComfySimulator, SimulatorConfig
from tests.daemon.harness import running_pool
from tests.daemon.test_pool import SAMPLER, actor_of, wait_state

MANUAL = SimulatorConfig(step_time=0.01, manual_steps=True)


@pytest.fixture
def idle_jump_clock() -> trio.testing.MockClock:
    # Jump only after 1 s of real idleness: loopback I/O answers far sooner, so
    # virtual time moves only when the daemon really sleeps (its poll timers). Not
    # less: a journal write (a thread) slower than the threshold on a loaded machine
    # would jump the clock to the next deadline, maybe a client's 10 s timeout.
    return trio.testing.MockClock(autojump_threshold=1.0)


async def test_a_task_submitted_behind_another_shows_its_place_before_the_safety_poll(
    tmp_path: Path, idle_jump_clock: trio.testing.MockClock
) -> None:
    # A parked prompt sends no frames: the silence probe must not replace the socket.
    async with running_pool(
        tmp_path, [MANUAL], queue_poll_interval=1.0, comfy_silence_timeout=3600
    ) as pool:
        await pool.all_read()
        first = actor_of(pool, await pool.generate(seed=1))
        await wait_state(first, lambda s: s.current_node == SAMPLER)
        second = actor_of(pool, await pool.generate(seed=2))
        await wait_state(second, lambda s: s.submitted)
        submitted_at = trio.current_time()
        # The first task is parked mid-run: ComfyUI's queue does not change again.
        # Until the reading, the task may still show the count it had in our queue
        # (if ComfyUI's `status` came before our POST's reply, the load counted the
        # first prompt twice and the second waited there, told 2 ahead).
        with trio.fail_after(30):  # virtual: past the safety poll
            await wait_state(
                second,
                lambda s: s.queue is not None and (s.queue.running, s.queue.ahead) == (False, 1),
            )
        # A reading or two (1 s apart), not the 10 s safety poll.
        assert trio.current_time() - submitted_at < 5.0


async def test_a_queue_reading_asked_for_before_a_moment_is_never_reused_after_it(
    mock_clock: trio.testing.MockClock,
) -> None:
    # The clock stands still (as a mock clock does while tasks run, or a coarse one
    # between two close events): a reading asked for before a submission carries
    # the submission's Trio time. Reused as "after" it, it would not show the new
    # prompt, and the task would be declared lost and submitted again.
    async with trio.open_nursery() as nursery:
        simulator = ComfySimulator(SimulatorConfig())
        port = await nursery.start(simulator.run, ("127.0.0.1", 0))
        backend = ComfyBackend(BackendSettings(url=f"http://127.0.0.1:{port}"))
        before = await backend.read_queue()
        assert await backend.read_queue(not_before=trio.current_time()) is before
        submitted = moment()
        after = await backend.read_queue(started_after=submitted)
        assert after is not before
        assert after.taken_at == before.taken_at
        assert await backend.read_queue(started_after=submitted) is after
        assert backend.queue_reads == 2
        backend.http.pool.close()
        nursery.cancel_scope.cancel()
