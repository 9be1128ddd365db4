"""The response cache under load, across replicas, stale, without Redis, and for operators.

Every test drives real gateway processes (``strangler serve``) in front of the
real stubs, and the Redis tests use a real ``redis-server``. The stubs'
``/__stub/cacheable/<anything>`` endpoint sets its caching headers from the
query (``?h=Cache-Control:max-age=60``) and counts its hits per target in the
body (``n``), so a cached answer (same ``n``) tells itself apart from a fresh
one; the stub's ``/__stub/stats`` counts requests that reached the backend.
Each test uses paths of its own (a uuid in them), so counts start at zero.

Most tests share two gateways on one Redis (``pair``, module scope) whose
routes each serve one purpose; a gateway with a tiny in-process layer and no
debug headers (``small``) covers eviction and the header switch. The Redis
outage test gets a Redis and a gateway of its own.

Waiting is polling with bounds, except for letting an entry grow stale:
asking would change what is being waited for, so those tests sleep past the
entry's ``max-age``. The stubs' ``Date`` has whole seconds, so a response's
age starts anywhere between 0 and 1 s; the tests allow for that.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis
from conftest import RedisServer
from gateway import ADMIN_TOKEN, GatewayProcess, route_file

from legacy_stub.testing import free_port

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("clean_stubs")]

Gateway = Callable[..., GatewayProcess]
TIMEOUT = httpx.Timeout(10.0)
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CACHEABLE = "/__stub/cacheable"
CACHE = "x-strangler-cache"
KEY_PREFIX = "strangler:cache:"


# ------------------------------------------------------------------ helpers


def route(name: str, backend: str = "svc", **cache: Any) -> dict[str, Any]:
    """A caching route for ``/__stub/cacheable/<name>``."""
    return {
        "name": name,
        "match": {"path_prefix": f"{CACHEABLE}/{name}"},
        "backends": [{"name": backend, "weight": 100}],
        "cache": cache,
    }


def unique(route_name: str, tag: str = "") -> str:
    """A path of the route no other test (or run of the stubs) has asked for."""
    return f"{CACHEABLE}/{route_name}/{tag}{uuid.uuid4().hex[:12]}"


def with_headers(path: str, *headers: str, **params: str | int) -> str:
    """``path`` with ``?h=Name:Value`` for each header, plus plain parameters."""
    parts = [f"h={quote(h, safe='')}" for h in headers]
    parts += [f"{k}={v}" for k, v in params.items()]
    return f"{path}?{'&'.join(parts)}" if parts else path


def max_age(path: str, seconds: int = 60, **params: str | int) -> str:
    return with_headers(path, f"Cache-Control: max-age={seconds}", **params)


def set_fault(stub: str, prefix: str, **knobs: Any) -> None:
    httpx.put(
        stub + "/__stub/faults", json={"prefix": prefix, **knobs}, timeout=5
    ).raise_for_status()


def hits(stub: str, path: str) -> int:
    """Requests for ``path`` (without query) that reached the stub since the test began."""
    stats = httpx.get(stub + "/__stub/stats", timeout=5).json()
    return int(stats["by_path"].get(path.partition("?")[0], 0))


def get(gw: GatewayProcess, target: str, **kw: Any) -> httpx.Response:
    return httpx.get(gw.url + target, timeout=TIMEOUT, **kw)


def n_of(resp: httpx.Response) -> int:
    assert resp.status_code == 200, resp.text
    return int(resp.json()["n"])


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``check`` every 20 ms; return the seconds it took, or fail."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - started


def sleep_until(moment: float) -> None:
    """Let a stored entry age (asking the cache would refresh it)."""
    time.sleep(max(0.0, moment - time.monotonic()))


def purge(gw: GatewayProcess, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        gw.admin_url + "/api/cache/purge",
        json=body,
        headers=AUTH if headers is None else headers,
        timeout=TIMEOUT,
    )


def redis_targets(url: str, marker: str) -> set[str]:
    """``path?query`` of the cache keys in Redis that contain ``marker``."""
    client = redis.Redis.from_url(url)
    try:
        found = set()
        for raw in client.scan_iter(match=f"{KEY_PREFIX}*{marker}*", count=1000):
            key = raw.decode()
            if key.endswith("|lock"):
                continue
            # <prefix>cache:<route>:<scope>:<path>?<query>@<host>
            tail = key[len(KEY_PREFIX) :].split(":", 2)[2]
            found.add(tail.rpartition("@")[0])
        return found
    finally:
        client.close()


# ---------------------------------------------------- raw concurrent clients
#
# One connection per simulated client (``Connection: close``): hundreds of
# httpx clients cost seconds to build, and one client's pool serializes.


async def fetch(port: int, target: str) -> tuple[int, dict[str, str], bytes]:
    """One GET over its own connection: (status, headers by lowercase name, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode(
                "latin-1"
            )
        )
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise ConnectionError(f"incomplete response: {data[:200]!r}")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = dechunk(body)
    elif "content-length" in headers and len(body) != int(headers["content-length"]):
        raise ConnectionError(f"body of {len(body)} bytes, expected {headers['content-length']}")
    return status, headers, body


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[:size]
        data = data[size + 2 :]


