"""The response cache's HTTP semantics (RFC 9111, as a shared cache), end to end.

One gateway process (no Redis: the in-process layer) serves every test of
this module, with one caching route per setting under its own path prefix,
in front of the stubs' ``/__stub/cacheable/...`` endpoint: its query says
which headers the response carries (``h=Name:Value``), and its body counts
the requests that reached it for that exact target (``n``). A cached answer
is told from a fresh one by ``n``, by the stubs' hit counters and by the
gateway's ``X-Strangler-Cache`` debug header; the gateway's cache metrics
say why a response was not stored.

Every test uses a path of its own (a uuid in it), so entries and counters of
one test never meet another's. Waits for expiry are the only sleeps; they
are short and rely on lower bounds only (an entry *is* stale after its
lifetime), never on how fast anything answers.
"""

from __future__ import annotations

import email.utils
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from gateway import GatewayProcess, route_file

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("clean_stubs")]

TIMEOUT = httpx.Timeout(10.0)
BASE = "/__stub/cacheable"
CACHE = "x-strangler-cache"


# ------------------------------------------------------------------ the gateway


def _route(name: str, cache: dict[str, Any], *backends: str, **extra: Any) -> dict[str, Any]:
    names = backends or ("mono",)
    return {
        "name": name,
        "match": {"path_prefix": f"{BASE}/{name}"},
        "backends": [{"name": b, "weight": 100 if i == 0 else 0} for i, b in enumerate(names)],
        "cache": cache,
        **extra,
    }


def _config(monolith: str, orders: str) -> dict[str, Any]:
    routes = [
        _route("http", {}),
        _route("cookie", {"store_set_cookie": True}),
        _route("sie", {"stale_if_error": "30s"}, "flaky"),
        _route("tenant", {"vary": ["X-Tenant"]}),
        _route("heur", {"heuristic": True}),
        _route("ttl", {"mode": "ttl", "ttl": "2s"}),
        _route("iq", {"ignore_query": ["utm_*", "ref"]}),
        _route("small", {"max_object_bytes": 4096}),
        _route("split", {}, "mono", "orders", allow_override=True),
        _route("shared", {"shared_backends": True}, "mono", "orders", allow_override=True),
    ]
    # "flaky" is the monolith under another name, so the failures injected
    # for stale-if-error tests stay out of the other routes' backend.
    cfg = route_file({"mono": monolith, "orders": orders, "flaky": monolith}, routes)
    cfg["defaults"] = {"breaker": {"enabled": False}}
    return cfg


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, monolith: str, orders: str
) -> Iterator[GatewayProcess]:
    proc = GatewayProcess(tmp_path_factory.mktemp("cache-http"), _config(monolith, orders))
    proc.start()
    yield proc
    proc.stop(timeout=10)


@pytest.fixture(scope="module")
def client(gw: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=TIMEOUT) as c:
        yield c


# ------------------------------------------------------------------ helpers


def resource(route: str, *headers: str, query: str = "") -> str:
    """A fresh target on ``route`` whose responses carry ``headers`` ("Name:Value")."""
    parts = [f"h={quote(h, safe='')}" for h in headers]
    if query:
        parts.append(query)
    path = f"{BASE}/{route}/{uuid.uuid4().hex}"
    return f"{path}?{'&'.join(parts)}" if parts else path


def path_of(target: str) -> str:
    return target.partition("?")[0]


def http_date(offset: float) -> str:
    return email.utils.formatdate(time.time() + offset, usegmt=True)


def outcome(resp: httpx.Response) -> str | None:
    value: str | None = resp.headers.get(CACHE)
    return value


def n_of(resp: httpx.Response) -> int:
    assert resp.status_code == 200, resp.text
    return int(resp.json()["n"])


def stub_hits(stub: str, path: str) -> int:
    stats = httpx.get(stub + "/__stub/stats", timeout=5).json()
    return int(stats["by_path"].get(path, 0))


