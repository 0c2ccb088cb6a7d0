"""ComfyUI's wire protocol, sans-IO: frames and HTTP bodies in, typed values out.

The shapes follow what a live ComfyUI 0.3.64 did (tests/fixtures/comfyui/FACTS.md).
Parsing is total: every message type we do not know becomes `UnknownMessage` /
`UnknownBinary`, and every malformed frame raises `ProtocolError` (and nothing
else), so one bad frame can never crash the consumer loop.
"""

from __future__ import annotations

import codecs
import json
import math
import re
import struct
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from protocol.errors import ProtocolError

# ---------------------------------------------------------------------------
# Events (frozen, named as nouns; one per ComfyUI message type)


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One output image as ComfyUI names it (fetch it with GET /view)."""

    filename: str
    subfolder: str = ""
    type: str = "output"


@dataclass(frozen=True, slots=True)
class Status:
    """Queue size (running + pending); broadcast on every queue change."""

    queue_remaining: int
    sid: str | None = None  # only in the first frame of a connection


@dataclass(frozen=True, slots=True)
class ExecutionStart:
    prompt_id: str
    timestamp: int | None = None  # server wall clock, integer ms


@dataclass(frozen=True, slots=True)
class ExecutionCached:
    prompt_id: str
    nodes: tuple[str, ...]
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class Executing:
    """A node starts running; `node is None` means the prompt is over.

    `prompt_id is None` only in the frame ComfyUI re-sends to a socket that
    reconnects with the client id of the running prompt (FACTS §1).
    """

    node: str | None
    prompt_id: str | None
    display_node: str | None = None

    @property
    def is_prompt_end(self) -> bool:
        return self.node is None and self.prompt_id is not None


@dataclass(frozen=True, slots=True)
class Progress:
    """One tick of a node's progress bar (resets per node)."""

    prompt_id: str
    node: str | None
    value: float
    max: float


@dataclass(frozen=True, slots=True)
class NodeProgress:
    node_id: str
    value: float
    max: float
    state: str  # "running" | "finished" (ComfyUI also knows "pending", "error")
    display_node_id: str | None = None


@dataclass(frozen=True, slots=True)
class ProgressState:
    """A full snapshot of every started node of a prompt."""

    prompt_id: str
    nodes: tuple[NodeProgress, ...]


@dataclass(frozen=True, slots=True)
class Executed:
    """One node's UI output (e.g. the images a SaveImage node wrote)."""

    prompt_id: str
    node: str
    display_node: str | None
    output: Mapping[str, Any] = field(hash=False)
    images: tuple[ImageRef, ...] = ()


@dataclass(frozen=True, slots=True)
class ExecutionSuccess:
    prompt_id: str
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class ExecutionError:
    prompt_id: str
    node_id: str
    node_type: str
    exception_message: str
    exception_type: str
    traceback: tuple[str, ...] = ()
    executed: tuple[str, ...] = ()
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class ExecutionInterrupted:
    prompt_id: str
    node_id: str
    node_type: str
    executed: tuple[str, ...] = ()
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class FeatureFlags:
    flags: Mapping[str, Any] = field(hash=False)


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """A well-formed text frame of a type we do not handle (logs, custom nodes...)."""

    type: str
    data: Mapping[str, Any] = field(hash=False)


# Binary frames: a 4-byte big-endian type, then a type-specific payload (FACTS §4).
PREVIEW_IMAGE: Final = 1
TEXT: Final = 3
PREVIEW_IMAGE_WITH_METADATA: Final = 4
_IMAGE_FORMATS: Final = {1: "image/jpeg", 2: "image/png"}


@dataclass(frozen=True, slots=True)
class PreviewImage:
    """Legacy preview: carries no prompt id; belongs to the latest `Progress`."""

    media_type: str  # "image/jpeg" | "image/png"
    image: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class PreviewImageWithMetadata:
    prompt_id: str | None
    node_id: str | None
    media_type: str
    metadata: Mapping[str, Any] = field(hash=False)
    image: bytes = field(repr=False, default=b"")


