"""Server-Sent Events: an encoder and an incremental WHATWG event-stream decoder.

Sans-IO, like h11: `encode_event` / `encode_comment` / `encode_retry` turn values
into bytes to write; `SSEDecoder.feed` turns received bytes into events. Nothing
here reads a socket or a clock.

The decoder follows the HTML Standard, "Server-sent events", sections "Parsing an
event stream" and "Interpreting an event stream"
(https://html.spec.whatwg.org/multipage/server-sent-events.html). Comments quote
the rule they implement as "spec: ...".

What a decoded `ServerSentEvent` means (this is what the round-trip tests pin):

* ``data``: the ``data`` lines joined with ``"\\n"``. Every line ending the
  encoder split on (CRLF, CR, LF) therefore comes back as LF.
* ``event``: the event type, or None for the default type "message" (the spec
  treats an absent and an empty ``event`` field alike).
* ``id``: the *last event ID in effect when the event dispatched*, i.e. what a
  browser puts in ``MessageEvent.lastEventId``: an ``id`` field in this event's
  block, or else the one inherited from an earlier block. None when that string
  is empty (never set, or reset by an empty ``id`` field). The decoder does not
  tell an explicit id from an inherited one, just as a browser cannot; streams
  that put an ``id`` on every event (ours do) round-trip exactly.
* ``retry``: the reconnection time set by a valid ``retry`` field in this
  event's own block, else None. `SSEDecoder.retry` keeps the stream-wide value.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

__all__ = [
    "SSEDecoder",
    "SSEEncodingError",
    "ServerSentEvent",
    "encode_comment",
    "encode_event",
    "encode_retry",
    "parse_last_event_id",
]

# spec: end-of-line = ( cr lf / cr / lf ). Nothing else ends a line: not U+2028,
# not NEL, not VT/FF, so never use str.splitlines() on an event stream.
_EOL = re.compile(r"\r\n|\r|\n")
_BOM = "\ufeff"


class SSEEncodingError(ValueError):
    """An event or comment that cannot be written to an event stream as given."""


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One server-sent event (see the module docstring for decoded values).

    Construction validates what the wire format cannot carry and raises
    `SSEEncodingError`: a CR or LF in ``event`` or ``id`` (it would end the
    field's line), a NUL in ``id`` (a browser ignores such an ``id`` field), or
    a negative or non-integer ``retry``.

    Attributes:
        data: The payload; may contain any line endings (sent as several
            ``data`` lines, received back as LF).
        event: The event type; None means the default, "message".
        id: The event ID. When encoding, None writes no ``id`` line (the client
            keeps its previous last event ID) and ``""`` writes an empty one
            (which resets it).
        retry: Reconnection time in milliseconds, or None.
    """

    data: str = ""
    event: str | None = None
    id: str | None = None
    retry: int | None = None

    def __post_init__(self) -> None:
        if self.event is not None:
            _check_single_line("event", self.event)
        if self.id is not None:
            _check_single_line("id", self.id)
            if "\0" in self.id:
                # spec: an id field whose value contains U+0000 NULL is ignored.
                raise SSEEncodingError(f"SSE id must not contain NUL: {self.id!r}")
        if self.retry is not None:
            _check_retry(self.retry)


def _check_single_line(name: str, value: str) -> None:
    if "\r" in value or "\n" in value:
        raise SSEEncodingError(f"SSE {name} must not contain CR or LF: {value!r}")


def _check_retry(ms: int) -> None:
    # bool is an int, but "retry: True" is not all ASCII digits and would be ignored.
    if not isinstance(ms, int) or isinstance(ms, bool) or ms < 0:
        raise SSEEncodingError(f"SSE retry must be an int >= 0 (milliseconds), got {ms!r}")


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates have no UTF-8 form
        raise SSEEncodingError(f"SSE text is not encodable as UTF-8: {exc}") from exc