def set_fault(stub: str, prefix: str, status: int = 500) -> None:
    httpx.put(
        stub + "/__stub/faults",
        json={"prefix": prefix, "error_rate": 1.0, "error_status": status},
        timeout=5,
    ).raise_for_status()


def clear_fault(stub: str, prefix: str) -> None:
    httpx.delete(stub + "/__stub/faults", params={"prefix": prefix}, timeout=5)


def not_stored(gw: GatewayProcess, route: str, reason: str) -> float:
    return gw.metric("strangler_cache_not_stored_total", route=route, reason=reason)


def results(gw: GatewayProcess, route: str, result: str) -> float:
    return gw.metric("strangler_cache_requests_total", route=route, result=result)


def assert_hit(resp: httpx.Response, n: int = 1) -> None:
    assert outcome(resp) == "HIT", resp.headers
    assert n_of(resp) == n
    assert "age" in resp.headers


def assert_miss(resp: httpx.Response, n: int) -> None:
    assert outcome(resp) == "MISS", resp.headers
    assert n_of(resp) == n


def miss_then_hit(client: httpx.Client, target: str, **kw: Any) -> None:
    assert_miss(client.get(target, **kw), 1)
    assert_hit(client.get(target, **kw))


def miss_twice(client: httpx.Client, target: str, **kw: Any) -> None:
    assert_miss(client.get(target, **kw), 1)
    assert_miss(client.get(target, **kw), 2)


# ------------------------------------------------------------------ 1. freshness


def test_s_maxage_beats_a_zero_max_age(client: httpx.Client) -> None:
    miss_then_hit(client, resource("http", "Cache-Control:s-maxage=60, max-age=0"))


def test_zero_s_maxage_beats_a_long_max_age(client: httpx.Client) -> None:
    miss_twice(client, resource("http", "Cache-Control:max-age=60, s-maxage=0"))


def test_max_age_beats_an_expires_in_the_past(client: httpx.Client) -> None:
    miss_then_hit(
        client, resource("http", "Cache-Control:max-age=60", f"Expires:{http_date(-3600)}")
    )


def test_zero_max_age_beats_an_expires_in_the_future(client: httpx.Client) -> None:
    miss_twice(client, resource("http", "Cache-Control:max-age=0", f"Expires:{http_date(3600)}"))


def test_expires_in_the_future_alone_makes_a_response_fresh(client: httpx.Client) -> None:
    miss_then_hit(client, resource("http", f"Expires:{http_date(3600)}"))


def test_expires_in_the_past_alone_is_not_fresh(client: httpx.Client) -> None:
    miss_twice(client, resource("http", f"Expires:{http_date(-3600)}"))


def test_an_entry_is_a_miss_once_its_max_age_has_passed(client: httpx.Client) -> None:
    target = resource("http", "Cache-Control:max-age=1")
    assert_miss(client.get(target), 1)
    time.sleep(1.5)
    assert_miss(client.get(target), 2)


def test_every_hit_carries_an_age_that_grows(client: httpx.Client) -> None:
    target = resource("http", "Cache-Control:max-age=60")
    assert_miss(client.get(target), 1)
    first = client.get(target)
    assert_hit(first)
    time.sleep(1.1)
    later = client.get(target)
    assert_hit(later)
    assert int(later.headers["age"]) >= max(1, int(first.headers["age"]) + 1)


def test_an_upstream_age_counts_against_freshness(client: httpx.Client) -> None:
    target = resource("http", "Cache-Control:max-age=60", "Age:58")
    assert_miss(client.get(target), 1)
    hit = client.get(target)
    assert_hit(hit)
    assert int(hit.headers["age"]) >= 58
    time.sleep(2.2)  # 58 s old + 2.2 s > 60 s: stale, and nothing to revalidate with
    assert_miss(client.get(target), 2)


