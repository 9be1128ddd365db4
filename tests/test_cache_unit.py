"""The cache's pure parts, in process: stored entries and their encoding, the
in-process LRU, a route's keys, variant selection, freshness for a request,
what may be stored, 304 refreshes, client conditionals, purge matching, and
the ``cache:`` block of the route file."""

from __future__ import annotations

import email.utils
import gc
import textwrap
from collections.abc import Sequence

import pytest
from prometheus_client import REGISTRY

from strangler import config, metrics
from strangler.cache import (
    COLLECT_EVERY,
    ENTRY_OVERHEAD,
    MAX_KEY_CHARS,
    MAX_VARIANTS,
    Entry,
    MemoryLayer,
    PurgeRequest,
    RequestInfo,
    RoutePolicy,
    is_unsafe,
)
from strangler.config import Cache
from strangler.exceptions import ConfigError

T = 1_800_000_000.0  # a fixed "now"; nothing here reads the clock
H = list[tuple[bytes, bytes]]


def hdrs(*pairs: tuple[str, str]) -> H:
    return [(n.lower().encode(), v.encode()) for n, v in pairs]


def entry(
    *headers: tuple[str, str],
    body: bytes = b"x",
    vary: tuple[tuple[str, str | None], ...] = (),
    lifetime: float = 60.0,
    initial_age: float = 0.0,
    swr: float = 0.0,
    sie: float = 0.0,
) -> Entry:
    return Entry.make(
        status=200,
        headers=hdrs(*headers),
        body=body,
        request_time=T,
        response_time=T,
        initial_age=initial_age,
        lifetime=lifetime,
        vary=vary,
        backend="mono",
        stale_while_revalidate=swr,
        stale_if_error=sie,
    )


def policy(name: str = "r", **settings: object) -> RoutePolicy:
    return RoutePolicy(name, Cache.model_validate(settings))


def build(
    pol: RoutePolicy,
    *headers: tuple[str, str],
    status: int = 200,
    request: Sequence[tuple[str, str]] = (),
) -> Entry | str:
    req = hdrs(*request)
    return pol.build_entry(
        status=status,
        headers=hdrs(*headers),
        body=b'{"ok":true}',
        request_headers=req,
        request=RequestInfo.read(req),
        request_time=T,
        response_time=T,
        backend="mono",
    )


# ------------------------------------------------------------------ conformance details


def test_of_two_age_lines_the_first_counts() -> None:
    pol = policy()
    assert build(pol, ("Cache-Control", "max-age=3600"), ("Age", "7200"), ("Age", "0")) == (
        "no-freshness"
    )
    kept = build(pol, ("Cache-Control", "max-age=3600"), ("Age", "0"), ("Age", "7200"))
    assert isinstance(kept, Entry)
    assert kept.initial_age < 3600


def test_two_expires_lines_mean_already_expired() -> None:
    future = email.utils.formatdate(T + 3600, usegmt=True)
    assert build(policy(), ("Expires", future)) != "no-freshness"
    assert build(policy(), ("Expires", future), ("Expires", future)) == "no-freshness"


def test_cdn_cache_control_replaces_cache_control_and_expires() -> None:
    pol = policy()
    stored = build(pol, ("Cache-Control", "no-store"), ("CDN-Cache-Control", "max-age=600"))
    assert isinstance(stored, Entry)
    assert stored.lifetime == 600
    assert build(pol, ("Cache-Control", "max-age=600"), ("CDN-Cache-Control", "no-store")) == (
        "no-store"
    )
    assert build(pol, ("Cache-Control", "max-age=600"), ("CDN-Cache-Control", "private")) == (
        "private"
    )
    future = email.utils.formatdate(T + 3600, usegmt=True)
    assert build(pol, ("CDN-Cache-Control", "max-age=0"), ("Expires", future)) == (
        "no-freshness"
    )
    revalidated = build(
        pol, ("Cache-Control", "max-age=600"), ("CDN-Cache-Control", "no-cache"), ("ETag", '"1"')
    )
    assert isinstance(revalidated, Entry)
    assert revalidated.no_cache
    decoded = Entry.decode(revalidated.encode())  # as read back from Redis
    assert decoded is not None and decoded.no_cache


def test_an_invalid_cdn_cache_control_leaves_cache_control_in_charge() -> None:
    assert build(policy(), ("Cache-Control", "no-store"), ("CDN-Cache-Control", 'max-age="1"')) == (
        "no-store"
    )


