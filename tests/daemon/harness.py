"""Run the real daemon against the real simulator on 127.0.0.1, for end-to-end tests."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from daemon.app import App, Bound
from daemon.config import Config
from daemon.http.client import ClientResponse, http_request, open_stream
from daemon.simulator import ComfySimulator, SimulatorConfig
from protocol.sse import ServerSentEvent, SSEDecoder


@dataclass
class Daemon:
    app: App
    bound: Bound
    simulator: ComfySimulator | None

    @property
    def url(self) -> str:
        return self.bound.url

    async def request(
        self,
        method: str,
        path: str,
        body: object = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> ClientResponse:
        raw = b""
        if body is not None:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers = (*headers, ("Content-Type", "application/json"))
        return await http_request(method, self.url + path, headers=headers, body=raw, timeout=10)

    async def generate(self, **fields: Any) -> str:
        response = await self.request("POST", "/generate", {"prompt": "a red fox", **fields})
        assert response.status == 202, response.body
        task_id: str = response.json()["taskId"]
        return task_id

    async def events(
        self, task_id: str, *, last_event_id: int | None = None, query: str = ""
    ) -> list[ServerSentEvent]:
        """Every event of a task's stream, until the server ends it."""
        headers = () if last_event_id is None else (("Last-Event-ID", str(last_event_id)),)
        decoder = SSEDecoder()
        out: list[ServerSentEvent] = []
        async with open_stream(
            "GET", f"{self.url}/progress/{task_id}{query}", headers=headers
        ) as r:
            assert r.status == 200
            assert r.headers.get("content-type", "").startswith("text/event-stream")
            async for chunk in r.chunks:
                out.extend(decoder.feed(chunk))
        return out


def test_config(tmp_path: Path, **overrides: Any) -> Config:
    base = Config(
        listen="127.0.0.1:0",
        data_dir=tmp_path / "data",
        comfy_silence_timeout=5.0,
        reconnect_initial_delay=0.05,
        reconnect_max_delay=0.5,
        backend_wait_timeout=10.0,
        queue_poll_interval=0.05,
    )
    return dataclasses.replace(base, **overrides)


FAST = SimulatorConfig(step_time=0.01)


@asynccontextmanager
async def running_daemon(
    tmp_path: Path,
    *,
    simulator: SimulatorConfig | None = FAST,
    **overrides: Any,
) -> AsyncIterator[Daemon]:
    """The daemon and (unless simulator=None) a simulator, both on ephemeral ports."""
    async with trio.open_nursery() as nursery:
        sim = None
        if simulator is not None:
            sim = ComfySimulator(simulator)
            port = await nursery.start(sim.run, ("127.0.0.1", 0))
            overrides.setdefault("comfy_url", f"http://127.0.0.1:{port}")
        app = App(test_config(tmp_path, **overrides))
        bound = await nursery.start(app.run)
        try:
            yield Daemon(app, bound, sim)
        finally:
            nursery.cancel_scope.cancel()


def payloads(events: list[ServerSentEvent]) -> list[dict[str, Any]]:
    return [json.loads(e.data) for e in events]
