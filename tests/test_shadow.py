"""Shadow traffic end to end: copies, comparison, noise, report, bounds, sharing.

Every test runs a real gateway process (``strangler serve``) in front of the
monolith and orders stubs on 127.0.0.1. The orders stub's deliberate-difference
knob (``PUT /__stub/differences``) makes the new service diverge in chosen
fields; both stubs add ``generated_at`` and ``trace_id`` to every answer, the
noise the comparison must learn to drop on its own. What reached a backend is
read from the backend's own hit counters (``/__stub/stats``); what the gateway
made of it from ``GET /api/shadow/report``, the metrics and ``strangler diffs``.

Waits are bounded polls; nothing here asserts how long a request took.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import RedisServer
from gateway import ADMIN_TOKEN, GatewayProcess, route_file
from threaded_server import ThreadedServer

from legacy_stub.data import FIRST_NEW_ORDER_ID
from strangler.config import Server

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("clean_stubs")]

Gateway = Callable[..., GatewayProcess]

TIMEOUT = httpx.Timeout(10.0)
ECHO = "/__stub/echo"
ITEM = "GET /api/orders/{n}"
LIST = "GET /api/orders"
STRANGLER = Path(sys.executable).with_name("strangler")

#: Copies go through the shadow worker process by default; ``in-loop`` runs
#: them in the gateway's own event loop, where the queue bounds also apply.
MODES = [
    pytest.param({}, id="default"),
    pytest.param(
        {"shadow_worker": False},
        id="in-loop",
        marks=pytest.mark.skipif(
            "shadow_worker" not in Server.model_fields, reason="no server.shadow_worker"
        ),
    ),
]


# ------------------------------------------------------------------ helpers


def shadow_route(
    name: str,
    prefix: str,
    primary: str,
    shadow_backend: str,
    *,
    match: dict[str, Any] | None = None,
    backends: list[dict[str, Any]] | None = None,
    **shadow: Any,
) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"path_prefix": prefix, **(match or {})},
        "backends": backends or [{"name": primary, "weight": 100}],
        "shadow": {"backend": shadow_backend, **shadow},
    }


def report(gw: GatewayProcess, route: str | None = None) -> dict[str, Any]:
    params = {"route": route} if route else {}
    resp = httpx.get(gw.admin_url + "/api/shadow/report", params=params, timeout=5)
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


def endpoints(data: dict[str, Any], route: str) -> dict[str, dict[str, Any]]:
    return {ep["endpoint"]: ep for ep in data["routes"][route]["endpoints"]}


def settled(data: dict[str, Any], route: str) -> int:
    """Copies the report accounts for: compared or failed."""
    return sum(ep["compared"] + ep["errors"] for ep in data["routes"][route]["endpoints"])


def wait_report(
    gw: GatewayProcess, route: str, expected: int, timeout: float = 30
) -> dict[str, Any]:
    """Poll the report until ``expected`` copies are compared or failed."""
    deadline = time.monotonic() + timeout
    while True:
        data = report(gw, route)
        done = settled(data, route)
        if done >= expected:
            assert done == expected, json.dumps(data, indent=1)
            return data
        if time.monotonic() > deadline:
            pytest.fail(f"only {done} of {expected} copies reported in {timeout}s")
        time.sleep(0.1)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(0.05)


def wait_metric(gw: GatewayProcess, want: float, name: str, **labels: str) -> None:
    """Poll a metric until it reads ``want`` (a shadow worker reports its counts
    in batches, so they may trail the report a little)."""
    deadline = time.monotonic() + 10
    while (got := gw.metric(name, **labels)) != want:
        if time.monotonic() > deadline:
            pytest.fail(f"{name}{labels} = {got}, expected {want}")
        time.sleep(0.05)


def fields(ep: dict[str, Any]) -> set[str]:
    return {f["field"] for f in ep["fields"]}


def noise_fields(ep: dict[str, Any]) -> set[str]:
    return {f["field"] for f in ep["noise_fields"]}


def blast(
    base: str | Sequence[str],
    paths: Sequence[str],
    *,
    threads: int = 8,
    headers: dict[str, str] | None = None,
    method: str = "GET",
) -> list[int]:
    """Request every path, from ``threads`` clients at once (round-robin over bases)."""
    bases = [base] if isinstance(base, str) else list(base)
    local = threading.local()

    def get(i_path: tuple[int, str]) -> int:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(timeout=TIMEOUT)
            clients.append(client)
        i, path = i_path
        url = bases[i % len(bases)] + path
        return client.request(method, url, headers=headers).status_code

    clients: list[httpx.Client] = []
    try:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(get, enumerate(paths)))
    finally:
        for client in clients:
            client.close()


def order_paths(n: int) -> list[str]:
    """Half item reads over all seed orders, half list pages."""
    return [
        f"/api/orders/{1 + i // 2 % 30}" if i % 2 else f"/api/orders?limit=5&offset={i // 2 % 25}"
        for i in range(n)
    ]


def stub_stats(stub: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(stub + "/__stub/stats", timeout=5).json()
    return stats


def set_fault(stub: str, prefix: str, **knobs: Any) -> None:
    httpx.put(
        stub + "/__stub/faults", json={"prefix": prefix, **knobs}, timeout=5
    ).raise_for_status()


def diffs_cli(gw: GatewayProcess, *args: str) -> str:
    done = subprocess.run(
        [str(STRANGLER), "diffs", *args, "--admin", gw.admin_url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(autouse=True)
def same_orders(monolith: str, orders: str) -> None:
    """Both stubs hold only the seed orders. Other tests create orders through
    one stub or the other, and a list's ``count`` would then differ for real."""
    for stub in (monolith, orders):
        listed = httpx.get(stub + "/api/orders?limit=1000", timeout=5).json()["orders"]
        for order in listed:
            if order["id"] >= FIRST_NEW_ORDER_ID:
                httpx.delete(f"{stub}/api/orders/{order['id']}", timeout=5)


