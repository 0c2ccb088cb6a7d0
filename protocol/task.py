"""The task lifecycle, as one transition table (h11 `_state.py` style).

Rule 1: everything that changes a task's state lives in this file.
Rule 2: this file does no I/O; `now` (wall-clock seconds) is an argument.

    queued --> running --> completed
       \\          \\
        `----------`----> error      (a cancel is an error with code "cancelled")

`apply(state, event, now)` looks up `(state.phase, type(event))` in
`TRANSITIONS`; a pair that is not in the table changes nothing, which is how
events of other prompts and events after a terminal state are ignored. When the
visible state changed, the effects start with `Publish(message)`: the message
is exactly the seed's JSON format (plus extra fields), and its `version` grows
by one per publish, so SSE `id:`s are the versions.

A success is not terminal at once: the daemon must first store the output
images, so `execution_success` yields a `FetchOutputs` command and the task
completes on `OutputsStored`.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Final, TypeAlias

from protocol import progress as pg
from protocol.comfy import (
    Executed,
    Executing,
    ExecutionCached,
    ExecutionError,
    ExecutionInterrupted,
    ExecutionStart,
    ExecutionSuccess,
    HistoryEntry,
    ImageRef,
    Progress,
    ProgressState,
    ProgressText,
    PromptEvent,
    PromptRejected,
    QueuePosition,
    graph_class_types,
)

# ---------------------------------------------------------------------------
# What was asked for, and the state


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """Everything a task was created with; the result echoes these fields."""

    task_id: str
    prompt_id: str  # chosen by the daemon, so frames can be routed before submitting
    graph: Mapping[str, Any] = field(hash=False, repr=False)
    prompt: str = ""
    workflow: str = "txt2img"
    seed: int | None = None
    name: str | None = None
    description: str | None = None
    inpaint: bool = False
    inpaint_area: Mapping[str, int] | None = field(default=None, hash=False)
    uid: int = 0  # creation time in ms, the seed's `uid`


class Phase(Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    ERROR = "error"

    @property
    def is_terminal(self) -> bool:
        return self in (Phase.COMPLETED, Phase.ERROR)


@dataclass(frozen=True, slots=True)
class TaskError:
    code: str  # comfy_error | interrupted | cancelled | rejected | backend_unavailable | lost | ...
    message: str
    details: str = ""
    node_id: str | None = None
    node_type: str | None = None
    exception_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message, "details": self.details, "code": self.code}
        if self.node_id is not None:
            out["nodeId"] = self.node_id
        if self.node_type is not None:
            out["nodeType"] = self.node_type
        if self.exception_type is not None:
            out["exceptionType"] = self.exception_type
        return out


@dataclass(frozen=True, slots=True)
class TaskState:
    spec: TaskSpec
    class_types: Mapping[str, str] = field(hash=False, repr=False)
    created_at: float
    phase: Phase = Phase.QUEUED
    version: int = 0
    submitted: bool = False
    step: str = pg.STEP_STARTING
    current_node: str | None = None
    value: float = 0
    max: float = 0
    peak_max: float = 0  # the largest max any node reported: the sampler's steps, for `complete`
    nodes_done: frozenset[str] = frozenset()
    overall_percentage: float = 0.0
    queue: QueuePosition | None = None
    tick_origin: pg.TickOrigin | None = None
    eta: float | None = None
    outputs: tuple[ImageRef, ...] = ()
    fetching_outputs: bool = False
    cancel_requested: bool = False
    image_files: tuple[str, ...] = ()
    error: TaskError | None = None
    started_at: float | None = None
    finished_at: float | None = None
    preview_version: int | None = None  # the newest preview announced to subscribers
    text: tuple[str, str] | None = None  # (node_id, text): a node's newest progress text

    @property
    def task_id(self) -> str:
        return self.spec.task_id

    @property
    def prompt_id(self) -> str:
        return self.spec.prompt_id


def new_task(spec: TaskSpec, now: float) -> TaskState:
    """A fresh task, queued, not yet submitted to ComfyUI."""
    return TaskState(spec=spec, class_types=graph_class_types(spec.graph), created_at=now)


def resumed_task(
    spec: TaskSpec, *, phase: Phase, version: int, submitted: bool, created_at: float
) -> TaskState:
    """A task in flight when the daemon stopped; it reconciles with ComfyUI next."""
    if phase.is_terminal:
        raise ValueError("a finished task is restored with finished_task()")
    return TaskState(
        spec=spec,
        class_types=graph_class_types(spec.graph),
        created_at=created_at,
        phase=phase,
        version=version,
        submitted=submitted,
        step=pg.STEP_QUEUED if submitted else pg.STEP_STARTING,
        started_at=created_at if phase is Phase.RUNNING else None,
    )


def finished_task(
    spec: TaskSpec, *, message: TaskMessage, created_at: float, finished_at: float
) -> TaskState:
    """A finished task, rebuilt from the last message it published."""
    payload = message.payload
    ended = replace(
        new_task(spec, created_at),
        version=message.version,
        submitted=True,
        finished_at=finished_at,
    )
    if message.event == EVENT_COMPLETE:
        urls = payload.get("result", {}).get("imageUrls") or []
        return replace(
            ended,
            phase=Phase.COMPLETED,
            step=pg.STEP_COMPLETE,
            image_files=tuple(str(u).rsplit("/", 1)[-1] for u in urls),
            overall_percentage=100.0,
        )
    raw = payload.get("error") or {}
    error = TaskError(
        code=str(raw.get("code", "internal")),
        message=str(raw.get("message", "Generation failed")),
        details=str(raw.get("details", "")),
        node_id=raw.get("nodeId"),
        node_type=raw.get("nodeType"),
        exception_type=raw.get("exceptionType"),
    )
    return replace(ended, phase=Phase.ERROR, step=pg.STEP_FAILED, error=error)


def spec_to_json(spec: TaskSpec) -> dict[str, Any]:
    return {
        "taskId": spec.task_id,
        "promptId": spec.prompt_id,
        "graph": dict(spec.graph),
        "prompt": spec.prompt,
        "workflow": spec.workflow,
        "seed": spec.seed,
        "name": spec.name,
        "description": spec.description,
        "inpaint": spec.inpaint,
        "inpaintArea": dict(spec.inpaint_area) if spec.inpaint_area is not None else None,
        "uid": spec.uid,
    }


def spec_from_json(data: Mapping[str, Any]) -> TaskSpec:
    return TaskSpec(
        task_id=data["taskId"],
        prompt_id=data["promptId"],
        graph=data["graph"],
        prompt=data.get("prompt", ""),
        workflow=data.get("workflow", "txt2img"),
        seed=data.get("seed"),
        name=data.get("name"),
        description=data.get("description"),
        inpaint=bool(data.get("inpaint", False)),
        inpaint_area=data.get("inpaintArea"),
        uid=int(data.get("uid", 0)),
    )


# ---------------------------------------------------------------------------
# Events from the daemon (ComfyUI's own events come from protocol.comfy)


@dataclass(frozen=True, slots=True)
class Submitted:
    """ComfyUI accepted the prompt (POST /prompt answered 200)."""

    number: int


@dataclass(frozen=True, slots=True)
class BackendWaiting:
    """No ComfyUI is reachable yet; the task waits (and says so)."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class SubmitRejected:
    rejection: PromptRejected


