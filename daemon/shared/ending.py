"""The end of a task no worker holds (it waits in the service's queue), as a front
writes it: a cancel, or a wait no live worker could end (see wait_limit.py); and a
cancel that a worker giving the task back to the queue found asked (worker.py). The
end of an orphan (its worker left it mid-run) follows the state its record holds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Final, NamedTuple

from daemon.shared.store import SharedRecord, SharedStore
from daemon.tasks.broadcast import Snapshot
from daemon.tasks.restore import record_of
from protocol import task

VERSION_RETRIES: Final = 3  # a queue position appended meanwhile: read and try again


class WaitingEnd(NamedTuple):
    record: SharedRecord
    message: task.TaskMessage  # the last snapshot
    state: task.TaskState  # for the ending front's metrics


def ended_while_waiting(
    shared: SharedRecord, version: int, events: Sequence[task.TaskEvent], now: float
) -> WaitingEnd:
    """The task's record and last snapshot after `events`, following the stream's
    newest version `version` (no holder, no backend: it never left the queue)."""
    record = shared.record
    state = replace(
        task.new_task(task.spec_from_json(record.spec), record.created_at), version=version
    )
    return _after(state, events, now)


def ended_after_its_worker(
    shared: SharedRecord, version: int, events: Sequence[task.TaskEvent], now: float
) -> WaitingEnd:
    """As `ended_while_waiting`, for a task its worker left mid-run (an orphan): from
    the state the worker last wrote in its record (when it started, the nodes done, its
    overall progress), so the end shows how far the task got, as a worker's would."""
    record = shared.record
    kept = task.state_from_json(task.spec_from_json(record.spec), record.state)
    return _after(replace(kept, version=version), events, now)


def _after(state: task.TaskState, events: Sequence[task.TaskEvent], now: float) -> WaitingEnd:
    published: list[task.TaskMessage] = []
    for event in events:
        state, effects = task.apply(state, event, now)
        published += [e.message for e in effects if isinstance(e, task.Publish)]
    return WaitingEnd(SharedRecord(record_of(state, backend=None)), published[-1], state)


async def cancel_waiting(
    store: SharedStore, shared: SharedRecord, latest: Snapshot, now: float
) -> WaitingEnd | Snapshot | None:
    """End a waiting task `cancelled`, in one step that writes only while it still
    waits (a worker's take excludes it). The end written; the task's own end when it
    ended meanwhile; None when it does not wait (a worker holds it)."""
    for _ in range(VERSION_RETRIES):
        end = ended_while_waiting(
            shared,
            latest.version,
            [task.CancelRequested(), task.Cancelled("cancelled before it reached ComfyUI")],
            now,
        )
        done = await store.end_waiting(end.record, end.message, after=latest.version)
        if done == 1:
            return end
        if done == 0:
            return None
        # A front appended a queue position meanwhile: build the end again.
        latest = await store.latest(shared.record.task_id) or latest
        if latest.terminal:
            return latest
    return None


async def cancel_in_line(store: SharedStore, task_id: str, now: float) -> WaitingEnd | None:
    """After a cancel key was set: end the task `cancelled` if it waits in line with no
    holder (its worker gave it back without seeing the key). The end written, or None
    (a worker holds it and reads the key, or it has ended)."""
    shared = await store.load(task_id)
    latest = await store.latest(task_id)
    if shared is None or latest is None or latest.terminal or shared.holder is not None:
        return None
    found = await cancel_waiting(store, shared, latest, now)
    return found if isinstance(found, WaitingEnd) else None