@dataclass(frozen=True, slots=True)
class ProgressText:
    """Free text a node reports for itself (broadcast, no prompt id)."""

    node_id: str
    text: str


@dataclass(frozen=True, slots=True)
class UnknownBinary:
    event_type: int
    payload: bytes = field(repr=False)


ComfyEvent = (
    Status
    | ExecutionStart
    | ExecutionCached
    | Executing
    | Progress
    | ProgressState
    | Executed
    | ExecutionSuccess
    | ExecutionError
    | ExecutionInterrupted
    | FeatureFlags
    | UnknownMessage
    | PreviewImage
    | PreviewImageWithMetadata
    | ProgressText
    | UnknownBinary
)

# Events that carry the prompt they belong to, for routing to that prompt's task.
PromptEvent = (
    ExecutionStart
    | ExecutionCached
    | Executing
    | Progress
    | ProgressState
    | Executed
    | ExecutionSuccess
    | ExecutionError
    | ExecutionInterrupted
)


def prompt_id_of(event: ComfyEvent) -> str | None:
    """The prompt an event belongs to, if it says so."""
    if isinstance(event, PreviewImageWithMetadata):
        return event.prompt_id
    return getattr(event, "prompt_id", None)


# ---------------------------------------------------------------------------
# Field readers: every missing or wrongly typed field becomes a ProtocolError.


class _Fields:
    """Typed access to one JSON object, naming the frame in every error."""

    __slots__ = ("_data", "_where")

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise ProtocolError(f"{where}: expected a JSON object, got {type(data).__name__}")
        self._data: dict[str, Any] = data
        self._where = where

    def _get(self, key: str) -> Any:
        try:
            return self._data[key]
        except KeyError:
            raise ProtocolError(f"{self._where}: missing field {key!r}") from None

    def _bad(self, key: str, expected: str) -> ProtocolError:
        got = type(self._data.get(key)).__name__
        return ProtocolError(f"{self._where}: field {key!r} should be {expected}, got {got}")

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        return value

    def opt_str(self, key: str) -> str | None:
        """A string, null, or absent."""
        value = self._data.get(key)
        if value is not None and not isinstance(value, str):
            raise self._bad(key, "a string or null")
        return value

    def nullable_str(self, key: str) -> str | None:
        """Present, and a string or null."""
        self._get(key)
        return self.opt_str(key)

    def integer(self, key: str) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer")
        return value

    def opt_int(self, key: str) -> int | None:
        if self._data.get(key) is None:
            return None
        return self.integer(key)

    def number(self, key: str) -> float:
        """A finite number: Python's JSON reader also takes NaN, Infinity and 1e400 (inf),
        which every message of the task would carry on to browsers, whose JSON.parse
        refuses them (a complete event showing maxValue Infinity is lost)."""
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(key, "a number")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite:
            raise ProtocolError(
                f"{self._where}: field {key!r} should be a finite number, got {value!r:.40}"
            )
        return value

    def str_list(self, key: str, *, default: tuple[str, ...] | None = None) -> tuple[str, ...]:
        if default is not None and key not in self._data:
            return default
        value = self._get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, "a list of strings")
        return tuple(value)

    def array(self, key: str) -> list[Any]:
        value = self._get(key)
        if not isinstance(value, list):
            raise self._bad(key, "a list")
        return value

    def has(self, key: str) -> bool:
        return self._data.get(key) is not None

    @property
    def raw(self) -> dict[str, Any]:
        return self._data

    def obj(self, key: str) -> dict[str, Any]:
        value = self._get(key)
        if not isinstance(value, dict):
            raise self._bad(key, "an object")
        return value

    def sub(self, key: str) -> _Fields:
        return _Fields(self.obj(key), f"{self._where}.{key}")


