"""The hand-written Prometheus text format, read back by Prometheus' own parser."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.prometheus import (
    Counter,
    Histogram,
    MetricSpec,
    escape_label_value,
    family_of,
    format_value,
    render,
)

AWKWARD = 'back\\slash "quoted"\nnew line, ümlaut {braces} =equals'


def parse(text: str) -> dict[str, object]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_help_and_label_values_round_trip_through_the_parser() -> None:
    spec = MetricSpec("demo_things_total", "counter", AWKWARD, ("what",))
    counter = Counter(spec)
    counter.inc(AWKWARD, amount=2)
    counter.inc("plain")
    text = render([counter.family()])
    # One line per sample: the newline inside the value must be escaped.
    assert text.count("\n") == 4
    families = list(text_string_to_metric_families(text))
    assert len(families) == 1
    family = families[0]
    assert family.name == "demo_things"  # the parser drops a counter's _total
    assert family.type == "counter"
    assert family.documentation == AWKWARD
    values = {s.labels["what"]: s.value for s in family.samples}
    assert values == {AWKWARD: 2.0, "plain": 1.0}
    assert all(s.name == "demo_things_total" for s in family.samples)


def test_escaping_by_hand() -> None:
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (3, "3"),
        (3.0, "3"),
        (0.25, "0.25"),
        (-1.5, "-1.5"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
        (1e300, "1e+300"),
    ],
)
def test_values_are_go_style_floats(value: float, text: str) -> None:
    assert format_value(value) == text


def test_histogram_buckets_are_cumulative_and_end_at_inf() -> None:
    spec = MetricSpec("demo_seconds", "histogram", "how long", ("outcome",))
    histogram = Histogram(spec, (1, 5, 10))
    histogram.declare("error")
    for value in (0.5, 1.0, 4.0, 7.0, 700.0):
        histogram.observe(value, "completed")
    family = parse(render([histogram.family()]))["demo_seconds"]
    samples = family.samples  # type: ignore[attr-defined]
    completed = [s for s in samples if s.labels["outcome"] == "completed"]
    buckets = {s.labels["le"]: s.value for s in completed if s.name == "demo_seconds_bucket"}
    assert buckets == {"1.0": 2, "5.0": 3, "10.0": 4, "+Inf": 5}
    by_name = {s.name: s.value for s in completed if s.name != "demo_seconds_bucket"}
    assert by_name == {"demo_seconds_sum": 712.5, "demo_seconds_count": 5}
    # A declared label set is shown with zeros before anything is observed.
    errors = [s for s in samples if s.labels["outcome"] == "error"]
    assert {s.value for s in errors} == {0}
    assert len(errors) == 4 + 2
    assert histogram.count("completed") == 5


def test_gauges_families_and_order() -> None:
    up = MetricSpec("demo_up", "gauge", "up or not", ("backend",))
    info = MetricSpec("demo_info", "gauge", "no labels")
    text = render(
        [
            family_of(up, {("http://b:1",): 0, ("http://a:1",): 1}),
            family_of(info, {(): 7}),
        ]
    )
    assert text.splitlines() == [
        "# HELP demo_up up or not",
        "# TYPE demo_up gauge",
        'demo_up{backend="http://a:1"} 1',
        'demo_up{backend="http://b:1"} 0',
        "# HELP demo_info no labels",
        "# TYPE demo_info gauge",
        "demo_info 7",
    ]
    assert set(parse(text)) == {"demo_up", "demo_info"}


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
    counter = Counter(MetricSpec("demo_total", "counter", "h", ("a",)))
    with pytest.raises(ValueError, match="takes labels"):
        counter.inc()
    with pytest.raises(ValueError, match="only goes up"):
        counter.inc("x", amount=-1)
    histogram = Histogram(MetricSpec("demo_h", "histogram", "h"), (1,))
    with pytest.raises(ValueError, match="NaN"):
        histogram.observe(math.nan)
    with pytest.raises(ValueError, match="distinct"):
        Histogram(MetricSpec("demo_h", "histogram", "h"), (1, 1))
