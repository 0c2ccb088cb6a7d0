"""What a task is: its spec, its stage, its state, the events it reacts to, its effects.

The rules that move a task between stages are in `protocol.task.table`; how a
state looks to subscribers is in `protocol.task.render`.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Final, TypeAlias

from protocol import progress as pg
from protocol.comfy import (
    HistoryEntry,
    ImageRef,
    ProgressText,
    PromptEvent,
    PromptRejected,
    QueuePosition,
    graph_class_types,
)

# ---------------------------------------------------------------------------
# What was asked for


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
    # An inpainting source: our image store's name, uploaded to the backend the
    # task is dispatched to (the graph names it so until then).
    source_image: str | None = None


# ---------------------------------------------------------------------------
# Phases (what the JSON shows) and stages (what the table works on)


class Phase(Enum):
    """The public phase: the `phase` field of a progress message, and the journal's column."""

    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"  # submitted, and its backend went away
    REQUEUED = "requeued"  # its backend lost it: waits for a backend under a new prompt_id
    COMPLETED = "completed"
    ERROR = "error"

    # Members are singletons compared by identity: hash them by identity too
    # (Enum's own __hash__ is Python code, and every frame looks phases and
    # stages up a dozen times).
    __hash__ = object.__hash__

    @property
    def is_terminal(self) -> bool:
        return self in (Phase.COMPLETED, Phase.ERROR)


class Stage(Enum):
    """Where a task is in its life: finer than `Phase`, each stage shows as one phase.

    The stages a phase hides: a queued task is either still in the daemon's own
    queue (no backend has taken it) or already in ComfyUI's queue; a running task
    may be done in ComfyUI with its images still being fetched.
    """

    AWAITING_BACKEND = "awaiting_backend"  # in the daemon's queue; not dispatched yet
    SUBMITTED = "submitted"  # dispatched, and ComfyUI accepted the prompt: in its queue
    RUNNING = "running"  # ComfyUI runs the prompt
    FETCHING_OUTPUTS = "fetching_outputs"  # ComfyUI finished it; we store the images
    BACKEND_AWAY = "backend_away"  # submitted, and its backend went away (it may come back)
    REQUEUED = "requeued"  # its backend lost the prompt: awaits a backend as a new prompt_id
    COMPLETED = "completed"
    ERROR = "error"  # failed, rejected, interrupted or cancelled (see TaskState.error)

    __hash__ = object.__hash__  # as Phase's

    @property
    def phase(self) -> Phase:
        return _PHASE_OF_STAGE[self]

    @property
    def is_terminal(self) -> bool:
        return self in (Stage.COMPLETED, Stage.ERROR)

    @property
    def submitted(self) -> bool:
        """Does a backend hold (or did it finish) the current prompt?"""
        return self in _SUBMITTED_STAGES


_PHASE_OF_STAGE: Final[Mapping[Stage, Phase]] = {
    Stage.AWAITING_BACKEND: Phase.QUEUED,
    Stage.SUBMITTED: Phase.QUEUED,
    Stage.RUNNING: Phase.RUNNING,
    Stage.FETCHING_OUTPUTS: Phase.RUNNING,
    Stage.BACKEND_AWAY: Phase.WAITING,
    Stage.REQUEUED: Phase.REQUEUED,
    Stage.COMPLETED: Phase.COMPLETED,
    Stage.ERROR: Phase.ERROR,
}

_SUBMITTED_STAGES: Final = frozenset(
    {
        Stage.SUBMITTED,
        Stage.RUNNING,
        Stage.FETCHING_OUTPUTS,
        Stage.BACKEND_AWAY,
        Stage.COMPLETED,
    }
)


def stage_of(phase: Phase, *, submitted: bool) -> Stage:
    """The stage a journalled (phase, submitted) pair stands for, for a task resumed
    after a restart (a fetch in progress then is redone: it resumes as running)."""
    if phase is Phase.QUEUED:
        return Stage.SUBMITTED if submitted else Stage.AWAITING_BACKEND
    return {
        Phase.RUNNING: Stage.RUNNING,
        Phase.WAITING: Stage.BACKEND_AWAY,
        Phase.REQUEUED: Stage.REQUEUED,
        Phase.COMPLETED: Stage.COMPLETED,
        Phase.ERROR: Stage.ERROR,
    }[phase]


# ---------------------------------------------------------------------------
# The state


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

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TaskError:
        return cls(
            code=str(data.get("code", "internal")),
            message=str(data.get("message", "Generation failed")),
            details=str(data.get("details", "")),
            node_id=data.get("nodeId"),
            node_type=data.get("nodeType"),
            exception_type=data.get("exceptionType"),
        )


