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
from collections.abc import Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Final

from daemon.http.types import Request, Response
from daemon.prometheus import (
    CONTENT_TYPE,
    Counter,
    Family,
    Histogram,
    LabelValues,
    MetricSpec,
    MetricType,
    family_of,
    render,
)
from protocol.task import Phase, TaskState

if TYPE_CHECKING:
    from daemon.app import App

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
    "431 head too large, 503 connection limit",
    "status",
)
HTTP_CONNECTIONS = _spec("http_connections", "gauge", "client connections open now")
TASKS = _spec(
    "tasks",
    "gauge",
    "tasks the daemon tracks now, by state (queued, running, completed, error); "
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
    """The counted metrics and their hooks; `render(app)` adds what is read at scrape time."""

    def __init__(self, *, started_at: float | None = None) -> None:
        self.started_at = time.time() if started_at is None else started_at
        self.version = _version()
        self.requests = Counter(HTTP_REQUESTS)
        self.rejected = Counter(HTTP_REJECTED)
        self.task_errors = Counter(TASK_ERRORS)
        self.durations = Histogram(GENERATION_DURATION, HISTOGRAM_BUCKETS[GENERATION_DURATION.name])
        for outcome in OUTCOMES:
            self.durations.declare(outcome)

    # -- hooks

    def observe_request(self, method: str, route: str | None, status: int) -> None:
        """Router observer: one routed request and the status it was answered with."""
        shown = method if method in KNOWN_METHODS else "other"
        self.requests.inc(shown, route or UNMATCHED_ROUTE, str(status))

    def observe_rejected(self, status: int) -> None:
        """HttpServer hook: a request answered before it reached the router."""
        self.rejected.inc(str(status))

    def observe_task_end(self, state: TaskState) -> None:
        """A task reached completed or error in this process."""
        finished_at = state.finished_at if state.finished_at is not None else time.time()
        # Wall-clock times: a clock step must not make a duration negative.
        duration = max(0.0, finished_at - state.created_at)
        self.durations.observe(duration, outcome_of(state))
        if state.error is not None:
            self.task_errors.inc(state.error.code)

    # -- exposition

    def families(self, app: App) -> list[Family]:
        tasks: dict[LabelValues, float] = {(phase.value,): 0 for phase in Phase}
        for actor in app.registry.actors():
            tasks[(actor.state.phase.value,)] += 1
        backends = app.pool.backends
        streams = app.streams
        return [
            family_of(BUILD_INFO, {(self.version,): 1}),
            family_of(START_TIME, {(): self.started_at}),
            self.requests.family(),
            self.rejected.family(),
            family_of(HTTP_CONNECTIONS, {(): app.server.active_connections}),
            family_of(TASKS, tasks),
            self.durations.family(),
            self.task_errors.family(),
            family_of(SSE_SUBSCRIBERS, {(): streams.open_streams}),
            family_of(SSE_EVENTS, {(): streams.events_sent}),
            family_of(SSE_HEARTBEATS, {(): streams.heartbeats_sent}),
            family_of(BACKEND_UP, {(b.name,): int(b.is_connected()) for b in backends}),
            family_of(BACKEND_RECONNECTS, {(b.name,): b.reconnects for b in backends}),
            family_of(BACKEND_FRAMES, {(b.name,): b.frames_received for b in backends}),
            family_of(BACKEND_PROTOCOL_ERRORS, {(b.name,): b.protocol_errors for b in backends}),
        ]

    def render(self, app: App) -> str:
        return render(self.families(app))


class MetricsEndpoint:
    """GET /metrics."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, request: Request) -> Response:
        body = self.app.metrics.render(self.app).encode("utf-8")
        headers = (("Content-Type", CONTENT_TYPE), ("Cache-Control", "no-store"))
        return Response(200, headers, body)
