"""The admin port and the CLI that talks to it, against a running gateway.

The admin port (127.0.0.1 by default) answers ``/healthz``, ``/readyz``,
``/metrics`` (Prometheus text format), ``GET /api/routes`` and ``POST
/api/reload`` (bearer token). ``strangler status`` and ``strangler reload``
call it from the command line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from gateway import ADMIN_TOKEN, GatewayProcess, route_file
from prometheus_client.parser import text_string_to_metric_families

from legacy_stub.testing import free_port

pytestmark = pytest.mark.timeout(60)

Gateway = Callable[..., GatewayProcess]
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
HOUR = 3600  # a poll interval no test waits for: only the explicit reload counts


def shop(
    monolith: str, orders: str, refused_url: str, orders_weight: int = 25, **server: Any
) -> dict[str, Any]:
    """Three routes: a split, one to the monolith, one to a backend that is down."""
    return route_file(
        {"monolith": monolith, "orders": orders, "gone": refused_url},
        [
            {
                "name": "orders",
                "match": {"path_prefix": "/api/orders", "methods": ["GET"]},
                "backends": [
                    {"name": "monolith", "weight": 100 - orders_weight},
                    {"name": "orders", "weight": orders_weight},
                ],
            },
            {
                "name": "broken",
                "match": {"path_prefix": "/broken"},
                "backends": [{"name": "gone", "weight": 1}],
            },
            {
                "name": "monolith",
                "match": {"path_prefix": "/"},
                "backends": [{"name": "monolith", "weight": 1}],
            },
        ],
        **server,
    )


def cli(*args: str, token: str | None = ADMIN_TOKEN) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "STRANGLER_ADMIN_TOKEN"}
    if token is not None:
        env["STRANGLER_ADMIN_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "strangler.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def check_messages(path: str) -> list[str]:
    done = cli("check", path)
    assert done.returncode == 1, done
    return done.stderr.strip().splitlines()


def samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition (which must parse)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(all_samples: Samples, name: str, **labels: str) -> float | None:
    return all_samples.get((name, frozenset(labels.items())))


# ------------------------------------------------------------------ health


def test_admin_port_listens_on_loopback_only_by_default(
    gateway: Gateway, monolith: str, orders: str, refused_url: str
) -> None:
    try:  # 127.0.0.2 is loopback too on Linux; elsewhere it may not be configured
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
    except OSError:
        pytest.skip("127.0.0.2 is not usable here")
    gw = gateway(shop(monolith, orders, refused_url))

    def accepts(host: str, port: int) -> bool:
        try:
            socket.create_connection((host, port), timeout=2).close()
        except ConnectionRefusedError:
            return False
        return True

    assert accepts("127.0.0.1", gw.admin_port)
    assert not accepts("127.0.0.2", gw.admin_port)  # bound to 127.0.0.1, not 0.0.0.0
    assert accepts("127.0.0.2", gw.port)  # the proxy port binds every address


def test_health_and_readiness_endpoints(
    gateway: Gateway, monolith: str, orders: str, refused_url: str
) -> None:
    gw = gateway(shop(monolith, orders, refused_url))

    health = httpx.get(gw.admin_url + "/healthz", timeout=5)
    ready = httpx.get(gw.admin_url + "/readyz", timeout=5)
    lb_health = httpx.get(gw.url + "/__strangler/healthz", timeout=5)

    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "file": str(gw.path),
        "generation": 1,
        "last_reload_error": None,
    }
    assert lb_health.status_code == 200 and lb_health.json() == {"status": "ok"}
    assert "x-strangler-route" not in lb_health.headers  # answered by the gateway itself


# ------------------------------------------------------------------ metrics


def test_metrics_cover_requests_latency_upstream_errors_reloads_and_weights(
    gateway: Gateway, monolith: str, orders: str, refused_url: str
) -> None:
    gw = gateway(shop(monolith, orders, refused_url))
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        assert all(client.get("/api/items").status_code == 200 for _ in range(5))
        assert all(client.get("/__stub/status/404").status_code == 404 for _ in range(2))
        assert all(client.get("/broken/x").status_code == 502 for _ in range(3))
        split = [client.get("/api/orders/1").headers["x-strangler-backend"] for _ in range(40)]
    gw.write_routes(shop(monolith, orders, refused_url, orders_weight=60))
    gw.wait_generation(2)
    gw.write_routes("backends: {}\nroutes: []\n")
    deadline = time.monotonic() + 10
    while gw.metric("strangler_config_reloads_total", result="failed") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    resp = httpx.get(gw.admin_url + "/metrics", timeout=5)

    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = samples(resp.text)
    total = "strangler_requests_total"
    assert sample(m, total, route="monolith", backend="monolith", status_class="2xx") == 5
    assert sample(m, total, route="monolith", backend="monolith", status_class="4xx") == 2
    assert sample(m, total, route="broken", backend="gone", status_class="5xx") == 3
    for backend in ("monolith", "orders"):
        assert sample(m, total, route="orders", backend=backend, status_class="2xx") == split.count(
            backend
        )
    assert sample(m, "strangler_upstream_errors_total", backend="gone", kind="connect") == 3
    bucket = "strangler_request_duration_seconds_bucket"
    assert sample(m, bucket, route="monolith", backend="monolith", le="+Inf") == 7
    assert sample(m, bucket, route="broken", backend="gone", le="+Inf") == 3
    count = "strangler_request_duration_seconds_count"
    assert sample(m, count, route="monolith", backend="monolith") == 7
    les = {dict(k[1])["le"] for k in m if k[0] == bucket}
    assert len(les) > 5  # a real histogram, not a summary
    assert sample(m, "strangler_config_reloads_total", result="ok") == 1
    assert sample(m, "strangler_config_reloads_total", result="failed") == 1
    assert sample(m, "strangler_route_weight", route="orders", backend="monolith") == 40
    assert sample(m, "strangler_route_weight", route="orders", backend="orders") == 60
    assert sample(m, "strangler_route_weight", route="broken", backend="gone") == 1


def test_route_weight_gauge_follows_edits_and_forgets_removed_routes(
    gateway: Gateway, monolith: str, orders: str, refused_url: str
) -> None:
    gw = gateway(shop(monolith, orders, refused_url))
    assert gw.metric("strangler_route_weight", route="orders", backend="orders") == 25
    assert gw.metric("strangler_route_weight", route="broken", backend="gone") == 1

    edited = shop(monolith, orders, refused_url, orders_weight=90)
    del edited["routes"][1]  # "broken"
    gw.write_routes(edited)
    gw.wait_generation(2)

    assert gw.metric("strangler_route_weight", route="orders", backend="orders") == 90
    assert gw.metric("strangler_route_weight", route="orders", backend="monolith") == 10
    assert 'route="broken"' not in "\n".join(
        line for line in gw.metrics().splitlines() if line.startswith("strangler_route_weight")
    )


# ------------------------------------------------------------------ routes API


def test_api_routes_returns_the_effective_routes_and_weights(
    gateway: Gateway, monolith: str, orders: str, refused_url: str
) -> None:
    gw = gateway(shop(monolith, orders, refused_url))

    data = httpx.get(gw.admin_url + "/api/routes", timeout=5).json()

    assert data["file"] == str(gw.path)
    assert data["generation"] == 1
    assert data["last_error"] is None
    assert [r["name"] for r in data["routes"]] == ["orders", "broken", "monolith"]
    first = data["routes"][0]
    assert first["match"]["path_prefix"] == "/api/orders"
    assert [m.upper() for m in first["match"]["methods"]] == ["GET"]
    assert first["backends"] == [
        {"name": "monolith", "weight": 75, "percent": 75.0},
        {"name": "orders", "weight": 25, "percent": 25.0},
    ]
    assert data["backends"]["orders"]["url"] == orders
    assert data["backends"]["gone"]["url"] == refused_url


# ------------------------------------------------------------------ reload API


def test_reload_endpoint_needs_the_bearer_token_and_reloads(
    gateway: Gateway, monolith: str, orders: str, refused_url: str
) -> None:
    gw = gateway(shop(monolith, orders, refused_url, orders_weight=0, reload_interval=HOUR))
    url = gw.admin_url + "/api/reload"

    missing = httpx.post(url, timeout=5)
    wrong = httpx.post(url, headers={"Authorization": "Bearer not-the-token"}, timeout=5)
    basic = httpx.post(url, headers={"Authorization": f"Basic {ADMIN_TOKEN}"}, timeout=5)
    unchanged = httpx.post(url, headers=AUTH, timeout=5)

    for denied in (missing, wrong, basic):
        assert denied.status_code == 401
        assert denied.headers["www-authenticate"].startswith("Bearer")
    assert unchanged.status_code == 200
    assert unchanged.json() == {
        "ok": True,
        "changed": False,
        "generation": 1,
        "errors": [],
        "warnings": [],
    }

    gw.write_routes(shop(monolith, orders, refused_url, orders_weight=100, reload_interval=HOUR))
    reloaded = httpx.post(url, headers=AUTH, timeout=5)
    assert reloaded.status_code == 200
    assert reloaded.json()["changed"] is True
    assert reloaded.json()["generation"] == 2
    assert httpx.get(gw.url + "/api/orders/1", timeout=5).headers["x-strangler-backend"] == "orders"
    assert "reload (admin API): generation 2" in gw.log()

    bad = shop(monolith, orders, refused_url, reload_interval=HOUR)
    bad["routes"][0]["backends"][0]["name"] = "nowhere"
    gw.write_routes(bad)
    rejected = httpx.post(url, headers=AUTH, timeout=5)
    assert rejected.status_code == 422
    assert rejected.json()["ok"] is False
    assert rejected.json()["generation"] == 2
    assert rejected.json()["errors"] == check_messages(str(gw.path))
    assert httpx.get(gw.url + "/api/orders/1", timeout=5).headers["x-strangler-backend"] == "orders"


def test_reload_endpoint_is_refused_when_no_admin_token_is_configured(
    gateway: Gateway, monolith: str, orders: str, refused_url: str
) -> None:
    gw = gateway(shop(monolith, orders, refused_url), env={"STRANGLER_ADMIN_TOKEN": ""})

    resp = httpx.post(gw.admin_url + "/api/reload", headers=AUTH, timeout=5)

    assert resp.status_code == 403
    assert "STRANGLER_ADMIN_TOKEN" in resp.json()["message"]


# ------------------------------------------------------------------ CLI


def test_cli_status_and_reload_against_a_running_gateway(
    gateway: Gateway, monolith: str, orders: str, refused_url: str
) -> None:
    gw = gateway(shop(monolith, orders, refused_url, reload_interval=HOUR))

    status = cli("status", "--admin", gw.admin_url)
    as_json = cli("status", "--admin", gw.admin_url, "--json")
    assert status.returncode == 0, status.stderr
    assert f"{gw.path} (generation 1)" in status.stdout
    lines = status.stdout.splitlines()
    orders_line = next(line for line in lines if "path_prefix=/api/orders" in line)
    assert "monolith 75%" in orders_line and "orders 25%" in orders_line
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout)["routes"][0]["backends"][1]["weight"] == 25

    edited = shop(monolith, orders, refused_url, orders_weight=50, reload_interval=HOUR)
    gw.write_routes(edited)
    no_token = cli("reload", "--admin", gw.admin_url, token=None)
    assert no_token.returncode == 1
    assert "valid bearer token" in no_token.stderr
    reloaded = cli("reload", "--admin", gw.admin_url)
    assert reloaded.returncode == 0, reloaded.stderr
    assert reloaded.stdout.strip() == "reloaded: generation 2"
    again = cli("reload", "--admin", gw.admin_url)
    assert again.stdout.strip() == "reloaded: generation 2 (unchanged)"
    assert "orders 50%" in cli("status", "--admin", gw.admin_url).stdout

    edited["routes"][0]["backends"][1]["weight"] = -1
    gw.write_routes(edited)
    failed = cli("reload", "--admin", gw.admin_url)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == check_messages(str(gw.path))
    after = cli("status", "--admin", gw.admin_url)
    assert "last reload FAILED, still serving the previous file:" in after.stdout
    assert "orders 50%" in after.stdout

    unreachable = cli("status", "--admin", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 1
    assert "cannot reach" in unreachable.stderr
