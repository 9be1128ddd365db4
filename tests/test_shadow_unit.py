"""Shadow traffic in process: stats and report, the tee, the policy, the config.

`ShadowStats` counts and `route_report` decides what is worth reporting;
they are pure enough to drive directly. The flush tests use a real
redis-server (and a port where nothing listens for the failing flush).
"""

from __future__ import annotations

import textwrap
from collections import Counter
from typing import Any

import pytest
from conftest import RedisServer
from prometheus_client import REGISTRY

from legacy_stub.testing import free_port
from strangler import config, metrics
from strangler.exceptions import ConfigError
from strangler.shadow import (
    MAX_ENDPOINTS,
    MAX_FIELDS,
    MAX_SIGNATURES,
    OTHER_ENDPOINT,
    SEP,
    Shadower,
    ShadowPolicy,
    ShadowStats,
    Tee,
    route_report,
)
from strangler.shared import SharedState

ROUTE = "orders"
EP = "GET /api/orders/{n}"
NOISE = {"$.generated_at": ("2024-01-01T00:00:00Z", "2024-01-01T00:00:01Z")}
TOTAL = {"$.total": ("10.5", "10.51")}


def report_of(
    stats: ShadowStats, route: str = ROUTE, *, relative: float = 0.2, absolute: float = 0.0003
) -> dict[str, dict[str, Any]]:
    entries = route_report(
        stats.totals.get(route, Counter()),
        stats.samples.get(route, {}),
        relative=relative,
        absolute=absolute,
    )
    return {e["endpoint"]: e for e in entries}


def names(entries: list[dict[str, Any]]) -> list[str]:
    return [e["field"] for e in entries]


def sample(name: str, **labels: str) -> float:
    metrics.flush()
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ------------------------------------------------------------------ significant vs noisy


def test_field_beyond_its_noise_is_reported_and_noise_field_is_not() -> None:
    stats = ShadowStats()
    for i in range(100):
        stats.record(ROUTE, EP, {**TOTAL, **NOISE}, NOISE if i < 10 else None)
    ep = report_of(stats)[EP]
    assert (ep["compared"], ep["noise_samples"], ep["errors"]) == (100, 10, 0)
    assert names(ep["fields"]) == ["$.total"]
    assert names(ep["noise_fields"]) == ["$.generated_at"]
    (total,) = ep["fields"]
    assert total["diffs"] == 100 and total["noise"] == 0
    assert total["example"] == {"primary": "10.5", "candidate": "10.51"}
    assert "example" not in ep["noise_fields"][0]
    assert ep["mismatched"] == 100 and ep["matched"] == 0 and ep["differing_raw"] == 100


def test_mismatched_counts_only_requests_with_a_reported_field() -> None:
    stats = ShadowStats()
    for i in range(100):
        diffs = {**TOTAL, **NOISE} if i < 40 else dict(NOISE)
        stats.record(ROUTE, EP, diffs, NOISE if i % 5 == 0 else None)
    stats.record(ROUTE, EP, {}, None)  # a copy that matched entirely
    ep = report_of(stats)[EP]
    assert names(ep["fields"]) == ["$.total"]
    assert ep["compared"] == 101
    assert ep["differing_raw"] == 100  # noise included
    assert ep["mismatched"] == 40
    assert ep["matched"] == 61


def test_report_says_whether_noise_was_measured_for_an_endpoint() -> None:
    """Without a noise sample a timestamp is reported like a real difference,
    so the report flags that nothing could be filtered yet."""
    counts = {
        f"{EP}{SEP}c": 10,
        f"{EP}{SEP}r": 10,
        f"{EP}{SEP}d{SEP}$.generated_at": 10,
        f"{EP}{SEP}s{SEP}$.generated_at": 10,
    }
    (unmeasured,) = route_report(counts, {}, relative=0.2, absolute=0.0003)
    assert unmeasured["noise_measured"] is False
    assert names(unmeasured["fields"]) == ["$.generated_at"]

    counts[f"{EP}{SEP}nc"] = 1
    counts[f"{EP}{SEP}n{SEP}$.generated_at"] = 1
    (measured,) = route_report(counts, {}, relative=0.2, absolute=0.0003)
    assert measured["noise_measured"] is True
    assert measured["fields"] == [] and measured["matched"] == 10


