"""The composition root: one nursery running every service of the daemon.

    App.run
      ├── simulator (only with --simulate; a ComfyUI of our own on 127.0.0.1)
      ├── TaskRegistry.run     (the nursery the task actors live in)
      ├── BackendPool.run      (each ComfyUI's WebSocket and reconnects, what each can run)
      ├── Dispatcher.run       (the daemon's queue: a backend with room takes the next task)
      ├── HttpServer.run       (the h11 server, on systemd's sockets if it passed any)
      └── Systemd.run          (last: READY=1, STATUS=, WATCHDOG=1; no-op outside systemd)

Each service is started with `nursery.start`, so when `run` reports started
every service is up (hypercorn `run.py` style). `shutdown()` drains, in
order: SSE clients are told to come back (`retry:`), the listener closes and
open requests get `shutdown_grace` seconds; then the task actors stop (their
last journal records made), then the journal is flushed and closed, and only
then is the nursery cancelled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio
from coredis.exceptions import RedisError

from daemon.api.access import AccessPolicy, AccessSettings
from daemon.api.binder import Binder
from daemon.api.idempotency import KEY_TTL, IdempotencyKeys
from daemon.api.routes import Routes
from daemon.api.source_images import SourceImages
from daemon.api.sse_stream import StreamHub
from daemon.comfy.backend import BackendSettings, ComfyBackend
from daemon.comfy.capabilities import needs_of
from daemon.comfy.dispatch import Dispatcher
from daemon.comfy.pool import BackendPool
from daemon.config import Config, list_setting
from daemon.http.router import Router
from daemon.http.server import HttpLimits, HttpServer
from daemon.http.static import StaticFiles
from daemon.http.unix_listener import open_unix_listener
from daemon.images.previews import PreviewStore
from daemon.images.retention import ImageJanitor, RetentionPolicy
from daemon.images.store import ImageStore
from daemon.ops.data_dir_lock import DataDirLock
from daemon.ops.metrics import DaemonMetrics
from daemon.ops.systemd import ServiceStatus, Systemd
from daemon.shared.images import SharedImageRoute, SharedImageStore
from daemon.shared.service import SharedService, new_daemon_id
from daemon.tasks.actor import TaskActor, TaskSettings
from daemon.tasks.journal import AbandonedPrompt, Journal
from daemon.tasks.registry import TaskRegistry
from daemon.tasks.restore import still_followed
from daemon.workflow_files import load_catalog
from protocol.task import Phase, TaskState, render

log = logging.getLogger(__name__)

VENDORED_PACKAGES = ("preact", "htm")


@dataclass(frozen=True, slots=True)
class Bound:
    """Where the running app can be reached."""

    host: str  # "" on a Unix socket
    port: int  # 0 on a Unix socket
    comfy_url: str  # the first backend
    comfy_urls: tuple[str, ...] = ()  # every backend
    unix_path: str = ""  # the Unix socket's path (listen = unix:...), else ""

    @property
    def url(self) -> str:
        """http://HOST:PORT, or unix:/path on a Unix socket (as the log and STATUS= say)."""
        if self.unix_path:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def bound_to(sockname: object, urls: tuple[str, ...]) -> Bound:
    """The Bound of a listening socket whose getsockname() is `sockname`."""
    first = urls[0] if urls else ""
    if isinstance(sockname, tuple):  # AF_INET, AF_INET6
        return Bound(host=sockname[0], port=sockname[1], comfy_url=first, comfy_urls=urls)
    if isinstance(sockname, bytes):  # AF_UNIX paths that are not UTF-8
        sockname = os.fsdecode(sockname)
    return Bound(host="", port=0, comfy_url=first, comfy_urls=urls, unix_path=str(sockname))


def http_limits(config: Config) -> HttpLimits:
    return HttpLimits(
        max_header_bytes=config.max_header_bytes,
        max_body_bytes=config.max_body_bytes,
        header_read_timeout=config.header_read_timeout,
        body_read_timeout=config.body_read_timeout,
        keep_alive_timeout=config.keep_alive_timeout,
        write_timeout=config.write_timeout,
        max_connections=config.max_connections,
    )


def access_settings(config: Config) -> AccessSettings:
    return AccessSettings(
        allowed_origins=tuple(list_setting(config.allowed_origins)),
        allowed_hosts=tuple(list_setting(config.allowed_hosts)),
        api_tokens=tuple(list_setting(config.api_tokens)),
    )


