"""A small fake ComfyUI for the benchmark, run as its own process.

It speaks just enough of ComfyUI's protocol for the daemon to follow a
prompt to `complete` (POST /prompt, GET /queue, /history, /view and the
WebSocket), and holds every prompt queued until the benchmark says go
(`POST /bench/run`). It then plays the prompts' progress frames at a given
rate (or as a burst) and answers with the monotonic time at which each
progress frame was written, so the load client can compute delivery latency
and freshness (CLOCK_MONOTONIC is shared by every process on the machine).

A prompt is matched to the benchmark's task number by its positive prompt
text, `bench-<n>` (node 6 of the built-in txt2img workflow).

    python -m bench.fake_comfy  ->  prints "listening on <port>"
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import sys
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from typing import Any

import trio

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TASK_TEXT = re.compile(r"bench-(\d+)")
SAMPLER_NODE = "3"
SAVE_NODE = "9"


def tiny_png() -> bytes:
    """A valid 1x1 grey PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\x80"))
        + chunk(b"IEND", b"")
    )


def ws_frame(text: str) -> bytes:
    """One unmasked server-to-client text frame."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        head = bytes([0x81, n])
    elif n < 65536:
        head = bytes([0x81, 126]) + struct.pack(">H", n)
    else:
        head = bytes([0x81, 127]) + struct.pack(">Q", n)
    return head + payload


def frame(kind: str, **data: Any) -> bytes:
    return ws_frame(json.dumps({"type": kind, "data": data}, separators=(",", ":")))


@dataclass
class Prompt:
    prompt_id: str
    number: int
    task: int
    client_id: str
    graph: dict[str, Any]
    done: bool = False


@dataclass
class Socket:
    """The daemon's WebSocket; prompts played in parallel take turns writing."""

    stream: trio.SocketStream
    lock: trio.StrictFIFOLock = field(default_factory=trio.StrictFIFOLock)

    async def send(self, data: bytes) -> float:
        """Write `data`; returns the monotonic time it went to the socket (once
        the lock is ours, so another prompt's turn never counts as latency)."""
        async with self.lock:
            written = time.monotonic()
            await self.stream.send_all(data)
        return written


