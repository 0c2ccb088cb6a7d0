"""The newest preview image of each running task, in memory and bounded.

Only the newest preview of a task is worth keeping: a viewer wants to see the
image as it is now. Each task's preview is capped (`max_task_bytes`; a bigger
image is dropped), and all previews together are capped (`max_total_bytes`;
the previews that were updated longest ago are evicted first). A task's entry
goes when the task ends. Versions grow per task, eviction included, so a
version names one image for as long as the task runs.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass, field

DEFAULT_MAX_TASK_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_TOTAL_BYTES = 64 * 1024 * 1024
# Served with its own content type, so only image types a browser shows inline.
MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/webp"})


@dataclass(frozen=True, slots=True)
class Preview:
    version: int
    media_type: str  # "image/jpeg" | "image/png", as ComfyUI sent it
    data: bytes = field(repr=False)


class PreviewStore:
    """task_id -> its newest Preview."""

    def __init__(
        self,
        *,
        max_task_bytes: int = DEFAULT_MAX_TASK_BYTES,
        max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    ) -> None:
        # Versions restart with the process (a resumed task's first preview is 1
        # again): ETags carry this too, so a browser's cached image from before a
        # restart never revalidates as current.
        self.boot = secrets.token_hex(4)
        self.max_task_bytes = max_task_bytes
        self.max_total_bytes = max_total_bytes
        self._previews: OrderedDict[str, Preview] = OrderedDict()  # oldest update first
        self._versions: dict[str, int] = {}
        self.total_bytes = 0
        self.evicted = 0
        self.refused = 0

    def __len__(self) -> int:
        return len(self._previews)

    def put(self, task_id: str, media_type: str, data: bytes) -> int | None:
        """Keep `data` as the task's newest preview; its version, or None if refused
        (too big, or not an image type we serve)."""
        too_big = len(data) > min(self.max_task_bytes, self.max_total_bytes)
        if too_big or media_type not in MEDIA_TYPES:
            self.refused += 1
            return None
        version = self._versions.get(task_id, 0) + 1
        self._versions[task_id] = version
        self._remove(task_id)
        while self._previews and self.total_bytes + len(data) > self.max_total_bytes:
            oldest = next(iter(self._previews))
            self._remove(oldest)
            self.evicted += 1
        self._previews[task_id] = Preview(version, media_type, data)
        self.total_bytes += len(data)
        return version

    def get(self, task_id: str) -> Preview | None:
        return self._previews.get(task_id)

    def discard(self, task_id: str) -> None:
        """The attempt that sent the task's preview was lost: serve none until the next
        attempt sends one. The version counter stays, so versions still only grow."""
        self._remove(task_id)

    def drop(self, task_id: str) -> None:
        """The task ended: forget its preview and its version counter."""
        self._remove(task_id)
        self._versions.pop(task_id, None)

    def _remove(self, task_id: str) -> None:
        old = self._previews.pop(task_id, None)
        if old is not None:
            self.total_bytes -= len(old.data)
