"""`evolve`, the state machine's fast `dataclasses.replace` for TaskState."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from protocol.task import TaskSpec
from protocol.task.state import Stage, TaskError, TaskState, evolve, new_task


def a_state() -> TaskState:
    spec = TaskSpec(
        task_id="t1",
        prompt_id="p1",
        graph={"3": {"class_type": "KSampler", "inputs": {}}},
        prompt="a fox",
        workflow="txt2img",
        seed=1,
        name=None,
        description=None,
        inpaint=False,
        inpaint_area=None,
        uid=1,
        source_image=None,
    )
    return new_task(spec, 1000.0)


def test_it_gives_what_replace_gives_for_every_field() -> None:
    state = a_state()
    changes: dict[str, Any] = {
        "stage": Stage.RUNNING,
        "version": 7,
        "value": 3,
        "max": 20,
        "nodes_done": frozenset({"3"}),
        "error": TaskError("internal", "boom"),
        "text": ("3", "hello"),
    }
    for name, value in changes.items():
        assert evolve(state, **{name: value}) == dataclasses.replace(state, **{name: value})
    assert evolve(state, **changes) == dataclasses.replace(state, **changes)
    assert evolve(state) == state
    assert evolve(state, value=3) is not state


def test_the_old_state_is_untouched() -> None:
    state = a_state()
    evolve(state, version=9, step="Sampling...")
    assert state.version == 0
    assert state == a_state()


def test_an_unknown_field_is_refused() -> None:
    with pytest.raises(TypeError, match="no field stepp"):
        evolve(a_state(), stepp="typo")


def test_the_new_state_is_frozen_like_any_other() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        evolve(a_state(), value=1).value = 2  # type: ignore[misc]
