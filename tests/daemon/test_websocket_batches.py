"""Frames that arrive together are read as one batch, and a task's frames in a
batch become one publish; against a real WebSocket server on a real socket that
writes each batch with one `send_all`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from daemon.comfy.backend import BackendSettings, ComfyBackend
from daemon.comfy.websocket import MAX_BATCH, BatchingWebSocket, wrap_client_stream
from daemon.tasks.actor import TaskActor
from daemon.tasks.broadcast import Broadcaster
from tests.daemon.test_coalescing import submitted_actor


class BatchServer:
    """A WebSocket server that writes each batch of frames it is given at once."""

    def __init__(self) -> None:
        self.port = 0
        self.connected = trio.Event()
        self._send, self._batches = trio.open_memory_channel[list[str] | None](10)

    async def send_together(self, frames: list[str]) -> None:
        await self._send.send(frames)

    async def close(self) -> None:
        """Close the TCP connection (no close handshake) after what was sent."""
        await self._send.send(None)

    async def _serve(self, stream: trio.SocketStream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            ws.receive_data(data)
            if any(isinstance(event, Request) for event in ws.events()):
                break
        await stream.send_all(ws.send(AcceptConnection()))
        self.connected.set()
        async for frames in self._batches:
            if frames is None:
                await stream.aclose()
                return
            await stream.send_all(b"".join(ws.send(TextMessage(data=f)) for f in frames))

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            await self._serve(stream)
        except Exception:  # noqa: BLE001 - anything but our one WebSocket (the actors' HTTP)
            await trio.aclose_forcefully(stream)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)


@asynccontextmanager
async def batch_server() -> AsyncIterator[tuple[BatchServer, trio.Nursery]]:
    async with trio.open_nursery() as nursery:
        server = BatchServer()
        await nursery.start(server.run)
        yield server, nursery
        nursery.cancel_scope.cancel()


def frame(kind: str, **data: Any) -> str:
    return json.dumps({"type": kind, "data": data})


def progress(prompt_id: str, value: int) -> str:
    return frame("progress", prompt_id=prompt_id, node="3", value=value, max=10)


async def connect(
    server: BatchServer, nursery: trio.Nursery, *, queue: int, buffer: int
) -> tuple[trio.SocketStream, BatchingWebSocket]:
    """A BatchingWebSocket to `server` with a message queue of `queue` and reads of `buffer`."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    ws = await wrap_client_stream(
        nursery,
        stream,
        "127.0.0.1",
        "/ws",
        max_message_size=1 << 20,
        message_queue_size=queue,
        receive_buffer_size=buffer,
    )
    await server.connected.wait()
    return stream, ws


async def test_frames_written_together_are_taken_as_one_batch_in_order() -> None:
    frames = [progress("p", value) for value in range(1, 41)]
    with trio.fail_after(10):
        async with batch_server() as (server, nursery):
            stream, ws = await connect(server, nursery, queue=1024, buffer=65536)
            await server.send_together(frames)
            # trio-websocket's own channel hand-over yields after each message,
            # so the first call would see one frame.
            assert await ws.get_messages() == frames
            await server.send_together(frames[:3])
            await server.close()
            # What came before the close is still read, then the close is seen.
            assert await ws.get_messages() == frames[:3]
            with pytest.raises(trio_websocket.ConnectionClosed):
                await ws.get_messages()
            await trio.aclose_forcefully(stream)


async def test_a_batch_takes_at_most_max_batch_messages_so_the_consumer_yields_between() -> None:
    frames = [progress("p", value) for value in range(MAX_BATCH * 2 + 5)]
    with trio.fail_after(10):
        async with batch_server() as (server, nursery):
            stream, ws = await connect(server, nursery, queue=4 * MAX_BATCH, buffer=1 << 20)
            await server.send_together(frames)
            taken: list[str | bytes] = []
            while len(taken) < len(frames):
                batch = await ws.get_messages()
                assert 1 <= len(batch) <= MAX_BATCH
                taken += batch
            assert taken == frames  # nothing lost or reordered across the cuts
            await trio.aclose_forcefully(stream)


async def follow(
    nursery: trio.Nursery, server: BatchServer, backend: ComfyBackend, *actors: TaskActor
) -> None:
    """Run the backend and the actors until the socket is up and everyone waits for frames."""
    nursery.start_soon(backend.run)
    for actor in actors:
        nursery.start_soon(actor.run)
    await server.connected.wait()
    await backend.wait_connected()
    await trio.testing.wait_all_tasks_blocked()


