"""Counts made on the request path reach prometheus-client at a flush, exactly."""

from __future__ import annotations

import uuid

import pytest
from prometheus_client import REGISTRY

from strangler import metrics


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_observations_reach_the_counters_and_the_histogram_only_at_a_flush() -> None:
    route = f"r-{uuid.uuid4().hex[:8]}"
    bundle = metrics.children(route, "b")
    for status, seconds in ((200, 0.0004), (204, 0.003), (503, 0.2), (200, 60.0)):
        bundle.observe(status, seconds)
    labels = {"route": route, "backend": "b"}
    assert not sample("strangler_requests_total", **labels, status_class="2xx")

    metrics.flush()

    assert sample("strangler_requests_total", **labels, status_class="2xx") == 3
    assert sample("strangler_requests_total", **labels, status_class="5xx") == 1
    assert sample("strangler_request_duration_seconds_count", **labels) == 4
    assert sample("strangler_request_duration_seconds_sum", **labels) == pytest.approx(60.2034)
    buckets = {"0.0005": 1, "0.0025": 1, "0.005": 2, "0.25": 3, "30.0": 3, "+Inf": 4}
    for le, n in buckets.items():
        assert sample("strangler_request_duration_seconds_bucket", **labels, le=le) == n, le

    metrics.flush()  # nothing new: nothing added twice
    assert sample("strangler_request_duration_seconds_count", **labels) == 4


def test_tallies_and_levels_reach_their_metrics_at_a_flush() -> None:
    route = f"r-{uuid.uuid4().hex[:8]}"
    metrics.tally(metrics.CACHE_REQUESTS, route, "hit")
    metrics.tally(metrics.CACHE_REQUESTS, route, "hit", n=2)
    metrics.CACHE_MEMORY.value = 12345
    metrics.flush()
    assert sample("strangler_cache_requests_total", route=route, result="hit") == 3
    assert sample("strangler_cache_memory_bytes") == 12345
    metrics.flush()
    assert sample("strangler_cache_requests_total", route=route, result="hit") == 3