@pytest.mark.parametrize(
    ("method", "unsafe"),
    [("POST", True), ("DELETE", True), ("M-SEARCH", True), ("GET", False), ("OPTIONS", False)],
)
def test_every_method_but_the_safe_ones_invalidates(method: str, unsafe: bool) -> None:
    assert is_unsafe(method) is unsafe


# ------------------------------------------------------------------ entries


def test_entry_encodes_and_decodes_to_the_same_entry() -> None:
    original = entry(
        ("Cache-Control", "max-age=60, stale-if-error=5"),
        ("ETag", '"e1"'),
        ("Last-Modified", "Wed, 21 Oct 2015 07:28:00 GMT"),
        ("X-Latin", "caf\xe9"),
        body=b"line one\nline two\n\x00\xff",
        vary=(("accept-language", "en"), ("x-tenant", None)),
        initial_age=3.5,
        swr=7.0,
        sie=11.0,
    )
    decoded = Entry.decode(original.encode())
    assert decoded is not None
    for name in (
        "status", "headers", "body", "request_time", "response_time", "initial_age",
        "lifetime", "vary", "backend", "stale_while_revalidate", "stale_if_error",
        "etag", "last_modified", "expires_at", "vary_names", "no_cache",
    ):  # fmt: skip
        assert getattr(decoded, name) == getattr(original, name), name
    assert decoded.control.seconds("max-age") == 60


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"no newline at all",
        b"{not json\nbody",
        b"[1, 2]\nbody",
        b"5\nbody",
        b'{"s": 200}\nbody',
        b'{"s": "ok", "h": [], "rq": 0, "rs": 0, "ia": 0, "l": 0, "v": [], "b": "m"}\n',
        b'{"s": 200, "h": 5, "rq": 0, "rs": 0, "ia": 0, "l": 0, "v": [], "b": "m"}\n',
        b'{"s": 200, "h": [[1, 2]], "rq": 0, "rs": 0, "ia": 0, "l": 0, "v": [], "b": "m"}\n',
        b'{"s": 200, "h": [["a", null]], "rq": 0, "rs": 0, "ia": 0, "l": 0, "v": [], "b": "m"}\n',
        b'{"s": 200, "h": [["\\u20ac", "v"]], "rq": 0, "rs": 0, "ia": 0, "l": 0, "v": [],'
        b' "b": "m"}\n',
        b'{"s": 200, "h": [], "rq": 0, "rs": 0, "ia": 0, "l": 0, "v": [["a"]], "b": "m"}\n',
        b"\xff\xfe\nbody",
    ],
    ids=[
        "empty",
        "no-newline",
        "bad-json",
        "list",
        "number",
        "missing-fields",
        "bad-status",
        "headers-not-a-list",
        "header-name-not-a-string",
        "header-value-null",
        "header-not-latin-1",
        "vary-pair-too-short",
        "not-utf-8",
    ],  # fmt: skip
)
def test_decoding_garbage_gives_none_and_never_raises(blob: bytes) -> None:
    assert Entry.decode(blob) is None


def test_entry_is_kept_past_freshness_only_when_it_can_be_revalidated() -> None:
    plain = entry(lifetime=10.0)
    assert plain.expires_at == T + 10.0
    validated = entry(("ETag", '"v"'), lifetime=10.0)
    assert validated.expires_at > T + 300
    stale_window = entry(lifetime=10.0, sie=30.0)
    assert stale_window.expires_at == T + 40.0


# ------------------------------------------------------------------ the memory layer


def _evictions(route: str) -> float:
    metrics.flush()
    return REGISTRY.get_sample_value("strangler_cache_evictions_total", {"route": route}) or 0.0


