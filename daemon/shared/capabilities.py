"""What the workers' backends can run, published in Redis so a front (which has no
backend to ask) answers the capability 4xx of the pool too.

Each worker SETs `{p}:caps:{daemon}` (its backends' last readings, and whether each
takes work now: connected and read) with an expiry of a few leases and refreshes it
with its leases: a dead worker's backends drop out (worker_registry.py lists the
live ones, so a reader need not scan Redis' keys). A front reads the readings for
its 422 (a ComfyUI away for a moment still counts) and the ready ones for how long
a waiting task may wait (see wait_limit.py).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

from daemon.comfy.capabilities import Capabilities, Needs


def capabilities_to_json(readings: Mapping[str, Capabilities], ready: Collection[str]) -> bytes:
    """`ready`: the backends that take work now."""
    return json.dumps(
        {
            name: {
                "present": sorted(r.present),
                "absent": sorted(r.absent),
                "checkpoints": sorted(r.checkpoints) if r.checkpoints is not None else None,
                "ready": name in ready,
            }
            for name, r in readings.items()
        },
        separators=(",", ":"),
    ).encode()


def capabilities_from_json(raw: bytes) -> dict[str, Capabilities]:
    data: dict[str, Any] = json.loads(raw)
    return {name: _reading(r) for name, r in data.items()}


def ready_from_json(raw: bytes) -> dict[str, Capabilities]:
    """The readings of the backends that take work now (a worker that did not say: all)."""
    data: dict[str, Any] = json.loads(raw)
    return {name: _reading(r) for name, r in data.items() if r.get("ready", True)}


def _reading(published: dict[str, Any]) -> Capabilities:
    checkpoints = published["checkpoints"]
    return Capabilities(
        frozenset(published["present"]),
        frozenset(published["absent"]),
        frozenset(checkpoints) if checkpoints is not None else None,
    )


def why_nowhere(readings: Mapping[str, Capabilities], needs: Needs) -> dict[str, str] | None:
    """What each published backend lacks, when every one lacks something; None when
    one can run it, or none was published yet (then the task waits in the queue)."""
    if not readings:
        return None
    reasons: dict[str, str] = {}
    for name, reading in readings.items():
        missing = reading.missing(needs)
        if missing is None:
            return None
        reasons[name] = missing
    return reasons
