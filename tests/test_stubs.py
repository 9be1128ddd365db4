"""Tests for the stand-in backends in `legacy_stub`.

Every other end-to-end test trusts these stubs to report faithfully what they
received and to misbehave exactly as configured, so they are checked here as
real subprocesses over real sockets, the way the gateway meets them.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from legacy_stub.data import (
    FIRST_NEW_ORDER_ID,
    ITEMS_BY_ID,
    SEED_ORDER_COUNT,
    USER_COUNT,
    download_pattern,
)
from legacy_stub.testing import free_port, start_stub, stop_stub, stub_url

pytestmark = pytest.mark.timeout(60)

NOISE = ("generated_at", "trace_id")


class Stub:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = stub_url(port)
        self.client = httpx.Client(base_url=self.url, timeout=10)


@pytest.fixture(scope="module")
def monolith() -> Iterator[Stub]:
    port = free_port()
    stub = Stub(start_stub("monolith", port), port)
    yield stub
    stub.client.close()
    assert stop_stub(stub.proc) == 0


@pytest.fixture(scope="module")
def orders() -> Iterator[Stub]:
    port = free_port()
    stub = Stub(start_stub("orders", port), port)
    yield stub
    stub.client.close()
    assert stop_stub(stub.proc) == 0


@pytest.fixture(autouse=True)
def _reset_knobs(monolith: Stub, orders: Stub) -> Iterator[None]:
    yield
    for stub in (monolith, orders):
        stub.client.delete("/__stub/faults").raise_for_status()
        stub.client.post("/__stub/stats/reset").raise_for_status()
    orders.client.put("/__stub/differences", json={"fields": []}).raise_for_status()


def strip_noise(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in NOISE}


def differing_paths(a: Any, b: Any, prefix: str = "") -> set[str]:
    """Dotted paths (list indexes included) where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        paths: set[str] = set()
        for key in a.keys() | b.keys():
            paths |= differing_paths(a.get(key), b.get(key), f"{prefix}{key}.")
        return paths
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        paths = set()
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            paths |= differing_paths(x, y, f"{prefix}{i}.")
        return paths
    return set() if a == b else {prefix.rstrip(".")}


