"""At most `max_rate` preview announcements per second for one task; the newest wins.

ComfyUI may send a preview at every sampler step (dozens per second on a fast
GPU). Subscribers only need to hear of a new preview a few times per second:
each announcement is a snapshot for every viewer and an image fetch for some.
The first preview is announced at once; later ones wait for the end of the
interval, and only the newest one waiting is announced. Announcing is a
separate step from progress, so a progress tick is never held back by it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio


class PreviewThrottle:
    """`offer(version)` never blocks; `run()` calls `announce(version)` at a bounded rate."""

    def __init__(self, max_rate: float, announce: Callable[[int], None]) -> None:
        self.interval = 1.0 / max_rate if max_rate > 0 else math.inf
        self._announce = announce
        self._pending: int | None = None
        self._wakeup = trio.Event()

    def offer(self, version: int) -> None:
        """A newer preview exists; it replaces any still waiting."""
        self._pending = version
        self._wakeup.set()

    async def run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            version, self._pending = self._pending, None
            if version is None:
                continue
            self._announce(version)
            await trio.sleep(self.interval)
