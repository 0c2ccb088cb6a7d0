"""ComfyHttp against a ComfyUI that answers garbage: always BackendUnavailable.

The "ComfyUI" here is a raw socket server below the unit under test: the
simulator never answers like this.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from daemon.comfy.http_api import BackendUnavailable, ComfyHttp

DEEP = b"[" * 100_000 + b"]" * 100_000


async def answering(
    body: bytes, status: bytes = b"200 OK", task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Answer every request with `status` and `body`, then close."""

    async def answer(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            head += chunk
        await stream.send_all(
            b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (status, len(body)) + body
        )
        await stream.aclose()

    await trio.serve_tcp(answer, 0, host="127.0.0.1", task_status=task_status)


CALLS: dict[str, Callable[[ComfyHttp], Awaitable[object]]] = {
    "queue": lambda http: http.queue(),
    "history": lambda http: http.history("p"),
}


@pytest.mark.parametrize(
    ("call", "body", "says"),
    [
        ("queue", DEEP, "GET /queue: queue: expected a JSON object"),
        ("queue", b'{"queue_running": [' + DEEP + b"]}", "GET /queue: queue: nested too deeply"),
        ("queue", b'{"queue_running": ["\xff"]}', "not UTF-8"),
        ("queue", b"<html>busy</html>", "GET /queue: queue: expected a JSON object"),
        ("history", DEEP, "not JSON"),
        ("history", b'{"p": {"outputs": ' + DEEP + b"}}", "not JSON"),
        ("history", b"<html>busy</html>", "not JSON"),
    ],
)
async def test_a_garbage_answer_is_backend_unavailable(call: str, body: bytes, says: str) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(answering, body)
            port = listeners[0].socket.getsockname()[1]
            http = ComfyHttp(f"http://127.0.0.1:{port}", timeout=10, max_image_bytes=1 << 20)
            with pytest.raises(BackendUnavailable) as caught:
                await CALLS[call](http)
            assert says in str(caught.value)
            http.pool.close()
            nursery.cancel_scope.cancel()


async def test_a_queue_answer_that_is_not_200_is_not_read_as_a_queue() -> None:
    # (Its body is not given to the reader that decodes a 200's as it arrives.)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(answering, b"<html>no</html>", b"404 Not Found")
            port = listeners[0].socket.getsockname()[1]
            http = ComfyHttp(f"http://127.0.0.1:{port}", timeout=10, max_image_bytes=1 << 20)
            with pytest.raises(BackendUnavailable, match="GET /queue answered 404"):
                await http.queue()
            http.pool.close()
            nursery.cancel_scope.cancel()
