"""Heartbeats and cleanup timers, on Trio's autojump clock (no real sockets here)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing

from daemon.api.sse_stream import StreamHub
from daemon.comfy.backend import BackendSettings, ComfyBackend
from daemon.comfy.dispatch import Dispatcher
from daemon.comfy.pool import BackendPool
from daemon.images.store import ImageStore
from daemon.tasks.actor import TaskSettings
from daemon.tasks.broadcast import Broadcaster, Snapshot
from daemon.tasks.journal import TaskRecord
from daemon.tasks.registry import TaskRegistry
from daemon.tasks.restore import record_of
from protocol import task
from protocol.sse import SSEDecoder


class RecordingWriter:
    """Stands in for the HTTP connection below the unit under test."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, bytes]] = []

    async def send(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.writes.append((trio.current_time(), data))


def snap(version: int, *, terminal: bool = False) -> Snapshot:
    event = "complete" if terminal else "progress"
    sse = f"event: {event}\nid: {version}\ndata: {{}}\n\n".encode()
    return Snapshot(version, event, {}, sse, terminal)


async def test_heartbeat_every_30_seconds_of_silence(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = StreamHub(heartbeat_interval=30.0, retry_ms=2000)
    broadcaster = Broadcaster()
    broadcaster.publish(snap(0))
    writer = RecordingWriter()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.stream, broadcaster, None, writer)
        await trio.sleep(95)
        broadcaster.publish(snap(1))
        await trio.sleep(40)
        broadcaster.publish(snap(2, terminal=True))
    heartbeats = [t - start for t, data in writer.writes if data == b": heartbeat\n\n"]
    assert heartbeats == [30, 60, 90, 125]  # the timer restarts after the event at 95
    events = SSEDecoder().feed(b"".join(d for _, d in writer.writes))
    assert [e.id for e in events] == ["0", "1", "2"]
    assert writer.writes[0][1] == b"retry: 2000\n\n"
    assert broadcaster.readers == 0  # the stream ended after the terminal event


async def test_drain_tells_streams_to_come_back(autojump_clock: trio.testing.MockClock) -> None:
    hub = StreamHub(heartbeat_interval=30.0, retry_ms=1500)
    broadcaster = Broadcaster()
    broadcaster.publish(snap(0))
    writer = RecordingWriter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.stream, broadcaster, None, writer)
        await trio.testing.wait_all_tasks_blocked()
        assert hub.open_streams == 1
        hub.drain()
    assert writer.writes[-1][1] == b"retry: 1500\n\n"
    assert hub.open_streams == 0


def finished_record(task_id: str, finished_at: float) -> TaskRecord:
    spec = task.TaskSpec(task_id=task_id, prompt_id="p", graph={})
    state = replace(
        task.new_task(spec, finished_at - 10),
        stage=task.Stage.COMPLETED,
        version=7,
        finished_at=finished_at,
    )
    return record_of(state, backend=None)


@pytest.mark.parametrize(("age", "left"), [(0.0, 300.0), (200.0, 100.0)])
async def test_finished_tasks_are_forgotten_after_five_minutes(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, age: float, left: float
) -> None:
    epoch = 1_000_000.0
    backend = ComfyBackend(BackendSettings(url="http://127.0.0.1:9"))
    registry = TaskRegistry(
        dispatcher=Dispatcher(BackendPool([backend], classes=()), max_pending=2),
        images=ImageStore(tmp_path),
        settings=TaskSettings(retention=300.0),
        wall_clock=lambda: epoch + trio.current_time(),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        now = epoch + trio.current_time()
        registry.restore([finished_record("t", now - age), finished_record("old", now - 301)])
        assert registry.get("old") is None  # its five minutes were already up
        actor = registry.get("t")
        assert actor is not None
        latest = actor.broadcaster.latest
        assert latest is not None
        assert latest.version == 7
        assert latest.terminal
        await trio.sleep(left - 1)
        assert registry.get("t") is not None
        await trio.sleep(2)
        assert registry.get("t") is None
        nursery.cancel_scope.cancel()