@dataclass
class FakeComfy:
    prompts: dict[str, Prompt] = field(default_factory=dict)
    by_task: dict[int, Prompt] = field(default_factory=dict)
    sockets: dict[str, Socket] = field(default_factory=dict)
    submitted: trio.Event = field(default_factory=trio.Event)
    number: int = 0
    png: bytes = field(default_factory=tiny_png)

    # ------------------------------------------------------------ HTTP

    async def serve(self, stream: trio.SocketStream) -> None:
        try:
            buffer = bytearray()
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
                }
                length = int(headers.get("content-length", "0"))
                body = bytearray(rest)
                while len(body) < length:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    body += data
                buffer = bytearray(body[length:])
                body = body[:length]
                if headers.get("upgrade", "").lower() == "websocket":
                    await self.websocket(stream, target, headers)
                    return
                status, content_type, payload = await self.route(method, target, bytes(body))
                reply = (
                    f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\n"
                    f"content-length: {len(payload)}\r\n\r\n"
                ).encode() + payload
                await stream.send_all(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    async def route(self, method: str, target: str, body: bytes) -> tuple[int, str, bytes]:
        path = target.split("?", 1)[0]
        if method == "POST" and path == "/prompt":
            return self.submit(json.loads(body))
        if method == "GET" and path == "/queue":
            return 200, "application/json", self.queue()
        if method == "GET" and path.startswith("/history/"):
            prompt = self.prompts.get(path.removeprefix("/history/"))
            return 200, "application/json", self.history(prompt)
        if method == "GET" and path == "/view":
            return 200, "image/png", self.png
        if method == "GET" and path.startswith("/object_info/"):
            # Every node class exists here (the daemon reads each class its workflows use).
            node_class = urllib.parse.unquote(path.removeprefix("/object_info/"))
            info = {node_class: {"input": {"required": {}}, "output": []}}
            return 200, "application/json", json.dumps(info).encode()
        if method == "POST" and path == "/bench/run":
            stamps = await self.run(json.loads(body))
            return 200, "application/json", json.dumps(stamps).encode()
        if method == "GET" and path == "/bench/submitted":
            return 200, "application/json", json.dumps(sorted(self.by_task)).encode()
        return 404, "application/json", b"{}"

    def submit(self, body: dict[str, Any]) -> tuple[int, str, bytes]:
        graph = body["prompt"]
        match = _TASK_TEXT.search(json.dumps(graph))
        task = int(match.group(1)) if match else -1
        prompt = Prompt(body["prompt_id"], self.number, task, body["client_id"], graph)
        self.number += 1
        self.prompts[prompt.prompt_id] = prompt
        self.by_task[task] = prompt
        self.submitted.set()
        self.submitted = trio.Event()
        reply = {"prompt_id": prompt.prompt_id, "number": prompt.number, "node_errors": {}}
        return 200, "application/json", json.dumps(reply).encode()

    def queue(self) -> bytes:
        pending = [
            [p.number, p.prompt_id, {}, {}, [SAVE_NODE]]
            for p in self.prompts.values()
            if not p.done
        ]
        return json.dumps({"queue_running": [], "queue_pending": pending}).encode()

    def history(self, prompt: Prompt | None) -> bytes:
        if prompt is None or not prompt.done:
            return b"{}"
        entry = {
            "prompt": [prompt.number, prompt.prompt_id, prompt.graph, {}, [SAVE_NODE]],
            "outputs": {SAVE_NODE: {"images": [self.image(prompt)]}},
            "status": {"status_str": "success", "completed": True, "messages": []},
        }
        return json.dumps({prompt.prompt_id: entry}).encode()

    def image(self, prompt: Prompt) -> dict[str, str]:
        return {"filename": f"{prompt.prompt_id}.png", "subfolder": "", "type": "output"}

    # ------------------------------------------------------------ WebSocket

    async def websocket(
        self, stream: trio.SocketStream, target: str, headers: dict[str, str]
    ) -> None:
        key = headers["sec-websocket-key"].encode()
        accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest()).decode()
        await stream.send_all(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            ).encode()
        )
        client_id = target.split("clientId=", 1)[1].split("&", 1)[0]
        socket = self.sockets[client_id] = Socket(stream)
        status = {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client_id}
        await socket.send(frame("status", **status))
        # Read (and drop) until the daemon goes away.
        while await stream.receive_some(65536):
            pass

    # ------------------------------------------------------------ playing prompts

    async def run(self, spec: dict[str, Any]) -> dict[str, list[float]]:
        """Play tasks `spec["tasks"]`: `steps` progress frames each at `rate` per second
        (or `burst` seconds for all of them), one after another or `parallel`.

        Parallel tasks step in the same instant unless `stagger`: then task k starts
        k/n of a step later, so the frames of n tasks come evenly spread, as from GPUs
        that started their prompts at different moments."""
        tasks: list[int] = spec["tasks"]
        while not all(t in self.by_task for t in tasks):
            await self.submitted.wait()
        stamps: dict[str, list[float]] = {}

        async def play(task: int, offset: float = 0.0) -> None:
            stamps[str(task)] = await self.play(self.by_task[task], spec, offset)

        if spec.get("parallel"):
            step = 1.0 / spec["rate"] if spec.get("stagger") else 0.0
            async with trio.open_nursery() as nursery:
                for k, task in enumerate(tasks):
                    nursery.start_soon(play, task, k * step / len(tasks))
        else:
            for task in tasks:
                await play(task)
        return stamps

    async def play(self, prompt: Prompt, spec: dict[str, Any], offset: float = 0.0) -> list[float]:
        socket = self.sockets[prompt.client_id]
        pid = prompt.prompt_id
        steps: int = spec["steps"]
        # Encoded before the clock starts: prompts played in parallel must not
        # spend one another's step time building frames.
        frames = [
            frame("progress", value=v, max=steps, prompt_id=pid, node=SAMPLER_NODE)
            for v in range(1, steps + 1)
        ]
        await trio.sleep(offset)
        await socket.send(
            frame("execution_start", prompt_id=pid, timestamp=0)
            + frame("execution_cached", nodes=[], prompt_id=pid, timestamp=0)
            + frame("executing", node=SAMPLER_NODE, display_node=SAMPLER_NODE, prompt_id=pid)
        )
        stamps: list[float] = []
        burst = spec.get("burst")
        if burst is not None:
            # All frames within `burst` seconds, written in ~1 ms slices.
            slices = max(1, int(burst * 1000))
            per = -(-steps // slices)
            start = trio.current_time()
            for k, i in enumerate(range(0, steps, per)):
                await trio.sleep_until(start + k * burst / slices)
                batch = frames[i : i + per]
                written = await socket.send(b"".join(batch))
                stamps.extend([written] * len(batch))
        else:
            # Step 1 comes one step after the sampler's `executing`, as from
            # ComfyUI (the captured transcripts: s1_success.jsonl, 0.30 s steps).
            interval = 1.0 / spec["rate"]
            start = trio.current_time()
            for i, data in enumerate(frames, 1):
                await trio.sleep_until(start + i * interval)
                stamps.append(await socket.send(data))
        # Real ComfyUI decodes and saves the image after the sampler's last step:
        # the end frames come a moment later, not in the same breath.
        await trio.sleep(spec.get("tail", 0.05))
        prompt.done = True
        image = self.image(prompt)
        await socket.send(
            frame("executing", node=SAVE_NODE, display_node=SAVE_NODE, prompt_id=pid)
            + frame(
                "executed",
                node=SAVE_NODE,
                display_node=SAVE_NODE,
                output={"images": [image]},
                prompt_id=pid,
            )
            + frame("execution_success", prompt_id=pid, timestamp=0)
            + frame("executing", node=None, prompt_id=pid)
        )
        return stamps


async def main() -> None:
    fake = FakeComfy()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    print(f"listening on {port}", flush=True)
    await trio.serve_listeners(fake.serve, listeners)


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        sys.exit(0)
