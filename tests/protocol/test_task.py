"""The task state machine, transition by transition."""

from __future__ import annotations

import datetime
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import comfy, task
from protocol import progress as pg

NOW = 1_700_000_000.0
GRAPH: dict[str, Any] = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {}},
    "3": {"class_type": "KSampler", "inputs": {}},
    "8": {"class_type": "VAEDecode", "inputs": {}},
    "9": {"class_type": "SaveImage", "inputs": {}},
}
IMG = comfy.ImageRef("ComfyUI_00001_.png")


def fresh(**spec: Any) -> task.TaskState:
    return task.new_task(
        task.TaskSpec(
            task_id="T", prompt_id="P", graph=GRAPH, prompt="a fox", seed=7, uid=9, **spec
        ),
        NOW,
    )


def run(state: task.TaskState, *events: Any) -> tuple[task.TaskState, list[task.Effect]]:
    effects: list[task.Effect] = []
    for i, event in enumerate(events):
        state, more = task.apply(state, event, NOW + i)
        effects.extend(more)
    return state, effects


def published(effects: list[task.Effect]) -> list[task.TaskMessage]:
    return [e.message for e in effects if isinstance(e, task.Publish)]


RUNNING = (
    task.Submitted(1),
    comfy.ExecutionStart("P"),
    comfy.ExecutionCached("P", ()),
    comfy.Executing("3", "P"),
)


def test_new_task_is_queued_and_unpublished() -> None:
    state = fresh()
    assert state.phase is task.Phase.QUEUED
    assert state.version == 0
    assert task.render(state, NOW).payload["progress"]["currentStep"] == "Starting..."


def test_step_text_follows_the_node_type() -> None:
    state, effects = run(fresh(), *RUNNING)
    assert state.phase is task.Phase.RUNNING
    assert published(effects)[-1].payload["progress"]["currentStep"] == "Sampling image..."
    state, effects = run(state, comfy.Executing("8", "P"))
    assert published(effects)[-1].payload["progress"]["currentStep"] == "Decoding image..."


def test_percentage_is_value_over_max_of_the_latest_progress() -> None:
    _state, effects = run(fresh(), *RUNNING, comfy.Progress("P", "3", 9, 20))
    progress = published(effects)[-1].payload["progress"]
    assert (progress["percentage"], progress["currentValue"], progress["maxValue"]) == (45, 9, 20)


def test_overall_counts_cached_nodes_and_never_goes_back() -> None:
    state, effects = run(
        fresh(),
        task.Submitted(1),
        comfy.ExecutionStart("P"),
        comfy.ExecutionCached("P", ("4", "6")),
        comfy.Executing("3", "P"),
        comfy.Progress("P", "3", 10, 20),
    )
    overall = published(effects)[-1].payload["progress"]["overall"]
    # 2 cached of 5, plus half of the sampler
    assert overall == {"percentage": 50, "nodesDone": 2, "nodesTotal": 5}
    # A new node's first tick must not pull the overall bar back.
    state, effects = run(state, comfy.Executing("8", "P"), comfy.Progress("P", "8", 0, 10))
    values = [m.payload["progress"]["overall"]["percentage"] for m in published(effects)]
    assert all(v >= 50 for v in values)


def test_events_of_other_prompts_change_nothing() -> None:
    state, _ = run(fresh(), *RUNNING)
    for event in (
        comfy.Progress("OTHER", "3", 1, 2),
        comfy.Executing("8", "OTHER"),
        comfy.ExecutionSuccess("OTHER"),
        comfy.ExecutionError("OTHER", "3", "KSampler", "boom", "RuntimeError"),
    ):
        assert task.apply(state, event, NOW) == (state, [])


def test_nothing_changes_a_terminal_task() -> None:
    done, _ = run(fresh(), *RUNNING, comfy.ExecutionSuccess("P"), task.OutputsStored(("a.png",)))
    assert done.phase is task.Phase.COMPLETED
    for event in (
        comfy.Progress("P", "3", 1, 2),
        comfy.ExecutionError("P", "3", "KSampler", "boom", "RuntimeError"),
        task.CancelRequested(),
        task.Cancelled(),
        task.Failed("lost", "x"),
        task.OutputsStored(("b.png",)),
    ):
        assert task.apply(done, event, NOW) == (done, [])