def burst(targets: list[tuple[int, str]]) -> list[tuple[int, dict[str, str], bytes]]:
    """All these GETs at once, each on its own connection."""

    async def run() -> list[tuple[int, dict[str, str], bytes]]:
        return await asyncio.gather(*(fetch(port, target) for port, target in targets))

    return asyncio.run(run())


# ------------------------------------------------------------------ gateways

BREAKER_FAIL_MAX = 2


def pair_config(monolith: str) -> dict[str, Any]:
    cfg = route_file(
        {"svc": monolith, "sie": monolith, "flaky": monolith},
        [
            route("single", lock_timeout="10s"),
            route("share"),
            route("swr", stale_while_revalidate="10s"),
            route("sie", "sie", stale_if_error="60s"),
            route("siebreaker", "flaky", stale_if_error="60s"),
            route("counted"),
            route("purge_a"),
            route("purge_b"),
            route("headers"),
        ],
    )
    cfg["defaults"] = {"breaker": {"enabled": False}}
    cfg["backends"]["flaky"]["breaker"] = {
        "fail_max": BREAKER_FAIL_MAX,
        "reset_timeout": "60s",
    }
    return cfg


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def _start_module_gateway(
    directory: Path, cfg: dict[str, Any], args: tuple[str, ...] = ()
) -> GatewayProcess:
    return GatewayProcess(directory, cfg, args=args).start()


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, monolith: str, shared_redis: RedisServer
) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    """Two gateways (replicas) on one Redis, with the routes of `pair_config`."""
    cfg = pair_config(monolith)
    args = ("--redis-url", shared_redis.url)
    started: list[GatewayProcess] = []
    try:
        for name in ("a", "b"):
            started.append(_start_module_gateway(tmp_path_factory.mktemp(name), cfg, args))
        yield started[0], started[1]
    finally:
        for gw in started:
            gw.stop(timeout=10)


SMALL_MEMORY = 20000


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, monolith: str) -> Iterator[GatewayProcess]:
    """No Redis, a 20 kB in-process layer, no debug headers."""
    cfg = route_file(
        {"svc": monolith},
        [route("small")],
        debug_headers=False,
        cache_memory_bytes=SMALL_MEMORY,
    )
    gw = _start_module_gateway(tmp_path_factory.mktemp("small"), cfg)
    yield gw
    gw.stop(timeout=10)


# ------------------------------------------------------------- single-flight


def test_concurrent_misses_for_one_cold_key_reach_the_backend_once(
    pair: tuple[GatewayProcess, GatewayProcess], monolith: str
) -> None:
    a, _ = pair
    path = unique("single")
    set_fault(monolith, path, latency_ms=1000)  # the fill is slow: the others overlap it
    coalesced = a.metric("strangler_cache_coalesced_total", route="single", outcome="served")

    answers = burst([(a.port, max_age(path))] * 200)

    assert [status for status, _, _ in answers] == [200] * 200
    assert {body for _, _, body in answers} == {answers[0][2]}
    assert n_of(httpx.Response(200, content=answers[0][2])) == 1
    assert hits(monolith, path) == 1
    assert a.metric("strangler_cache_coalesced_total", route="single", outcome="served") > (
        coalesced
    )


