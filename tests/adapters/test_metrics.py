"""The metrics registry against the Prometheus text exposition format (0.0.4) rules."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncllm.adapters.metrics import MetricsRegistry

from ._support import parse_prometheus


def test_counter_and_gauge_exposition() -> None:
    registry = MetricsRegistry()
    requests = registry.counter("app_requests_total", "Requests.", ("endpoint", "status"))
    registry.counter("app_tokens_total", "Tokens.")
    registry.sampled("app_level", "A level.", lambda: 2.5)
    requests.inc(labels=("chat", "200"))
    requests.inc(2, labels=("chat", "200"))
    requests.inc(labels=('we"ird\\path\n', "400"))
    text = registry.render()
    samples, types = parse_prometheus(text)
    assert types == {"app_requests_total": "counter", "app_tokens_total": "counter", "app_level": "gauge"}
    assert samples[("app_requests_total", (("endpoint", "chat"), ("status", "200")))] == 3
    assert samples[("app_requests_total", (("endpoint", 'we\\"ird\\\\path\\n'), ("status", "400")))] == 1
    assert samples[("app_tokens_total", ())] == 0
    assert samples[("app_level", ())] == 2.5
    assert "# HELP app_requests_total Requests.\n" in text and text.endswith("\n")


def test_registry_rejects_duplicates_bad_names_and_bad_input() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("x_total", "X.")
    with pytest.raises(ValueError, match="name"):
        registry.counter("x_total", "again")
    with pytest.raises(ValueError, match="name"):
        registry.counter("bad-name", "dash")
    with pytest.raises(ValueError, match="amount"):
        counter.inc(-1)
    with pytest.raises(ValueError, match="labels"):
        counter.inc(labels=("unexpected",))
    with pytest.raises(ValueError, match="buckets"):
        registry.histogram("h", "H.", [1.0, 1.0])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=20, allow_nan=False), max_size=40))
def test_histogram_buckets_are_cumulative_and_inclusive(values: list[float]) -> None:
    bounds = [0.5, 1.0, 5.0, 10.0]
    registry = MetricsRegistry()
    histogram = registry.histogram("lat_seconds", "Latency.", bounds)
    for value in values:
        histogram.observe(value)
    samples, types = parse_prometheus(registry.render())
    assert types == {"lat_seconds": "histogram"}
    for bound in [*bounds, math.inf]:
        label = "+Inf" if math.isinf(bound) else f"{bound:g}"
        expected = sum(1 for v in values if v <= bound)  # "le" means less than or equal
        assert samples[("lat_seconds_bucket", (("le", label),))] == expected
    assert samples[("lat_seconds_count", ())] == len(values)
    assert samples[("lat_seconds_sum", ())] == pytest.approx(sum(values))
