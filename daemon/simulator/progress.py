"""The per-prompt progress registry behind `progress_state` frames.

Value types are part of the wire format: a started node is `0.0/1.0` (floats), a
ticking node carries the node's ints, a finished node has value = max, and a
cached output node that never started finishes as `1/1` (ints) (s1, s2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ProgressRegistry:
    """Per-node progress of one prompt; every change publishes a full snapshot."""

    def __init__(self, prompt_id: str, publish: Callable[[dict[str, Any]], None]) -> None:
        self.prompt_id = prompt_id
        self._publish = publish
        self._nodes: dict[str, dict[str, Any]] = {}

    def _entry(self, node_id: str) -> dict[str, Any]:
        if node_id not in self._nodes:
            self._nodes[node_id] = {"state": "pending", "value": 0, "max": 1}
        return self._nodes[node_id]

    def start(self, node_id: str) -> None:
        """The node begins executing."""
        entry = self._entry(node_id)
        entry.update(state="running", value=0.0, max=1.0)
        self._publish(self.snapshot())

    def update(self, node_id: str, value: Any, max_value: Any) -> None:
        """A progress tick."""
        entry = self._entry(node_id)
        entry.update(state="running", value=value, max=max_value)
        self._publish(self.snapshot())

    def finish(self, node_id: str) -> None:
        """The node is done (executed, or served from the cache)."""
        entry = self._entry(node_id)
        entry.update(state="finished", value=entry["max"])
        self._publish(self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        """`progress_state` data: every node that is not pending, in start order."""
        nodes = {
            node_id: {
                "value": entry["value"],
                "max": entry["max"],
                "state": entry["state"],
                "node_id": node_id,
                "prompt_id": self.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            }
            for node_id, entry in self._nodes.items()
            if entry["state"] != "pending"
        }
        return {"prompt_id": self.prompt_id, "nodes": nodes}

    def states(self) -> dict[str, dict[str, Any]]:
        """{"state", "value", "max"} of every known node."""
        return {node_id: dict(entry) for node_id, entry in self._nodes.items()}