def test_two_gateways_on_one_redis_fetch_a_cold_key_at_most_once_each(
    pair: tuple[GatewayProcess, GatewayProcess], monolith: str
) -> None:
    a, b = pair
    path = unique("single")
    set_fault(monolith, path, latency_ms=1000)
    target = max_age(path)

    answers = burst([(gw.port, target) for _ in range(100) for gw in (a, b)])

    assert [status for status, _, _ in answers] == [200] * 200
    # Usually one: the Redis fill lock makes the second replica wait for the first.
    assert 1 <= hits(monolith, path) <= 2
    assert len({body for _, _, body in answers}) == hits(monolith, path)


# ------------------------------------------------------------- across replicas


def _store_on(gw: GatewayProcess, target: str, shared_redis: RedisServer) -> None:
    """GET ``target`` on ``gw`` (a MISS) and wait until its entry is in Redis."""
    first = get(gw, target)
    assert first.headers[CACHE] == "MISS"
    assert n_of(first) == 1
    marker = target.partition("?")[0].rsplit("/", 1)[1]
    wait_for(lambda: redis_targets(shared_redis.url, marker) != set(), 5, "entry in Redis")


def test_entry_stored_by_one_gateway_is_a_hit_on_the_other(
    pair: tuple[GatewayProcess, GatewayProcess], monolith: str, shared_redis: RedisServer
) -> None:
    a, b = pair
    target = max_age(unique("share"))
    _store_on(a, target, shared_redis)

    on_b = get(b, target)

    assert on_b.headers[CACHE] == "HIT"
    assert n_of(on_b) == 1
    assert "age" in on_b.headers
    assert hits(monolith, target) == 1


def test_unsafe_method_on_one_gateway_invalidates_the_entry_on_the_other(
    pair: tuple[GatewayProcess, GatewayProcess], monolith: str, shared_redis: RedisServer
) -> None:
    a, b = pair
    target = max_age(unique("share"))
    _store_on(a, target, shared_redis)
    assert get(b, target).headers[CACHE] == "HIT"  # now in B's in-process layer too

    posted = httpx.post(a.url + target, content=b"{}", timeout=TIMEOUT)
    assert posted.status_code == 200
    assert posted.json()["method"] == "POST"

    wait_for(lambda: get(b, target).headers[CACHE] == "MISS", 2, "B forgot the entry")
    # The GET that filled, the POST, and B's refill.
    assert hits(monolith, target) == 3
    marker = target.partition("?")[0].rsplit("/", 1)[1]
    wait_for(lambda: redis_targets(shared_redis.url, marker) != set(), 5, "B's refill in Redis")
    again = get(a, target)
    assert again.headers[CACHE] == "HIT"  # B's refill is shared again
    assert n_of(again) == 3


def test_purge_on_one_gateway_removes_the_entry_from_the_other(
    pair: tuple[GatewayProcess, GatewayProcess], monolith: str, shared_redis: RedisServer
) -> None:
    a, b = pair
    path = unique("share")
    target = max_age(path)
    _store_on(a, target, shared_redis)
    assert get(b, target).headers[CACHE] == "HIT"

    resp = purge(a, {"url": target})
    assert resp.status_code == 200, resp.text
    assert resp.json()["redis_keys"] == 1
    assert resp.json()["redis"] == "ok"

    assert redis_targets(shared_redis.url, path.rsplit("/", 1)[1]) == set()
    wait_for(lambda: get(b, target).headers[CACHE] == "MISS", 2, "B forgot the entry")
    assert hits(monolith, target) == 2


# ------------------------------------------------------------- stale serving

STALE_WHILE_REVALIDATE = '110 - "Response is Stale"'
REVALIDATION_FAILED = '111 - "Revalidation Failed"'


