"""A task and its journal record, both ways.

`record_of` is what the journal (and the shared store) keeps of a task: its
spec and its state's fields (protocol.task.codec). `restored_task` turns such a
record back into what an actor is made from at start-up: a finished task shows
its last message (rendered again from those fields) until its retention is up;
an unfinished one resumes, re-attached to its prompt on the backend it was
dispatched to. `still_followed` says which prompts those are: an abandoned
prompt among them is followed again rather than removed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from daemon.tasks.journal import TaskRecord
from protocol import task

log = logging.getLogger(__name__)


def record_of(state: task.TaskState, backend: str | None) -> TaskRecord:
    """A task as the journal (and the shared store) keeps it."""
    return TaskRecord(
        task_id=state.task_id,
        prompt_id=state.prompt_id,
        phase=state.phase.value,
        version=state.version,
        submitted=state.submitted,
        created_at=state.created_at,
        finished_at=state.finished_at,
        spec=task.spec_to_json(state.spec),
        state=task.state_to_json(state),
        backend=backend,
    )


@dataclass(frozen=True, slots=True)
class RestoredTask:
    """What the registry makes an actor from when its task comes back from the journal."""

    state: task.TaskState
    first_message: task.TaskMessage | None = None  # a finished task's last message, again
    resumed: bool = False
    backend_name: str | None = None


def restored_task(
    record: TaskRecord,
    now: float,
    *,
    retention: float,
    version_base: int,
    first_backend: str | None,
) -> RestoredTask | None:
    """The task `record` describes, or None when it finished more than `retention` ago.

    `version_base`: an unfinished task's snapshot ids start there (above anything
    sent before the restart); `first_backend`: where a journal from before pools
    sent its submitted tasks. Raises KeyError, ValueError or TypeError on a
    record it cannot read.
    """
    spec = task.spec_from_json(record.spec)
    phase = task.Phase(record.phase)
    if phase.is_terminal:
        finished_at = record.finished_at or record.created_at
        if now - finished_at >= retention:
            return None  # its five minutes are up
        state = task.state_from_json(spec, record.state)
        if not state.stage.is_terminal:
            raise ValueError(f"the record says {phase.value}, its state {state.stage.value}")
        # Rendered at its end, as it was published then (same fields, same timestamp).
        message = task.render(state, finished_at)
        return RestoredTask(state, first_message=message)
    state = task.resumed_task(
        spec,
        phase=phase,
        version=version_base,
        submitted=record.submitted,
        created_at=record.created_at,
        # A cancel answered 202 before the stop is carried out after it.
        cancel_requested=bool(record.state.get("cancelRequested", False)),
    )
    log.info(
        "resuming task",
        extra={
            "task_id": spec.task_id,
            "prompt_id": spec.prompt_id,
            "backend": record.backend or "",
        },
    )
    backend_name = record.backend
    if backend_name is None and record.submitted:
        # A journal from before pools: its one backend is the first one now.
        backend_name = first_backend
    return RestoredTask(state, resumed=True, backend_name=backend_name)


def still_followed(records: Iterable[TaskRecord]) -> set[tuple[str | None, str]]:
    """(backend, prompt id) of every unfinished task: restored, it follows that prompt
    again. An earlier run killed between giving a prompt up and journalling its task's
    next one left both behind; the task's record is what the restart goes by."""
    followed: set[tuple[str | None, str]] = set()
    for record in records:
        try:
            finished = task.Phase(record.phase).is_terminal
        except ValueError:
            continue  # not restored either
        if not finished:
            followed.add((record.backend, record.prompt_id))
    return followed
