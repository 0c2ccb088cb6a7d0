"""GET/POST /history storage: in memory, oldest first, bounded like ComfyUI's."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import trio

from daemon.simulator.prompt_queue import QueueItem


class History:
    """Finished prompts by prompt_id, in completion order."""

    def __init__(self, max_items: int = 10_000) -> None:
        self._max = max_items
        self._entries: dict[str, dict[str, Any]] = {}
        self._stored = trio.Event()  # set (and replaced) whenever an entry is written

    def store(self, item: QueueItem, status: dict[str, Any], result: dict[str, Any]) -> None:
        """Write {prompt, outputs, status, meta} for a finished prompt."""
        if len(self._entries) > self._max:
            self._entries.pop(next(iter(self._entries)))
        entry: dict[str, Any] = {"prompt": item.as_json(), "outputs": {}, "status": status}
        entry.update(result)
        self._entries[item.prompt_id] = copy.deepcopy(entry)
        self._stored.set()
        self._stored = trio.Event()

    async def wait_for(self, prompt_id: str) -> None:
        """Return once `prompt_id` has an entry (for tests and the soak's bookkeeping)."""
        while prompt_id not in self._entries:
            await self._stored.wait()

    def get(self, prompt_id: str) -> dict[str, Any]:
        """`{P: entry}`, or `{}` for an unknown id (never a 404)."""
        if prompt_id in self._entries:
            return {prompt_id: self._entries[prompt_id]}
        return {}

    def list(self, max_items: int | None, offset: int) -> dict[str, Any]:
        """GET /history?max_items=&offset= (offset -1: the newest max_items, oldest first)."""
        if offset < 0 and max_items is not None:
            offset = len(self._entries) - max_items
        out: dict[str, Any] = {}
        for i, (key, entry) in enumerate(self._entries.items()):
            if i >= offset:
                out[key] = entry
                if max_items is not None and len(out) >= max_items:
                    break
        return out

    def delete(self, prompt_id: Any) -> None:
        """Forget one entry (unknown ids are fine)."""
        with contextlib.suppress(TypeError):  # an unhashable id matches nothing
            self._entries.pop(prompt_id, None)

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()

    def __contains__(self, prompt_id: object) -> bool:
        return prompt_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)
