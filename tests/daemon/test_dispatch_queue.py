"""The daemon's queue stays cheap when it is long: positions are told once per change,
and tasks waiting for a capable backend are not woken by every `status` frame."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import trio
import trio.testing

from daemon.comfy.backend import BackendSettings
from daemon.comfy.capabilities import Needs
from daemon.comfy.dispatch import POSITIONS_PER_TURN, WAKES_PER_TURN, Dispatcher, Ticket
from daemon.comfy.pool import BackendPool
from daemon.simulator import SimulatorConfig
from tests.daemon.harness import running_pool
from tests.daemon.test_pool import actor_of, wait_until

NEEDS = Needs(frozenset({"KSampler"}), frozenset())


def unreachable_pool() -> BackendPool:
    """One backend that is never connected (the pool is not run): every ticket waits."""
    return BackendPool.from_urls(
        ["http://127.0.0.1:9"], BackendSettings(url=""), data_dir=None, classes=("KSampler",)
    )


async def test_positions_behind_a_batch_of_departures_are_told_once() -> None:
    dispatcher = Dispatcher(unreachable_pool(), max_pending=2)
    told: defaultdict[int, list[int]] = defaultdict(list)
    async with trio.open_nursery() as outer:
        await outer.start(dispatcher.run)
        async with trio.open_nursery() as leaving:
            for number in range(20):
                ticket = Ticket(f"task-{number}", NEEDS, on_position=told[number].append)
                group = outer if number == 19 else leaving
                group.start_soon(dispatcher.take, ticket)
                await trio.testing.wait_all_tasks_blocked()
            # A new ticket is told its own position; nobody else's changed.
            assert dict(told) == {n: [n] for n in range(20)}
            leaving.cancel_scope.cancel()  # 19 leave at once (as at a shutdown)
        await trio.testing.wait_all_tasks_blocked()
        assert len(dispatcher) == 1
        # Told once after the batch, not once per ticket that left ahead of it.
        assert told[19] == [19, 0]
        outer.cancel_scope.cancel()


async def test_a_long_queue_is_told_its_new_positions_a_turn_at_a_time() -> None:
    # Telling a position is a publish: thousands told in one go held up every stream.
    dispatcher = Dispatcher(unreachable_pool(), max_pending=2)
    count = 2 * POSITIONS_PER_TURN + 50
    told: list[list[int]] = [[] for _ in range(count)]
    async with trio.open_nursery() as outer:
        await outer.start(dispatcher.run)
        async with trio.open_nursery() as head:
            head.start_soon(dispatcher.take, Ticket("task-0", NEEDS, on_position=told[0].append))
            await trio.testing.wait_all_tasks_blocked()
            for n in range(1, count):
                ticket = Ticket(f"task-{n}", NEEDS, on_position=told[n].append)
                outer.start_soon(dispatcher.take, ticket)
                await trio.testing.wait_all_tasks_blocked()  # (in this order)
            assert told == [[n] for n in range(count)]
            head.cancel_scope.cancel()  # the head leaves: every position behind it changes
        told_so_far = []  # seen by this task, which runs once a turn as the dispatcher does
        while any(len(positions) < 2 for positions in told[1:]):
            told_so_far.append(sum(len(positions) == 2 for positions in told[1:]))
            assert told_so_far[-1] <= POSITIONS_PER_TURN * len(told_so_far)
            await trio.lowlevel.checkpoint()
        assert told[1:] == [[n, n - 1] for n in range(1, count)]  # each told once, right
        assert any(0 < n < count - 1 for n in told_so_far)  # others ran in between
        outer.cancel_scope.cancel()


async def test_a_long_queue_is_woken_a_turn_at_a_time_when_what_backends_can_run_changes() -> None:
    # A woken task that no backend can run any more publishes `waiting`: thousands
    # woken in one go would be one long scheduler batch.
    pool = unreachable_pool()
    dispatcher = Dispatcher(pool, max_pending=2)
    tickets = [Ticket(f"task-{n}", NEEDS) for n in range(2 * WAKES_PER_TURN + 50)]
    wakeups = [ticket.wakeup for ticket in tickets]  # (each taker replaces its own)
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run)
        for ticket in tickets:
            nursery.start_soon(dispatcher.take, ticket)
        await trio.testing.wait_all_tasks_blocked()
        assert not any(wakeup.is_set() for wakeup in wakeups)
        available = dispatcher.availability.count
        pool.backends[0].connected_changed.fire()  # as a connect or disconnect does
        pool.changed.fire()
        woken_so_far = []  # seen by this task, which runs once a turn as the dispatcher does
        while not all(wakeup.is_set() for wakeup in wakeups):
            woken_so_far.append(sum(wakeup.is_set() for wakeup in wakeups))
            assert woken_so_far[-1] <= WAKES_PER_TURN * len(woken_so_far)
            await trio.lowlevel.checkpoint()
        assert dispatcher.availability.count == available + 1
        assert any(0 < n < len(tickets) for n in woken_so_far)  # others ran in between
        nursery.cancel_scope.cancel()


async def test_status_frames_do_not_wake_tasks_waiting_for_a_capable_backend(
    tmp_path: Path,
) -> None:
    config = SimulatorConfig(step_time=0.01)
    async with running_pool(tmp_path, [config], backend_max_pending=1) as pool:
        await pool.all_read()
        dispatcher = pool.app.dispatcher
        # A first task: the dispatcher has looked at the backend as it is now.
        await actor_of(pool, await pool.generate(seed=0)).finished.wait()
        available, changes = dispatcher.availability.count, pool.app.pool.changed.count
        assert available > 0
        actors = [actor_of(pool, await pool.generate(seed=n)) for n in range(1, 4)]
        for actor in actors:
            await actor.finished.wait()
        # The queue changed many times (two of the three waited in ours); what the
        # backend can run did not, so nothing woke those waiting for a capable one.
        assert pool.app.pool.changed.count > changes + 3
        assert dispatcher.availability.count == available
        pool.simulators[0].reject_connections(3600)  # the backend goes away
        await wait_until(pool, lambda: dispatcher.availability.count > available)
        assert not dispatcher.runnable_now(NEEDS)
