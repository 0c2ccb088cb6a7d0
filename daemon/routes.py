"""The daemon's HTTP routes: the public contract of DESIGN.md, on the generic HTTP layer."""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from typing import TYPE_CHECKING

import trio

from daemon.clients import client_key, parse_networks
from daemon.http.types import Request, Response, StreamingResponse, error_response, json_response
from daemon.images import StorageError
from daemon.journal import JournalUnavailable
from daemon.metrics import MetricsEndpoint
from daemon.preview_route import PreviewEndpoint
from daemon.source_images import ComfyUnavailable
from daemon.tasks import CancelResult, QueueFull, TooManyTasks
from protocol import api
from protocol.errors import RequestError
from protocol.sse import parse_last_event_id

if TYPE_CHECKING:
    from daemon.app import App
    from daemon.http.router import Router

log = logging.getLogger(__name__)

SSE_HEADERS = (
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("Cache-Control", "no-cache"),
    ("X-Accel-Buffering", "no"),  # nginx: do not buffer this response
)
NO_STORE = (("Cache-Control", "no-store"),)
JOURNAL_FLUSH_TIMEOUT = 5.0
QUEUE_FULL_RETRY_AFTER = 10  # seconds; a queued task takes at least that long to make room


def _is_json(content_type: str | None) -> bool:
    """application/json (any parameters, or a +json type).

    No Content-Type is refused too: a browser sends such a POST cross-site
    without asking first (no preflight), JSON needs one.
    """
    if content_type is None:
        return False
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def request_error(exc: RequestError) -> Response:
    return error_response(exc.status_hint, exc.message, dict(exc.details) or None)


def unavailable(reason: str, retry_after: int = 5) -> Response:
    """503 with the reason and a Retry-After."""
    busy = error_response(503, reason)
    return dataclasses.replace(busy, headers=[*busy.headers, ("Retry-After", str(retry_after))])


def too_many(reason: str) -> Response:
    """429 with the reason and a Retry-After."""
    busy = error_response(429, reason)
    retry = ("Retry-After", str(QUEUE_FULL_RETRY_AFTER))
    return dataclasses.replace(busy, headers=[*busy.headers, retry])


def comfy_unavailable(exc: ComfyUnavailable) -> Response:
    return unavailable(str(exc))


