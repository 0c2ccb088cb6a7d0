"""The daemon's HTTP routes: the public contract of DESIGN.md, on the generic HTTP layer."""

from __future__ import annotations

import dataclasses
import logging
import time
from functools import partial
from typing import TYPE_CHECKING

import trio
from coredis.exceptions import RedisError

from daemon.api.backends_view import backends_json
from daemon.api.binder import SpecFactory
from daemon.api.clients import client_key, parse_networks
from daemon.api.preview_route import PreviewEndpoint
from daemon.config import list_setting
from daemon.http.types import (
    BodyWriter,
    Handler,
    HandlerResult,
    Request,
    Response,
    StreamingResponse,
    error_response,
    json_response,
    unavailable,
)
from daemon.images.store import StorageError
from daemon.ops.metrics import MetricsEndpoint
from daemon.shared.capabilities import why_nowhere
from daemon.shared.positions import WAITING_STEPS
from daemon.shared.store import ClientAtLimit, ClientLimit
from daemon.shared.worker_registry import published_capabilities
from daemon.tasks.actor import CancelResult, new_prompt_id
from daemon.tasks.journal import FLUSH_TIMEOUT as JOURNAL_FLUSH_TIMEOUT
from daemon.tasks.journal import JournalUnavailable
from daemon.tasks.registry import QueueFull, TooManyTasks, client_at_limit, new_task_id
from protocol import api
from protocol.errors import RequestError
from protocol.sse import parse_last_event_id
from protocol.upload import check_upload_type

if TYPE_CHECKING:
    from daemon.api.binder import Binder
    from daemon.api.idempotency import IdempotencyKeys
    from daemon.api.sse_stream import StreamHub
    from daemon.comfy.dispatch import Dispatcher
    from daemon.comfy.pool import BackendPool
    from daemon.config import Config
    from daemon.http.router import Router
    from daemon.images.previews import PreviewStore
    from daemon.ops.metrics import DaemonMetrics
    from daemon.shared.service import SharedService
    from daemon.tasks.actor import TaskActor
    from daemon.tasks.broadcast import Snapshot
    from daemon.tasks.journal import Journal
    from daemon.tasks.registry import TaskRegistry
    from protocol.workflow import Catalog

log = logging.getLogger(__name__)

SSE_HEADERS = (
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("Cache-Control", "no-cache"),
    ("X-Accel-Buffering", "no"),  # nginx: do not buffer this response
)
NO_STORE = (("Cache-Control", "no-store"),)
REPLAYED = (*NO_STORE, ("Idempotent-Replayed", "true"))
# To a reader that already has a task's last event: nothing follows, and 204
# tells an EventSource to stop reconnecting (HTML standard, server-sent events).
NOTHING_MORE = Response(204, NO_STORE)
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


def _json_required(request: Request) -> Response | None:
    """415 for a POST /generate whose body is not declared JSON (its head tells)."""
    if _is_json(request.headers.get("content-type")):
        return None
    return error_response(
        415,
        "POST /generate takes a JSON body (Content-Type: application/json)",
        {"contentType": request.headers.get("content-type")},
    )


def _image_required(request: Request) -> Response | None:
    """415 for a POST /upload whose Content-Type is no image type it takes."""
    try:
        check_upload_type(request.headers.get("content-type"))
    except RequestError as exc:
        return request_error(exc)
    return None


def _has_the_end(latest: Snapshot | None, last_id: int | None) -> bool:
    """The client's Last-Event-ID names the task's terminal event: a stream
    would send nothing but heartbeats, for good."""
    return latest is not None and latest.terminal and last_id == latest.version


def _accepted_again(task_id: str) -> Response:
    """A retry's answer: the task its Idempotency-Key already made."""
    return json_response(202, api.accepted_reply(task_id), headers=REPLAYED)


def _forgotten_key(task_id: str, why: str) -> Response:
    """A retry whose key's task has ended and is forgotten, its outcome unknown (`why`)."""
    return error_response(
        410,
        f"the task made with this Idempotency-Key has ended and is forgotten; {why}",
        {"field": "Idempotency-Key", "taskId": task_id},
    )


def request_error(exc: RequestError) -> Response:
    return error_response(exc.status_hint, exc.message, dict(exc.details) or None)


STORE_UNREACHABLE = "the shared task store is unreachable; try again"