def sha256_of(chunks: Any) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def raw_request(port: int, request: bytes) -> tuple[bytes, bytes]:
    """Send bytes as-is (no client normalisation); return (head, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


# --- basics and seed data -------------------------------------------------------------


def test_health_and_home(monolith: Stub, orders: Stub) -> None:
    for stub in (monolith, orders):
        response = stub.client.get("/healthz")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}
    home = monolith.client.get("/")
    assert home.status_code == 200
    assert home.headers["content-type"].startswith("text/html")
    assert "<h1>Legacy Shop</h1>" in home.text


def test_noise_fields_are_fresh_on_every_response(monolith: Stub) -> None:
    first = monolith.client.get("/api/items/1").json()
    second = monolith.client.get("/api/items/1").json()
    for body in (first, second):
        assert body["generated_at"].endswith("Z")
        assert datetime.fromisoformat(body["generated_at"]).microsecond is not None
        assert uuid.UUID(body["trace_id"]).version == 4
    assert first["trace_id"] != second["trace_id"]
    assert strip_noise(first) == strip_noise(second)


def test_orders_identical_across_services_except_noise(monolith: Stub, orders: Stub) -> None:
    legacy = monolith.client.get("/api/orders", params={"limit": 1000}).json()
    new = orders.client.get("/api/orders", params={"limit": 1000}).json()
    assert legacy["count"] == new["count"] == SEED_ORDER_COUNT
    assert [o["id"] for o in legacy["orders"]] == list(range(1, SEED_ORDER_COUNT + 1))
    assert legacy["trace_id"] != new["trace_id"]
    assert strip_noise(legacy) == strip_noise(new)
    for order_id in range(1, SEED_ORDER_COUNT + 1):
        a = monolith.client.get(f"/api/orders/{order_id}").json()
        b = orders.client.get(f"/api/orders/{order_id}").json()
        assert differing_paths(a, b) <= set(NOISE)
        assert strip_noise(a) == strip_noise(b)
        assert set(a) >= {"id", "user_id", "items", "total", "currency", "status", "created_at"}
        assert a["currency"] == "EUR"
        assert a["total"] == round(sum(i["price"] * i["qty"] for i in a["items"]), 2)


def test_catalog_and_users_identical_across_processes(monolith: Stub) -> None:
    # A second monolith with a different hash seed must serve the same data.
    port = free_port()
    proc = start_stub("monolith", port, env={"PYTHONHASHSEED": "12345"})
    try:
        with httpx.Client(base_url=stub_url(port), timeout=10) as other:
            for path in ["/api/items?limit=100", *(f"/api/users/{i}" for i in (1, 7, USER_COUNT))]:
                assert strip_noise(monolith.client.get(path).json()) == strip_noise(
                    other.get(path).json()
                )
            # stop with SIGINT: must exit 0 as well
            proc.send_signal(signal.SIGINT)
            assert proc.wait(10) == 0
    finally:
        stop_stub(proc)


def test_items_users_and_json_errors(monolith: Stub) -> None:
    items = monolith.client.get("/api/items", params={"limit": 5, "offset": 2}).json()
    assert [i["id"] for i in items["items"]] == [3, 4, 5, 6, 7]
    assert items["count"] == len(ITEMS_BY_ID)
    books = monolith.client.get("/api/items", params={"category": "books", "limit": 100}).json()
    assert books["items"] and all(i["category"] == "books" for i in books["items"])
    assert monolith.client.get("/api/items/7").json()["price"] == ITEMS_BY_ID[7].price
    assert monolith.client.get("/api/users/1").json()["username"] == "alice"
    for path in ("/api/items/999", "/api/users/999", "/api/orders/999", "/api/nothing"):
        response = monolith.client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"] == "not_found"
    bad = monolith.client.get("/api/items", params={"limit": "many"})
    assert bad.status_code == 400
    assert bad.json()["error"] == "bad_request"


# --- sessions and cookies -------------------------------------------------------------


def test_login_sets_two_cookies_and_session_works(monolith: Stub) -> None:
    with httpx.Client(base_url=monolith.url, timeout=10) as client:
        assert client.get("/api/me").status_code == 401
        login = client.post("/login", json={"username": "bob", "password": "secret"})
        assert login.status_code == 200
        assert login.json()["username"] == "bob"
        set_cookies = login.headers.get_list("set-cookie")
        assert len(set_cookies) == 2
        session, csrf = sorted(set_cookies, key=lambda c: not c.startswith("session="))
        assert session.startswith("session=")
        assert "HttpOnly" in session and "Path=/" in session
        assert csrf.startswith("csrftoken=")
        assert client.get("/api/me").json()["username"] == "bob"

        logout = client.post("/logout")
        assert logout.status_code == 200
        assert len(logout.headers.get_list("set-cookie")) == 2
        assert client.get("/api/me").status_code == 401


def test_login_form_and_bad_password(monolith: Stub) -> None:
    ok = monolith.client.post("/login", data={"username": "carol", "password": "secret"})
    assert ok.status_code == 200
    assert ok.json()["username"] == "carol"
    bad = monolith.client.post("/login", data={"username": "carol", "password": "nope"})
    assert bad.status_code == 401
    assert "set-cookie" not in bad.headers


def test_three_set_cookie_headers(monolith: Stub, orders: Stub) -> None:
    response = monolith.client.get("/__stub/cookies")
    cookies = response.headers.get_list("set-cookie")
    assert [c.split(";")[0] for c in cookies] == ["a=1", "b=2", "c=3"]


# --- orders ---------------------------------------------------------------------------


def test_create_get_delete_order_on_both(monolith: Stub, orders: Stub) -> None:
    body = {"user_id": 4, "items": [{"item_id": 3, "qty": 2}, {"item_id": 10, "qty": 1}]}
    created = []
    for stub in (monolith, orders):
        response = stub.client.post("/api/orders", json=body)
        assert response.status_code == 201
        order = response.json()
        assert order["id"] >= FIRST_NEW_ORDER_ID
        assert response.headers["location"] == f"/api/orders/{order['id']}"
        assert order["status"] == "pending"
        assert order["items"] == [
            {"item_id": 3, "qty": 2, "price": ITEMS_BY_ID[3].price},
            {"item_id": 10, "qty": 1, "price": ITEMS_BY_ID[10].price},
        ]
        assert order["total"] == round(ITEMS_BY_ID[3].price * 2 + ITEMS_BY_ID[10].price, 2)
        datetime.fromisoformat(order["created_at"])
        assert strip_noise(stub.client.get(f"/api/orders/{order['id']}").json()) == strip_noise(
            order
        )
        mine = stub.client.get("/api/orders", params={"user_id": 4}).json()["orders"]
        assert order["id"] in [o["id"] for o in mine]
        assert all(o["user_id"] == 4 for o in mine)
        created.append(order)
    assert differing_paths(*created) <= {*NOISE, "created_at"}

    for stub, order in zip((monolith, orders), created, strict=True):
        deleted = stub.client.delete(f"/api/orders/{order['id']}")
        assert deleted.status_code == 200
        assert deleted.json()["deleted"] is True
        assert stub.client.get(f"/api/orders/{order['id']}").status_code == 404
        assert stub.client.delete(f"/api/orders/{order['id']}").status_code == 404


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"user_id": 1}, 400),
        ({"user_id": 1, "items": []}, 400),
        ({"user_id": 999, "items": [{"item_id": 1, "qty": 1}]}, 422),
        ({"user_id": 1, "items": [{"item_id": 999, "qty": 1}]}, 422),
        ({"user_id": 1, "items": [{"item_id": 1, "qty": 0}]}, 400),
    ],
)
def test_create_order_validation(orders: Stub, body: dict[str, Any], status: int) -> None:
    response = orders.client.post("/api/orders", json=body)
    assert response.status_code == status
    assert "error" in response.json()


# --- streaming --------------------------------------------------------------------------


def test_upload_5mb_hash(monolith: Stub) -> None:
    payload = random.Random(7).randbytes(5 * 1000 * 1000)
    expected = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    response = monolith.client.post("/api/upload", content=payload)
    assert response.status_code == 200
    assert strip_noise(response.json()) == expected

    # chunked transfer encoding (no Content-Length) works the same
    def chunks() -> Iterator[bytes]:
        for start in range(0, len(payload), 300_000):
            yield payload[start : start + 300_000]

    chunked = monolith.client.post("/api/upload", content=chunks())
    assert strip_noise(chunked.json()) == expected


@pytest.mark.parametrize("size", [0, 1, 3 * 1024 * 1024 + 123])
def test_download_size_and_hash(monolith: Stub, size: int) -> None:
    with monolith.client.stream("GET", "/api/download", params={"size": size}) as response:
        assert response.status_code == 200
        assert response.headers["content-length"] == str(size)
        received = 0
        digest = hashlib.sha256()
        for chunk in response.iter_bytes():
            received += len(chunk)
            digest.update(chunk)
    assert received == size
    assert digest.hexdigest() == sha256_of(download_pattern(size))


def test_download_default_and_limits(monolith: Stub) -> None:
    default = monolith.client.get("/api/download")
    assert len(default.content) == 1024 * 1024
    assert default.content[:4] == bytes([0, 1, 2, 3]) and default.content[256] == 0
    assert monolith.client.get("/api/download", params={"size": 4 * 1024**3 + 1}).status_code == 400
    assert monolith.client.get("/api/download", params={"size": -1}).status_code == 400


# --- echo and status ------------------------------------------------------------------


def test_echo_preserves_repeated_headers_and_body(monolith: Stub, orders: Stub) -> None:
    headers = [("X-Dup", "one"), ("X-Other", "x"), ("X-Dup", "two")]
    for stub, name in ((monolith, "monolith"), (orders, "orders")):
        response = stub.client.post(
            "/__stub/echo/a%2Fb", params={"q": "1 2"}, headers=headers, content=b"hello"
        )
        echo = response.json()
        assert echo["service"] == name
        assert echo["method"] == "POST"
        assert echo["path"] == "/__stub/echo/a%2Fb"
        assert echo["query_string"] == "q=1+2"
        sent = [pair for pair in echo["headers"] if pair[0].lower().startswith("x-")]
        assert sent == [["X-Dup", "one"], ["X-Other", "x"], ["X-Dup", "two"]]
        assert echo["body_bytes"] == 5
        assert echo["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
        assert echo["body_text"] == "hello"


def test_echo_reports_raw_target_untouched(monolith: Stub) -> None:
    head, body = raw_request(
        monolith.port,
        b"GET /__stub/echo/a%2Fb/./c//d;p=1?x=%41&x=2 HTTP/1.1\r\n"
        b"Host: example.test\r\nx-lower: 1\r\nX-LOWER: 2\r\nConnection: close\r\n\r\n",
    )
    assert head.startswith(b"HTTP/1.1 200")
    echo = json.loads(body)
    assert echo["path"] == "/__stub/echo/a%2Fb/./c//d;p=1"
    assert echo["query_string"] == "x=%41&x=2"
    assert echo["target"] == "/__stub/echo/a%2Fb/./c//d;p=1?x=%41&x=2"
    assert echo["headers"][:3] == [["Host", "example.test"], ["x-lower", "1"], ["X-LOWER", "2"]]
    assert echo["http_version"] == "1.1"


def test_status_endpoint(monolith: Stub, orders: Stub) -> None:
    for stub in (monolith, orders):
        teapot = stub.client.get("/__stub/status/418")
        assert teapot.status_code == 418
        assert teapot.json()["status"] == 418
        empty = stub.client.get("/__stub/status/204")
        assert empty.status_code == 204 and empty.content == b""
        moved = stub.client.get("/__stub/status/302", params={"location": "/elsewhere"})
        assert moved.status_code == 302 and moved.headers["location"] == "/elsewhere"
        assert stub.client.get("/__stub/status/abc").status_code == 400


def test_slow_endpoints(monolith: Stub) -> None:
    start = time.monotonic()
    assert monolith.client.get("/api/slow", params={"ms": 200}).json()["slept_ms"] == 200
    assert time.monotonic() - start >= 0.2
    start = time.monotonic()
    report = monolith.client.get("/api/reports/sales").json()
    assert time.monotonic() - start >= 0.3
    assert report["orders"] >= SEED_ORDER_COUNT and set(report["by_category"])
    assert monolith.client.get("/api/slow", params={"ms": 60_001}).status_code == 400


# --- fault knobs and stats ------------------------------------------------------------


def test_latency_fault(monolith: Stub) -> None:
    put = monolith.client.put("/__stub/faults", json={"prefix": "/api/items", "latency_ms": 300})
    assert put.status_code == 200
    start = time.monotonic()
    assert monolith.client.get("/api/items/1").status_code == 200
    assert time.monotonic() - start >= 0.3
    start = time.monotonic()
    assert monolith.client.get("/api/users/1").status_code == 200
    assert time.monotonic() - start < 0.25


def test_error_fault_and_longest_prefix(monolith: Stub, orders: Stub) -> None:
    for stub in (monolith, orders):
        client = stub.client
        client.put("/__stub/faults", json={"prefix": "/", "error_rate": 1, "error_status": 500})
        client.put("/__stub/faults", json={"prefix": "/api/orders", "error_rate": 0})
        client.put(
            "/__stub/faults",
            json={"prefix": "/api/orders/2", "error_rate": 1.0, "error_status": 503},
        )
        assert client.get("/api/orders/1").status_code == 200
        injected = client.get("/api/orders/2")
        assert injected.status_code == 503
        assert injected.json() == {"error": "injected", "status": 503}
        assert client.get("/healthz").status_code == 500
        assert client.get("/api/ordersx").status_code == 500  # prefixes match whole segments
        # the control API itself is never faulted
        listed = client.get("/__stub/faults")
        assert listed.status_code == 200
        assert [f["prefix"] for f in listed.json()["faults"]] == [
            "/",
            "/api/orders",
            "/api/orders/2",
        ]
        after = client.delete("/__stub/faults", params={"prefix": "/"}).json()["faults"]
        assert [f["prefix"] for f in after] == ["/api/orders", "/api/orders/2"]
        assert client.get("/healthz").status_code == 200
        assert client.delete("/__stub/faults", params={"prefix": "/nope"}).status_code == 404
        assert client.delete("/__stub/faults").json() == {"faults": []}
        assert client.get("/api/orders/2").status_code == 200


@pytest.mark.parametrize("mode", ["reset", "close"])
def test_drop_fault_gives_connection_error(monolith: Stub, mode: str) -> None:
    monolith.client.put(
        "/__stub/faults", json={"prefix": "/api/orders", "drop_rate": 1, "drop_mode": mode}
    )
    with httpx.Client(base_url=monolith.url, timeout=5) as client:
        for _ in range(3):
            with pytest.raises(httpx.TransportError):
                client.get("/api/orders/1")
        with pytest.raises(httpx.TransportError):
            client.post("/api/orders", json={"user_id": 1, "items": [{"item_id": 1}]})
        assert client.get("/api/items/1").status_code == 200
    stats = monolith.client.get("/__stub/stats").json()
    assert stats["injected"]["drop"] == 4
    assert stats["by_path"]["/api/orders/1"] == 3


@pytest.mark.parametrize(
    "body",
    [
        {"latency_ms": 5},
        {"prefix": "api"},
        {"prefix": "/x", "error_rate": 1.5},
        {"prefix": "/x", "error_status": 200},
        {"prefix": "/x", "drop_mode": "explode"},
        {"prefix": "/x", "colour": "red"},
        {"prefix": "/__stub/stats", "error_rate": 1},
    ],
)
def test_fault_validation(monolith: Stub, body: dict[str, Any]) -> None:
    response = monolith.client.put("/__stub/faults", json=body)
    assert response.status_code == 400
    assert monolith.client.get("/__stub/faults").json() == {"faults": []}


def test_stats_count_hits_and_reset(monolith: Stub, orders: Stub) -> None:
    for stub in (monolith, orders):
        stub.client.post("/__stub/stats/reset")
    for _ in range(3):
        orders.client.get("/api/orders/1")
    orders.client.post("/api/orders", json={"user_id": 1})  # 400, still a hit
    orders.client.put("/__stub/faults", json={"prefix": "/api/orders/5", "error_rate": 1})
    assert orders.client.get("/api/orders/5").status_code == 503  # counted before the fault
    orders.client.get("/__stub/differences")  # control: not counted

    stats = orders.client.get("/__stub/stats").json()
    assert stats["requests_total"] == 5
    assert stats["by_path"] == {"/api/orders/1": 3, "/api/orders": 1, "/api/orders/5": 1}
    assert stats["by_method"] == {"GET": 4, "POST": 1}
    assert stats["injected"]["error"] == 1
    assert monolith.client.get("/__stub/stats").json()["requests_total"] == 0

    reset = orders.client.post("/__stub/stats/reset").json()
    assert reset["requests_total"] == 0 and reset["by_path"] == {}
    assert orders.client.get("/__stub/stats").json()["requests_total"] == 0


# --- deliberate differences -----------------------------------------------------------


def test_differences_knob_changes_exactly_the_named_fields(monolith: Stub, orders: Stub) -> None:
    assert orders.client.get("/__stub/differences").json()["fields"] == []
    fields = ["total", "status", "currency", "items.price"]
    put = orders.client.put("/__stub/differences", json={"fields": fields})
    assert put.status_code == 200
    assert orders.client.get("/__stub/differences").json()["fields"] == fields

    legacy = monolith.client.get("/api/orders/3").json()
    new = orders.client.get("/api/orders/3").json()
    lines = range(len(legacy["items"]))
    expected = {"total", "status", "currency", *(f"items.{i}.price" for i in lines)}
    assert differing_paths(strip_noise(legacy), strip_noise(new)) == expected
    assert new["total"] == round(legacy["total"] + 0.01, 2)
    assert new["status"] == legacy["status"].upper()
    assert new["currency"] == "eur"
    assert [i["price"] for i in new["items"]] == [round(i["price"] + 1, 2) for i in legacy["items"]]
    # lists differ the same way; the stored data is untouched
    listed = orders.client.get("/api/orders", params={"limit": 1}).json()["orders"][0]
    assert listed["currency"] == "eur"
    orders.client.put("/__stub/differences", json={"fields": []})
    back = orders.client.get("/api/orders/3").json()
    assert strip_noise(back) == strip_noise(legacy)


def test_differences_knob_rejects_unknown_fields(orders: Stub) -> None:
    response = orders.client.put("/__stub/differences", json={"fields": ["total", "colour"]})
    assert response.status_code == 400
    assert "colour" in response.json()["detail"]
    assert orders.client.put("/__stub/differences", json={"x": 1}).status_code == 400
    assert orders.client.get("/__stub/differences").json()["fields"] == []


# --- command line and shutdown --------------------------------------------------------


def test_cli_flags_and_sigterm_exits_zero(monolith: Stub) -> None:
    port = free_port()
    proc = start_stub(
        "orders",
        port,
        "--differences",
        "shipping.method,items.qty",
        "--fault",
        "/api/orders/2:error_rate=1,error_status=502",
    )
    try:
        with httpx.Client(base_url=stub_url(port), timeout=10) as client:
            assert client.get("/__stub/differences").json()["fields"] == [
                "shipping.method",
                "items.qty",
            ]
            a = monolith.client.get("/api/orders/1").json()
            b = client.get("/api/orders/1").json()
            qty_paths = {f"items.{i}.qty" for i in range(len(a["items"]))}
            assert differing_paths(strip_noise(a), strip_noise(b)) == {
                "shipping.method",
                *qty_paths,
            }
            assert client.get("/api/orders/2").status_code == 502

        start = time.monotonic()
        assert stop_stub(proc, timeout=10) == 0
        assert time.monotonic() - start < 5
    finally:
        stop_stub(proc)


def test_sigterm_during_slow_request_exits_zero() -> None:
    port = free_port()
    proc = start_stub("monolith", port, "--shutdown-timeout", "0.5")
    outcome: list[object] = []

    def slow_call() -> None:
        try:
            with httpx.Client(timeout=10) as client:
                outcome.append(client.get(stub_url(port) + "/api/slow", params={"ms": 30_000}))
        except httpx.HTTPError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=slow_call)
    thread.start()
    try:
        time.sleep(0.3)
        start = time.monotonic()
        assert stop_stub(proc, timeout=10) == 0
        assert time.monotonic() - start < 5
        thread.join(10)
        assert outcome and not isinstance(outcome[0], httpx.Response)
    finally:
        stop_stub(proc)
        thread.join(10)


def test_bad_cli_arguments_exit_nonzero() -> None:
    base = [sys.executable, "-m", "legacy_stub", "orders", "--port", "0"]
    for extra in (["--differences", "bogus"], ["--fault", "/x:error_rate=9"]):
        result = subprocess.run([*base, *extra], capture_output=True, timeout=20)
        assert result.returncode == 2, result.stderr
