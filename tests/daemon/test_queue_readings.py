"""GET /queue readings are shared between tasks and spaced out.

Tasks created in a stream each want a queue reading newer than their own
submission; one reading per task would parse the whole queue per task.
"""

from __future__ import annotations

import itertools
import json

import trio
import trio.testing

from daemon.comfy.backend import QUEUE_READ_SPACING, BackendSettings, ComfyBackend
from protocol import comfy
from tests.daemon.http.test_client import start_raw_server

EMPTY_QUEUE = json.dumps({"queue_running": [], "queue_pending": []}).encode()


async def answer_queue_requests(stream: trio.SocketStream) -> None:
    buffer = b""
    while True:
        while b"\r\n\r\n" not in buffer:
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer += data
        _, _, buffer = buffer.partition(b"\r\n\r\n")
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
            % (len(EMPTY_QUEUE), EMPTY_QUEUE)
        )


async def test_readings_are_spaced_out_and_shared(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    url = await start_raw_server(nursery, answer_queue_requests)
    backend = ComfyBackend(BackendSettings(url=url))
    readings: list[float] = []
    read = backend.http.queue

    async def counted_read() -> comfy.QueueSnapshot:
        readings.append(trio.current_time())
        return await read()

    backend.http.queue = counted_read  # type: ignore[method-assign]

    async def task_wanting_a_fresh_reading(delay: float) -> None:
        await trio.sleep(delay)
        await backend.read_queue(not_before=trio.current_time())

    async with trio.open_nursery() as tasks:
        for n in range(30):  # one task every 10 ms for 0.3 s
            tasks.start_soon(task_wanting_a_fresh_reading, n * 0.01)
    gaps = [b - a for a, b in itertools.pairwise(readings)]
    assert all(gap >= QUEUE_READ_SPACING for gap in gaps), gaps
    assert len(readings) <= 5  # 30 tasks over 0.3 s: a reading per 0.1 s, shared
    backend.http.pool.close()
