"""ComfyUI frames -> typed events, checked against every captured frame."""

from __future__ import annotations

import contextlib
import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import comfy, task
from protocol.errors import ProtocolError
from tests.transcripts import all_frames

EXPECTED_TYPES: dict[str, type] = {
    "status": comfy.Status,
    "execution_start": comfy.ExecutionStart,
    "execution_cached": comfy.ExecutionCached,
    "executing": comfy.Executing,
    "progress": comfy.Progress,
    "progress_state": comfy.ProgressState,
    "executed": comfy.Executed,
    "execution_success": comfy.ExecutionSuccess,
    "execution_error": comfy.ExecutionError,
    "execution_interrupted": comfy.ExecutionInterrupted,
    "feature_flags": comfy.FeatureFlags,
}


def test_every_captured_frame_parses_to_its_type() -> None:
    count = 0
    for name, record, frame in all_frames():
        event = comfy.parse_frame(frame)
        count += 1
        if record["kind"] == "ws_text":
            msg = record["msg"]
            assert isinstance(event, EXPECTED_TYPES[msg["type"]]), (name, record["seq"])
            data = msg["data"]
            if "prompt_id" in data:
                assert comfy.prompt_id_of(event) == data["prompt_id"]
        else:
            kind = {1: comfy.PreviewImage, 3: comfy.ProgressText, 4: comfy.PreviewImageWithMetadata}
            assert isinstance(event, kind[record["frame"]["event_type"]]), (name, record["seq"])
    assert count > 500  # every transcript, not a handful


def test_status_first_frame_carries_sid() -> None:
    event = comfy.parse_text_frame(
        '{"type":"status","data":{"status":{"exec_info":{"queue_remaining":2}},"sid":"abc"}}'
    )
    assert event == comfy.Status(queue_remaining=2, sid="abc")


def test_executing_null_ends_the_prompt_and_reconnect_resend_has_no_prompt() -> None:
    end = comfy.parse_text_frame('{"type":"executing","data":{"node":null,"prompt_id":"P"}}')
    assert isinstance(end, comfy.Executing)
    assert end.is_prompt_end
    resend = comfy.parse_text_frame('{"type":"executing","data":{"node":"2"}}')
    assert resend == comfy.Executing(node="2", prompt_id=None)
    assert not resend.is_prompt_end


def test_execution_error_fields() -> None:
    frame = {
        "type": "execution_error",
        "data": {
            "prompt_id": "P",
            "node_id": "2",
            "node_type": "FailingNode",
            "executed": [],
            "exception_message": "probe failure\n",
            "exception_type": "RuntimeError",
            "traceback": ["  File x\n"],
            "current_inputs": {},
            "current_outputs": ["2"],
            "timestamp": 1,
        },
    }
    event = comfy.parse_text_frame(json.dumps(frame))
    assert event == comfy.ExecutionError(
        prompt_id="P",
        node_id="2",
        node_type="FailingNode",
        exception_message="probe failure\n",
        exception_type="RuntimeError",
        traceback=("  File x\n",),
        executed=(),
        timestamp=1,
    )


def test_executed_lists_its_images() -> None:
    frame = {
        "type": "executed",
        "data": {
            "node": "3",
            "display_node": "3",
            "prompt_id": "P",
            "output": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]},
        },
    }
    event = comfy.parse_text_frame(json.dumps(frame))
    assert isinstance(event, comfy.Executed)
    assert event.images == (comfy.ImageRef("a.png", "", "output"),)


def test_a_cached_output_node_without_ui_output_is_executed_with_nothing() -> None:
    # ComfyUI re-sends `executed` for a cached output node with the UI output it
    # cached, `cached_output.get("output", None)`: null for a node that shows nothing.
    frame = (
        '{"type":"executed","data":{"node":"9","display_node":"9","output":null,"prompt_id":"P"}}'
    )
    event = comfy.parse_text_frame(frame)
    assert event == comfy.Executed(prompt_id="P", node="9", display_node="9", output={}, images=())


