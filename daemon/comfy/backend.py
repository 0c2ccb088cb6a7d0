"""One ComfyUI backend: its HTTP API and the daemon's one WebSocket to it.

Client ids and reconnects (FACTS.md §7). ComfyUI sends a prompt's frames only
to the socket registered under the prompt's client_id, and two live sockets
with one client id both go silent. We keep ONE client id per backend (stored
in the data directory, so a restarted daemon hears the prompts it submitted
before) and reuse it only after the previous socket is fully closed: we
finish the close handshake before we reconnect. Reusing the id is what lets
a reconnected socket pick a running prompt's progress up again (ComfyUI even
re-sends the running node). If ComfyUI did not confirm our close, it may
still hold the old socket, so we take a fresh client id instead; tasks
submitted under the old id then follow their prompts through /queue and
/history (their `PromptSubscription.hears_frames()` tells them).

A socket that stays open but delivers nothing (a "zombie") shows no error, so
while one of our prompts runs, `silence_timeout` without a frame makes us
probe ComfyUI over HTTP and replace the socket. After every reconnect,
`reconnected` fires and each task reconciles through /queue and /history
(its subscription says so), because frames sent while we were away are lost.
"""

from __future__ import annotations

import json
import logging
import math
import random
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio
import trio_websocket

from daemon.comfy.attribution import PreviewAttribution
from daemon.comfy.http_api import BackendUnavailable, ComfyHttp
from daemon.comfy.queue_places import QueuePlaces, QueueReading, moment
from daemon.comfy.routing import Deliver, PromptRouter, Settle
from daemon.comfy.subscription import PromptSubscription
from daemon.comfy.websocket import BatchingWebSocket, wrap_client_stream
from daemon.signals import Signal, TurnByTurnSignal
from protocol import comfy
from protocol.errors import ProtocolError

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 32 * 1024 * 1024  # previews and execution_error tracebacks can be large
# What one read takes is handed over as one batch (daemon/comfy/websocket.py):
# 16 KiB is ~150 progress frames of ~110 bytes, a few ms of applying them. (64
# KiB batches left subscribers tens of ms without a publish in a burst, and
# were slower to catch up; 4 KiB cost more CPU.) More waiting holds the reader.
RECEIVE_BYTES = 16 * 1024
MESSAGE_QUEUE = 1024
# Sent first on every connection (only a first message counts, FACTS §1): previews
# then arrive as type 4 frames that name their prompt.
FEATURE_FLAGS = json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
# The frames that end a prompt, whichever way (FACTS: each is followed by `status`).
_PROMPT_ENDS = (comfy.ExecutionSuccess, comfy.ExecutionError, comfy.ExecutionInterrupted)
QUEUE_READ_SPACING = 20  # wait 20x as long as a /queue reading took before the next
# Tasks told of a socket that closed or opened between two checkpoints: each
# one told publishes (`waiting`, or a reconcile's answer).
CONNECTION_NEWS_PER_TURN = 100


@dataclass(frozen=True, slots=True)
class BackendSettings:
    url: str
    connect_timeout: float = 10.0
    http_timeout: float = 30.0
    silence_timeout: float = 30.0
    reconnect_initial_delay: float = 0.5
    reconnect_max_delay: float = 30.0
    max_image_bytes: int = 64 * 1024 * 1024
    queue_poll_interval: float = 1.0  # the least time between two /queue readings for places


def load_client_id(path: Path | None) -> str:
    """The backend's client id, kept across restarts when a path is given."""
    if path is not None:
        try:
            stored = path.read_text(encoding="ascii").strip()
        except OSError:
            stored = ""
        if stored:
            return stored
    client_id = uuid.uuid4().hex
    if path is not None:
        save_client_id(path, client_id)
    return client_id


def save_client_id(path: Path, client_id: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".partial")
    temporary.write_text(client_id + "\n", encoding="ascii")
    temporary.replace(path)


def _drop(event: comfy.ComfyEvent) -> None:
    pass


class SilentSocket(Exception):
    """No frame arrived for too long while one of our prompts ran."""


