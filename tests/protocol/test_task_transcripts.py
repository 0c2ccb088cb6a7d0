"""Every prompt of every transcript, replayed through the parser and the state machine."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from protocol import comfy, task
from protocol.errors import ProtocolError
from tests.transcripts import Submission, frames_for_client, submissions, transcript_names

NOW = 1_795_632_898.0


@dataclass(frozen=True)
class Completed:
    files: tuple[str, ...]


@dataclass(frozen=True)
class Failed:
    code: str
    message: str
    node_id: str | None = None
    node_type: str | None = None


@dataclass(frozen=True)
class NotStarted:
    """Deleted from the queue before it ran: no frames, no history."""


Outcome = Completed | Failed | NotStarted

REJECTED = Failed("rejected", "ComfyUI rejected the workflow")
REJECTED_AT_2 = Failed("rejected", "ComfyUI rejected the workflow", "2", "SlowProgress")

EXPECTED: dict[tuple[str, str], Outcome] = {
    ("s1_success", "submit"): Completed(("probe_00001_.png",)),
    ("s2_cached", "submit_same_graph"): Completed(("probe_00001_.png",)),
    ("s3_invalid", "missing_required_input"): REJECTED_AT_2,
    # ComfyUI sends no node_errors here; its details name the node ("Node ID '#2'").
    ("s3_invalid", "unknown_class_type"): Failed(
        "rejected", "ComfyUI rejected the workflow", "2", "NoSuchNodeType"
    ),
    ("s3_invalid", "value_below_min"): REJECTED_AT_2,
    ("s3_invalid", "value_wrong_type"): REJECTED_AT_2,
    ("s3_invalid", "link_to_missing_node"): REJECTED_AT_2,
    ("s3_invalid", "no_output_node"): REJECTED,
    ("s3_invalid", "missing_class_type_key"): Failed(
        "rejected", "ComfyUI rejected the workflow", "2", None
    ),
    ("s3_invalid", "empty_prompt_object"): REJECTED,
    ("s4_runtime_error", "submit_failing"): Failed(
        "comfy_error", "probe failure", "2", "FailingNode"
    ),
    ("s5_interrupt", "submit_run1"): Failed(
        "interrupted", "Generation was interrupted in ComfyUI", "2", "SlowProgress"
    ),
    ("s5_interrupt", "submit_run2"): Failed(
        "interrupted", "Generation was interrupted in ComfyUI", "2", "SlowProgress"
    ),
    ("s5_interrupt", "submit_run3_after_idle_interrupt"): Completed(("probe_int_00001_.png",)),
    ("s6_queue_two", "submit_first"): Completed(("probe_q1_00001_.png",)),
    ("s6_queue_two", "submit_second"): Completed(("probe_q2_00001_.png",)),
    ("s7_reconnect", "submit_by_A"): Completed(("probe_rc_00001_.png",)),
    ("s7b_duplicate_client_id", "submit"): Completed(("probe_dup_00001_.png",)),
    ("s7b_duplicate_client_id", "submit_after_reopen"): Completed(("probe_dup_00002_.png",)),
    ("s8_previews", "submit_legacy"): Completed(("ComfyUI_temp_sulmo_00001_.png",)),
    ("s8_previews", "submit_with_flags"): Completed(("ComfyUI_temp_sulmo_00002_.png",)),
    ("s9_misc", "submit_running"): Completed(("probe_m1_00001_.png",)),
    ("s9_misc", "submit_pending_1"): NotStarted(),
    ("s9_misc", "prompt_no_prompt_key"): REJECTED,
    ("s9_misc", "submit_pending_2_custom_prompt_id"): Completed(("probe_m3_00001_.png",)),
    ("s10_no_client_id", "submit_no_client_id"): Completed(("probe_nocid_00001_.png",)),
    ("s10_no_client_id", "submit_no_client_id_interrupted"): Failed(
        "interrupted", "Generation was interrupted in ComfyUI", "2", "SlowProgress"
    ),
    ("s11_queue_front", "submit_running"): Completed(("probe_f0_00001_.png",)),
    ("s11_queue_front", "submit_normal"): Completed(("probe_f1_00001_.png",)),
    ("s11_queue_front", "submit_front_true"): Completed(("probe_f2_00001_.png",)),
    ("s12_two_progress_nodes", "submit_two_progress_two_outputs"): Completed(
        ("probe_two_b_00001_.png", "probe_two_a_00001_.png")
    ),
}

ALL = [sub for name in transcript_names() for sub in submissions(name)]


def _spec(sub: Submission) -> task.TaskSpec:
    return task.TaskSpec(
        task_id=f"task-{sub.label}",
        prompt_id=sub.prompt_id or "never-accepted",
        graph=sub.request.get("prompt") or {},
        prompt="a probe",
        workflow="probe",
        seed=1,
        uid=1,
    )


class Replay:
    """Drives one task the way the daemon's actor does, minus the I/O."""

    def __init__(self, sub: Submission) -> None:
        self.state = task.new_task(_spec(sub), NOW)
        self.messages: list[task.TaskMessage] = []
        self.now = NOW

    def feed(self, event: task.TaskEvent) -> None:
        self.now += 0.1
        self.state, effects = task.apply(self.state, event, self.now)
        for effect in effects:
            if isinstance(effect, task.Publish):
                self.messages.append(effect.message)
            elif isinstance(effect, task.FetchOutputs):
                # The daemon stores each image; here it keeps ComfyUI's file name.
                self.feed(task.OutputsStored(tuple(i.filename for i in effect.images)))