def test_success_fetches_outputs_then_completes_with_the_seed_result() -> None:
    state, effects = run(
        fresh(name="Fox", description="A fox"),
        *RUNNING,
        comfy.Executed("P", "9", "9", {}, (IMG,)),
        comfy.ExecutionSuccess("P"),
    )
    assert state.phase is task.Phase.RUNNING
    assert task.FetchOutputs((IMG,)) in effects
    assert published(effects)[-1].payload["progress"]["currentStep"] == "Saving image..."
    # Late frames while fetching change nothing.
    assert task.apply(state, comfy.Executing(None, "P"), NOW) == (state, [])
    state, effects = run(state, task.OutputsStored(("T-ComfyUI_00001_.png",)))
    message = published(effects)[-1]
    assert message.event == "complete"
    assert message.payload["result"] == {
        "imageUrl": "/image/T-ComfyUI_00001_.png",
        "imageUrls": ["/image/T-ComfyUI_00001_.png"],
        "description": "A fox",
        "prompt": "a fox",
        "seed": 7,
        "name": "Fox",
        "workflow": "txt2img",
        "inpaint": False,
        "inpaintArea": None,
        "uid": 9,
    }


def test_a_new_node_starts_at_zero_of_its_own_max() -> None:
    state, _ = run(fresh(), *RUNNING, comfy.Progress("P", "3", 20, 20))
    state, effects = run(state, comfy.Executing("8", "P"))
    progress = published(effects)[-1].payload["progress"]
    assert (progress["currentStep"], progress["currentValue"], progress["maxValue"]) == (
        "Decoding image...",
        0,
        1,
    )
    assert progress["percentage"] == 0
    # overall: the sampler's node is finished, the decoder has done nothing yet.
    assert progress["overall"]["nodesDone"] == 1
    state, effects = run(state, comfy.Executing("9", "P"))
    progress = published(effects)[-1].payload["progress"]
    assert (progress["currentStep"], progress["currentValue"], progress["maxValue"]) == (
        "Saving image...",
        0,
        1,
    )


def test_complete_reports_the_samplers_steps_and_never_zero_of_zero() -> None:
    state, _ = run(fresh(), *RUNNING, comfy.Progress("P", "3", 20, 20), comfy.Executing("9", "P"))
    state, _ = run(state, comfy.Executed("P", "9", "9", {}, (IMG,)), comfy.ExecutionSuccess("P"))
    _, effects = run(state, task.OutputsStored(("T-a.png",)))
    progress = published(effects)[-1].payload["progress"]
    assert (progress["currentValue"], progress["maxValue"]) == (20, 20)
    # A wholly cached run: no node ever reported progress.
    state, _ = run(
        fresh(),
        task.Submitted(1),
        comfy.ExecutionStart("P"),
        comfy.ExecutionCached("P", tuple(GRAPH)),
        comfy.Executed("P", "9", "9", {}, (IMG,)),
        comfy.ExecutionSuccess("P"),
    )
    _, effects = run(state, task.OutputsStored(("T-a.png",)))
    progress = published(effects)[-1].payload["progress"]
    assert (progress["currentValue"], progress["maxValue"]) == (1, 1)


def test_a_rejection_without_node_errors_names_the_node_from_its_details() -> None:
    reply = comfy.parse_prompt_reply(
        400,
        b'{"error": {"type": "invalid_prompt", "message": "Cannot execute because node X '
        b'does not exist.", "details": "Node ID \'#3\'", "extra_info": {}}, "node_errors": {}}',
    )
    assert isinstance(reply, comfy.PromptRejected)
    state, _ = run(fresh(), task.SubmitRejected(reply))
    assert state.error is not None
    assert (state.error.node_id, state.error.node_type) == ("3", "KSampler")


def test_a_rejection_answered_after_a_cancel_ends_the_task_cancelled_with_its_reason() -> None:
    # The cancel came while the POST was under way: its 202 promised `cancelled`.
    reply = comfy.PromptRejected(
        "prompt_outputs_failed_validation", "bad batch_size", named_node="3"
    )
    state, _ = run(fresh(), task.CancelRequested(), task.SubmitRejected(reply))
    assert state.error is not None
    assert state.error.code == "cancelled"
    assert "bad batch_size" in state.error.details
    assert (state.error.node_id, state.error.node_type) == ("3", "KSampler")


@pytest.mark.parametrize(
    "failure",
    [
        comfy.ExecutionError("P", "3", "KSampler", "OOM\n", "RuntimeError"),
        task.HistoryFound(
            comfy.HistoryEntry(
                "P",
                "error",
                False,
                (),
                error=comfy.ExecutionError("P", "3", "KSampler", "OOM\n", "RuntimeError"),
            )
        ),
        task.Failed("lost", "The prompt was lost by ComfyUI", "OOM"),
    ],
)
def test_a_failure_while_cancelling_ends_the_task_cancelled_with_its_reason(failure: Any) -> None:
    # The cancel's 202 promised `cancelled`: whatever stopped the prompt first
    # (ComfyUI's error, a lost prompt) is told in the details.
    state, _ = run(fresh(), *RUNNING, task.CancelRequested(), failure)
    assert state.error is not None
    assert (state.error.code, state.error.message) == ("cancelled", "Generation cancelled")
    assert "OOM" in state.error.details


