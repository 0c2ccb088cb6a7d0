"""The end of a waiting task Redis forgot (restarted without its data, flushed).

A task no worker had taken yet lived only in Redis: once its record, its
stream and its place in the waiting set are gone, nobody would ever write its
end, and its viewers' streams would stay open on heartbeats. The front that
streams it writes that end (code `lost`) into a new stream, in one script that
writes only while the task is still gone everywhere: a worker that took it just
before and writes its next snapshot first wins, and then this end is not written.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Final

from daemon.shared.store import SharedStore, entry_id, payload_json
from protocol import task

# KEYS: record, events, waiting; ARGV: task id, entry id, event, payload, TTL.
END_IF_FORGOTTEN: Final = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 0 end
if redis.call('ZSCORE', KEYS[3], ARGV[1]) then return 0 end
redis.call('XADD', KEYS[2], ARGV[2], 'e', ARGV[3], 'p', ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 1
"""


def lost_end(
    task_id: str, version: int, created_at: float, now: float
) -> tuple[task.TaskState, task.TaskMessage]:
    """The error-event after `version` (the spec went with the record: only the id is
    left), and the ended state (for the ending front's metrics)."""
    spec = task.TaskSpec(task_id=task_id, prompt_id="", graph={})
    state = replace(task.new_task(spec, created_at), version=version)
    lost = task.Failed("lost", "The shared task store lost this task before a worker took it")
    state, effects = task.apply(state, lost, now)
    (message,) = [e.message for e in effects if isinstance(e, task.Publish)]
    return state, message


async def end_if_forgotten(
    store: SharedStore, task_id: str, version: int, created_at: float, now: float
) -> task.TaskState | None:
    """Write the task's `lost` end when Redis holds nothing of it any more: its ended
    state (created at `created_at`), or None when it was not written."""
    state, message = lost_end(task_id, version, created_at, now)
    written = await store.redis.eval(
        END_IF_FORGOTTEN,
        keys=[store.task_key(task_id), store.events_key(task_id), store.waiting_key],
        args=[
            task_id,
            entry_id(message.version),
            message.event,
            payload_json(message),
            int(store.retention) + 1,
        ],
    )
    return state if written == 1 else None
