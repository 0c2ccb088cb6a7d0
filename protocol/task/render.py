"""A task's state as the seed's JSON messages (progress, complete, error-event).

`visible(state)` is what a message shows: a transition that changes none of it
publishes nothing.
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

from protocol import progress as pg
from protocol.task.state import (
    EVENT_COMPLETE,
    EVENT_ERROR,
    EVENT_PROGRESS,
    Phase,
    TaskError,
    TaskMessage,
    TaskState,
)


def visible(state: TaskState) -> tuple[object, ...]:
    """The fields a message shows; a transition that changes none publishes nothing."""
    return (
        state.phase,
        state.step,
        state.value,
        state.max,
        state.overall_percentage,
        state.nodes_done_count,
        state.queue,
        state.eta,
        state.error,
        state.image_files,
        state.preview_version,
        progress_text(state),
    )


def progress_text(state: TaskState) -> str | None:
    """The running node's progress text; a text of an earlier node is over."""
    if state.text is None or state.text[0] != state.current_node:
        return None
    return state.text[1]


# The formatted second of the newest timestamp: most messages fall in the same
# second as the one before, and strftime is most of a timestamp's cost.
_second: tuple[int, str] = (0, "1970-01-01T00:00:00.")


def iso_timestamp(now: float) -> str:
    """ISO-8601 UTC with milliseconds, like JavaScript's toISOString()."""
    global _second
    # Whole seconds and microseconds rounded as datetime.fromtimestamp rounds them
    # (half to even), so the text is the same as formatting that datetime.
    fraction, whole = math.modf(now)
    micros = round(fraction * 1_000_000)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1, micros + 1_000_000
    second = int(whole)
    if _second[0] != second:
        moment = _dt.datetime.fromtimestamp(second, tz=_dt.UTC)
        _second = (second, moment.strftime("%Y-%m-%dT%H:%M:%S."))
    return f"{_second[1]}{micros // 1000:03d}Z"


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
    return pg.Overall(
        state.overall_percentage, state.nodes_done_count, len(state.class_types)
    ).to_json()


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
    if state.current_node is not None and state.phase in (Phase.QUEUED, Phase.RUNNING):
        progress_block["node"] = state.current_node
        progress_block["nodeType"] = state.class_types.get(state.current_node)
    text = progress_text(state)
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