def test_stale_while_revalidate_serves_stale_at_once_and_refreshes_once(
    pair: tuple[GatewayProcess, GatewayProcess], monolith: str
) -> None:
    a, _ = pair
    path = unique("swr")
    # max-age=2, not 1: the stub's Date has whole seconds, so a fresh copy
    # starts up to 1 s old, and the refreshed copy must stay fresh long
    # enough to be seen as a HIT.
    target = max_age(path, 2)
    stale_before = a.metric("strangler_cache_stale_total", route="swr", reason="while_revalidate")
    first = get(a, target)
    stored_at = time.monotonic()
    assert first.headers[CACHE] == "MISS"
    assert n_of(first) == 1
    set_fault(monolith, path, latency_ms=500)  # the refresh stays in flight a while
    sleep_until(stored_at + 2.1)

    answers = burst([(a.port, target)] * 10)

    for status, headers, body in answers:
        assert status == 200
        assert headers[CACHE] == "STALE"
        assert headers["warning"] == STALE_WHILE_REVALIDATE
        assert n_of(httpx.Response(200, content=body)) == 1
    seen: list[httpx.Response] = []

    def refreshed() -> bool:
        seen.append(get(a, target))
        return seen[-1].headers[CACHE] == "HIT"

    wait_for(refreshed, 5, "the refreshed entry")
    fresh = seen[-1]
    assert "warning" not in fresh.headers
    assert n_of(fresh) == 2
    assert hits(monolith, path) == 2  # the fill, and exactly one refresh
    assert (
        a.metric("strangler_cache_stale_total", route="swr", reason="while_revalidate")
        >= stale_before + 10
    )


def test_response_stale_on_arrival_is_kept_for_its_stale_while_revalidate_window(
    pair: tuple[GatewayProcess, GatewayProcess], monolith: str
) -> None:
    a, _ = pair
    path = unique("swr")
    # Always stale, refreshed in the background (RFC 5861): worth storing.
    target = with_headers(path, "Cache-Control: max-age=0, stale-while-revalidate=30")
    assert get(a, target).headers[CACHE] == "MISS"

    stale = get(a, target)

    assert stale.headers[CACHE] == "STALE"
    assert stale.headers["warning"] == STALE_WHILE_REVALIDATE
    assert n_of(stale) == 1
    wait_for(lambda: hits(monolith, path) == 2, 5, "the background refresh")
    wait_for(lambda: n_of(get(a, target)) == 2, 5, "the refreshed entry served")


def _stale_if_error_count(gw: GatewayProcess, route_name: str) -> float:
    return gw.metric("strangler_cache_stale_total", route=route_name, reason="if_error")


def test_stale_if_error_serves_the_stale_entry_when_the_backend_fails(
    pair: tuple[GatewayProcess, GatewayProcess], monolith: str
) -> None:
    a, _ = pair
    on_500 = unique("sie", "e")
    on_drop = unique("sie", "d")
    before = _stale_if_error_count(a, "sie")
    for path in (on_500, on_drop):
        assert get(a, max_age(path, 1)).headers[CACHE] == "MISS"
    stored_at = time.monotonic()
    set_fault(monolith, on_500, error_rate=1, error_status=500)
    set_fault(monolith, on_drop, drop_rate=1, drop_mode="reset")
    sleep_until(stored_at + 1.1)

    for path in (on_500, on_drop):
        resp = get(a, max_age(path, 1))
        assert resp.status_code == 200
        assert resp.headers[CACHE] == "STALE"
        assert resp.headers["warning"] == REVALIDATION_FAILED
        assert n_of(resp) == 1
        # It did ask the backend (a reset on a reused connection is tried
        # once more on a new one: the keep-alive race rule of the client).
        assert hits(monolith, path) >= 2
    assert _stale_if_error_count(a, "sie") == before + 2


def test_stale_if_error_does_not_hide_errors_outside_its_window_or_without_an_entry(
    pair: tuple[GatewayProcess, GatewayProcess], monolith: str
) -> None:
    a, _ = pair
    short = unique("sie", "s")
    never_stored = unique("sie", "n")
    # The origin's own stale-if-error=1 overrides the route's 60 s.
    short_target = with_headers(short, "Cache-Control: max-age=1, stale-if-error=1")
    assert get(a, short_target).headers[CACHE] == "MISS"
    stored_at = time.monotonic()
    before = _stale_if_error_count(a, "sie")
    set_fault(monolith, short, error_rate=1, error_status=500)
    set_fault(monolith, never_stored, error_rate=1, error_status=500)
    sleep_until(stored_at + 2.2)  # age > 2: more than 1 s past its freshness

    outside = get(a, short_target)
    assert outside.status_code == 500
    assert outside.json()["error"] == "injected"
    assert "warning" not in outside.headers
    missing = get(a, max_age(never_stored, 1))
    assert missing.status_code == 500
    assert missing.headers[CACHE] == "MISS"
    assert _stale_if_error_count(a, "sie") == before


