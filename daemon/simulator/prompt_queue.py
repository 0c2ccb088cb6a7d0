"""ComfyUI's PromptQueue: a heap ordered by `number` (front=true is negative)."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio


@dataclass(frozen=True)
class QueueItem:
    """One accepted prompt; `sensitive` extra_data keys never show in /queue or history."""

    number: int | float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: Any
    outputs: list[str]
    sensitive: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> list[Any]:
        """`[number, prompt_id, graph, extra_data, outputs]`, as in /queue and history."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


class PromptQueue:
    """Pending prompts (a heap) and the running one; `on_change` broadcasts status."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        # (number, prompt_id, seq, item): ties on number break on prompt_id as in
        # ComfyUI's tuple heap; seq keeps the item itself out of comparisons.
        self._heap: list[tuple[int | float, str, int, QueueItem]] = []
        self._seq = 0
        self._running: dict[int, QueueItem] = {}
        self._task_counter = 0
        self._wakeup = trio.Event()
        self.most = 0  # the most prompts it ever held at once (running and pending)

    def put(self, item: QueueItem) -> None:
        """Queue a prompt and announce the new length."""
        heapq.heappush(self._heap, (item.number, item.prompt_id, self._seq, item))
        self._seq += 1
        self.most = max(self.most, self.remaining())
        self._on_change()
        self._wakeup.set()

    async def get(self) -> tuple[QueueItem, int]:
        """Wait for a prompt, mark it running (announced: running still counts)."""
        while not self._heap:
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        item = heapq.heappop(self._heap)[3]
        task_id = self._task_counter
        self._task_counter += 1
        self._running[task_id] = item
        self._on_change()
        return item, task_id

    def finish(self, task_id: int) -> QueueItem | None:
        """The running prompt is done (the caller writes history, then announces)."""
        return self._running.pop(task_id, None)

    def remaining(self) -> int:
        """queue_remaining: pending plus running."""
        return len(self._heap) + len(self._running)

    def running(self) -> list[QueueItem]:
        """The prompts being executed (zero or one)."""
        return list(self._running.values())

    def pending(self) -> list[QueueItem]:
        """Pending prompts in heap order (not sorted), as /queue shows them."""
        return [entry[3] for entry in self._heap]

    def wipe(self) -> None:
        """{"clear": true}: drop every pending prompt (announced even if empty)."""
        self._heap = []
        self._on_change()

    def delete(self, prompt_id: Any) -> bool:
        """Remove one pending prompt; the running one cannot be deleted."""
        for index, entry in enumerate(self._heap):
            if entry[1] == prompt_id:
                if len(self._heap) == 1:
                    self.wipe()  # ComfyUI announces twice in this case
                else:
                    self._heap.pop(index)
                    heapq.heapify(self._heap)
                self._on_change()
                return True
        return False

    def forget(self) -> None:
        """Lose pending and running prompts silently (a restart)."""
        self._heap = []
        self._running.clear()