@dataclass(frozen=True, slots=True)
class QueueUpdate:
    """Where the prompt stands in ComfyUI's queue (from GET /queue)."""

    position: QueuePosition


@dataclass(frozen=True, slots=True)
class HistoryFound:
    """ComfyUI's /history says how the prompt ended (used after frames were lost)."""

    entry: HistoryEntry


@dataclass(frozen=True, slots=True)
class CancelRequested:
    pass


@dataclass(frozen=True, slots=True)
class Cancelled:
    """The daemon removed the prompt (or it never reached ComfyUI)."""

    details: str = ""


@dataclass(frozen=True, slots=True)
class OutputsStored:
    """The output images are on our disk, under these file names."""

    files: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Failed:
    """A failure the daemon detected itself (backend gone, prompt lost, output missing)."""

    code: str
    message: str
    details: str = ""


@dataclass(frozen=True, slots=True)
class PreviewReady:
    """A newer preview image is stored for this task (announced at a bounded rate)."""

    version: int


TaskEvent: TypeAlias = (
    PromptEvent
    | ProgressText
    | PreviewReady
    | Submitted
    | BackendWaiting
    | SubmitRejected
    | QueueUpdate
    | HistoryFound
    | CancelRequested
    | Cancelled
    | OutputsStored
    | Failed
)

# ---------------------------------------------------------------------------
# Effects: what the actor must do after a transition


@dataclass(frozen=True, slots=True)
class TaskMessage:
    """One message for subscribers: the SSE event name, its id, and the seed JSON."""

    event: str  # "progress" | "complete" | "error-event"
    version: int
    payload: Mapping[str, Any] = field(hash=False)

    @property
    def is_terminal(self) -> bool:
        return self.event != EVENT_PROGRESS


@dataclass(frozen=True, slots=True)
class Publish:
    message: TaskMessage


@dataclass(frozen=True, slots=True)
class FetchOutputs:
    """Fetch and store these images (empty: ask /history which images there are)."""

    images: tuple[ImageRef, ...]


@dataclass(frozen=True, slots=True)
class Reconcile:
    """The prompt ended but we missed how: ask /history."""


Effect: TypeAlias = Publish | FetchOutputs | Reconcile

EVENT_PROGRESS: Final = "progress"
EVENT_COMPLETE: Final = "complete"
EVENT_ERROR: Final = "error-event"

# ---------------------------------------------------------------------------
# Transition handlers: (state, event, now) -> (state, commands)

Transition: TypeAlias = tuple[TaskState, list[Effect]]
Handler: TypeAlias = Callable[[TaskState, Any, float], Transition]

_NO_EFFECTS: Final[list[Effect]] = []


def _fail(state: TaskState, error: TaskError, now: float) -> Transition:
    return (
        replace(state, phase=Phase.ERROR, error=error, step=pg.STEP_FAILED, finished_at=now),
        [],
    )


def _on_submitted(state: TaskState, event: Submitted, now: float) -> Transition:
    step = (
        pg.STEP_QUEUED
        if state.step in (pg.STEP_STARTING, pg.STEP_WAITING_FOR_BACKEND)
        else state.step
    )
    return replace(state, submitted=True, step=step), []


def _on_backend_waiting(state: TaskState, event: BackendWaiting, now: float) -> Transition:
    return replace(state, step=pg.STEP_WAITING_FOR_BACKEND), []


def _on_rejected(state: TaskState, event: SubmitRejected, now: float) -> Transition:
    rejection = event.rejection
    return _fail(
        state,
        TaskError(
            code="rejected",
            message="ComfyUI rejected the workflow",
            details=rejection.message,
            node_id=rejection.node_id,
            node_type=rejection.class_type or state.class_types.get(rejection.node_id or ""),
        ),
        now,
    )


def _on_queue_update(state: TaskState, event: QueueUpdate, now: float) -> Transition:
    position = event.position
    if state.phase is Phase.RUNNING:
        return state, []  # a stale /queue reading cannot send a running task back
    if position.running:
        # We missed execution_start (e.g. while reconnecting): it runs now.
        return _start(state, now), []
    return replace(state, queue=position, step=pg.queued_step(position.ahead)), []


def _start(state: TaskState, now: float) -> TaskState:
    if state.phase is not Phase.QUEUED:
        return state
    step = pg.STEP_CANCELLING if state.cancel_requested else pg.STEP_STARTING
    return replace(
        state, phase=Phase.RUNNING, queue=None, started_at=now, submitted=True, step=step
    )


def _on_execution_start(state: TaskState, event: ExecutionStart, now: float) -> Transition:
    return _start(state, now), []


def _on_cached(state: TaskState, event: ExecutionCached, now: float) -> Transition:
    state = _start(state, now)
    done = state.nodes_done | frozenset(event.nodes)
    return _with_overall(replace(state, nodes_done=done)), []


def _on_executing(state: TaskState, event: Executing, now: float) -> Transition:
    if event.node is None:
        if event.prompt_id is None:
            return state, []
        # The prompt is over, but the frame that says how never reached us.
        return state, [Reconcile()]
    state = _start(state, now)
    done = state.nodes_done
    value, maximum = state.value, state.max
    if state.current_node != event.node:
        if state.current_node is not None:
            done = done | {state.current_node}
        # A new node starts at 0 of its own max; 0/1 until it reports one (never the
        # previous node's 20/20 carried over to "Saving image...").
        value, maximum = 0, 1
    step = (
        pg.STEP_CANCELLING
        if state.cancel_requested
        else pg.step_name(state.class_types.get(event.node))
    )
    return _with_overall(
        replace(
            state,
            current_node=event.node,
            nodes_done=done,
            step=step,
            eta=None,
            value=value,
            max=maximum,
        )
    ), []


def _on_progress(state: TaskState, event: Progress, now: float) -> Transition:
    state = _start(state, now)
    origin = state.tick_origin
    if origin is None or origin.node != event.node or event.value < origin.value:
        origin = pg.TickOrigin(node=event.node, at=now, value=event.value)
    current = state.current_node
    step = state.step
    if event.node is not None and event.node != current:
        # Progress for a node whose `executing` we did not see (e.g. after a reconnect).
        current = event.node
        if not state.cancel_requested:
            step = pg.step_name(state.class_types.get(event.node))
    return _with_overall(
        replace(
            state,
            value=event.value,
            max=event.max,
            peak_max=max(state.peak_max, event.max),
            current_node=current,
            step=step,
            tick_origin=origin,
            eta=pg.eta_seconds(origin, now, event.value, event.max),
        )
    ), []


def _on_progress_state(state: TaskState, event: ProgressState, now: float) -> Transition:
    state = _start(state, now)
    finished = frozenset(n.node_id for n in event.nodes if n.state == "finished")
    return _with_overall(replace(state, nodes_done=state.nodes_done | finished)), []


def _on_progress_text(state: TaskState, event: ProgressText, now: float) -> Transition:
    return replace(state, text=(event.node_id, event.text)), []


def _on_preview_ready(state: TaskState, event: PreviewReady, now: float) -> Transition:
    if state.preview_version is not None and event.version <= state.preview_version:
        return state, []
    return replace(state, preview_version=event.version), []


def _on_executed(state: TaskState, event: Executed, now: float) -> Transition:
    state = _start(state, now)
    known = set(state.outputs)
    # A cached output node reports its old files again: keep each file once.
    new = tuple(image for image in event.images if image not in known)
    return replace(state, outputs=state.outputs + new), []


def _on_success(state: TaskState, event: ExecutionSuccess, now: float) -> Transition:
    state = _start(state, now)
    return _begin_fetch(state, state.outputs)


def _begin_fetch(state: TaskState, images: tuple[ImageRef, ...]) -> Transition:
    state = replace(
        state,
        fetching_outputs=True,
        outputs=images,
        nodes_done=state.nodes_done.union(state.class_types),
        step=pg.STEP_FETCHING_OUTPUT,
        eta=None,
    )
    return _with_overall(state), [FetchOutputs(images)]


def _execution_error(event: ExecutionError) -> TaskError:
    return TaskError(
        code="comfy_error",
        message=event.exception_message.strip() or f"{event.exception_type} in {event.node_type}",
        details=f"{event.exception_type} in node {event.node_id} ({event.node_type})",
        node_id=event.node_id,
        node_type=event.node_type,
        exception_type=event.exception_type,
    )


def _interruption(state: TaskState, event: ExecutionInterrupted) -> TaskError:
    if state.cancel_requested:
        return TaskError(
            code="cancelled",
            message="Generation cancelled",
            details=f"Stopped at node {event.node_id} ({event.node_type})",
            node_id=event.node_id,
            node_type=event.node_type,
        )
    return TaskError(
        code="interrupted",
        message="Generation was interrupted in ComfyUI",
        details=f"Interrupted at node {event.node_id} ({event.node_type})",
        node_id=event.node_id,
        node_type=event.node_type,
    )


def _on_error(state: TaskState, event: ExecutionError, now: float) -> Transition:
    return _fail(state, _execution_error(event), now)


def _on_interrupted(state: TaskState, event: ExecutionInterrupted, now: float) -> Transition:
    return _fail(state, _interruption(state, event), now)


def _on_history(state: TaskState, event: HistoryFound, now: float) -> Transition:
    entry = event.entry
    if entry.error is not None:
        return _fail(state, _execution_error(entry.error), now)
    if entry.interrupted is not None:
        return _fail(state, _interruption(state, entry.interrupted), now)
    if entry.succeeded:
        return _begin_fetch(_start(state, now), entry.images or state.outputs)
    return _fail(
        state,
        TaskError(
            code="comfy_error",
            message="ComfyUI reports the prompt failed",
            details=f"history status: {entry.status_str or 'unknown'}",
        ),
        now,
    )


def _on_cancel_requested(state: TaskState, event: CancelRequested, now: float) -> Transition:
    return replace(state, cancel_requested=True, step=pg.STEP_CANCELLING), []


def _on_cancelled(state: TaskState, event: Cancelled, now: float) -> Transition:
    return _fail(
        state,
        TaskError(code="cancelled", message="Generation cancelled", details=event.details),
        now,
    )


def _on_failed(state: TaskState, event: Failed, now: float) -> Transition:
    return _fail(
        state, TaskError(code=event.code, message=event.message, details=event.details), now
    )


def _on_outputs_stored(state: TaskState, event: OutputsStored, now: float) -> Transition:
    if not state.fetching_outputs:
        return state, []
    if not event.files:
        return _fail(
            state,
            TaskError(
                code="no_output",
                message="The workflow finished without an output image",
                details="ComfyUI reported success but no image",
            ),
            now,
        )
    done = replace(
        state,
        phase=Phase.COMPLETED,
        image_files=event.files,
        step=pg.STEP_COMPLETE,
        fetching_outputs=False,
        finished_at=now,
        overall_percentage=100.0,
    )
    return done, []


def _only_while_not_fetching(handler: Handler) -> Handler:
    """Once outputs are being fetched, late ComfyUI frames change nothing."""

    def guarded(state: TaskState, event: Any, now: float) -> Transition:
        if state.fetching_outputs:
            return state, []
        return handler(state, event, now)

    return guarded


# The table. Terminal phases have no entries: nothing changes them.
_PROMPT_HANDLERS: Final[dict[type, Handler]] = {
    ExecutionStart: _on_execution_start,
    ExecutionCached: _on_cached,
    Executing: _on_executing,
    Progress: _on_progress,
    ProgressState: _on_progress_state,
    ProgressText: _on_progress_text,
    PreviewReady: _on_preview_ready,
    Executed: _on_executed,
    ExecutionSuccess: _on_success,
    ExecutionError: _on_error,
    ExecutionInterrupted: _on_interrupted,
    HistoryFound: _on_history,
    QueueUpdate: _on_queue_update,
    CancelRequested: _on_cancel_requested,
}

TRANSITIONS: Final[dict[tuple[Phase, type], Handler]] = {
    (Phase.QUEUED, Submitted): _on_submitted,
    (Phase.QUEUED, BackendWaiting): _on_backend_waiting,
    (Phase.QUEUED, SubmitRejected): _on_rejected,
    (Phase.QUEUED, Cancelled): _on_cancelled,
    (Phase.QUEUED, Failed): _on_failed,
    (Phase.RUNNING, Cancelled): _on_cancelled,
    (Phase.RUNNING, Failed): _on_failed,
    (Phase.RUNNING, OutputsStored): _on_outputs_stored,
    **{(Phase.QUEUED, t): _only_while_not_fetching(h) for t, h in _PROMPT_HANDLERS.items()},
    **{(Phase.RUNNING, t): _only_while_not_fetching(h) for t, h in _PROMPT_HANDLERS.items()},
}


def _is_ours(state: TaskState, event: object) -> bool:
    """Frames for other prompts change nothing; prompt_id None is the reconnect re-send."""
    prompt_id = getattr(event, "prompt_id", None)
    return prompt_id is None or prompt_id == state.prompt_id


def apply(state: TaskState, event: TaskEvent, now: float) -> tuple[TaskState, list[Effect]]:
    """Feed one event; get the new state and what to do (publish first, then commands)."""
    handler = TRANSITIONS.get((state.phase, type(event)))
    if handler is None or not _is_ours(state, event):
        return state, list(_NO_EFFECTS)
    new, commands = handler(state, event, now)
    if _visible(new) == _visible(state):
        return new, commands
    new = replace(new, version=state.version + 1)
    return new, [Publish(render(new, now)), *commands]


# ---------------------------------------------------------------------------
# Rendering: the seed's JSON formats


def _nodes_done(state: TaskState) -> int:
    """How many of this graph's nodes are finished."""
    return len(state.nodes_done.intersection(state.class_types))


def _with_overall(state: TaskState) -> TaskState:
    running_fraction = 0.0
    if state.current_node is not None and state.current_node not in state.nodes_done:
        running_fraction = state.value / state.max if state.max > 0 else 0.0
    total = len(state.class_types)
    done = _nodes_done(state)
    result = pg.overall(state.overall_percentage, done, total, running_fraction)
    return replace(state, overall_percentage=result.percentage)