def _breaker_state(gw: GatewayProcess, backend: str) -> str:
    view = httpx.get(gw.admin_url + "/api/backends", timeout=5).json()
    return str(view["backends"][backend]["breaker"]["state"])


def test_stale_if_error_serves_the_stale_entry_while_the_breaker_is_open(
    pair: tuple[GatewayProcess, GatewayProcess], monolith: str
) -> None:
    a, _ = pair
    cached = unique("siebreaker", "c")
    failing = unique("siebreaker", "f")
    assert get(a, max_age(cached, 1)).headers[CACHE] == "MISS"
    stored_at = time.monotonic()
    before = _stale_if_error_count(a, "siebreaker")
    set_fault(monolith, failing, error_rate=1, error_status=500)
    for _ in range(BREAKER_FAIL_MAX):
        assert get(a, max_age(failing, 1)).status_code == 500
    assert _breaker_state(a, "flaky") == "open"
    sleep_until(stored_at + 1.1)

    resp = get(a, max_age(cached, 1))
    assert resp.status_code == 200
    assert resp.headers[CACHE] == "STALE"
    assert resp.headers["warning"] == REVALIDATION_FAILED
    assert n_of(resp) == 1
    assert hits(monolith, cached) == 1  # the open breaker kept the request off the backend
    # Without a stored entry the client gets the breaker's error.
    refused = get(a, max_age(failing, 1))
    assert refused.status_code == 503
    assert refused.json()["error"] == "circuit_open"
    assert _stale_if_error_count(a, "siebreaker") == before + 1


# ------------------------------------------------------------- Redis failures


def test_redis_outage_and_restart_never_fail_a_request(
    gateway: Gateway, monolith: str, redis_server: RedisServer
) -> None:
    cfg = route_file({"svc": monolith}, [route("outage")])
    gw = gateway(cfg, args=("--redis-url", redis_server.url))
    run = uuid.uuid4().hex[:12]
    keys = [max_age(f"{CACHEABLE}/outage/{run}-{i}") for i in range(5)]
    statuses: list[int] = []
    errors: list[str] = []
    duration = 14.0

    async def client(number: int, end: float) -> None:
        i = 0
        while time.monotonic() < end:
            i += 1
            # Mostly known keys (in-process hits), now and then a new one (a
            # miss: Redis lookup, fill lock and store, all without Redis).
            if i % 10 == 0:
                target = max_age(f"{CACHEABLE}/outage/{run}-new-{number}-{i}")
            else:
                target = keys[(number + i) % len(keys)]
            try:
                status, _, _ = await fetch(gw.port, target)
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                errors.append(f"{target}: {exc!r}")
            else:
                statuses.append(status)
            await asyncio.sleep(0.05)

    async def outage() -> None:
        await asyncio.sleep(2)
        await asyncio.to_thread(redis_server.stop)
        await asyncio.sleep(10)
        await asyncio.to_thread(redis_server.start)

    async def main() -> None:
        end = time.monotonic() + duration
        await asyncio.gather(outage(), *(client(n, end) for n in range(50)))

    asyncio.run(main())

    assert errors == []
    assert len(statuses) > 1000
    assert [s for s in statuses if s != 200] == []
    log = gw.wait_log("redis is back", timeout=10)
    assert log.count("redis unavailable") == 1
    assert gw.metric("strangler_cache_redis_unavailable_total") > 0

    # Back to normal: a new entry reaches Redis again.
    stored = gw.metric("strangler_cache_stores_total", route="outage", layer="redis")
    after = f"{CACHEABLE}/outage/{run}-after"
    assert get(gw, max_age(after)).headers[CACHE] == "MISS"
    wait_for(
        lambda: redis_targets(redis_server.url, f"{run}-after") == {max_age(after)},
        5,
        "the new entry in Redis",
    )
    assert gw.metric("strangler_cache_stores_total", route="outage", layer="redis") == stored + 1