class Routes:
    """Request handlers; each reads the app's services and answers."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.trusted_proxies = parse_networks(app.config.trusted_proxies)

    def install(self, router: Router) -> None:
        router.add("POST", "/generate", self.generate)
        router.add("GET", "/progress/{task_id}", self.progress)
        router.add("GET", "/tasks/{task_id}", self.task_status)
        router.add("DELETE", "/tasks/{task_id}", self.cancel)
        router.add("GET", "/tasks/{task_id}/preview", PreviewEndpoint(self.app))
        router.add("GET", "/healthz", self.healthz)
        router.add("GET", "/readyz", self.readyz)
        router.add("GET", "/workflows", self.workflows)
        router.add("POST", "/upload", self.upload, max_body=self.app.config.max_upload_bytes)
        router.add("GET", "/metrics", MetricsEndpoint(self.app))

    async def generate(self, request: Request) -> Response:
        app = self.app
        if not _is_json(request.headers.get("content-type")):
            return error_response(
                415,
                "POST /generate takes a JSON body (Content-Type: application/json)",
                {"contentType": request.headers.get("content-type")},
            )
        key = request.headers.get("idempotency-key")
        try:
            if key is not None and (replay := self._replayed(key, request.body)) is not None:
                return replay
            spec_for = await app.binder.prepare(request.body, app.backend.http)
            # Checked again: a twin request may have got in while we awaited.
            if key is not None and (replay := self._replayed(key, request.body)) is not None:
                return replay
        except RequestError as exc:
            return request_error(exc)
        except ComfyUnavailable as exc:
            return comfy_unavailable(exc)

        if app.journal.failure is not None:
            return unavailable(app.journal.failure)
        client = client_key(request.headers, request.peer, self.trusted_proxies)
        try:
            actor = app.registry.create(spec_for, client=client)
        except TooManyTasks as exc:
            return unavailable(str(exc))
        except QueueFull as exc:
            return too_many(str(exc))
        if key is not None:
            app.idempotency.remember(key, request.body, actor.task_id)
        log.info(
            "task created",
            extra={
                "task_id": actor.task_id,
                "prompt_id": actor.prompt_id,
                "backend": app.backend.name,
            },
        )
        # The task is in the journal before the client hears of it, so a crash
        # right after this answer cannot lose it.
        problem = None
        try:
            with trio.move_on_after(JOURNAL_FLUSH_TIMEOUT) as waited:
                await app.journal.flush()
            if waited.cancelled_caught:
                problem = f"the journal did not confirm the task within {JOURNAL_FLUSH_TIMEOUT:g} s"
        except JournalUnavailable as exc:
            problem = str(exc)
        if problem is not None:
            # Never accept what a restart would lose: take the task back.
            log.error("refusing task %s: %s", actor.task_id, problem)
            actor.cancel()
            return unavailable(problem)
        return json_response(202, api.accepted_reply(actor.task_id), headers=NO_STORE)

    def _replayed(self, key: str, body: bytes) -> Response | None:
        """The answer to a retry of a request we already took (same task, nothing new)."""
        existing = self.app.idempotency.lookup(key, body)
        if existing is None:
            return None
        replayed = (*NO_STORE, ("Idempotent-Replayed", "true"))
        if self.app.registry.get(existing) is not None:
            return json_response(202, api.accepted_reply(existing), headers=replayed)
        # The task has ended and been forgotten since: say how it ended.
        outcome = self.app.idempotency.outcome(key)
        if outcome is not None:
            return json_response(200, outcome, headers=replayed)
        return error_response(
            410,
            "the task made with this Idempotency-Key has ended and is forgotten; "
            "its outcome is unknown (it ended before the daemon restarted)",
            {"field": "Idempotency-Key", "taskId": existing},
        )

    def _unknown_task(self, task_id: str) -> Response:
        return error_response(
            404,
            "unknown task",
            {
                "taskId": task_id,
                "hint": f"finished tasks are kept for {self.app.config.task_retention:g} s",
            },
        )

    async def progress(self, request: Request) -> Response | StreamingResponse:
        task_id = request.path_params["task_id"]
        actor = self.app.registry.get(task_id)
        if actor is None:
            return self._unknown_task(task_id)
        # The header first, then the query (EventSource cannot set headers on its first try).
        last_id = parse_last_event_id(
            request.headers.get("last-event-id"), request.query.get("lastEventId")
        )
        return StreamingResponse(
            200,
            SSE_HEADERS,
            partial(self.app.streams.stream, actor.broadcaster, last_id),
            watches_peer=True,  # the hub's stream notices the client leaving
        )

    async def task_status(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        actor = self.app.registry.get(task_id)
        if actor is None:
            return self._unknown_task(task_id)
        snapshot = actor.broadcaster.latest
        body: dict[str, object] = {"taskId": task_id}
        if snapshot is not None:
            body = {**snapshot.payload, "version": snapshot.version}
        return json_response(200, body, headers=NO_STORE)

    async def cancel(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        actor = self.app.registry.get(task_id)
        if actor is None:
            return self._unknown_task(task_id)
        result = actor.cancel()
        if result is CancelResult.ALREADY_FINISHED:
            status = actor.state.phase.value
            return json_response(
                200,
                {
                    "taskId": task_id,
                    "status": status,
                    "cancelled": False,
                    "message": f"the task already ended ({status}); nothing to cancel",
                },
            )
        return json_response(
            202,
            {
                "taskId": task_id,
                "status": "cancelling",
                "cancelled": True,
                "message": "cancelling; the progress stream ends with error code 'cancelled'",
            },
        )

    async def healthz(self, request: Request) -> Response:
        return json_response(200, {"status": "ok"}, headers=NO_STORE)

    async def readyz(self, request: Request) -> Response:
        backend = self.app.backend
        body = {"ready": backend.is_connected(), "backend": backend.name}
        return json_response(200 if backend.is_connected() else 503, body, headers=NO_STORE)

    async def workflows(self, request: Request) -> Response:
        return json_response(200, self.app.workflows.to_json())

    async def upload(self, request: Request) -> Response:
        """An inpainting source image: the raw PNG or JPEG body (see protocol/upload.py)."""
        try:
            reply = await self.app.binder.sources.accept_upload(
                request.headers.get("content-type"), request.body, self.app.backend.http
            )
        except RequestError as exc:
            return request_error(exc)
        except ComfyUnavailable as exc:
            return comfy_unavailable(exc)
        except StorageError as exc:
            log.error("upload refused: %s", exc)
            return unavailable(str(exc))
        location = str(reply["imageUrl"])
        return json_response(201, reply, headers=[("Location", location), *NO_STORE])
