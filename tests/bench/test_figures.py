"""The benchmark's summaries of repeated runs: which run a row reports, and what it says."""

from __future__ import annotations

from typing import Any

from bench.bench import median_run
from bench.figures import format_row


def _run(req_per_s: int, p99_ms: float, cpu_us: int, failed: int = 0) -> dict[str, Any]:
    return {
        "scenario": "generate",
        "shape": "POST /generate x 2000, 50 in flight, keep-alive, held queued",
        "answered_202": 2000 - failed,
        "failed": failed,
        "req_per_s": req_per_s,
        "latency": {"p50_ms": p99_ms / 2, "p99_ms": p99_ms, "max_ms": p99_ms + 1},
        "daemon_cpu_s": 1.0,
        "cpu_us_per_request": cpu_us,
        "client_cpu": 0.05,
        "client_saturated": False,
    }


def test_the_row_is_the_run_with_the_median_rate_whatever_the_order() -> None:
    runs = [_run(1800, 50.0, 560), _run(1300, 70.0, 780), _run(1500, 60.0, 650)]
    row = median_run(runs)
    assert row["req_per_s"] == 1500
    assert row["latency"]["p99_ms"] == 60.0  # the figures of that one run, not a mix
    assert row["cpu_us_per_request"] == 650
    assert [run["req_per_s"] for run in row["runs"]] == [1800, 1300, 1500]  # as they ran
    assert runs[2].get("runs") is None  # the run itself is left as it was


def test_an_even_count_reports_the_slower_of_the_middle_two() -> None:
    row = median_run([_run(1400, 60.0, 700), _run(1600, 55.0, 600)])
    assert row["req_per_s"] == 1400


def test_a_failure_in_any_run_shows_in_the_row() -> None:
    row = median_run(
        [_run(1500, 60.0, 650), _run(1700, 50.0, 600, failed=3), _run(1300, 70.0, 700)]
    )
    assert row["req_per_s"] == 1500
    assert row["failed"] == 3
    assert "3 failed" in format_row(row)


def test_the_printed_row_gives_the_range_of_the_runs() -> None:
    row = median_run([_run(1488, 57.03, 680), _run(1809, 68.01, 560), _run(1510, 60.0, 675)])
    text = format_row(row)
    assert "1510 req/s" in text
    spread = "median of 3 runs: 1488-1809 req/s, p99 57.03-68.01 ms, 560-680 us CPU per request"
    assert spread in text


def test_a_single_run_prints_no_range() -> None:
    text = format_row(median_run([_run(1500, 60.0, 650)]))
    assert "1500 req/s" in text
    assert "median of" not in text