def _images_of(output: Mapping[str, Any], where: str) -> tuple[ImageRef, ...]:
    """The `images` list of a node's UI output; other output kinds are ignored."""
    images = output.get("images", [])
    if not isinstance(images, list):
        raise ProtocolError(f"{where}: 'images' should be a list")
    refs = []
    for i, item in enumerate(images):
        f = _Fields(item, f"{where}.images[{i}]")
        refs.append(
            ImageRef(
                filename=f.text("filename"),
                subfolder=f.opt_str("subfolder") or "",
                type=f.opt_str("type") or "output",
            )
        )
    return tuple(refs)


# ---------------------------------------------------------------------------
# Text frames


def _status(d: _Fields) -> Status:
    exec_info = d.sub("status").sub("exec_info")
    return Status(queue_remaining=exec_info.integer("queue_remaining"), sid=d.opt_str("sid"))


def _execution_start(d: _Fields) -> ExecutionStart:
    return ExecutionStart(prompt_id=d.text("prompt_id"), timestamp=d.opt_int("timestamp"))


def _execution_cached(d: _Fields) -> ExecutionCached:
    return ExecutionCached(
        prompt_id=d.text("prompt_id"), nodes=d.str_list("nodes"), timestamp=d.opt_int("timestamp")
    )


def _executing(d: _Fields) -> Executing:
    return Executing(
        node=d.nullable_str("node"),
        prompt_id=d.opt_str("prompt_id"),
        display_node=d.opt_str("display_node"),
    )


def _progress(d: _Fields) -> Progress:
    return Progress(
        prompt_id=d.text("prompt_id"),
        node=d.opt_str("node"),
        value=d.number("value"),
        max=d.number("max"),
    )


def _progress_state(d: _Fields) -> ProgressState:
    nodes = []
    for node_id, raw in d.obj("nodes").items():
        n = _Fields(raw, f"progress_state.nodes[{node_id!r}]")
        nodes.append(
            NodeProgress(
                node_id=node_id,
                value=n.number("value"),
                max=n.number("max"),
                state=n.text("state"),
                display_node_id=n.opt_str("display_node_id"),
            )
        )
    return ProgressState(prompt_id=d.text("prompt_id"), nodes=tuple(nodes))


def _executed(d: _Fields) -> Executed:
    # ComfyUI re-sends a cached output node's `executed` with the UI output it
    # cached: null for a node that shows nothing.
    output = {} if "output" in d.raw and d.raw["output"] is None else d.obj("output")
    return Executed(
        prompt_id=d.text("prompt_id"),
        node=d.text("node"),
        display_node=d.opt_str("display_node"),
        output=output,
        images=_images_of(output, "executed.output"),
    )


def _execution_success(d: _Fields) -> ExecutionSuccess:
    return ExecutionSuccess(prompt_id=d.text("prompt_id"), timestamp=d.opt_int("timestamp"))


def _execution_error(d: _Fields) -> ExecutionError:
    return ExecutionError(
        prompt_id=d.text("prompt_id"),
        node_id=d.text("node_id"),
        node_type=d.text("node_type"),
        exception_message=d.text("exception_message"),
        exception_type=d.text("exception_type"),
        traceback=d.str_list("traceback", default=()),
        executed=d.str_list("executed", default=()),
        timestamp=d.opt_int("timestamp"),
    )


def _execution_interrupted(d: _Fields) -> ExecutionInterrupted:
    return ExecutionInterrupted(
        prompt_id=d.text("prompt_id"),
        node_id=d.text("node_id"),
        node_type=d.text("node_type"),
        executed=d.str_list("executed", default=()),
        timestamp=d.opt_int("timestamp"),
    )


def _feature_flags(d: _Fields) -> FeatureFlags:
    return FeatureFlags(flags=dict(d.raw))


_TEXT_PARSERS: Final[dict[str, Callable[[_Fields], ComfyEvent]]] = {
    "status": _status,
    "execution_start": _execution_start,
    "execution_cached": _execution_cached,
    "executing": _executing,
    "progress": _progress,
    "progress_state": _progress_state,
    "executed": _executed,
    "execution_success": _execution_success,
    "execution_error": _execution_error,
    "execution_interrupted": _execution_interrupted,
    "feature_flags": _feature_flags,
}