def test_gateway_whose_redis_is_unreachable_serves_hits_from_memory(
    gateway: Gateway, monolith: str
) -> None:
    cfg = route_file({"svc": monolith}, [route("noredis")])
    gw = gateway(cfg, args=("--redis-url", f"redis://127.0.0.1:{free_port()}/0"))
    targets = [max_age(unique("noredis")) for _ in range(3)]

    for target in targets:
        outcomes = []
        for _ in range(5):
            resp = get(gw, target)
            assert n_of(resp) == 1
            outcomes.append(resp.headers[CACHE])
        assert outcomes == ["MISS"] + ["HIT"] * 4
        assert hits(monolith, target) == 1
    gw.wait_log("redis unavailable")


# ------------------------------------------------------------- operators


def test_cache_metrics_count_hits_misses_and_stores_per_route(
    pair: tuple[GatewayProcess, GatewayProcess],
) -> None:
    a, _ = pair

    def counts() -> dict[str, float]:
        return {
            "hit": a.metric("strangler_cache_requests_total", route="counted", result="hit"),
            "miss": a.metric("strangler_cache_requests_total", route="counted", result="miss"),
            "memory": a.metric("strangler_cache_stores_total", route="counted", layer="memory"),
            "redis": a.metric("strangler_cache_stores_total", route="counted", layer="redis"),
        }

    before = counts()
    one, two = max_age(unique("counted")), max_age(unique("counted"))
    for target in (one, one, one, two, two):
        assert get(a, target).status_code == 200

    wait_for(lambda: counts()["redis"] == before["redis"] + 2, 5, "both stored in Redis")
    after = counts()
    assert after["hit"] - before["hit"] == 3
    assert after["miss"] - before["miss"] == 2
    assert after["memory"] - before["memory"] == 2


def test_memory_layer_evicts_least_recent_entries_to_stay_within_its_bound(
    small: GatewayProcess, monolith: str
) -> None:
    evictions = small.metric("strangler_cache_evictions_total", route="small")
    stores = small.metric("strangler_cache_stores_total", route="small", layer="memory")
    targets = [max_age(unique("small"), size=5000) for _ in range(6)]  # ~5.3 kB each

    for target in targets:
        assert n_of(get(small, target)) == 1
        assert small.metric("strangler_cache_memory_bytes") <= SMALL_MEMORY

    assert small.metric("strangler_cache_stores_total", route="small", layer="memory") == (
        stores + 6
    )
    evicted = small.metric("strangler_cache_evictions_total", route="small") - evictions
    assert 3 <= evicted <= 5
    assert small.metric("strangler_cache_memory_bytes") > 0
    assert n_of(get(small, targets[-1])) == 1  # the newest is still cached
    assert n_of(get(small, targets[0])) == 2  # the oldest was evicted: fetched again
    assert hits(monolith, targets[-1]) == 1


def test_purge_needs_the_admin_token(pair: tuple[GatewayProcess, GatewayProcess]) -> None:
    a, _ = pair
    target = max_age(unique("purge_a"))
    assert get(a, target).headers[CACHE] == "MISS"

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN}):
        resp = purge(a, {"url": target}, headers=headers)
        assert resp.status_code == 401
        assert resp.json()["error"] == "unauthorized"
    assert get(a, target).headers[CACHE] == "HIT"