@dataclass(frozen=True, slots=True)
class TaskState:
    spec: TaskSpec
    class_types: Mapping[str, str] = field(hash=False, repr=False)
    created_at: float
    stage: Stage = Stage.AWAITING_BACKEND
    # A second, smaller machine beside the stage (like h11's keep-alive flag):
    # "cancelling" once a cancel was asked for, until the task ends. The stage
    # goes on meanwhile (a queued prompt may still start before ComfyUI drops it).
    cancel_requested: bool = False
    version: int = 0
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
    image_files: tuple[str, ...] = ()
    error: TaskError | None = None
    started_at: float | None = None
    finished_at: float | None = None
    # The newest preview announced to subscribers: the version of the snapshot that
    # announced it, which names it in its URL (snapshot versions keep rising across a
    # restart and from worker to worker; the store's restart at 1, and a browser shows
    # the image it already has for a URL it loaded); and its version in the store.
    preview_version: int | None = None
    preview_stored: int | None = None
    text: tuple[str, str] | None = None  # (node_id, text): a node's newest progress text

    @property
    def task_id(self) -> str:
        return self.spec.task_id

    @property
    def prompt_id(self) -> str:
        return self.spec.prompt_id

    @property
    def phase(self) -> Phase:
        return self.stage.phase

    @property
    def submitted(self) -> bool:
        return self.stage.submitted

    @property
    def fetching_outputs(self) -> bool:
        return self.stage is Stage.FETCHING_OUTPUTS

    @property
    def nodes_done_count(self) -> int:
        """How many of this graph's nodes are finished."""
        return len(self.nodes_done.intersection(self.class_types))


_STATE_FIELDS: Final = tuple(f.name for f in fields(TaskState))
_STATE_FIELD_SET: Final = frozenset(_STATE_FIELDS)
_FIELD_INDEX: Final = {name: index for index, name in enumerate(_STATE_FIELDS)}
_state_values: Final = operator.attrgetter(*_STATE_FIELDS)
# Each slot's own setter: it stores without the frozen class's __setattr__ and
# without looking the slot up by name.
_SLOT_SETTERS: Final = tuple(TaskState.__dict__[name].__set__ for name in _STATE_FIELDS)


def evolve(state: TaskState, **changes: Any) -> TaskState:
    """`dataclasses.replace(state, **changes)`, for the hot path.

    Every progress frame makes two or three new states; `replace` inspects the
    class and runs the frozen `__init__` each time (~20 us for these 21 fields),
    this copies the slots (~2.5 us). TaskState has no `__post_init__` and no
    `init=False` field, so the two give equal states."""
    if not changes.keys() <= _STATE_FIELD_SET:
        unknown = ", ".join(sorted(changes.keys() - _STATE_FIELD_SET))
        raise TypeError(f"TaskState has no field {unknown}")
    values = list(_state_values(state))
    for name, value in changes.items():
        values[_FIELD_INDEX[name]] = value
    new = object.__new__(TaskState)
    for store, value in zip(_SLOT_SETTERS, values, strict=True):
        store(new, value)
    return new


def new_task(spec: TaskSpec, now: float) -> TaskState:
    """A fresh task, in the daemon's queue, not yet submitted to ComfyUI."""
    return TaskState(spec=spec, class_types=graph_class_types(spec.graph), created_at=now)


def resumed_task(
    spec: TaskSpec,
    *,
    phase: Phase,
    version: int,
    submitted: bool,
    created_at: float,
    cancel_requested: bool = False,
) -> TaskState:
    """A task in flight when the daemon stopped; it reconciles with ComfyUI next.
    `cancel_requested`: a cancel was asked (and answered) before the stop; it goes on."""
    if phase.is_terminal:
        raise ValueError("a finished task is restored with protocol.task.codec")
    stage = stage_of(phase, submitted=submitted)
    if cancel_requested:
        step = pg.STEP_CANCELLING
    else:
        step = pg.STEP_QUEUED if stage.submitted else pg.STEP_STARTING
    return TaskState(
        spec=spec,
        class_types=graph_class_types(spec.graph),
        created_at=created_at,
        stage=stage,
        version=version,
        step=step,
        started_at=created_at if stage is Stage.RUNNING else None,
        cancel_requested=cancel_requested,
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
class BackendLost:
    """The backend this task was submitted to went away; it may come back."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class Requeued:
    """The backend lost the prompt: run the task again from the start as `new_prompt_id`.

    (Not named `prompt_id`: events carrying one are only for the task that owns it.)"""

    new_prompt_id: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class SubmitRejected:
    rejection: PromptRejected


@dataclass(frozen=True, slots=True)
class QueueUpdate:
    """Where the prompt stands in a queue: ComfyUI's (GET /queue) or, before it is
    dispatched, the daemon's own."""

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
    | BackendLost
    | Requeued
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

EVENT_PROGRESS: Final = "progress"
EVENT_COMPLETE: Final = "complete"
EVENT_ERROR: Final = "error-event"


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
