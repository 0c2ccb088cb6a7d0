"""IdleSockets: tasks asleep on their socket until input, EOF or a wake-up."""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing

from daemon.http.idle_sockets import IdleSockets


def pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    return ours, theirs


async def sleep_and_note(idle: IdleSockets, fd: int, woken: list[int]) -> None:
    await idle.sleep(fd)
    woken.append(fd)


async def test_input_wakes_only_the_task_whose_socket_has_it() -> None:
    idle = IdleSockets()
    pairs = [pair() for _ in range(3)]
    woken: list[int] = []
    async with trio.open_nursery() as nursery:
        for ours, _ in pairs:
            nursery.start_soon(sleep_and_note, idle, ours.fileno(), woken)
        await trio.testing.wait_all_tasks_blocked()
        assert idle.sleeping == 3
        pairs[1][1].send(b"hello")
        while not woken:  # noqa: ASYNC110 - what we wait for is the wake-up itself
            await trio.sleep(0.001)
        assert woken == [pairs[1][0].fileno()]
        assert idle.sleeping == 2
        nursery.cancel_scope.cancel()
    for ours, theirs in pairs:
        ours.close()
        theirs.close()


async def test_eof_wakes_the_sleeper() -> None:
    idle = IdleSockets()
    ours, theirs = pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(idle.sleep, ours.fileno())
            await trio.testing.wait_all_tasks_blocked()
            theirs.close()
    assert idle.sleeping == 0
    ours.close()


async def test_wake_wakes_the_sleeper_without_input() -> None:
    idle = IdleSockets()
    ours, theirs = pair()
    woken: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sleep_and_note, idle, ours.fileno(), woken)
        await trio.testing.wait_all_tasks_blocked()
        idle.wake(ours.fileno())
        idle.wake(ours.fileno())  # nobody asleep any more: nothing happens
    assert woken == [ours.fileno()]
    with pytest.raises(BlockingIOError):
        ours.recv(10)  # nothing was read or sent
    ours.close()
    theirs.close()


async def test_a_cancelled_sleeper_leaves_the_set_and_may_sleep_again() -> None:
    idle = IdleSockets()
    ours, theirs = pair()
    with trio.move_on_after(0.01):
        await idle.sleep(ours.fileno())
    assert idle.sleeping == 0
    woken: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sleep_and_note, idle, ours.fileno(), woken)
        await trio.testing.wait_all_tasks_blocked()
        theirs.send(b"x")
    assert woken == [ours.fileno()]
    ours.close()
    theirs.close()


async def test_one_sleeper_per_socket() -> None:
    idle = IdleSockets()
    ours, theirs = pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(idle.sleep, ours.fileno())
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await idle.sleep(ours.fileno())
        nursery.cancel_scope.cancel()
    ours.close()
    theirs.close()


async def test_a_socket_closed_under_its_sleeper_frees_its_number() -> None:
    idle = IdleSockets()
    ours, theirs = pair()
    fd = ours.fileno()
    failures: list[BaseException] = []

    async def sleep_until_closed() -> None:
        try:
            await idle.sleep(fd)
        except trio.ClosedResourceError as exc:
            failures.append(exc)

    other, other_peer = pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sleep_until_closed)
            await trio.testing.wait_all_tasks_blocked()
            ours.close()  # under the sleeper: the kernel drops it from the set
            # A new socket with the same number sleeps there; the old sleeper learns
            # that its socket is gone instead of sleeping forever.
            os.dup2(other.fileno(), fd)
            nursery.start_soon(idle.sleep, fd)
            await trio.testing.wait_all_tasks_blocked()
            assert len(failures) == 1
            assert idle.sleeping == 1
            other_peer.send(b"x")  # input on the new socket wakes the new sleeper
    assert idle.sleeping == 0
    os.close(fd)
    for sock in (theirs, other, other_peer):
        sock.close()
