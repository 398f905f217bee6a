"""A small per-app metrics registry rendered in the Prometheus text exposition format (version 0.0.4).

No global state: each ``create_app`` owns a ``MetricsRegistry``. Counters and histograms only grow;
gauges are sampled when the exposition is rendered. Histogram buckets are cumulative and end in ``+Inf``,
whose count equals ``_count``.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str], extra: tuple[str, str] | None = None) -> str:
    pairs = [f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True)]
    if extra is not None:
        pairs.append(f'{extra[0]}="{_escape(extra[1])}"')
    return "{" + ",".join(pairs) + "}" if pairs else ""


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        if not name or not (name[0].isalpha() or name[0] == "_") or not name.replace("_", "a").isalnum():
            raise ValueError(f"name: {name!r} is not a valid metric name")
        self.name = name
        self.help = help_text
        self.label_names = tuple(label_names)

    def _key(self, labels: Sequence[str]) -> LabelValues:
        if len(labels) != len(self.label_names):
            raise ValueError(f"labels: {self.name} takes {self.label_names}, got {tuple(labels)}")
        return tuple(str(v) for v in labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing total per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, label_names)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, labels: Sequence[str] = ()) -> None:
        if amount < 0:
            raise ValueError(f"amount: counters only increase, got {amount}")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, labels: Sequence[str] = ()) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        if not self._values and not self.label_names:
            return [f"{self.name} 0"]
        return [f"{self.name}{_labels(self.label_names, k)} {_format_value(v)}"
                for k, v in sorted(self._values.items())]


class Histogram(_Metric):
    """Observations counted into fixed, increasing upper bounds (``le``), plus their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help_text)
        bounds = [float(b) for b in buckets]
        if not bounds or any(b >= c for b, c in itertools.pairwise(bounds)):
            raise ValueError(f"buckets: must be a non-empty increasing sequence, got {list(buckets)}")
        if math.isinf(bounds[-1]):
            bounds.pop()
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last slot is the +Inf overflow
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self._sum += value
        self._count += 1

    @property
    def count(self) -> int:
        return self._count

    @property
    def sum(self) -> float:
        return self._sum

    def samples(self) -> list[str]:
        lines = []
        cumulative = 0
        for bound, count in zip((*self.bounds, math.inf), self._counts, strict=True):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{_format_value(bound)}"}} {cumulative}')
        lines.append(f"{self.name}_sum {_format_value(self._sum)}")
        lines.append(f"{self.name}_count {self._count}")
        return lines


class SampledGauge(_Metric):
    """A value read from ``read()`` at exposition time (``kind`` ``gauge``, or ``counter`` for totals)."""

    def __init__(self, name: str, help_text: str, read: Callable[[], float], kind: str = "gauge") -> None:
        super().__init__(name, help_text)
        if kind not in ("gauge", "counter"):
            raise ValueError(f"kind: must be 'gauge' or 'counter', got {kind!r}")
        self.kind = kind
        self._read = read

    def samples(self) -> list[str]:
        return [f"{self.name} {_format_value(float(self._read()))}"]


class MetricsRegistry:
    """An ordered set of uniquely named metrics."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def register(self, metric: _Metric) -> None:
        if metric.name in self._metrics:
            raise ValueError(f"name: metric {metric.name!r} is already registered")
        self._metrics[metric.name] = metric

    def counter(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> Counter:
        metric = Counter(name, help_text, label_names)
        self.register(metric)
        return metric

    def histogram(self, name: str, help_text: str, buckets: Sequence[float]) -> Histogram:
        metric = Histogram(name, help_text, buckets)
        self.register(metric)
        return metric

    def sampled(self, name: str, help_text: str, read: Callable[[], float], kind: str = "gauge") -> None:
        self.register(SampledGauge(name, help_text, read, kind))

    def render(self) -> str:
        return "".join(line + "\n" for line in _lines(self._metrics.values()))


def _lines(metrics: Iterable[_Metric]) -> Iterable[str]:
    for metric in metrics:
        yield from metric.header()
        yield from metric.samples()
