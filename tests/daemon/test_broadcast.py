"""The latest-snapshot broadcaster."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from daemon.tasks.broadcast import Broadcaster, Snapshot, Unrendered
from protocol import task


def snap(version: int, *, terminal: bool = False) -> Snapshot:
    return Snapshot(version, "progress", {"v": version}, f"id: {version}\n\n".encode(), terminal)


async def test_reader_gets_current_then_newer() -> None:
    b = Broadcaster()
    b.publish(snap(0))
    assert (await b.wait_newer(None)).version == 0
    got: list[int] = []

    async def reader() -> None:
        got.append((await b.wait_newer(0)).version)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        b.publish(snap(1))
    assert got == [1]


async def test_slow_reader_skips_to_the_latest() -> None:
    b = Broadcaster()
    for v in range(5):
        b.publish(snap(v))
    assert (await b.wait_newer(1)).version == 4


async def test_publishing_never_waits_for_readers() -> None:
    b = Broadcaster()
    b.publish(snap(0))
    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(b.wait_newer, 0)
        await trio.testing.wait_all_tasks_blocked()
        with trio.testing.assert_no_checkpoints():
            b.publish(snap(1))


async def test_wait_newer_checkpoints_on_the_fast_path() -> None:
    b = Broadcaster()
    b.publish(snap(3))
    with trio.testing.assert_checkpoints():
        await b.wait_newer(2)


def test_versions_rise_and_terminal_is_last() -> None:
    b = Broadcaster()
    b.publish(snap(1))
    with pytest.raises(ValueError, match="must rise"):
        b.publish(snap(1))
    b.publish(snap(2, terminal=True))
    with pytest.raises(RuntimeError, match="terminal"):
        b.publish(snap(3))


def test_the_first_message_is_encoded_when_first_read() -> None:
    b = Broadcaster(first=task.TaskMessage("progress", 1, {"step": "queued"}))
    latest = b.latest
    assert latest is not None
    assert (latest.version, latest.event, latest.terminal) == (1, "progress", False)
    assert latest.sse == b'event: progress\nid: 1\ndata: {"step":"queued"}\n\n'
    assert b.latest is latest  # encoded once


async def test_a_first_message_replaced_before_anyone_read_it_is_never_encoded() -> None:
    # A set cannot be JSON-encoded: encoding this first message would raise.
    b = Broadcaster(first=task.TaskMessage("progress", 1, {"unencodable": {1}}))
    b.publish(snap(2))
    assert (await b.wait_newer(None)).version == 2


def test_the_unread_first_message_still_bounds_the_versions() -> None:
    b = Broadcaster(first=task.TaskMessage("progress", 3, {}))
    with pytest.raises(ValueError, match="must rise"):
        b.publish(snap(3))
    ended = Broadcaster(first=task.TaskMessage("complete", 3, {}))
    with pytest.raises(RuntimeError, match="terminal"):
        ended.publish(snap(4))


def test_an_unrendered_first_message_is_rendered_as_of_its_own_moment() -> None:
    spec = task.TaskSpec(task_id="t", prompt_id="p", graph={})
    state = task.new_task(spec, 0.0)
    b = Broadcaster(first=Unrendered(state, 1_764_074_096.789))
    latest = b.latest
    assert latest is not None
    assert latest.version == state.version
    assert latest.payload == task.render(state, 1_764_074_096.789).payload
    assert latest.payload["timestamp"] == "2025-11-25T12:34:56.789Z"


def test_an_unrendered_first_message_bounds_the_versions_and_gives_way() -> None:
    spec = task.TaskSpec(task_id="t", prompt_id="p", graph={})
    b = Broadcaster(first=Unrendered(task.new_task(spec, 0.0), 0.0))
    with pytest.raises(ValueError, match="must rise"):
        b.publish(snap(0))
    b.publish(snap(1))
    latest = b.latest
    assert latest is not None
    assert latest.version == 1