@pytest.mark.parametrize(
    "body",
    [
        {},
        [],
        "route",
        {"path": "/x"},
        {"route": "purge_a", "extra": 1},
        {"prefix": "api/x"},
        {"url": "http://127.0.0.1/x"},
        {"route": ""},
        {"prefix": 7},
    ],
    ids=[
        "no-fields",
        "not-an-object",
        "a-string",
        "unknown-field",
        "extra-field",
        "prefix-without-slash",
        "full-url",
        "empty-route",
        "non-string",
    ],
)
def test_purge_rejects_bad_input_with_400(
    pair: tuple[GatewayProcess, GatewayProcess], body: Any
) -> None:
    a, _ = pair
    resp = purge(a, body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "bad_request"


def test_purge_of_an_unknown_route_is_404(pair: tuple[GatewayProcess, GatewayProcess]) -> None:
    a, _ = pair
    resp = purge(a, {"route": "no-such-route"})
    assert resp.status_code == 404
    assert resp.json()["error"] == "not_found"


def _fill_all(gw: GatewayProcess, targets: list[str], shared_redis: RedisServer, run: str) -> None:
    for target in targets:
        assert get(gw, target).headers[CACHE] == "MISS"
    wait_for(
        lambda: redis_targets(shared_redis.url, run) == set(targets), 5, "all entries in Redis"
    )


def _assert_purged(
    gw: GatewayProcess,
    shared_redis: RedisServer,
    run: str,
    gone: list[str],
    kept: list[str],
) -> None:
    assert redis_targets(shared_redis.url, run) == set(kept)
    for target in kept:
        assert get(gw, target).headers[CACHE] == "HIT", target
    for target in gone:
        assert get(gw, target).headers[CACHE] == "MISS", target


def test_purge_by_route_removes_that_routes_entries_only(
    pair: tuple[GatewayProcess, GatewayProcess], shared_redis: RedisServer
) -> None:
    a, _ = pair
    run = uuid.uuid4().hex[:12]
    gone = [max_age(f"{CACHEABLE}/purge_b/{run}/{i}") for i in range(2)]
    kept = [max_age(f"{CACHEABLE}/purge_a/{run}/0")]
    _fill_all(a, gone + kept, shared_redis, run)

    resp = purge(a, {"route": "purge_b"})

    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "purged": {"route": "purge_b"},
        "memory_entries": 2,
        "redis_keys": 2,
        "redis": "ok",
    }
    _assert_purged(a, shared_redis, run, gone, kept)


def test_purge_by_prefix_removes_the_paths_under_it_only(
    pair: tuple[GatewayProcess, GatewayProcess], shared_redis: RedisServer
) -> None:
    a, _ = pair
    run = uuid.uuid4().hex[:12]
    base = f"{CACHEABLE}/purge_a/{run}"
    gone = [max_age(f"{base}/dir/one"), max_age(f"{base}/dir/two", v=1)]
    kept = [max_age(f"{base}/other"), max_age(f"{CACHEABLE}/headers/{run}/dir")]
    _fill_all(a, gone + kept, shared_redis, run)

    resp = purge(a, {"prefix": f"{base}/dir"})

    assert resp.status_code == 200, resp.text
    assert resp.json()["memory_entries"] == 2
    assert resp.json()["redis_keys"] == 2
    _assert_purged(a, shared_redis, run, gone, kept)


def test_purge_by_url_removes_that_path_and_query_only(
    pair: tuple[GatewayProcess, GatewayProcess], shared_redis: RedisServer
) -> None:
    a, _ = pair
    run = uuid.uuid4().hex[:12]
    item = f"{CACHEABLE}/purge_a/{run}/item"
    gone = [max_age(item, v=1)]
    kept = [max_age(item, v=2), max_age(item)]
    _fill_all(a, gone + kept, shared_redis, run)

    resp = purge(a, {"url": gone[0]})

    assert resp.status_code == 200, resp.text
    assert resp.json()["memory_entries"] == 1
    assert resp.json()["redis_keys"] == 1
    _assert_purged(a, shared_redis, run, gone, kept)


# ------------------------------------------------------------- debug header


def test_debug_header_says_miss_then_hit(
    pair: tuple[GatewayProcess, GatewayProcess], monolith: str
) -> None:
    a, _ = pair
    target = max_age(unique("headers"))
    first, second = get(a, target), get(a, target)
    assert first.headers[CACHE] == "MISS"
    assert second.headers[CACHE] == "HIT"
    assert n_of(second) == 1
    assert hits(monolith, target) == 1


def test_no_cache_debug_header_without_debug_headers(small: GatewayProcess, monolith: str) -> None:
    target = max_age(unique("small"))
    first, second = get(small, target), get(small, target)
    for resp in (first, second):
        assert resp.status_code == 200
        assert CACHE not in resp.headers
        assert "x-strangler-route" not in resp.headers
    assert n_of(second) == 1  # still answered from the cache
    assert "age" in second.headers
    assert hits(monolith, target) == 1
