"""Every Prometheus metric, in one place.

The request path never calls prometheus-client itself: a labelled counter
bump takes a lock and costs about 0.7 µs, a histogram observation 1.4 µs,
and a cache miss makes several. It adds up plain integers instead
(`tally`, `RouteMetrics.observe`, `Level`), and `flush` hands the sums to
prometheus-client in one go: before every ``/metrics`` answer of a
single-process gateway, and every `FLUSH_INTERVAL` in each worker of a
multi-worker one (whose ``/metrics`` the supervisor reads from the workers'
files), so a scrape lags by at most that.

With several workers the gateway runs prometheus-client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR`` is set before any worker starts); each gauge
declares how the per-process values combine, and `exposition` aggregates
every process's values for ``/metrics``.

The configured weights are the exception. A process's multiprocess file
cannot forget a series, so a route removed from the file would keep its last
weight for as long as the process lives. In multiprocess mode `set_weights`
therefore keeps the weights in memory only, and the process serving
``/metrics`` (the supervisor, which loads and reloads the same route file as
its workers) publishes its own copy.
"""

from __future__ import annotations

import asyncio
import bisect
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
)
from prometheus_client import (
    generate_latest as _generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

__all__ = [
    "CONFIG_RELOADS",
    "INFLIGHT",
    "REJECTED",
    "REQUESTS",
    "REQUEST_DURATION",
    "ROUTE_WEIGHT",
    "UPSTREAM_ERRORS",
    "RouteMetrics",
    "children",
    "exposition",
    "flush",
    "tally",
]

#: How often a worker process hands its counts to prometheus-client (multi-worker mode).
FLUSH_INTERVAL = 0.5

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

REQUESTS = Counter(
    "strangler_requests_total",
    "Requests answered, by route, backend and status class (2xx..5xx).",
    ["route", "backend", "status_class"],
)
REQUEST_DURATION = Histogram(
    "strangler_request_duration_seconds",
    "Time from request start to the last response byte, by route and backend.",
    ["route", "backend"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "strangler_upstream_errors_total",
    "Failed upstream calls by backend and kind (connect, timeout, protocol).",
    ["backend", "kind"],
)
REJECTED = Counter(
    "strangler_rejected_requests_total",
    "Requests the gateway answered itself without calling a backend, by reason.",
    ["reason"],
)
CONFIG_RELOADS = Counter(
    "strangler_config_reloads_total",
    "Route-file reloads by result (ok, failed).",
    ["result"],
)
_WEIGHT_NAME = "strangler_route_weight"
_WEIGHT_HELP = "Current weight of each backend on each route (as configured)."
ROUTE_WEIGHT = Gauge(
    _WEIGHT_NAME,
    _WEIGHT_HELP,
    ["route", "backend"],
    multiprocess_mode="livemostrecent",
)
BREAKER_STATE = Gauge(
    "strangler_breaker_state",
    "Circuit breaker state per backend: 0 closed, 1 half-open, 2 open (max over workers).",
    ["backend"],
    multiprocess_mode="livemax",
)
BREAKER_TRANSITIONS = Counter(
    "strangler_breaker_transitions_total",
    "Circuit breaker state changes by backend and new state.",
    ["backend", "state"],
)
RETRIES = Counter(
    "strangler_retries_total",
    "Retry decisions by backend and outcome: retried, or why not (budget_exhausted, "
    "skipped_body, skipped_retry_after, deadline, exhausted, breaker_open).",
    ["backend", "outcome"],
)
FALLBACKS = Counter(
    "strangler_fallbacks_total",
    "Requests served by the route's fallback backend, by route and reason.",
    ["route", "reason"],
)
REDIS_ERRORS = Counter(
    "strangler_redis_errors_total",
    "Redis calls that failed (error) or were not tried during the pause after one (skipped).",
    ["result"],
)
INFLIGHT = Gauge(
    "strangler_inflight_requests",
    "Requests being proxied right now.",
    multiprocess_mode="livesum",
)
CACHE_REQUESTS = Counter(
    "strangler_cache_requests_total",
    "Cacheable requests by route and result: hit, miss, stale (served stale), "
    "revalidated (a 304 refreshed the entry), bypass (not served from the cache: "
    "method, Range, Authorization, request no-store).",
    ["route", "result"],
)
CACHE_STALE = Counter(
    "strangler_cache_stale_total",
    "Stale entries served, by route and reason (while_revalidate, if_error).",
    ["route", "reason"],
)
CACHE_STORES = Counter(
    "strangler_cache_stores_total",
    "Entries stored, by route and layer (memory, redis).",
    ["route", "layer"],
)
CACHE_NOT_STORED = Counter(
    "strangler_cache_not_stored_total",
    "Responses not stored, by route and reason (no-store, private, set-cookie, "
    "vary-star, authorization, no-freshness, status, too_large, redis_busy).",
    ["route", "reason"],
)
CACHE_EVICTIONS = Counter(
    "strangler_cache_evictions_total",
    "Entries evicted from the in-process layer to stay within its bound, by route.",
    ["route"],
)
CACHE_INVALIDATIONS = Counter(
    "strangler_cache_invalidations_total",
    "Cache invalidations by route and cause (unsafe_method, purge).",
    ["route", "cause"],
)
CACHE_COALESCED = Counter(
    "strangler_cache_coalesced_total",
    "Misses that waited for another request filling the same entry, by route and "
    "outcome (served, gave_up).",
    ["route", "outcome"],
)
CACHE_REDIS_BYPASS = Counter(
    "strangler_cache_redis_unavailable_total",
    "Cache lookups and stores that went without Redis because it was unavailable.",
    ["op"],
)
CACHE_MEMORY_BYTES = Gauge(
    "strangler_cache_memory_bytes",
    "Bytes held by the in-process cache layer.",
    multiprocess_mode="livesum",
)
SHADOW_REQUESTS = Counter(
    "strangler_shadow_requests_total",
    "Shadow copies by route and outcome: match, mismatch (any field differed, noise "
    "included), error (the copy failed), dropped (queue full), skipped.",
    ["route", "outcome"],
)
SHADOW_SKIPPED = Counter(
    "strangler_shadow_skipped_total",
    "Why copies were skipped, by route and reason (body_too_large, same_backend, "
    "incomplete, primary_failed, noise_failed, endpoint_cap).",
    ["route", "reason"],
)
SHADOW_QUEUE = Gauge(
    "strangler_shadow_queue",
    "Shadow copies waiting for a free slot.",
    multiprocess_mode="livesum",
)
CONFIG_GENERATION = Gauge(
    "strangler_config_generation",
    "Number of the route-file snapshot in use (1 at start, +1 per successful reload).",
    multiprocess_mode="livemax",
)


@dataclass(slots=True, eq=False)
class RouteMetrics:
    """Request counts and latencies of one (route, backend), added up until
    the next `flush`."""

    by_class: tuple[Counter, ...]  # index status // 100, 0 unused
    duration: Histogram
    counts: list[int] = field(default_factory=lambda: [0] * 6)
    #: Per histogram bucket (upper bounds LATENCY_BUCKETS, then +Inf), not cumulative.
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    seconds: float = 0.0
    dirty: bool = False

    def observe(self, status: int, seconds: float) -> None:
        idx = status // 100
        self.counts[idx if 1 <= idx <= 5 else 5] += 1
        # prometheus-client's rule: the first bucket whose upper bound is >= the value
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.seconds += seconds
        if not self.dirty:
            self.dirty = True
            _dirty.append(self)

    def flush(self) -> None:
        counts, buckets = self.counts, self.buckets
        for i, n in enumerate(counts):
            if n:
                self.by_class[i].inc(n)
                counts[i] = 0
        # Histogram has no public way to add many observations at once; these are
        # the attributes its observe() updates (non-cumulative bucket counts, sum).
        hist: Any = self.duration
        for i, n in enumerate(buckets):
            if n:
                hist._buckets[i].inc(n)
                buckets[i] = 0
        hist._sum.inc(self.seconds)
        self.seconds = 0.0
        self.dirty = False


_children: dict[tuple[str, str], RouteMetrics] = {}
_dirty: list[RouteMetrics] = []


def children(route: str, backend: str) -> RouteMetrics:
    """The metric bundle for (route, backend), made once."""
    m = _children.get((route, backend))
    if m is None:
        classes = tuple(
            REQUESTS.labels(route, backend, f"{i}xx")
            if i
            else REQUESTS.labels(route, backend, "5xx")
            for i in range(6)
        )
        m = _children[(route, backend)] = RouteMetrics(
            by_class=classes, duration=REQUEST_DURATION.labels(route, backend)
        )
    return m


_labelled: dict[tuple[Any, ...], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered (for counts off the request path)."""
    key = (metric, *labels)
    found = _labelled.get(key)
    if found is None:
        found = _labelled[key] = metric.labels(*labels)
    return found


#: Counts since the last flush, by (metric, *labels).
_tallies: dict[tuple[Any, ...], int] = {}


def tally(metric: Any, *labels: str, n: int = 1) -> None:
    """``metric.labels(*labels).inc(n)`` at the next `flush`: for counters the
    request path bumps."""
    key = (metric, *labels)
    _tallies[key] = _tallies.get(key, 0) + n


class Tally:
    """One counter child's count since the last flush, as a plain integer the
    request path bumps (``t.n += 1``): cheaper than `tally` where the labels
    are known ahead, e.g. per route. Made once per labels by `counter`."""

    __slots__ = ("metric", "labels", "n")

    def __init__(self, metric: Any, labels: tuple[str, ...]) -> None:
        self.metric = metric
        self.labels = labels
        self.n = 0


_counters: dict[tuple[Any, ...], Tally] = {}


def counter(metric: Any, *labels: str) -> Tally:
    """The `Tally` of ``metric.labels(*labels)``, the same one every call."""
    key = (metric, *labels)
    found = _counters.get(key)
    if found is None:
        found = _counters[key] = Tally(metric, labels)
    return found


class Level:
    """A gauge the request path moves up and down (requests in flight, bytes
    held): a plain number, copied into its gauge at every `flush`."""

    __slots__ = ("gauge", "value")

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self.value = 0
        _levels.append(self)


_levels: list[Level] = []

IN_FLIGHT = Level(INFLIGHT)
CACHE_MEMORY = Level(CACHE_MEMORY_BYTES)


def flush() -> None:
    """Hand everything counted since the last flush to prometheus-client."""
    global _tallies
    tallies, _tallies = _tallies, {}
    for (metric, *labels), n in tallies.items():
        child(metric, *labels).inc(n)
    for t in _counters.values():
        if t.n:
            n, t.n = t.n, 0
            child(t.metric, *t.labels).inc(n)
    while _dirty:
        _dirty.pop().flush()
    for level in _levels:
        level.gauge.set(level.value)


async def flush_forever(interval: float = FLUSH_INTERVAL) -> None:
    """A worker's periodic `flush` (its ``/metrics`` is served by the supervisor)."""
    try:
        while True:
            await asyncio.sleep(interval)
            flush()
    finally:
        flush()


_weights: dict[str, dict[str, int]] = {}


def set_weights(weights: dict[str, dict[str, int]]) -> None:
    """Publish the configured weights; series of routes and backends that are
    gone disappear."""
    global _weights
    _weights = {route: dict(per_backend) for route, per_backend in weights.items()}
    if multiprocess_dir():
        return  # published by `_WeightsCollector` in the process serving /metrics
    ROUTE_WEIGHT.clear()
    for route, per_backend in weights.items():
        for backend, weight in per_backend.items():
            ROUTE_WEIGHT.labels(route, backend).set(weight)


class _WeightsCollector:
    """``strangler_route_weight`` from this process's current weights."""

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(_WEIGHT_NAME, _WEIGHT_HELP, labels=("route", "backend"))
        for route, per_backend in _weights.items():
            for backend, weight in per_backend.items():
                family.add_metric((route, backend), weight)
        yield family


def backend_summary() -> dict[str, dict[str, object]]:
    """Per-backend breaker state and counters, aggregated over every worker
    (for ``/api/backends`` under the multi-worker supervisor)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    states = {0: "closed", 1: "half-open", 2: "open"}
    out: dict[str, dict[str, object]] = {}

    def entry(backend: str) -> dict[str, object]:
        return out.setdefault(backend, {"breaker": None, "upstream_errors": {}, "retries": {}})

    for family in registry.collect():
        for sample in family.samples:
            labels, value = sample.labels, sample.value
            if sample.name == "strangler_breaker_state":
                entry(labels["backend"])["breaker"] = {"state": states.get(int(value), "?")}
            elif sample.name == "strangler_upstream_errors_total":
                entry(labels["backend"])["upstream_errors"][labels["kind"]] = int(value)  # type: ignore[index]
            elif sample.name == "strangler_retries_total":
                entry(labels["backend"])["retries"][labels["outcome"]] = int(value)  # type: ignore[index]
    return out


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def exposition() -> bytes:
    """The text exposition for ``/metrics`` (aggregated across workers if needed)."""
    flush()
    if multiprocess_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(_WeightsCollector())
        return _generate_latest(registry)
    from prometheus_client import REGISTRY

    return _generate_latest(REGISTRY)
