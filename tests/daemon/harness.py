"""Run the real daemon against the real simulator on 127.0.0.1, for end-to-end tests."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import trio

from daemon.app import App, Bound
from daemon.config import Config
from daemon.http.client import ClientResponse, http_request, open_stream
from daemon.simulator import ComfySimulator, SimulatorConfig
from protocol.sse import ServerSentEvent, SSEDecoder
from tests.daemon.process import SimulatorProcess, simulator_processes

# The Host a request over a Unix socket names (the daemon answers any by default).
UNIX_BASE_URL = "http://localhost"


@dataclass
class Daemon:
    app: App
    bound: Bound
    simulator: ComfySimulator | None

    @property
    def url(self) -> str:
        """The base URL requests go to (on a Unix socket: to `unix_socket`)."""
        return UNIX_BASE_URL if self.bound.unix_path else self.bound.url

    @property
    def unix_socket(self) -> str | None:
        return self.bound.unix_path or None

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
        return await http_request(
            method,
            self.url + path,
            headers=headers,
            body=raw,
            timeout=10,
            unix_socket=self.unix_socket,
        )

    async def request_comfy(self, method: str, path: str) -> ClientResponse:
        """Ask the ComfyUI (simulator) behind the daemon directly."""
        return await http_request(method, self.bound.comfy_url + path, timeout=10)

    async def generate(self, **fields: Any) -> str:
        response = await self.request("POST", "/generate", {"prompt": "a red fox", **fields})
        assert response.status == 202, response.body
        task_id: str = response.json()["taskId"]
        return task_id

    async def events(
        self,
        task_id: str,
        *,
        last_event_id: int | None = None,
        query: str = "",
        first_event: trio.Event | None = None,
    ) -> list[ServerSentEvent]:
        """Every event of a task's stream, until the server ends it."""
        return await read_events(
            self.url,
            task_id,
            last_event_id=last_event_id,
            query=query,
            first_event=first_event,
            unix_socket=self.unix_socket,
        )


async def read_events(
    base_url: str,
    task_id: str,
    *,
    last_event_id: int | None = None,
    query: str = "",
    first_event: trio.Event | None = None,
    stop_after: Callable[[ServerSentEvent], bool] | None = None,
    unix_socket: str | None = None,
) -> list[ServerSentEvent]:
    """A task's SSE events until the server ends the stream (or `stop_after` says so).

    `first_event` is set once the first event has arrived (the stream is live).
    """
    headers = () if last_event_id is None else (("Last-Event-ID", str(last_event_id)),)
    decoder = SSEDecoder()
    out: list[ServerSentEvent] = []
    url = f"{base_url}/progress/{task_id}{query}"
    async with open_stream("GET", url, headers=headers, unix_socket=unix_socket) as r:
        assert r.status == 200
        assert r.headers.get("content-type", "").startswith("text/event-stream")
        async for chunk in r.chunks:
            for event in decoder.feed(chunk):
                out.append(event)
                if first_event is not None:
                    first_event.set()
                if stop_after is not None and stop_after(event):
                    return out
    return out


class HeldStream:
    """A task's progress stream held open, read in the test's own steps."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._decoder = SSEDecoder()
        self.seen: list[ServerSentEvent] = []

    async def until(self, predicate: Callable[[ServerSentEvent], bool]) -> None:
        """Read on until the newest event is one `predicate` accepts."""
        while not (self.seen and predicate(self.seen[-1])):
            self.seen += self._decoder.feed(await anext(self._chunks))

    async def to_end(self) -> None:
        """Read on until the server ends the stream."""
        async for chunk in self._chunks:
            self.seen += self._decoder.feed(chunk)


@asynccontextmanager
async def held_stream(base_url: str, task_id: str) -> AsyncIterator[HeldStream]:
    """GET /progress/{task_id}, answered 200, held open for the block."""
    async with open_stream("GET", f"{base_url}/progress/{task_id}") as response:
        assert response.status == 200
        yield HeldStream(aiter(response.chunks))


def daemon_config(tmp_path: Path, **overrides: Any) -> Config:
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

Simulator = TypeVar("Simulator")


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
        app = App(daemon_config(tmp_path, **overrides))
        bound = await nursery.start(app.run)
        try:
            yield Daemon(app, bound, sim)
        finally:
            nursery.cancel_scope.cancel()


@dataclass
class Pool(Generic[Simulator]):
    app: App
    bound: Bound
    simulators: list[Simulator]

    @property
    def url(self) -> str:
        return self.bound.url

    async def request(self, method: str, path: str, body: object = None) -> ClientResponse:
        raw = b"" if body is None else json.dumps(body).encode()
        headers = (("Content-Type", "application/json"),) if body is not None else ()
        return await http_request(method, self.url + path, headers=headers, body=raw, timeout=10)

    async def generate(self, **fields: Any) -> str:
        response = await self.request("POST", "/generate", {"prompt": "a red fox", **fields})
        assert response.status == 202, response.body
        task_id: str = response.json()["taskId"]
        return task_id

    async def all_read(self) -> None:
        """Until every backend is connected, read, and its queue known (dispatch may start)."""
        pool = self.app.pool
        while not all(pool.takes_work(b) for b in pool.backends):
            await pool.changed.wait()


@asynccontextmanager
async def running_pool(
    tmp_path: Path,
    simulators: list[SimulatorConfig],
    *,
    first_urls: tuple[str, ...] = (),
    **overrides: Any,
) -> AsyncIterator[Pool[ComfySimulator]]:
    """The daemon with one backend per simulator config (after `first_urls`, backends
    running elsewhere), all on ephemeral ports."""
    async with trio.open_nursery() as nursery:
        sims = [ComfySimulator(config) for config in simulators]
        urls = [*first_urls]
        for sim in sims:
            urls.append(f"http://127.0.0.1:{await nursery.start(sim.run, ('127.0.0.1', 0))}")
        try:
            yield Pool(*await _start_pool_app(nursery, tmp_path, urls, overrides), sims)
        finally:
            nursery.cancel_scope.cancel()


async def _start_pool_app(
    nursery: trio.Nursery, tmp_path: Path, urls: list[str], overrides: dict[str, Any]
) -> tuple[App, Bound]:
    """The daemon, in `nursery`, with `urls` as its backends (the first is comfy_url)."""
    overrides.setdefault("comfy_url", urls[0])
    overrides.setdefault("comfy_urls", tuple(urls[1:]))
    app = App(daemon_config(tmp_path, **overrides))
    bound = await nursery.start(app.run)
    return app, bound


@asynccontextmanager
async def running_process_pool(
    tmp_path: Path,
    simulators: list[SimulatorConfig],
    *,
    first_urls: tuple[str, ...] = (),
    **overrides: Any,
) -> AsyncIterator[Pool[SimulatorProcess]]:
    """Like `running_pool`, but each simulator is a process of its own (a GPU host the
    test can kill -9), driven through its /sim/ endpoints."""
    async with simulator_processes(simulators) as sims, trio.open_nursery() as nursery:
        urls = [*first_urls, *(sim.url for sim in sims)]
        try:
            yield Pool(*await _start_pool_app(nursery, tmp_path, urls, overrides), sims)
        finally:
            nursery.cancel_scope.cancel()


def payloads(events: list[ServerSentEvent]) -> list[dict[str, Any]]:
    return [json.loads(e.data) for e in events]


class Steps(trio.abc.Instrument):
    """Numbers the task steps the scheduler runs (a step: up to the task's next
    checkpoint), so a test can tell which step did what."""

    def __init__(self) -> None:
        self.current = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.current += 1