def test_a_daemon_bug_while_cancelling_still_shows_as_internal() -> None:
    state, _ = run(fresh(), *RUNNING, task.CancelRequested(), task.Failed("internal", "bug"))
    assert state.error is not None
    assert state.error.code == "internal"


def test_success_without_images_is_an_error() -> None:
    state, _ = run(fresh(), *RUNNING, comfy.ExecutionSuccess("P"), task.OutputsStored(()))
    assert state.error is not None
    assert state.error.code == "no_output"


def test_prompt_end_without_outcome_asks_for_reconciliation() -> None:
    state, effects = run(fresh(), *RUNNING, comfy.Executing(None, "P"))
    assert effects[-1] == task.Reconcile()
    assert state.phase is task.Phase.RUNNING


def test_reconnect_resend_without_prompt_id_is_ours() -> None:
    state, _effects = run(fresh(), *RUNNING, comfy.Executing("8", None))
    assert state.current_node == "8"


@pytest.mark.parametrize(
    ("ahead", "step"), [(0, "Queued"), (1, "Queued (1 ahead)"), (2, "Queued (2 ahead)")]
)
def test_queue_position_while_waiting(ahead: int, step: str) -> None:
    _state, effects = run(
        fresh(), task.Submitted(1), task.QueueUpdate(comfy.QueuePosition(False, ahead))
    )
    payload = published(effects)[-1].payload
    assert payload["progress"]["currentStep"] == step
    assert payload["queue"] == {"position": ahead + 1, "ahead": ahead}


def test_queue_reading_running_starts_the_task_and_stale_ones_are_ignored() -> None:
    state, _ = run(fresh(), task.Submitted(1), task.QueueUpdate(comfy.QueuePosition(True, 0)))
    assert state.phase is task.Phase.RUNNING
    assert task.apply(state, task.QueueUpdate(comfy.QueuePosition(False, 3)), NOW) == (state, [])


def test_backend_waiting_is_shown() -> None:
    _, effects = run(fresh(), task.BackendWaiting("connection refused"))
    assert published(effects)[-1].payload["progress"]["currentStep"] == "Waiting for ComfyUI..."


def test_cancel_of_a_queued_task() -> None:
    _state, effects = run(
        fresh(), task.Submitted(1), task.CancelRequested(), task.Cancelled("dequeued")
    )
    messages = published(effects)
    assert messages[-2].payload["progress"]["currentStep"] == "Cancelling..."
    assert messages[-1].event == "error-event"
    assert messages[-1].payload["error"]["code"] == "cancelled"


def test_cancel_of_a_running_task_ends_on_the_interrupt() -> None:
    state, _effects = run(
        fresh(),
        *RUNNING,
        task.CancelRequested(),
        comfy.ExecutionInterrupted("P", "3", "KSampler"),
    )
    assert state.error is not None
    assert state.error.code == "cancelled"


def test_history_outcomes() -> None:
    running, _ = run(fresh(), *RUNNING)
    ok = comfy.HistoryEntry("P", "success", True, (IMG,))
    state, effects = run(running, task.HistoryFound(ok))
    assert task.FetchOutputs((IMG,)) in effects
    err = comfy.HistoryEntry(
        "P",
        "error",
        False,
        (),
        error=comfy.ExecutionError("P", "3", "KSampler", "OOM\n", "RuntimeError"),
    )
    state, _ = run(running, task.HistoryFound(err))
    assert state.error is not None
    assert (state.error.code, state.error.message) == ("comfy_error", "OOM")


def test_failures_detected_by_the_daemon() -> None:
    _state, effects = run(
        fresh(), task.Submitted(1), task.Failed("lost", "Lost by ComfyUI", "gone")
    )
    payload = published(effects)[-1].payload
    assert payload["error"] == {"message": "Lost by ComfyUI", "details": "gone", "code": "lost"}
    assert payload["progress"] == {
        "percentage": 0,
        "currentStep": "Failed",
        "currentValue": 0,
        "maxValue": 0,
        "overall": {"percentage": 0, "nodesDone": 0, "nodesTotal": 5},
    }


def test_repeated_identical_events_publish_once() -> None:
    state, _ = run(fresh(), *RUNNING, comfy.Progress("P", "3", 1, 20))
    again, effects = task.apply(state, comfy.ProgressState("P", ()), NOW + 100)
    assert effects == []
    assert again.version == state.version


def test_eta_from_the_step_rate() -> None:
    state, _ = run(fresh(), *RUNNING)
    state, _ = task.apply(state, comfy.Progress("P", "3", 1, 21), NOW)
    state, effects = task.apply(state, comfy.Progress("P", "3", 11, 21), NOW + 5)
    assert published(effects)[-1].payload["progress"]["etaSeconds"] == 5.0