def test_unknown_types_are_not_errors() -> None:
    assert comfy.parse_text_frame('{"type":"logs","data":{"entries":[]}}') == comfy.UnknownMessage(
        type="logs", data={"entries": []}
    )
    assert comfy.parse_binary_frame(struct.pack(">I", 9) + b"xyz") == comfy.UnknownBinary(
        event_type=9, payload=b"xyz"
    )


BINARY_CASES = [
    (
        struct.pack(">II", 3, 1) + b"2" + b"probe step 1/3",
        comfy.ProgressText("2", "probe step 1/3"),
    ),
    (struct.pack(">II", 3, 0), comfy.ProgressText("", "")),
    (struct.pack(">II", 1, 2) + b"\x89PNG", comfy.PreviewImage("image/png", b"\x89PNG")),
    (struct.pack(">II", 1, 1) + b"\xff\xd8", comfy.PreviewImage("image/jpeg", b"\xff\xd8")),
]


@pytest.mark.parametrize(("frame", "expected"), BINARY_CASES)
def test_binary_frames(frame: bytes, expected: object) -> None:
    assert comfy.parse_binary_frame(frame) == expected


def test_preview_with_metadata() -> None:
    meta = json.dumps({"node_id": "2", "prompt_id": "P", "image_type": "image/png"}).encode()
    frame = struct.pack(">II", 4, len(meta)) + meta + b"IMG"
    event = comfy.parse_binary_frame(frame)
    assert isinstance(event, comfy.PreviewImageWithMetadata)
    assert (event.prompt_id, event.node_id, event.media_type, event.image) == (
        "P",
        "2",
        "image/png",
        b"IMG",
    )
    assert comfy.prompt_id_of(event) == "P"


BAD_TEXT = [
    "",
    "{not json",
    "[]",
    '"status"',
    '{"data":{}}',
    '{"type":"status"}',
    '{"type":5,"data":{}}',
    '{"type":"status","data":[]}',
    '{"type":"status","data":{"status":{"exec_info":{}}}}',
    '{"type":"status","data":{"status":{"exec_info":{"queue_remaining":"1"}}}}',
    '{"type":"status","data":{"status":{"exec_info":{"queue_remaining":true}}}}',
    '{"type":"progress","data":{"prompt_id":"P","value":1}}',
    '{"type":"progress","data":{"prompt_id":"P","value":"1","max":2}}',
    '{"type":"executing","data":{"prompt_id":"P"}}',
    '{"type":"executing","data":{"node":3,"prompt_id":"P"}}',
    '{"type":"execution_cached","data":{"prompt_id":"P","nodes":[1]}}',
    '{"type":"executed","data":{"prompt_id":"P","node":"3","output":{"images":[{}]}}}',
    '{"type":"executed","data":{"prompt_id":"P","node":"3","output":{"images":"x"}}}',
    '{"type":"execution_error","data":{"prompt_id":"P","node_id":"2"}}',
    '{"type":"progress_state","data":{"prompt_id":"P","nodes":{"1":{"value":0}}}}',
    '{"type":"execution_start","data":{"prompt_id":"P","timestamp":"now"}}',
    "[" * 100_000,
    # Python's JSON reader takes these; no browser's JSON.parse does.
    '{"type":"progress","data":{"prompt_id":"P","node":"3","value":NaN,"max":20}}',
    '{"type":"progress","data":{"prompt_id":"P","node":"3","value":1,"max":Infinity}}',
    '{"type":"progress","data":{"prompt_id":"P","node":"3","value":1,"max":1e400}}',
    '{"type":"progress","data":{"prompt_id":"P","node":"3","value":-Infinity,"max":20}}',
    '{"type":"progress","data":{"prompt_id":"P","node":"3","value":1,"max":' + "9" * 400 + "}}",
    '{"type":"progress_state","data":{"prompt_id":"P","nodes":'
    '{"3":{"value":NaN,"max":1.0,"state":"running"}}}}',
]


@pytest.mark.parametrize("text", BAD_TEXT)
def test_bad_text_frames_raise_protocol_error(text: str) -> None:
    with pytest.raises(ProtocolError):
        comfy.parse_text_frame(text)


