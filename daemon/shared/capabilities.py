"""What the workers' backends can run, published in Redis so a front (which has no
backend to ask) answers the capability 4xx of the pool too.

Each worker SETs `{p}:caps:{daemon}` (its backends' last readings) with an expiry
of a few leases and refreshes it with its leases: a dead worker's backends drop out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from daemon.comfy.capabilities import Capabilities, Needs


def capabilities_to_json(readings: Mapping[str, Capabilities]) -> bytes:
    return json.dumps(
        {
            name: {
                "present": sorted(r.present),
                "absent": sorted(r.absent),
                "checkpoints": sorted(r.checkpoints) if r.checkpoints is not None else None,
            }
            for name, r in readings.items()
        },
        separators=(",", ":"),
    ).encode()


def capabilities_from_json(raw: bytes) -> dict[str, Capabilities]:
    data: dict[str, Any] = json.loads(raw)
    return {
        name: Capabilities(
            frozenset(r["present"]),
            frozenset(r["absent"]),
            frozenset(r["checkpoints"]) if r["checkpoints"] is not None else None,
        )
        for name, r in data.items()
    }


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
