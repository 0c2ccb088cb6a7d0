"""Prometheus metrics through the official client library, `prometheus-client`.

This module knows nothing about the daemon; `daemon/ops/metrics.py` says what is
measured. What it adds to the library:

- `MetricSpec`: a metric's name, type, help text and label names, the one
  source of both the library object and the README's metrics table;
- `counter` / `histogram`: library metrics made from a spec, in no registry
  (never the library's global one): each daemon registers its own in a
  `CollectorRegistry` of its own, so several daemons in one process never
  share or clash over a series;
- `ScrapeCollector`: a custom collector for values read from the services at
  scrape time (gauges, and counters the services keep themselves);
- `exposition`: the text format (0.0.4) of a registry.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4

# The library adds a `_created` series (an OpenMetrics idea) to every counter
# and histogram; in the 0.0.4 text each becomes one more gauge family that is
# documented nowhere. The switch is process-wide; every registry here wants it.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in the library

MetricType = Literal["counter", "gauge", "histogram"]
LabelValues = tuple[str, ...]

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """What a metric is: the name, type, help text and label names (also the docs' source)."""

    name: str
    type: MetricType
    help: str
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Checked here, not only by the library: the README table is made
        # from specs that may never become a library object in `make docs`.
        if not _METRIC_NAME.match(self.name):
            raise ValueError(f"bad metric name {self.name!r}")
        for label in self.labels:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"{self.name}: bad label name {label!r}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"{self.name}: a label name is repeated")
        if self.type == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"counter {self.name!r} must end in _total")
        if self.type == "histogram" and "le" in self.labels:
            raise ValueError(f"histogram {self.name!r} must not have an 'le' label")


def counter(spec: MetricSpec) -> Counter:
    """A counter the daemon increments as things happen (in no registry yet)."""
    if spec.type != "counter":
        raise ValueError(f"{spec.name} is a {spec.type}, not a counter")
    return Counter(spec.name, spec.help, spec.labels, registry=None)


def histogram(spec: MetricSpec, buckets: Sequence[float]) -> Histogram:
    """Observations counted into `buckets`, +Inf added (in no registry yet)."""
    if spec.type != "histogram":
        raise ValueError(f"{spec.name} is a {spec.type}, not a histogram")
    return Histogram(spec.name, spec.help, spec.labels, registry=None, buckets=buckets)


class ScrapeCollector(Collector):
    """One family whose values are read when Prometheus scrapes (label values -> value)."""

    def __init__(self, spec: MetricSpec, read: Callable[[], Mapping[LabelValues, float]]) -> None:
        if spec.type == "histogram":
            raise ValueError("histograms are counted, not read at scrape time")
        self.spec = spec
        self.read = read

    def collect(self) -> Iterator[Metric]:
        spec = self.spec
        family_type = CounterMetricFamily if spec.type == "counter" else GaugeMetricFamily
        family = family_type(spec.name, spec.help, labels=spec.labels)
        for label_values, value in sorted(self.read().items()):
            if len(label_values) != len(spec.labels):
                raise ValueError(f"{spec.name} takes labels {spec.labels}, got {label_values!r}")
            family.add_metric(list(label_values), float(value))
        yield family


def exposition(registry: CollectorRegistry) -> bytes:
    """The text format (version 0.0.4) of every family in `registry`, in registration order."""
    return generate_latest(registry)
