"""The transition table itself: complete, consistent with its handlers, final at the end."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from protocol import comfy, task

GRAPH = {
    "1": {"class_type": "KSampler", "inputs": {}},
    "2": {"class_type": "SaveImage", "inputs": {}},
}
SPEC = task.TaskSpec(task_id="t", prompt_id="p", graph=GRAPH)
IMAGE = comfy.ImageRef("out_00001_.png")
INTERRUPTED = comfy.ExecutionInterrupted(prompt_id="p", node_id="1", node_type="KSampler")
ERROR = comfy.ExecutionError(
    prompt_id="p",
    node_id="1",
    node_type="KSampler",
    exception_message="boom",
    exception_type="RuntimeError",
)

# At least one event of every type, and each variant that leads somewhere else.
SAMPLES: list[task.TaskEvent] = [
    task.Submitted(1),
    task.BackendWaiting("none connected"),
    task.SubmitRejected(comfy.PromptRejected("prompt_outputs_failed_validation", "bad")),
    task.QueueUpdate(comfy.QueuePosition(running=False, ahead=2)),
    task.QueueUpdate(comfy.QueuePosition(running=True, ahead=0)),
    comfy.ExecutionStart(prompt_id="p"),
    comfy.ExecutionCached(prompt_id="p", nodes=("1",)),
    comfy.Executing(node="1", prompt_id="p"),
    comfy.Executing(node=None, prompt_id="p"),
    comfy.Executing(node=None, prompt_id=None),
    comfy.Progress(prompt_id="p", node="1", value=3, max=20),
    comfy.ProgressState(prompt_id="p", nodes=(comfy.NodeProgress("1", 1, 1, "finished"),)),
    comfy.ProgressText(node_id="1", text="loading"),
    task.PreviewReady(4),
    comfy.Executed(prompt_id="p", node="2", display_node="2", output={}, images=(IMAGE,)),
    comfy.ExecutionSuccess(prompt_id="p"),
    ERROR,
    INTERRUPTED,
    task.HistoryFound(comfy.HistoryEntry("p", "success", True, (IMAGE,))),
    task.HistoryFound(comfy.HistoryEntry("p", "error", True, (), error=ERROR)),
    task.HistoryFound(comfy.HistoryEntry("p", "error", True, (), interrupted=INTERRUPTED)),
    task.HistoryFound(comfy.HistoryEntry("p", "error", True, ())),
    task.OutputsStored(("out_00001_.png",)),
    task.OutputsStored(()),
    task.BackendLost("gone"),
    task.Requeued("p2", "restarted"),
    task.CancelRequested(),
    task.Cancelled("by request"),
    task.Failed("lost", "The prompt was lost by ComfyUI"),
]


def in_stage(stage: task.Stage, *, cancelling: bool = False) -> task.TaskState:
    state = replace(task.new_task(SPEC, 0.0), stage=stage, cancel_requested=cancelling)
    if stage in (task.Stage.RUNNING, task.Stage.FETCHING_OUTPUTS, task.Stage.BACKEND_AWAY):
        state = replace(state, current_node="1", started_at=0.0)
    if stage.is_terminal:
        state = replace(state, finished_at=1.0)
    return state


def test_every_stage_and_event_type_has_an_entry() -> None:
    assert set(task.TRANSITIONS) == set(itertools.product(task.Stage, task.EVENT_TYPES))
    assert {type(event) for event in SAMPLES} == set(task.EVENT_TYPES)


def test_the_public_phases_are_the_documented_ones() -> None:
    assert {p.value for p in task.Phase} == {
        "queued",
        "running",
        "waiting",
        "requeued",
        "completed",
        "error",
    }
    assert {s.phase for s in task.Stage} == set(task.Phase)
    assert all(s.is_terminal == s.phase.is_terminal for s in task.Stage)


@pytest.mark.parametrize("stage", [s for s in task.Stage if s.is_terminal])
def test_a_finished_task_accepts_nothing_that_changes_it(stage: task.Stage) -> None:
    for event_type in task.EVENT_TYPES:
        assert task.TRANSITIONS[stage, event_type] is task.IGNORED
    state = in_stage(stage)
    for event in SAMPLES:
        assert task.apply(state, event, 5.0) == (state, [])


@pytest.mark.parametrize("cancelling", [False, True])
@pytest.mark.parametrize("stage", [s for s in task.Stage if not s.is_terminal])
def test_each_handler_goes_only_where_its_entry_says(stage: task.Stage, cancelling: bool) -> None:
    """`apply` raises TransitionError when a handler leaves the stages its entry lists;
    an ignored entry leaves the state exactly as it was."""
    state = in_stage(stage, cancelling=cancelling)
    reached: set[task.Stage] = set()
    for event in SAMPLES:
        rule = task.TRANSITIONS[stage, type(event)]
        new, effects = task.apply(state, event, 5.0)
        if rule.ignored:
            assert (new, effects) == (state, []), event
        else:
            assert new.stage in rule.to, event
            reached.add(new.stage)
    # Every stage a row names is reached by one of the samples: no dead entries
    # (but a cancelling task never fetches its images: a success ends it).
    named = set().union(*(task.TRANSITIONS[stage, t].to for t in task.EVENT_TYPES))
    if cancelling and stage is not task.Stage.FETCHING_OUTPUTS:
        named.discard(task.Stage.FETCHING_OUTPUTS)
    assert reached == named


def test_the_hidden_stages_show_as_their_public_phase() -> None:
    cases = {
        task.Stage.AWAITING_BACKEND: ("queued", False),
        task.Stage.SUBMITTED: ("queued", True),
        task.Stage.FETCHING_OUTPUTS: ("running", True),
        task.Stage.BACKEND_AWAY: ("waiting", True),
        task.Stage.REQUEUED: ("requeued", False),
    }
    for stage, (phase, submitted) in cases.items():
        state = in_stage(stage)
        assert task.render(state, 0.0).payload["phase"] == phase
        assert state.submitted is submitted


def test_a_task_never_submitted_has_no_backend_to_lose() -> None:
    state = in_stage(task.Stage.AWAITING_BACKEND)
    assert task.TRANSITIONS[task.Stage.AWAITING_BACKEND, task.BackendLost] is task.IGNORED
    assert task.apply(state, task.BackendLost("gone"), 1.0) == (state, [])


def test_late_frames_while_fetching_change_nothing_but_the_end_does() -> None:
    state, _ = task.apply(task.new_task(SPEC, 0.0), task.Submitted(1), 1.0)
    state, _ = task.apply(state, comfy.ExecutionSuccess(prompt_id="p"), 2.0)
    assert (state.stage, state.fetching_outputs) == (task.Stage.FETCHING_OUTPUTS, True)
    for late in (comfy.Progress("p", "1", 5, 20), task.BackendLost()):
        assert task.apply(state, late, 3.0) == (state, [])
    done, _ = task.apply(state, task.OutputsStored(("a.png",)), 4.0)
    assert done.stage is task.Stage.COMPLETED


def test_a_cancel_while_the_images_are_fetched_ends_the_task_at_once() -> None:
    """ComfyUI has nothing left to cancel: the task ends `cancelled`, its images unused."""
    state, _ = task.apply(task.new_task(SPEC, 0.0), task.Submitted(1), 1.0)
    state, _ = task.apply(state, comfy.ExecutionSuccess(prompt_id="p"), 2.0)
    done, effects = task.apply(state, task.CancelRequested(), 3.0)
    assert done.stage is task.Stage.ERROR
    assert done.error is not None
    assert done.error.code == "cancelled"
    assert done.image_files == ()
    (publish,) = effects
    assert isinstance(publish, task.Publish)
    assert publish.message.payload["error"]["code"] == "cancelled"
    assert task.apply(done, task.OutputsStored(("a.png",)), 4.0) == (done, [])


@pytest.mark.parametrize(
    "success",
    [
        comfy.ExecutionSuccess(prompt_id="p"),
        task.HistoryFound(comfy.HistoryEntry("p", "success", True, (IMAGE,))),
    ],
)
def test_a_success_after_a_cancel_was_asked_for_ends_cancelled_without_a_fetch(
    success: task.TaskEvent,
) -> None:
    """ComfyUI finished the prompt before the cancel reached it (the interrupt came
    late): the cancel was answered 202, so the task ends `cancelled`, not completed."""
    state, _ = task.apply(task.new_task(SPEC, 0.0), task.Submitted(1), 1.0)
    state, _ = task.apply(state, comfy.ExecutionStart(prompt_id="p"), 2.0)
    state, _ = task.apply(state, task.CancelRequested(), 3.0)
    done, effects = task.apply(state, success, 4.0)
    assert done.stage is task.Stage.ERROR
    assert done.error is not None
    assert done.error.code == "cancelled"
    assert not any(isinstance(e, task.FetchOutputs) for e in effects)