class App:
    def __init__(self, config: Config, *, systemd: Systemd | None = None) -> None:
        self.config = config
        self.systemd = systemd or Systemd()  # the default notifies nothing, inherits nothing
        self.shared: SharedService | None = None
        if config.shared:
            from daemon.shared.client import redis_client

            daemon_id = new_daemon_id()
            self.redis = redis_client(config.redis_url, client_name=daemon_id)
            # A task's end counts in the metrics of the daemon whose write of it
            # Redis took: a front's (no worker held the task), or a worker's.
            self.shared = SharedService(
                config, self.redis, daemon_id, on_task_end=self._ended_in_redis
            )
            # Any daemon serves any task's images: local disk, then Redis' copy.
            self.images: ImageStore = SharedImageStore(
                config.data_dir / "images",
                self.redis,
                config.redis_prefix,
                ttl=config.image_retention,
            )
        else:
            self.images = ImageStore(config.data_dir / "images")
        self.previews = PreviewStore(
            max_task_bytes=config.preview_max_task_bytes,
            max_total_bytes=config.preview_max_total_bytes,
        )
        self.journal = Journal(config.data_dir / "journal.sqlite3")
        # Read at construction, so a broken workflow file stops the start-up (WorkflowFileError).
        self.workflows = load_catalog(
            Path(config.workflows_dir) if config.workflows_dir else None,
            default_checkpoint=config.default_checkpoint,
        )
        self.binder = Binder(self.workflows, SourceImages(self.images))
        self.streams = StreamHub(
            heartbeat_interval=config.heartbeat_interval, retry_ms=config.sse_retry_ms
        )
        self.workflows_checked = trio.Event()  # against every backend's first reading
        # Built in run(), in this order: they need the journal open and the
        # ComfyUI URLs known (the simulator's only once it listens).
        self.idempotency: IdempotencyKeys
        self.pool: BackendPool
        self.dispatcher: Dispatcher
        self.registry: TaskRegistry
        self.metrics: DaemonMetrics
        self.server: HttpServer
        self.image_janitor: ImageJanitor
        self._cancel_scope = trio.CancelScope()
        self._server_done = trio.Event()
        self._started = False  # READY=1 sent: from here on a shutdown drains

    @property
    def backend(self) -> ComfyBackend:
        """The first backend (the only one, without a pool)."""
        return self.pool.backends[0]

    def _http_server(self, *, ops_only: bool = False) -> HttpServer:
        """The HTTP face: the API, the images and the browser client, behind the access
        policy. `ops_only` (a worker): health, readiness, backends and metrics only."""
        config = self.config
        metrics = self.metrics
        router = Router(observer=metrics.observe_request)
        routes = Routes(
            config=config,
            workflows=self.workflows,
            binder=self.binder,
            registry=self.registry,
            journal=self.journal,
            idempotency=self.idempotency,
            pool=self.pool,
            dispatcher=self.dispatcher,
            streams=self.streams,
            previews=self.previews,
            metrics=metrics,
            shared=self.shared,
        )
        if ops_only:
            routes.install_ops(router)
        else:
            routes.install(router)
            self._install_static(router, config)
        access = AccessPolicy(router, access_settings(config), on_refused=metrics.observe_rejected)
        return HttpServer(access, http_limits(config), on_rejected=metrics.observe_rejected)

    def _install_static(self, router: Router, config: Config) -> None:
        # Image names are random and never reused, so browsers may cache forever.
        # Streamed from disk; the one image size limit (uploads are at most as large).
        images = StaticFiles(
            self.images.directory,
            param="name",
            cache_control="public, max-age=31536000, immutable",
            max_file_bytes=config.max_image_bytes,
        )
        if isinstance(self.images, SharedImageStore):
            router.add("GET", "/image/{name}", SharedImageRoute(self.images, images))
        else:
            router.add("GET", "/image/{name}", images)
        # Preact and htm from the local npm install: no CDN, works offline.
        for package in VENDORED_PACKAGES:
            files = StaticFiles(
                config.node_modules_dir / package, cache_control="public, max-age=3600"
            )
            router.add("GET", f"/vendor/{package}/{{path...}}", files)
        # Last: everything else is the browser client.
        router.add("GET", "/{path...}", StaticFiles(config.public_dir))

    async def run(
        self,
        listeners: Sequence[trio.SocketListener] | None = None,
        *,
        task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self.shared is not None:
                    await stack.enter_async_context(self.redis)
                await self._run(listeners, task_status=task_status)
        finally:
            # Cancelled from outside rather than `shutdown()`: still release the journal.
            await self.journal.close_abandoned()

    async def _run(
        self,
        listeners: Sequence[trio.SocketListener] | None = None,
        *,
        task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        config = self.config
        shared = self.shared
        # What is let go of once everything has stopped: the data directory's
        # lock, and the Unix socket file we bound.
        held = contextlib.ExitStack()
        with held, self._cancel_scope:
            async with trio.open_nursery() as nursery:
                urls = await self._backend_urls(nursery)
                await trio.Path(config.data_dir).mkdir(parents=True, exist_ok=True)
                held.callback(DataDirLock(config.data_dir).release)
                await self.images.open()
                await self.journal.open()
                records = await self.journal.load()
                abandoned = await self.journal.load_abandoned_prompts()
                self.idempotency = IdempotencyKeys(
                    journal=self.journal,
                    loaded=await self.journal.load_idempotency_keys(time.time() - KEY_TTL),
                    wall_clock=time.time,
                )
                await nursery.start(self.journal.run)
                # Each service gets what it uses; the HTTP face last, as it reads them all.
                self.pool = self._backend_pool(urls)
                if shared is None:
                    self._restore_abandoned(abandoned, still_followed(records))
                self.dispatcher = Dispatcher(self.pool, max_pending=config.backend_max_pending)
                self.registry = self._task_registry()
                self.metrics = DaemonMetrics(
                    backends=self.pool.backends,
                    task_phases=self._task_phases,
                    streams=self.streams,
                    # Read at scrape time, once the server below exists.
                    open_connections=lambda: self.server.active_connections,
                )
                worker_only = self._worker_only
                self.server = self._http_server(ops_only=worker_only)
                await nursery.start(self.registry.run)
                self.image_janitor = ImageJanitor(
                    self.images,
                    RetentionPolicy(
                        retention=config.image_retention, max_bytes=config.max_image_store_bytes
                    ),
                    in_use=self.registry.images_in_use,
                )
                if shared is None:
                    self.registry.restore(records)
                if records and shared is None:
                    log.info("restored %d task(s) from the journal", self.registry.restored)
                # After the restore, so the restored tasks' images count as in use.
                await nursery.start(self.image_janitor.run)
                await nursery.start(self.dispatcher.run)
                await nursery.start(self.pool.run)
                nursery.start_soon(self._warn_unrunnable_workflows)
                if shared is not None:
                    await nursery.start(shared.run, self.registry, self.dispatcher)
                    if abandoned:
                        nursery.start_soon(self._restore_shared_abandoned, abandoned)
                if listeners is None:
                    listeners = self.systemd.listeners() or await self._bind(held)
                await nursery.start(self._run_server, listeners)
                bound = bound_to(listeners[0].socket.getsockname(), urls)
                if worker_only:
                    # No API, no pages: what an operator and a load balancer check.
                    log.info(
                        "worker ready, health and metrics on %s (ComfyUI at %s)",
                        bound.url,
                        ", ".join(urls),
                    )
                else:
                    where = ", ".join(urls) if urls else "none: a front of the shared queue"
                    log.info("listening on %s (ComfyUI at %s)", bound.url, where)
                # READY=1: everything has started.
                status = bound.url if not worker_only else f"(worker) {bound.url}"
                await nursery.start(self.systemd.run, self.service_status(), status)
                self._started = True
                task_status.started(bound)

    async def _bind(self, held: contextlib.ExitStack) -> list[trio.SocketListener]:
        """Listen where `listen` says: HOST:PORT, or a Unix socket (removed at exit)."""
        config = self.config
        path = config.listen_unix_path
        if path is None:
            return await trio.open_tcp_listeners(config.listen_port, host=config.listen_host)
        listener, socket_file = open_unix_listener(path, config.listen_socket_mode)
        held.callback(socket_file.remove_if_ours)
        return [listener]

    @property
    def _worker_only(self) -> bool:
        """role=worker with Redis: takes work, serves only health and metrics."""
        return self.shared is not None and not self.shared.serves_http

    async def _backend_urls(self, nursery: trio.Nursery) -> tuple[str, ...]:
        """The configured ComfyUI URLs, or the simulators started for --simulate."""
        config = self.config
        urls = config.backend_urls
        if self._worker_only and not urls and not config.simulate:
            raise ValueError("role=worker needs a backend: --comfy-url or --simulate")
        if not urls and (self.shared is None or config.simulate):
            if not config.simulate:
                raise ValueError("no ComfyUI URL given and the simulator is off")
            urls = tuple([await self._start_simulator(nursery) for _ in range(config.simulators)])
        return urls

    def _backend_pool(self, urls: Sequence[str]) -> BackendPool:
        config = self.config
        return BackendPool.from_urls(
            urls,
            BackendSettings(
                url=urls[0] if urls else "",
                connect_timeout=config.comfy_connect_timeout,
                http_timeout=config.comfy_http_timeout,
                silence_timeout=config.comfy_silence_timeout,
                reconnect_initial_delay=config.reconnect_initial_delay,
                reconnect_max_delay=config.reconnect_max_delay,
                max_image_bytes=config.max_image_bytes,
                queue_poll_interval=config.queue_poll_interval,
            ),
            data_dir=config.data_dir,
            classes=self._workflow_classes(),
            allow_empty=self.shared is not None,  # a front runs no backend of its own
            abandoned_log=self.journal,  # removed after a restart too
        )

    def _restore_abandoned(
        self, abandoned: Sequence[AbandonedPrompt], followed: Collection[tuple[str | None, str]]
    ) -> None:
        """The prompts an earlier run gave up on go from their ComfyUI once it is connected,
        unless a task follows one of them again (`followed`: backend, prompt id)."""
        to_remove = []
        for prompt in abandoned:
            if (prompt.backend, prompt.prompt_id) in followed:
                self.journal.forget_abandoned(prompt.backend, prompt.prompt_id)
            else:
                to_remove.append((prompt.backend, prompt.prompt_id))
        taken = self.pool.restore_abandoned(to_remove)
        if taken:
            log.info("%d abandoned prompt(s) go from their ComfyUI once it is connected", taken)

    async def _restore_shared_abandoned(self, abandoned: Sequence[AbandonedPrompt]) -> None:
        """Shared mode: the tasks' records are in Redis, not in our journal, and any
        worker may take a task over. A worker killed between giving a prompt up and
        storing its task's next one left the record naming it: the worker that takes
        the task follows it again, so it must stay. Until Redis says which, none go."""
        assert self.shared is not None
        while True:
            try:
                records = await self.shared.store.task_records()
                break
            except RedisError as exc:
                log.warning(
                    "cannot check %d abandoned prompt(s) against the tasks in Redis yet"
                    " (%s); retrying", len(abandoned), exc,
                )  # fmt: skip
                await trio.sleep(1.0)
        # A held task's record names the ComfyUI of its attempt as its backend, as the
        # journal's records do (the mirror's backend_url is that same field).
        followed = still_followed(records)
        kept = sum(1 for prompt in abandoned if (prompt.backend, prompt.prompt_id) in followed)
        if kept:
            log.info("%d abandoned prompt(s) are followed again by their task: kept", kept)
        self._restore_abandoned(abandoned, followed)

    def _task_registry(self) -> TaskRegistry:
        config = self.config
        shared = self.shared
        return TaskRegistry(
            dispatcher=self.dispatcher,
            images=self.images,
            settings=TaskSettings(
                retention=config.task_retention,
                backend_wait_timeout=config.backend_wait_timeout,
                queue_poll_interval=config.queue_poll_interval,
                max_tasks=config.max_tasks,
                backend_lost_after=config.backend_lost_after,
                resubmit_lost=config.resubmit_lost,
                preview_max_rate=config.preview_max_rate,
                max_queued=config.max_queued_tasks,
                max_queued_per_client=config.max_queued_tasks_per_client,
            ),
            previews=self.previews,
            # Shared: Redis is the journal (another daemon may run our tasks now).
            journal=self.journal if shared is None else None,
            on_publish=shared.mirror.changed if shared is not None else None,
            until_shared_written=shared.mirror.until_written if shared is not None else None,
            on_task_end=self._task_ended,
        )

    def _task_phases(self) -> list[Phase]:
        return [actor.state.phase for actor in self.registry.actors()]

    def service_status(self) -> ServiceStatus:
        """What systemd's STATUS= line tells (available once run() has started)."""
        return ServiceStatus(
            backends=self.pool.backends,
            task_phases=self._task_phases,
            tasks_changed=self.registry.changed,
        )

    def _workflow_classes(self) -> frozenset[str]:
        """Every node class some workflow uses: what each backend is asked about."""
        classes: set[str] = set()
        for workflow in self.workflows.workflows.values():
            classes |= needs_of(workflow.graph).classes
        return frozenset(classes)

    async def _warn_unrunnable_workflows(self) -> None:
        """Once every backend was read: name each workflow node no backend can run."""
        await self.pool.wait_all_read()
        for workflow in self.workflows.workflows.values():
            for node_id, node in workflow.graph.items():
                node_class = node.get("class_type") if isinstance(node, dict) else None
                if not isinstance(node_class, str):
                    continue
                if all(node_class in reading.absent for reading in self.pool.capabilities.values()):
                    log.warning(
                        "workflow %r (file %s.json): node %s uses class %s, which no backend has",
                        workflow.name,
                        workflow.name,
                        node_id,
                        node_class,
                    )
        self.workflows_checked.set()

    def _ended_in_redis(self, state: TaskState) -> None:
        """Shared mode: Redis took this daemon's write of a task's end (its own actor's,
        or one no worker held: a cancel, the wait limit, a task Redis forgot). Each
        happens only once run() has built the metrics."""
        self.metrics.observe_task_end(state)

    def _task_ended(self, actor: TaskActor) -> None:
        if self.shared is None:
            # Shared: counted once Redis took the end. A worker cut off past its lease
            # ends a copy whose end is refused, while its claimer counts the task's.
            self.metrics.observe_task_end(actor.state)
        ended_at = actor.state.finished_at or time.time()
        self.idempotency.settle(actor.task_id, render(actor.state, ended_at).payload)

    async def _run_server(
        self,
        listeners: Sequence[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await self.server.run(listeners, task_status=task_status)
        finally:
            self._server_done.set()

    async def _start_simulator(self, nursery: trio.Nursery) -> str:
        from daemon.simulator import ComfySimulator, SimulatorConfig

        previews = self.config.simulator_previews
        simulator = ComfySimulator(
            SimulatorConfig(
                step_time=self.config.simulator_step_time,
                sampler_previews=previews,
                sampler_progress_text=previews,
            )
        )
        port: int = await nursery.start(simulator.run, ("127.0.0.1", 0))
        url = f"http://127.0.0.1:{port}"
        log.info("embedded ComfyUI simulator on %s", url)
        return url

    async def shutdown(self) -> None:
        """Drain and stop: SSE clients get a retry hint, requests get a grace period."""
        if not self._started:
            # Stopped while starting (e.g. waiting for a ComfyUI that does not
            # answer): no client to drain. The start must not go on to listen
            # and say READY=1, so it is cancelled at once; run() closes the journal.
            log.info("stopping while starting")
            self._cancel_scope.cancel()
            await self.systemd.notify_stopping("stopped while starting")
            return
        log.info("shutting down (grace %.1f s)", self.config.shutdown_grace)
        await self.systemd.notify_stopping(f"draining {self.streams.open_streams} SSE streams")
        self.streams.drain()
        self.server.begin_shutdown(self.config.shutdown_grace)
        with trio.move_on_after(self.config.shutdown_grace + 1.0):
            await self._server_done.wait()
        # Then the tasks, so none records while the journal closes. Tasks still
        # running stay in the journal; the next start resumes them.
        with trio.move_on_after(self.config.shutdown_grace + 1.0):
            await self.registry.stop()
        await self.journal.aclose()
        self._cancel_scope.cancel()


async def serve_until_signalled(
    app: App, listeners: Sequence[trio.SocketListener] | None = None
) -> None:
    """Run until SIGTERM or SIGINT, then drain and return."""
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("received %s", signal.Signals(signum).name)
                    await app.shutdown()
                    return

        nursery.start_soon(watch_signals)
        await app.run(listeners)
        nursery.cancel_scope.cancel()