def parse_message(message: object) -> ComfyEvent:
    """One decoded JSON text frame `{"type": T, "data": {...}}` -> event."""
    envelope = _Fields(message, "frame")
    msg_type = envelope.text("type")
    data = envelope.obj("data")
    parser = _TEXT_PARSERS.get(msg_type)
    if parser is None:
        return UnknownMessage(type=msg_type, data=data)
    return parser(_Fields(data, msg_type))


def parse_text_frame(text: str | bytes) -> ComfyEvent:
    """A WebSocket text frame -> event; raises ProtocolError on bad input."""
    try:
        message = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, deep nesting
        raise ProtocolError(f"text frame is not valid JSON: {exc}") from None
    return parse_message(message)


# ---------------------------------------------------------------------------
# Binary frames

_U32: Final = struct.Struct(">I")


def _u32(frame: bytes, offset: int, what: str) -> int:
    if len(frame) < offset + 4:
        raise ProtocolError(f"binary frame truncated: no room for {what} ({len(frame)} bytes)")
    value: int = _U32.unpack_from(frame, offset)[0]
    return value


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"binary frame: {what} is not UTF-8") from None


def parse_binary_frame(frame: bytes) -> ComfyEvent:
    """A WebSocket binary frame -> event; raises ProtocolError on bad input."""
    event_type = _u32(frame, 0, "the event type")
    if event_type == PREVIEW_IMAGE:
        image_format = _u32(frame, 4, "the image format")
        media_type = _IMAGE_FORMATS.get(image_format)
        if media_type is None:
            raise ProtocolError(f"preview image: unknown image format {image_format}")
        return PreviewImage(media_type=media_type, image=bytes(frame[8:]))
    if event_type == TEXT:
        length = _u32(frame, 4, "the node id length")
        end = 8 + length
        if len(frame) < end:
            raise ProtocolError("progress text: node id runs past the end of the frame")
        return ProgressText(
            node_id=_utf8(frame[8:end], "node id"), text=_utf8(frame[end:], "progress text")
        )
    if event_type == PREVIEW_IMAGE_WITH_METADATA:
        length = _u32(frame, 4, "the metadata length")
        end = 8 + length
        if len(frame) < end:
            raise ProtocolError("preview metadata runs past the end of the frame")
        try:
            metadata = json.loads(frame[8:end])
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"preview metadata is not valid JSON: {exc}") from None
        meta = _Fields(metadata, "preview metadata")
        return PreviewImageWithMetadata(
            prompt_id=meta.opt_str("prompt_id"),
            node_id=meta.opt_str("node_id"),
            media_type=meta.opt_str("image_type") or "image/png",
            metadata=metadata,
            image=bytes(frame[end:]),
        )
    return UnknownBinary(event_type=event_type, payload=bytes(frame[4:]))


def parse_frame(frame: str | bytes) -> ComfyEvent:
    """Text frames arrive as `str`, binary frames as `bytes` (trio-websocket's convention)."""
    if isinstance(frame, str):
        return parse_text_frame(frame)
    return parse_binary_frame(frame)


# ---------------------------------------------------------------------------
# HTTP: POST /prompt


def prompt_request(
    graph: Mapping[str, Any], *, client_id: str, prompt_id: str, front: bool = False
) -> dict[str, Any]:
    """The POST /prompt body. We choose `prompt_id` so we can route before submitting."""
    body: dict[str, Any] = {"prompt": dict(graph), "client_id": client_id, "prompt_id": prompt_id}
    if front:
        body["front"] = True
    return body


@dataclass(frozen=True, slots=True)
class PromptAccepted:
    prompt_id: str
    number: int