def encode_event(ev: ServerSentEvent) -> bytes:
    """Serialize one event, blank line included, as UTF-8.

    Fields come out as ``event``, ``id``, ``retry``, then one ``data`` line per
    line of ``ev.data`` (split on CRLF, CR and LF). Each field is written as
    ``name: value``: the decoder strips exactly one space after the colon, so
    the separator space keeps a value that itself starts with a space intact.
    An empty ``data`` still gets one ``data:`` line, so the event dispatches
    (spec: a block whose data buffer is empty is not dispatched).

    Raises:
        SSEEncodingError: ``ev`` contains text with no UTF-8 form (a lone
            surrogate). Other invalid values are refused by `ServerSentEvent`.
    """
    lines: list[str] = []
    if ev.event is not None:
        lines.append(f"event: {ev.event}\n")
    if ev.id is not None:
        lines.append(f"id: {ev.id}\n")
    if ev.retry is not None:
        lines.append(f"retry: {ev.retry}\n")
    data = ev.data
    if "\n" in data or "\r" in data:
        lines.extend(f"data: {line}\n" for line in _EOL.split(data))
    else:  # one line (every JSON payload): no split
        lines.append(f"data: {data}\n")
    lines.append("\n")
    return _utf8("".join(lines))


def encode_comment(text: str = "") -> bytes:
    """Serialize a comment block, e.g. ``encode_comment("heartbeat") == b": heartbeat\\n\\n"``.

    A multi-line ``text`` becomes one comment line per line. Clients ignore
    comments (spec: a line starting with a colon is ignored); the closing blank
    line dispatches nothing because the block has no data. Send comments only
    between events, never in the middle of one.

    Raises:
        SSEEncodingError: ``text`` has no UTF-8 form (a lone surrogate).
    """
    lines = [f": {line}\n" for line in _EOL.split(text)]
    lines.append("\n")
    return _utf8("".join(lines))


def encode_retry(ms: int) -> bytes:
    """Serialize a block that only sets the client's reconnection time: ``retry: <ms>``.

    The block has no data, so no event is dispatched.

    Raises:
        SSEEncodingError: ``ms`` is negative or not an int.
    """
    _check_retry(ms)
    return f"retry: {ms}\n\n".encode("ascii")


# Our event ids are versions below 2**64: plain ASCII decimal, at most 20 digits.
# Anything else (`1²`, `①`, 5,000 digits) is not an id we sent.
_LAST_EVENT_ID = re.compile(r"[0-9]{1,20}")


def parse_last_event_id(*candidates: str | None) -> int | None:
    """The first candidate that is an event id we could have sent, as an int.

    For a reconnecting client's ``Last-Event-ID`` header, then its
    ``?lastEventId=`` query parameter. Spaces and tabs around the value are
    allowed; any other value is ignored (the client then gets the stream from
    its current snapshot), never an error.
    """
    for raw in candidates:
        if raw is None:
            continue
        value = raw.strip(" \t")
        if _LAST_EVENT_ID.fullmatch(value):
            return int(value)
    return None


