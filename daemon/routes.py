"""The daemon's HTTP routes: the public contract of DESIGN.md, on the generic HTTP layer."""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from typing import TYPE_CHECKING

import trio

from daemon.http.types import Request, Response, StreamingResponse, error_response, json_response
from daemon.metrics import MetricsEndpoint
from daemon.source_images import ComfyUnavailable
from daemon.sse_stream import parse_last_event_id
from daemon.tasks import CancelResult, TooManyTasks
from protocol import api
from protocol.errors import RequestError

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


def _is_json(content_type: str | None) -> bool:
    """application/json (any parameters, or a +json type), or no Content-Type at all."""
    if content_type is None:
        return True
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def request_error(exc: RequestError) -> Response:
    return error_response(exc.status_hint, exc.message, dict(exc.details) or None)


def comfy_unavailable(exc: ComfyUnavailable) -> Response:
    busy = error_response(503, str(exc))
    return dataclasses.replace(busy, headers=[*busy.headers, ("Retry-After", "5")])


class Routes:
    """Request handlers; each reads the app's services and answers."""

    def __init__(self, app: App) -> None:
        self.app = app

    def install(self, router: Router) -> None:
        router.add("POST", "/generate", self.generate)
        router.add("GET", "/progress/{task_id}", self.progress)
        router.add("GET", "/tasks/{task_id}", self.task_status)
        router.add("DELETE", "/tasks/{task_id}", self.cancel)
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

        try:
            actor = app.registry.create(spec_for)
        except TooManyTasks as exc:
            busy = error_response(503, str(exc))
            return dataclasses.replace(busy, headers=[*busy.headers, ("Retry-After", "5")])
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
        with trio.move_on_after(JOURNAL_FLUSH_TIMEOUT) as waited:
            await app.journal.flush()
        if waited.cancelled_caught:
            log.error("the journal did not confirm task %s in time", actor.task_id)
        return json_response(202, api.accepted_reply(actor.task_id), headers=NO_STORE)

    def _replayed(self, key: str, body: bytes) -> Response | None:
        """The answer to a retry of a request we already took (same task, nothing new)."""
        existing = self.app.idempotency.lookup(key, body)
        if existing is None:
            return None
        return json_response(
            202,
            api.accepted_reply(existing),
            headers=(*NO_STORE, ("Idempotent-Replayed", "true")),
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
        location = str(reply["imageUrl"])
        return json_response(201, reply, headers=[("Location", location), *NO_STORE])
