"""The per-task actor.

Each task is one actor: it owns its `TaskState`, feeds it events through the
pure state machine (`protocol.task.apply`), publishes every new snapshot to
its broadcaster, and performs the commands the state machine asks for (fetch
the output images, reconcile through /queue and /history). State changes
happen only in `TaskActor.handle`, which never awaits, so the helper tasks of
an actor (the pacer, the reconciler, the reconnect watcher, output fetching)
and the backend's tasks handing over frames and queue places can all call it
without locks.

The registry (daemon/tasks/registry.py) creates actors and runs them;
daemon/tasks/restore.py turns journal records back into their states.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

import trio

from daemon.comfy.backend import ComfyBackend
from daemon.comfy.capabilities import Needs, needs_of
from daemon.comfy.dispatch import Dispatcher, Ticket
from daemon.comfy.http_api import BackendUnavailable, OutputMissing, OutputTooLarge
from daemon.comfy.queue_places import QueueReading, moment
from daemon.comfy.subscription import PromptSubscription
from daemon.images.previews import PreviewStore
from daemon.images.store import ImageStore, NotAnImage, StorageError, image_names_in
from daemon.tasks.broadcast import Broadcaster, Snapshot, Unrendered, encode_snapshot
from daemon.tasks.journal import TaskRecord
from daemon.tasks.preview_throttle import PreviewThrottle
from daemon.tasks.publish_pacer import PublishPacer
from daemon.tasks.restore import StoredOutputs, record_of
from protocol import comfy, task
from protocol.binding import replace_input_value
from protocol.imagesize import image_info
from protocol.task import image_url

log = logging.getLogger(__name__)

SUBMIT_RETRY_DELAY: Final = 1.0
RECONCILE_RETRY_MAX_DELAY: Final = 30.0  # a reconcile failing with the socket up: retried
CANCEL_CONFIRM_TIMEOUT: Final = 15.0  # how long we wait for execution_interrupted
_IN_QUEUE: Final = (task.Phase.QUEUED, task.Phase.WAITING)  # phases a queue place shows in


@dataclass(frozen=True, slots=True)
class TaskSettings:
    retention: float = 300.0
    backend_wait_timeout: float = 120.0
    queue_poll_interval: float = 1.0
    max_tasks: int = 10_000
    backend_lost_after: float = 60.0
    resubmit_lost: bool = True
    preview_max_rate: float = 4.0
    max_queued: int = 1000  # unfinished tasks at once
    max_queued_per_client: int = 0  # 0: no per-client limit


class SourceImageGone(Exception):
    """The task's inpainting source is no longer stored (it cannot run anywhere)."""


class CancelResult(Enum):
    CANCELLING = "cancelling"
    ALREADY_FINISHED = "finished"


def new_prompt_id() -> str:
    """Ours, so frames can be routed before the POST (ComfyUI takes the id we give)."""
    return f"cp-{secrets.token_hex(16)}"


class Attempt(Enum):
    """How one attempt on one backend ended, when the task did not."""

    RETURNED = "returned"  # never submitted there: back to the daemon's queue
    LOST = "lost"  # submitted, and the backend lost it: resubmit


def _leaves_a_node_with_steps(state: task.TaskState, event: task.TaskEvent) -> bool:
    """Does `event` move on from a node that reported progress (a sampler's steps)?"""
    return (
        isinstance(event, comfy.Executing)
        and state.current_node is not None
        and event.node != state.current_node
        and state.value > 0
    )


