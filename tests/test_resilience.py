"""Retries, the retry budget, circuit breakers, fallback and shared breakers, end to end.

Every test runs a real gateway process (``strangler serve``) in front of real
backends on 127.0.0.1: the monolith and orders stubs (fault knobs and hit
counters under ``/__stub``), a refused port, and, for answers the stubs cannot
give (``Retry-After``, 503 then 200), a small scripted HTTP/1.1 backend that
records when each request arrived.

Hit counts are read from the backends themselves, so "not sent" and "sent
once" are proven where it matters: at the backend. Timing bounds are generous
on the upper side (a loaded two-core machine) and tight on the lower side only
where the behaviour is a wait (``Retry-After``).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http import HTTPStatus
from typing import Any

import httpx
import pytest
from conftest import RedisServer
from gateway import GatewayProcess, route_file
from threaded_server import ThreadedServer

from legacy_stub.testing import free_port, stub_url

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("clean_stubs")]

TIMEOUT = httpx.Timeout(10.0)
ECHO = "/__stub/echo"
NO_BREAKER = {"enabled": False}

Gateway = Callable[..., GatewayProcess]


# ------------------------------------------------------------------ helpers


def route(name: str, prefix: str, backend: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"path_prefix": prefix},
        "backends": [{"name": backend, "weight": 100}],
        **extra,
    }


def routes_with(
    backends: dict[str, str],
    routes: list[dict[str, Any]],
    *,
    retry: dict[str, Any] | None = None,
    breaker: dict[str, Any] | None = None,
    budget: dict[str, Any] | None = None,
    per_backend: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A route file with resilience settings on ``defaults`` (and per backend)."""
    cfg = route_file(backends, routes)
    defaults: dict[str, Any] = {}
    if retry is not None:
        defaults["retry"] = retry
    if breaker is not None:
        defaults["breaker"] = breaker
    if budget is not None:
        defaults["retry_budget"] = budget
    if defaults:
        cfg["defaults"] = defaults
    for name, settings in (per_backend or {}).items():
        cfg["backends"][name].update(settings)
    return cfg


def set_fault(stub: str, prefix: str, **knobs: Any) -> None:
    httpx.put(
        stub + "/__stub/faults", json={"prefix": prefix, **knobs}, timeout=5
    ).raise_for_status()