def replay(sub: Submission) -> Replay:
    r = Replay(sub)
    if sub.status != 200:
        reply = comfy.parse_prompt_reply(sub.status, sub.raw_reply)
        assert isinstance(reply, comfy.PromptRejected)
        r.feed(task.SubmitRejected(reply))
        return r
    accepted = comfy.parse_prompt_reply(200, sub.raw_reply)
    assert isinstance(accepted, comfy.PromptAccepted)
    r.feed(task.Submitted(accepted.number))
    for frame in frames_for_client(sub.transcript, sub.client_id):
        event = comfy.parse_frame(frame)
        if isinstance(event, task.TaskEvent):
            r.feed(event)
    if not r.state.phase.is_terminal:
        # Frames were lost (zombie socket, no client id): the daemon asks /history.
        for body in sub.histories:
            entry = comfy.parse_history(body, r.state.prompt_id)
            if entry is not None:
                r.feed(task.HistoryFound(entry))
                break
    return r


def outcome_of(r: Replay) -> Outcome:
    state = r.state
    if state.phase is task.Phase.COMPLETED:
        return Completed(state.image_files)
    if state.phase is task.Phase.ERROR:
        assert state.error is not None
        return Failed(
            state.error.code, state.error.message, state.error.node_id, state.error.node_type
        )
    return NotStarted()


def test_every_submission_has_an_expectation() -> None:
    assert {(s.transcript, s.label) for s in ALL if s.status in (200, 400)} == set(EXPECTED)


@pytest.mark.parametrize(
    "sub", [s for s in ALL if s.status in (200, 400)], ids=lambda s: f"{s.transcript}:{s.label}"
)
def test_transcript_ends_in_the_right_message(sub: Submission) -> None:
    r = replay(sub)
    expected = EXPECTED[(sub.transcript, sub.label)]
    assert outcome_of(r) == expected
    if isinstance(expected, NotStarted):
        assert r.messages[-1].payload["status"] == "in-progress"
        return
    last = r.messages[-1]
    if isinstance(expected, Completed):
        assert last.event == "complete"
        assert last.payload["status"] == "completed"
        result = last.payload["result"]
        assert result["imageUrl"] == f"/image/{expected.files[0]}"
        assert result["imageUrls"] == [f"/image/{f}" for f in expected.files]
        assert last.payload["progress"]["percentage"] == 100
        assert last.payload["progress"]["currentStep"] == "Complete"
    else:
        assert last.event == "error-event"
        assert last.payload["status"] == "error"
        assert last.payload["error"]["code"] == expected.code
        assert last.payload["progress"]["currentStep"] == "Failed"


@pytest.mark.parametrize(
    "sub", [s for s in ALL if s.status == 200], ids=lambda s: f"{s.transcript}:{s.label}"
)
def test_versions_rise_and_overall_never_goes_backwards(sub: Submission) -> None:
    r = replay(sub)
    versions = [m.version for m in r.messages]
    assert versions == list(range(1, len(versions) + 1))
    overall = [m.payload["progress"]["overall"]["percentage"] for m in r.messages]
    assert overall == sorted(overall)
    terminal = [m for m in r.messages if m.is_terminal]
    assert len(terminal) <= 1
    if terminal:
        assert r.messages[-1] is terminal[0]


def test_runtime_error_carries_comfyui_message_node_and_type() -> None:
    sub = next(s for s in ALL if s.label == "submit_failing")
    error = replay(sub).messages[-1].payload["error"]
    assert error["message"] == "probe failure"
    assert error["nodeId"] == "2"
    assert error["nodeType"] == "FailingNode"
    assert error["exceptionType"] == "RuntimeError"
    assert "FailingNode" in error["details"]


def test_interrupt_we_asked_for_is_a_cancel() -> None:
    sub = next(s for s in ALL if s.label == "submit_run1")
    r = Replay(sub)
    r.feed(task.Submitted(11))
    r.feed(task.CancelRequested())
    for frame in frames_for_client(sub.transcript, sub.client_id):
        event = comfy.parse_frame(frame)
        if isinstance(event, task.TaskEvent):
            r.feed(event)
    assert r.state.error is not None
    assert r.state.error.code == "cancelled"


def test_rejection_is_readable() -> None:
    sub = next(s for s in ALL if s.label == "missing_required_input")
    details = replay(sub).messages[-1].payload["error"]["details"]
    assert details == (
        "Prompt outputs failed validation. SlowProgress (node 2): Required input is missing: delay"
    )
    unknown = next(s for s in ALL if s.label == "unknown_class_type")
    assert replay(unknown).messages[-1].payload["error"]["details"] == (
        "Cannot execute because node NoSuchNodeType does not exist (Node ID '#2')"
    )


def test_the_500_replies_are_protocol_errors() -> None:
    for sub in (s for s in ALL if s.status == 500):
        with pytest.raises(ProtocolError):
            comfy.parse_prompt_reply(sub.status, sub.raw_reply)


def test_progress_message_shape_matches_the_seed() -> None:
    sub = next(s for s in ALL if s.transcript == "s1_success")
    r = replay(sub)
    ticks = [
        m
        for m in r.messages
        if m.payload.get("progress", {}).get("currentStep") == "Running SlowProgress..."
    ]
    assert ticks, "the SlowProgress node's ticks were published"
    last_tick = ticks[-1].payload
    assert set(last_tick) >= {"taskId", "status", "progress", "timestamp"}
    assert last_tick["status"] == "in-progress"
    progress = last_tick["progress"]
    assert (progress["currentValue"], progress["maxValue"], progress["percentage"]) == (5, 5, 100)
    assert last_tick["timestamp"].endswith("Z")
    overall = progress["overall"]
    assert overall["nodesTotal"] == 3
    assert 0 < overall["percentage"] < 100