# ------------------------------------------------------------------ 2. not stored


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (("Cache-Control:no-store, max-age=60",), "no-store"),
        (("Cache-Control:private, max-age=60",), "private"),
        (("Cache-Control:max-age=60", "Set-Cookie:session=abc"), "set-cookie"),
        (("Cache-Control:max-age=60", "Vary:*"), "vary-star"),
        ((), "no-freshness"),
        (("Content-Type:text/plain",), "no-freshness"),
    ],
    ids=["no-store", "private", "set-cookie", "vary-star", "no-headers", "no-freshness"],
)
def test_responses_that_may_not_be_stored_reach_the_backend_every_time(
    gw: GatewayProcess, client: httpx.Client, headers: tuple[str, ...], reason: str
) -> None:
    before = not_stored(gw, "http", reason)
    miss_twice(client, resource("http", *headers))
    assert not_stored(gw, "http", reason) - before == 2


def test_store_set_cookie_stores_the_response_without_its_cookie(client: httpx.Client) -> None:
    target = resource("cookie", "Cache-Control:max-age=60", "Set-Cookie:session=abc")
    miss = client.get(target)
    assert_miss(miss, 1)
    assert miss.headers.get("set-cookie") == "session=abc"  # the miss passes it on
    hit = client.get(target)
    assert_hit(hit)
    assert "set-cookie" not in hit.headers


# ------------------------------------------------------------------ 3. no-cache, must-revalidate


def test_no_cache_revalidates_every_request_with_the_etag(
    monolith: str, client: httpx.Client
) -> None:
    target = resource("http", "Cache-Control:no-cache", 'ETag:"nc1"')
    assert_miss(client.get(target), 1)
    for attempt in (2, 3):
        resp = client.get(target)
        assert resp.status_code == 200
        assert outcome(resp) == "REVALIDATED"
        assert n_of(resp) == 1  # the stored body: the stub answered 304
        assert resp.headers["etag"] == '"nc1"'
        assert stub_hits(monolith, path_of(target)) == attempt


def test_stale_if_error_serves_a_stale_entry_when_the_backend_fails(
    monolith: str, client: httpx.Client
) -> None:
    """The control for the must-revalidate test below: the same route and
    failure, without must-revalidate, does serve stale."""
    target = resource("sie", "Cache-Control:max-age=0", 'ETag:"s1"')
    assert_miss(client.get(target), 1)
    set_fault(monolith, path_of(target))
    resp = client.get(target)
    assert resp.status_code == 200
    assert outcome(resp) == "STALE"
    assert n_of(resp) == 1
    assert resp.headers["warning"].startswith("111")


def test_must_revalidate_is_not_served_stale_even_with_stale_if_error(
    monolith: str, client: httpx.Client
) -> None:
    target = resource("sie", "Cache-Control:max-age=0, must-revalidate", 'ETag:"m1"')
    assert_miss(client.get(target), 1)
    # Stored, and revalidated once stale rather than served as it is.
    again = client.get(target)
    assert outcome(again) == "REVALIDATED"
    assert n_of(again) == 1
    set_fault(monolith, path_of(target))
    failed = client.get(target)
    assert failed.status_code == 500
    assert outcome(failed) != "STALE"
    assert "warning" not in failed.headers


# ------------------------------------------------------------------ 4. conditional revalidation


@pytest.mark.parametrize(
    "validator", ['ETag:"rv1"', f"Last-Modified:{http_date(-86400)}"], ids=["etag", "last-modified"]
)
def test_a_stale_entry_is_revalidated_and_refreshed_by_a_304(
    monolith: str, client: httpx.Client, validator: str
) -> None:
    target = resource("http", "Cache-Control:max-age=2", validator)
    assert_miss(client.get(target), 1)
    time.sleep(2.2)
    resp = client.get(target)
    assert resp.status_code == 200
    assert outcome(resp) == "REVALIDATED"
    assert n_of(resp) == 1  # the full stored body, after the stub's 304
    assert stub_hits(monolith, path_of(target)) == 2  # the conditional request
    assert int(resp.headers["age"]) <= 1  # the 304 made the entry new again
    assert_hit(client.get(target))
    assert stub_hits(monolith, path_of(target)) == 2