class ComfyBackend:
    """HTTP + WebSocket to one ComfyUI, with reconnects and routing by prompt_id."""

    def __init__(self, settings: BackendSettings, *, client_id_file: Path | None = None) -> None:
        self.settings = settings
        self.name = settings.url
        self.http = ComfyHttp(
            settings.url, timeout=settings.http_timeout, max_image_bytes=settings.max_image_bytes
        )
        self.router = PromptRouter()
        self.attribution = PreviewAttribution()
        self._client_id_file = client_id_file
        self.client_id = load_client_id(client_id_file)
        self.client_generation = 0  # grows when the client id had to change
        self.connected = False
        self.connected_changed = Signal()
        # The same, for the tasks following prompts here (thousands, when ComfyUI
        # holds thousands of ours): they wake a turn at a time.
        self.connection_news = TurnByTurnSignal(CONNECTION_NEWS_PER_TURN)
        self.reconnected = Signal()  # fires on every connection after the first
        self.queue_changed = Signal()  # fires on every `status` frame
        # Fires when ComfyUI re-sent the running node to a new socket: which of our
        # prompts it is, a /queue reading says (`_name_the_running_prompt`).
        self._resent_held = Signal()
        self.reconnects = 0
        self.frames_received = 0
        self.protocol_errors = 0
        # Load, for dispatch: ComfyUI's own count of running + pending prompts (its
        # last `status` frame), plus our submissions it has not counted yet.
        self.queue_remaining: int | None = None  # None: no `status` since the socket opened
        self.unseen_submissions = 0  # POSTed since the last `status` frame
        self.reserved = 0  # handed a task that is being submitted
        # Our prompts POSTed here whose end we have not seen: ComfyUI holds at least
        # these, whatever a late `status` frame says.
        self._ours_held: set[str] = set()
        self.last_error = ""
        self._queue_lock = trio.Lock()
        self._queue_cache: QueueReading | None = None
        self.queue_reads = 0
        self.queue_read_cost = 0.0  # seconds the last GET /queue took (fetch and parse)
        self._socket_opened = 0  # the moment() the current (or last) socket opened
        # Our prompts queued here, told their places (one reader for all of them).
        self.queue_places = QueuePlaces(self, settings.queue_poll_interval)

    # -- state for the rest of the daemon

    def is_connected(self) -> bool:
        return self.connected

    async def wait_connected(self) -> None:
        while not self.connected:
            await self.connected_changed.wait()

    def _set_connected(self, value: bool) -> None:
        if self.connected != value:
            self.connected = value
            if not value:
                self.queue_remaining = None  # unknown until the next socket's `status`
            self.connected_changed.fire()
            self.connection_news.fire()

    def load(self) -> int:
        """Prompts in this ComfyUI's queue (running and pending, anyone's), as far as we know.

        A `status` frame ComfyUI sent before it queued our latest prompt can come
        after the POST's reply (another connection) and reset `unseen_submissions`
        without counting it: our own prompts it holds are the floor of its count.
        Without that floor a burst of tasks put 6 prompts into a ComfyUI whose
        room was 2 (tests/daemon/test_dispatch_room.py)."""
        counted = (self.queue_remaining or 0) + self.unseen_submissions
        return max(counted, len(self._ours_held)) + self.reserved

    def subscribe(
        self, prompt_id: str, *, deliver: Deliver = _drop, settle: Settle | None = None
    ) -> PromptSubscription:
        """Route this prompt's frames to one task's `deliver` (and `settle`, see
        daemon/comfy/routing.py), from now until the subscription closes (without
        them they are dropped: the task only polls)."""
        return PromptSubscription(self, prompt_id, deliver=deliver, settle=settle)

    def note_submitted(self, prompt_id: str) -> None:
        """We POSTed a prompt; it counts until the next `status` frame does, and
        toward the floor of the load until its end (or `note_gone`)."""
        self.unseen_submissions += 1
        self._ours_held.add(prompt_id)
        self.queue_changed.fire()

    def note_held(self, prompt_id: str) -> None:
        """Our prompt is in this ComfyUI's queue already (re-attached after a restart,
        or taken by a POST whose answer was lost): ComfyUI's count has it, and it
        is part of the floor of the load until its end (or `note_gone`)."""
        if prompt_id not in self._ours_held:
            self._ours_held.add(prompt_id)
            self.queue_changed.fire()

    def note_running(self, prompt_id: str, reading: QueueReading) -> None:
        """`reading` says this prompt of ours runs. Its start may have come while the
        socket was away: what names no prompt (a re-sent `executing`, a progress
        text, a legacy preview) is its from now on. A reading asked for before the
        socket opened says nothing: the prompt may have ended while it was away."""
        if reading.started < self._socket_opened:
            return
        self.router.note_running(prompt_id)
        if self.router.running_prompt == prompt_id:
            self.attribution.running = prompt_id

    def note_gone(self, prompt_id: str) -> None:
        """Our prompt left this ComfyUI (ended, deleted, lost, or no longer followed)."""
        if prompt_id in self._ours_held:
            self._ours_held.discard(prompt_id)
            self.queue_changed.fire()

    async def read_queue(
        self, *, not_before: float = -math.inf, started_after: int = 0
    ) -> QueueReading:
        """GET /queue, shared: a reading taken at or after `not_before` (Trio time)
        and asked for after the `moment()` `started_after` is reused, so many tasks
        asking at once cost one request."""
        async with self._queue_lock:
            cached = self._queue_cache
            if (
                cached is not None
                and cached.taken_at >= not_before
                and cached.started > started_after
            ):
                return cached
            taken_at, started = trio.current_time(), moment()
            snapshot = await self.http.queue()
            self.queue_reads += 1
            self.queue_read_cost = trio.current_time() - taken_at
            self._queue_cache = QueueReading(taken_at, started, snapshot)
            return self._queue_cache

    async def _name_the_running_prompt(self) -> None:
        """Forever: when ComfyUI re-sent the running node to a new socket, read /queue
        to learn which of our prompts runs. The tasks reconcile after a reconnect,
        but nobody does after the first connect, where a restarted daemon's
        re-attached prompt may run (its node and texts would wait for its next node)."""
        seen = 0
        while True:
            while self._resent_held.count == seen:
                await self._resent_held.wait()
            seen = self._resent_held.count
            try:
                reading = await self.read_queue(started_after=moment())
            except BackendUnavailable:
                continue  # a task's reconcile may say, or the prompt's next node
            for prompt_id in reading.snapshot.running:
                self.note_running(prompt_id, reading)

    def queue_read_spacing(self, minimum: float) -> float:
        """Seconds between two /queue readings: at least `minimum`, and more for
        a queue so long that reading it is costly (thousands of prompts are
        megabytes): reading takes at most 1/QUEUE_READ_SPACING of the time."""
        return max(minimum, self.queue_read_cost * QUEUE_READ_SPACING)

    # -- the consumer

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep one WebSocket open to ComfyUI, forever, and tell our queued prompts
        their places. Ready after the first attempt to connect."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.queue_places.run)
                nursery.start_soon(self.connection_news.run)
                nursery.start_soon(self._name_the_running_prompt)
                await self._reconnect_forever(task_status)
        finally:
            self.http.pool.close()  # the kept-alive HTTP connections to ComfyUI

    async def _reconnect_forever(self, task_status: trio.TaskStatus[None]) -> None:
        started = False
        failures = 0  # failed attempts since the last socket that opened

        def on_open() -> None:
            nonlocal started, failures
            # A socket opened: whatever ends it next starts the backoff afresh.
            failures = 0
            if not started:
                started = True
                task_status.started()

        attempts = 0
        while True:
            attempts += 1
            try:
                await self._connect_and_consume(on_open=on_open, reconnect=attempts > 1)
                failures = 0
            except (
                trio_websocket.HandshakeError,
                OSError,
                trio.TooSlowError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
            ) as exc:
                failures += 1
                self.last_error = _describe(exc)
                log.warning(
                    "ComfyUI WebSocket to %s failed to open: %s",
                    self.name,
                    self.last_error,
                    extra={"backend": self.name},
                )
            except trio_websocket.ConnectionClosed as exc:
                failures += 1
                self.last_error = f"WebSocket closed: {exc.reason}"
                log.warning(
                    "ComfyUI WebSocket to %s closed: %s", self.name, exc.reason,
                    extra={"backend": self.name},
                )  # fmt: skip
            except SilentSocket as exc:
                self.last_error = str(exc)
                log.warning("%s; replacing the socket", exc, extra={"backend": self.name})
            finally:
                self._set_connected(False)
            # The first attempt failed: start anyway; tasks wait for a connection.
            if not started:
                started = True
                task_status.started()
            delay = self._backoff(failures)
            if delay > 0:
                log.info(
                    "reconnecting to %s in %.1f s", self.name, delay, extra={"backend": self.name}
                )
            await trio.sleep(delay)

    def _backoff(self, failures: int) -> float:
        """Exponential backoff with jitter (0.5x-1x), capped; none after a clean close."""
        if failures == 0:
            return 0.0
        s = self.settings
        # The doublings stop long past any cap: a ComfyUI away for hours fails over
        # a thousand times, and 2 ** 1024 is more than a float holds (OverflowError).
        doublings = min(failures - 1, 64)
        base = min(s.reconnect_max_delay, s.reconnect_initial_delay * 2**doublings)
        return float(base * random.uniform(0.5, 1.0))

    async def _connect_and_consume(self, *, on_open: Callable[[], None], reconnect: bool) -> None:
        """One WebSocket session, from connect to close; raises what ended it.

        We open the TCP stream ourselves and hand it to trio-websocket, so we
        can always close it: after an abnormal closure trio-websocket leaves
        its socket open.
        """
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:  # trio-websocket's reader task
            try:
                await self._session(nursery, on_open=on_open, reconnect=reconnect)
            except Exception as exc:  # noqa: BLE001 - re-raised below, outside the nursery
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _session(
        self, nursery: trio.Nursery, *, on_open: Callable[[], None], reconnect: bool
    ) -> None:
        url = urllib.parse.urlsplit(self.settings.url)
        host, port = url.hostname or "127.0.0.1", url.port or 80
        resource = f"{url.path.rstrip('/')}/ws?clientId={self.client_id}"
        timeout = self.settings.connect_timeout
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
        try:
            with trio.fail_after(timeout):
                ws = await wrap_client_stream(
                    nursery,
                    stream,
                    host,
                    resource,
                    max_message_size=MAX_MESSAGE_BYTES,
                    message_queue_size=MESSAGE_QUEUE,
                    receive_buffer_size=RECEIVE_BYTES,
                )
            # What ran before may have ended while we were away, and another of
            # ours run now: nothing names no prompt's owner until ComfyUI or a
            # /queue reading asked for from now on says which runs.
            self._socket_opened = moment()
            self.router.socket_opened()
            self.attribution.reset()
            self._set_connected(True)
            log.info(
                "ComfyUI WebSocket open: %s (client id %s)",
                self.name,
                self.client_id,
                extra={"backend": self.name},
            )
            if reconnect:
                self.reconnects += 1
                self.reconnected.fire()
            on_open()
            try:
                await ws.send_message(FEATURE_FLAGS)  # our first message, always
                await self._consume(ws)  # returns only by raising
            except SilentSocket:
                self._set_connected(False)
                # We are the ones leaving: finish the close handshake before the
                # client id is used again.
                with trio.move_on_after(timeout) as closing:
                    await ws.aclose()
                if closing.cancelled_caught:
                    # ComfyUI did not confirm the close, so it may still hold the old
                    # socket under our id; a new socket with that id would go silent.
                    self._rotate_client_id()
                raise
        finally:
            self._set_connected(False)
            await trio.aclose_forcefully(stream)

    def _rotate_client_id(self) -> None:
        old = self.client_id
        self.client_id = uuid.uuid4().hex
        self.client_generation += 1
        if self._client_id_file is not None:
            try:
                save_client_id(self._client_id_file, self.client_id)
            except OSError as exc:
                log.warning("cannot store the new client id: %s", exc, extra={"backend": self.name})
        log.warning(
            "the old socket was not closed cleanly; client id %s -> %s",
            old,
            self.client_id,
            extra={"backend": self.name},
        )

    async def _consume(self, ws: BatchingWebSocket) -> None:
        """Read frames until the socket closes or goes silent (both raise).

        Silence is `silence_timeout` without a frame while one of our prompts
        runs. One cancel scope watches it across many frames: a frame only
        notes its time, and a scope that fires early (frames came since it was
        set) is set again from the last one. A scope per frame cost a tenth of
        what reading the frame does.
        """
        timeout = self.settings.silence_timeout
        last_frame = trio.current_time()
        while True:
            watching = self.router.ours_running
            with trio.CancelScope(deadline=last_frame + timeout if watching else math.inf) as idle:
                while self.router.ours_running is watching:  # else: set the deadline anew
                    frames = await ws.get_messages()  # every frame read so far
                    last_frame = trio.current_time()
                    self.frames_received += len(frames)
                    self._handle_frames(frames)
            if idle.cancelled_caught and trio.current_time() - last_frame >= timeout:
                await self._probe_silence(timeout)

    async def _probe_silence(self, waited: float) -> None:
        prompt_id = self.router.running_prompt
        alive = await self.http.probe()
        raise SilentSocket(
            f"no frame from {self.name} for {waited:.0f} s while prompt {prompt_id} runs "
            f"(HTTP {'answers' if alive else 'does not answer'})"
        )

    def _handle_frames(self, frames: list[str | bytes]) -> None:
        """Frames read together, in order. A task whose frames come several in
        one batch settles (publishes) once, after the last of them: its earlier
        states were replaced before anyone could have read them."""
        events = [event for event in map(self._parse, frames) if event is not None]
        if len(events) == 1:
            self._handle_event(events[0], more=False)
            return
        owners = [comfy.prompt_id_of(event) for event in events]
        last = {owner: index for index, owner in enumerate(owners) if owner is not None}
        try:
            for index, (event, owner) in enumerate(zip(events, owners, strict=True)):
                self._handle_event(event, more=owner is not None and last[owner] > index)
        finally:
            self.router.end_batch()

    def _parse(self, frame: str | bytes) -> comfy.ComfyEvent | None:
        try:
            return comfy.parse_frame(frame)
        except ProtocolError as exc:
            self.protocol_errors += 1
            log.warning(
                "ignoring a bad frame from %s: %s", self.name, exc, extra={"backend": self.name}
            )
            return None

    def _handle_event(self, event: comfy.ComfyEvent, *, more: bool) -> None:
        if isinstance(event, comfy.Status):
            self.queue_remaining = event.queue_remaining
            self.unseen_submissions = 0
            self.queue_changed.fire()
            return
        if isinstance(event, _PROMPT_ENDS):
            # Before the `status` frame that stops counting it (FACTS: the end, then
            # status, then executing{node: null}).
            self._ours_held.discard(event.prompt_id)
        if isinstance(event, comfy.FeatureFlags):
            log.info(
                "%s previews: %s",
                self.name,
                "with metadata" if event.flags.get("supports_preview_metadata") else "legacy",
                extra={"backend": self.name},
            )
            return
        prompt_id = self.attribution.prompt_for(event)
        self.attribution.observe(event)
        self.router.dispatch(event, prompt_id=prompt_id, more=more)
        if isinstance(event, comfy.Executing) and self.router.holds_resent:
            self._resent_held.fire()


def _describe(exc: BaseException) -> str:
    """One readable line: the error, then the distinct reasons underneath it.

    trio.open_tcp_stream raises "all attempts to connect to H:P failed" from an
    ExceptionGroup of the same words; the reasons are the group's leaves.
    """
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, BaseExceptionGroup):
        reasons = dict.fromkeys(str(leaf) or type(leaf).__name__ for leaf in _leaves(cause))
        return f"{text}: {'; '.join(reasons)}"
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({cause})"
    return text


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves
