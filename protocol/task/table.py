"""The task lifecycle as one transition table (h11's `_state.py` is the model).

Rule 1: everything that changes a task's state lives in this file.
Rule 2: this file does no I/O; `now` (wall-clock seconds) is an argument.

The stages (protocol.task.state.Stage) and the public phase each shows:

    AWAITING_BACKEND (queued) --Submitted--> SUBMITTED (queued) --ExecutionStart--> RUNNING
    RUNNING --ExecutionSuccess--> FETCHING_OUTPUTS (running) --OutputsStored--> COMPLETED
    SUBMITTED/RUNNING --BackendLost--> BACKEND_AWAY (waiting) --frames, /queue--> SUBMITTED/RUNNING
    any unfinished but FETCHING_OUTPUTS --Requeued--> REQUEUED --Submitted--> SUBMITTED
    any unfinished --Failed/Cancelled/ExecutionError/...--> ERROR  (a cancel: code "cancelled")
    FETCHING_OUTPUTS --CancelRequested--> ERROR  (nothing is left to cancel in ComfyUI)

Beside the stage runs a second two-state machine, `cancel_requested`: off,
then on ("cancelling") from CancelRequested until the task ends; it changes
what the task shows ("Cancelling...") and how an interruption ends it. A task
once cancelling never completes: a success ComfyUI reports after the cancel was
asked for (it finished before the cancel reached it) ends it as `cancelled`
too, without fetching the images; so does any failure but the daemon's own
("internal"): a rejection of the POST under way when the cancel came, a node's
error, a lost prompt (its reason kept in the details).

`TRANSITIONS` has an entry for every (stage, event type): the handler and the
stages it may lead to, or `IGNORED` (the event changes nothing there: late
frames while the images are fetched, anything after the end). `apply` looks the
pair up, drops events of other prompts, runs the handler and checks that it
went where the table says. When the visible state changed, the effects start
with `Publish(message)` (protocol.task.render); its `version` grows by one per
publish, so SSE `id:`s are the versions.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
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
    ImageRef,
    Progress,
    ProgressState,
    ProgressText,
)
from protocol.task.render import render, visible
from protocol.task.state import (
    BackendLost,
    BackendWaiting,
    Cancelled,
    CancelRequested,
    Effect,
    Failed,
    FetchOutputs,
    HistoryFound,
    OutputsStored,
    PreviewReady,
    Publish,
    QueueUpdate,
    Reconcile,
    Requeued,
    Stage,
    SubmitRejected,
    Submitted,
    TaskError,
    TaskEvent,
    TaskState,
    evolve,
    new_task,
)

Transition: TypeAlias = tuple[TaskState, list[Effect]]
Handler: TypeAlias = Callable[[TaskState, Any, float], Transition]

EVENT_TYPES: Final[tuple[type, ...]] = typing.get_args(TaskEvent)

# ---------------------------------------------------------------------------
# Handlers: (state, event, now) -> (state, commands). Each runs only where the
# table sends it, so none guards against stages it is not listed for.


def _fail(state: TaskState, error: TaskError, now: float) -> Transition:
    if state.cancel_requested and error.code not in ("cancelled", "internal"):
        error = _cancelled_instead(error)
    return (
        evolve(state, stage=Stage.ERROR, error=error, step=pg.STEP_FAILED, finished_at=now),
        [],
    )


def _cancelled_instead(error: TaskError) -> TaskError:
    """A task that failed while cancelling (ComfyUI's error or rejection came before
    the cancel took, a lost prompt, ...) ends `cancelled`, as its 202 promised; why
    it stopped is kept in the details. Only a daemon bug ("internal") shows as itself."""
    reason = f"{error.message}: {error.details}" if error.details else error.message
    return replace(
        error,
        code="cancelled",
        message="Generation cancelled",
        details=f"it stopped before the cancel took effect: {reason}",
    )


# Why a task whose prompt ComfyUI finished ends cancelled all the same.
_FINISHED_FIRST: Final = "ComfyUI had finished the prompt; its images are not kept"


def _cancelled(state: TaskState, details: str, now: float) -> Transition:
    return _fail(
        state, TaskError(code="cancelled", message="Generation cancelled", details=details), now
    )


def _on_submitted(state: TaskState, event: Submitted, now: float) -> Transition:
    step = state.step
    if step in (pg.STEP_STARTING, pg.STEP_WAITING_FOR_BACKEND) or step.startswith(pg.STEP_REQUEUED):
        step = pg.STEP_QUEUED
    return evolve(state, stage=Stage.SUBMITTED, step=step), []


def _on_backend_lost(state: TaskState, event: BackendLost, now: float) -> Transition:
    return evolve(
        state, stage=Stage.BACKEND_AWAY, step=pg.STEP_BACKEND_AWAY, queue=None, eta=None
    ), []


def _on_requeued(state: TaskState, event: Requeued, now: float) -> Transition:
    """Everything the lost attempt showed starts over; the task keeps its id and seed."""
    fresh = new_task(replace(state.spec, prompt_id=event.new_prompt_id), state.created_at)
    return evolve(
        fresh,
        stage=Stage.REQUEUED,
        version=state.version,
        step=pg.STEP_REQUEUED,
        cancel_requested=state.cancel_requested,
        started_at=state.started_at,
    ), []


def _on_backend_waiting(state: TaskState, event: BackendWaiting, now: float) -> Transition:
    return evolve(state, step=pg.STEP_WAITING_FOR_BACKEND), []


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
    if position.running:
        # We missed execution_start (e.g. while reconnecting): it runs now.
        return _start(state, now), []
    if state.stage is Stage.REQUEUED:
        step = pg.requeued_step(position.ahead)
        return evolve(state, queue=position, step=step), []
    # A backend that is back and still has the prompt queued: queued there again.
    stage = Stage.SUBMITTED if state.stage is Stage.BACKEND_AWAY else state.stage
    if state.cancel_requested:
        return evolve(state, stage=stage, queue=position), []
    step = pg.queued_step(position.ahead)
    return evolve(state, stage=stage, queue=position, step=step), []


# The stages a prompt event can start running from.
_NOT_STARTED: Final = frozenset(
    {Stage.AWAITING_BACKEND, Stage.SUBMITTED, Stage.BACKEND_AWAY, Stage.REQUEUED}
)


def _start(state: TaskState, now: float) -> TaskState:
    if state.stage not in _NOT_STARTED:
        return state
    step = pg.STEP_CANCELLING if state.cancel_requested else pg.STEP_STARTING
    if state.stage is Stage.BACKEND_AWAY and state.current_node is not None:
        # Back from a backend that kept running: the node it was on, until frames say more.
        step = (
            state.step
            if state.cancel_requested
            else pg.step_name(state.class_types.get(state.current_node))
        )
    return evolve(
        state,
        stage=Stage.RUNNING,
        queue=None,
        started_at=state.started_at if state.started_at is not None else now,
        step=step,
    )


def _on_execution_start(state: TaskState, event: ExecutionStart, now: float) -> Transition:
    return _start(state, now), []


def _on_cached(state: TaskState, event: ExecutionCached, now: float) -> Transition:
    state = _start(state, now)
    done = state.nodes_done | frozenset(event.nodes)
    return _with_overall(state, nodes_done=done), []


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
        state,
        current_node=event.node,
        nodes_done=done,
        step=step,
        eta=None,
        value=value,
        max=maximum,
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
        state,
        value=event.value,
        max=event.max,
        peak_max=max(state.peak_max, event.max),
        current_node=current,
        step=step,
        tick_origin=origin,
        eta=pg.eta_seconds(origin, now, event.value, event.max),
    ), []


def _on_progress_state(state: TaskState, event: ProgressState, now: float) -> Transition:
    state = _start(state, now)
    finished = frozenset(n.node_id for n in event.nodes if n.state == "finished")
    return _with_overall(state, nodes_done=state.nodes_done | finished), []


def _on_progress_text(state: TaskState, event: ProgressText, now: float) -> Transition:
    return evolve(state, text=(event.node_id, event.text)), []


def _on_preview_ready(state: TaskState, event: PreviewReady, now: float) -> Transition:
    if state.preview_stored is not None and event.version <= state.preview_stored:
        return state, []  # an older one, late
    # Named by the snapshot announcing it (apply gives it this version): a URL that
    # never named another image of this task, whichever process stored either.
    return evolve(state, preview_stored=event.version, preview_version=state.version + 1), []


def _on_executed(state: TaskState, event: Executed, now: float) -> Transition:
    state = _start(state, now)
    known = set(state.outputs)
    # A cached output node reports its old files again: keep each file once.
    new = tuple(image for image in event.images if image not in known)
    return evolve(state, outputs=state.outputs + new), []


def _on_success(state: TaskState, event: ExecutionSuccess, now: float) -> Transition:
    state = _start(state, now)
    if state.cancel_requested:
        return _cancelled(state, _FINISHED_FIRST, now)
    return _begin_fetch(state, state.outputs)


def _begin_fetch(state: TaskState, images: tuple[ImageRef, ...]) -> Transition:
    state = _with_overall(
        state,
        stage=Stage.FETCHING_OUTPUTS,
        outputs=images,
        nodes_done=state.nodes_done.union(state.class_types),
        step=pg.STEP_FETCHING_OUTPUT,
        eta=None,
    )
    return state, [FetchOutputs(images)]


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
        if state.cancel_requested:
            return _cancelled(_start(state, now), _FINISHED_FIRST, now)
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
    if state.stage is Stage.FETCHING_OUTPUTS:
        # ComfyUI is done with the prompt: nothing to wait for there, end now
        # (the fetch of the images stops with the task).
        return _cancelled(state, _FINISHED_FIRST, now)
    return evolve(state, cancel_requested=True, step=pg.STEP_CANCELLING), []


def _on_cancelled(state: TaskState, event: Cancelled, now: float) -> Transition:
    return _cancelled(state, event.details, now)


def _on_failed(state: TaskState, event: Failed, now: float) -> Transition:
    return _fail(
        state, TaskError(code=event.code, message=event.message, details=event.details), now
    )


def _on_outputs_stored(state: TaskState, event: OutputsStored, now: float) -> Transition:
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
    done = evolve(
        state,
        stage=Stage.COMPLETED,
        image_files=event.files,
        step=pg.STEP_COMPLETE,
        finished_at=now,
        overall_percentage=100.0,
    )
    return done, []


def _with_overall(state: TaskState, **changes: Any) -> TaskState:
    """`evolve(state, **changes)`, its overall percentage following from the changes
    (computed first, so a frame makes one new state here, not two)."""
    current = changes.get("current_node", state.current_node)
    done: frozenset[str] = changes.get("nodes_done", state.nodes_done)
    running_fraction = 0.0
    if current is not None and current not in done:
        value, maximum = changes.get("value", state.value), changes.get("max", state.max)
        running_fraction = value / maximum if maximum > 0 else 0.0
    total = len(state.class_types)
    done_count = len(done.intersection(state.class_types))  # TaskState.nodes_done_count
    result = pg.overall(state.overall_percentage, done_count, total, running_fraction)
    return evolve(state, **changes, overall_percentage=result.percentage)


# ---------------------------------------------------------------------------
# The table


@dataclass(frozen=True, slots=True)
class Rule:
    """What one event type does in one stage: `handler` (None: nothing) and the
    stages it may lead to."""

    handler: Handler | None
    to: frozenset[Stage]

    @property
    def ignored(self) -> bool:
        return self.handler is None


IGNORED: Final = Rule(None, frozenset())

Targets: TypeAlias = Stage | tuple[Stage, ...] | None

A = Stage.AWAITING_BACKEND
S = Stage.SUBMITTED
R = Stage.RUNNING
F = Stage.FETCHING_OUTPUTS
W = Stage.BACKEND_AWAY
Q = Stage.REQUEUED
C = Stage.COMPLETED
E = Stage.ERROR
__ = None  # ignored: the event changes nothing in this stage

_COLUMNS: Final = (A, S, R, F, W, Q)

# Each row: an event type, its handler, and where it leads from each unfinished
# stage (a tuple: the handler picks one of these). Terminal stages ignore every
# event: nothing changes a finished task.
# fmt: off
_ROWS: Final[Mapping[type, tuple[Handler, tuple[Targets, ...]]]] = {
    #                                             AWAITING  SUBMITTED RUNNING   FETCHING  AWAY      REQUEUED
    Submitted:            (_on_submitted,        (S,        S,        __,       __,       __,       S)),
    BackendWaiting:       (_on_backend_waiting,  (A,        S,        __,       __,       __,       Q)),
    SubmitRejected:       (_on_rejected,         (E,        E,        __,       __,       __,       E)),
    QueueUpdate:          (_on_queue_update,     ((A, R),   (S, R),   __,       __,       (S, R),   (Q, R))),
    ExecutionStart:       (_on_execution_start,  (R,        R,        R,        __,       R,        R)),
    ExecutionCached:      (_on_cached,           (R,        R,        R,        __,       R,        R)),
    Executing:            (_on_executing,        ((A, R),   (S, R),   R,        __,       (W, R),   (Q, R))),
    Progress:             (_on_progress,         (R,        R,        R,        __,       R,        R)),
    ProgressState:        (_on_progress_state,   (R,        R,        R,        __,       R,        R)),
    ProgressText:         (_on_progress_text,    (A,        S,        R,        __,       W,        Q)),
    PreviewReady:         (_on_preview_ready,    (A,        S,        R,        __,       W,        Q)),
    Executed:             (_on_executed,         (R,        R,        R,        __,       R,        R)),
    ExecutionSuccess:     (_on_success,          ((F, E),   (F, E),   (F, E),   __,       (F, E),   (F, E))),
    ExecutionError:       (_on_error,            (E,        E,        E,        __,       E,        E)),
    ExecutionInterrupted: (_on_interrupted,      (E,        E,        E,        __,       E,        E)),
    HistoryFound:         (_on_history,          ((F, E),   (F, E),   (F, E),   __,       (F, E),   (F, E))),
    OutputsStored:        (_on_outputs_stored,   (__,       __,       __,       (C, E),   __,       __)),
    BackendLost:          (_on_backend_lost,     (__,       W,        W,        __,       __,       __)),
    Requeued:             (_on_requeued,         (Q,        Q,        Q,        __,       Q,        Q)),
    CancelRequested:      (_on_cancel_requested, (A,        S,        R,        E,        W,        Q)),
    Cancelled:            (_on_cancelled,        (E,        E,        E,        E,        E,        E)),
    Failed:               (_on_failed,           (E,        E,        E,        E,        E,        E)),
}
# fmt: on


def _build(
    rows: Mapping[type, tuple[Handler, tuple[Targets, ...]]],
) -> dict[tuple[Stage, type], Rule]:
    if set(rows) != set(EVENT_TYPES):
        raise AssertionError(
            f"the table's rows differ from TaskEvent: {set(rows) ^ set(EVENT_TYPES)}"
        )
    table: dict[tuple[Stage, type], Rule] = {}
    for event_type, (handler, targets) in rows.items():
        for stage, target in zip(_COLUMNS, targets, strict=True):
            if target is None:
                table[stage, event_type] = IGNORED
            else:
                to = target if isinstance(target, tuple) else (target,)
                table[stage, event_type] = Rule(handler, frozenset(to))
        for stage in Stage:
            if stage.is_terminal:
                table[stage, event_type] = IGNORED
    return table


TRANSITIONS: Final[Mapping[tuple[Stage, type], Rule]] = _build(_ROWS)


class TransitionError(Exception):
    """A handler led somewhere its table entry does not allow (a bug in this file)."""


def _is_ours(state: TaskState, event: object) -> bool:
    """Frames for other prompts change nothing; prompt_id None is the reconnect re-send."""
    prompt_id = getattr(event, "prompt_id", None)
    return prompt_id is None or prompt_id == state.prompt_id


def apply(state: TaskState, event: TaskEvent, now: float) -> tuple[TaskState, list[Effect]]:
    """Feed one event; get the new state and what to do (publish first, then commands)."""
    rule = TRANSITIONS[state.stage, type(event)]
    if rule.handler is None or not _is_ours(state, event):
        return state, []
    new, commands = rule.handler(state, event, now)
    if new.stage not in rule.to:
        raise TransitionError(
            f"{type(event).__name__} led from {state.stage.name} to {new.stage.name}, "
            f"not to one of {sorted(s.name for s in rule.to)}"
        )
    if visible(new) == visible(state):
        return new, commands
    new = evolve(new, version=state.version + 1)
    return new, [Publish(render(new, now)), *commands]