def store_unreachable_is_503(handler: Handler) -> Handler:
    """A route that asks Redis about a task answers "try again" (503, Retry-After) while
    Redis does not answer, as POST /generate does, not the server's 500."""

    async def answer(request: Request) -> HandlerResult:
        try:
            return await handler(request)
        except RedisError as exc:
            log.error(
                "cannot read a task in Redis for %s %s: %s", request.method, request.path, exc
            )
            return unavailable(STORE_UNREACHABLE)

    return answer


def _unchanged(handler: Handler) -> Handler:
    return handler


def too_many(reason: str) -> Response:
    """429 with the reason and a Retry-After."""
    busy = error_response(429, reason)
    retry = ("Retry-After", str(QUEUE_FULL_RETRY_AFTER))
    return dataclasses.replace(busy, headers=[*busy.headers, retry])


class Routes:
    """Request handlers; each reads the services it was given and answers."""

    def __init__(
        self,
        *,
        config: Config,
        workflows: Catalog,
        binder: Binder,
        registry: TaskRegistry,
        journal: Journal,
        idempotency: IdempotencyKeys,
        pool: BackendPool,
        dispatcher: Dispatcher,
        streams: StreamHub,
        previews: PreviewStore,
        metrics: DaemonMetrics,
        shared: SharedService | None,
    ) -> None:
        """`shared`: the Redis queue this daemon fronts, None for a daemon of its own."""
        self.config = config
        self.catalog = workflows
        self.binder = binder
        self.registry = registry
        self.journal = journal
        self.idempotency = idempotency
        self.pool = pool
        self.dispatcher = dispatcher
        self.streams = streams
        self.previews = previews
        self.metrics = metrics
        self.shared = shared
        self.trusted_proxies = parse_networks(config.trusted_proxies)
        # A token counts as the client only when the access policy checks tokens.
        self.tokens_checked = bool(list_setting(config.api_tokens))
        # Keys whose task waits for the journal before its 202: set once it is
        # accepted or refused (a twin must not hear of a task that may be refused).
        self._confirming: dict[str, trio.Event] = {}

    def install(self, router: Router) -> None:
        # check_head: a client waiting for 100 Continue hears a 415 before it sends a body.
        router.add("POST", "/generate", self.generate, check_head=_json_required)
        preview = PreviewEndpoint(
            registry=self.registry, previews=self.previews, shared=self.shared
        )
        # A task not held here is read from Redis: while it does not answer, try again.
        read = store_unreachable_is_503 if self.shared is not None else _unchanged
        router.add("GET", "/progress/{task_id}", read(self.progress))
        router.add("GET", "/tasks/{task_id}", read(self.task_status))
        router.add("DELETE", "/tasks/{task_id}", read(self.cancel))
        router.add("GET", "/tasks/{task_id}/preview", read(preview))
        router.add("GET", "/workflows", self.workflows)
        router.add(
            "POST",
            "/upload",
            self.upload,
            max_body=self.config.max_upload_bytes,
            check_head=_image_required,
        )
        self.install_ops(router)

    def install_ops(self, router: Router) -> None:
        """What operators and load balancers read; all a worker (role=worker) serves."""
        router.add("GET", "/healthz", self.healthz)
        router.add("GET", "/readyz", self.readyz)
        router.add("GET", "/backends", self.backends)
        router.add("GET", "/metrics", MetricsEndpoint(self.metrics))

    async def generate(self, request: Request) -> Response:
        if (refusal := _json_required(request)) is not None:
            return refusal
        key = request.headers.get("idempotency-key")
        try:
            replay = None if key is None else await self._settled_replay(key, request.body)
            if replay is not None:
                return replay
            # A retry, maybe at another front: its task, before any check could refuse it.
            if (
                key is not None
                and self.shared is not None
                and (replay := await self._replayed_shared(key, request.body)) is not None
            ):
                return replay
            spec_for = await self.binder.prepare(request.body)
        except RequestError as exc:
            return request_error(exc)
        except StorageError as exc:  # the source image cannot be read now
            log.error("cannot read a source image: %s", exc)
            return unavailable(str(exc))
        try:
            return await self._take(request, key, spec_for)
        finally:
            # Retention kept the source since it was read: the task holds it now.
            self.binder.release(spec_for)

    async def _take(self, request: Request, key: str | None, spec_for: SpecFactory) -> Response:
        """A checked request's task: made (202), or refused."""
        try:
            # Checked again: a twin request may have got in while we awaited (and
            # nothing awaits from here until a local task is made and its key kept).
            replay = None if key is None else await self._settled_replay(key, request.body)
            if replay is not None:
                return replay
        except RequestError as exc:
            return request_error(exc)
        if (refusal := self._runnable_nowhere(spec_for)) is not None:
            return refusal
        client = client_key(
            request.headers, request.peer, self.trusted_proxies, tokens_checked=self.tokens_checked
        )
        if self.shared is not None:
            limit = self.config.max_queued_tasks_per_client
            limited = ClientLimit(client, limit) if limit else None
            return await self._submit_shared(spec_for, key, request.body, limited)

        if self.journal.failure is not None:
            return unavailable(self.journal.failure)
        try:
            actor = self.registry.create(spec_for, client=client, needs=spec_for.needs)
        except TooManyTasks as exc:
            return unavailable(str(exc))
        except QueueFull as exc:
            return too_many(str(exc))
        if key is None:
            return await self._confirm(actor, None)
        self.idempotency.remember(key, request.body, actor.task_id)
        confirmed = self._confirming[key] = trio.Event()
        try:
            return await self._confirm(actor, key)
        finally:
            del self._confirming[key]
            confirmed.set()

    async def _confirm(self, actor: TaskActor, key: str | None) -> Response:
        """The 202 once the journal holds the task; else the task is taken back (503)."""
        log.info(
            "task created",
            extra={
                "task_id": actor.task_id,
                "prompt_id": actor.prompt_id,
            },
        )
        # The task is in the journal before the client hears of it, so a crash
        # right after this answer cannot lose it.
        problem = await self._journalled("the task")
        if problem is not None:
            # Never accept what a restart would lose: take the task back.
            log.error("refusing task %s: %s", actor.task_id, problem)
            actor.cancel()
            if key is not None:  # the 503 says try again: a retry makes a new task
                self.idempotency.forget(key, actor.task_id)
            return unavailable(problem)
        return json_response(202, api.accepted_reply(actor.task_id), headers=NO_STORE)

    async def _journalled(self, what: str) -> str | None:
        """Wait until the journal holds what was recorded so far; why not, if it cannot."""
        try:
            with trio.move_on_after(JOURNAL_FLUSH_TIMEOUT) as waited:
                await self.journal.flush()
        except JournalUnavailable as exc:
            return str(exc)
        if waited.cancelled_caught:
            return f"the journal did not confirm {what} within {JOURNAL_FLUSH_TIMEOUT:g} s"
        return None

    async def _submit_shared(
        self, spec_for: SpecFactory, key: str | None, body: bytes, client: ClientLimit | None
    ) -> Response:
        """Into Redis' queue: any worker takes it, any daemon answers for it."""
        shared = self.shared
        assert shared is not None
        now = time.time()
        spec = spec_for(new_task_id(now), new_prompt_id(), int(now * 1000))
        try:
            # What the workers published they can run: the pool's 422, service-wide.
            readings = await published_capabilities(shared.store)
            if (reasons := why_nowhere(readings, spec_for.needs)) is not None:
                return self._refused(reasons)
            # max_queued_tasks counts the whole service's queue, not this daemon's.
            unfinished = await shared.store.unfinished_count()
            if unfinished >= self.config.max_queued_tasks:
                return too_many(
                    f"{unfinished} tasks are waiting or running (the most the service "
                    "takes); try again later"
                )
            # The key is claimed in the step that queues the task: a twin at
            # another front that got there first is answered with its task.
            existing = await shared.submit(
                spec, now, None if key is None else (key, body), client=client
            )
            if existing is not None:
                return _accepted_again(existing)
        except ClientAtLimit:
            assert client is not None
            return too_many(client_at_limit(client.limit))
        except RequestError as exc:
            return request_error(exc)
        except RedisError as exc:
            log.error("cannot queue a task in Redis: %s", exc)
            return unavailable(STORE_UNREACHABLE)
        log.info("task queued in Redis", extra={"task_id": spec.task_id})
        return json_response(202, api.accepted_reply(spec.task_id), headers=NO_STORE)

    def _runnable_nowhere(self, spec_for: SpecFactory) -> Response | None:
        """422 when, by their last readings, no backend has what the workflow needs."""
        if not self.pool.backends:
            return None  # a front: the workers' capabilities are theirs to check
        reasons = self.pool.why_nowhere(spec_for.needs)
        if reasons is None:
            return None
        return self._refused(reasons)

    @staticmethod
    def _refused(reasons: dict[str, str]) -> Response:
        missing = sorted(set(reasons.values()))
        return error_response(
            422,
            f"no ComfyUI backend can run this workflow: it lacks {', '.join(missing)}",
            {"missing": missing, "backends": reasons},
        )

    async def _replayed_shared(self, key: str, body: bytes) -> Response | None:
        """The task a retry's key already made in Redis' queue (None: a new key)."""
        shared = self.shared
        assert shared is not None
        try:
            existing = await shared.idempotency.lookup(key, body)
            if existing is None:
                return None
            if await shared.latest(existing) is not None:
                return _accepted_again(existing)
            # A key is written with its task, so no task now means: forgotten since.
            outcome = await shared.outcome(existing)
        except RedisError as exc:
            log.error("cannot read an idempotency key in Redis: %s", exc)
            return unavailable(STORE_UNREACHABLE)
        if outcome is not None:
            return json_response(200, outcome, headers=REPLAYED)
        return _forgotten_key(
            existing,
            "its outcome is unknown (it never ended, or the key was recorded by a "
            "version that kept no outcomes)",
        )

    async def _settled_replay(self, key: str, body: bytes) -> Response | None:
        """`_replayed`, once the key's task is accepted or refused."""
        while (pending := self._confirming.get(key)) is not None:
            await pending.wait()
        return self._replayed(key, body)

    def _replayed(self, key: str, body: bytes) -> Response | None:
        """The answer to a retry of a request we already took (same task, nothing new)."""
        existing = self.idempotency.lookup(key, body)
        if existing is None:
            return None
        if self.registry.get(existing) is not None:
            return _accepted_again(existing)
        # The task has ended and been forgotten since: say how it ended.
        outcome = self.idempotency.outcome(key)
        if outcome is not None:
            return json_response(200, outcome, headers=REPLAYED)
        return _forgotten_key(
            existing,
            "its outcome is unknown (the key was recorded by a version that kept no outcomes)",
        )

    def _unknown_task(self, task_id: str) -> Response:
        return error_response(
            404,
            "unknown task",
            {
                "taskId": task_id,
                "hint": f"finished tasks are kept for {self.config.task_retention:g} s",
            },
        )

    async def progress(self, request: Request) -> Response | StreamingResponse:
        task_id = request.path_params["task_id"]
        actor = self.registry.get(task_id)
        # The header first, then the query (EventSource cannot set headers on its first try).
        last_id = parse_last_event_id(
            request.headers.get("last-event-id"), request.query.get("lastEventId")
        )
        if actor is None and self.shared is not None:
            return await self._shared_progress(task_id, last_id)
        if actor is None:
            return self._unknown_task(task_id)
        if _has_the_end(actor.broadcaster.latest, last_id):
            return NOTHING_MORE
        return StreamingResponse(
            200,
            SSE_HEADERS,
            partial(self.streams.stream, actor.broadcaster, last_id),
            watches_peer=True,  # the hub's stream notices the client leaving
        )

    async def _shared_progress(
        self, task_id: str, last_id: int | None
    ) -> Response | StreamingResponse:
        """Any task, from its Redis stream (one reader per daemon, fanned out here)."""
        shared = self.shared
        assert shared is not None
        # A task this daemon already reads costs Redis nothing more per viewer...
        first = shared.watcher.current(task_id)
        if first is None or (last_id is not None and last_id > first.version):
            # ...unless our reader lags behind what the viewer saw on another daemon:
            # Redis has it (ids mean the same everywhere), and older is going backwards.
            first = await shared.latest(task_id) or first
        if first is None:
            return self._unknown_task(task_id)
        if _has_the_end(first, last_id):
            return NOTHING_MORE

        async def stream(writer: BodyWriter) -> None:
            async with shared.watcher.watching(task_id, first) as broadcaster:
                await self.streams.stream(broadcaster, last_id, writer)

        return StreamingResponse(
            200,
            SSE_HEADERS,
            stream,
            watches_peer=True,  # the hub's stream notices the client leaving
        )

    async def task_status(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        actor = self.registry.get(task_id)
        if actor is None and (shared := self.shared) is not None:
            snapshot = shared.watcher.current(task_id) or await shared.latest(task_id)
            if snapshot is None:
                return self._unknown_task(task_id)
            found = {**snapshot.payload, "version": snapshot.version}
            step = WAITING_STEPS.get(str(found.get("phase")))
            if step is not None:
                # No worker holds it (never taken, or given back): its place in the
                # service's queue now (a place in its snapshot is as old as that).
                ahead = await shared.store.ahead_of(task_id)
                if ahead is not None:
                    found["queue"] = {"position": ahead + 1, "ahead": ahead}
                    progress = found.get("progress")
                    if isinstance(progress, dict):  # the step says it too, as a stream's does
                        found["progress"] = {**progress, "currentStep": step(ahead)}
            return json_response(200, found, headers=NO_STORE)
        if actor is None:
            return self._unknown_task(task_id)
        snapshot = actor.broadcaster.latest
        body: dict[str, object] = {"taskId": task_id}
        if snapshot is not None:
            body = {**snapshot.payload, "version": snapshot.version}
        return json_response(200, body, headers=NO_STORE)

    async def cancel(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        actor = self.registry.get(task_id)
        if actor is None and self.shared is not None:
            outcome = await self.shared.cancel(task_id, time.time())
            if outcome is None:
                return self._unknown_task(task_id)
            if outcome.ended is not None:
                return self._already_ended(task_id, outcome.ended)
            return self._cancelling(task_id)
        if actor is None:
            return self._unknown_task(task_id)
        result = actor.cancel()
        if result is CancelResult.ALREADY_FINISHED:
            return self._already_ended(task_id, actor.state.phase.value)
        # The cancel is in the journal before the 202, so a crash right after it
        # cannot lose it: a restarted daemon would run the task on. If the journal
        # cannot hold it, the cancel still goes on in this process.
        problem = await self._journalled("the cancel")
        if problem is not None:
            log.error("cancel of task %s not journalled: %s", task_id, problem)
        return self._cancelling(task_id)

    @staticmethod
    def _already_ended(task_id: str, status: str) -> Response:
        return json_response(
            200,
            {
                "taskId": task_id,
                "status": status,
                "cancelled": False,
                "message": f"the task already ended ({status}); nothing to cancel",
            },
        )

    @staticmethod
    def _cancelling(task_id: str) -> Response:
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
        """Ready while at least one backend is connected (a front: while Redis answers)."""
        pool = self.pool
        if not pool.backends and self.shared is not None:
            ready = await self.shared.ready()
            return json_response(
                200 if ready else 503, {"ready": ready, "redis": ready}, headers=NO_STORE
            )
        up = [b.name for b in pool.connected()]
        body = {
            "ready": bool(up),
            "backend": pool.backends[0].name,
            "backendsUp": len(up),
            "backends": len(pool.backends),
        }
        return json_response(200 if up else 503, body, headers=NO_STORE)

    async def backends(self, request: Request) -> Response:
        body = backends_json(self.pool, self.dispatcher, self.registry.actors())
        if (shared := self.shared) is not None:
            # The whole service: every live worker's backends, and its queue.
            try:
                readings = await published_capabilities(shared.store)
                body["service"] = {
                    "waiting": await shared.store.waiting_count(),
                    "unfinished": await shared.store.unfinished_count(),
                    "backends": {name: r.to_json() for name, r in sorted(readings.items())},
                }
            except RedisError as exc:
                body["service"] = {"error": f"Redis: {exc}"}
        return json_response(200, body, headers=NO_STORE)

    async def workflows(self, request: Request) -> Response:
        return json_response(200, self.catalog.to_json())

    async def upload(self, request: Request) -> Response:
        """An inpainting source image: the raw PNG or JPEG body (see protocol/upload.py)."""
        try:
            reply = await self.binder.sources.accept_upload(
                request.headers.get("content-type"), request.body
            )
        except RequestError as exc:
            return request_error(exc)
        except StorageError as exc:
            log.error("upload refused: %s", exc)
            return unavailable(str(exc))
        location = str(reply["imageUrl"])
        return json_response(201, reply, headers=[("Location", location), *NO_STORE])