# ------------------------------------------------------------------ 5. vary


def test_origin_vary_keeps_one_entry_per_accept_language(client: httpx.Client) -> None:
    target = resource("http", "Cache-Control:max-age=60", "Vary:Accept-Language")
    en = {"Accept-Language": "en"}
    de = {"Accept-Language": "de"}
    assert_miss(client.get(target, headers=en), 1)
    assert_miss(client.get(target, headers=de), 2)
    hit_en = client.get(target, headers=en)
    assert_hit(hit_en, 1)
    assert hit_en.json()["accept_language"] == "en"
    hit_de = client.get(target, headers=de)
    assert_hit(hit_de, 2)
    assert hit_de.json()["accept_language"] == "de"
    assert_miss(client.get(target), 3)  # no Accept-Language: a third variant
    assert_hit(client.get(target), 3)


def test_route_vary_keeps_one_entry_per_tenant_without_the_origin_saying_so(
    client: httpx.Client,
) -> None:
    target = resource("tenant", "Cache-Control:max-age=60")
    assert_miss(client.get(target, headers={"X-Tenant": "a"}), 1)
    assert_miss(client.get(target, headers={"X-Tenant": "b"}), 2)
    assert_hit(client.get(target, headers={"X-Tenant": "a"}), 1)
    assert_hit(client.get(target, headers={"X-Tenant": "b"}), 2)


# ------------------------------------------------------------------ 6. authorization

AUTH = {"Authorization": "Bearer t0k3n"}


def test_a_request_with_authorization_is_not_served_from_a_plain_max_age_entry(
    client: httpx.Client,
) -> None:
    target = resource("http", "Cache-Control:max-age=60")
    miss_then_hit(client, target)
    authorized = client.get(target, headers=AUTH)
    assert_miss(authorized, 2)
    assert authorized.json()["authorized"] is True
    # ... and its answer was not stored over the shared one.
    assert_hit(client.get(target), 1)


def test_the_answer_to_a_request_with_authorization_is_not_stored(
    gw: GatewayProcess, client: httpx.Client
) -> None:
    before = not_stored(gw, "http", "authorization")
    target = resource("http", "Cache-Control:max-age=60")
    assert_miss(client.get(target, headers=AUTH), 1)
    assert_miss(client.get(target, headers=AUTH), 2)
    assert_miss(client.get(target), 3)
    assert not_stored(gw, "http", "authorization") - before == 2


@pytest.mark.parametrize("control", ["public, max-age=60", "s-maxage=60"])
def test_public_or_s_maxage_responses_are_shared_with_authorized_requests(
    client: httpx.Client, control: str
) -> None:
    target = resource("http", f"Cache-Control:{control}")
    assert_miss(client.get(target, headers=AUTH), 1)
    assert_hit(client.get(target, headers=AUTH))
    assert_hit(client.get(target))


# ------------------------------------------------------------------ 7. invalidation


# M-SEARCH: a method the gateway does not know counts as unsafe (RFC 9111 §4.4).
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "M-SEARCH"])
def test_a_successful_unsafe_method_invalidates_its_uri(
    gw: GatewayProcess, client: httpx.Client, method: str
) -> None:
    before = gw.metric("strangler_cache_invalidations_total", route="http", cause="unsafe_method")
    target = resource("http", "Cache-Control:max-age=60")
    miss_then_hit(client, target)
    changed = client.request(method, target)
    assert changed.status_code == 200
    assert changed.json()["method"] == method
    assert_miss(client.get(target), 3)
    after = gw.metric("strangler_cache_invalidations_total", route="http", cause="unsafe_method")
    assert after > before


def test_a_failed_unsafe_method_does_not_invalidate(monolith: str, client: httpx.Client) -> None:
    target = resource("http", "Cache-Control:max-age=60")
    miss_then_hit(client, target)
    set_fault(monolith, path_of(target))
    assert client.post(target).status_code == 500
    clear_fault(monolith, path_of(target))
    assert_hit(client.get(target))


