"""The pool's start (what READY=1 waits for) with ComfyUIs that do not answer, on Trio's
autojump clock: each backend's first attempt to connect runs out its connect_timeout."""

from __future__ import annotations

import contextlib
import socket

import trio
import trio.testing

from daemon.comfy.backend import BackendSettings
from daemon.comfy.pool import BackendPool

CONNECT_TIMEOUT = 10.0


def silent_comfyui(stack: contextlib.ExitStack) -> str:
    """A port that listens and never accepts: TCP connects (the kernel's backlog), the
    WebSocket handshake is never answered (a ComfyUI hung, or behind a stuck proxy)."""
    sock = stack.enter_context(socket.socket())
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    host, port = sock.getsockname()
    return f"http://{host}:{port}"


async def test_backends_that_do_not_answer_are_tried_together_not_one_after_another(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with contextlib.ExitStack() as stack:
        urls = [silent_comfyui(stack) for _ in range(6)]
        pool = BackendPool.from_urls(
            urls,
            BackendSettings(url="", connect_timeout=CONNECT_TIMEOUT),
            data_dir=None,
            classes=(),
        )
        async with trio.open_nursery() as nursery:
            began = trio.current_time()
            await nursery.start(pool.run)
            took = trio.current_time() - began
            nursery.cancel_scope.cancel()
    # Each was tried once and timed out (started anyway: tasks wait for a connection).
    assert all(b.last_error and not b.is_connected() for b in pool.backends)
    # Tried one after another, the start took 6 x 10 s: past systemd's 90 s
    # TimeoutStartSec with ten such backends, and the daemon was killed before READY=1.
    assert took < 2 * CONNECT_TIMEOUT, took
