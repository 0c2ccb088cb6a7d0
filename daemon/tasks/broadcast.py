"""Latest-snapshot broadcaster: one per task, any number of SSE readers.

A publisher never waits for a reader (trio-util `AsyncValue` semantics): it
replaces the latest snapshot and wakes whoever waits. A slow reader simply
skips to the newest snapshot when it next looks, which is fine because every
progress message is a complete snapshot. A terminal snapshot is the last one
ever published, so no reader can skip past it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from daemon.signals import Signal
from protocol import task
from protocol.sse import ServerSentEvent, encode_event


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One published task message, encoded for SSE once for all readers."""

    version: int
    event: str  # progress | complete | error-event
    payload: Mapping[str, Any] = field(hash=False)
    sse: bytes = field(repr=False)  # the encoded SSE event, id included
    terminal: bool = False
    # The same bytes as one HTTP/1.1 chunk, framed once for every chunked reader;
    # a terminal snapshot's chunk ends the chunked body too (the last-chunk).
    chunk: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        chunk = b"%x\r\n%b\r\n" % (len(self.sse), self.sse)
        object.__setattr__(self, "chunk", chunk + b"0\r\n\r\n" if self.terminal else chunk)


# One encoder for every snapshot (json.dumps with options builds one per call).
_to_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def encode_snapshot(message: task.TaskMessage) -> Snapshot:
    data = _to_json(message.payload)
    sse = encode_event(ServerSentEvent(data=data, event=message.event, id=str(message.version)))
    return Snapshot(
        version=message.version,
        event=message.event,
        payload=message.payload,
        sse=sse,
        terminal=message.is_terminal,
    )


@dataclass(frozen=True, slots=True)
class Unrendered:
    """A task's message not rendered yet: `state` as it stood at `now`."""

    state: task.TaskState
    now: float

    @property
    def version(self) -> int:
        return self.state.version

    @property
    def is_terminal(self) -> bool:
        return self.state.phase.is_terminal

    def message(self) -> task.TaskMessage:
        return task.render(self.state, self.now)


class Broadcaster:
    """Holds the latest snapshot of a task and wakes readers when it changes."""

    def __init__(self, first: task.TaskMessage | Unrendered | None = None) -> None:
        """`first`: the task's first message, rendered and encoded when first read
        (a new task's first snapshot is usually replaced, by its queue position,
        before anyone could ask for it: then it is never made)."""
        self._latest: Snapshot | None = None
        self._first = first
        # Most publishes have no waiter (the SSE hub is told through `watchers`):
        # a Signal makes its Event for the first waiter, not on every fire.
        self._changed = Signal()
        self.readers = 0  # SSE connections reading this task right now
        # Called (synchronously, never awaited) after each publish: the SSE hub
        # notes that this task has something new for its subscribers.
        self.watchers: list[Callable[[Broadcaster], None]] = []

    @property
    def latest(self) -> Snapshot | None:
        first = self._first
        if first is not None:
            message = first.message() if isinstance(first, Unrendered) else first
            self._latest, self._first = encode_snapshot(message), None
        return self._latest

    def publish(self, snapshot: Snapshot) -> None:
        """Replace the latest snapshot; never blocks, never awaits a reader."""
        previous: Snapshot | task.TaskMessage | Unrendered | None = (
            self._first if self._first is not None else self._latest
        )
        if previous is not None:
            terminal = previous.terminal if isinstance(previous, Snapshot) else previous.is_terminal
            if terminal:
                raise RuntimeError("a terminal snapshot must be the last one published")
            if snapshot.version <= previous.version:
                raise ValueError(
                    f"snapshot versions must rise: {snapshot.version} after {previous.version}"
                )
        self._latest, self._first = snapshot, None
        self._changed.fire()
        for watcher in self.watchers:
            watcher(self)

    async def wait_newer(self, version: int | None) -> Snapshot:
        """The latest snapshot newer than `version` (None: anything), waiting if needed."""
        while True:
            latest = self.latest
            if latest is not None and (version is None or latest.version > version):
                await trio.lowlevel.checkpoint()  # always a checkpoint, even on the fast path
                return latest
            await self._changed.wait()
