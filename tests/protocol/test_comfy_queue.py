"""GET /queue: parsing and queue positions."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any, SupportsIndex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def read_in_chunks(body: bytes, cuts: list[int], **limits: int) -> QueueSnapshot:
    reader = QueueReader(**limits)
    for start, end in itertools.pairwise([0, *sorted(cuts), len(body)]):
        reader.feed(body[start:end])
    return reader.end()


def test_a_body_read_as_it_arrives_gives_what_it_gives_at_once_wherever_it_is_cut() -> None:
    text = long_queue(9).replace('"p"', '"pé€😀"')  # (characters of 2, 3 and 4 bytes)
    body = text.encode()
    expected = parse_queue(text)
    assert expected.pending == tuple(f"p{n}" for n in range(1, 10))
    for cut in range(len(body) + 1):
        assert read_in_chunks(body, [cut]) == expected
    assert read_in_chunks(body, list(range(len(body)))) == expected  # a byte at a time


def test_a_queue_longer_than_an_item_may_be_is_read_one_item_at_a_time() -> None:
    # Only one item is held at once: the limit is an item's, not the queue's.
    body = long_queue(1000).encode()
    longest = max(len(json.dumps(item)) for item in json.loads(body)["queue_pending"])
    cuts = list(range(0, len(body), 100))
    snapshot = read_in_chunks(body, cuts, max_item_chars=4 * longest)
    assert len(snapshot.pending) == 1000
    huge = json.dumps(
        {"queue_running": [], "queue_pending": [[1, "huge", {"x": "y" * 5000}, {}, []]]}
    ).encode()
    with pytest.raises(ProtocolError, match="an item longer than 1000 characters"):
        read_in_chunks(huge, list(range(0, len(huge), 100)), max_item_chars=1000)


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


JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
QUEUE_ITEMS = st.lists(
    st.one_of(
        st.tuples(st.integers() | st.floats(allow_nan=False), st.text(), JSON_VALUES).map(list),
        JSON_VALUES,  # mostly not an item: must be refused
    ),
    max_size=6,
)
QUEUE_BODIES = st.one_of(
    st.fixed_dictionaries(
        {"queue_running": QUEUE_ITEMS, "queue_pending": QUEUE_ITEMS},
        optional={"other": JSON_VALUES},
    ),
    JSON_VALUES,
)


def reference_parse(body: Any) -> QueueSnapshot | None:
    """What json.loads and the shapes of the transcripts say the body is (None: refused)."""

    def items(key: str) -> list[tuple[float, str]] | None:
        value = body.get(key)
        if type(value) is not list:
            return None
        # Each item: [number, prompt_id, ...]; a bool is no number here.
        heads = [item[:2] if type(item) is list else None for item in value]
        if not all(
            head and len(head) == 2 and type(head[0]) in (int, float) and type(head[1]) is str
            for head in heads
        ):
            return None
        return [(head[0], head[1]) for head in heads if head]

    if not isinstance(body, dict):
        return None
    running, pending = items("queue_running"), items("queue_pending")
    if running is None or pending is None:
        return None
    return QueueSnapshot(
        running=tuple(pid for _, pid in running), pending=tuple(pid for _, pid in sorted(pending))
    )


@settings(max_examples=300, deadline=None)
@given(
    body=QUEUE_BODIES,
    indent=st.sampled_from([None, 0, 2]),
    compact=st.booleans(),
    newline=st.text(alphabet=" \t\r\n", min_size=1, max_size=3),
)
def test_the_reader_agrees_with_json_loads_on_any_body(
    body: Any, indent: int | None, compact: bool, newline: str
) -> None:
    text = json.dumps(body, indent=indent, separators=(",", ":") if compact else None)
    text = text.replace("\n", newline)  # (json.dumps escapes those inside strings)
    expected = reference_parse(body)
    if expected is None:
        with pytest.raises(ProtocolError):
            parse_queue(text)
    else:
        assert parse_queue(text) == expected


@settings(max_examples=300, deadline=None)
@given(body=QUEUE_BODIES, data=st.data())
def test_any_body_read_in_any_chunks_reads_as_it_does_at_once(
    body: Any, data: st.DataObject
) -> None:
    text = json.dumps(body, ensure_ascii=False)
    encoded = text.encode()
    cuts = data.draw(st.lists(st.integers(0, len(encoded)), max_size=8))
    try:
        expected: QueueSnapshot | str = parse_queue(text)
    except ProtocolError:
        expected = "refused"
    try:
        got: QueueSnapshot | str = read_in_chunks(encoded, cuts)
    except ProtocolError:
        got = "refused"
    assert got == expected


@settings(max_examples=500, deadline=None)
@given(body=QUEUE_BODIES, data=st.data())
def test_a_cut_or_altered_body_is_refused_with_a_protocol_error_only(
    body: Any, data: st.DataObject
) -> None:
    text = json.dumps(body)
    cut = data.draw(st.sampled_from([0, len(text)]) | st.integers(0, len(text)))
    noise = data.draw(st.text(alphabet=' \t\r\n{}[],:"0a\\', max_size=3) | st.text(max_size=2))
    altered = text[:cut] + noise + text[cut + data.draw(st.integers(0, 2)) :]
    try:
        reference = json.loads(altered)
    except ValueError:
        with pytest.raises(ProtocolError):
            parse_queue(altered)
        return
    try:
        snapshot = parse_queue(altered)
    except ProtocolError:
        # Refused where json.loads takes it (the last one wins): a list named twice.
        assert reference_parse(reference) is None or queue_list_named_twice(altered)
    else:
        assert snapshot == reference_parse(reference)


def queue_list_named_twice(text: str) -> bool:
    objects: list[list[str]] = []  # each object's field names, innermost first: the top one last

    def names_of(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        objects.append([name for name, _ in pairs])
        return {}

    json.loads(text, object_pairs_hook=names_of)
    names = objects[-1] if objects else []
    return any(names.count(key) > 1 for key in ("queue_running", "queue_pending"))