def test_a_task_fed_a_progress_of_infinite_max_still_completes_as_strict_json() -> None:
    """A node's progress bar whose total came out infinite: the frame is dropped (as the
    daemon drops every frame it cannot parse), so the complete event a browser's
    JSON.parse reads does not say maxValue Infinity."""
    graph = {"3": {"class_type": "KSampler", "inputs": {}}}
    state = task.new_task(task.TaskSpec(task_id="T", prompt_id="P", graph=graph), 0.0)
    frames = [
        '{"type":"execution_start","data":{"prompt_id":"P"}}',
        '{"type":"progress","data":{"prompt_id":"P","node":"3","value":3,"max":Infinity}}',
        '{"type":"progress","data":{"prompt_id":"P","node":"3","value":4,"max":20}}',
        '{"type":"execution_success","data":{"prompt_id":"P"}}',
    ]
    published: list[task.TaskMessage] = []
    events: list[task.TaskEvent] = []
    for frame in frames:
        with contextlib.suppress(ProtocolError):
            parsed = comfy.parse_text_frame(frame)
            assert isinstance(parsed, comfy.PromptEvent)
            events.append(parsed)
    events.append(task.OutputsStored(("a.png",)))
    for event in events:
        state, effects = task.apply(state, event, 1.0)
        published += [e.message for e in effects if isinstance(e, task.Publish)]
    assert published[-1].event == task.EVENT_COMPLETE
    for message in published:
        json.dumps(message.payload, allow_nan=False)  # what JSON.parse can read
    assert published[-1].payload["progress"]["maxValue"] == 20


BAD_BINARY = [
    b"",
    b"\0\0\0",
    struct.pack(">I", 1),
    struct.pack(">II", 1, 7) + b"x",  # unknown image format
    struct.pack(">I", 3) + b"\0\0",
    struct.pack(">II", 3, 10) + b"short",
    struct.pack(">II", 3, 1) + b"\xff" + b"text",
    struct.pack(">II", 4, 50) + b"{}",
    struct.pack(">II", 4, 2) + b"[]",
    struct.pack(">II", 4, 3) + b"{x}",
]


@pytest.mark.parametrize("frame", BAD_BINARY)
def test_bad_binary_frames_raise_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        comfy.parse_binary_frame(frame)


# ---- properties: nothing but ProtocolError escapes the frame parser


def _parse_or_protocol_error(frame: str | bytes) -> None:
    with contextlib.suppress(ProtocolError):
        comfy.parse_frame(frame)


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_raise_anything_else(frame: bytes) -> None:
    _parse_or_protocol_error(frame)


@settings(max_examples=1000, deadline=None)
@given(st.integers(min_value=0, max_value=6), st.binary(max_size=40))
def test_random_binary_payloads_of_known_types(event_type: int, payload: bytes) -> None:
    _parse_or_protocol_error(struct.pack(">I", event_type) + payload)


@settings(max_examples=1500, deadline=None)
@given(st.text(max_size=64))
def test_random_text_never_raises_anything_else(text: str) -> None:
    _parse_or_protocol_error(text)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
FIELD_NAMES = st.sampled_from(
    [
        "prompt_id", "node", "node_id", "node_type", "value", "max", "nodes", "status",
        "exec_info", "queue_remaining", "sid", "output", "images", "filename", "timestamp",
        "exception_message", "exception_type", "traceback", "executed", "display_node", "state",
    ]
)  # fmt: skip


@st.composite
def comfy_like_messages(draw: st.DrawFn) -> dict[str, Any]:
    """Messages with real type names and plausible-but-random data."""
    msg_type = draw(st.sampled_from([*EXPECTED_TYPES, "other"]))
    data = draw(st.dictionaries(FIELD_NAMES, JSON, max_size=6))
    return {"type": msg_type, "data": data}


@settings(max_examples=2500, deadline=None)
@given(comfy_like_messages())
def test_random_json_messages_never_raise_anything_else(message: dict[str, Any]) -> None:
    _parse_or_protocol_error(json.dumps(message))


@settings(max_examples=1000, deadline=None)
@given(JSON)
def test_random_json_values_never_raise_anything_else(value: object) -> None:
    _parse_or_protocol_error(json.dumps(value))
