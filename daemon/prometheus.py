"""The Prometheus text exposition format (version 0.0.4), written by hand.

No client library: the daemon's runtime dependencies stay trio, trio-websocket
and h11. This module knows nothing about the daemon; `daemon/metrics.py` says
what is measured. The format, as Prometheus reads it:

    # HELP comfy_progress_http_requests_total HTTP requests answered ...
    # TYPE comfy_progress_http_requests_total counter
    comfy_progress_http_requests_total{method="GET",route="/healthz",status="200"} 3

- one `# HELP` and one `# TYPE` line per family, then all of its samples;
- in HELP text, backslash and newline are escaped (`\\\\`, `\\n`); in label
  values also the double quote (`\\"`);
- values are Go-style floats: `+Inf`, `-Inf`, `NaN`;
- a histogram is cumulative `_bucket{le="..."}` samples ending with
  `le="+Inf"`, then `_sum` and `_count`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

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


@dataclass(frozen=True, slots=True)
class Sample:
    name: str  # the family name, or with _bucket / _sum / _count for histograms
    labels: tuple[tuple[str, str], ...]
    value: float


@dataclass(frozen=True, slots=True)
class Family:
    spec: MetricSpec
    samples: tuple[Sample, ...]


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _labels_text(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{name}="{escape_label_value(value)}"' for name, value in labels)
    return "{" + inner + "}"


def render(families: Iterable[Family]) -> str:
    """The exposition text of `families`, in the order given."""
    lines: list[str] = []
    for family in families:
        spec = family.spec
        lines.append(f"# HELP {spec.name} {escape_help(spec.help)}")
        lines.append(f"# TYPE {spec.name} {spec.type}")
        lines.extend(
            f"{sample.name}{_labels_text(sample.labels)} {format_value(sample.value)}"
            for sample in family.samples
        )
    return "\n".join(lines) + "\n"


def _check_labels(spec: MetricSpec, values: LabelValues) -> None:
    if len(values) != len(spec.labels):
        raise ValueError(f"{spec.name} takes labels {spec.labels}, got {values!r}")


def family_of(spec: MetricSpec, values: Mapping[LabelValues, float]) -> Family:
    """A counter or gauge family from label values -> value (read at scrape time)."""
    if spec.type == "histogram":
        raise ValueError("use Histogram for histograms")
    samples = []
    for label_values, value in sorted(values.items()):
        _check_labels(spec, label_values)
        labels = tuple(zip(spec.labels, label_values, strict=True))
        samples.append(Sample(spec.name, labels, float(value)))
    return Family(spec, tuple(samples))


class Counter:
    """A counter the daemon increments as things happen (one value per label set)."""

    def __init__(self, spec: MetricSpec) -> None:
        if spec.type != "counter":
            raise ValueError(f"{spec.name} is a {spec.type}, not a counter")
        self.spec = spec
        self._values: dict[LabelValues, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        _check_labels(self.spec, labels)
        if amount < 0:
            raise ValueError("a counter only goes up")
        self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(labels, 0.0)

    def family(self) -> Family:
        return family_of(self.spec, self._values)


class Histogram:
    """Observations counted into fixed, cumulative buckets, plus their sum and count."""

    def __init__(self, spec: MetricSpec, buckets: Sequence[float]) -> None:
        if spec.type != "histogram":
            raise ValueError(f"{spec.name} is a {spec.type}, not a histogram")
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds) or any(math.isnan(b) for b in bounds):
            raise ValueError(f"{spec.name}: buckets must be distinct numbers")
        self.spec = spec
        self.buckets: tuple[float, ...] = (*bounds, math.inf)
        # Per label set: the count in each bucket (not cumulative), the sum.
        self._counts: dict[LabelValues, list[int]] = {}
        self._sums: dict[LabelValues, float] = {}

    def declare(self, *labels: str) -> None:
        """Show this label set (all zeros) before its first observation."""
        _check_labels(self.spec, labels)
        self._counts.setdefault(labels, [0] * len(self.buckets))
        self._sums.setdefault(labels, 0.0)

    def observe(self, value: float, *labels: str) -> None:
        _check_labels(self.spec, labels)
        if math.isnan(value):
            raise ValueError("cannot observe NaN")
        counts = self._counts.setdefault(labels, [0] * len(self.buckets))
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                counts[index] += 1
                break
        self._sums[labels] = self._sums.get(labels, 0.0) + value

    def count(self, *labels: str) -> int:
        return sum(self._counts.get(labels, ()))

    def family(self) -> Family:
        samples: list[Sample] = []
        for labels, counts in sorted(self._counts.items()):
            base = tuple(zip(self.spec.labels, labels, strict=True))
            cumulative = 0
            for bound, count in zip(self.buckets, counts, strict=True):
                cumulative += count
                le = (("le", format_value(bound) if math.isinf(bound) else repr(bound)),)
                samples.append(Sample(f"{self.spec.name}_bucket", base + le, cumulative))
            samples.append(Sample(f"{self.spec.name}_sum", base, self._sums[labels]))
            samples.append(Sample(f"{self.spec.name}_count", base, cumulative))
        return Family(self.spec, tuple(samples))