def _visible(state: TaskState) -> tuple[object, ...]:
    """The fields a message shows; a transition that changes none publishes nothing."""
    return (
        state.phase,
        state.step,
        state.value,
        state.max,
        state.overall_percentage,
        _nodes_done(state),
        state.queue,
        state.eta,
        state.error,
        state.image_files,
        state.preview_version,
        _progress_text(state),
    )


def _progress_text(state: TaskState) -> str | None:
    """The running node's progress text; a text of an earlier node is over."""
    if state.text is None or state.text[0] != state.current_node:
        return None
    return state.text[1]


def iso_timestamp(now: float) -> str:
    """ISO-8601 UTC with milliseconds, like JavaScript's toISOString()."""
    moment = _dt.datetime.fromtimestamp(now, tz=_dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def image_url(file_name: str) -> str:
    return f"/image/{file_name}"


def preview_url(task_id: str, version: int) -> str:
    """The version in the URL: each preview is its own cacheable resource."""
    return f"/tasks/{task_id}/preview?v={version}"


def result_of(state: TaskState) -> dict[str, Any]:
    """The seed's `result` object, with every image in `imageUrls`."""
    spec = state.spec
    urls = [image_url(f) for f in state.image_files]
    return {
        "imageUrl": urls[0] if urls else None,
        "imageUrls": urls,
        "description": spec.description,
        "prompt": spec.prompt,
        "seed": spec.seed,
        "name": spec.name,
        "workflow": spec.workflow,
        "inpaint": spec.inpaint,
        "inpaintArea": dict(spec.inpaint_area) if spec.inpaint_area is not None else None,
        "uid": spec.uid,
    }


def _num(value: float) -> float | int:
    """45.0 -> 45, so whole numbers look like the seed's integers."""
    return int(value) if float(value).is_integer() else value


def _overall_json(state: TaskState) -> dict[str, float | int]:
    done = _nodes_done(state)
    return pg.Overall(state.overall_percentage, done, len(state.class_types)).to_json()


def render(state: TaskState, now: float) -> TaskMessage:
    """The current state as the seed's message (progress, completed or error)."""
    base: dict[str, Any] = {"taskId": state.task_id}
    if state.phase is Phase.COMPLETED:
        # Always n/n: the sampler's steps, or 1/1 for a run that was wholly cached.
        steps = _num(state.peak_max) if state.peak_max > 0 else 1
        payload = {
            **base,
            "status": "completed",
            "progress": {
                "percentage": 100,
                "currentStep": pg.STEP_COMPLETE,
                "currentValue": steps,
                "maxValue": steps,
                "overall": _overall_json(state),
            },
            "result": result_of(state),
            "timestamp": iso_timestamp(now),
        }
        return TaskMessage(EVENT_COMPLETE, state.version, payload)
    if state.phase is Phase.ERROR:
        error = state.error or TaskError(code="internal", message="Generation failed")
        payload = {
            **base,
            "status": "error",
            "progress": {
                "percentage": 0,
                "currentStep": pg.STEP_FAILED,
                "currentValue": 0,
                "maxValue": 0,
                "overall": _overall_json(state),
            },
            "error": error.to_json(),
            "timestamp": iso_timestamp(now),
        }
        return TaskMessage(EVENT_ERROR, state.version, payload)
    progress_block: dict[str, Any] = {
        "percentage": _num(pg.percentage(state.value, state.max)),
        "currentStep": state.step,
        "currentValue": _num(state.value),
        "maxValue": _num(state.max),
        "overall": _overall_json(state),
        "etaSeconds": state.eta,
    }
    if state.current_node is not None:
        progress_block["node"] = state.current_node
        progress_block["nodeType"] = state.class_types.get(state.current_node)
    text = _progress_text(state)
    if text is not None:
        progress_block["text"] = text
    if state.preview_version is not None:
        progress_block["preview"] = {
            "url": preview_url(state.task_id, state.preview_version),
            "version": state.preview_version,
        }
    payload = {
        **base,
        "status": "in-progress",
        "phase": state.phase.value,
        "progress": progress_block,
        "queue": (
            {"position": state.queue.position, "ahead": state.queue.ahead}
            if state.queue is not None
            else None
        ),
        "timestamp": iso_timestamp(now),
    }
    return TaskMessage(EVENT_PROGRESS, state.version, payload)
