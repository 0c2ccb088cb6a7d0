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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from daemon.tasks.journal import TaskRecord
from protocol import comfy, task

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StoredOutputs:
    """Output images of a prompt already on our disk: ComfyUI's name -> our file name.
    Journalled as they are stored, so that a restart in the middle of a fetch goes on
    with them (a second copy would be named by nothing until image_retention)."""

    prompt_id: str
    images: Mapping[comfy.ImageRef, str] = field(hash=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "promptId": self.prompt_id,
            "images": [
                {"filename": r.filename, "subfolder": r.subfolder, "type": r.type, "name": name}
                for r, name in self.images.items()
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoredOutputs:
        images = {
            comfy.ImageRef(str(i["filename"]), str(i["subfolder"]), str(i["type"])): str(i["name"])
            for i in data["images"]
        }
        return cls(str(data["promptId"]), images)


def record_of(
    state: task.TaskState, backend: str | None, outputs: StoredOutputs | None = None
) -> TaskRecord:
    """A task as the journal (and the shared store) keeps it; `outputs`: the images of
    an unfinished task stored so far."""
    kept = task.state_to_json(state)
    if outputs is not None and outputs.images and not state.phase.is_terminal:
        kept["outputsStored"] = outputs.to_json()
    return TaskRecord(
        task_id=state.task_id,
        prompt_id=state.prompt_id,
        phase=state.phase.value,
        version=state.version,
        submitted=state.submitted,
        created_at=state.created_at,
        finished_at=state.finished_at,
        spec=task.spec_to_json(state.spec),
        state=kept,
        backend=backend,
    )


@dataclass(frozen=True, slots=True)
class RestoredTask:
    """What the registry makes an actor from when its task comes back from the journal."""

    state: task.TaskState
    first_message: task.TaskMessage | None = None  # a finished task's last message, again
    resumed: bool = False
    backend_name: str | None = None
    outputs: StoredOutputs | None = None  # an unfinished task's images stored before


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
    outputs = record.state.get("outputsStored")
    return RestoredTask(
        state,
        resumed=True,
        backend_name=backend_name,
        outputs=None if outputs is None else StoredOutputs.from_json(outputs),
    )


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