def test_thresholds_decide_a_partly_noisy_field() -> None:
    """d - n must beat ``absolute``, and (d - n) / n must beat ``relative``."""

    def field_reported(diffs: int, noise: int, **thresholds: float) -> bool:
        counts = {
            f"{EP}{SEP}c": 100,
            f"{EP}{SEP}nc": 100,
            f"{EP}{SEP}d{SEP}$.x": diffs,
            f"{EP}{SEP}n{SEP}$.x": noise,
        }
        (ep,) = route_report(counts, {}, **{"relative": 0.2, "absolute": 0.0003, **thresholds})
        return names(ep["fields"]) == ["$.x"]

    assert not field_reported(50, 45)  # 5 points over 45: 11% < 20%
    assert field_reported(60, 45)  # 15 over 45: 33%
    assert field_reported(2, 0)
    assert not field_reported(2, 0, absolute=0.05)  # 2% is not over 5%
    assert not field_reported(100, 100)


def test_array_indexes_collapse_to_one_field_counted_once_per_request() -> None:
    stats = ShadowStats()
    stats.record(
        ROUTE,
        "GET /api/orders",
        {
            "$.orders[0].total": ("1", "2"),
            "$.orders[3].total": ("3", "4"),
            "$.orders[3].items[1].price": ("5", "6"),
        },
        None,
    )
    ep = report_of(stats)["GET /api/orders"]
    by_field = {f["field"]: f for f in ep["fields"]}
    assert set(by_field) == {"$.orders[*].total", "$.orders[*].items[*].price"}
    assert by_field["$.orders[*].total"]["diffs"] == 1
    assert by_field["$.orders[*].total"]["example"] == {"primary": "1", "candidate": "2"}


def test_failed_copy_is_an_error_not_a_comparison() -> None:
    stats = ShadowStats()
    stats.record(ROUTE, EP, None, None)
    stats.record(ROUTE, EP, None, None)
    stats.record(ROUTE, EP, {}, {})
    ep = report_of(stats)[EP]
    assert (ep["errors"], ep["compared"], ep["matched"], ep["noise_samples"]) == (2, 1, 1, 1)
    assert ep["fields"] == [] and ep["noise_fields"] == []


def test_first_example_is_kept_and_reported_only_for_reported_fields() -> None:
    stats = ShadowStats()
    stats.record(ROUTE, EP, {"$.total": ("1", "2")}, None)
    stats.record(ROUTE, EP, {"$.total": ("3", "4")}, None)
    (total,) = report_of(stats)[EP]["fields"]
    assert total["example"] == {"primary": "1", "candidate": "2"}


def test_routes_are_counted_and_reset_separately() -> None:
    stats = ShadowStats()
    stats.record("a", EP, TOTAL, None)
    stats.record("b", EP, TOTAL, None)
    stats.reset("a")
    assert report_of(stats, "a") == {}
    assert report_of(stats, "b")[EP]["compared"] == 1
    stats.reset()
    assert report_of(stats, "b") == {}
    assert stats.take_delta() == ({}, {})


# ------------------------------------------------------------------ caps


def test_endpoints_beyond_the_cap_share_one_bucket() -> None:
    route = "endpoint-cap"
    before = sample("strangler_shadow_skipped_total", route=route, reason="endpoint_cap")
    stats = ShadowStats()
    for i in range(MAX_ENDPOINTS + 5):
        stats.record(route, f"GET /e{i}", {}, None)
    stats.record(route, "GET /e0", {}, None)  # a known endpoint still counts as itself
    eps = report_of(stats, route)
    assert len(eps) == MAX_ENDPOINTS + 1
    assert eps[OTHER_ENDPOINT]["compared"] == 5
    assert eps["GET /e0"]["compared"] == 2
    after = sample("strangler_shadow_skipped_total", route=route, reason="endpoint_cap")
    assert after - before == 5


