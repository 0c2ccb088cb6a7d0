"""The event loop's longest steps while hostile images are uploaded.

    make bench-loop        (or: python -m bench.loop_steps)

The daemon (with its embedded simulator) runs in this process under a
`LoopMonitor`; the clients run in a thread with their own Trio loop, so
their work is not counted. Each hostile body is `max_upload_bytes` (20 MiB)
of what used to take seconds to size: empty JPEG comment segments, JPEG fill
bytes, empty PNG chunks. Meanwhile a client asks /healthz in a loop. Printed:
the longest steps in CPU time of the loop's thread (the goal: under 10 ms)
and /healthz's slowest answer.
"""

from __future__ import annotations

import logging
import queue
import struct
import sys
import tempfile
import time
import zlib
from functools import partial
from pathlib import Path

import trio

from daemon.app import App
from daemon.config import Config
from daemon.http.client import http_request
from daemon.ops.loop_monitor import LoopMonitor
from daemon.simulator import ComfySimulator, SimulatorConfig

MiB = 1024 * 1024
UPLOAD_BYTES = 20 * MiB


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _jpeg_frame() -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 64, 64, 1) + b"\x01\x11\x00"
    return sof + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\xff\xd9"


def hostile_bodies(size: int) -> dict[str, tuple[str, bytes]]:
    frame = _jpeg_frame()
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0))
    empty_chunk = _png_chunk(b"tEXt", b"")
    png_head = b"\x89PNG\r\n\x1a\n" + ihdr
    chunks = (size - len(png_head) - 12) // len(empty_chunk)
    return {
        "JPEG of empty comment segments": (
            "image/jpeg",
            b"\xff\xd8" + b"\xff\xfe\x00\x02" * ((size - len(frame) - 2) // 4) + frame,
        ),
        "JPEG of fill bytes": ("image/jpeg", b"\xff\xd8" + b"\xff" * (size - 40) + b"\x01" + frame),
        "PNG of empty chunks": (
            "image/png",
            png_head + empty_chunk * chunks + _png_chunk(b"IEND", b""),
        ),
    }


def _valid_png(size: int) -> bytes:
    """A real PNG of about `size` bytes (a big text chunk): uploaded, forwarded, served."""
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
    idat = _png_chunk(b"IDAT", zlib.compress(b"\0" * (8 * 25)))
    text = _png_chunk(b"tEXt", b"Comment\0" + b"x" * (size - 200))
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat + text + _png_chunk(b"IEND", b"")


async def _clients(
    urls: queue.Queue[str], bodies: dict[str, tuple[str, bytes]], valid: bytes
) -> tuple[list[str], float]:
    """The simulator and the load, on their own loop; returns the answers and the
    slowest /healthz. `urls` passes the simulator's URL out and the daemon's in."""
    answers: list[str] = []
    slowest = 0.0
    done = trio.Event()
    sim = ComfySimulator(SimulatorConfig(step_time=0.0))

    async def probe(url: str) -> None:
        nonlocal slowest
        while not done.is_set():
            start = time.perf_counter()
            await http_request("GET", f"{url}/healthz", timeout=60)
            slowest = max(slowest, time.perf_counter() - start)
            await trio.sleep(0.005)

    async def upload(url: str, name: str, content_type: str, body: bytes) -> str:
        response = await http_request(
            "POST", f"{url}/upload", headers=(("Content-Type", content_type),), body=body,
            timeout=120,
        )  # fmt: skip
        reply = response.json()
        message = reply.get("error", {}).get("message", "")
        answers.append(f"{name}: {response.status} {message[:120]}")
        return str(reply.get("imageUrl", ""))

    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.run, ("127.0.0.1", 0))
        urls.put(f"http://127.0.0.1:{port}")
        url = await trio.to_thread.run_sync(urls.get)
        async with trio.open_nursery() as load:
            load.start_soon(probe, url)
            for name, (content_type, body) in bodies.items():
                await upload(url, name, content_type, body)
            image = await upload(url, f"valid PNG of {len(valid) // MiB} MiB", "image/png", valid)
            async with trio.open_nursery() as readers:
                for _ in range(4):
                    readers.start_soon(
                        partial(http_request, max_response_bytes=2 * len(valid)),
                        "GET",
                        url + image,
                    )
            answers.append(f"4 x GET {image[:20]}...: served")
            done.set()
        nursery.cancel_scope.cancel()
    return answers, slowest


async def run(data_dir: Path) -> None:
    urls: queue.Queue[str] = queue.Queue()
    bodies = hostile_bodies(UPLOAD_BYTES)
    monitor = LoopMonitor(keep=5)
    async with trio.open_nursery() as nursery:
        # The simulator and the clients run in a thread with their own loop: only
        # the daemon's steps are measured here.
        result: list[tuple[list[str], float]] = []
        finished = trio.Event()

        async def clients() -> None:
            result.append(
                await trio.to_thread.run_sync(
                    trio.run, _clients, urls, bodies, _valid_png(UPLOAD_BYTES - 4096)
                )
            )
            finished.set()

        nursery.start_soon(clients)
        comfy_url = await trio.to_thread.run_sync(urls.get)
        config = Config(
            listen="127.0.0.1:0", comfy_url=comfy_url, data_dir=data_dir, log_level="warning"
        )
        app = App(config)
        bound = await nursery.start(app.run)
        with monitor.installed():
            urls.put(bound.url)
            await finished.wait()
        nursery.cancel_scope.cancel()
    answers, slowest = result[0]
    for answer in answers:
        print(f"  {answer}")
    print(f"event-loop steps of the daemon during the uploads: {monitor.steps}")
    print("longest steps (CPU of the loop thread / wall):")
    for step in monitor.longest():
        print(f"  {step.cpu * 1000:7.2f} ms / {step.wall * 1000:7.2f} ms  {step.task}")
    print(f"slowest /healthz while uploading: {slowest * 1000:.1f} ms")


def main() -> int:
    logging.getLogger("daemon").setLevel(logging.ERROR)  # shutdown chatter
    print(f"uploads of {UPLOAD_BYTES // MiB} MiB each (3 hostile, 1 valid), then 4 downloads:")
    with tempfile.TemporaryDirectory(prefix="comfy-progress-loop-") as tmp:
        trio.run(run, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