@dataclass(frozen=True, slots=True)
class NodeError:
    node_id: str
    class_type: str | None
    messages: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PromptRejected:
    """ComfyUI's 400 for a prompt it refused, made readable."""

    error_type: str
    message: str  # one readable sentence for people
    node_errors: tuple[NodeError, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, hash=False, repr=False)
    named_node: str | None = None  # a node the error itself names ("Node ID '#2'")

    @property
    def node_id(self) -> str | None:
        """The node to blame: the first with errors, else the one the error names."""
        return self.node_errors[0].node_id if self.node_errors else self.named_node

    @property
    def class_type(self) -> str | None:
        return self.node_errors[0].class_type if self.node_errors else None

    @property
    def details(self) -> dict[str, Any]:
        """A JSON-able summary for our clients' error payloads."""
        return {
            "type": self.error_type,
            "nodeErrors": [
                {"nodeId": e.node_id, "classType": e.class_type, "errors": list(e.messages)}
                for e in self.node_errors
            ],
        }


def _json_body(body: bytes | str, what: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"{what} is not valid JSON: {exc}") from None


def _error_line(err: object) -> str:
    """'Required input is missing: delay' from one ComfyUI error entry."""
    f = _Fields(err, "node error")
    message = f.opt_str("message") or f.opt_str("type") or "error"
    details = f.opt_str("details")
    return f"{message}: {details}" if details else message


def parse_prompt_reply(status: int, body: bytes | str) -> PromptAccepted | PromptRejected:
    """A POST /prompt reply -> accepted or rejected; anything else is a ProtocolError."""
    if status == 200:
        f = _Fields(_json_body(body, "POST /prompt reply"), "POST /prompt reply")
        return PromptAccepted(prompt_id=f.text("prompt_id"), number=f.integer("number"))
    if status != 400:
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        raise ProtocolError(f"POST /prompt answered {status}: {text.strip()[:200]}")
    raw = _json_body(body, "POST /prompt error reply")
    f = _Fields(raw, "POST /prompt error reply")
    error = f.sub("error")
    node_errors = []
    raw_nodes = raw.get("node_errors") or {}
    if not isinstance(raw_nodes, dict):
        raise ProtocolError("POST /prompt error reply: 'node_errors' should be an object")
    for node_id, entry in raw_nodes.items():
        n = _Fields(entry, f"node_errors[{node_id!r}]")
        errors = n.array("errors")
        node_errors.append(
            NodeError(
                node_id=node_id,
                class_type=n.opt_str("class_type"),
                messages=tuple(_error_line(e) for e in errors),
            )
        )
    headline = error.opt_str("message") or "ComfyUI rejected the prompt"
    details = error.opt_str("details")
    parts = [headline.rstrip(".") + (f" ({details})" if details else "")]
    for e in node_errors:
        who = f"{e.class_type} (node {e.node_id})" if e.class_type else f"node {e.node_id}"
        parts.append(f"{who}: {'; '.join(e.messages)}")
    named = _NAMED_NODE.fullmatch(details.strip()) if details else None
    return PromptRejected(
        error_type=error.opt_str("type") or "unknown",
        message=". ".join(parts),
        node_errors=tuple(node_errors),
        raw=raw,
        named_node=named.group(1) if named else None,
    )


# An unknown class_type is an `invalid_prompt` with no node_errors whose details
# name the node: "Node ID '#2'" (FACTS.md, POST /prompt 400 replies).
_NAMED_NODE = re.compile(r"Node ID '#([^']{1,64})'")


# ---------------------------------------------------------------------------
# HTTP: GET /history/{prompt_id}


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """What ComfyUI remembers about a finished prompt."""

    prompt_id: str
    status_str: str | None  # "success" | "error"
    completed: bool
    images: tuple[ImageRef, ...]  # every output node's images, in node order
    error: ExecutionError | None = None
    interrupted: ExecutionInterrupted | None = None

    @property
    def succeeded(self) -> bool:
        return self.status_str == "success" and self.error is None and self.interrupted is None


