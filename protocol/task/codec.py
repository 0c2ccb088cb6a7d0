"""JSON codecs for what is stored about a task: its spec, and its state's fields.

The journal (SQLite) and the shared store (Redis) keep a task as these
fields, not as the message it last published: a finished task is rendered
again from them (protocol.task.render), an unfinished one resumes from its
stage. `state_from_message` reads the older format, which kept that message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from protocol import progress as pg
from protocol.task.state import (
    EVENT_COMPLETE,
    Stage,
    TaskError,
    TaskSpec,
    TaskState,
    new_task,
)


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
        "sourceImage": spec.source_image,
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
        source_image=data.get("sourceImage"),
    )


def state_to_json(state: TaskState) -> dict[str, Any]:
    """The fields worth keeping: enough to render a finished task's last message again
    and to resume an unfinished one. (Progress within a node is not kept: a resumed
    task learns it from ComfyUI again.)"""
    return {
        "stage": state.stage.value,
        "cancelRequested": state.cancel_requested,
        "version": state.version,
        "createdAt": state.created_at,
        "startedAt": state.started_at,
        "finishedAt": state.finished_at,
        "step": state.step,
        "peakMax": state.peak_max,
        "nodesDone": sorted(state.nodes_done),
        "overallPercentage": state.overall_percentage,
        "imageFiles": list(state.image_files),
        "error": state.error.to_json() if state.error is not None else None,
    }


def state_from_json(spec: TaskSpec, data: Mapping[str, Any]) -> TaskState:
    """The state `state_to_json` kept (its other fields start afresh)."""
    error = data.get("error")
    return replace(
        new_task(spec, float(data["createdAt"])),
        stage=Stage(data["stage"]),
        cancel_requested=bool(data.get("cancelRequested", False)),
        version=int(data["version"]),
        started_at=_float_or_none(data.get("startedAt")),
        finished_at=_float_or_none(data.get("finishedAt")),
        step=str(data.get("step", pg.STEP_STARTING)),
        peak_max=float(data.get("peakMax", 0)),
        nodes_done=frozenset(str(n) for n in data.get("nodesDone", ())),
        overall_percentage=float(data.get("overallPercentage", 0.0)),
        image_files=tuple(str(f) for f in data.get("imageFiles", ())),
        error=TaskError.from_json(error) if error is not None else None,
    )


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def state_from_message(
    spec: TaskSpec,
    *,
    stage: Stage,
    version: int,
    created_at: float,
    finished_at: float | None,
    message: Mapping[str, Any],
) -> TaskState:
    """A state from the older stored format: the last published message
    ({"event", "version", "payload"}). A finished task gets back what that message
    showed, so rendering it again gives the same message."""
    state = replace(
        new_task(spec, created_at), stage=stage, version=version, finished_at=finished_at
    )
    if not stage.is_terminal:
        return state
    payload: Mapping[str, Any] = message.get("payload") or {}
    progress: Mapping[str, Any] = payload.get("progress") or {}
    overall: Mapping[str, Any] = progress.get("overall") or {}
    # The count of finished nodes is what a message shows: take that many of the graph's.
    done = int(overall.get("nodesDone", 0))
    state = replace(
        state,
        version=int(message.get("version", version)),
        nodes_done=frozenset(list(state.class_types)[:done]),
        overall_percentage=float(overall.get("percentage", 0.0)),
    )
    if message.get("event") == EVENT_COMPLETE and stage is Stage.COMPLETED:
        urls = (payload.get("result") or {}).get("imageUrls") or []
        steps = progress.get("currentValue", 0)
        return replace(
            state,
            step=pg.STEP_COMPLETE,
            image_files=tuple(str(u).rsplit("/", 1)[-1] for u in urls),
            peak_max=float(steps) if isinstance(steps, int | float) else 0.0,
            overall_percentage=float(overall.get("percentage", 100.0)),
        )
    error = TaskError.from_json(payload.get("error") or {})
    return replace(state, stage=Stage.ERROR, step=pg.STEP_FAILED, error=error)
