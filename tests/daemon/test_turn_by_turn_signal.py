"""TurnByTurnSignal: a fire wakes its waiters a turn at a time, oldest first."""

from __future__ import annotations

import collections

import trio
import trio.testing

from daemon.signals import TurnByTurnSignal
from tests.daemon.harness import Steps


async def test_a_fire_wakes_every_waiter_a_turn_at_a_time_in_the_order_they_came() -> None:
    signal = TurnByTurnSignal(per_turn=10)
    steps = Steps()
    came: list[int] = []  # the waiters in the order they began to wait
    woken: list[tuple[int, int]] = []  # (its place in `came`, the step that woke it)

    async def waiter(n: int) -> None:
        came.append(n)
        await signal.wait()
        woken.append((came.index(n), steps.current))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(signal.run)
        for n in range(35):
            nursery.start_soon(waiter, n)
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.add_instrument(steps)
        try:
            signal.fire()
            while len(woken) < 35:
                await trio.lowlevel.checkpoint()
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert sorted(place for place, _ in woken) == list(range(35))
        assert signal.count == 1
        # 4 turns (10, 10, 10, 5), oldest waiters first: every waiter of a turn
        # runs before any of the next.
        turns = collections.Counter(place // 10 for place, _ in woken)
        assert sorted(turns.items()) == [(0, 10), (1, 10), (2, 10), (3, 5)]
        firsts = [min(step for place, step in woken if place // 10 == t) for t in range(4)]
        lasts = [max(step for place, step in woken if place // 10 == t) for t in range(4)]
        assert all(lasts[t] < firsts[t + 1] for t in range(3))
        nursery.cancel_scope.cancel()


async def test_a_waiter_that_stops_waiting_is_forgotten_and_later_fires_wake_new_ones() -> None:
    signal = TurnByTurnSignal(per_turn=2)
    woken = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(signal.run)
        with trio.move_on_after(1) as gave_up:
            async with trio.open_nursery() as impatient:
                impatient.start_soon(signal.wait)
                await trio.testing.wait_all_tasks_blocked()
                assert len(signal._waiting) == 1
                impatient.cancel_scope.cancel()
        assert not gave_up.cancelled_caught
        assert len(signal._waiting) == 0  # a cancelled wait leaves nothing behind

        async def waiter() -> None:
            await signal.wait()
            woken.append(signal.count)

        for _ in range(3):
            nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        signal.fire()
        signal.fire()  # a second fire before the first woke anyone: each waiter once
        await trio.testing.wait_all_tasks_blocked()
        assert woken == [2, 2, 2]
        nursery.cancel_scope.cancel()