def parse_history(body: object, prompt_id: str) -> HistoryEntry | None:
    """A GET /history/{id} body -> the entry, or None when ComfyUI does not know it.

    ComfyUI answers `{}` (200) for unknown, pending and running prompts alike.
    """
    top = _Fields(body, "history")
    if prompt_id not in top.raw:
        return None
    entry = top.sub(prompt_id)
    status = entry.sub("status") if entry.has("status") else None
    images: list[ImageRef] = []
    outputs = entry.obj("outputs") if entry.has("outputs") else {}
    for node_id in sorted(outputs, key=_node_order):
        images.extend(_images_of(_Fields(outputs[node_id], "output").raw, f"outputs[{node_id}]"))
    error: ExecutionError | None = None
    interrupted: ExecutionInterrupted | None = None
    if status is not None:
        messages = status.array("messages") if status.has("messages") else []
        for item in messages:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                raise ProtocolError("history status: each message should be [name, data]")
            name, data = item
            if name == "execution_error":
                error = _execution_error(_Fields(data, name))
            elif name == "execution_interrupted":
                interrupted = _execution_interrupted(_Fields(data, name))
    completed = status.raw.get("completed") if status is not None else False
    return HistoryEntry(
        prompt_id=prompt_id,
        status_str=status.opt_str("status_str") if status is not None else None,
        completed=completed is True,
        images=tuple(images),
        error=error,
        interrupted=interrupted,
    )


def _node_order(node_id: str) -> tuple[int, int | str]:
    """Numeric node ids in numeric order, others after them alphabetically."""
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)


# ---------------------------------------------------------------------------
# HTTP: GET /queue


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    running: tuple[str, ...]  # prompt ids
    pending: tuple[str, ...]  # prompt ids in the order ComfyUI will run them
    # prompt id -> place, made in one pass over both lists when first asked:
    # thousands of queued tasks each asking must not cost a scan each.
    _places: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)

    def position_of(self, prompt_id: str) -> QueuePosition | None:
        """Where a prompt stands, or None when it is in neither list."""
        places = self._places
        if places is None:
            places = {prompt_id: -1 for prompt_id in self.running}
            ahead = len(self.running)
            for index, pending_id in enumerate(self.pending):
                places.setdefault(pending_id, ahead + index)
            object.__setattr__(self, "_places", places)
        place = places.get(prompt_id)
        if place is None:
            return None
        if place < 0:
            return QueuePosition(running=True, ahead=0)
        return QueuePosition(running=False, ahead=place)


@dataclass(frozen=True, slots=True)
class QueuePosition:
    running: bool
    ahead: int  # prompts that will run (or are running) before this one

    @property
    def position(self) -> int:
        """1-based place in line; the running prompt is position 0."""
        return 0 if self.running else self.ahead + 1


QUEUE_LISTS: Final = ("queue_running", "queue_pending")
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
# What follows a queue item: the comma and the space before the next one, or the `]`.
_ITEM_END = re.compile(r"[ \t\n\r]*(?:(,)[ \t\n\r]*|\])")
_DECODER = json.JSONDecoder()


# The longest one queue item may be (its graph and extra_data), in characters: the
# reader holds at most one item, however long the queue (thousands of them are
# hundreds of MiB when each carries the workflow of ComfyUI's page).
QUEUE_ITEM_MAX_CHARS: Final = 16 * 1024 * 1024


