"""The stored form of a task: its fields round-trip through JSON and render the same."""

from __future__ import annotations

import json

import pytest

from protocol import comfy, task

GRAPH = {
    "1": {"class_type": "KSampler", "inputs": {}},
    "2": {"class_type": "SaveImage", "inputs": {}},
}
SPEC = task.TaskSpec(
    task_id="t", prompt_id="p", graph=GRAPH, seed=3, inpaint=True, inpaint_area={"x": 1}
)

RUN: list[task.TaskEvent] = [
    task.Submitted(1),
    comfy.ExecutionStart(prompt_id="p"),
    comfy.Executing(node="1", prompt_id="p"),
    comfy.Progress(prompt_id="p", node="1", value=7.5, max=30),
]
ENDINGS: dict[str, list[task.TaskEvent]] = {
    "completed": [comfy.ExecutionSuccess(prompt_id="p"), task.OutputsStored(("a.png",))],
    "comfy_error": [
        comfy.ExecutionError(
            prompt_id="p",
            node_id="2",
            node_type="SaveImage",
            exception_message="disk full",
            exception_type="OSError",
        )
    ],
    "cancelled": [task.CancelRequested(), task.Cancelled("by request")],
}


def ended(name: str) -> tuple[task.TaskState, task.TaskMessage]:
    state = task.new_task(SPEC, 100.0)
    last = task.render(state, 100.0)
    for i, event in enumerate([*RUN, *ENDINGS[name]]):
        state, effects = task.apply(state, event, 101.0 + i)
        last = next((e.message for e in effects if isinstance(e, task.Publish)), last)
    assert state.stage.is_terminal
    return state, last


@pytest.mark.parametrize("name", list(ENDINGS))
def test_a_finished_state_s_fields_render_its_last_message_again(name: str) -> None:
    state, last = ended(name)
    stored = json.loads(json.dumps(task.state_to_json(state)))
    spec = task.spec_from_json(json.loads(json.dumps(task.spec_to_json(state.spec))))
    assert spec == state.spec
    back = task.state_from_json(spec, stored)
    assert task.state_to_json(back) == task.state_to_json(state)
    assert back.finished_at is not None
    assert task.render(back, back.finished_at) == last


@pytest.mark.parametrize("name", list(ENDINGS))
def test_the_older_format_s_last_message_gives_the_same_message(name: str) -> None:
    state, last = ended(name)
    back = task.state_from_message(
        state.spec,
        stage=state.stage,
        version=last.version,
        created_at=state.created_at,
        finished_at=state.finished_at,
        message={"event": last.event, "version": last.version, "payload": last.payload},
    )
    assert back.finished_at is not None
    assert task.render(back, back.finished_at) == last


def test_an_unfinished_state_keeps_its_stage_and_cancel() -> None:
    state = task.new_task(SPEC, 100.0)
    for event in [*RUN, task.CancelRequested()]:
        state, _ = task.apply(state, event, 101.0)
    back = task.state_from_json(SPEC, json.loads(json.dumps(task.state_to_json(state))))
    assert (back.stage, back.cancel_requested, back.version) == (
        task.Stage.RUNNING,
        True,
        state.version,
    )