def test_fields_beyond_the_cap_are_not_counted() -> None:
    stats = ShadowStats()
    for batch in range(4):
        diffs = {f"$.f{batch * 100 + i}": ("1", "2") for i in range(100)}
        stats.record(ROUTE, EP, diffs, None)
    stats.record(ROUTE, EP, {"$.f0": ("1", "2"), "$.new": ("1", "2")}, None)
    counted = {k for k in stats.totals[ROUTE] if k.startswith(f"{EP}{SEP}d{SEP}")}
    assert len(counted) == MAX_FIELDS
    assert f"{EP}{SEP}d{SEP}$.new" not in counted
    assert stats.totals[ROUTE][f"{EP}{SEP}d{SEP}$.f0"] == 2  # known fields go on counting
    assert len(stats.samples[ROUTE]) == MAX_FIELDS


def test_signatures_beyond_the_cap_are_counted_as_overflow() -> None:
    stats = ShadowStats()
    n = MAX_SIGNATURES + 10
    for i in range(n):
        stats.record(ROUTE, EP, {"$.total": ("1", "2"), f"$.x{i}": ("1", "2")}, None)
    signatures = [k for k in stats.totals[ROUTE] if k.startswith(f"{EP}{SEP}s{SEP}")]
    assert len(signatures) == MAX_SIGNATURES + 1
    ep = report_of(stats)[EP]
    assert ep["mismatched"] == n and ep["matched"] == 0


# ------------------------------------------------------------------ flushing


def test_give_back_keeps_counts_for_the_next_flush_without_double_counting() -> None:
    stats = ShadowStats()
    for _ in range(3):
        stats.record(ROUTE, EP, TOTAL, None)
    delta, samples = stats.take_delta()
    assert stats.take_delta() == ({}, {})
    stats.record(ROUTE, EP, TOTAL, None)  # counted while the flush was failing
    stats.give_back(delta, samples)
    again, again_samples = stats.take_delta()
    assert again[ROUTE][f"{EP}{SEP}c"] == 4
    assert again[ROUTE][f"{EP}{SEP}d{SEP}$.total"] == 4
    assert again_samples == {ROUTE: {f"{EP}{SEP}$.total": TOTAL["$.total"]}}
    assert stats.totals[ROUTE][f"{EP}{SEP}c"] == 4  # the process's own view is unchanged


async def test_failed_flush_gives_counts_back_and_a_later_flush_writes_them(
    redis_server: RedisServer,
) -> None:
    up = SharedState(redis_server.url, "unit:")
    down = SharedState(f"redis://127.0.0.1:{free_port()}/0", "unit:")
    shadower = Shadower(up, "unit:")
    try:
        for i in range(3):
            shadower.stats.record(ROUTE, EP, TOTAL, NOISE if i == 0 else None)
        await shadower.flush(down)  # Redis unreachable: nothing may be lost
        shadower.stats.record(ROUTE, EP, {}, None)
        await shadower.flush(up)
        assert shadower.stats.take_delta() == ({}, {})

        counts, samples, source = await shadower.totals(ROUTE)
        assert "redis" in source
        assert counts[f"{EP}{SEP}c"] == 4
        assert counts[f"{EP}{SEP}d{SEP}$.total"] == 3
        assert counts[f"{EP}{SEP}nc"] == 1
        assert samples[f"{EP}{SEP}$.total"] == TOTAL["$.total"]
        (ep,) = route_report(counts, samples, relative=0.2, absolute=0.0003)
        assert (ep["compared"], ep["mismatched"], ep["matched"]) == (4, 3, 1)

        await shadower.reset([ROUTE])
        counts, samples, _ = await shadower.totals(ROUTE)
        assert counts == {} and samples == {}
    finally:
        await up.close()
        await down.close()


# ------------------------------------------------------------------ tee


