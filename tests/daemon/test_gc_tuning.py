"""The daemon's collector settings: start-up objects frozen, young collections rarer."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from daemon.ops.gc_tuning import MIDDLE_THRESHOLD, OLDEST_THRESHOLD, YOUNG_THRESHOLD, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_freezes_what_exists_and_raises_the_young_threshold() -> None:
    survivor = [object()]  # a list: tracked by the collector
    tune_gc()
    assert gc.get_freeze_count() > 0
    assert not any(o is survivor for o in gc.get_objects())  # frozen: no longer scanned
    assert gc.get_threshold() == (YOUNG_THRESHOLD, MIDDLE_THRESHOLD, OLDEST_THRESHOLD)


@pytest.mark.usefixtures("restored_gc")
def test_cycles_made_after_tuning_are_still_collected() -> None:
    tune_gc()

    class Node:
        other: object = None

    first, second = Node(), Node()
    first.other, second.other = second, first
    del first, second
    assert gc.collect() > 0