def test_memory_layer_evicts_the_least_recently_used_key_and_counts_it() -> None:
    big = entry(body=b"x" * 800)
    size = big.size
    layer = MemoryLayer(max_bytes=2 * size + size // 2)
    before = _evictions("lru-route")
    assert layer.put("a", "lru-route", big)
    assert layer.put("b", "lru-route", entry(body=b"x" * 800))
    assert layer.get("a", T) is not None  # "a" is now the most recently used
    assert layer.put("c", "lru-route", entry(body=b"x" * 800))
    assert layer.get("b", T) is None
    assert layer.get("a", T) is not None and layer.get("c", T) is not None
    assert len(layer) == 2
    assert layer.bytes == 2 * size <= layer.max_bytes
    assert _evictions("lru-route") - before == 1


def test_memory_layer_refuses_an_entry_larger_than_its_bound() -> None:
    layer = MemoryLayer(max_bytes=500)
    assert not layer.put("k", "r", entry(body=b"x" * 1000))
    assert len(layer) == 0 and layer.bytes == 0


def test_memory_layer_keeps_at_most_max_variants_per_key_dropping_the_oldest() -> None:
    layer = MemoryLayer(max_bytes=10**7)
    for i in range(MAX_VARIANTS + 3):
        layer.put("k", "r", entry(vary=(("accept-language", f"l{i}"),)))
    kept = layer.get("k", T)
    assert kept is not None and len(kept) == MAX_VARIANTS
    assert [e.vary[0][1] for e in kept] == [f"l{i}" for i in range(3, MAX_VARIANTS + 3)]
    assert layer.bytes == sum(e.size for e in kept)


def test_memory_layer_replaces_a_variant_stored_again() -> None:
    layer = MemoryLayer(max_bytes=10**7)
    layer.put("k", "r", entry(body=b"old", vary=(("x-tenant", "a"),)))
    newer = entry(body=b"newer", vary=(("x-tenant", "a"),))
    layer.put("k", "r", newer)
    assert layer.get("k", T) == [newer._replace(route="r")]  # the layer stamps its route
    assert layer.bytes == newer.size


def test_memory_layer_forgets_expired_entries_on_read() -> None:
    layer = MemoryLayer(max_bytes=10**7)
    short = entry(lifetime=1.0, vary=(("x-tenant", "a"),))
    long = entry(lifetime=60.0, vary=(("x-tenant", "b"),))
    layer.put("k", "r", short)
    layer.put("k", "r", long)
    assert layer.get("k", T + 5) == [long._replace(route="r")]
    assert layer.bytes == long.size
    assert layer.get("k", T + 100) is None
    assert len(layer) == 0 and layer.bytes == 0


def test_stored_entries_leave_the_garbage_collectors_sight() -> None:
    # With automatic collection off, only the layer's own young-generation pass
    # (every COLLECT_EVERY stores) can untrack entries; it does so only if an
    # entry holds nothing but atomic values (the header block packed into bytes).
    layer = MemoryLayer(max_bytes=10**9)
    pol = policy()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(3 * COLLECT_EVERY):
            built = build(pol, ("Cache-Control", "max-age=60"), ("ETag", f'"{i}"'))
            assert isinstance(built, Entry)
            layer.put(f"k{i}", "r", built)
        tracked = sum(gc.is_tracked(v) for v in layer._data.values())
    finally:
        if was_enabled:
            gc.enable()
    assert len(layer) == 3 * COLLECT_EVERY
    assert tracked < COLLECT_EVERY


def test_an_entry_packs_its_headers_and_gives_them_back_in_order() -> None:
    e = entry(("Cache-Control", "max-age=60"), ("X-A", "1"), ("X-A", "2"), ("X-Empty", ""))
    pairs = [(b"cache-control", b"max-age=60"), (b"x-a", b"1"), (b"x-a", b"2"), (b"x-empty", b"")]
    assert list(e.headers) == pairs and e.header_list() == pairs
    assert isinstance(e.head, bytes)
    assert entry().headers == ()
    assert Entry.decode(e.encode()) == e


def test_a_header_holding_nul_is_never_stored() -> None:
    with pytest.raises(ValueError):
        entry(("X-A", "a\x00b"))
    assert build(policy(), ("Cache-Control", "max-age=60"), ("X-A", "a\x00b")) == "invalid-header"


def test_a_stored_response_without_content_length_gets_one() -> None:
    built = build(policy(), ("Cache-Control", "max-age=60"))
    assert isinstance(built, Entry)
    assert dict(built.headers)[b"content-length"] == b"11"
    declared = build(policy(), ("Cache-Control", "max-age=60"), ("Content-Length", "11"))
    assert isinstance(declared, Entry)
    assert [n for n, _ in declared.headers].count(b"content-length") == 1


def test_an_entry_counts_its_body_header_block_and_overhead() -> None:
    e = entry(("Cache-Control", "max-age=60"), body=b"x" * 100)
    assert e.size == 100 + len(e.head) + ENTRY_OVERHEAD


def test_memory_layer_drops_keys_and_matching_keys() -> None:
    layer = MemoryLayer(max_bytes=10**7)
    for key in ("p:cache:r:m:/a@h", "p:cache:r:m:/b@h", "p:cache:s:m:/a@h"):
        layer.put(key, "r", entry())
    assert layer.drop(["p:cache:r:m:/a@h", "missing"]) == 1
    assert layer.drop_matching(lambda k: ":s:" in k) == 1
    assert len(layer) == 1 and layer.bytes == entry().size


# ------------------------------------------------------------------ keys


def test_key_holds_route_backend_path_query_and_host() -> None:
    key = policy("orders").key("gw:", "mono", "shop.example", "/api/x", b"a=1&b=2")
    assert key == "gw:cache:orders:mono:/api/x?a=1&b=2@shop.example"
    assert policy().key("", "mono", "h", "/x", b"") == "cache:r:mono:/x@h"


def test_shared_backends_use_one_scope() -> None:
    pol = policy(shared_backends=True)
    assert pol.key("", "mono", "h", "/x", b"") == pol.key("", "orders", "h", "/x", b"")
    assert ":*:" in pol.key("", "mono", "h", "/x", b"")
    plain = policy()
    assert plain.key("", "mono", "h", "/x", b"") != plain.key("", "orders", "h", "/x", b"")


def test_ignore_query_drops_named_and_globbed_parameters_from_the_key() -> None:
    pol = policy(ignore_query=["ref", "utm_*"])
    key = pol.key("", "m", "h", "/x", b"utm_source=a&page=2&ref=b&utm_medium=c&sort=asc")
    assert key == "cache:r:m:/x?page=2&sort=asc@h"
    assert pol.key("", "m", "h", "/x", b"ref=1&utm_x=2") == "cache:r:m:/x@h"
    assert pol.key("", "m", "h", "/x", b"utm=1&reference=2") == "cache:r:m:/x?utm=1&reference=2@h"


def test_long_keys_are_bounded_and_stay_distinct() -> None:
    pol = policy()
    one = pol.key("", "m", "h", "/x", b"q=" + b"a" * 3000 + b"1")
    two = pol.key("", "m", "h", "/x", b"q=" + b"a" * 3000 + b"2")
    assert len(one) <= MAX_KEY_CHARS + 100
    assert one != two
    assert one == pol.key("", "m", "h", "/x", b"q=" + b"a" * 3000 + b"1")


# ------------------------------------------------------------------ variants


def test_select_picks_the_variant_matching_the_request() -> None:
    pol = policy()
    en = entry(vary=(("accept-language", "en"),))
    de = entry(vary=(("accept-language", "de"),))
    none = entry(vary=(("accept-language", None),))
    stored = [en, de, none]
    assert pol.select(stored, hdrs(("Accept-Language", "de"))) is de
    assert pol.select(stored, hdrs(("Accept-Language", "en"))) is en
    assert pol.select(stored, []) is none
    assert pol.select(stored, hdrs(("Accept-Language", "fr"))) is None
    assert pol.select(None, []) is None


def test_select_normalizes_whitespace_and_joins_header_lines() -> None:
    pol = policy()
    stored = [entry(vary=(("accept-language", "en, de"),))]
    request = [(b"accept-language", b"  en,"), (b"accept-language", b"de ")]
    assert pol.select(stored, [(b"accept-language", b"en,   de")]) is stored[0]
    assert RoutePolicy.request_value(request, "accept-language") == "en,, de"


def test_select_skips_entries_stored_before_the_route_varied_on_a_header() -> None:
    old = entry()  # stored when the route did not vary on X-Tenant
    assert policy().select([old], []) is old
    assert policy(vary=["X-Tenant"]).select([old], []) is None
    tenant = entry(vary=(("x-tenant", None),))
    assert policy(vary=["X-Tenant"]).select([old, tenant], []) is tenant


def test_select_prefers_the_newest_matching_variant() -> None:
    older = entry(vary=(("x-a", "1"),))
    newer = older.updated(response_time=T + 5)
    assert policy().select([older, newer], hdrs(("X-A", "1"))) is newer


# ------------------------------------------------------------------ freshness


def fresh(e: Entry, now: float, *request_cc: str) -> tuple[bool, bool, bool]:
    info = RequestInfo.read([(b"cache-control", v.encode()) for v in request_cc])
    f = policy().freshness(e, info, now)
    return f.fresh, f.serve_stale, f.stale_on_error


def test_freshness_follows_age_against_lifetime() -> None:
    e = entry(lifetime=60.0, initial_age=5.0)
    assert fresh(e, T + 10)[0]
    assert policy().freshness(e, RequestInfo.read([]), T + 10).age == 15.0
    assert not fresh(e, T + 56)[0]


def test_request_max_age_and_min_fresh_make_a_fresh_entry_unusable() -> None:
    e = entry(lifetime=60.0)
    assert fresh(e, T + 10, "max-age=20")[0]
    assert not fresh(e, T + 10, "max-age=5")[0]
    assert fresh(e, T + 10, "min-fresh=40")[0]
    assert not fresh(e, T + 10, "min-fresh=55")[0]


def test_request_max_stale_accepts_a_stale_entry_within_its_bound() -> None:
    e = entry(lifetime=60.0)
    assert fresh(e, T + 70, "max-stale")[0]
    assert fresh(e, T + 70, "max-stale=20")[0]
    assert not fresh(e, T + 70, "max-stale=5")[0]
    must = entry(("Cache-Control", "max-age=60, must-revalidate"), lifetime=60.0)
    assert not fresh(must, T + 70, "max-stale")[0]


def test_no_cache_on_either_side_forces_revalidation() -> None:
    assert not fresh(entry(lifetime=60.0), T + 1, "no-cache")[0]
    assert not fresh(entry(("Cache-Control", "no-cache, max-age=60")), T + 1)[0]
    pragma = RequestInfo.read([(b"pragma", b"no-cache")])
    assert not policy().freshness(entry(lifetime=60.0), pragma, T + 1).fresh


def test_stale_windows_allow_serving_stale_only_within_them() -> None:
    e = entry(lifetime=60.0, swr=30.0, sie=50.0)
    assert fresh(e, T + 80) == (False, True, True)
    assert fresh(e, T + 100) == (False, False, True)
    assert fresh(e, T + 120) == (False, False, False)
    must = entry(("Cache-Control", "must-revalidate"), lifetime=60.0, swr=30.0, sie=50.0)
    assert fresh(must, T + 80) == (False, False, False)


# ------------------------------------------------------------------ storing


@pytest.mark.parametrize(
    ("status", "headers", "sent", "reason"),
    [
        (206, [("Cache-Control", "max-age=60")], [], "status"),
        (500, [("Cache-Control", "max-age=60")], [], "status"),
        (200, [("Cache-Control", "no-store, max-age=60")], [], "no-store"),
        (200, [("Cache-Control", "max-age=60")], [("Cache-Control", "no-store")], "no-store"),
        (200, [("Cache-Control", "private, max-age=60")], [], "private"),
        (200, [("Cache-Control", "max-age=60"), ("Vary", "Accept, *")], [], "vary-star"),
        (200, [("Cache-Control", "max-age=60"), ("Set-Cookie", "a=b")], [], "set-cookie"),
        (200, [("Cache-Control", "max-age=60")], [("Authorization", "Basic x")], "authorization"),
        (200, [], [], "no-freshness"),
        (200, [("Last-Modified", "Wed, 21 Oct 2015 07:28:00 GMT")], [], "no-freshness"),
        (200, [("Cache-Control", "max-age=0")], [], "no-freshness"),
        (200, [("Cache-Control", "max-age=30"), ("Age", "40")], [], "no-freshness"),
    ],
)
def test_build_entry_says_why_a_response_is_not_stored(
    status: int, headers: list[tuple[str, str]], sent: list[tuple[str, str]], reason: str
) -> None:
    assert build(policy(), *headers, status=status, request=sent) == reason


def test_build_entry_stores_with_corrected_age_vary_and_without_hop_fields() -> None:
    pol = policy(store_set_cookie=True, vary=["X-Tenant"], stale_if_error=9)
    built = build(
        pol,
        ("Cache-Control", "max-age=60"),
        ("Age", "10"),
        ("Set-Cookie", "a=b"),
        ("Vary", "Accept-Language"),
        ("ETag", '"t"'),
        request=[("Accept-Language", "de"), ("X-Tenant", "acme")],
    )
    assert isinstance(built, Entry)
    assert built.lifetime == 60.0
    assert built.initial_age == 10.0
    names = {n for n, _ in built.headers}
    assert b"age" not in names and b"set-cookie" not in names
    assert built.vary == (("accept-language", "de"), ("x-tenant", "acme"))
    assert built.etag == b'"t"'
    assert built.stale_if_error == 9.0


def test_build_entry_uses_heuristic_and_ttl_lifetimes_when_configured() -> None:
    day_old = ("Last-Modified", "Wed, 21 Oct 2015 07:28:00 GMT")
    heuristic = build(policy(heuristic=True), day_old, ("Date", "Thu, 22 Oct 2015 07:28:00 GMT"))
    assert isinstance(heuristic, Entry) and heuristic.lifetime == pytest.approx(8640)
    ttl = build(policy(mode="ttl", ttl=30))
    assert isinstance(ttl, Entry) and ttl.lifetime == 30.0
    assert build(policy(mode="ttl", ttl=30), ("Cache-Control", "private")) == "private"


def test_refreshed_merges_the_304_headers_and_restarts_the_age() -> None:
    pol = policy()
    stored = build(
        pol,
        ("Cache-Control", "max-age=60"),
        ("ETag", '"one"'),
        ("Content-Length", "11"),
        ("X-Kept", "yes"),
        ("X-Changed", "old"),
    )
    assert isinstance(stored, Entry)
    later = T + 500
    refreshed = pol.refreshed(
        stored,
        hdrs(
            ("Cache-Control", "max-age=120"),
            ("ETag", '"two"'),
            ("Content-Length", "0"),
            ("X-Changed", "new"),
        ),
        later,
        later,
    )
    got = dict(refreshed.headers)
    assert got[b"cache-control"] == b"max-age=120"
    assert got[b"etag"] == b'"two"' and refreshed.etag == b'"two"'
    assert got[b"content-length"] == b"11"  # never taken from a 304
    assert got[b"x-kept"] == b"yes" and got[b"x-changed"] == b"new"
    assert refreshed.body == stored.body
    assert refreshed.lifetime == 120.0
    assert refreshed.age(later) == 0.0


def test_refreshed_by_a_304_that_forbids_storing_is_usable_once_but_not_fresh() -> None:
    pol = policy()
    stored = build(pol, ("Cache-Control", "max-age=60"), ("ETag", '"one"'))
    assert isinstance(stored, Entry)
    refreshed = pol.refreshed(stored, hdrs(("Cache-Control", "no-store")), T + 9, T + 9)
    assert refreshed.lifetime == 0.0
    assert refreshed.body == stored.body
    assert dict(refreshed.headers)[b"cache-control"] == b"no-store"


# ------------------------------------------------------------------ client conditionals


@pytest.mark.parametrize(
    ("request_headers", "matches"),
    [
        ([("If-None-Match", '"a1"')], True),
        ([("If-None-Match", 'W/"a1"')], True),
        ([("If-None-Match", '"zz", W/"a1"')], True),
        ([("If-None-Match", "*")], True),
        ([("If-None-Match", '"a2"')], False),
        ([("If-Modified-Since", "Wed, 21 Oct 2015 07:28:00 GMT")], True),
        ([("If-Modified-Since", "Wed, 21 Oct 2015 07:27:59 GMT")], False),
        ([("If-Modified-Since", "garbage")], False),
        # If-None-Match wins over If-Modified-Since (RFC 9110 §13.2.2).
        (
            [("If-None-Match", '"a2"'), ("If-Modified-Since", "Wed, 21 Oct 2025 07:28:00 GMT")],
            False,
        ),
        ([], False),
    ],
)
def test_not_modified_compares_etags_weakly_and_dates(
    request_headers: list[tuple[str, str]], matches: bool
) -> None:
    stored = entry(("ETag", 'W/"a1"'), ("Last-Modified", "Wed, 21 Oct 2015 07:28:00 GMT"))
    assert RequestInfo.read(hdrs(*request_headers)).not_modified(stored) is matches


def test_if_none_match_never_matches_an_entry_without_an_etag() -> None:
    assert not RequestInfo.read(hdrs(("If-None-Match", "*"))).not_modified(entry())


def test_request_info_reads_range_authorization_and_pragma() -> None:
    info = RequestInfo.read(
        hdrs(("Range", "bytes=0-1"), ("Authorization", "Bearer x"), ("Pragma", "no-cache"))
    )
    assert info.range and info.authorization and info.control.has("no-cache")
    explicit = RequestInfo.read(hdrs(("Cache-Control", "max-age=5"), ("Pragma", "no-cache")))
    assert not explicit.control.has("no-cache")  # Cache-Control wins over Pragma


# ------------------------------------------------------------------ purge


def _key(route: str, path: str, query: bytes = b"", backend: str = "mono") -> str:
    return policy(route).key("gw:", backend, "shop.example", path, query)


def test_purge_matches_by_route_prefix_and_url() -> None:
    key = _key("orders", "/api/orders/7", b"v=1")
    assert PurgeRequest(route="orders").matches(key, "gw:")
    assert not PurgeRequest(route="order").matches(key, "gw:")
    assert PurgeRequest(prefix="/api/orders").matches(key, "gw:")
    assert not PurgeRequest(prefix="/api/users").matches(key, "gw:")
    assert PurgeRequest(url="/api/orders/7?v=1").matches(key, "gw:")
    assert not PurgeRequest(url="/api/orders/7").matches(key, "gw:")
    assert PurgeRequest(route="orders", prefix="/api").matches(key, "gw:")
    assert not PurgeRequest(route="other", prefix="/api").matches(key, "gw:")
    at = _key("orders", "/api/users/a@b")
    assert PurgeRequest(url="/api/users/a@b").matches(at, "gw:")


def test_purge_matches_routes_whose_names_hold_a_colon() -> None:
    """Route names may contain ':' (the route file allows it)."""
    key = _key("api:v1", "/api/v1/items")
    assert PurgeRequest(route="api:v1").matches(key, "gw:")
    assert not PurgeRequest(route="api").matches(key, "gw:")
    assert PurgeRequest(prefix="/api/v1").matches(key, "gw:")
    assert PurgeRequest(url="/api/v1/items").matches(key, "gw:")
    assert not PurgeRequest(route="api:v1").matches(_key("api", "/api/v1/items"), "gw:")


def test_purge_by_prefix_matches_keys_too_long_to_keep_whole() -> None:
    key = _key("search", "/search", b"q=" + b"x" * 3000)
    assert PurgeRequest(prefix="/search").matches(key, "gw:")
    assert PurgeRequest(route="search").matches(key, "gw:")
    assert not PurgeRequest(prefix="/other").matches(key, "gw:")


# ------------------------------------------------------------------ the cache: block

ROUTES = textwrap.dedent(
    """\
    backends:
      legacy: {url: "http://127.0.0.1:8081"}
    routes:
      - name: catalog
        match: {path_prefix: /catalog}
        backends: [{name: legacy, weight: 100}]
        cache: CACHE
    """
)


def load_cache(block: str) -> Cache:
    cfg = config.loads(ROUTES.replace("CACHE", block), "routes.yaml")
    settings = cfg.routes[0].cache
    assert settings is not None
    return settings


def cache_errors(block: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.loads(ROUTES.replace("CACHE", block), "routes.yaml")
    return info.value.messages


def test_cache_block_defaults_and_durations() -> None:
    settings = load_cache("{}")
    assert settings.mode == "http" and settings.ttl is None
    assert settings.max_object_bytes == 1024 * 1024
    assert not settings.shared_backends and not settings.heuristic
    tuned = load_cache(
        "{mode: ttl, ttl: 90s, stale_if_error: 1m, vary: [X-Tenant, x-tenant, Accept], "
        "ignore_query: [utm_*, ref]}"
    )
    assert tuned.ttl == 90.0 and tuned.stale_if_error == 60.0
    assert tuned.vary == ["accept", "x-tenant"]
    assert tuned.ignore_query == ["utm_*", "ref"]


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ("{mode: ttl}", "mode ttl needs a ttl"),
        ("{mode: ttl, ttl: 0s}", "mode ttl needs a ttl"),
        ("{vary: ['X Tenant']}", "invalid header name"),
        ("{vary: ['X-Tenant:']}", "invalid header name"),
        ("{ignore_query: ['utm&x']}", "invalid query parameter name"),
        ("{mode: lru}", "mode"),
        ("{max_object_bytes: -1}", "max_object_bytes"),
        ("{lock_timeout: 0s}", "lock_timeout"),
        ("{ttl_seconds: 5}", "unknown field"),
    ],
)
def test_bad_cache_blocks_are_rejected_with_the_route_and_line(block: str, expected: str) -> None:
    messages = cache_errors(block)
    assert any(expected in m for m in messages), messages
    assert all(m.startswith("routes.yaml:") and "route 'catalog'" in m for m in messages)