def stub_stats(stub: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(stub + "/__stub/stats", timeout=5).json()
    return stats


def hits(stub: str, path: str) -> int:
    return int(stub_stats(stub)["by_path"].get(path, 0))


def backends_view(gw: GatewayProcess) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(gw.admin_url + "/api/backends", timeout=5).json()
    return data


def breaker_of(gw: GatewayProcess, backend: str) -> dict[str, Any]:
    breaker: dict[str, Any] = backends_view(gw)["backends"][backend]["breaker"]
    return breaker


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``check`` every 20 ms; return the seconds it took, or fail."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - started


def assert_circuit_open(resp: httpx.Response) -> None:
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"] == "circuit_open"
    assert int(resp.headers["retry-after"]) >= 1


class ScriptedBackend(ThreadedServer):
    """A tiny HTTP/1.1 backend answering from a script, for what the stubs cannot do.

    ``script`` lists ``(status, headers, delay_seconds)`` answers in order; the
    last one repeats. ``hits`` holds the ``time.monotonic()`` arrival of every
    request. Connections are kept alive, as a real backend would.
    """

    def __init__(self, script: list[tuple[int, dict[str, str], float]]) -> None:
        super().__init__()
        self.script = script
        self.hits: list[float] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                n = len(self.hits)
                self.hits.append(time.monotonic())
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length" and int(value):
                        await reader.readexactly(int(value))
                status, headers, delay = self.script[min(n, len(self.script) - 1)]
                if delay:
                    await asyncio.sleep(delay)
                body = f"answer {n + 1}".encode()
                extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                writer.write(
                    f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
                    f"Content-Length: {len(body)}\r\n{extra}\r\n".encode()
                    + body
                )
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


@pytest.fixture
def scripted() -> Iterator[Callable[[list[tuple[int, dict[str, str], float]]], ScriptedBackend]]:
    started: list[ScriptedBackend] = []

    def make(script: list[tuple[int, dict[str, str], float]]) -> ScriptedBackend:
        backend = ScriptedBackend(script).start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        backend.stop()


# ------------------------------------------------------------------ retries


def test_get_answered_503_is_tried_attempts_times_and_the_last_503_reaches_the_client(
    gateway: Gateway, monolith: str
) -> None:
    gw = gateway(
        routes_with(
            {"svc": monolith},
            [route("all", "/", "svc")],
            retry={"attempts": 3},
            breaker=NO_BREAKER,
        )
    )
    set_fault(monolith, "/flaky", error_rate=1, error_status=503)

    resp = httpx.get(gw.url + "/flaky/1", timeout=TIMEOUT)

    assert resp.status_code == 503
    assert resp.json()["error"] == "injected"  # the backend's own answer, intact
    assert "x-strangler-fallback" not in resp.headers
    assert hits(monolith, "/flaky/1") == 3
    assert gw.metric("strangler_retries_total", backend="svc", outcome="retried") == 2
    assert gw.metric("strangler_retries_total", backend="svc", outcome="exhausted") == 1


def test_get_answered_503_then_200_is_answered_200(
    gateway: Gateway, scripted: Callable[..., ScriptedBackend]
) -> None:
    backend = scripted([(503, {}, 0.0), (200, {}, 0.0)])
    gw = gateway(
        routes_with({"svc": backend.url}, [route("all", "/", "svc")], retry={"attempts": 3})
    )

    resp = httpx.get(gw.url + "/thing", timeout=TIMEOUT)

    assert resp.status_code == 200
    assert resp.text == "answer 2"
    assert len(backend.hits) == 2
    assert gw.metric("strangler_retries_total", backend="svc", outcome="retried") == 1


@pytest.mark.parametrize(
    ("fault", "status"),
    [({"drop_rate": 1}, 502), ({"error_rate": 1, "error_status": 503}, 503)],
    ids=["dropped", "503"],
)
def test_post_that_reached_the_backend_is_never_sent_twice(
    gateway: Gateway, monolith: str, fault: dict[str, Any], status: int
) -> None:
    gw = gateway(
        routes_with(
            {"svc": monolith},
            [route("all", "/", "svc")],
            retry={"attempts": 3},
            breaker=NO_BREAKER,
        )
    )
    set_fault(monolith, "/orders", **fault)

    with httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client:
        # A kept-alive upstream connection first: a POST that fails on a reused
        # connection must not be resent either.
        assert client.get(ECHO).status_code == 200
        resp = client.post("/orders/new", json={"item": 1})

    assert resp.status_code == status
    assert hits(monolith, "/orders/new") == 1
    assert stub_stats(monolith)["by_method"] == {"GET": 1, "POST": 1}
    assert gw.metric("strangler_retries_total", backend="svc", outcome="retried") == 0


def test_any_method_is_retried_when_the_request_never_left(
    gateway: Gateway, orders: str, refused_url: str
) -> None:
    gw = gateway(
        routes_with(
            {"gone": refused_url, "fb": orders + ECHO},
            [
                route("plain", "/plain", "gone"),
                route("covered", "/covered", "gone", fallback="fb"),
            ],
            retry={"attempts": 3},
            breaker=NO_BREAKER,
        )
    )

    resp = httpx.post(gw.url + "/plain/x", content=b"payload", timeout=TIMEOUT)
    assert resp.status_code == 502
    assert resp.json()["error"] == "upstream_unavailable"
    assert gw.metric("strangler_retries_total", backend="gone", outcome="retried") == 2
    assert gw.metric("strangler_upstream_errors_total", backend="gone", kind="connect") == 1

    # With a fallback, the same POST is served there, body intact.
    resp = httpx.post(gw.url + "/covered/x", content=b"payload", timeout=TIMEOUT)
    assert resp.status_code == 200
    assert resp.headers["x-strangler-fallback"] == "connect"
    echo = resp.json()
    assert (echo["service"], echo["method"], echo["body_text"]) == ("orders", "POST", "payload")
    assert gw.metric("strangler_retries_total", backend="gone", outcome="retried") == 4
    assert stub_stats(orders)["by_method"] == {"POST": 1}


def test_only_get_head_options_are_retried_by_default_and_a_route_can_add_put(
    gateway: Gateway, monolith: str
) -> None:
    gw = gateway(
        routes_with(
            {"svc": monolith},
            [
                route("default", "/d", "svc"),
                route("puts", "/p", "svc", retry={"methods": ["GET", "PUT"]}),
            ],
            retry={"attempts": 3},
            breaker=NO_BREAKER,
        )
    )
    for prefix in ("/d", "/p"):
        set_fault(monolith, prefix, error_rate=1, error_status=503)

    with httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client:
        for method in ("GET", "HEAD", "OPTIONS", "PUT", "POST", "DELETE", "PATCH"):
            assert client.request(method, f"/d/{method}").status_code == 503
        for method in ("GET", "PUT", "POST", "HEAD"):
            assert client.request(method, f"/p/{method}").status_code == 503

    by_path = stub_stats(monolith)["by_path"]
    assert {m: by_path[f"/d/{m}"] for m in ("GET", "HEAD", "OPTIONS")} == dict.fromkeys(
        ("GET", "HEAD", "OPTIONS"), 3
    )
    assert {m: by_path[f"/d/{m}"] for m in ("PUT", "POST", "DELETE", "PATCH")} == dict.fromkeys(
        ("PUT", "POST", "DELETE", "PATCH"), 1
    )
    # The route's override replaces the method list only; attempts still come from the backend.
    assert {m: by_path[f"/p/{m}"] for m in ("GET", "PUT", "POST", "HEAD")} == {
        "GET": 3,
        "PUT": 3,
        "POST": 1,
        "HEAD": 1,
    }


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_body_above_buffer_bytes_is_never_retried_and_the_skip_is_counted(
    gateway: Gateway, monolith: str, framing: str
) -> None:
    gw = gateway(
        routes_with(
            {"svc": monolith},
            [route("all", "/", "svc")],
            retry={"attempts": 3, "methods": ["GET", "PUT"], "buffer_bytes": 1024},
            breaker=NO_BREAKER,
        )
    )
    set_fault(monolith, "/upload", error_rate=1, error_status=503)

    def put(path: str, body: bytes) -> httpx.Response:
        content: bytes | Iterator[bytes] = body
        if framing == "chunked":
            content = iter([body[:100], body[100:]])
        return httpx.put(gw.url + path, content=content, timeout=TIMEOUT)

    assert put("/upload/small", b"s" * 512).status_code == 503
    assert hits(monolith, "/upload/small") == 3  # within buffer_bytes: retried

    assert put("/upload/large", b"L" * 4096).status_code == 503
    assert hits(monolith, "/upload/large") == 1
    assert gw.metric("strangler_retries_total", backend="svc", outcome="skipped_body") == 1
    assert gw.metric("strangler_retries_total", backend="svc", outcome="retried") == 2

    # The same body to a healthy path is forwarded whole.
    resp = put(ECHO + "/upload", b"L" * 4096)
    assert resp.status_code == 200
    assert resp.json()["body_sha256"] == hashlib.sha256(b"L" * 4096).hexdigest()


def test_retry_after_is_waited_for_when_the_deadline_allows(
    gateway: Gateway, scripted: Callable[..., ScriptedBackend]
) -> None:
    backend = scripted([(503, {"Retry-After": "1"}, 0.0), (200, {}, 0.0)])
    gw = gateway(
        routes_with(
            {"svc": backend.url},
            [route("all", "/", "svc")],
            retry={"attempts": 3, "deadline": "5s"},
        )
    )

    started = time.monotonic()
    resp = httpx.get(gw.url + "/later", timeout=TIMEOUT)
    elapsed = time.monotonic() - started

    assert resp.status_code == 200
    assert len(backend.hits) == 2
    assert backend.hits[1] - backend.hits[0] >= 0.9
    assert elapsed < 4


def test_retry_after_beyond_the_deadline_is_not_retried(
    gateway: Gateway, scripted: Callable[..., ScriptedBackend]
) -> None:
    backend = scripted([(503, {"Retry-After": "1"}, 0.0), (200, {}, 0.0)])
    gw = gateway(
        routes_with(
            {"svc": backend.url},
            [route("all", "/", "svc")],
            retry={"attempts": 3, "deadline": "500ms"},
        )
    )

    started = time.monotonic()
    resp = httpx.get(gw.url + "/later", timeout=TIMEOUT)
    elapsed = time.monotonic() - started

    assert resp.status_code == 503
    assert resp.headers["retry-after"] == "1"  # the backend's answer, passed on
    assert len(backend.hits) == 1
    assert elapsed < 0.9
    assert gw.metric("strangler_retries_total", backend="svc", outcome="deadline") == 1
    assert gw.metric("strangler_retries_total", backend="svc", outcome="retried") == 0


def test_deadline_bounds_all_tries_together(gateway: Gateway, monolith: str) -> None:
    gw = gateway(
        routes_with(
            {"svc": monolith},
            [route("all", "/", "svc")],
            retry={"attempts": 3, "per_try_timeout": "300ms", "deadline": "1s"},
            breaker=NO_BREAKER,
        )
    )
    set_fault(monolith, "/slow", latency_ms=2000)

    started = time.monotonic()
    resp = httpx.get(gw.url + "/slow/x", timeout=TIMEOUT)
    elapsed = time.monotonic() - started

    assert resp.status_code == 504
    assert resp.json()["error"] == "upstream_timeout"
    assert 0.6 <= elapsed < 1.6  # several tries, but never their sum (3 × 2 s)
    assert hits(monolith, "/slow/x") == 3
    assert gw.metric("strangler_upstream_errors_total", backend="svc", kind="timeout") == 1


# ------------------------------------------------------------------ retry budget


async def test_retry_budget_caps_retries_when_every_request_fails(
    gateway: Gateway, monolith: str
) -> None:
    gw = gateway(
        routes_with(
            {"svc": monolith},
            [route("all", "/", "svc")],
            retry={"attempts": 3},
            breaker=NO_BREAKER,
        )
    )
    # The budget bounds retries in flight against requests in flight, so the
    # backend answers its 503s after 100 ms: the 50 clients are then really
    # concurrent at the gateway rather than queued in this test process.
    set_fault(monolith, "/budget", error_rate=1, error_status=503, latency_ms=100)
    statuses: Counter[int] = Counter()
    stop_at = time.monotonic() + 4

    async def one_client() -> None:
        async with httpx.AsyncClient(
            base_url=gw.url, timeout=TIMEOUT, limits=httpx.Limits(max_connections=1)
        ) as client:
            while time.monotonic() < stop_at:
                statuses[(await client.get("/budget/x")).status_code] += 1

    await asyncio.gather(*(one_client() for _ in range(50)))

    sent = sum(statuses.values())
    upstream = hits(monolith, "/budget/x")
    assert statuses == {503: sent}
    assert sent > 100
    assert sent < upstream <= 1.25 * sent + 3, (sent, upstream)
    assert gw.metric("strangler_retries_total", backend="svc", outcome="budget_exhausted") > 0


# ------------------------------------------------------------------ breaker


@pytest.mark.parametrize("failure", ["status_5xx", "connect"])
def test_fail_max_consecutive_failures_open_the_breaker(
    gateway: Gateway, monolith: str, refused_url: str, failure: str
) -> None:
    url = monolith if failure == "status_5xx" else refused_url
    gw = gateway(
        routes_with(
            {"svc": url},
            [route("all", "/", "svc")],
            breaker={"fail_max": 3, "reset_timeout": "30s"},
        )
    )
    set_fault(monolith, "/down", error_rate=1, error_status=503)

    with httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client:
        for _ in range(3):
            assert client.get("/down/x").status_code == (503 if failure == "status_5xx" else 502)
        assert breaker_of(gw, "svc")["state"] == "open"
        rejected = [client.get("/down/x") for _ in range(5)]

    for resp in rejected:
        assert_circuit_open(resp)
        assert 1 <= int(resp.headers["retry-after"]) <= 30
    if failure == "status_5xx":
        assert hits(monolith, "/down/x") == 3  # the rejected ones were not sent
    else:
        assert gw.metric("strangler_upstream_errors_total", backend="svc", kind="connect") == 3
    assert gw.metric("strangler_upstream_errors_total", backend="svc", kind="breaker_open") == 5
    assert gw.metric("strangler_breaker_state", backend="svc") == 2
    assert gw.metric("strangler_breaker_transitions_total", backend="svc", state="open") == 1
    log = gw.wait_log("breaker svc: closed → open (3 failures)")
    assert log.count("→ open") == 1  # logged when it opens, not per rejected request


def test_4xx_answers_do_not_count_as_breaker_failures(gateway: Gateway, monolith: str) -> None:
    gw = gateway(
        routes_with(
            {"svc": monolith},
            [route("all", "/", "svc")],
            breaker={"fail_max": 3, "reset_timeout": "30s"},
        )
    )
    set_fault(monolith, "/down", error_rate=1, error_status=503)

    with httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client:
        for _ in range(20):
            assert client.get("/__stub/status/404").status_code == 404
        assert breaker_of(gw, "svc")["consecutive_failures"] == 0
        # A 4xx between failures breaks the run of consecutive failures.
        for path in ("/down/1", "/down/2", "/__stub/status/404", "/down/3", "/down/4"):
            client.get(path)
        assert client.get("/__stub/status/404").status_code == 404

    assert hits(monolith, "/__stub/status/404") == 22
    breaker = breaker_of(gw, "svc")
    assert breaker["state"] == "closed"
    assert breaker["consecutive_failures"] == 0
    assert gw.metric("strangler_breaker_state", backend="svc") == 0


def test_client_that_disconnects_before_the_response_does_not_open_the_breaker(
    gateway: Gateway, monolith: str
) -> None:
    gw = gateway(
        routes_with(
            {"svc": monolith},
            [route("all", "/", "svc")],
            breaker={"fail_max": 3, "reset_timeout": "30s"},
        )
    )
    set_fault(monolith, ECHO + "/slow", latency_ms=1000)

    for _ in range(5):
        with pytest.raises(httpx.TimeoutException):
            httpx.get(gw.url + ECHO + "/slow", timeout=0.2)

    wait_for(
        lambda: backends_view(gw)["backends"]["svc"]["retry_budget"]["active_requests"] == 0,
        10,
        "the abandoned upstream calls finished",
    )
    assert hits(monolith, ECHO + "/slow") == 5
    view = backends_view(gw)["backends"]["svc"]
    assert view["breaker"]["state"] == "closed"
    assert view["breaker"]["consecutive_failures"] == 0
    assert view["failures_last_minute"] == 0
    assert httpx.get(gw.url + ECHO + "/fine", timeout=TIMEOUT).status_code == 200


async def test_half_open_admits_exactly_one_trial_at_a_time(
    gateway: Gateway, monolith: str
) -> None:
    gw = gateway(
        routes_with(
            {"svc": monolith},
            [route("all", "/", "svc")],
            breaker={"fail_max": 2, "reset_timeout": "1s"},
        )
    )
    path = ECHO + "/trial"
    set_fault(monolith, path, error_rate=1, error_status=503)
    async with httpx.AsyncClient(base_url=gw.url, timeout=TIMEOUT) as client:
        for _ in range(2):
            assert (await client.get(path)).status_code == 503
    assert breaker_of(gw, "svc")["state"] == "open"

    # Healthy again but slow, so the trial is still running while the others arrive.
    set_fault(monolith, path, latency_ms=1000)
    httpx.post(monolith + "/__stub/stats/reset", timeout=5)
    await asyncio.sleep(1.2)

    async def one_request() -> httpx.Response:
        async with httpx.AsyncClient(base_url=gw.url, timeout=TIMEOUT) as client:
            return await client.get(path)

    answers = await asyncio.gather(*(one_request() for _ in range(10)))

    assert sorted(r.status_code for r in answers) == [200] + [503] * 9
    for resp in answers:
        if resp.status_code == 503:
            assert_circuit_open(resp)
    assert hits(monolith, path) == 1
    assert breaker_of(gw, "svc")["state"] == "closed"
    assert gw.metric("strangler_breaker_state", backend="svc") == 0
    for state in ("open", "half-open", "closed"):
        assert gw.metric("strangler_breaker_transitions_total", backend="svc", state=state) == 1

    # Closed: traffic flows again.
    httpx.delete(monolith + "/__stub/faults", timeout=5)
    async with httpx.AsyncClient(base_url=gw.url, timeout=TIMEOUT) as client:
        again = await asyncio.gather(*(client.get(path) for _ in range(5)))
    assert [r.status_code for r in again] == [200] * 5
    assert hits(monolith, path) == 6


def test_response_arriving_after_the_breaker_opened_is_delivered(
    gateway: Gateway, monolith: str
) -> None:
    gw = gateway(
        routes_with(
            {"svc": monolith},
            [route("all", "/", "svc")],
            breaker={"fail_max": 2, "reset_timeout": "30s"},
        )
    )
    set_fault(monolith, ECHO + "/slow", latency_ms=1000)
    set_fault(monolith, "/down", error_rate=1, error_status=503)
    results: list[httpx.Response] = []
    slow = threading.Thread(
        target=lambda: results.append(httpx.get(gw.url + ECHO + "/slow", timeout=TIMEOUT))
    )
    slow.start()
    try:
        wait_for(lambda: hits(monolith, ECHO + "/slow") == 1, 5, "the slow request arrived")
        for _ in range(2):
            assert httpx.get(gw.url + "/down/x", timeout=TIMEOUT).status_code == 503
        assert breaker_of(gw, "svc")["state"] == "open"
    finally:
        slow.join(10)

    assert [r.status_code for r in results] == [200]
    assert results[0].json()["path"] == ECHO + "/slow"
    assert breaker_of(gw, "svc")["state"] == "open"  # one late success does not close it


def test_open_breaker_with_a_fallback_serves_the_fallback(
    gateway: Gateway, monolith: str, orders: str
) -> None:
    gw = gateway(
        routes_with(
            {"svc": monolith, "fb": orders + ECHO},
            [route("covered", "/", "svc", fallback="fb")],
            breaker={"fail_max": 2, "reset_timeout": "30s"},
        )
    )
    set_fault(monolith, "/down", error_rate=1, error_status=503)

    with httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client:
        first = [client.get("/down/x") for _ in range(2)]
        resp = client.get("/down/x")

    assert [r.headers["x-strangler-fallback"] for r in first] == ["status_5xx"] * 2
    assert resp.status_code == 200
    assert resp.headers["x-strangler-fallback"] == "breaker_open"
    assert resp.headers["x-strangler-backend"] == "fb"
    assert resp.json()["service"] == "orders"
    assert hits(monolith, "/down/x") == 2
    assert gw.metric("strangler_fallbacks_total", route="covered", reason="breaker_open") == 1
    assert gw.metric("strangler_fallbacks_total", route="covered", reason="status_5xx") == 2


# ------------------------------------------------------------------ fallback


@pytest.fixture(scope="module")
def fallback_gw(
    tmp_path_factory: pytest.TempPathFactory, monolith: str, orders: str
) -> Iterator[GatewayProcess]:
    """One gateway whose routes each fail one way, all falling back to orders' echo."""
    cfg = routes_with(
        {
            "gone": stub_url(free_port()),
            "slow": monolith,
            "failing": monolith,
            "dropping": monolith,
            "fb": orders + ECHO,
        },
        [
            route("connect", "/c", "gone", fallback="fb"),
            route("timeout", "/t", "slow", fallback="fb"),
            route("status", "/s", "failing", fallback="fb"),
            route("protocol", "/p", "dropping", fallback="fb"),
        ],
        retry={"attempts": 2},
        breaker=NO_BREAKER,
        per_backend={"slow": {"retry": {"attempts": 2, "per_try_timeout": "300ms"}}},
    )
    gw = GatewayProcess(tmp_path_factory.mktemp("fallback-gateway"), cfg).start()
    yield gw
    gw.stop(timeout=10)


@pytest.mark.parametrize(
    ("reason", "prefix", "fault"),
    [
        ("connect", "/c", {}),
        ("timeout", "/t", {"latency_ms": 2000}),
        ("status_5xx", "/s", {"error_rate": 1, "error_status": 502}),
        ("protocol", "/p", {"drop_rate": 1}),
    ],
)
def test_each_failure_reason_falls_back_with_its_header(
    fallback_gw: GatewayProcess,
    monolith: str,
    orders: str,
    reason: str,
    prefix: str,
    fault: dict[str, Any],
) -> None:
    if fault:
        set_fault(monolith, prefix, **fault)
    route_name = {"/c": "connect", "/t": "timeout", "/s": "status", "/p": "protocol"}[prefix]
    before = fallback_gw.metric("strangler_fallbacks_total", route=route_name, reason=reason)

    resp = httpx.get(fallback_gw.url + prefix + "/x", timeout=TIMEOUT)

    assert resp.status_code == 200
    assert resp.headers["x-strangler-fallback"] == reason
    assert resp.headers["x-strangler-backend"] == "fb"
    assert resp.json()["service"] == "orders"
    if fault:
        assert hits(monolith, prefix + "/x") == 2  # retried first, then fallen back
    assert hits(orders, ECHO + prefix + "/x") == 1
    after = fallback_gw.metric("strangler_fallbacks_total", route=route_name, reason=reason)
    assert after == before + 1


def test_post_that_reached_a_failing_backend_is_not_fallen_back(
    fallback_gw: GatewayProcess, monolith: str, orders: str
) -> None:
    set_fault(monolith, "/s", error_rate=1, error_status=503)

    resp = httpx.post(fallback_gw.url + "/s/pay", content=b"once", timeout=TIMEOUT)

    assert resp.status_code == 503
    assert resp.json()["error"] == "injected"
    assert "x-strangler-fallback" not in resp.headers
    assert hits(monolith, "/s/pay") == 1
    assert stub_stats(orders)["requests_total"] == 0


def test_post_to_a_refused_backend_is_served_by_the_fallback(
    fallback_gw: GatewayProcess, orders: str
) -> None:
    body = b"x" * 5000
    resp = httpx.post(fallback_gw.url + "/c/pay", content=body, timeout=TIMEOUT)

    assert resp.status_code == 200
    assert resp.headers["x-strangler-fallback"] == "connect"
    echo = resp.json()
    assert (echo["service"], echo["method"]) == ("orders", "POST")
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert stub_stats(orders)["requests_total"] == 1


# ------------------------------------------------------------------ shared through Redis


def _pair(gateway: Gateway, redis_server: RedisServer, cfg: dict[str, Any]) -> list[GatewayProcess]:
    return [gateway(cfg, args=("--redis-url", redis_server.url)) for _ in range(2)]


def test_breaker_opened_on_one_gateway_opens_on_the_other_through_redis(
    gateway: Gateway, monolith: str, redis_server: RedisServer
) -> None:
    a, b = _pair(
        gateway,
        redis_server,
        routes_with(
            {"svc": monolith},
            [route("all", "/", "svc")],
            breaker={"fail_max": 3, "reset_timeout": "30s"},
        ),
    )
    set_fault(monolith, "/down", error_rate=1, error_status=503)

    for _ in range(3):
        assert httpx.get(a.url + "/down/x", timeout=TIMEOUT).status_code == 503
    assert breaker_of(a, "svc")["state"] == "open"
    took = wait_for(lambda: breaker_of(b, "svc")["state"] == "open", 3, "B's breaker opened")

    assert took < 1.5
    assert_circuit_open(httpx.get(b.url + "/down/x", timeout=TIMEOUT))
    assert hits(monolith, "/down/x") == 3  # B never sent it
    assert breaker_of(b, "svc")["retry_after"] > 25  # B half-opens when A does
    b.wait_log("breaker svc: closed → open (opened by another replica)")
    assert backends_view(b)["redis"] == {"up": True}


def test_gateways_keep_serving_without_redis_and_share_again_when_it_returns(
    gateway: Gateway, monolith: str, redis_server: RedisServer
) -> None:
    a, b = _pair(
        gateway,
        redis_server,
        routes_with(
            {"ok": monolith + ECHO, "bad": monolith, "bad2": monolith},
            [route("ok", "/ok", "ok"), route("bad", "/bad", "bad"), route("bad2", "/bad2", "bad2")],
            breaker={"fail_max": 3, "reset_timeout": "30s"},
        ),
    )
    set_fault(monolith, "/bad", error_rate=1, error_status=503)
    set_fault(monolith, "/bad2", error_rate=1, error_status=503)

    redis_server.stop()
    for gw in (a, b):
        gw.wait_log("redis unavailable", timeout=5)

    # The request path does not need Redis.
    for gw in (a, b):
        with httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client:
            assert [client.get(f"/ok/{i}").status_code for i in range(30)] == [200] * 30
    # Breakers still work locally (not shared while Redis is gone).
    for _ in range(3):
        httpx.get(a.url + "/bad/x", timeout=TIMEOUT)
    assert_circuit_open(httpx.get(a.url + "/bad/x", timeout=TIMEOUT))
    time.sleep(1)
    assert breaker_of(b, "bad")["state"] == "closed"
    assert backends_view(a)["redis"] == {"up": False}

    # Several failed Redis calls over the outage, one warning per gateway.
    for gw in (a, b):
        wait_for(
            lambda gw=gw: gw.metric("strangler_redis_errors_total", result="error") >= 2,
            8,
            "a second failed Redis call after the pause",
        )
        assert gw.metric("strangler_redis_errors_total", result="skipped") > 0
        assert gw.log().count("redis unavailable") == 1

    # Redis is back on the same port: sharing works again without a restart.
    redis_server.start()
    for gw in (a, b):
        wait_for(lambda gw=gw: backends_view(gw)["redis"]["up"], 8, "redis seen up again")
        gw.wait_log("redis is back")
    # The breaker A opened during the outage is published now, and B follows.
    wait_for(lambda: breaker_of(b, "bad")["state"] == "open", 3, "B's bad breaker opened")
    for _ in range(3):
        httpx.get(a.url + "/bad2/x", timeout=TIMEOUT)
    took = wait_for(lambda: breaker_of(b, "bad2")["state"] == "open", 3, "B's bad2 breaker opened")
    assert took < 1.5
    assert_circuit_open(httpx.get(b.url + "/bad2/x", timeout=TIMEOUT))
    assert hits(monolith, "/bad2/x") == 3


# ------------------------------------------------------------------ admin


def test_api_backends_reports_breakers_failures_budget_and_fallbacks(
    gateway: Gateway, monolith: str, orders: str
) -> None:
    gw = gateway(
        routes_with(
            {"svc": monolith, "fb": orders + ECHO},
            [route("covered", "/", "svc", fallback="fb")],
            retry={"attempts": 2},
            breaker={"fail_max": 4, "reset_timeout": "30s"},
        )
    )
    set_fault(monolith, "/down", error_rate=1, error_status=503)

    before = backends_view(gw)
    assert before["source"] == "this process"
    assert before["redis"] is None
    assert before["backends"]["svc"] == {
        "url": monolith,
        "breaker": {
            "state": "closed",
            "consecutive_failures": 0,
            "fail_max": 4,
            "reset_timeout": 30.0,
            "retry_after": None,
        },
        "failures_last_minute": 0,
        "retry_budget": {
            "active_requests": 0,
            "retries_in_flight": 0,
            "limit": 3,
            "percent": 20.0,
            "min_retries": 3,
        },
        "retries": {},
        "fallbacks_from": {},
    }

    with httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client:
        for _ in range(2):  # two tries each: four failures, the breaker opens
            assert client.get("/down/x").headers["x-strangler-fallback"] == "status_5xx"
        assert client.get("/down/x").headers["x-strangler-fallback"] == "breaker_open"

    svc = backends_view(gw)["backends"]["svc"]
    assert svc["breaker"]["state"] == "open"
    assert svc["breaker"]["consecutive_failures"] == 4
    assert 25 < svc["breaker"]["retry_after"] <= 30
    assert svc["failures_last_minute"] == 4
    assert svc["retries"] == {"retried": 2, "exhausted": 2}
    assert svc["fallbacks_from"] == {"status_5xx": 2, "breaker_open": 1}
    fb = backends_view(gw)["backends"]["fb"]
    assert fb["breaker"]["state"] == "closed"
    assert fb["failures_last_minute"] == 0
    assert fb["fallbacks_from"] == {}
