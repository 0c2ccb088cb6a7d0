"""The end of a task no worker holds (it waits in the service's queue), as a front
writes it: a cancel, or a wait no live worker could end (see wait_limit.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

from daemon.shared.store import SharedRecord
from daemon.tasks.restore import record_of
from protocol import task


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
    published: list[task.TaskMessage] = []
    for event in events:
        state, effects = task.apply(state, event, now)
        published += [e.message for e in effects if isinstance(e, task.Publish)]
    return WaitingEnd(SharedRecord(record_of(state, backend=None)), published[-1], state)
