"""GET /backends: each ComfyUI of the pool as an operator sees it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from protocol.task import Phase

if TYPE_CHECKING:
    from daemon.comfy.dispatch import Dispatcher
    from daemon.comfy.pool import BackendPool
    from daemon.tasks.actor import TaskActor


def backends_json(
    pool: BackendPool, dispatcher: Dispatcher, tasks: Iterable[TaskActor]
) -> dict[str, Any]:
    running: dict[str, list[str]] = {}
    assigned: dict[str, int] = {}
    for actor in tasks:
        name = actor.backend_name
        if name is None or actor.is_done():
            continue
        assigned[name] = assigned.get(name, 0) + 1
        if actor.state.phase is Phase.RUNNING:
            running.setdefault(name, []).append(actor.task_id)
    out = []
    for backend in pool.backends:
        reading = pool.capabilities.get(backend.name)
        out.append(
            {
                "url": backend.name,
                "connected": backend.is_connected(),
                "queueDepth": backend.queue_remaining,
                "load": backend.load(),
                "tasks": assigned.get(backend.name, 0),
                "runningTasks": running.get(backend.name, []),
                "reconnects": backend.reconnects,
                "lastError": backend.last_error or None,
                "capabilities": reading.to_json() if reading is not None else None,
            }
        )
    return {
        "backends": out,
        "waiting": len(dispatcher),
        "maxPending": dispatcher.max_pending,
    }
