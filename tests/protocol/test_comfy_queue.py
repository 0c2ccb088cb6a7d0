"""GET /queue: parsing and queue positions."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, SupportsIndex

import pytest

from protocol.comfy import QueuePosition, QueueReader, QueueSnapshot, parse_queue
from protocol.errors import ProtocolError
from tests.transcripts import load, transcript_names


def test_positions_follow_comfyuis_order() -> None:
    body = {
        "queue_running": [[7, "run", {}, {}, []]],
        "queue_pending": [[9, "late", {}, {}, []], [8, "early", {}, {}, []]],
    }
    snapshot = parse_queue(json.dumps(body))
    assert snapshot.position_of("run") == QueuePosition(running=True, ahead=0)
    assert snapshot.position_of("early") == QueuePosition(running=False, ahead=1)
    assert snapshot.position_of("late") == QueuePosition(running=False, ahead=2)
    assert snapshot.position_of("late").position == 3  # type: ignore[union-attr]
    assert snapshot.position_of("gone") is None


class CountingIds(tuple[str, ...]):
    """Prompt ids that count every pass over them (a scan per lookup is quadratic)."""

    passes = 0

    def __iter__(self) -> Iterator[str]:
        CountingIds.passes += 1
        return super().__iter__()

    def __contains__(self, item: object) -> bool:
        CountingIds.passes += 1
        return super().__contains__(item)

    def index(self, value: Any, start: SupportsIndex = 0, stop: SupportsIndex = 2**63 - 1) -> int:
        CountingIds.passes += 1
        return super().index(value, start, stop)


def test_every_position_of_a_reading_costs_one_pass() -> None:
    """8,000 queued tasks asking each took a list.index each: quadratic."""
    pending = CountingIds(f"p{i}" for i in range(2000))
    running = CountingIds(["r"])
    CountingIds.passes = 0
    snapshot = QueueSnapshot(running=running, pending=pending)
    positions = [snapshot.position_of(f"p{i}") for i in range(2000)]
    assert positions[1999] == QueuePosition(running=False, ahead=2000)
    assert snapshot.position_of("r") == QueuePosition(running=True, ahead=0)
    assert CountingIds.passes <= 2  # one over the running prompts, one over the pending


def recorded_queue_bodies() -> list[Any]:
    """Every GET /queue answer in the transcripts of a real ComfyUI."""
    return [
        record["body"]
        for name in transcript_names()
        for record in load(name)
        if record.get("kind") == "http"
        and record.get("method") == "GET"
        and record.get("path") == "/queue"
        and record.get("status") == 200
    ]


def ids_by_number(items: list[Any]) -> tuple[str, ...]:
    return tuple(item[1] for item in sorted(items, key=lambda item: item[0]))


def test_every_recorded_queue_answer_reads_the_same_in_any_layout() -> None:
    bodies = recorded_queue_bodies()
    assert any(body["queue_pending"] for body in bodies)  # the data covers a waiting prompt
    for body in bodies:
        expected = QueueSnapshot(
            running=tuple(item[1] for item in body["queue_running"]),
            pending=ids_by_number(body["queue_pending"]),
        )
        # As ComfyUI writes it, without spaces, and indented with the lists' order swapped.
        swapped = {"queue_pending": body["queue_pending"], "queue_running": body["queue_running"]}
        for text in (
            json.dumps(body),
            json.dumps(body, separators=(",", ":")),
            json.dumps(swapped, indent=2) + "\n",
        ):
            assert parse_queue(text) == expected


def long_queue(pending: int) -> str:
    body = {
        "queue_running": [[0, "running", {"1": {"class_type": "X", "inputs": {}}}, {}, ["1"]]],
        # Heap order, not number order: ComfyUI runs them by number.
        "queue_pending": [
            [pending - i, f"p{pending - i}", {"1": {"inputs": {"a": [1, "p"]}}}, {}, []]
            for i in range(pending)
        ],
        "extra": {"queue_pending": [[1, "not this"]]},  # a field we do not use
    }
    return json.dumps(body)


def test_a_long_queue_is_read_a_slice_of_items_at_a_time() -> None:
    reader = QueueReader(long_queue(9))  # 10 items: 1 running + 9 pending
    assert [reader.read(4), reader.read(4)] == [None, None]
    snapshot = reader.read(4)
    assert snapshot is not None
    assert snapshot.running == ("running",)
    assert snapshot.pending == tuple(f"p{n}" for n in range(1, 10))
    assert snapshot == parse_queue(long_queue(9))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected a JSON object at character 0"),
        ("[]", "expected a JSON object at character 0"),
        ("{}", "missing field 'queue_running'"),
        ('{"queue_running": []}', "missing field 'queue_pending'"),
        (
            '{"queue_running": {}, "queue_pending": []}',
            "field 'queue_running' should be an array, got dict",
        ),
        (
            '{"queue_running": [], "queue_pending": [["1", "a"]]}',
            "each queue_pending item should start with [number, prompt_id]",
        ),
        (
            '{"queue_running": [], "queue_pending": [[true, "a"]]}',
            "each queue_pending item should start with [number, prompt_id]",
        ),
        (
            '{"queue_running": [[1]], "queue_pending": []}',
            "each queue_running item should start with [number, prompt_id]",
        ),
        (
            '{"queue_running": [], "queue_running": [], "queue_pending": []}',
            "field 'queue_running' twice",
        ),
        ('{"queue_running": [] "queue_pending": []}', "expected ',' or '}' at character 21"),
        (
            '{"queue_running": [[1, "a"] [2, "b"]], "queue_pending": []}',
            "expected ',' or ']' at character 28",
        ),
        ('{"queue_running" [], "queue_pending": []}', "expected ':' at character 17"),
        ('{1: [], "queue_pending": []}', "expected a field name at character 1"),
        ('{"queue_running": [], "queue_pending": [[1, "a", {"x": ]]}', "not JSON: Expecting value"),
        ('{"queue_running": [], "queue_pending": []', "expected ',' or '}' at character 41"),
        ('{"queue_running": [], "queue_pending": []} {}', "more after the JSON object"),
        ('{"queue_running": [], "queue_pending": [' + "[" * 100_000 + "]]}", "nested too deeply"),
    ],
)
def test_a_malformed_queue_answer_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_queue(text)
    assert str(caught.value).startswith("queue: ")
    assert message in str(caught.value)