@pytest.mark.parametrize("header", ["Location", "Content-Location"])
def test_a_same_host_location_on_an_unsafe_answer_invalidates_that_uri(
    client: httpx.Client, header: str
) -> None:
    other = resource("http", "Cache-Control:max-age=60")
    miss_then_hit(client, other)
    posted = client.post(resource("http", f"{header}:{other}"))
    assert posted.status_code == 200
    assert_miss(client.get(other), 2)


def test_a_location_on_another_host_does_not_invalidate(client: httpx.Client) -> None:
    other = resource("http", "Cache-Control:max-age=60")
    miss_then_hit(client, other)
    posted = client.post(resource("http", f"Location:http://elsewhere.invalid{other}"))
    assert posted.status_code == 200
    assert_hit(client.get(other))


# ------------------------------------------------------------------ 8. heuristic freshness


def test_last_modified_alone_is_not_stored_by_default(
    gw: GatewayProcess, client: httpx.Client
) -> None:
    before = not_stored(gw, "http", "no-freshness")
    miss_twice(client, resource("http", f"Last-Modified:{http_date(-86400)}"))
    assert not_stored(gw, "http", "no-freshness") - before == 2


def test_last_modified_alone_is_stored_when_the_route_allows_heuristic_freshness(
    client: httpx.Client,
) -> None:
    miss_then_hit(client, resource("heur", f"Last-Modified:{http_date(-86400)}"))


# ------------------------------------------------------------------ 9. mode ttl


def test_ttl_mode_caches_a_response_without_cache_headers_for_the_ttl(
    client: httpx.Client,
) -> None:
    target = resource("ttl")
    miss_then_hit(client, target)
    time.sleep(2.2)
    assert_miss(client.get(target), 2)


def test_ttl_mode_still_keeps_no_store_responses_out(
    gw: GatewayProcess, client: httpx.Client
) -> None:
    before = not_stored(gw, "ttl", "no-store")
    miss_twice(client, resource("ttl", "Cache-Control:no-store"))
    assert not_stored(gw, "ttl", "no-store") - before == 2


# ------------------------------------------------------------------ 10. client conditionals


@pytest.mark.parametrize("tag", ['"c1"', 'W/"c1"', '"x", "c1"', "*"])
def test_a_matching_if_none_match_gets_a_304_from_the_cache(
    monolith: str, client: httpx.Client, tag: str
) -> None:
    target = resource("http", "Cache-Control:max-age=60", 'ETag:"c1"')
    assert_miss(client.get(target), 1)
    resp = client.get(target, headers={"If-None-Match": tag})
    assert resp.status_code == 304
    assert outcome(resp) == "HIT"
    assert resp.headers["etag"] == '"c1"'
    assert resp.content == b""
    assert stub_hits(monolith, path_of(target)) == 1


def test_a_different_if_none_match_gets_the_full_hit(client: httpx.Client) -> None:
    target = resource("http", "Cache-Control:max-age=60", 'ETag:"c2"')
    assert_miss(client.get(target), 1)
    assert_hit(client.get(target, headers={"If-None-Match": '"other"'}))


def test_if_modified_since_after_last_modified_gets_a_304_from_the_cache(
    client: httpx.Client,
) -> None:
    target = resource("http", "Cache-Control:max-age=60", f"Last-Modified:{http_date(-86400)}")
    assert_miss(client.get(target), 1)
    resp = client.get(target, headers={"If-Modified-Since": http_date(-3600)})
    assert resp.status_code == 304
    assert outcome(resp) == "HIT"
    older = client.get(target, headers={"If-Modified-Since": http_date(-2 * 86400)})
    assert_hit(older)


# ------------------------------------------------------------------ 11. query and size


