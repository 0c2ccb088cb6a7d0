"""The metrics adapter over prometheus-client, read back by Prometheus' own parser."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from daemon.ops import metrics
from daemon.ops.prometheus import MetricSpec, ScrapeCollector, counter, exposition, histogram
from tests.daemon.harness import running_daemon

AWKWARD = 'back\\slash "quoted"\nnew line, ümlaut {braces} =equals'


def parse(text: bytes) -> dict[str, object]:
    return {family.name: family for family in text_string_to_metric_families(text.decode())}


def test_prometheus_client_is_a_runtime_dependency() -> None:
    requirements = metadata.requires("comfy-progress") or []
    runtime = [r for r in requirements if "extra ==" not in r]
    assert any(r.startswith("prometheus-client") for r in runtime), requirements


def test_help_and_label_values_round_trip_through_the_parser() -> None:
    spec = MetricSpec("demo_things_total", "counter", AWKWARD, ("what",))
    things = counter(spec)
    things.labels(AWKWARD).inc(2)
    things.labels("plain").inc()
    registry = CollectorRegistry()
    registry.register(things)
    text = exposition(registry)
    # HELP, TYPE and one line per sample: the newline inside the value is escaped.
    assert text.count(b"\n") == 4
    [family] = text_string_to_metric_families(text.decode())
    assert family.name == "demo_things"  # the parser drops a counter's _total
    assert family.type == "counter"
    assert family.documentation == AWKWARD
    assert {s.labels["what"]: s.value for s in family.samples} == {AWKWARD: 2.0, "plain": 1.0}
    assert all(s.name == "demo_things_total" for s in family.samples)  # no _created series


def test_histogram_buckets_are_cumulative_and_end_at_inf() -> None:
    seconds = histogram(MetricSpec("demo_seconds", "histogram", "how long", ("outcome",)), (1, 5))
    seconds.labels("error")
    for value in (0.5, 1.0, 4.0, 7.0, 700.0):
        seconds.labels("completed").observe(value)
    registry = CollectorRegistry()
    registry.register(seconds)
    family = parse(exposition(registry))["demo_seconds"]
    samples = family.samples  # type: ignore[attr-defined]
    completed = [s for s in samples if s.labels["outcome"] == "completed"]
    buckets = {s.labels["le"]: s.value for s in completed if s.name == "demo_seconds_bucket"}
    assert buckets == {"1.0": 2, "5.0": 3, "+Inf": 5}
    by_name = {s.name: s.value for s in completed if s.name != "demo_seconds_bucket"}
    assert by_name == {"demo_seconds_sum": 712.5, "demo_seconds_count": 5}
    # A declared label set is shown with zeros before anything is observed.
    errors = [s for s in samples if s.labels["outcome"] == "error"]
    assert {s.value for s in errors} == {0}
    assert len(errors) == 3 + 2


def test_scrape_collector_reads_its_values_at_each_scrape() -> None:
    up = MetricSpec("demo_up", "gauge", "up or not", ("backend",))
    state: dict[tuple[str, ...], float] = {("http://b:1",): 0.0, ("http://a:1",): 1.0}
    registry = CollectorRegistry()
    registry.register(ScrapeCollector(up, lambda: state))
    assert registry.get_sample_value("demo_up", {"backend": "http://a:1"}) == 1
    state[("http://a:1",)] = 0.0
    assert registry.get_sample_value("demo_up", {"backend": "http://a:1"}) == 0
    lines = exposition(registry).decode().splitlines()
    assert lines == [
        "# HELP demo_up up or not",
        "# TYPE demo_up gauge",
        'demo_up{backend="http://a:1"} 0.0',
        'demo_up{backend="http://b:1"} 0.0',
    ]


async def test_each_daemon_has_its_own_registry(tmp_path: Path) -> None:
    requests = metrics.PREFIX + "http_requests_total"
    healthz = {"method": "GET", "route": "/healthz", "status": "200"}
    async with (
        running_daemon(tmp_path / "one") as one,
        running_daemon(tmp_path / "two") as two,
    ):
        for _ in range(3):
            assert (await one.request("GET", "/healthz")).status == 200
        assert (await two.request("GET", "/healthz")).status == 200
        assert isinstance(one.app.metrics.registry, CollectorRegistry)
        assert one.app.metrics.registry.get_sample_value(requests, healthz) == 3
        assert two.app.metrics.registry.get_sample_value(requests, healthz) == 1
    # Nothing goes to the library's global registry.
    assert REGISTRY.get_sample_value(requests, healthz) is None


@pytest.mark.parametrize(
    ("name", "kind", "labels"),
    [
        ("bad-name", "gauge", ()),
        ("ok", "gauge", ("bad-label",)),
        ("ok", "gauge", ("__reserved",)),
        ("ok", "gauge", ("a", "a")),
        ("no_total_suffix", "counter", ()),
        ("ok", "histogram", ("le",)),
    ],
)
def test_bad_specs_are_refused(name: str, kind: str, labels: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        MetricSpec(name, kind, "help", labels)  # type: ignore[arg-type]


def test_misuse_is_refused() -> None:
    gauge = MetricSpec("demo_g", "gauge", "h", ("a",))
    with pytest.raises(ValueError, match="not a counter"):
        counter(gauge)
    with pytest.raises(ValueError, match="not a histogram"):
        histogram(gauge, (1,))
    registry = CollectorRegistry()
    registry.register(ScrapeCollector(gauge, lambda: {(): 1.0}))
    with pytest.raises(ValueError, match="takes labels"):
        exposition(registry)