class TaskActor:
    """One task: its state, its broadcaster, and the work it does against ComfyUI.

    A task runs as attempts: it waits in the daemon's queue until the dispatcher
    hands it a backend, submits there and follows its prompt. When that backend
    loses the prompt (a restart, or away past `backend_lost_after`) the task is
    requeued under a new prompt_id and the next attempt starts, on any backend.
    """

    # Slots: thousands of tasks may wait at once, and its 41 attributes overflow a
    # shared-key instance dict (a 1.5 KB table of its own per task).
    __slots__ = (
        "_avoid",
        "_crash",
        "_fetching",
        "_holding",
        "_journalled",
        "_last_message",
        "_lost",
        "_lost_reason",
        "_needs",
        "_nursery",
        "_on_demand",
        "_pace_wake",
        "_pacer",
        "_preview_throttle",
        "_prompt_unstored",
        "_reconcile_asked_moment",
        "_reconcile_requested",
        "_scope",
        "_stored",
        "_submit_failing_since",
        "_submitting",
        "_subscription",
        "_unpublished",
        "attempts",
        "backend",
        "backend_name",
        "broadcaster",
        "dispatcher",
        "finished",
        "images",
        "moved",
        "on_change",
        "on_publish",
        "outputs_saved",
        "pool",
        "previews",
        "resumed",
        "settings",
        "source_images",
        "state",
        "until_stored",
        "wall_clock",
    )

    def __init__(
        self,
        state: task.TaskState,
        *,
        dispatcher: Dispatcher,
        images: ImageStore,
        settings: TaskSettings,
        wall_clock: Callable[[], float],
        on_change: Callable[[TaskActor], None] = lambda actor: None,
        on_publish: Callable[[TaskActor], None] = lambda actor: None,
        first_message: task.TaskMessage | None = None,
        resumed: bool = False,
        backend_name: str | None = None,
        previews: PreviewStore | None = None,
        fresh: bool = False,
        needs: Needs | None = None,
        until_stored: Callable[[str], Awaitable[None]] | None = None,
        outputs: StoredOutputs | None = None,
    ) -> None:
        """`first_message` defaults to the rendered state (a restored task passes its last);
        `backend_name` is the backend a restored task was dispatched to; `fresh`: the
        task was just made from its request (task.new_task); `needs`: what its graph
        needs from a backend, when the caller knows already; `until_stored(task_id)`
        returns once every change of the task reported so far is stored (the journal,
        or Redis in shared mode), or the store gave up; `outputs`: the output images a
        restored task had stored before the restart."""
        self.dispatcher = dispatcher
        self.pool = dispatcher.pool
        self.images = images
        self.settings = settings
        self.wall_clock = wall_clock
        self.on_change = on_change
        self.on_publish = on_publish
        self.until_stored = until_stored
        self._prompt_unstored = False  # requeued under a new prompt id not stored yet
        self.moved = False  # another daemon took the task over (shared mode): forget ours
        self.state = state
        self.resumed = resumed
        self.backend_name = backend_name  # where the current attempt runs (journalled)
        self.backend: ComfyBackend | None = self.pool.get(backend_name)
        self.attempts = 0
        self.previews = previews if previews is not None else PreviewStore()
        # What an attempt needs is made by the first attempt: a task waiting in the
        # daemon's queue holds as little as it can (thousands may wait at once).
        self._preview_throttle: PreviewThrottle | None = None
        # Our images the task reads (an inpainting source): kept while the task is.
        self.source_images = image_names_in(state.spec.graph)
        # Output images stored so far, before the result names them (a task may have
        # several): kept by retention like the result; deleted when the task ends
        # without them (discard_outputs). Journalled with ComfyUI's names for them, so a
        # fetch cut by a restart goes on with them.
        self._stored = outputs
        self.outputs_saved: Sequence[str] = (
            () if outputs is None else tuple(outputs.images.values())
        )
        self._needs = needs
        self.finished = trio.Event()
        if state.phase.is_terminal:
            self.finished.set()
        self._scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        # The current attempt's on-demand tasks started so far (see _start_once).
        self._on_demand: set[Callable[[], Awaitable[None]]] | None = None
        self._subscription: PromptSubscription | None = None  # the current attempt's
        self._fetching = False
        self._submitting = False
        # Since its POSTs have been failing (Trio time, moved on by each wait in the
        # daemon's queue), and the backends they failed at: the dispatcher hands
        # the task to another while one can run it.
        self._submit_failing_since: float | None = None
        self._avoid: frozenset[str] = frozenset()
        self._lost: trio.Event | None = None  # the current attempt's
        self._lost_reason = ""
        self._reconcile_requested: trio.Event | None = None  # the current attempt's
        # A moment(), not a Trio time: a queue reading must be ordered exactly
        # against it, even when the clock reads the same for both.
        self._reconcile_asked_moment = 0
        # While frames are held back (one is being applied, or the pacer says
        # wait), messages wait in _unpublished: only the newest goes out.
        self._holding = False
        self._unpublished: task.TaskMessage | None = None
        self._pacer = PublishPacer()
        self._pace_wake = trio.Event()  # the pacer task has something to publish, or a crash
        self._crash: Exception | None = None  # what applying a frame raised
        self._last_message: task.TaskMessage | Unrendered
        if fresh:
            # Nothing in it came from ComfyUI, so it always encodes: rendered and
            # encoded when first read, if ever (its queue position usually
            # replaces it first).
            self._last_message = Unrendered(state, wall_clock())
            self.broadcaster = Broadcaster(first=self._last_message)
        else:
            # Encoded now: a restored or adopted task's message may hold text from
            # ComfyUI that cannot be encoded, and that must fail here, not in a reader.
            self._last_message = first_message or task.render(state, wall_clock())
            self.broadcaster = Broadcaster()
            self.broadcaster.publish(encode_snapshot(self._last_message))
        self._journalled = self._durable_fields()

    # -- identity and views

    @property
    def task_id(self) -> str:
        return self.state.task_id

    @property
    def last_message(self) -> task.TaskMessage:
        """The newest message published (or held back until the pacer lets it out)."""
        if isinstance(self._last_message, Unrendered):
            self._last_message = self._last_message.message()
        return self._last_message

    @property
    def prompt_id(self) -> str:
        return self.state.prompt_id

    def record(self) -> TaskRecord:
        """This task as the journal keeps it."""
        return record_of(self.state, self.backend_name, self._stored)

    @property
    def log_fields(self) -> dict[str, str]:
        """What a log line about this task names (logfmt fields)."""
        return {
            "task_id": self.task_id,
            "prompt_id": self.prompt_id,
            "backend": self.backend_name or "",
        }

    def _log(self, level: int, message: str, *args: object) -> None:
        log.log(level, message, *args, extra=self.log_fields)

    # -- the one place state changes

    def handle(self, event: task.TaskEvent) -> None:
        """Apply one event; publish and schedule whatever the state machine says."""
        if self.state.phase.is_terminal:
            return
        state, effects = task.apply(self.state, event, self.wall_clock())
        messages = [e.message for e in effects if isinstance(e, task.Publish)]
        # Encode what goes out now before keeping the new state: if it cannot be
        # encoded, the task stays as it was and the crash fallback in
        # TaskRegistry._run_actor can still end it, and its streams, with
        # `internal` (stored first, the fallback would see a finished task that
        # no stream ever heard of). A message held back (pacing) is encoded
        # only if it is still the newest when it goes out; the end is
        # never held back, so it is always encoded here.
        flush_now = not self._holding or state.phase.is_terminal
        ready = encode_snapshot(messages[-1]) if messages and flush_now else None
        if messages:
            self._unpublished = messages[-1]
            self._last_message = messages[-1]
        self.state = state
        if effects:
            self.on_publish(self)
        for effect in effects:
            if isinstance(effect, task.FetchOutputs):
                self._start(self._fetch_outputs, effect.images)
            elif isinstance(effect, task.Reconcile):
                self.request_reconcile()
        if flush_now:
            self._flush(ready)
        if self.state.phase.is_terminal:
            error = self.state.error
            if error is None:
                self._log(logging.INFO, "task completed: %s", ", ".join(self.state.image_files))
            else:
                self._log(logging.INFO, "task ended in error %s: %s", error.code, error.message)
            self.finished.set()
            self.previews.drop(self.task_id)
            self._scope.cancel()
        self._report()

    def _report(self) -> None:
        durable = self._durable_fields()
        if durable != self._journalled:
            # Progress ticks are not journalled: after a restart the task
            # reconciles with ComfyUI anyway. Phase, submission, backend and the end are.
            self._journalled = durable
            self.on_change(self)

    def _start(self, fn: Callable[..., object], *args: object) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)  # type: ignore[arg-type]

    def _start_once(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Start one of the attempt's on-demand tasks (the pacer, the reconciler, the
        preview throttle) unless it runs already. They wait for work most of a
        prompt's life, and most prompts wait in a queue: one started only when
        needed spares each submitted task three Trio tasks (POST /generate with
        every prompt held queued in ComfyUI: 6-10 % less daemon CPU, `make bench`)."""
        nursery, started = self._nursery, self._on_demand
        if nursery is not None and started is not None and fn not in started:
            started.add(fn)
            nursery.start_soon(fn)

    def _durable_fields(self) -> tuple[object, ...]:
        state = self.state
        # The stage covers the phase, the submission and the fetch of the images.
        return (
            state.stage,
            state.prompt_id,
            state.cancel_requested,
            self.backend_name,
            self.outputs_saved,
        )

    def is_done(self) -> bool:
        """Has the task ended? (A method, so type checkers re-read it after awaits.)"""
        return self.state.phase.is_terminal

    def cancel_requested(self) -> bool:
        """Has a cancel been asked for? (A method, as is_done.)"""
        return self.state.cancel_requested

    def stop(self) -> None:
        """Stop driving the task without ending it: another daemon holds it now."""
        self.moved = True
        self._scope.cancel()

    def request_reconcile(self) -> None:
        self._reconcile_asked_moment = moment()
        if self._reconcile_requested is not None:  # else no attempt runs: nothing to ask
            self._reconcile_requested.set()
            self._start_once(self._reconcile_loop)

    # -- lifecycle

    async def run(self) -> None:
        """Drive the task to a terminal state (or until cancelled), attempt by attempt."""
        if self.state.phase.is_terminal:
            return  # restored from the journal: nothing left to do
        resumed = self.resumed
        with self._scope:
            if resumed and self.backend_name is not None and self.backend is None:
                # Dispatched to a backend that is no longer configured.
                if self.state.submitted:
                    self._lost_there(f"{self.backend_name} is no longer configured", False)
                    self._requeue(self._lost_reason)
                self._use(None)
            while not self.is_done():
                backend, reserved = self.backend, False
                if backend is None or not resumed:
                    backend = await self._wait_for_backend()
                    if backend is None:
                        return
                    reserved = True
                outcome = await self._attempt(backend, resumed=resumed, reserved=reserved)
                resumed = False
                self._use(None)
                if outcome is Attempt.LOST:
                    self._requeue(self._lost_reason)

    def _use(self, backend: ComfyBackend | None) -> None:
        self.backend = backend
        self.backend_name = backend.name if backend is not None else None
        self._report()

    def _requeue(self, reason: str) -> None:
        if self.is_done():
            return
        prompt_id = new_prompt_id()
        self._log(logging.WARNING, "resubmitting as %s: %s", prompt_id, reason)
        # The lost attempt's preview is not the new attempt's image: GET .../preview
        # answers 404 until the new attempt sends one (its snapshot announces none
        # either), and a preview the throttle still held back is not announced.
        self.previews.discard(self.task_id)
        self._preview_throttle = None
        self.handle(task.Requeued(prompt_id, reason))
        self._prompt_unstored = True

    async def _wait_for_backend(self) -> ComfyBackend | None:
        """Wait in the daemon's queue for a backend with room (reserved for us).

        No helper task and no timeout scope while some backend could run the task:
        the ticket's one event wakes us when we are handed a backend or when what
        the backends can run changed; `backend_wait_timeout` runs only while none can.
        """
        if self.cancel_requested():
            # Cancelled while the last attempt was dropped (nothing of ours is left
            # in a ComfyUI, or it is removed there): no need to wait for a backend.
            self.handle(task.Cancelled("cancelled before it was resubmitted"))
            return None
        dispatcher = self.dispatcher
        if self._needs is None:
            self._needs = needs_of(self.state.spec.graph)
        ticket = Ticket(
            self.task_id,
            self._needs,
            on_position=lambda ahead: self.handle(
                task.QueueUpdate(comfy.QueuePosition(False, ahead))
            ),
            avoid=self._avoid,
        )
        dispatcher.enter(ticket)
        entered_at = trio.current_time()
        try:
            if ticket.backend is not None:
                # Handed a backend at once: still a checkpoint, as any wait for a turn
                # is (others run, and mirror the snapshot just published, first).
                await trio.lowlevel.checkpoint()
            unrunnable_until = math.inf  # while no backend can run it: when we give up
            while ticket.backend is None and not self.is_done():
                if dispatcher.runnable_now(ticket.needs):
                    unrunnable_until = math.inf
                elif unrunnable_until == math.inf:
                    if (until := self._no_backend_can_run(ticket)) is None:
                        break  # ended: no backend ever can
                    unrunnable_until = until
                elif trio.current_time() >= unrunnable_until:
                    self._backend_wait_timed_out()
                    break
                if unrunnable_until == math.inf:
                    await ticket.wakeup.wait()
                else:
                    with trio.move_on_at(unrunnable_until):
                        await ticket.wakeup.wait()
                ticket.wakeup = trio.Event()
        except BaseException:
            if ticket.backend is not None:  # handed a backend, but we are gone
                dispatcher.release(ticket.backend)
            raise
        finally:
            dispatcher.withdraw(ticket)
            if self._submit_failing_since is not None:
                # Waiting for a backend's room is not failing: only the POSTs and
                # the pauses after them count towards giving up.
                self._submit_failing_since += trio.current_time() - entered_at
        backend = ticket.backend
        if backend is not None and self.is_done():
            dispatcher.release(backend)
            return None
        return backend

    def _no_backend_can_run(self, ticket: Ticket) -> float | None:
        """No connected, read backend can run the task now: end it when every backend
        says it never can (None), else show `waiting` and return when to give up."""
        reasons = self.pool.why_nowhere(ticket.needs)
        if reasons is not None and len(reasons) == len(self.pool.backends):
            # Accepted before the backends were read; now every one says no.
            missing = ", ".join(sorted(set(reasons.values())))
            self.handle(
                task.Failed(
                    "rejected",
                    "No ComfyUI backend can run this workflow",
                    f"every backend lacks {missing}",
                )
            )
            return None
        self.handle(task.BackendWaiting("no ComfyUI that can run this is connected"))
        return trio.current_time() + self.settings.backend_wait_timeout

    def _backend_wait_timed_out(self) -> None:
        self.handle(
            task.Failed(
                "backend_unavailable",
                "ComfyUI is not reachable",
                f"waited {self.settings.backend_wait_timeout:g} s for a backend "
                f"({', '.join(b.name for b in self.pool.backends)})",
            )
        )

    async def _attempt(self, backend: ComfyBackend, *, resumed: bool, reserved: bool) -> Attempt:
        """Submit to `backend` (or re-attach to it) and follow the prompt there."""
        self.attempts += 1
        self._use(backend)
        self._lost = trio.Event()
        self._reconcile_requested = trio.Event()
        subscription = backend.subscribe(
            self.prompt_id, deliver=self._take_frame, settle=self._frames_taken
        )
        self._subscription = subscription
        try:
            async with trio.open_nursery() as nursery:
                self._nursery, self._on_demand = nursery, set()
                try:
                    outcome = await self._follow(
                        nursery, backend, subscription, resumed=resumed, reserved=reserved
                    )
                finally:
                    # The attempt ends: no frame may reach it any more, and nothing
                    # new starts in its nursery (about to close to new tasks, where
                    # a late frame's pacer or fetch would raise in the consumer).
                    self._nursery = self._on_demand = None
                    subscription.close()
            return outcome
        finally:
            self._subscription = None
            subscription.close()  # (closed already, unless the nursery failed to open)

    async def _follow(
        self,
        nursery: trio.Nursery,
        backend: ComfyBackend,
        subscription: PromptSubscription,
        *,
        resumed: bool,
        reserved: bool,
    ) -> Attempt:
        """The attempt's body: submit (or re-attach), then follow until the prompt is lost."""
        nursery.start_soon(self._watch_backend, subscription)
        try:
            if resumed and self.state.submitted:
                # Re-attach to the prompt we submitted before the restart
                # (held: if it has ended, the reconcile says so).
                subscription.held()
                self.request_reconcile()
            elif (
                not (resumed and await self._found_after_restart(backend))
                # Unless given up under a new prompt id (ComfyUI could not say): this
                # attempt's subscription routes the old one, the next attempt submits it.
                and subscription.prompt_id == self.prompt_id
            ):
                await self._submit(backend, subscription)
        finally:
            if reserved:
                self.dispatcher.release(backend)
        if not self.state.submitted:
            nursery.cancel_scope.cancel()
            return Attempt.RETURNED
        self._submit_failing_since, self._avoid = None, frozenset()  # it took the prompt
        if self.state.cancel_requested:
            # Cancelled while the POST was in flight: take it back out.
            nursery.start_soon(self._cancel_in_comfyui)
        subscription.follow_queue(self._place_in)
        assert self._lost is not None  # made by _attempt
        await self._lost.wait()
        nursery.cancel_scope.cancel()
        return Attempt.LOST

    def _lost_there(self, reason: str, still_there: bool) -> None:
        """The current attempt's backend lost the prompt: resubmit, or end with `lost`."""
        if self.is_done() or self.state.fetching_outputs:
            return
        if still_there and self.backend is not None:
            # Whatever comes next, nobody waits for this prompt there: it goes once
            # that ComfyUI is back (else it would run there for nothing).
            self.pool.abandon(self.backend, self.prompt_id)
        if not self.settings.resubmit_lost:
            self.handle(task.Failed("lost", "The prompt was lost by ComfyUI", reason))
            return
        self._lost_reason = reason
        if self._lost is not None:  # else no attempt runs (a restored task): it requeues
            self._lost.set()

    def _flush(self, encoded: Snapshot | None = None) -> None:
        """Publish the newest message not published yet, if any (`encoded`: it, encoded)."""
        message, self._unpublished = self._unpublished, None
        if message is not None:
            self.broadcaster.publish(encoded or encode_snapshot(message))
            self._pacer.published(trio.current_time())

    def _take_frame(self, event: comfy.ComfyEvent) -> None:
        """One of our prompt's frames, handed over by the backend's consumer as it
        reads it: applied at once, published by `_frames_taken` (which the
        consumer calls once the frames of ours it read together are applied).

        It runs in the consumer's task, so it never awaits and never raises: a
        failure is kept for the pacer task, which raises it in the actor's own
        nursery (the registry's crash fallback then ends the task).
        """
        if self._crash is not None:
            return
        try:
            if isinstance(event, comfy.PreviewImage | comfy.PreviewImageWithMetadata):
                self._keep_preview(event)
                return
            if not isinstance(event, task.TaskEvent):
                return
            if self._unpublished is not None and _leaves_a_node_with_steps(self.state, event):
                # A node's last step is shown before the next node's state replaces
                # it (frames applied together, or held by the pacer, would skip it):
                # one publish more per node at most.
                self._flush()
            holding, self._holding = self._holding, True  # published when settled
            try:
                self.handle(event)  # (the end is published at once all the same)
            finally:
                self._holding = holding
        except Exception as exc:  # noqa: BLE001 - raised again by _pace
            self._crash = exc
            self._wake_pacer()

    def _frames_taken(self) -> None:
        """The frames read so far are applied: publish the newest state, as the pacer allows."""
        if self._unpublished is None or self._holding or self._crash is not None:
            return  # nothing new, or the pacer task publishes it when due, or a crash
        try:
            if self._pacer.delay(trio.current_time()) <= 0:
                self._flush()
            else:
                self._holding = True
                self._wake_pacer()
        except Exception as exc:  # noqa: BLE001 - raised again by _pace
            self._crash = exc
            self._wake_pacer()

    def _wake_pacer(self) -> None:
        self._pace_wake.set()
        self._start_once(self._pace)

    async def _pace(self) -> None:
        """Publish what frames left held back once the pacer allows (a burst of
        frames becomes a handful of publishes); raise what a frame raised."""
        try:
            while True:
                await self._pace_wake.wait()
                self._pace_wake = trio.Event()
                if self._crash is not None:
                    raise self._crash
                while self._unpublished is not None:
                    delay = self._pacer.delay(trio.current_time())
                    if delay <= 0:
                        break
                    await trio.sleep(delay)
                self._holding = False
                self._flush()
        finally:
            self._holding = False
            self._flush()

    def _keep_preview(self, event: comfy.PreviewImage | comfy.PreviewImageWithMetadata) -> None:
        """Store the image (never in the state or the stream); announce it, throttled."""
        if self.is_done():
            return
        version = self.previews.put(self.task_id, event.media_type, event.image)
        if version is None:
            return
        if self._preview_throttle is None:
            self._preview_throttle = PreviewThrottle(
                self.settings.preview_max_rate,
                lambda version: self.handle(task.PreviewReady(version)),
            )
        self._preview_throttle.offer(version)
        self._start_once(self._preview_throttle.run)

    # -- submitting

    async def _submit(self, backend: ComfyBackend, subscription: PromptSubscription) -> None:
        """POST the prompt; leaves the task unsubmitted when this backend cannot take it."""
        if self._prompt_unstored and self.until_stored is not None:
            # A new prompt id reaches ComfyUI only once it is stored (with the prompt
            # given up for it): killed right after this POST, a restarted daemon (or
            # the worker that claims the task) would follow the old prompt and leave
            # this one to run there too.
            await self.until_stored(self.task_id)
        self._prompt_unstored = False
        if self.state.cancel_requested:
            self.handle(task.Cancelled("cancelled before it reached ComfyUI"))
            return
        if not backend.is_connected():
            return
        self._submitting = True
        try:
            graph = await self._graph_for(backend)
            reply = await backend.http.submit(
                graph, client_id=backend.client_id, prompt_id=self.prompt_id
            )
        except SourceImageGone as exc:
            # No backend could run it: the end now, not after backend_wait_timeout.
            if self.cancel_requested():
                self.handle(task.Cancelled("cancelled before it reached ComfyUI"))
            else:
                self.handle(task.Failed("source_unavailable", "The source image is gone", str(exc)))
            return
        except BackendUnavailable as exc:
            self._log(logging.WARNING, "submitting to %s failed: %s", backend.name, exc)
            # The POST may have arrived even though the answer did not.
            known = await self._already_known()
            if known is None:
                self._give_up_unknown(backend, f"{backend.name} did not answer the POST: {exc}")
            if not known:
                await self._submit_failed(backend, exc)
            return
        finally:
            self._submitting = False
        if isinstance(reply, comfy.PromptRejected):
            self._log(logging.INFO, "ComfyUI rejected the prompt: %s", reply.message)
            self.handle(task.SubmitRejected(reply))
            return
        if reply.prompt_id != self.prompt_id:
            # A ComfyUI from before POST /prompt took a prompt_id: frames, /queue and
            # /history name the prompt by an id of its own, so nothing of it would ever
            # reach the task (it was taken for lost and resubmitted, without end).
            self.pool.abandon(backend, reply.prompt_id)
            self.handle(
                task.Failed(
                    "rejected",
                    "ComfyUI does not take the daemon's prompt ids",
                    f"{backend.name} ran the prompt as {reply.prompt_id!r}, not as the"
                    f" {self.prompt_id!r} it was sent (a ComfyUI too old for prompt_id"
                    " in POST /prompt); the daemon cannot follow it",
                )
            )
            return
        subscription.submitted()
        self._log(logging.INFO, "submitted to %s as number %d", backend.name, reply.number)
        self.handle(task.Submitted(reply.number))

    async def _submit_failed(self, backend: ComfyBackend, error: BackendUnavailable) -> None:
        """ComfyUI did not take the prompt (as far as it can tell): back to the queue, to
        another backend when one can run it (one whose POST /prompt answers 500 stays
        the least loaded); the end once the POSTs kept failing for backend_wait_timeout."""
        now = trio.current_time()
        if self._submit_failing_since is None:
            self._submit_failing_since = now
        self._avoid |= {backend.name}
        if not self.cancel_requested():
            failing_for = now - self._submit_failing_since
            if failing_for >= self.settings.backend_wait_timeout:
                self.handle(
                    task.Failed(
                        "backend_unavailable",
                        "ComfyUI does not take the prompt",
                        f"POST /prompt kept failing for {failing_for:.0f} s; last: {error}",
                    )
                )
                return
            await trio.sleep(SUBMIT_RETRY_DELAY)  # then back to the queue
        if self.cancel_requested():
            # Cancelled while the POST was under way: end now (back in the queue it
            # would wait for a backend, and end `backend_unavailable` if none came).
            # Had the POST arrived after all, the prompt is removed at that
            # backend's next connect.
            self.pool.abandon(backend, self.prompt_id)
            self.handle(task.Cancelled("cancelled before it reached ComfyUI"))

    async def _graph_for(self, backend: ComfyBackend) -> Mapping[str, Any]:
        """The graph to POST there: an inpainting source is uploaded to that backend first."""
        spec = self.state.spec
        if spec.source_image is None:
            return spec.graph
        try:
            data = await self.images.read(spec.source_image)
        except StorageError as exc:  # it may be readable again soon: retried
            raise BackendUnavailable(str(exc)) from exc
        if data is None:
            raise SourceImageGone(
                f"the source image {image_url(spec.source_image)} is no longer stored "
                "(image_retention, or deleted); upload it again"
            )
        info = image_info(data)
        reply = await backend.http.upload_image(spec.source_image, data, info.content_type)
        subfolder = reply.get("subfolder")
        name = str(reply["name"])
        comfy_name = f"{subfolder}/{name}" if isinstance(subfolder, str) and subfolder else name
        return replace_input_value(spec.graph, spec.source_image, comfy_name)

    async def _found_after_restart(self, backend: ComfyBackend) -> bool:
        """A restored task not known to be submitted: did ComfyUI take its POST before
        the restart? A cancel meanwhile waits for the answer, as during a POST (ended
        now, the task would leave a prompt it has there running)."""
        self._submitting = True
        try:
            known = await self._already_known()
        finally:
            self._submitting = False
        if known is None:
            self._give_up_unknown(backend, f"{backend.name} cannot say whether it has the prompt")
        return bool(known)

    def _give_up_unknown(self, backend: ComfyBackend, reason: str) -> None:
        """Whether `backend` holds the prompt nobody can tell: whatever it holds goes
        once it is back, and the task goes on under a new prompt id, which no copy
        left there shares (the removal cannot race a later POST of ours)."""
        self.pool.abandon(backend, self.prompt_id)
        self._requeue(reason)

    async def _already_known(self) -> bool | None:
        """After a failed POST: did ComfyUI take the prompt anyway? None: it cannot say."""
        backend = self.backend
        if backend is None:
            return False
        try:
            snapshot = await backend.http.queue()
            if snapshot.position_of(self.prompt_id) is not None:
                if self._subscription is not None:
                    self._subscription.held()
                self.handle(task.Submitted(-1))
                return True
            if await backend.http.history(self.prompt_id) is not None:
                self.handle(task.Submitted(-1))
                self.request_reconcile()
                return True
        except BackendUnavailable:
            return None
        return False

    # -- following the prompt

    def _place_in(self, reading: QueueReading) -> bool:
        """A GET /queue reading of the attempt's backend, asked for after the prompt
        was submitted (told by its QueuePlaces): show how many prompts are ahead.
        False once the prompt left the queue. It runs in the backend's task, so
        it never awaits or raises (a failure is raised by the pacer task)."""
        if self._crash is not None or self.state.phase not in _IN_QUEUE:
            return False
        if self.state.phase is task.Phase.WAITING:
            return True  # the socket is away: the reconcile after it is back tells
        try:
            position = reading.snapshot.position_of(self.prompt_id)
            if position is None:
                self.request_reconcile()  # finished already, or gone
                return True
            if position.running and self._subscription is not None:
                self._subscription.note_running(reading)
            self.handle(task.QueueUpdate(position))
        except Exception as exc:  # noqa: BLE001 - raised again by _pace
            self._crash = exc
            self._wake_pacer()
            return False
        return True

    async def _watch_backend(self, subscription: PromptSubscription) -> None:
        """Reconcile after each reconnect; show `waiting` while the backend is away, and
        give the prompt up when it stays away past `backend_lost_after`."""
        name = subscription.backend_name
        while True:
            if subscription.reconnected():
                # Frames sent while we were away are lost: ask ComfyUI.
                self.request_reconcile()
            if self.state.submitted and not subscription.is_connected():
                self.handle(task.BackendLost(f"{name} is not connected"))
                with trio.move_on_after(self.settings.backend_lost_after):
                    await subscription.wait_connected()
                if not subscription.is_connected():
                    self._lost_there(
                        f"{name} was away for {self.settings.backend_lost_after:g} s", True
                    )
                    return
                continue
            if self.state.submitted and not subscription.hears_frames():
                # Submitted under an older client id: no frames reach us; poll.
                with trio.move_on_after(max(2.0, self.settings.queue_poll_interval * 2)):
                    await subscription.wait_connection_change()
                self.request_reconcile()
                continue
            await subscription.wait_connection_change()

    async def _reconcile_loop(self) -> None:
        retry_in = SUBMIT_RETRY_DELAY
        while True:
            assert self._reconcile_requested is not None  # made before this loop starts
            await self._reconcile_requested.wait()
            self._reconcile_requested = trio.Event()
            if not self.state.submitted:
                continue
            try:
                await self._reconcile()
            except BackendUnavailable as exc:
                self._log(logging.WARNING, "cannot reconcile yet: %s", exc)
                subscription = self._subscription
                if subscription is None or not subscription.is_connected():
                    continue  # _watch_backend asks again once it is back (or gives it up)
                # The socket is up: no reconnect will ask again, and a prompt that
                # ended while we were away sends no frame ever again. Ask again.
                await trio.sleep(retry_in)
                retry_in = min(retry_in * 2, RECONCILE_RETRY_MAX_DELAY)
                self.request_reconcile()
            else:
                retry_in = SUBMIT_RETRY_DELAY

    async def _reconcile(self) -> None:
        """Ask ComfyUI how the prompt stands: frames may have been lost.

        The queue first: one reading answers every task that reconciles at once
        (all of a backend's after it reconnects; thousands, when ComfyUI holds
        thousands of our prompts), where /history is one request per prompt.
        A prompt in no reading asked for after the reason to reconcile had left
        the queue by then, and ComfyUI writes its history entry as it leaves
        (PromptQueue.task_done does both under the lock /queue is read under):
        /history has it, unless ComfyUI lost it (a restart) or it was deleted."""
        backend, subscription = self.backend, self._subscription
        assert backend is not None
        assert subscription is not None
        reading = await backend.read_queue(started_after=self._reconcile_asked_moment)
        position = reading.snapshot.position_of(self.prompt_id)
        if position is not None:
            if position.running:
                subscription.note_running(reading)
            self.handle(task.QueueUpdate(position))
            return
        entry = await backend.http.history(self.prompt_id)
        if entry is not None:
            self.handle(task.HistoryFound(entry))
            return
        if self.state.fetching_outputs:
            return
        self._log(logging.WARNING, "ComfyUI has neither queued nor finished the prompt")
        self._lost_there(
            f"{backend.name} has neither queued nor finished it (was ComfyUI restarted?)", False
        )

    # -- outputs

    async def _fetch_outputs(self, images: tuple[comfy.ImageRef, ...]) -> None:
        if self._fetching:
            return
        self._fetching = True
        deadline = trio.current_time() + self.settings.backend_wait_timeout
        while True:
            try:
                files = await self._store_images(images)
            except OutputMissing as exc:
                self.handle(
                    task.Failed("output_unavailable", "The output image is missing", str(exc))
                )
                return
            except OutputTooLarge as exc:
                self.handle(
                    task.Failed("output_unavailable", "The output image is too large", str(exc))
                )
                return
            except NotAnImage as exc:
                self.handle(
                    task.Failed("output_unavailable", "ComfyUI sent a broken image", str(exc))
                )
                return
            except StorageError as exc:
                self._log(logging.ERROR, "cannot store the output image: %s", exc)
                self.handle(task.Failed("storage", "The daemon cannot store the image", str(exc)))
                return
            except BackendUnavailable as exc:
                if trio.current_time() >= deadline:
                    self.handle(
                        task.Failed("output_unavailable", "Could not fetch the image", str(exc))
                    )
                    return
                self._log(logging.WARNING, "fetching the image failed, retrying: %s", exc)
                await trio.sleep(SUBMIT_RETRY_DELAY)
                continue
            self.handle(task.OutputsStored(files))
            return

    async def _store_images(self, images: tuple[comfy.ImageRef, ...]) -> tuple[str, ...]:
        """Fetch and store the images not stored yet: a retry, or a fetch a restart cut
        short, goes on with those it has (a second copy would be named by nothing, and
        never deleted with the task)."""
        backend = self.backend
        assert backend is not None
        if not images:
            entry = await backend.http.history(self.prompt_id)
            images = entry.images if entry is not None else ()
        # Saved images ("output") are the result; previews ("temp") only when
        # the workflow saves nothing.
        wanted = tuple(i for i in images if i.type == "output") or images
        stored = self._stored
        if stored is None or stored.prompt_id != self.prompt_id:
            # Stored for a prompt given up since (restored, then resubmitted): not these.
            await self.discard_outputs()
            stored = StoredOutputs(self.prompt_id, {})
        for image in dict.fromkeys(wanted):  # each file once, as the frames' outputs
            if image not in stored.images:
                data = await backend.http.view(image)
                name = await self.images.save(data)
                stored = StoredOutputs(self.prompt_id, {**stored.images, image: name})
                self._stored = stored
                self.outputs_saved = tuple(stored.images.values())  # held from now on
                if not self.is_done():  # (a task that ended reported its end already)
                    self._report()  # journalled: a restart goes on with it
        return tuple(stored.images[image] for image in dict.fromkeys(wanted))

    async def discard_outputs(self) -> None:
        """Delete the output images stored for a task that ended without them (a
        cancel or a failure while they were fetched): no result names them, so
        nothing could ever ask for them. Best effort: what is left, the image
        retention deletes later (no task holds it any more)."""
        if self.state.phase is task.Phase.COMPLETED or not self.outputs_saved:
            return
        names, self.outputs_saved = self.outputs_saved, ()
        for name in names:
            try:
                await self.images.delete(name)
            except OSError as exc:
                self._log(logging.WARNING, "cannot delete the unused image %s: %s", name, exc)
        self._log(logging.INFO, "deleted %d image(s) of a task ended without them", len(names))

    # -- cancel

    def cancel(self) -> CancelResult:
        """Cancel the task (idempotent). The stream ends with error code "cancelled"."""
        if self.state.phase.is_terminal:
            return CancelResult.ALREADY_FINISHED
        if not self.state.cancel_requested:
            self._log(logging.INFO, "cancel requested")
            # While the images are fetched this ends the task at once (ComfyUI has
            # nothing of it left to cancel): ending stops the fetch, and the
            # registry deletes the images stored so far (discard_outputs).
            self.handle(task.CancelRequested())
            if self.is_done():
                return CancelResult.CANCELLING  # ended at once, as the 202 says
            if self.state.submitted:
                self._start(self._cancel_in_comfyui)
            elif not self._submitting:
                self.handle(task.Cancelled("cancelled before it reached ComfyUI"))
            # else: the attempt sees the flag once the POST is answered
        return CancelResult.CANCELLING

    async def _cancel_in_comfyui(self) -> None:
        backend = self.backend
        assert backend is not None
        if not backend.is_connected():
            # Its backend is away: end the task now, and remove the prompt once it is back.
            self.pool.abandon(backend, self.prompt_id)
            self.handle(task.Cancelled(f"{backend.name} is away; the prompt goes when it is back"))
            return
        http = backend.http
        for _ in range(3):
            try:
                position = (await http.queue()).position_of(self.prompt_id)
                if position is None:
                    self.request_reconcile()
                    return
                if position.running:
                    await http.interrupt(self.prompt_id)
                    # execution_interrupted arrives on the WebSocket; if it does
                    # not, /history tells.
                    with trio.move_on_after(CANCEL_CONFIRM_TIMEOUT):
                        await self.finished.wait()
                    self.request_reconcile()
                    return
                await http.delete_queued(self.prompt_id)
                after = (await http.queue()).position_of(self.prompt_id)
                if after is None:
                    self.handle(task.Cancelled("removed from ComfyUI's queue"))
                    return
            except BackendUnavailable as exc:
                self._log(logging.WARNING, "cancel: ComfyUI unreachable: %s", exc)
                await trio.sleep(SUBMIT_RETRY_DELAY)
        if self.is_done():
            return
        # ComfyUI did not take the cancel: end the task now, as for a backend that is
        # away, and leave the prompt to the pool, which removes it once ComfyUI answers
        # (else it ran to its end, the task "Cancelling..." all the while).
        self.pool.abandon(backend, self.prompt_id)
        self.handle(
            task.Cancelled(f"{backend.name} did not take the cancel; the prompt goes later")
        )