def test_iso_timestamp_is_utc_with_millis() -> None:
    assert task.iso_timestamp(1_764_074_096.789) == "2025-11-25T12:34:56.789Z"


def _iso_by_datetime(now: float) -> str:
    moment = datetime.datetime.fromtimestamp(now, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@given(
    st.one_of(
        st.floats(min_value=-1e10, max_value=1e10),
        # Fractions that round up into the next second, or stay just below it.
        st.builds(
            lambda second, tail: second + tail,
            st.integers(min_value=0, max_value=4_000_000_000),
            st.sampled_from([0.9999995, 0.9999994999, 0.0000005, 0.9995, 0.0, -0.0000004]),
        ),
    )
)
def test_iso_timestamp_reads_every_moment_as_datetime_does(now: float) -> None:
    # It keeps the text of the last second it formatted: the same answers as
    # formatting each moment afresh, across second boundaries and rounding.
    assert task.iso_timestamp(now) == _iso_by_datetime(now)
    assert task.iso_timestamp(now + 1) == _iso_by_datetime(now + 1)
    assert task.iso_timestamp(now) == _iso_by_datetime(now)


def test_iso_timestamp_matches_formatting_the_datetime() -> None:
    # The formatted second is reused across calls: the text must still be exactly
    # datetime's, at rounding edges and when the second changes back and forth.
    def reference(now: float) -> str:
        moment = datetime.datetime.fromtimestamp(now, tz=datetime.UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"

    rng = random.Random(7)
    edges = [
        1_764_074_096.9999995,
        1_764_074_096.9999994,
        1_764_074_096.0004995,
        1_764_074_097.0,
        1_764_074_096.5,
        0.0,
        -0.25,
        -1.9999996,
    ]
    moments = edges + [rng.uniform(0, 4_000_000_000) for _ in range(2000)]
    moments += [1_764_074_096 + rng.random() * 3 for _ in range(2000)]
    for now in moments:
        assert task.iso_timestamp(now) == reference(now), now


@pytest.mark.parametrize(
    ("class_type", "text"),
    [
        ("KSampler", "Sampling image..."),
        ("VAEDecode", "Decoding image..."),
        ("SaveImage", "Saving image..."),
        ("CLIPTextEncode", "Encoding prompt..."),
        ("CheckpointLoaderSimple", "Loading model..."),
        ("MyCustomNode", "Running MyCustomNode..."),
        (None, "Processing..."),
    ],
)
def test_step_names(class_type: str | None, text: str) -> None:
    assert pg.step_name(class_type) == text


@pytest.mark.parametrize(
    ("value", "maximum", "pct"),
    [(9, 20, 45.0), (0, 0, 0.0), (5, 4, 100.0), (-1, 4, 0.0), (1, 3, 33.3)],
)
def test_percentage(value: float, maximum: float, pct: float) -> None:
    assert pg.percentage(value, maximum) == pct


def test_a_lost_prompt_is_requeued_under_a_new_prompt_id_and_starts_over() -> None:
    spec = task.TaskSpec(task_id="t", prompt_id="p1", graph=GRAPH_FOR_REQUEUE, seed=7)
    state = task.new_task(spec, 0.0)
    state, _ = task.apply(state, task.Submitted(1), 1.0)
    state, _ = task.apply(state, comfy.ExecutionStart(prompt_id="p1"), 2.0)
    state, _ = task.apply(state, comfy.Executing(node="1", prompt_id="p1"), 2.0)
    state, effects = task.apply(state, task.BackendLost("gone"), 3.0)
    assert state.phase is task.Phase.WAITING
    assert isinstance(effects[0], task.Publish)
    message = effects[0].message
    assert message.payload["phase"] == "waiting"
    assert "nodeType" not in message.payload["progress"]
    state, effects = task.apply(state, task.Requeued("p2", "restarted"), 4.0)
    assert (state.phase, state.prompt_id, state.submitted) == (task.Phase.REQUEUED, "p2", False)
    assert state.spec.seed == 7
    assert state.nodes_done == frozenset()
    assert state.current_node is None
    assert isinstance(effects[0], task.Publish)
    assert effects[0].message.payload["phase"] == "requeued"
    # Frames of the old prompt no longer count; the new prompt's do.
    same, _ = task.apply(state, comfy.ExecutionStart(prompt_id="p1"), 5.0)
    assert same.phase is task.Phase.REQUEUED
    state, _ = task.apply(state, task.Submitted(2), 5.0)
    assert state.phase is task.Phase.QUEUED
    state, _ = task.apply(state, comfy.ExecutionStart(prompt_id="p2"), 6.0)
    assert state.phase is task.Phase.RUNNING


GRAPH_FOR_REQUEUE = {"1": {"class_type": "KSampler", "inputs": {}}}
