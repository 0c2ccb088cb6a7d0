"""The benchmark's figures: percentiles, profile summaries, one printed row per scenario."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms_summary(samples: Sequence[float]) -> dict[str, float | None]:
    """p50, p99 and max in ms; None without samples (e.g. every subscriber
    skipped the last step: latency then has nothing to say)."""
    if not samples:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "p50_ms": round(percentile(samples, 0.50) * 1000, 2),
        "p99_ms": round(percentile(samples, 0.99) * 1000, 2),
        "max_ms": round(max(samples) * 1000, 2),
    }


def summarise_profile(path: Path, top: int = 15) -> list[str]:
    """The functions that held the CPU most (self time), from py-spy's raw output."""
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        leaf = stack.rsplit(";", 1)[-1]
        own[leaf] = own.get(leaf, 0) + int(count)
        total += int(count)
    ranked = sorted(own.items(), key=lambda item: -item[1])[:top]
    return [f"{count / total:6.1%}  {leaf}" for leaf, count in ranked]


def format_row(row: dict[str, Any]) -> str:
    name = row["scenario"]
    if name == "floor":
        return (
            f"{name:<24} {row['shape']}: {row['cpu_us_per_write']} us CPU per write "
            f"({row['cpu_us_per_write_unread']} us to a reader that never reads: no wake-ups; "
            f"{row['cpu_us_per_write_unix']} us over Unix sockets)"
        )
    if name == "idle":
        probe = row["new_requests"]
        return (
            f"{name:<24} {row['shape']}: RSS {row['rss_before_kib'] / 1024:.1f} -> "
            f"{row['rss_after_kib'] / 1024:.1f} MiB, {row['kib_per_stream']} KiB per stream; "
            f"new request p50 {probe['p50_ms']} ms p99 {probe['p99_ms']} ms "
            f"({probe['count']} probes, {probe['failed']} failed)"
        )
    if name.startswith("generate"):
        lat = row["latency"]
        return (
            f"{name}\n{'':<24} {row['shape']}: {row['req_per_s']} req/s, p50 {lat['p50_ms']} ms "
            f"p99 {lat['p99_ms']} ms max {lat['max_ms']} ms, {row['failed']} failed; "
            f"daemon {row['cpu_us_per_request']} us CPU per request; client CPU {row['client_cpu']}"
            + (" (client-saturated)" if row["client_saturated"] else "")
            + _spread_of_runs(row.get("runs", []))
        )
    lat, fresh = row["latency"], row["freshness"]
    text = (
        f"{name:<24} {row['shape']}: latency p50 {lat['p50_ms']} p99 {lat['p99_ms']} "
        f"max {lat['max_ms']} ms; freshness p50 {fresh['p50_ms']} p99 {fresh['p99_ms']} "
        f"max {fresh['max_ms']} ms; delivered {row['delivered']}/{row['expected']} "
        f"({row['events_per_s']}/s), {row['completed']}/{row['subscribers']} complete, "
        f"min seen {row['min_seen_share']:.0%}; daemon {row['daemon_cpu_s']} s CPU = "
        f"{row['cpu_us_per_event']} us/event; client CPU {row['client_cpu']}"
        + (" (client-saturated)" if row["client_saturated"] else "")
        + f"; machine {row['machine_busy']:.0%} busy"
        + (" (machine-saturated)" if row["machine_saturated"] else "")
    )
    if "nginx_cpu_us_per_event" in row:
        text += (
            f"; nginx {row['nginx_cpu_us_per_event']} us/event, daemon and nginx "
            f"{row['relay_cpu_us_per_event']} us/event"
        )
    if "slowest_step" in row:
        slow = row["slowest_step"]
        text += f"; slowest step: task {slow['task']} step {slow['step']}, p50 {slow['p50_ms']} ms"
    text += f"; RSS +{row['kib_per_open_stream']} KiB per open stream"
    if "new_requests" in row:
        probe = row["new_requests"]
        text += (
            f"; new request p50 {probe['p50_ms']} p99 {probe['p99_ms']} ms "
            f"({probe['failed']}/{probe['count']} failed)"
        )
    return text


def _spread_of_runs(runs: list[dict[str, Any]]) -> str:
    """What the runs of a repeated shape ranged over (the row is their median run)."""
    if len(runs) < 2:
        return ""

    def span(key: str) -> str:
        values = sorted(run[key] for run in runs)
        return f"{values[0]}-{values[-1]}"

    return (
        f"\n{'':<24} median of {len(runs)} runs: {span('req_per_s')} req/s, "
        f"p99 {span('p99_ms')} ms, {span('cpu_us_per_request')} us CPU per request"
    )