class QueueReader:
    """A GET /queue body, decoded as it arrives, one queue item at a time.

    Each item carries its whole graph (and, queued from ComfyUI's page, the
    page's workflow in extra_data), so ComfyUI's answer for a long queue is
    megabytes to hundreds of megabytes. Only each item's number and prompt id
    are kept; the rest of an item is freed once decoded, and the text before
    it dropped: `feed` the body chunk by chunk as it arrives, then `end()`.
    What it holds at once is the chunk and one item, so the queue's length
    has no limit, only an item's (`max_item_chars`). Decoding a chunk takes
    about as long as it took to arrive (64 KiB: under a millisecond), so the
    caller lets others run between chunks. Errors are ProtocolError, naming
    what is wrong.
    """

    def __init__(self, *, max_item_chars: int = QUEUE_ITEM_MAX_CHARS) -> None:
        self._lists: dict[str, list[tuple[float, str]]] = {}
        self._max_item_chars = max_item_chars
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._text = ""  # what arrived and is not decoded yet
        self._arrived: list[str] = []  # and after it, until the text is `_wanted` long
        self._arrived_chars = 0
        self._wanted = 1
        self._dropped = 0  # characters before `_text` (positions in errors count them)
        self._final = False
        self._parser = self._decode()

    def feed(self, data: bytes) -> None:
        """The next chunk of the body."""
        try:
            text = self._utf8.decode(data)
        except UnicodeDecodeError:
            raise ProtocolError("queue: ComfyUI answered something that is not UTF-8") from None
        self.feed_text(text)

    def feed_text(self, text: str) -> None:
        """The next chunk of the body, decoded already."""
        self._arrived.append(text)
        self._arrived_chars += len(text)
        if len(self._text) + self._arrived_chars < self._wanted and not self._final:
            return  # (a long item: joined once, not copied again at every chunk)
        self._text = "".join([self._text, *self._arrived])
        self._arrived.clear()
        self._arrived_chars = 0
        # Runs until it needs more text (it returns only once the text is final).
        next(self._parser, None)

    def end(self) -> QueueSnapshot:
        """The body is complete: the snapshot it gives."""
        try:
            text = self._utf8.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ProtocolError("queue: ComfyUI answered something that is not UTF-8") from None
        self._final = True
        self.feed_text(text)
        for key in QUEUE_LISTS:
            if key not in self._lists:
                raise ProtocolError(f"queue: missing field {key!r}")
        running = [pid for _, pid in self._lists["queue_running"]]
        # Pending items come in heap order; ComfyUI runs them by number.
        pending = [pid for _, pid in sorted(self._lists["queue_pending"])]
        return QueueSnapshot(running=tuple(running), pending=tuple(pending))

    def _decode(self) -> Generator[None, None, None]:
        """Yields whenever it needs more text; positions are in `_text`."""
        pos = yield from self._token(0)
        pos = yield from self._token(self._expect(pos, "{", "a JSON object"))
        if self._text.startswith("}", pos):
            pos += 1
        else:
            while True:  # a field a round
                pos = yield from self._token((yield from self._field(pos)))
                if self._text.startswith("}", pos):
                    pos += 1
                    break
                pos = yield from self._token(self._expect(pos, ",", "',' or '}'"))
        pos = yield from self._token(pos)
        if pos != len(self._text):
            raise ProtocolError("queue: more after the JSON object")

    def _field(self, pos: int) -> Generator[None, None, int]:
        """One `"name": value` from `pos`, a queue list item by item; returns its end."""
        key, pos, end = yield from self._value(pos)
        if not isinstance(key, str):
            raise ProtocolError(f"queue: expected a field name at character {self._at(pos)}")
        pos = yield from self._token(end)
        pos = yield from self._token(self._expect(pos, ":", "':'"))
        if key not in QUEUE_LISTS:
            return (yield from self._value(pos))[2]  # a field we do not use
        if key in self._lists:
            raise ProtocolError(f"queue: field {key!r} twice")
        if not self._text.startswith("[", pos):
            value = (yield from self._value(pos))[0]
            got = type(value).__name__
            raise ProtocolError(f"queue: field {key!r} should be an array, got {got}")
        items = self._lists[key] = []
        pos = yield from self._token(pos + 1)
        if self._text.startswith("]", pos):
            return pos + 1
        while True:  # an item a round
            # Most items and the comma after them are in the text already: decoded
            # here without a generator for each step (10,000 items: 40% faster).
            text = self._text
            try:
                item, end = _DECODER.raw_decode(text, pos)
            except (ValueError, RecursionError):
                end = len(text)  # (cut short, or an error: told by the way below)
            if end >= len(text):
                item, _, end = yield from self._value(pos)
            items.append(_queue_item(item, key))
            after = _ITEM_END.match(self._text, end)
            if after is not None and (after[1] is None or after.end() < len(self._text)):
                if after[1] is None:
                    return after.end()  # past the list's `]`
                pos = after.end()
                continue
            pos = yield from self._token(end)
            if self._text.startswith("]", pos):
                return pos + 1
            pos = yield from self._token(self._expect(pos, ",", "',' or ']'"))

    def _token(self, pos: int) -> Generator[None, None, int]:
        """The position of the next character that is not JSON whitespace (the end
        of the text only once it is final)."""
        while True:
            pos = _skip(self._text, pos)
            if pos < len(self._text) or self._final:
                return pos
            pos = yield from self._more(pos, len(self._text) + 1)

    def _value(self, pos: int) -> Generator[None, None, tuple[Any, int, int]]:
        """The JSON value at `pos`: (value, its start, its end)."""
        while True:
            text = self._text
            try:
                value, end = _DECODER.raw_decode(text, pos)
            except ValueError as exc:  # (json.JSONDecodeError) maybe only cut short
                if self._final:
                    raise ProtocolError(f"queue: not JSON: {exc}") from None
            except RecursionError:
                raise ProtocolError("queue: nested too deeply") from None
            else:
                if end < len(text) or self._final:  # (a number may go on)
                    return value, pos, end
            # Tried again once the text is twice as long: a long item costs a
            # few decodes, not one per chunk.
            pos = yield from self._more(pos, pos + 2 * (len(text) - pos) + 1)

    def _more(self, pos: int, length: int) -> Generator[None, None, int]:
        """Drop the text before `pos` (decoded), and wait until the text reaches
        what was `length` (or is final): returns where `pos` is now."""
        undecoded = len(self._text) - pos
        if undecoded > self._max_item_chars:
            raise ProtocolError(
                f"queue: an item longer than {self._max_item_chars} characters"
                f" at character {self._at(pos)}"
            )
        self._dropped += pos
        self._text = self._text[pos:]
        self._wanted = length - pos
        while len(self._text) < self._wanted and not self._final:
            yield
        return 0

    def _expect(self, pos: int, char: str, what: str) -> int:
        """Past `char` at `pos`."""
        if not self._text.startswith(char, pos):
            raise ProtocolError(f"queue: expected {what} at character {self._at(pos)}")
        return pos + 1

    def _at(self, pos: int) -> int:
        """`pos` counted from the start of the body."""
        return self._dropped + pos


