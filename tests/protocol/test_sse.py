"""protocol/sse.py: exact encoder bytes, the WHATWG decoding rules, and round trips.

Every decode case is fed whole, one byte at a time, and split in two at every
position (h11's test style): the decoder's output must not depend on how the
transport cut the stream.

The round-trip property, stated exactly. For a stream of events ``xs`` (with
comment and retry-only blocks interleaved), decoding the concatenated encodings
yields ``[browser_view(x) for x in xs]`` where, for each event ``x``:

* ``data``: ``x.data`` with every CRLF and lone CR replaced by LF (the spec
  joins data lines with LF); every other character, including U+2028, NEL,
  VT, FF, NUL and U+FEFF, comes back unchanged;
* ``event``: ``x.event``, except that ``""`` reads back as None ("message");
* ``id``: the id of the latest event up to and including ``x`` that had one
  (``x.id`` itself if set), ``""`` and "none yet" both reading as None;
* ``retry``: ``x.retry`` unchanged.

And after the stream, ``decoder.last_event_id`` is that latest id ("" if none)
and ``decoder.retry`` the latest retry sent, by an event or a retry block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from itertools import accumulate, pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.sse import (
    ServerSentEvent,
    SSEDecoder,
    SSEEncodingError,
    encode_comment,
    encode_event,
    encode_retry,
    parse_last_event_id,
)

# ---------------------------------------------------------------- helpers


def decode_chunks(chunks: list[bytes]) -> tuple[list[ServerSentEvent], SSEDecoder]:
    """Feed ``chunks`` in order, then close; return every event and the decoder."""
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    decoder.close()
    return events, decoder


def bytewise(raw: bytes) -> list[bytes]:
    return [raw[i : i + 1] for i in range(len(raw))]


def split_at(raw: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(raw)]
    return [raw[a:b] for a, b in pairwise(bounds)]


def all_chunkings(raw: bytes) -> list[tuple[str, list[bytes]]]:
    """Whole, byte by byte, and a two-way split at every position."""
    ways = [("whole", [raw]), ("bytewise", bytewise(raw))]
    ways += [(f"split@{i}", split_at(raw, [i])) for i in range(len(raw) + 1)]
    return ways


def ev(
    data: str = "", event: str | None = None, id: str | None = None, retry: int | None = None
) -> ServerSentEvent:
    return ServerSentEvent(data=data, event=event, id=id, retry=retry)


# ---------------------------------------------------------------- encoding

ENCODE_CASES: list[tuple[str, ServerSentEvent, bytes]] = [
    ("data", ev("hello"), b"data: hello\n\n"),
    ("empty data still dispatches", ev(""), b"data: \n\n"),
    ("default event", ServerSentEvent(), b"data: \n\n"),
    ("LF lines", ev("a\nb\nc"), b"data: a\ndata: b\ndata: c\n\n"),
    ("CRLF and CR lines", ev("a\r\nb\rc"), b"data: a\ndata: b\ndata: c\n\n"),
    ("CR LF is two breaks", ev("a\n\rb"), b"data: a\ndata: \ndata: b\n\n"),
    ("trailing newline", ev("a\n"), b"data: a\ndata: \n\n"),
    ("only newlines", ev("\n\n"), b"data: \ndata: \ndata: \n\n"),
    ("leading space kept", ev(" x"), b"data:  x\n\n"),
    ("colon in data", ev("a: b"), b"data: a: b\n\n"),
    ("looks like a field", ev("id: 3\n\nevent: x"), b"data: id: 3\ndata: \ndata: event: x\n\n"),
    (
        "not SSE line breaks",
        ev("a\u2028b\x85c\x0bd\x0ce"),
        "data: a\u2028b\x85c\x0bd\x0ce\n\n".encode(),
    ),
    ("utf-8", ev("é€😀"), "data: é€😀\n\n".encode()),
    (
        "field order: event, id, retry, data",
        ev("{}", event="progress", id="42", retry=3000),
        b"event: progress\nid: 42\nretry: 3000\ndata: {}\n\n",
    ),
    ("event with leading space", ev("x", event=" sp"), b"event:  sp\ndata: x\n\n"),
    ("empty id resets", ev("x", id=""), b"id: \ndata: x\n\n"),
    ("id with leading space", ev("x", id=" 7"), b"id:  7\ndata: x\n\n"),
    ("retry zero", ev("x", retry=0), b"retry: 0\ndata: x\n\n"),
    ("NUL allowed in data and event", ev("a\0b", event="e\0"), b"event: e\0\ndata: a\0b\n\n"),
]


@pytest.mark.parametrize(
    ("event", "expected"), [c[1:] for c in ENCODE_CASES], ids=[c[0] for c in ENCODE_CASES]
)
def test_encode_event(event: ServerSentEvent, expected: bytes) -> None:
    assert encode_event(event) == expected


INVALID_EVENTS: list[tuple[str, dict[str, object]]] = [
    ("LF in event", {"event": "a\nb"}),
    ("CR in event", {"event": "a\rb"}),
    ("LF in id", {"id": "1\n"}),
    ("CR in id", {"id": "\r1"}),
    ("NUL in id", {"id": "a\0b"}),
    ("negative retry", {"retry": -1}),
    ("bool retry", {"retry": True}),
    ("float retry", {"retry": 1.5}),
]


@pytest.mark.parametrize(
    "kwargs", [c[1] for c in INVALID_EVENTS], ids=[c[0] for c in INVALID_EVENTS]
)
def test_invalid_event_is_refused_at_construction(kwargs: dict[str, object]) -> None:
    with pytest.raises(SSEEncodingError):
        ServerSentEvent(**kwargs)  # type: ignore[arg-type]


def test_encoding_error_is_a_value_error() -> None:
    assert issubclass(SSEEncodingError, ValueError)


@pytest.mark.parametrize(
    "event",
    [ev("\ud800"), ev("x", event="\udfff"), ev("x", id="\ud83d")],
    ids=["data", "event", "id"],
)
def test_lone_surrogate_has_no_utf8_form(event: ServerSentEvent) -> None:
    with pytest.raises(SSEEncodingError):
        encode_event(event)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("heartbeat", b": heartbeat\n\n"),
        ("", b": \n\n"),
        ("a\nb\r\nc\rd", b": a\n: b\n: c\n: d\n\n"),
        ("ünï", ": ünï\n\n".encode()),
    ],
)
def test_encode_comment(text: str, expected: bytes) -> None:
    assert encode_comment(text) == expected


def test_encode_comment_refuses_lone_surrogate() -> None:
    with pytest.raises(SSEEncodingError):
        encode_comment("\ud800")


def test_encode_retry() -> None:
    assert encode_retry(3000) == b"retry: 3000\n\n"
    assert encode_retry(0) == b"retry: 0\n\n"
    with pytest.raises(SSEEncodingError):
        encode_retry(-1)


def test_comment_and_retry_blocks_dispatch_nothing() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(encode_comment("heartbeat\nmore") + encode_retry(2500)) == []
    assert decoder.retry == 2500


# ---------------------------------------------------------------- decoding


@dataclass(frozen=True)
class DecodeCase:
    name: str
    stream: bytes
    events: list[ServerSentEvent]
    last_event_id: str = ""
    retry: int | None = None


DECODE_CASES = [
    # --- examples from the spec ("Server-sent events": introduction, "Interpreting")
    DecodeCase(
        "spec intro: three messages, one on two lines",
        b"data: This is the first message.\n\n"
        b"data: This is the second message, it\ndata: has two lines.\n\n"
        b"data: This is the third message.\n\n",
        [
            ev("This is the first message."),
            ev("This is the second message, it\nhas two lines."),
            ev("This is the third message."),
        ],
    ),
    DecodeCase(
        "spec intro: event types",
        b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n",
        [ev("73857293", "add"), ev("2153", "remove"), ev("113411", "add")],
    ),
    DecodeCase(
        "spec: stock ticker, multi-line data",
        b"data: YHOO\ndata: +2\ndata: 10\n\n",
        [ev("YHOO\n+2\n10")],
    ),
    DecodeCase(
        "spec: four blocks, comment, id set then reset, extra space kept",
        b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\n"
        b"data:  third event\n\n",
        [ev("first event", id="1"), ev("second event"), ev(" third event")],
    ),
    DecodeCase(
        "spec: 'data' without colon, last block incomplete",
        b"data\n\ndata\ndata\n\ndata:",
        [ev(""), ev("\n")],
    ),
    DecodeCase(
        "spec: the space after the colon is optional",
        b"data:test\n\ndata: test\n\n",
        [ev("test"), ev("test")],
    ),
    # --- line endings
    DecodeCase("LF", b"data: a\ndata: b\n\n", [ev("a\nb")]),
    DecodeCase("CRLF", b"data: a\r\ndata: b\r\n\r\n", [ev("a\nb")]),
    DecodeCase("CR only", b"data: a\rdata: b\r\r", [ev("a\nb")]),
    DecodeCase(
        "mixed endings",
        b"data: a\r\n\ndata: b\r\r\ndata: c\n\r",
        [ev("a"), ev("b"), ev("c")],
    ),
    DecodeCase("LF CR is two line ends", b"data: a\n\rdata: b\n\n", [ev("a"), ev("b")]),
    DecodeCase(
        "unicode separators are not line ends",
        "data: a\u2028b\x85c\x0bd\x0ce\n\n".encode(),
        [ev("a\u2028b\x85c\x0bd\x0ce")],
    ),
    # --- fields
    DecodeCase("only one space is stripped", b"data:   x\n\n", [ev("  x")]),
    DecodeCase("tab is not stripped", b"data:\tx\n\n", [ev("\tx")]),
    DecodeCase("value keeps later colons", b"data: a:b: c\n\n", [ev("a:b: c")]),
    DecodeCase("empty data lines", b"data:\ndata\ndata: \n\n", [ev("\n\n")]),
    DecodeCase(
        "comments are ignored, even inside an event",
        b":\n: hi\ndata: a\n:data: b\ndata: c\n\n",
        [ev("a\nc")],
    ),
    DecodeCase(
        "unknown fields are ignored",
        b"foo: bar\nDATA: up\ndata : sp\njustsometext\ndata: x\n\n",
        [ev("x")],
    ),
    DecodeCase(
        "only unknown fields: nothing dispatched",
        b"foo: bar\n\n",
        [],
    ),
    # --- event type
    DecodeCase(
        "empty event type is 'message'",
        b"event:\ndata: a\n\nevent\ndata: b\n\n",
        [ev("a"), ev("b")],
    ),
    DecodeCase("event type is literal", b"event: message\ndata: a\n\n", [ev("a", "message")]),
    DecodeCase(
        "event type resets after dispatch",
        b"event: a\ndata: 1\n\ndata: 2\n\n",
        [ev("1", "a"), ev("2")],
    ),
    DecodeCase(
        "event type of a block without data is dropped",
        b"event: lost\n\ndata: x\n\n",
        [ev("x")],
    ),
    DecodeCase("last event field wins", b"event: a\nevent: b\ndata: x\n\n", [ev("x", "b")]),
    # --- dispatch
    DecodeCase("blank lines alone dispatch nothing", b"\n\n\r\n\r", []),
    DecodeCase("no blank line at EOF: discarded", b"data: x\n", []),
    DecodeCase("unterminated line at EOF: discarded", b"data: x\n\ndata: y", [ev("x")]),
    # --- id
    DecodeCase(
        "id persists until replaced",
        b"id: 1\ndata: 1\n\ndata: 2\n\nid: 2\ndata:3\n\ndata:4\n\n",
        [ev("1", id="1"), ev("2", id="1"), ev("3", id="2"), ev("4", id="2")],
        last_event_id="2",
    ),
    DecodeCase(
        "empty id resets",
        b"id: 1\ndata: 1\n\nid:\ndata:2\n\ndata:3\n\n",
        [ev("1", id="1"), ev("2"), ev("3")],
    ),
    DecodeCase(
        "id without colon resets",
        b"id: 1\ndata: 1\n\nid\ndata:2\n\n",
        [ev("1", id="1"), ev("2")],
    ),
    DecodeCase(
        "id containing NUL is ignored",
        b"id: 1\ndata: a\n\nid: x\x00y\ndata: b\n\n",
        [ev("a", id="1"), ev("b", id="1")],
        last_event_id="1",
    ),
    DecodeCase(
        "id after data in the same block applies",
        b"data: x\nid: 3\n\n",
        [ev("x", id="3")],
        last_event_id="3",
    ),
    DecodeCase(
        "id in a block without data still becomes the last event ID",
        b"id: 7\n\ndata: x\n\n",
        [ev("x", id="7")],
        last_event_id="7",
    ),
    DecodeCase(
        "an id-only block at the end still sets the last event ID",
        b"id: 1\ndata: a\n\nid: 2\n\n",
        [ev("a", id="1")],
        last_event_id="2",
    ),
    DecodeCase(
        "id of an unfinished block is not the last event ID",
        b"id: 1\ndata: a\n\nid: 2\ndata: b\n",
        [ev("a", id="1")],
        last_event_id="1",
    ),
    # --- retry
    DecodeCase(
        "retry on an event",
        b"retry: 1500\ndata: x\n\ndata: y\n\n",
        [ev("x", retry=1500), ev("y")],
        retry=1500,
    ),
    DecodeCase("retry block without data", b"retry: 10\n\ndata: x\n\n", [ev("x")], retry=10),
    DecodeCase("retry leading zeros", b"retry: 007\ndata: x\n\n", [ev("x", retry=7)], retry=7),
    DecodeCase(
        "invalid retry values are ignored",
        (
            "retry: 100\n\nretry: 15a0\nretry: -1\nretry:  5\nretry: \nretry\nretry: 1.5\n"
            "retry: \u00b2\nretry: \u0663\nretry: \uff11\ndata: x\n\n"
        ).encode(),
        [ev("x")],
        retry=100,
    ),
    # --- encoding
    DecodeCase("BOM at start is skipped", b"\xef\xbb\xbfdata: x\n\n", [ev("x")]),
    DecodeCase(
        "only one BOM is skipped",
        b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\ndata: y\n\n",
        [ev("y")],
    ),
    DecodeCase(
        "BOM later is content",
        b"data: x\n\n\xef\xbb\xbfdata: y\n\ndata: \xef\xbb\xbfz\n\n",
        [ev("x"), ev("\ufeffz")],
    ),
    DecodeCase("utf-8", "data: é€😀\n\n".encode(), [ev("é€😀")]),
    DecodeCase(
        "invalid utf-8 becomes U+FFFD",
        b"data: \xff\xfeok\xc0\xaf\xed\xa0\x80\n\n",
        [ev("\ufffd\ufffdok" + "\ufffd" * 5)],
    ),
    DecodeCase("truncated sequence before a newline", b"data: \xe2\x82\n\n", [ev("\ufffd")]),
    DecodeCase(
        "UTF-16 BOM is not a BOM",
        b"\xff\xfedata: 1\n\ndata: 2\n\n",
        [ev("2")],
    ),
    DecodeCase("NUL in data", b"data: a\x00b\n\n", [ev("a\0b")]),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=[c.name for c in DECODE_CASES])
def test_decode(case: DecodeCase) -> None:
    for how, chunks in all_chunkings(case.stream):
        events, decoder = decode_chunks(chunks)
        assert events == case.events, how
        assert decoder.last_event_id == case.last_event_id, how
        assert decoder.retry == case.retry, how


def test_event_comes_out_of_the_feed_that_completes_it() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"\n") == [ev("a")]
    # A lone CR ends its line at once: no waiting for a possible LF.
    assert decoder.feed(b"data: b\r") == []
    assert decoder.feed(b"\r") == [ev("b")]


def test_cr_then_lf_in_the_next_chunk_is_one_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"") == []  # an empty chunk in between changes nothing
    assert decoder.feed(b"\ndata: b\r") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\r\n") == [ev("a\nb")]


def test_bom_split_across_feeds() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"\xef") == []
    assert decoder.feed(b"\xbb") == []
    assert decoder.feed(b"\xbfdata: 1\n\n") == [ev("1")]


def test_close_discards_the_pending_event_and_keeps_reconnect_state() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 5\nretry: 200\ndata: a\n\nid: 6\ndata: b\n") == [
        ev("a", id="5", retry=200)
    ]
    decoder.close()
    decoder.close()  # idempotent
    assert decoder.last_event_id == "5"
    assert decoder.retry == 200
    with pytest.raises(RuntimeError):
        decoder.feed(b"\n")


def test_initial_state() -> None:
    decoder = SSEDecoder()
    assert decoder.last_event_id == ""
    assert decoder.retry is None


# ---------------------------------------------------------------- round trips

# Hypothesis budget: these five tests run 1500 + 1000 + 1000 + 1500 + 1500 =
# 6500 examples per pytest run (each test sets its own max_examples; nothing is
# registered globally).


@dataclass(frozen=True)
class Comment:
    text: str


@dataclass(frozen=True)
class RetryBlock:
    ms: int


StreamItem = ServerSentEvent | Comment | RetryBlock

_NEWLINE = st.sampled_from(["\r\n", "\r", "\n"])
# Pieces an encoder or decoder could get wrong: the stripped space, the
# field separator, a BOM, NUL, and line breaks that SSE does *not* recognise.
_TRICKY_PIECES = [" ", ":", "\ufeff", "\u2028", "\x85", "\x0b", "\x0c", "data:"]
_TRICKY = st.sampled_from([*_TRICKY_PIECES, "\0"])
# st.text() draws from all of Unicode except surrogates, which UTF-8 cannot carry.
_TEXT = st.lists(st.one_of(st.text(max_size=8), _NEWLINE, _TRICKY), max_size=6).map("".join)
_NAME_PIECE = st.one_of(st.text(max_size=6), st.sampled_from(_TRICKY_PIECES))
_ID = st.lists(_NAME_PIECE, max_size=3).map("".join).map(lambda s: re.sub("[\r\n\0]", "", s))
_EVENT_TYPE = st.lists(st.one_of(_NAME_PIECE, st.just("\0")), max_size=3).map(
    lambda parts: re.sub("[\r\n]", "", "".join(parts))
)
_MS = st.integers(min_value=0, max_value=2**53)

EVENTS = st.builds(
    ServerSentEvent,
    data=_TEXT,
    event=st.none() | _EVENT_TYPE,
    id=st.none() | _ID,
    retry=st.none() | _MS,
)
STREAMS = st.lists(
    st.one_of(
        EVENTS,
        EVENTS,
        EVENTS,
        st.builds(Comment, _TEXT),
        st.builds(RetryBlock, _MS),
    ),
    max_size=8,
)


def encode_item(item: StreamItem) -> bytes:
    if isinstance(item, Comment):
        return encode_comment(item.text)
    if isinstance(item, RetryBlock):
        return encode_retry(item.ms)
    return encode_event(item)


def browser_view(items: list[StreamItem]) -> tuple[list[ServerSentEvent], str, int | None]:
    """What decoding must give back: see the module docstring."""
    events: list[ServerSentEvent] = []
    last_id = ""
    retry: int | None = None
    for item in items:
        if isinstance(item, Comment):
            continue
        if isinstance(item, RetryBlock):
            retry = item.ms
            continue
        if item.id is not None:
            last_id = item.id
        if item.retry is not None:
            retry = item.retry
        events.append(
            replace(
                item,
                data=re.sub("\r\n?", "\n", item.data),
                event=item.event or None,
                id=last_id or None,
            )
        )
    return events, last_id, retry


def check_round_trip(items: list[StreamItem], chunks: list[bytes]) -> None:
    events, decoder = decode_chunks(chunks)
    expected, last_id, retry = browser_view(items)
    assert events == expected
    assert decoder.last_event_id == last_id
    assert decoder.retry == retry


@settings(max_examples=1500, deadline=None)
@given(EVENTS)
def test_event_round_trip(event: ServerSentEvent) -> None:
    (decoded,), decoder = decode_chunks([encode_event(event)])
    assert decoded.data == re.sub("\r\n?", "\n", event.data)
    assert decoded.event == (event.event or None)
    assert decoded.id == (event.id or None)
    assert decoded.retry == event.retry
    assert decoder.last_event_id == (event.id or "")


@settings(max_examples=1000, deadline=None)
@given(STREAMS)
def test_stream_round_trip_whole(items: list[StreamItem]) -> None:
    check_round_trip(items, [b"".join(map(encode_item, items))])


@settings(max_examples=1000, deadline=None)
@given(STREAMS)
def test_stream_round_trip_bytewise(items: list[StreamItem]) -> None:
    encoded = [encode_item(item) for item in items]
    # Where each event's block ends: its event must come out of that very feed.
    ends = {
        end
        for item, end in zip(items, accumulate(map(len, encoded)), strict=True)
        if isinstance(item, ServerSentEvent)
    }
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for pos, byte in enumerate(bytewise(b"".join(encoded)), start=1):
        out = decoder.feed(byte)
        assert len(out) == int(pos in ends)
        events += out
    decoder.close()
    assert (events, decoder.last_event_id, decoder.retry) == browser_view(items)


@settings(max_examples=1500, deadline=None)
@given(STREAMS, st.data())
def test_stream_round_trip_random_splits(items: list[StreamItem], data: st.DataObject) -> None:
    raw = b"".join(map(encode_item, items))
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12), label="cuts")
    check_round_trip(items, split_at(raw, cuts))


# ---------------------------------------------------------------- arbitrary bytes

# Mostly line-shaped input (field name, separator, value, line end) so that the
# field and dispatch rules are reached often, mixed with raw bytes and fragments
# (BOMs, cut UTF-8 sequences, lone CRs) that break the shape anywhere.
_LINE = st.tuples(
    st.sampled_from([b"data", b"data", b"event", b"id", b"retry", b"", b"x", b"\xef\xbb\xbf"]),
    st.sampled_from([b"", b":", b": ", b":  "]),
    st.one_of(
        st.binary(max_size=6),
        st.sampled_from([b"", b"1", b"42", b"0", b" 7", b"a\x00", b"\xe2\x82\xac", b"\xf0\x9f"]),
    ),
    st.sampled_from([b"\n", b"\r", b"\r\n", b"\n\n", b"\r\r", b"\r\n\r\n", b"\n\r", b""]),
).map(b"".join)
_FRAGMENTS = st.sampled_from(
    [b"\r", b"\n", b"\r\n", b"\x00", b"\xef\xbb\xbf", b"\xef\xbb", b"\xf0\x9f", b"\xff", b":"]
)
# A block: a few lines, then enough line ends to be sure one is blank.
_BLOCK = st.lists(_LINE, min_size=1, max_size=4).map(lambda lines: b"".join(lines) + b"\r\n\n")
_RAW = st.lists(
    st.one_of(_BLOCK, _BLOCK, _LINE, _LINE, st.binary(max_size=8), _FRAGMENTS), max_size=12
).map(b"".join)


def reference_decode(raw: bytes) -> tuple[list[ServerSentEvent], str, int | None]:
    """A plain, whole-buffer reading of the spec, to check the incremental decoder."""
    text = raw.decode("utf-8", errors="replace").removeprefix("\ufeff")
    lines = re.split("\r\n|\r|\n", text)[:-1]  # the last piece never ended: discarded
    events: list[ServerSentEvent] = []
    data: list[str] = []
    event_type, id_buffer, last_id = "", "", ""
    retry: int | None = None
    block_retry: int | None = None
    for line in lines:
        if line == "":
            last_id = id_buffer
            if data:
                events.append(
                    ServerSentEvent(
                        "\n".join(data), event_type or None, last_id or None, block_retry
                    )
                )
            data, event_type, block_retry = [], "", None
            continue
        if line.startswith(":"):
            continue
        if ":" in line:
            name, value = line.split(":", 1)
            value = value.removeprefix(" ")
        else:
            name, value = line, ""
        if name == "data":
            data.append(value)
        elif name == "event":
            event_type = value
        elif name == "id" and "\0" not in value:
            id_buffer = value
        elif name == "retry" and re.fullmatch("[0-9]+", value):
            retry = block_retry = int(value)
    return events, last_id, retry


@settings(max_examples=1500, deadline=None)
@given(_RAW, st.data())
def test_decoder_is_total_and_chunking_invariant(raw: bytes, data: st.DataObject) -> None:
    expected = reference_decode(raw)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12), label="cuts")
    for chunks in ([raw], bytewise(raw), split_at(raw, cuts)):
        events, decoder = decode_chunks(chunks)
        assert (events, decoder.last_event_id, decoder.retry) == expected


@pytest.mark.parametrize(
    ("candidates", "expected"),
    [
        (("42", None), 42),
        ((" 7\t", None), 7),
        ((None, "3"), 3),
        (("x", "3"), 3),  # a bad header falls back to the query
        (("9" * 20, None), int("9" * 20)),
        (("1\u00b2", None), None),
        (("\u2460", None), None),
        (("\u0663", None), None),  # ARABIC-INDIC DIGIT THREE
        (("9" * 21, None), None),
        (("-1", "+2"), None),
        (("", None), None),
        ((None, None), None),
    ],
)
def test_last_event_id_is_ascii_digits_of_bounded_length(
    candidates: tuple[str | None, str | None], expected: int | None
) -> None:
    assert parse_last_event_id(*candidates) == expected


@given(st.text())
def test_last_event_id_parsing_never_raises(text: str) -> None:
    parse_last_event_id(text, text)