def test_tee_keeps_at_most_its_limit_and_says_it_went_on() -> None:
    tee = Tee(10)
    tee.add(b"abcd")
    tee.add(b"")
    tee.add(b"efgh")
    assert (tee.body(), tee.truncated) == (b"abcdefgh", False)
    tee.add(b"ijkl")
    assert (tee.body(), tee.truncated, tee.size) == (b"abcdefghij", True, 10)
    tee.add(b"more")
    assert tee.body() == b"abcdefghij"


def test_tee_filled_exactly_is_not_truncated() -> None:
    tee = Tee(8)
    tee.add(b"12345678")
    assert (tee.body(), tee.truncated) == (b"12345678", False)
    tee.add(b"9")
    assert (tee.body(), tee.truncated) == (b"12345678", True)


def test_tee_of_zero_bytes_keeps_nothing() -> None:
    tee = Tee(0)
    tee.add(b"x")
    assert (tee.body(), tee.truncated) == (b"", True)


# ------------------------------------------------------------------ policy


def policy(route: str = "p", **settings: Any) -> ShadowPolicy:
    return ShadowPolicy(route, config.Shadow(**{"backend": "orders", **settings}))


def test_policy_copies_only_its_methods() -> None:
    p = policy()
    assert p.wants("GET", "legacy") and p.wants("HEAD", "legacy")
    assert not p.wants("POST", "legacy") and not p.wants("OPTIONS", "legacy")
    unsafe = policy(methods=["get", "post"], allow_unsafe=True)
    assert unsafe.wants("POST", "legacy") and unsafe.wants("GET", "legacy")
    assert not unsafe.wants("PUT", "legacy")


def test_policy_samples_its_percent() -> None:
    assert not any(policy(percent=0).wants("GET", "legacy") for _ in range(200))
    assert all(policy(percent=100).wants("GET", "legacy") for _ in range(200))
    half = policy(percent=50)
    copied = sum(half.wants("GET", "legacy") for _ in range(4000))
    assert 1700 < copied < 2300


def test_policy_skips_and_counts_a_primary_that_is_the_shadow_backend() -> None:
    route = "same-backend-unit"
    p = policy(route)
    skipped = ("strangler_shadow_skipped_total", {"route": route, "reason": "same_backend"})
    before = sample(skipped[0], **skipped[1])
    before_requests = sample("strangler_shadow_requests_total", route=route, outcome="skipped")
    assert not p.wants("GET", "orders")
    assert not p.wants("GET", "orders")
    assert p.wants("GET", "legacy")
    assert not p.wants("POST", "orders")  # not a copied method: not a skip either
    assert sample(skipped[0], **skipped[1]) - before == 2
    after_requests = sample("strangler_shadow_requests_total", route=route, outcome="skipped")
    assert after_requests - before_requests == 2


def test_policy_endpoints_are_templated() -> None:
    p = policy(endpoints=["/api/users/{user}/orders"])
    assert p.endpoint("GET", "/api/orders/17") == "GET /api/orders/{n}"
    assert p.endpoint("GET", "/api/x/123e4567-e89b-12d3-a456-426614174000") == "GET /api/x/{uuid}"
    assert p.endpoint("GET", "/api/users/bob/orders") == "GET /api/users/{user}/orders"
    assert p.endpoint("DELETE", "/api/orders") == "DELETE /api/orders"


def test_policy_thresholds_are_fractions_of_the_configured_percents() -> None:
    p = policy(percent=25, noise_percent=5, relative_threshold=30, absolute_threshold=0.5)
    assert (p.fraction, p.noise_fraction, p.relative, p.absolute) == pytest.approx(
        (0.25, 0.05, 0.3, 0.005)
    )


# ------------------------------------------------------------------ config


def route_yaml(shadow: str) -> str:
    return (
        textwrap.dedent(
            """\
        backends:
          legacy: {url: "http://127.0.0.1:8081"}
          orders: {url: "http://127.0.0.1:8082"}
        routes:
          - name: orders
            match: {path_prefix: /api/orders}
            backends: [{name: legacy, weight: 100}]
            shadow: %s
        """
        )
        % shadow
    )


