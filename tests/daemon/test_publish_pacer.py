"""The publish pacer: a few publishes back to back, then at most `rate` per second."""

from __future__ import annotations

import pytest

from daemon.tasks.publish_pacer import PublishPacer


def test_a_burst_goes_out_at_once_then_the_rate_applies() -> None:
    pacer = PublishPacer(rate=100.0, burst=4.0)
    for _ in range(4):
        assert pacer.delay(10.0) == 0.0
        pacer.published(10.0)
    assert pacer.delay(10.0) == pytest.approx(0.01)
    assert pacer.delay(10.005) == pytest.approx(0.005)
    assert pacer.delay(10.01) == 0.0


def test_steps_slower_than_the_rate_are_never_held() -> None:
    pacer = PublishPacer(rate=100.0, burst=4.0)
    now = 0.0
    for _ in range(1000):
        assert pacer.delay(now) == 0.0
        pacer.published(now)
        now += 0.02  # 50 steps a second


def test_a_publish_that_had_to_go_out_early_is_paid_for_later() -> None:
    pacer = PublishPacer(rate=100.0, burst=1.0)
    pacer.published(0.0)
    pacer.published(0.0)  # e.g. the terminal event, never held back
    assert pacer.delay(0.0) == pytest.approx(0.01)
