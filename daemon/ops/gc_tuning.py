"""The cyclic garbage collector, set for a daemon that holds thousands of tasks.

CPython's defaults (700, 10, 10) collect the young generation every 700
allocations and, once the older ones have seen ten collections each, the
whole heap whenever it grew by a quarter. A daemon with thousands of queued
tasks (a few hundred tracked objects each) then spends a fifth of its CPU in
the collector under a burst of POST /generate (`make bench`, generate).
`tune_gc` freezes what exists once the daemon is built (modules, the workflow
catalog: scanned by every full collection, never garbage) and collects the
young generation less often; cycles are still collected.

A collection's pause grows with the objects it scans, and a request waiting
behind it waits that long. The middle generation holds what survived the
young collections since it was last collected: every 10 of them (CPython's
default) it took 24-52 ms with 2,000 tasks queued, and decided POST
/generate's p99. Collected every 3, it takes 8-23 ms for the same total
work; a full collection comes after 30 of those, about as often as before.
"""

from __future__ import annotations

import gc
from typing import Final

YOUNG_THRESHOLD: Final = 10_000  # allocations between young collections (a few ms each)
MIDDLE_THRESHOLD: Final = 3  # young collections between two of the middle generation
OLDEST_THRESHOLD: Final = 30  # middle collections before a full one (if the heap grew by 1/4)


def tune_gc() -> None:
    """Call once, after the daemon is built and before it serves."""
    gc.collect()  # what start-up left behind, before the survivors are frozen
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, OLDEST_THRESHOLD)
