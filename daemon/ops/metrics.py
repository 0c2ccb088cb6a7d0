"""The daemon's metrics, served at GET /metrics in Prometheus text format.

Two kinds:

- events counted as they happen, through hooks: every routed request
  (`Router(observer=...)`), every request the server refuses before routing
  (`HttpServer(on_rejected=...)`), every task that ends
  (`TaskRegistry(on_task_end=...)`);
- state read at scrape time from the services, which keep their own plain
  counters (tasks by state, SSE streams, ComfyUI connection).

`METRICS` lists every metric; the README's metrics table is generated from
it (`make docs`) and a test checks that /metrics serves exactly these
families.

Label values are bounded: routes are the router's patterns
(`/tasks/{task_id}`), never raw paths, and methods outside the usual few are
counted as `other`, so no client can make the series grow without limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from daemon.http.types import Request, Response
from daemon.ops.prometheus import (
    CONTENT_TYPE,
    LabelValues,
    MetricSpec,
    MetricType,
    ScrapeCollector,
    counter,
    exposition,
    histogram,
)
from protocol.task import Phase, TaskState

if TYPE_CHECKING:
    from daemon.api.sse_stream import StreamHub
    from daemon.comfy.backend import ComfyBackend

PREFIX: Final = "comfy_progress_"
UNMATCHED_ROUTE: Final = "unmatched"  # 404s and 405s: no pattern to name
KNOWN_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
OUTCOMES: Final = ("completed", "error", "cancelled")
# Image generation takes from about a second (a cached or tiny graph) to
# minutes (large images, a busy GPU, a long queue).
DURATION_BUCKETS: Final[tuple[float, ...]] = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


def _spec(name: str, kind: MetricType, help: str, *labels: str) -> MetricSpec:
    return MetricSpec(PREFIX + name, kind, help, labels)


BUILD_INFO = _spec(
    "build_info", "gauge", "always 1; the version label says which build runs", "version"
)
START_TIME = _spec("start_time_seconds", "gauge", "when the daemon started (Unix time, seconds)")
HTTP_REQUESTS = _spec(
    "http_requests_total",
    "counter",
    "HTTP requests answered, by method, route pattern (`unmatched` for 404/405) and status; "
    "a stream is counted when its response starts",
    "method",
    "route",
    "status",
)
HTTP_REJECTED = _spec(
    "http_rejected_total",
    "counter",
    "requests the HTTP server refused before routing, by status: 400 malformed, 401 no valid "
    "API token, 403 origin not allowed, 408 too slow, 413 body too large, 421 host not allowed, "
    "431 head too large, 501 unknown transfer coding, 503 connection limit, 505 HTTP version "
    "other than 1.x",
    "status",
)
HTTP_CONNECTIONS = _spec("http_connections", "gauge", "client connections open now")
TASKS = _spec(
    "tasks",
    "gauge",
    "tasks the daemon tracks now, by state (queued, running, waiting, requeued, completed, error); "
    "finished tasks stay for task_retention seconds",
    "state",
)
GENERATION_DURATION = _spec(
    "generation_duration_seconds",
    "histogram",
    "seconds from a task's creation to its end, by outcome (completed, error, cancelled), "
    "for tasks that ended while this process ran",
    "outcome",
)
TASK_ERRORS = _spec(
    "task_errors_total",
    "counter",
    "tasks that ended in an error, by error code (cancelled, comfy_error, lost, ...)",
    "code",
)
SSE_SUBSCRIBERS = _spec("sse_subscribers", "gauge", "progress streams (GET /progress) open now")
SSE_EVENTS = _spec(
    "sse_events_total",
    "counter",
    "events written to progress streams (progress, complete, error-event)",
)
SSE_HEARTBEATS = _spec(
    "sse_heartbeats_total", "counter", "`: heartbeat` comments written to progress streams"
)
BACKEND_UP = _spec(
    "backend_up", "gauge", "1 while the WebSocket to this ComfyUI is open, else 0", "backend"
)
BACKEND_LOAD = _spec(
    "backend_load",
    "gauge",
    "prompts in this ComfyUI's queue (running + pending, anyone's) as dispatch counts them; "
    "it takes a task while this is below backend_max_pending",
    "backend",
)
BACKEND_RECONNECTS = _spec(
    "backend_reconnects_total",
    "counter",
    "WebSocket connections to ComfyUI opened after the first one",
    "backend",
)
BACKEND_FRAMES = _spec(
    "backend_frames_total", "counter", "WebSocket frames received from ComfyUI", "backend"
)
BACKEND_PROTOCOL_ERRORS = _spec(
    "backend_protocol_errors_total",
    "counter",
    "frames from ComfyUI that could not be parsed (ignored)",
    "backend",
)

METRICS: Final[tuple[MetricSpec, ...]] = (
    BUILD_INFO,
    START_TIME,
    HTTP_REQUESTS,
    HTTP_REJECTED,
    HTTP_CONNECTIONS,
    TASKS,
    GENERATION_DURATION,
    TASK_ERRORS,
    SSE_SUBSCRIBERS,
    SSE_EVENTS,
    SSE_HEARTBEATS,
    BACKEND_UP,
    BACKEND_LOAD,
    BACKEND_RECONNECTS,
    BACKEND_FRAMES,
    BACKEND_PROTOCOL_ERRORS,
)


HISTOGRAM_BUCKETS: Final[Mapping[str, tuple[float, ...]]] = {
    GENERATION_DURATION.name: DURATION_BUCKETS,
}


def outcome_of(state: TaskState) -> str:
    if state.phase is Phase.COMPLETED:
        return "completed"
    if state.error is not None and state.error.code == "cancelled":
        return "cancelled"
    return "error"


def _version() -> str:
    try:
        return metadata.version("comfy-progress")
    except metadata.PackageNotFoundError:
        return "unknown"


class DaemonMetrics:
    """The daemon's metrics in a registry of its own: counted through hooks, or read at scrape.

    Families are registered in `METRICS` order, so /metrics lists them in
    the order of the README's table.
    """

    def __init__(
        self,
        *,
        backends: Sequence[ComfyBackend],
        task_phases: Callable[[], Iterable[Phase]],
        streams: StreamHub,
        open_connections: Callable[[], int],
        started_at: float | None = None,
    ) -> None:
        """Everything passed is read only at scrape time: `task_phases` gives every
        tracked task's phase now, `open_connections` the HTTP server's count."""
        self.backends = backends
        self.task_phases = task_phases
        self.streams = streams
        self.open_connections = open_connections
        self.started_at = time.time() if started_at is None else started_at
        self.version = _version()
        self.requests = counter(HTTP_REQUESTS)
        self.rejected = counter(HTTP_REJECTED)
        self.task_errors = counter(TASK_ERRORS)
        self.durations = histogram(GENERATION_DURATION, HISTOGRAM_BUCKETS[GENERATION_DURATION.name])
        for outcome in OUTCOMES:
            self.durations.labels(outcome)  # shown (all zeros) before the first one ends
        counted: dict[MetricSpec, Collector] = {
            HTTP_REQUESTS: self.requests,
            HTTP_REJECTED: self.rejected,
            TASK_ERRORS: self.task_errors,
            GENERATION_DURATION: self.durations,
        }
        read_at_scrape = self._scrape_readers()
        self.registry = CollectorRegistry()
        for spec in METRICS:
            collector = counted.get(spec) or ScrapeCollector(spec, read_at_scrape[spec])
            self.registry.register(collector)

    def _scrape_readers(self) -> dict[MetricSpec, Callable[[], Mapping[LabelValues, float]]]:
        backends = self.backends
        streams = self.streams

        def tasks() -> dict[LabelValues, float]:
            counts: dict[LabelValues, float] = {(phase.value,): 0 for phase in Phase}
            for phase in self.task_phases():
                counts[(phase.value,)] += 1
            return counts

        return {
            BUILD_INFO: lambda: {(self.version,): 1},
            START_TIME: lambda: {(): self.started_at},
            HTTP_CONNECTIONS: lambda: {(): self.open_connections()},
            TASKS: tasks,
            SSE_SUBSCRIBERS: lambda: {(): streams.open_streams},
            SSE_EVENTS: lambda: {(): streams.events_sent},
            SSE_HEARTBEATS: lambda: {(): streams.heartbeats_sent},
            BACKEND_UP: lambda: {(b.name,): int(b.is_connected()) for b in backends},
            BACKEND_LOAD: lambda: {(b.name,): b.load() for b in backends},
            BACKEND_RECONNECTS: lambda: {(b.name,): b.reconnects for b in backends},
            BACKEND_FRAMES: lambda: {(b.name,): b.frames_received for b in backends},
            BACKEND_PROTOCOL_ERRORS: lambda: {(b.name,): b.protocol_errors for b in backends},
        }

    # -- hooks

    def observe_request(self, method: str, route: str | None, status: int) -> None:
        """Router observer: one routed request and the status it was answered with."""
        shown = method if method in KNOWN_METHODS else "other"
        self.requests.labels(shown, route or UNMATCHED_ROUTE, str(status)).inc()

    def observe_rejected(self, status: int) -> None:
        """HttpServer hook: a request answered before it reached the router."""
        self.rejected.labels(str(status)).inc()

    def observe_task_end(self, state: TaskState) -> None:
        """A task reached completed or error in this process."""
        finished_at = state.finished_at if state.finished_at is not None else time.time()
        # Wall-clock times: a clock step must not make a duration negative.
        duration = max(0.0, finished_at - state.created_at)
        self.durations.labels(outcome_of(state)).observe(duration)
        if state.error is not None:
            self.task_errors.labels(state.error.code).inc()

    def render(self) -> bytes:
        return exposition(self.registry)


class MetricsEndpoint:
    """GET /metrics."""

    def __init__(self, metrics: DaemonMetrics) -> None:
        self.metrics = metrics

    async def __call__(self, request: Request) -> Response:
        body = self.metrics.render()
        headers = (("Content-Type", CONTENT_TYPE), ("Cache-Control", "no-store"))
        return Response(200, headers, body)
