"""How often a task may publish: a token bucket over the Trio clock.

Every publish is written to every reader, so a burst of ComfyUI frames
(thousands in a few milliseconds) must not become thousands of fan-outs.
A task may publish `burst` times back to back (a node change and its first
step arrive together and both show at once), then at most `rate` times a
second; what arrives in between is applied to the state and goes out with
the next publish. Real sampler steps are far slower than `rate`, so they
are never held back.
"""

from __future__ import annotations

from typing import Final

PUBLISH_RATE: Final = 100.0  # publishes per second, sustained
PUBLISH_BURST: Final = 4.0  # publishes back to back before the rate applies


class PublishPacer:
    """A token bucket: `delay(now)` says how long until a publish is due."""

    def __init__(self, *, rate: float = PUBLISH_RATE, burst: float = PUBLISH_BURST) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = float("-inf")

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def delay(self, now: float) -> float:
        """Seconds until the next publish may go out (0: now)."""
        self._refill(now)
        missing = 1.0 - self._tokens
        return missing / self.rate if missing > 1e-9 else 0.0  # 1e-9: float rounding

    def published(self, now: float) -> None:
        """A publish went out at `now` (allowed or not: a terminal one always goes)."""
        self._refill(now)
        self._tokens = max(0.0, self._tokens - 1.0)