class SSEDecoder:
    """Incremental event-stream parser: bytes in, `ServerSentEvent`s out.

    Feed it the response body in chunks of any size; the result never depends
    on where the chunks were cut (a UTF-8 sequence, a BOM or a CRLF may be split
    across feeds). Parsing is total: every byte sequence is a valid stream, and
    invalid UTF-8 becomes U+FFFD as a browser's decoder does. Call `close` at
    end of stream.

    Attributes:
        last_event_id: The last event ID string, updated each time a block ends
            (spec: "dispatch the event", step 1), even a block that dispatches
            nothing. Send it as ``Last-Event-ID`` when reconnecting. "" until set.
        retry: The reconnection time in ms from the latest valid ``retry``
            field, or None if the stream has not set one.

    The internal line buffer is not bounded: a peer sending one endless line
    makes it grow. Bound the response size at the transport if that matters.
    """

    __slots__ = (
        "_closed",
        "_data",
        "_event_type",
        "_id_buffer",
        "_partial",
        "_retry_in_block",
        "_skip_lf",
        "_started",
        "_utf8",
        "last_event_id",
        "retry",
    )

    def __init__(self) -> None:
        # spec: the stream is always decoded as UTF-8, with replacement
        # characters for invalid bytes; the incremental decoder keeps a sequence
        # split across feeds until it is complete.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False  # a first character has been decoded (BOM check done)
        self._skip_lf = False  # the last chunk ended in CR: an LF next is its pair
        self._partial: list[str] = []  # pieces of the current, unterminated line
        self._data: list[str] = []  # this block's data values
        self._event_type = ""
        self._id_buffer = ""  # spec: the last event ID buffer, not reset per block
        self._retry_in_block: int | None = None
        self._closed = False
        self.last_event_id = ""
        self.retry: int | None = None

    def feed(self, data: bytes) -> list[ServerSentEvent]:
        """Parse the next chunk of the stream; return the events it completed, in order.

        Raises:
            RuntimeError: the decoder was closed.
        """
        if self._closed:
            raise RuntimeError("SSEDecoder.feed() after close()")
        text = self._utf8.decode(data)
        if not text:
            return []  # an empty chunk, or only part of a UTF-8 sequence
        if not self._started:
            self._started = True
            # spec: one leading U+FEFF BYTE ORDER MARK at the start of the stream is ignored.
            if text[0] == _BOM:
                text = text[1:]
        if self._skip_lf and text[:1] == "\n":
            text = text[1:]  # second half of a CRLF whose CR ended the last chunk
        # A CR ends its line at once (no waiting to see whether an LF follows);
        # remember to drop that LF if it starts the next chunk.
        self._skip_lf = text.endswith("\r")

        events: list[ServerSentEvent] = []
        start = 0
        for eol in _EOL.finditer(text):
            line = text[start : eol.start()]
            if self._partial:
                self._partial.append(line)
                line = "".join(self._partial)
                self._partial.clear()
            self._process_line(line, events)
            start = eol.end()
        if start < len(text):
            # Kept as pieces and joined once, so a long line fed byte by byte
            # costs linear, not quadratic, time.
            self._partial.append(text[start:])
        return events

    def close(self) -> None:
        """Signal end of stream.

        spec: once the end of the file is reached, any pending data is
        discarded: an event whose closing blank line never arrived is not
        dispatched, so this returns nothing. `last_event_id` and `retry` keep
        their values for a reconnect. Idempotent; `feed` raises afterwards.
        """
        self._closed = True
        self._utf8.reset()
        self._partial.clear()
        self._data.clear()
        self._event_type = ""
        self._retry_in_block = None

    def _process_line(self, line: str, events: list[ServerSentEvent]) -> None:
        # spec, "Interpreting an event stream", one branch per kind of line.
        if not line:
            self._dispatch(events)
            return
        if line[0] == ":":
            return  # a comment
        field, colon, value = line.partition(":")
        # spec: no colon -> the whole line is the field name and the value is
        # empty; otherwise drop one U+0020 SPACE right after the first colon.
        if colon and value[:1] == " ":
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event_type = value
        # spec: an id value containing NULL is ignored.
        elif field == "id" and "\0" not in value:
            self._id_buffer = value
        # spec: a retry value sets the reconnection time only if it is all ASCII
        # digits; str.isdigit() alone would also accept digits like "²" or "٣".
        elif field == "retry" and value.isascii() and value.isdigit():
            self.retry = self._retry_in_block = int(value)
        # spec: any other field name (and an ignored id or retry) changes nothing.

    def _dispatch(self, events: list[ServerSentEvent]) -> None:
        # spec: step 1 runs for every block, even one that dispatches nothing.
        self.last_event_id = self._id_buffer
        data, event_type, retry = self._data, self._event_type, self._retry_in_block
        self._data = []
        self._event_type = ""
        self._retry_in_block = None
        # spec: an empty data buffer (no data field at all) dispatches nothing.
        if not data:
            return
        # spec: the buffer is each value plus LF, minus the final LF: a join.
        events.append(
            ServerSentEvent(
                data="\n".join(data),
                event=event_type or None,
                id=self.last_event_id or None,
                retry=retry,
            )
        )
