"""Proof under failure: real processes, real load, real kills.

A gateway splits ``/api/orders`` 50/50 between the extracted orders service
and the legacy monolith, with the monolith as the route's fallback. One
hundred clients, each on its own keep-alive connection, read orders for
seconds at a time while the orders service is killed with SIGKILL, restarted
on the same port, or told to fail every request. Every outcome is counted,
and the clients must see no 5xx and no connection error at all: what the
orders service cannot answer, the monolith does (``X-Strangler-Fallback``).

A slow backend costs a request at most the route's retry deadline, not the
sum of its tries and not the backend's own latency.

The orders stub here is this module's own process (not the shared session
one), so it can be killed and restarted on its port.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from gateway import GatewayProcess, route_file

from legacy_stub.data import SEED_ORDER_COUNT
from legacy_stub.testing import free_port, start_stub, stop_stub, stub_url

pytestmark = pytest.mark.timeout(120)

Gateway = Callable[..., GatewayProcess]

CLIENTS = 100
RESET_TIMEOUT = 2.0
FALLBACK = "x-strangler-fallback"
BACKEND = "x-strangler-backend"


class OrdersStub:
    """An orders-service stub on a fixed port that can be killed and restarted."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = stub_url(self.port)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = start_stub("orders", self.port)

    def kill(self) -> None:
        """SIGKILL: no drain, no FIN for requests in flight, sockets reset by the kernel."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None:
            stop_stub(self.proc)
            self.proc = None

    def set_fault(self, **fault: Any) -> None:
        response = httpx.put(self.url + "/__stub/faults", json={"prefix": "/", **fault}, timeout=5)
        response.raise_for_status()

    def hits(self) -> int:
        stats = httpx.get(self.url + "/__stub/stats", timeout=5).json()
        return int(stats["requests_total"])


@pytest.fixture
def own_orders() -> Iterator[OrdersStub]:
    stub = OrdersStub()
    stub.start()
    yield stub
    stub.stop()


def split_routes(monolith: str, orders: str, **route: Any) -> dict[str, Any]:
    """``/api/orders`` split 50/50 (no sticky key: each request is a random
    bucket), falling back to the monolith; the orders breaker opens after 5
    failures and tries again after 2 s."""
    routes = route_file(
        {"legacy": monolith, "orders": orders},
        [
            {
                "name": "orders",
                "match": {"path_prefix": "/api/orders"},
                "backends": [{"name": "legacy", "weight": 50}, {"name": "orders", "weight": 50}],
                "fallback": "legacy",
                "retry": {"attempts": 2, "per_try_timeout": "1s", "deadline": "3s"},
                **route,
            }
        ],
    )
    routes["backends"]["orders"]["breaker"] = {
        "fail_max": 5,
        "reset_timeout": f"{RESET_TIMEOUT}s",
    }
    return routes


@dataclass
class Outcome:
    at: float  # seconds since the load started, when the answer (or error) came
    order: int
    status: int | None = None
    backend: str | None = None
    fallback: str | None = None
    error: str | None = None
    request_id: str | None = None


@dataclass
class Load:
    """Every request the clients made, in completion order."""

    started: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.started

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is not None or o.status != 200]

    def summary(self) -> str:
        statuses = Counter(o.status for o in self.outcomes)
        served = Counter((o.backend, o.fallback) for o in self.outcomes)
        lines = [f"{len(self.outcomes)} requests; statuses {dict(statuses)}; served {dict(served)}"]
        lines += [f"  failed: {o}" for o in self.failures[:20]]
        return "\n".join(lines)


async def run_load(
    gw: GatewayProcess,
    seconds: float,
    events: Sequence[tuple[float, Callable[[Load], Awaitable[None]]]] = (),
    clients: int = CLIENTS,
) -> Load:
    """``clients`` clients send GETs for ``seconds``; ``events`` run at their offsets.

    Each client has its own connection (one ``AsyncClient`` each: a shared
    client with many connections is much slower). The clients are built
    before the clock starts, sharing one TLS context (unused over plain
    HTTP, but building one per client takes tens of milliseconds each).
    """
    tls = ssl.create_default_context()
    limits = httpx.Limits(max_connections=1)
    https = [
        httpx.AsyncClient(base_url=gw.url, limits=limits, timeout=10, verify=tls)
        for _ in range(clients)
    ]
    load = Load(started=time.monotonic())
    end = load.started + seconds

    async def client(index: int, http: httpx.AsyncClient) -> None:
        n = index
        while time.monotonic() < end:
            order = n % SEED_ORDER_COUNT + 1
            n += 1
            outcome = Outcome(at=0.0, order=order)
            try:
                response = await http.get(f"/api/orders/{order}")
            except httpx.HTTPError as exc:
                outcome.error = f"{type(exc).__name__}: {exc}"
            else:
                outcome.status = response.status_code
                outcome.backend = response.headers.get(BACKEND)
                outcome.fallback = response.headers.get(FALLBACK)
                outcome.request_id = response.headers.get("x-request-id")
                if response.status_code == 200 and response.json().get("id") != order:
                    outcome.error = f"wrong body: {response.text[:200]}"
            outcome.at = load.now()
            load.outcomes.append(outcome)

    async def scheduled(offset: float, action: Callable[[Load], Awaitable[None]]) -> None:
        await asyncio.sleep(max(0.0, offset - load.now()))
        await action(load)

    try:
        await asyncio.gather(
            *(client(i, http) for i, http in enumerate(https)),
            *(scheduled(offset, action) for offset, action in events),
        )
    finally:
        for http in https:
            await http.aclose()
    return load


def assert_no_failures(load: Load, minimum: int) -> None:
    assert not load.failures, load.summary()
    assert len(load.outcomes) >= minimum, load.summary()


# ------------------------------------------------------------------- the tests


async def test_killing_the_new_service_mid_run_costs_clients_nothing(
    gateway: Gateway, monolith: str, clean_stubs: None, own_orders: OrdersStub
) -> None:
    """SIGKILL the orders service 5 s into a 20 s run under 100 clients, restart
    it on the same port at 12 s: zero 5xx, zero connection errors, the
    monolith answers meanwhile, and the orders service gets traffic back
    within the breaker's reset timeout (+2 s) of coming back."""
    gw = gateway(split_routes(monolith, own_orders.url))
    marks: dict[str, float] = {}

    async def kill(load: Load) -> None:
        own_orders.kill()
        marks["killed"] = load.now()

    async def restart(load: Load) -> None:
        marks["restarting"] = load.now()
        await asyncio.to_thread(own_orders.start)  # returns once /healthz answers
        marks["restarted"] = load.now()

    load = await run_load(gw, 20.0, [(5.0, kill), (12.0, restart)])
    assert set(marks) == {"killed", "restarting", "restarted"}
    killed, restarting, restarted = marks["killed"], marks["restarting"], marks["restarted"]

    assert_no_failures(load, minimum=2000)
    before = [o for o in load.outcomes if o.at < killed]
    down = [o for o in load.outcomes if killed + 0.5 < o.at < restarting]
    after = [o for o in load.outcomes if o.at > restarting]
    # Both backends served before the kill (the split works) ...
    assert {o.backend for o in before} == {"legacy", "orders"}, load.summary()
    # ... only the monolith while the orders service was dead, half of it as
    # a fallback for requests that were meant for the orders service ...
    assert {o.backend for o in down} == {"legacy"}, load.summary()
    fallbacks = [o for o in down if o.fallback is not None]
    assert len(fallbacks) > 100, load.summary()
    assert {o.fallback for o in fallbacks} <= {"breaker_open", "connect", "protocol", "timeout"}
    # ... and the orders service again once it is back.
    back = [o for o in after if o.backend == "orders" and o.fallback is None]
    assert back, load.summary()
    recovery = back[0].at - restarted  # from the moment it answers its health check
    assert recovery <= RESET_TIMEOUT + 2, f"orders served again {recovery:.2f}s after restart"
    assert len(back) > 100, load.summary()
    assert gw.metric("strangler_breaker_transitions_total", backend="orders", state="open") >= 1


