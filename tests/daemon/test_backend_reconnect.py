"""The backend's reconnect loop against a real WebSocket server, on Trio's autojump clock."""

from __future__ import annotations

import itertools
import socket
from functools import partial

import pytest
import trio
import trio.testing
import trio_websocket

from daemon.comfy.backend import BackendSettings, ComfyBackend, _describe

INITIAL_DELAY = 0.5


async def test_each_drop_after_a_good_connection_waits_the_initial_delay_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    opened_at: list[float] = []
    enough = trio.Event()

    async def accept_then_close(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        opened_at.append(trio.current_time())
        if len(opened_at) == 6:
            enough.set()
        await ws.aclose()  # ComfyUI went away right after a healthy connect

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            trio_websocket.serve_websocket, accept_then_close, "127.0.0.1", 0, None
        )
        port = server.port
        backend = ComfyBackend(
            BackendSettings(
                url=f"http://127.0.0.1:{port}",
                reconnect_initial_delay=INITIAL_DELAY,
                reconnect_max_delay=30.0,
            )
        )
        nursery.start_soon(backend.run)
        await enough.wait()
        nursery.cancel_scope.cancel()
    gaps = [later - earlier for earlier, later in itertools.pairwise(opened_at)]
    # Without the reset the waits doubled: 0.5, 1, 2, 4, 8 s (times 0.5-1 jitter).
    assert gaps, opened_at
    assert all(gap <= INITIAL_DELAY + 0.01 for gap in gaps), gaps
    assert backend.reconnects == 5


async def test_a_refused_connect_is_described_once_with_its_reason() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(OSError, match="all attempts") as caught:
        await trio.open_tcp_stream("127.0.0.1", port)
    text = _describe(caught.value)
    assert text.count("all attempts") == 1, text
    assert "sub-exception" not in text
    assert "refused" in text.lower()


async def test_silence_is_time_since_the_last_frame_not_since_the_socket_opened(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # One cancel scope watches many frames; frames every 0.6 s of a 1 s timeout,
    # for 6 s in all, must keep the socket; 1 s without one must replace it.
    opened_at: list[float] = []
    last_frame_at: list[float] = []
    replaced = trio.Event()

    async def play_then_go_quiet(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        opened_at.append(trio.current_time())
        if len(opened_at) > 1:
            replaced.set()
            await trio.sleep_forever()
        await ws.send_message('{"type":"execution_start","data":{"prompt_id":"cp-1"}}')
        for value in range(1, 11):
            await trio.sleep(0.6)
            await ws.send_message(
                '{"type":"progress","data":{"prompt_id":"cp-1","node":"3",'
                f'"value":{value},"max":10}}}}'
            )
        last_frame_at.append(trio.current_time())
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            trio_websocket.serve_websocket, play_then_go_quiet, "127.0.0.1", 0, None
        )
        backend = ComfyBackend(
            BackendSettings(url=f"http://127.0.0.1:{server.port}", silence_timeout=1.0)
        )
        frames: list[object] = []
        backend.subscribe("cp-1", deliver=frames.append)
        nursery.start_soon(backend.run)
        await replaced.wait()
        nursery.cancel_scope.cancel()
    assert len(frames) == 11  # execution_start and every progress frame, on one socket
    assert backend.reconnects == 1
    # Replaced once the last frame was a timeout old (plus the probe and the redial).
    assert last_frame_at[0] + 1.0 <= opened_at[1] < last_frame_at[0] + 1.5


async def test_a_comfyui_away_for_hours_is_still_retried_at_the_longest_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts = 0
    enough = trio.Event()

    async def hang_up(stream: trio.SocketStream) -> None:
        # TCP answers, ComfyUI does not (a proxy whose ComfyUI is down): a failed attempt.
        nonlocal attempts
        attempts += 1
        if attempts == 1100:
            enough.set()
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, hang_up, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        backend = ComfyBackend(
            BackendSettings(
                url=f"http://127.0.0.1:{port}",
                reconnect_initial_delay=INITIAL_DELAY,
                reconnect_max_delay=30.0,
            )
        )
        nursery.start_soon(backend.run)
        # Over 1024 failures in a row: about 7 hours at the 30 s cap.
        await enough.wait()
        assert trio.current_time() > 6 * 3600
        assert not backend.is_connected()
        nursery.cancel_scope.cancel()