def errors_of(shadow: str) -> str:
    with pytest.raises(ConfigError) as info:
        config.loads(route_yaml(shadow), "routes.yaml")
    return "\n".join(info.value.messages)


def test_config_defaults() -> None:
    cfg = config.loads(route_yaml("{backend: orders}"), "routes.yaml")
    shadow = cfg.routes[0].shadow
    assert shadow is not None
    assert shadow.methods == ["GET", "HEAD"] and not shadow.allow_unsafe
    assert (shadow.percent, shadow.noise_percent) == (100, 10)
    assert (shadow.relative_threshold, shadow.absolute_threshold) == (20, 0.03)
    assert cfg.server.shadow_queue == 1000 and cfg.server.shadow_concurrency == 32


def test_config_rejects_unsafe_methods_without_allow_unsafe() -> None:
    message = errors_of("{backend: orders, methods: [GET, post, DELETE]}")
    assert "allow_unsafe" in message and "POST" in message and "DELETE" in message
    cfg = config.loads(
        route_yaml("{backend: orders, methods: [GET, POST], allow_unsafe: true}"), "routes.yaml"
    )
    assert cfg.routes[0].shadow is not None and cfg.routes[0].shadow.methods == ["GET", "POST"]


def test_config_rejects_an_unknown_shadow_backend() -> None:
    message = errors_of("{backend: nowhere}")
    assert "shadow.backend" in message and "unknown backend 'nowhere'" in message


def test_config_rejects_a_bad_mask_regex() -> None:
    message = errors_of("{backend: orders, compare: {masks: ['uuid', '(unclosed']}}")
    assert "invalid mask regex" in message and "(unclosed" in message


def test_config_rejects_bad_paths_and_bounds() -> None:
    assert "JSON path" in errors_of("{backend: orders, compare: {ignore: ['total']}}")
    assert "numeric_tolerance" in errors_of("{backend: orders, compare: {numeric_tolerance: -1}}")
    assert "percent" in errors_of("{backend: orders, percent: 101}")
    assert "endpoints" in errors_of("{backend: orders, endpoints: ['api/{id}']}")


def test_every_delta_carries_an_example_of_the_fields_it_counts() -> None:
    """What was sent before may have been reset elsewhere (another replica, or
    the gateway this process reports to), so each delta has its own examples;
    the process's own first example is kept."""
    stats = ShadowStats()
    stats.record(ROUTE, EP, {"$.total": ("1", "2")}, None)
    stats.record(ROUTE, EP, {"$.total": ("3", "4")}, None)
    _, samples = stats.take_delta()
    assert samples == {ROUTE: {f"{EP}{SEP}$.total": ("1", "2")}}
    stats.record(ROUTE, EP, {"$.total": ("5", "6")}, None)
    _, samples = stats.take_delta()
    assert samples == {ROUTE: {f"{EP}{SEP}$.total": ("5", "6")}}
    assert stats.samples[ROUTE] == {f"{EP}{SEP}$.total": ("1", "2")}


def test_absorbed_counts_refill_examples_after_a_reset() -> None:
    """The gateway side of a shadow worker: counts arrive as deltas."""
    worker, gateway = ShadowStats(), ShadowStats()
    worker.record(ROUTE, EP, TOTAL, None)
    gateway.absorb(*worker.take_delta())
    assert report_of(gateway)[EP]["fields"][0]["example"] == {
        "primary": "10.5",
        "candidate": "10.51",
    }
    gateway.reset(ROUTE)
    worker.record(ROUTE, EP, TOTAL, None)
    gateway.absorb(*worker.take_delta())
    (total,) = report_of(gateway)[EP]["fields"]
    assert total["diffs"] == 1 and "example" in total
    _, pending = gateway.take_delta()
    assert pending == {ROUTE: {f"{EP}{SEP}$.total": TOTAL["$.total"]}}  # on to Redis