@pytest.fixture
def differences(orders: str) -> Iterator[Callable[[list[str]], None]]:
    """Set the orders stub's deliberate differences; always switched off after."""

    def put(names: list[str]) -> None:
        resp = httpx.put(orders + "/__stub/differences", json={"fields": names}, timeout=5)
        resp.raise_for_status()
        assert resp.json()["fields"] == names

    try:
        yield put
    finally:
        put([])


class FixedBackend(ThreadedServer):
    """An HTTP/1.1 backend giving one fixed answer, with headers the stubs cannot vary."""

    def __init__(self, headers: list[tuple[str, str]], body: bytes) -> None:
        super().__init__()
        self.headers = headers
        self.body = body
        #: (request line, {lower-case header name: value}, body) of every request.
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request per connection (``Connection: close``): nothing left
        waiting on a kept-alive socket when the server stops."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
            fields = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
            length = int(fields.get("content-length", "0"))
            body = await reader.readexactly(length) if length else b""
            self.requests.append((request_line, fields, body))
            out = [b"HTTP/1.1 200 OK", b"Connection: close"]
            out += [f"{k}: {v}".encode() for k, v in self.headers]
            out.append(f"Content-Length: {len(self.body)}".encode())
            writer.write(b"\r\n".join(out) + b"\r\n\r\n" + self.body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


# ------------------------------------------------------------------ the proof


@pytest.mark.parametrize("mode", MODES)
def test_report_names_exactly_the_fields_made_to_differ_and_drops_noise(
    gateway: Gateway,
    monolith: str,
    orders: str,
    differences: Callable[[list[str]], None],
    mode: dict[str, Any],
) -> None:
    differences(["total", "status"])
    cfg = route_file(
        {"legacy": monolith, "orders": orders},
        [shadow_route("orders", "/api/orders", "legacy", "orders")],
        shadow_queue=5000,
        **mode,
    )
    gw = gateway(cfg)
    sent = 2000
    statuses = blast(gw.url, order_paths(sent))
    assert statuses == [200] * sent

    data = wait_report(gw, "orders", sent, timeout=60)
    assert data["source"] == "this process"
    eps = endpoints(data, "orders")
    assert set(eps) == {ITEM, LIST}  # concrete ids never make their own endpoint
    assert eps[ITEM]["compared"] == eps[LIST]["compared"] == sent // 2
    assert fields(eps[ITEM]) == {"$.total", "$.status"}
    assert fields(eps[LIST]) == {"$.orders[*].total", "$.orders[*].status"}
    for ep in eps.values():
        assert ep["errors"] == 0
        assert ep["mismatched"] == ep["compared"] and ep["matched"] == 0
        assert ep["noise_samples"] > 0
        # The noise fields differ on every answer, the primary's own included.
        assert {"$.generated_at", "$.trace_id"} <= noise_fields(ep)
        for f in ep["fields"]:
            assert f["diffs"] == ep["compared"] and f["noise"] == 0
            assert set(f["example"]) == {"primary", "candidate"}
            assert f["example"]["primary"] != f["example"]["candidate"]
    by_field = {f["field"]: f["example"] for f in eps[ITEM]["fields"]}
    total = by_field["$.total"]
    assert float(total["candidate"]) == pytest.approx(float(total["primary"]) + 0.01)
    status = by_field["$.status"]
    assert status["candidate"] == status["primary"].upper() != status["primary"]

    wait_metric(gw, sent, "strangler_shadow_requests_total", route="orders", outcome="mismatch")
    assert gw.metric("strangler_shadow_requests_total", route="orders", outcome="dropped") == 0

    out = diffs_cli(gw)
    for needle in (ITEM, LIST, "$.total", "$.status", "$.orders[*].total", "$.orders[*].status"):
        assert needle in out, out
    reported_lines = [line for line in out.splitlines() if "diffs," in line]
    assert not any("generated_at" in line or "trace_id" in line for line in reported_lines), out
    assert "noise (not reported)" in out and "$.generated_at" in out
    as_json = json.loads(diffs_cli(gw, "orders", "--json"))
    assert endpoints(as_json, "orders")[ITEM]["compared"] == sent // 2


def test_identical_backends_report_no_fields(
    gateway: Gateway, monolith: str, orders: str, differences: Callable[[list[str]], None]
) -> None:
    differences([])
    cfg = route_file(
        {"legacy": monolith, "orders": orders},
        [shadow_route("orders", "/api/orders", "legacy", "orders", noise_percent=50)],
    )
    gw = gateway(cfg)
    sent = 300
    assert blast(gw.url, order_paths(sent)) == [200] * sent
    heads = [f"/api/orders/{i}" for i in range(1, 31)]
    assert blast(gw.url, heads, method="HEAD") == [200] * 30

    data = wait_report(gw, "orders", sent + 30)
    eps = endpoints(data, "orders")
    assert set(eps) == {ITEM, LIST, "HEAD /api/orders/{n}"}
    for name, ep in eps.items():
        assert ep["fields"] == []
        assert ep["matched"] == ep["compared"] > 0 and ep["mismatched"] == 0
        assert ep["errors"] == 0
        want_noise = set() if name.startswith("HEAD") else {"$.generated_at", "$.trace_id"}
        assert noise_fields(ep) == want_noise
    assert "diffs," not in diffs_cli(gw)


# ------------------------------------------------------------------ methods


def test_post_is_not_copied_by_default(gateway: Gateway, monolith: str, orders: str) -> None:
    cfg = route_file(
        {"legacy": monolith, "orders": orders},
        [shadow_route("echo", ECHO, "legacy", "orders")],
    )
    gw = gateway(cfg)
    with httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client:
        assert client.post(ECHO, json={"n": 1}).status_code == 200
        assert client.get(ECHO).status_code == 200  # copied: proves copies flow at all

    wait_report(gw, "echo", 1)
    unknown = httpx.get(gw.admin_url + "/api/shadow/report", params={"route": "nope"}, timeout=5)
    assert unknown.status_code == 404
    stats = stub_stats(orders)
    assert stats["by_method"].get("POST", 0) == 0
    assert stats["by_method"].get("GET", 0) == 1
    wait_metric(gw, 1, "strangler_shadow_requests_total", route="echo")
    assert endpoints(report(gw, "echo"), "echo").keys() == {"GET /__stub/echo"}


def test_allowed_post_copy_carries_shadow_header_and_same_body(
    gateway: Gateway, monolith: str, orders: str
) -> None:
    recorder = FixedBackend([("Content-Type", "application/json")], b"{}").start()
    unsafe: dict[str, Any] = {"methods": ["GET", "POST"], "allow_unsafe": True}
    try:
        cfg = route_file(
            {"legacy": monolith, "orders": orders, "recorder": recorder.url},
            [
                shadow_route("recorded", ECHO + "/recorded", "legacy", "recorder", **unsafe),
                shadow_route("echo", ECHO, "legacy", "orders", **unsafe),
            ],
        )
        gw = gateway(cfg)
        body = json.dumps({"hello": "shadow", "n": 42, "pad": "x" * 3000}).encode()
        with httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client:
            for path in (ECHO + "/recorded", ECHO):
                resp = client.post(path, content=body, headers={"content-type": "application/json"})
                assert resp.status_code == 200
                seen = resp.json()
                assert seen["service"] == "monolith" and seen["body_bytes"] == len(body)
                # The primary's request is not marked.
                assert "x-strangler-shadow" not in {name.lower() for name, _ in seen["headers"]}

        # What the copy looked like on the wire.
        wait_report(gw, "recorded", 1)
        ((request_line, headers, copied),) = recorder.requests
        assert request_line == "POST /__stub/echo/recorded HTTP/1.1"
        assert headers["x-strangler-shadow"] == "1"
        assert headers["content-type"] == "application/json"
        assert copied == body

        # The orders stub got it too, and echoed the same body the monolith saw.
        data = wait_report(gw, "echo", 1)
        assert stub_stats(orders)["by_method"] == {"POST": 1}
        (ep,) = data["routes"]["echo"]["endpoints"]
        assert ep["endpoint"] == "POST /__stub/echo"
        assert ep["noise_samples"] == 0  # an unsafe method is never sent to the primary twice
        by_field = {f["field"]: f["example"] for f in ep["fields"]}
        assert by_field["$.service"] == {"primary": '"monolith"', "candidate": '"orders"'}
        assert "$.headers[*]" in by_field  # the copy had one header line more
        same = {"$.body_bytes", "$.body_sha256", "$.body_text", "$.method", "$.target"}
        assert not same & set(by_field) and not same & noise_fields(ep)
    finally:
        recorder.stop()


def test_body_over_max_body_bytes_is_skipped_and_counted(
    gateway: Gateway, monolith: str, orders: str
) -> None:
    cfg = route_file(
        {"legacy": monolith, "orders": orders},
        [
            shadow_route(
                "echo", ECHO, "legacy", "orders",
                methods=["GET", "POST"], allow_unsafe=True, max_body_bytes=1024,
            )
        ],
    )  # fmt: skip
    gw = gateway(cfg)

    def chunked() -> Iterator[bytes]:
        for _ in range(4):
            yield b"c" * 1024

    with httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client:
        sizes = {}
        for name, content in (
            ("buffered", b"b" * 4096),  # read whole (small), but over the bound
            ("streamed", b"s" * 100_000),  # too big to buffer at all
            ("chunked", chunked()),  # goes on past the bound
            ("small", b"x" * 1000),  # copied: the control
        ):
            resp = client.post(ECHO, content=content)
            assert resp.status_code == 200, name
            sizes[name] = resp.json()["body_bytes"]
    assert sizes == {"buffered": 4096, "streamed": 100_000, "chunked": 4096, "small": 1000}

    wait_report(gw, "echo", 1)
    wait_metric(gw, 3, "strangler_shadow_skipped_total", route="echo", reason="body_too_large")
    wait_metric(gw, 3, "strangler_shadow_requests_total", route="echo", outcome="skipped")
    assert stub_stats(orders)["by_method"] == {"POST": 1}


# ------------------------------------------------------------------ never costs the client


@pytest.mark.parametrize("mode", MODES)
def test_shadow_backend_down_costs_the_client_nothing_and_counts_errors(
    gateway: Gateway, monolith: str, refused_url: str, mode: dict[str, Any]
) -> None:
    cfg = route_file(
        {"legacy": monolith, "candidate": refused_url},
        [shadow_route("orders", "/api/orders", "legacy", "candidate")],
        **mode,
    )
    gw = gateway(cfg)
    sent = 60
    assert blast(gw.url, order_paths(sent)) == [200] * sent

    data = wait_report(gw, "orders", sent)
    for ep in endpoints(data, "orders").values():
        assert ep["errors"] > 0 and ep["compared"] == 0 and ep["fields"] == []
    wait_metric(gw, sent, "strangler_shadow_requests_total", route="orders", outcome="error")


@pytest.mark.parametrize("mode", MODES)
def test_slow_shadow_backend_times_out_without_failing_clients(
    gateway: Gateway, monolith: str, orders: str, mode: dict[str, Any]
) -> None:
    set_fault(orders, "/api/orders", latency_ms=2000)
    cfg = route_file(
        {"legacy": monolith, "orders": orders},
        [shadow_route("orders", "/api/orders", "legacy", "orders", timeout="500ms")],
        **mode,
    )
    gw = gateway(cfg)
    sent = 20
    assert blast(gw.url, order_paths(sent)) == [200] * sent

    data = wait_report(gw, "orders", sent)
    assert sum(ep["errors"] for ep in endpoints(data, "orders").values()) == sent
    wait_metric(gw, sent, "strangler_shadow_requests_total", route="orders", outcome="error")
    assert stub_stats(orders)["by_path"].get("/api/orders/1", 0) >= 1  # the copies did go out


@pytest.mark.parametrize("mode", MODES)
def test_full_shadow_queue_drops_and_counts_copies(
    gateway: Gateway, monolith: str, orders: str, mode: dict[str, Any]
) -> None:
    set_fault(orders, "/api/orders", latency_ms=2000)
    cfg = route_file(
        {"legacy": monolith, "orders": orders},
        [shadow_route("orders", "/api/orders", "legacy", "orders", timeout="1s")],
        shadow_concurrency=1,
        shadow_queue=1,
        **mode,
    )
    gw = gateway(cfg)
    sent = 50
    assert blast(gw.url, order_paths(sent), threads=25) == [200] * sent

    def dropped() -> float:
        return gw.metric("strangler_shadow_requests_total", route="orders", outcome="dropped")

    wait_for(lambda: dropped() > 0, 10, "a dropped copy counted")
    # Every copy is accounted for: dropped, or sent and timed out.
    wait_for(
        lambda: settled(report(gw, "orders"), "orders") + dropped() == sent,
        20,
        "copies accounted for",
    )
    wait_metric(gw, 0, "strangler_shadow_queue")


# ------------------------------------------------------------------ both directions


def test_flipped_route_shadows_legacy_the_same_way(
    gateway: Gateway, monolith: str, orders: str, differences: Callable[[list[str]], None]
) -> None:
    differences(["total"])
    cfg = route_file(
        {"legacy": monolith, "orders": orders},
        [
            shadow_route(
                "orders",
                "/api/orders",
                "orders",
                "legacy",
                endpoints=["/api/orders/{id}"],
                noise_percent=50,
            )
        ],
    )
    gw = gateway(cfg)
    sent = 100
    paths = [f"/api/orders/{1 + i % 30}" for i in range(sent)]
    assert blast(gw.url, paths) == [200] * sent

    data = wait_report(gw, "orders", sent)
    assert data["routes"]["orders"]["shadow_backend"] == "legacy"
    ep = endpoints(data, "orders")["GET /api/orders/{id}"]  # the configured template
    assert ep["compared"] == ep["mismatched"] == sent
    assert fields(ep) == {"$.total"}
    assert {"$.generated_at", "$.trace_id"} <= noise_fields(ep)
    (total,) = ep["fields"]
    # The primary is now the new service: its total is the altered one.
    assert float(total["example"]["primary"]) == pytest.approx(
        float(total["example"]["candidate"]) + 0.01
    )
    legacy_hits = sum(
        n for p, n in stub_stats(monolith)["by_path"].items() if p.startswith("/api/orders")
    )
    assert legacy_hits == sent  # only copies: noise samples go to the primary


def test_copy_is_skipped_when_the_primary_is_the_shadow_backend(
    gateway: Gateway, monolith: str, orders: str, refused_url: str
) -> None:
    # Served by its fallback, which is the shadow backend: no copy either.
    fell_back = shadow_route(
        "fell-back", "/api/orders", "down", "orders",
        match={"headers": {"X-Case": "fallback"}}, noise_percent=0,
    )  # fmt: skip
    fell_back["fallback"] = "orders"
    route = shadow_route(
        "orders",
        "/api/orders",
        "legacy",
        "orders",
        backends=[{"name": "legacy", "weight": 50}, {"name": "orders", "weight": 50}],
        noise_percent=0,
    )
    route["allow_override"] = True
    backends = {"legacy": monolith, "orders": orders, "down": refused_url}
    gw = gateway(route_file(backends, [fell_back, route]))
    paths = [f"/api/orders/{1 + i % 30}" for i in range(20)]
    assert blast(gw.url, paths, headers={"X-Strangler-Backend": "orders"}) == [200] * 20
    assert blast(gw.url, paths, headers={"X-Strangler-Backend": "legacy"}) == [200] * 20
    assert blast(gw.url, paths[:5], headers={"X-Case": "fallback"}) == [200] * 5

    wait_report(gw, "orders", 20)
    wait_metric(gw, 20, "strangler_shadow_skipped_total", route="orders", reason="same_backend")
    wait_metric(gw, 20, "strangler_shadow_requests_total", route="orders", outcome="skipped")
    wait_metric(gw, 5, "strangler_shadow_skipped_total", route="fell-back", reason="same_backend")
    assert report(gw, "fell-back")["routes"]["fell-back"]["endpoints"] == []
    orders_hits = sum(
        n for p, n in stub_stats(orders)["by_path"].items() if p.startswith("/api/orders")
    )
    # 20 as primary, 20 copies, 5 as fallback: none sent to itself twice.
    assert orders_hits == 45


def test_failed_primary_is_not_copied(gateway: Gateway, orders: str, refused_url: str) -> None:
    cfg = route_file(
        {"down": refused_url, "orders": orders},
        [shadow_route("orders", "/api/orders", "down", "orders")],
    )
    gw = gateway(cfg)
    # 502, or 503 once the breaker opens: either way the primary failed.
    assert set(blast(gw.url, order_paths(10))) <= {502, 503}
    wait_metric(gw, 10, "strangler_shadow_skipped_total", route="orders", reason="primary_failed")
    assert report(gw, "orders")["routes"]["orders"]["endpoints"] == []
    assert stub_stats(orders)["by_path"] == {}


# ------------------------------------------------------------------ Redis


def test_report_over_redis_covers_every_gateway_and_resets(
    gateway: Gateway,
    monolith: str,
    orders: str,
    redis_server: RedisServer,
    differences: Callable[[list[str]], None],
) -> None:
    differences(["status"])
    # 50 copies per endpoint: noise sampled on half of them, so the noise fields
    # certainly have samples (at the default 10% none at all has odds of 1 in 200).
    cfg = route_file(
        {"legacy": monolith, "orders": orders},
        [shadow_route("orders", "/api/orders", "legacy", "orders", noise_percent=50)],
    )
    args = ("--redis-url", redis_server.url)
    gw1, gw2 = gateway(cfg, args=args), gateway(cfg, args=args)
    assert blast(gw1.url, order_paths(60)) == [200] * 60
    assert blast(gw2.url, order_paths(40)) == [200] * 40

    for gw in (gw1, gw2):
        data = wait_report(gw, "orders", 100)
        assert "redis" in data["source"]
        eps = endpoints(data, "orders")
        assert eps[ITEM]["compared"] == eps[LIST]["compared"] == 50
        assert fields(eps[ITEM]) == {"$.status"}
        assert fields(eps[LIST]) == {"$.orders[*].status"}
    assert "redis" in diffs_cli(gw2)

    reset = gw1.admin_url + "/api/shadow/reset"
    token = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert httpx.post(reset, timeout=5).status_code == 401
    assert httpx.post(reset, headers=token, json={"route": "nope"}, timeout=5).status_code == 404
    assert httpx.post(reset, headers=token, json=["orders"], timeout=5).status_code == 400
    assert settled(report(gw1, "orders"), "orders") == 100  # refused resets changed nothing
    resp = httpx.post(reset, headers=token, json={"route": "orders"}, timeout=5)
    assert resp.status_code == 200 and resp.json() == {"reset": ["orders"]}
    for gw in (gw1, gw2):
        assert report(gw, "orders")["routes"]["orders"]["endpoints"] == []

    # Counting starts over, examples included, even from the gateway not reset.
    assert blast(gw2.url, ["/api/orders/7"] * 10) == [200] * 10
    ep = endpoints(wait_report(gw1, "orders", 10), "orders")[ITEM]
    status = {f["field"]: f for f in ep["fields"]}["$.status"]
    assert status["diffs"] == 10
    assert set(status["example"]) == {"primary", "candidate"}


@pytest.mark.parametrize("mode", MODES)
def test_reset_starts_the_report_over_with_examples(
    gateway: Gateway,
    monolith: str,
    orders: str,
    differences: Callable[[list[str]], None],
    mode: dict[str, Any],
) -> None:
    differences(["status"])
    cfg = route_file(
        {"legacy": monolith, "orders": orders},
        [shadow_route("orders", "/api/orders", "legacy", "orders", noise_percent=100)],
        **mode,
    )
    gw = gateway(cfg)
    token = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    legacy_status = httpx.get(monolith + "/api/orders/7", timeout=5).json()["status"]
    example = {"primary": f'"{legacy_status}"', "candidate": f'"{legacy_status.upper()}"'}
    for round_ in range(2):
        assert blast(gw.url, ["/api/orders/7"] * 10) == [200] * 10
        ep = endpoints(wait_report(gw, "orders", 10), "orders")[ITEM]
        assert ep["compared"] == 10
        (status,) = ep["fields"]
        assert status["example"] == example, round_
        resp = httpx.post(gw.admin_url + "/api/shadow/reset", headers=token, timeout=5)
        assert resp.status_code == 200 and resp.json() == {"reset": ["orders"]}
        assert report(gw, "orders")["routes"]["orders"]["endpoints"] == []


# ------------------------------------------------------------------ compare options


def test_compare_options_hide_ignored_and_tolerated_differences(
    gateway: Gateway, monolith: str, orders: str, differences: Callable[[list[str]], None]
) -> None:
    differences(["total", "status"])

    def case(name: str, compare: dict[str, Any], **shadow: Any) -> dict[str, Any]:
        # 30 copies each: noise on every one, or with the default 10% a case has
        # no noise sample at all (and reports the noise fields) 4% of the time.
        return shadow_route(
            name, "/api/orders", "legacy", "orders",
            match={"headers": {"X-Case": name}}, compare=compare, noise_percent=100, **shadow,
        )  # fmt: skip

    cfg = route_file(
        {"legacy": monolith, "orders": orders},
        [
            case("plain", {}),
            case("ignore", {"ignore": ["$.total"]}),
            case("tolerance", {"numeric_tolerance": 0.01}),
            case("both", {"ignore": ["$.status"], "numeric_tolerance": 0.01}),
            # Bodies cut at the capture bound are not compared at all.
            case("truncated", {}, max_response_bytes=64),
        ],
    )
    gw = gateway(cfg)
    paths = [f"/api/orders/{i}" for i in range(1, 31)]
    expected = {
        "plain": {"$.total", "$.status"},
        "ignore": {"$.status"},
        "tolerance": {"$.status"},
        "both": set(),
        "truncated": set(),
    }
    for name in expected:
        assert blast(gw.url, paths, headers={"X-Case": name}) == [200] * 30
    for name, want in expected.items():
        ep = endpoints(wait_report(gw, name, 30), name)[ITEM]
        assert fields(ep) == want, name
        hidden = {"$.total", "$.status"} - want
        assert not hidden & noise_fields(ep), name  # not differing at all, not even as noise
        assert ep["mismatched"] == (30 if want else 0), name
    truncated = endpoints(report(gw, "truncated"), "truncated")[ITEM]
    assert truncated["noise_fields"] == []  # no body compared, so no noise either


# ------------------------------------------------------------------ secrets


def test_credentials_never_appear_in_the_report(
    gateway: Gateway, monolith: str, orders: str
) -> None:
    json_type = ("Content-Type", "application/json")
    primary = FixedBackend(
        [
            json_type,
            ("Authorization", "Bearer primary-token-ABC"),
            ("Cookie", "sid=primary-cookie-secret"),
            ("Set-Cookie", "sid=primary-set-cookie-secret; Path=/"),
        ],
        b'{"ok": true}',
    ).start()
    candidate = FixedBackend(
        [
            json_type,
            ("Authorization", "Bearer candidate-token-XYZ"),
            ("Proxy-Authorization", "Basic candidate-proxy-secret"),
            ("Cookie", "sid=candidate-cookie-secret"),
            ("Set-Cookie", "sid=candidate-set-cookie-secret; Path=/"),
            ("Set-Cookie", "other=candidate-second-cookie-secret; Path=/"),
        ],
        b'{"ok": true}',
    ).start()
    try:
        cfg = route_file(
            {"legacy": monolith, "orders": orders, "p": primary.url, "c": candidate.url},
            [
                shadow_route("secrets", "/secret", "p", "c"),
                shadow_route("echo", ECHO, "legacy", "orders"),
            ],
        )
        gw = gateway(cfg)
        client_headers = {
            "Authorization": "Bearer client-token-secret",
            "Cookie": "sid=client-cookie-secret",
        }
        with httpx.Client(base_url=gw.url, timeout=TIMEOUT, headers=client_headers) as client:
            resp = client.get("/secret")
            assert resp.status_code == 200
            # The client gets the primary's answer whole.
            assert resp.headers["authorization"] == "Bearer primary-token-ABC"
            echoed = client.get(ECHO)
            assert echoed.status_code == 200
            assert ["authorization", "Bearer client-token-secret"] in echoed.json()["headers"]
        wait_report(gw, "secrets", 1)
        wait_report(gw, "echo", 1)
        assert len(candidate.requests) == 1
        # The copy carries the client's credentials, as the primary request did.
        assert candidate.requests[0][1]["authorization"] == "Bearer client-token-secret"

        data = report(gw)
        ep = endpoints(data, "secrets")["GET /secret"]
        by_field = {f["field"]: f["example"] for f in ep["fields"]}
        redacted = {"primary": "<redacted>", "candidate": "<redacted>"}
        assert by_field == {
            "header.authorization": redacted,
            "header.cookie": redacted,
            "header.proxy-authorization": {"primary": "<missing>", "candidate": "<redacted>"},
            # Set-Cookie is compared by count only, and even the count is not rendered.
            "header.set-cookie": redacted,
        }

        texts = {"report": json.dumps(data), "cli": diffs_cli(gw), "json": diffs_cli(gw, "--json")}
        needles = ("token-ABC", "token-XYZ", "client-token", "cookie-secret", "proxy-secret")
        for where, text in texts.items():
            for needle in needles:
                assert needle not in text, (where, needle)
    finally:
        primary.stop()
        candidate.stop()