async def test_new_service_failing_every_request_costs_clients_nothing(
    gateway: Gateway, monolith: str, clean_stubs: None, own_orders: OrdersStub
) -> None:
    """The orders service starts answering 503 to everything 3 s into a 10 s
    run: the same zero 5xx, zero connection errors."""
    gw = gateway(split_routes(monolith, own_orders.url))
    marks: dict[str, float] = {}

    async def fail_everything(load: Load) -> None:
        await asyncio.to_thread(own_orders.set_fault, error_rate=1.0, error_status=503)
        marks["faulted"] = load.now()

    load = await run_load(gw, 10.0, [(3.0, fail_everything)])
    assert "faulted" in marks

    assert_no_failures(load, minimum=1000)
    before = [o for o in load.outcomes if o.at < marks["faulted"]]
    during = [o for o in load.outcomes if o.at > marks["faulted"] + 0.5]
    assert {o.backend for o in before} == {"legacy", "orders"}, load.summary()
    assert {o.backend for o in during} == {"legacy"}, load.summary()
    fallbacks = [o for o in during if o.fallback is not None]
    assert len(fallbacks) > 100, load.summary()
    assert {o.fallback for o in fallbacks} <= {"breaker_open", "status_5xx"}
    assert gw.metric("strangler_breaker_transitions_total", backend="orders", state="open") >= 1