def test_ignored_query_parameters_share_the_entry(client: httpx.Client) -> None:
    base = resource("iq", "Cache-Control:max-age=60")
    assert_miss(client.get(base + "&utm_source=news"), 1)
    assert_hit(client.get(base))
    assert_hit(client.get(base + "&utm_campaign=spring&ref=home"))
    assert_hit(client.get(base + "&ref=other"))


def test_other_query_parameters_get_their_own_entry(client: httpx.Client) -> None:
    base = resource("iq", "Cache-Control:max-age=60")
    assert_miss(client.get(base), 1)
    assert_miss(client.get(base + "&page=2"), 1)
    assert_miss(client.get(base + "&utm=1"), 1)  # "utm" is not "utm_*"
    assert_hit(client.get(base + "&page=2&utm_medium=mail"))


def test_a_response_over_max_object_bytes_streams_through_and_is_not_stored(
    gw: GatewayProcess, client: httpx.Client
) -> None:
    before = not_stored(gw, "small", "too_large")
    target = resource("small", "Cache-Control:max-age=60", query="size=20000")
    for n in (1, 2):
        resp = client.get(target)
        assert_miss(resp, n)
        assert len(resp.json()["pad"]) == 20000
        assert int(resp.headers["content-length"]) == len(resp.content)
    assert not_stored(gw, "small", "too_large") - before == 2


def test_a_response_under_max_object_bytes_is_stored(client: httpx.Client) -> None:
    miss_then_hit(client, resource("small", "Cache-Control:max-age=60", query="size=1000"))


# ------------------------------------------------------------------ 12. backends in the key


def _via(backend: str) -> dict[str, str]:
    return {"X-Strangler-Backend": backend}


def test_each_backend_of_a_route_keeps_its_own_entries(client: httpx.Client) -> None:
    target = resource("split", "Cache-Control:max-age=60")
    first = client.get(target, headers=_via("mono"))
    assert_miss(first, 1)
    assert first.json()["service"] == "monolith"
    second = client.get(target, headers=_via("orders"))
    assert_miss(second, 1)
    assert second.json()["service"] == "orders"
    for backend, service in (("mono", "monolith"), ("orders", "orders")):
        hit = client.get(target, headers=_via(backend))
        assert_hit(hit)
        assert hit.json()["service"] == service
        assert hit.headers["x-strangler-backend"] == backend


def test_shared_backends_share_one_entry(client: httpx.Client) -> None:
    target = resource("shared", "Cache-Control:max-age=60")
    assert_miss(client.get(target, headers=_via("mono")), 1)
    hit = client.get(target, headers=_via("orders"))
    assert_hit(hit)
    assert hit.json()["service"] == "monolith"


# ------------------------------------------------------------------ 13. HEAD and Range


def test_head_is_answered_from_a_stored_get_without_a_body(
    monolith: str, client: httpx.Client
) -> None:
    target = resource("http", "Cache-Control:max-age=60")
    got = client.get(target)
    assert_miss(got, 1)
    head = client.head(target)
    assert head.status_code == 200
    assert outcome(head) == "HIT"
    assert head.content == b""
    assert int(head.headers["content-length"]) == len(got.content)
    assert stub_hits(monolith, path_of(target)) == 1


def test_a_head_miss_is_not_stored(client: httpx.Client) -> None:
    target = resource("http", "Cache-Control:max-age=60")
    head = client.head(target)
    assert head.status_code == 200
    assert outcome(head) != "HIT"
    assert_miss(client.get(target), 2)


def test_a_range_request_bypasses_the_cache(
    gw: GatewayProcess, monolith: str, client: httpx.Client
) -> None:
    target = resource("http", "Cache-Control:max-age=60")
    miss_then_hit(client, target)
    before = results(gw, "http", "bypass")
    ranged = client.get(target, headers={"Range": "bytes=0-3"})
    assert CACHE not in ranged.headers
    assert stub_hits(monolith, path_of(target)) == 2
    assert results(gw, "http", "bypass") - before == 1
    assert_hit(client.get(target))  # the stored entry is untouched
