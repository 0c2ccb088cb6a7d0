"""GET /backends: each ComfyUI of the pool as an operator sees it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from protocol.task import Phase

if TYPE_CHECKING:
    from daemon.app import App


def backends_json(app: App) -> dict[str, Any]:
    running: dict[str, list[str]] = {}
    assigned: dict[str, int] = {}
    for actor in app.registry.actors():
        name = actor.backend_name
        if name is None or actor.is_done():
            continue
        assigned[name] = assigned.get(name, 0) + 1
        if actor.state.phase is Phase.RUNNING:
            running.setdefault(name, []).append(actor.task_id)
    pool = app.pool
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
        "waiting": len(app.dispatcher),
        "maxPending": app.dispatcher.max_pending,
    }