async def test_slow_backend_costs_at_most_the_deadline(
    gateway: Gateway, monolith: str, clean_stubs: None, own_orders: OrdersStub
) -> None:
    """Orders answers after 3 s; tries time out after 500 ms, all tries
    together after 1.2 s. Without a fallback the client gets a 504 after
    about the deadline, not after 3 × 500 ms and not after 3 s; with one, a
    200 from the monolith after the deadline plus the monolith's own time."""
    deadline = 1.2
    # Below 3 × 500 ms: a gateway that ignored the deadline would take longer.
    margin = 0.25
    retry = {"attempts": 3, "per_try_timeout": "500ms", "deadline": f"{deadline}s"}
    only_orders = [{"name": "orders", "weight": 100}]
    routes = route_file(
        {"legacy": monolith, "orders": own_orders.url},
        [
            {
                "name": "with-fallback",
                "match": {"path_prefix": "/api/orders", "headers": {"X-Fallback": "yes"}},
                "backends": only_orders,
                "fallback": "legacy",
                "retry": retry,
            },
            {
                "name": "no-fallback",
                "match": {"path_prefix": "/api/orders"},
                "backends": only_orders,
                "retry": retry,
            },
        ],
    )
    requests = 5
    # Every try must reach the slow backend: no breaker to answer at once, and
    # a retry budget that lets all concurrent requests retry.
    routes["backends"]["orders"]["breaker"] = {"enabled": False}
    routes["backends"]["orders"]["retry_budget"] = {"percent": 100, "min_retries": requests}
    gw = gateway(routes)
    own_orders.set_fault(latency_ms=3000)
    hits_before = own_orders.hits()

    async def timed(
        http: httpx.AsyncClient, order: int, **headers: str
    ) -> tuple[float, httpx.Response]:
        started = time.monotonic()
        response = await http.get(f"{gw.url}/api/orders/{order}", headers=headers)
        return time.monotonic() - started, response

    async with httpx.AsyncClient(timeout=10) as http:
        # The monolith's own time for the same request, for the fallback bound.
        legacy_started = time.monotonic()
        (await http.get(f"{monolith}/api/orders/1")).raise_for_status()
        legacy_time = time.monotonic() - legacy_started

        results = await asyncio.gather(*(timed(http, i + 1) for i in range(requests)))
        for elapsed, response in results:
            assert response.status_code == 504, response.text
            assert response.json()["error"] == "upstream_timeout"
            # At least two tries (~1 s), never the sum of three, never 3 s.
            assert 2 * 0.5 - 0.05 <= elapsed <= deadline + margin, elapsed
        hits = own_orders.hits() - hits_before
        assert 2 * requests <= hits <= 3 * requests, hits

        results = await asyncio.gather(
            *(timed(http, i + 1, **{"X-Fallback": "yes"}) for i in range(requests))
        )
        for elapsed, response in results:
            assert response.status_code == 200, response.text
            assert response.headers[BACKEND] == "legacy"
            assert response.headers[FALLBACK] == "timeout"
            assert 2 * 0.5 - 0.05 <= elapsed <= deadline + legacy_time + margin, elapsed
