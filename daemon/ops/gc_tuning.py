"""The cyclic garbage collector, set for a daemon that holds thousands of tasks.

CPython's defaults (700, 10, 10) collect the young generation every 700
allocations and, once the older ones have seen ten collections each, the
whole heap whenever it grew by a quarter. A daemon with thousands of queued
tasks (a few hundred tracked objects each) then spends a fifth of its CPU in
the collector under a burst of POST /generate (`make bench`, generate).
`tune_gc` freezes what exists once the daemon is built (modules, the workflow
catalog: scanned by every full collection, never garbage) and collects the
young generation less often; cycles are still collected.
"""

from __future__ import annotations

import gc
from typing import Final

YOUNG_THRESHOLD: Final = 10_000  # allocations between young collections (a few ms each)
OLDER_THRESHOLD: Final = 10  # collections of a generation before the next one is collected


def tune_gc() -> None:
    """Call once, after the daemon is built and before it serves."""
    gc.collect()  # what start-up left behind, before the survivors are frozen
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, OLDER_THRESHOLD, OLDER_THRESHOLD)
