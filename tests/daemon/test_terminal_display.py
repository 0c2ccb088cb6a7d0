"""The terminal client's display, fed daemon messages on a fake clock (no I/O)."""

from __future__ import annotations

import io
from typing import Any

import pytest

from daemon.terminal.display import Display, Progress, RateEstimator, bar, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def message(
    step: str,
    value: float = 0,
    maximum: float = 0,
    *,
    overall: float = 50,
    eta: float | None = None,
    status: str = "in-progress",
    node: str | None = "3",
) -> dict[str, Any]:
    percentage = round(value / maximum * 100, 1) if maximum else 0
    return {
        "status": status,
        "progress": {
            "percentage": percentage,
            "currentStep": step,
            "currentValue": value,
            "maxValue": maximum,
            "overall": {"percentage": overall, "nodesDone": 3, "nodesTotal": 7},
            "etaSeconds": eta,
            "node": node,
        },
    }


@pytest.mark.parametrize(
    ("seconds", "round_up", "text"),
    [
        (0, False, "0:00"),
        (0.2, False, "0:00"),
        (0.2, True, "0:01"),
        (65, False, "1:05"),
        (3723, False, "1:02:03"),
        (-3, True, "0:00"),
    ],
)
def test_durations(seconds: float, round_up: bool, text: str) -> None:
    assert format_duration(seconds, round_up=round_up) == text


def test_bars() -> None:
    assert bar(0, unicode=False) == "[" + "-" * 20 + "]"
    assert bar(50, unicode=True) == "[" + "█" * 10 + "░" * 10 + "]"
    assert bar(250, unicode=False) == "[" + "#" * 20 + "]"


def test_progress_tolerates_missing_and_odd_fields() -> None:
    progress = Progress.from_payload({"progress": {"percentage": "a lot", "overall": None}})
    assert progress.step == "Working..."
    assert progress.node_percentage == 0
    assert progress.overall is None
    assert progress.eta is None
    # Until the task completes the bar stays below 100, even at 100% overall.
    assert Progress.from_payload(message("Saving image...", overall=100)).bar_percentage == 99
    done = Progress.from_payload(message("Complete", overall=100, status="completed"))
    assert done.bar_percentage == 100


def test_rate_estimate_starts_at_each_node() -> None:
    rates = RateEstimator()
    tick = Progress.from_payload
    assert rates.estimate(tick(message("Sampling image...", 2, 20)), 10.0) is None
    assert rates.estimate(tick(message("Sampling image...", 6, 20)), 12.0) == 7.0
    # Another node: no rate until it has ticked twice.
    assert rates.estimate(tick(message("Upscaling...", 1, 4, node="9")), 13.0) is None
    assert rates.estimate(tick(message("Upscaling...", 2, 4, node="9")), 14.0) == 2.0


def plain() -> tuple[Display, io.StringIO, Clock]:
    stream = io.StringIO()
    clock = Clock()
    return Display(stream, tty=False, clock=clock), stream, clock


def test_plain_lines_are_few_a_step_and_each_quarter() -> None:
    display, stream, clock = plain()
    display.update(message("Queued", overall=0))
    display.update(message("Loading model...", overall=14))
    display.update(message("Loading model...", overall=28))  # same step: nothing
    for value in range(1, 21):
        clock.now += 0.5
        display.update(message("Sampling image...", value, 20, overall=57 + value))
    display.update(message("Decoding image...", 20, 20, overall=85))
    clock.now += 1
    display.update(message("Complete", 20, 20, overall=100, status="completed"))
    assert stream.getvalue().splitlines() == [
        "[0:00] Queued (0%)",
        "[0:00] Loading model... (14%)",
        "[0:00] Sampling image... 1/20 (58%)",
        "[0:02] Sampling image... 5/20 (62%) ETA 0:08",
        "[0:05] Sampling image... 10/20 (67%) ETA 0:05",
        "[0:07] Sampling image... 15/20 (72%) ETA 0:03",
        "[0:10] Sampling image... 20/20 (77%) ETA 0:00",
        # The sampler's 20/20 is not the decoder's count: not shown.
        "[0:10] Decoding image... (85%)",
        "[0:11] Complete (100%)",
    ]


def test_the_daemons_eta_wins_and_counts_down_between_messages() -> None:
    display = Display(io.StringIO(), tty=True, clock=(clock := Clock()))
    display.update(message("Sampling image...", 4, 20, eta=12.0))
    assert "ETA 0:12" in display.line()
    clock.now += 5
    assert "ETA 0:07" in display.line()
    clock.now += 60
    assert "ETA 0:00" in display.line()


def test_a_terminal_gets_one_line_redrawn_and_notes_inside_it() -> None:
    stream = io.StringIO()  # no encoding: the bar is drawn in ASCII
    display = Display(stream, tty=True, clock=Clock())
    display.update(message("Sampling image...", 4, 20, overall=60))
    display.note("(reconnecting)")
    display.message("comfy-progress: something")
    before, second, rest = stream.getvalue().split("\r")
    assert before == ""
    assert second.startswith("Sampling image...   [############--------]   60%  4/20")
    assert second.endswith("\x1b[K")
    assert rest.endswith("(reconnecting)\x1b[K\ncomfy-progress: something\n")


def test_the_nodes_progress_text_follows_the_count_without_control_characters() -> None:
    clock = Clock()
    out = io.StringIO()
    display = Display(out, tty=True, clock=clock)
    payload = message("Sampling image...", 3, 20)
    payload["progress"]["text"] = "step 3/20\x1b[31m\nred"
    display.update(payload)
    assert "3/20  step 3/20 [31m red  (0:00)" in display.line()
    assert "\x1b[31m" not in out.getvalue()
    plain = io.StringIO()
    lines = Display(plain, tty=False, clock=clock)
    lines.update(payload)
    assert plain.getvalue().rstrip("\n").endswith(" · step 3/20 [31m red")