def _skip(text: str, pos: int) -> int:
    """Past JSON whitespace."""
    match = _JSON_SPACE.match(text, pos)
    assert match is not None  # (it matches the empty string)
    return match.end()


def _queue_item(item: object, key: str) -> tuple[float, str]:
    # [number, prompt_id, graph, extra_data, outputs_to_execute]
    if not (
        isinstance(item, list)
        and len(item) >= 2
        and isinstance(item[0], int | float)
        and not isinstance(item[0], bool)
        and isinstance(item[1], str)
    ):
        raise ProtocolError(f"queue: each {key} item should start with [number, prompt_id]")
    return (item[0], item[1])


def parse_queue(text: str) -> QueueSnapshot:
    """A GET /queue body, all at once."""
    reader = QueueReader(max_item_chars=len(text))
    reader.feed_text(text)
    return reader.end()


def graph_class_types(graph: Mapping[str, Any]) -> dict[str, str]:
    """node id -> class_type for a ComfyUI API-format graph (ids without one are skipped)."""
    out: dict[str, str] = {}
    for node_id, node in graph.items():
        # dict first: an isinstance check against the Mapping ABC is several times slower.
        if isinstance(node, dict | Mapping) and isinstance(node.get("class_type"), str):
            out[str(node_id)] = node["class_type"]
    return out