class Publishes:
    """Every snapshot the actors publish, as (task id, version, event, currentValue)."""

    def __init__(self, *actors: TaskActor) -> None:
        self.seen: list[tuple[str, int, str, object]] = []
        self.changed = trio.Event()
        for actor in actors:
            actor.broadcaster.watchers.append(self._note(actor.task_id))

    def _note(self, task_id: str) -> Any:
        def note(broadcaster: Broadcaster) -> None:
            latest = broadcaster.latest
            assert latest is not None
            value = latest.payload["progress"]["currentValue"]
            self.seen.append((task_id, latest.version, latest.event, value))
            self.changed.set()
            self.changed = trio.Event()

        return note

    async def until(self, count: int) -> None:
        while len(self.seen) < count:
            await self.changed.wait()


async def test_a_tasks_frames_read_together_are_one_publish_and_the_end_is_never_skipped(
    tmp_path: Path,
) -> None:
    with trio.fail_after(20):
        async with batch_server() as (server, nursery):
            backend = ComfyBackend(BackendSettings(url=f"http://127.0.0.1:{server.port}"))
            first = submitted_actor(backend, tmp_path, task_id="a", prompt_id="pa")
            second = submitted_actor(backend, tmp_path, task_id="b", prompt_id="pb")
            await follow(nursery, server, backend, first, second)
            publishes = Publishes(first, second)
            await server.send_together(
                [
                    frame("execution_start", prompt_id="pa"),
                    frame("executing", node="3", prompt_id="pa"),
                    progress("pa", 1),
                    frame("execution_start", prompt_id="pb"),
                    progress("pb", 1),
                    progress("pa", 2),
                ]
            )
            await publishes.until(2)
            # Task b is not held back for a's later frame; a's four frames are one
            # publish, of the newest state.
            (b_task, b_version, _, b_value), (a_task, a_version, _, a_value) = publishes.seen
            assert (b_task, b_value) == ("b", 1)
            assert (a_task, a_value) == ("a", 2)
            error = frame(
                "execution_error",
                prompt_id="pa",
                node_id="3",
                node_type="KSampler",
                exception_message="out of memory",
                exception_type="torch.OutOfMemoryError",
            )
            end = frame("executing", node=None, prompt_id="pa")
            await server.send_together([progress("pa", 3), progress("pb", 2), error, end])
            await publishes.until(4)
            await first.finished.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert len(publishes.seen) == 4, publishes.seen
            # Step 3 is replaced by the end, which goes out though a frame follows it.
            assert publishes.seen[2:] == [
                ("b", b_version + 1, "progress", 2),
                ("a", publishes.seen[3][1], "error-event", publishes.seen[3][3]),
            ]
            assert publishes.seen[3][1] > a_version
            last = first.broadcaster.latest
            assert last is not None
            assert last.terminal
            nursery.cancel_scope.cancel()


async def test_a_nodes_last_step_is_published_before_the_next_node_replaces_it(
    tmp_path: Path,
) -> None:
    with trio.fail_after(20):
        async with batch_server() as (server, nursery):
            backend = ComfyBackend(BackendSettings(url=f"http://127.0.0.1:{server.port}"))
            actor = submitted_actor(backend, tmp_path, task_id="a", prompt_id="pa")
            await follow(nursery, server, backend, actor)
            publishes = Publishes(actor)
            steps = [progress("pa", value) for value in range(1, 11)]
            await server.send_together(
                [
                    frame("execution_start", prompt_id="pa"),
                    frame("executing", node="3", prompt_id="pa"),
                    *steps,
                    frame("executing", node="9", prompt_id="pa"),
                ]
            )
            await publishes.until(1)  # (both come from the one batch)
            await trio.testing.wait_all_tasks_blocked()
            # The sampler's steps are one publish, of its last step; the save node's
            # state (no steps yet) follows, not in its place.
            assert [(task_id, value) for task_id, _, _, value in publishes.seen] == [
                ("a", 10),
                ("a", 0),
            ]
            nursery.cancel_scope.cancel()


async def test_a_peer_that_closes_before_the_handshake_fails_the_open_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A TCP proxy or SSH tunnel whose far end is down accepts, then closes:
    # the open fails then, not when the caller's connect timeout runs out.
    async def accept_then_close(stream: trio.SocketStream) -> None:
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, accept_then_close, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        failure: Exception | None = None
        with trio.move_on_after(3600):  # (a hang is cut here, and fails below)
            try:
                await wrap_client_stream(
                    nursery,
                    stream,
                    "127.0.0.1",
                    "/ws",
                    max_message_size=1 << 20,
                    message_queue_size=4,
                    receive_buffer_size=4096,
                )
            except trio_websocket.HandshakeError as exc:
                failure = exc
        await stream.aclose()
        assert failure is not None
        assert "closed before" in str(failure)
        nursery.cancel_scope.cancel()
