"""GET /queue: parsing and queue positions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, SupportsIndex

from protocol.comfy import QueuePosition, QueueSnapshot, parse_queue


def test_positions_follow_comfyuis_order() -> None:
    body = {
        "queue_running": [[7, "run", {}, {}, []]],
        "queue_pending": [[9, "late", {}, {}, []], [8, "early", {}, {}, []]],
    }
    snapshot = parse_queue(body)
    assert snapshot.position_of("run") == QueuePosition(running=True, ahead=0)
    assert snapshot.position_of("early") == QueuePosition(running=False, ahead=1)
    assert snapshot.position_of("late") == QueuePosition(running=False, ahead=2)
    assert snapshot.position_of("late").position == 3  # type: ignore[union-attr]
    assert snapshot.position_of("gone") is None


class CountingIds(tuple[str, ...]):
    """Prompt ids that count every pass over them (a scan per lookup is quadratic)."""

    passes = 0

    def __iter__(self) -> Iterator[str]:
        CountingIds.passes += 1
        return super().__iter__()

    def __contains__(self, item: object) -> bool:
        CountingIds.passes += 1
        return super().__contains__(item)

    def index(self, value: Any, start: SupportsIndex = 0, stop: SupportsIndex = 2**63 - 1) -> int:
        CountingIds.passes += 1
        return super().index(value, start, stop)


def test_every_position_of_a_reading_costs_one_pass() -> None:
    """8,000 queued tasks asking each took a list.index each: quadratic."""
    pending = CountingIds(f"p{i}" for i in range(2000))
    running = CountingIds(["r"])
    CountingIds.passes = 0
    snapshot = QueueSnapshot(running=running, pending=pending)
    positions = [snapshot.position_of(f"p{i}") for i in range(2000)]
    assert positions[1999] == QueuePosition(running=False, ahead=2000)
    assert snapshot.position_of("r") == QueuePosition(running=True, ahead=0)
    assert CountingIds.passes <= 2  # one over the running prompts, one over the pending
