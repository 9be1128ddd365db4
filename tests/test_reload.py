"""Hot reload of the route file while the gateway serves traffic.

The gateway polls its route file (``server.reload_interval``, 0.2 s in these
tests) and also reloads on SIGHUP. A valid change becomes a new immutable
snapshot without dropping a request; requests already running finish on the
snapshot they started with. An invalid change, or a deleted file, keeps the
last good snapshot and is reported the way ``strangler check`` reports it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from gateway import ADMIN_TOKEN, GatewayProcess, route_file

pytestmark = pytest.mark.timeout(90)

Gateway = Callable[..., GatewayProcess]
ECHO = "/__stub/echo"


def one_backend(monolith: str, orders: str, backend: str, **server: Any) -> dict[str, Any]:
    """One route, "x", sending everything to ``backend``."""
    only = {"name": backend, "weight": 1}
    return route_file(
        {"monolith": monolith, "orders": orders},
        [{"name": "x", "match": {"path_prefix": "/"}, "backends": [only]}],
        **server,
    )


def split(monolith: str, orders: str, monolith_weight: int, orders_weight: int) -> dict[str, Any]:
    """Route "echo" splits the echo endpoint between the monolith and the orders service."""
    return route_file(
        {"monolith": monolith, "orders": orders},
        [
            {
                "name": "echo",
                "match": {"path_prefix": ECHO},
                "backends": [
                    {"name": "monolith", "weight": monolith_weight},
                    {"name": "orders", "weight": orders_weight},
                ],
            }
        ],
    )


def routes_of(gw: GatewayProcess) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(gw.admin_url + "/api/routes", timeout=5).json()
    return data


def weights_of(data: dict[str, Any], route: str) -> dict[str, int]:
    (found,) = (r for r in data["routes"] if r["name"] == route)
    return {b["name"]: b["weight"] for b in found["backends"]}


def wait_metric(
    gw: GatewayProcess, name: str, value: float, timeout: float = 10, **labels: str
) -> None:
    deadline = time.monotonic() + timeout
    while gw.metric(name, **labels) < value:
        assert time.monotonic() < deadline, f"{name}{labels} never reached {value}"
        time.sleep(0.05)


def check_messages(path: str) -> list[str]:
    """What ``strangler check`` says about the file, one message per line."""
    done = subprocess.run(
        [sys.executable, "-m", "strangler.cli", "check", path],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1, done
    return done.stderr.strip().splitlines()


def backends_seen(gw: GatewayProcess, n: int, *, fresh: bool = False) -> Counter[str]:
    """Which backend answered each of ``n`` requests; ``fresh``: a new
    connection per request, so that every worker process gets some."""
    seen: Counter[str] = Counter()
    limits = httpx.Limits(max_keepalive_connections=0 if fresh else 1)
    with httpx.Client(base_url=gw.url, timeout=10, limits=limits) as client:
        for _ in range(n):
            resp = client.get(ECHO)
            assert resp.status_code == 200, resp.text
            seen[resp.headers["x-strangler-backend"]] += 1
    return seen


# ------------------------------------------------------------------ valid changes


def test_in_flight_request_finishes_on_its_snapshot_while_new_requests_use_the_new_one(
    gateway: Gateway, monolith: str, orders: str
) -> None:
    gw = gateway(one_backend(monolith, orders, "monolith"))
    slow: dict[str, Any] = {}

    def run_slow() -> None:
        slow["response"] = httpx.get(gw.url + "/api/slow?ms=1500", timeout=10)
        slow["finished"] = time.monotonic()

    thread = threading.Thread(target=run_slow)
    thread.start()
    time.sleep(0.2)
    # the monolith backend goes away entirely: its pool retires under the slow request
    new_file = one_backend(monolith, orders, "orders")
    del new_file["backends"]["monolith"]
    gw.write_routes(new_file)
    gw.wait_generation(2)
    changed = time.monotonic()
    new = httpx.get(gw.url + ECHO, timeout=5)
    thread.join(10)

    assert "finished" in slow and slow["finished"] > changed  # it was in flight across the swap
    assert slow["response"].status_code == 200
    assert slow["response"].headers["x-strangler-backend"] == "monolith"
    assert new.status_code == 200
    assert new.headers["x-strangler-backend"] == "orders"
    assert new.json()["service"] == "orders"


def _client() -> httpx.AsyncClient:
    """One simulated client: its own keep-alive connection, as a real client has.

    (One shared AsyncClient with a hundred pooled connections spends its time
    scanning the pool: a few hundred requests a second at most.)"""
    return httpx.AsyncClient(limits=httpx.Limits(max_connections=1), timeout=10)


async def _hammer(
    url: str, stop: asyncio.Event, clients: int
) -> tuple[Counter[int], list[BaseException], int]:
    """``clients`` concurrent clients send requests until ``stop`` is set."""
    statuses: Counter[int] = Counter()
    errors: list[BaseException] = []

    async def one_client() -> None:
        async with _client() as client:
            while not stop.is_set():
                try:
                    resp = await client.get(url)
                except Exception as exc:  # counted as a failed request
                    errors.append(exc)
                else:
                    statuses[resp.status_code] += 1

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return statuses, errors, sum(statuses.values()) + len(errors)


async def _measure_split(url: str, n: int, clients: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    todo = iter(range(n))

    async def one_client() -> None:
        async with _client() as client:
            for _ in todo:
                resp = await client.get(url)
                assert resp.status_code == 200
                seen[resp.headers["x-strangler-backend"]] += 1

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return seen


def test_fifty_weight_edits_under_100_concurrent_clients_fail_no_request_and_end_on_the_last_split(
    gateway: Gateway, monolith: str, orders: str
) -> None:
    gw = gateway(split(monolith, orders, 50, 50))
    edits = [(10 + (i * 7) % 80, 90 - (i * 7) % 80) for i in range(49)] + [(30, 70)]

    async def scenario() -> tuple[Counter[int], list[BaseException], int, Counter[str]]:
        stop = asyncio.Event()
        load = asyncio.create_task(_hammer(gw.url + ECHO, stop, 100))
        await asyncio.sleep(0.5)
        for monolith_weight, orders_weight in edits:
            gw.write_routes(split(monolith, orders, monolith_weight, orders_weight))
            await asyncio.sleep(0.15)
        async with httpx.AsyncClient(base_url=gw.admin_url, timeout=5) as admin:
            deadline = time.monotonic() + 10
            while weights_of((await admin.get("/api/routes")).json(), "echo") != {
                "monolith": 30,
                "orders": 70,
            }:
                assert time.monotonic() < deadline, "the last edit never took effect"
                await asyncio.sleep(0.05)
        stop.set()
        statuses, errors, total = await load
        seen = await _measure_split(gw.url + ECHO, 4000, 100)
        return statuses, errors, total, seen

    statuses, errors, total, seen = asyncio.run(scenario())

    assert errors == []
    assert set(statuses) == {200}
    assert total > 1000  # there was real load during the edits
    data = routes_of(gw)
    assert data["generation"] >= 20  # most edits became a snapshot (a poll may merge two)
    assert data["last_error"] is None
    assert gw.metric("strangler_config_reloads_total", result="failed") == 0
    assert gw.metric("strangler_config_reloads_total", result="ok") == data["generation"] - 1
    assert sum(seen.values()) == 4000
    assert abs(seen["orders"] / 4000 - 0.70) <= 0.03, seen
    assert gw.metric("strangler_route_weight", route="echo", backend="orders") == 70


def test_configmap_style_symlink_swap_is_picked_up(
    gateway: Gateway, monolith: str, orders: str
) -> None:
    gw = gateway(one_backend(monolith, orders, "monolith"))
    # Kubernetes mounts a ConfigMap as routes.yaml -> ..data/routes.yaml, ..data -> ..v1
    base = gw.path.parent
    for version, backend in (("..v1", "monolith"), ("..v2", "orders")):
        (base / version).mkdir()
        (base / version / "routes.yaml").write_text(
            gw.render(one_backend(monolith, orders, backend))
        )
    os.symlink("..v1", base / "..data")
    os.symlink("..data/routes.yaml", base / "routes.tmp")
    os.replace(base / "routes.tmp", gw.path)
    time.sleep(0.6)
    assert routes_of(gw)["generation"] == 1  # same content behind the link: no new snapshot

    os.symlink("..v2", base / "..data_tmp")
    os.replace(base / "..data_tmp", base / "..data")
    gw.wait_generation(2)

    assert httpx.get(gw.url + ECHO, timeout=5).headers["x-strangler-backend"] == "orders"


def test_sighup_reloads_the_route_file_and_keeps_serving(
    gateway: Gateway, monolith: str, orders: str
) -> None:
    # a poll interval of an hour: only the signal can cause this reload
    gw = gateway(one_backend(monolith, orders, "monolith", reload_interval=3600))
    gw.write_routes(one_backend(monolith, orders, "orders", reload_interval=3600))
    time.sleep(0.5)
    assert backends_seen(gw, 5) == {"monolith": 5}

    gw.signal(signal.SIGHUP)
    gw.wait_generation(2)

    assert gw.proc is not None and gw.proc.poll() is None
    assert backends_seen(gw, 5) == {"orders": 5}
    assert "reload (SIGHUP): generation 2" in gw.log()
    assert gw.stop() == 0


def test_sighup_and_the_admin_api_reload_every_worker(
    gateway: Gateway, monolith: str, orders: str
) -> None:
    hour = 3600  # only the signal and the API call can cause these reloads
    gw = gateway(one_backend(monolith, orders, "monolith", reload_interval=hour), workers=2)
    assert backends_seen(gw, 20, fresh=True) == {"monolith": 20}

    def all_go_to(backend: str) -> None:
        deadline = time.monotonic() + 10
        while (seen := backends_seen(gw, 30, fresh=True)) != {backend: 30}:
            assert time.monotonic() < deadline, seen
            time.sleep(0.1)

    gw.write_routes(one_backend(monolith, orders, "orders", reload_interval=hour))
    gw.signal(signal.SIGHUP)
    gw.wait_generation(2)
    all_go_to("orders")

    gw.write_routes(one_backend(monolith, orders, "monolith", reload_interval=hour))
    resp = httpx.post(
        gw.admin_url + "/api/reload",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=5,
    )
    assert resp.status_code == 200 and resp.json()["generation"] == 3
    all_go_to("monolith")

    assert gw.proc is not None and gw.proc.poll() is None
    assert gw.stop() == 0


# ------------------------------------------------------------------ invalid changes


def test_invalid_edit_keeps_the_last_good_config_and_reports_the_check_messages(
    gateway: Gateway, monolith: str, orders: str
) -> None:
    gw = gateway(split(monolith, orders, 100, 0))
    bad = split(monolith, orders, 0, 100)
    bad["routes"][0]["backends"].append({"name": "payments", "weight": -5})
    bad["routes"].append({"name": "echo", "match": {"path_prefix": "/x"}, "backends": []})
    gw.write_routes(bad)
    wait_metric(gw, "strangler_config_reloads_total", 1, result="failed")
    messages = check_messages(str(gw.path))
    time.sleep(1.0)  # five more poll intervals

    assert len(messages) >= 3
    assert backends_seen(gw, 30) == {"monolith": 30}
    data = routes_of(gw)
    assert data["generation"] == 1
    assert weights_of(data, "echo") == {"monolith": 100, "orders": 0}
    assert data["last_error"] == messages
    ready = httpx.get(gw.admin_url + "/readyz", timeout=5)
    assert ready.status_code == 200
    assert ready.json()["last_reload_error"] == messages
    log = gw.log()
    for line in messages:
        assert line in log.splitlines()
    assert log.count("rejected, keeping generation 1") == 1  # logged once, not every poll
    assert gw.metric("strangler_config_reloads_total", result="failed") == 1
    assert gw.metric("strangler_route_weight", route="echo", backend="monolith") == 100

    gw.write_routes(split(monolith, orders, 0, 100))
    gw.wait_generation(2)

    assert routes_of(gw)["last_error"] is None
    assert httpx.get(gw.admin_url + "/readyz", timeout=5).json()["last_reload_error"] is None
    assert backends_seen(gw, 10) == {"orders": 10}
    assert gw.metric("strangler_config_reloads_total", result="failed") == 1
    assert gw.metric("strangler_config_reloads_total", result="ok") == 1


def test_deleted_route_file_keeps_the_last_good_config_until_it_is_back(
    gateway: Gateway, monolith: str, orders: str
) -> None:
    routes = split(monolith, orders, 0, 100)
    gw = gateway(routes)
    gw.path.unlink()
    wait_metric(gw, "strangler_config_reloads_total", 1, result="failed")
    time.sleep(1.0)  # five more poll intervals

    assert backends_seen(gw, 10) == {"orders": 10}
    data = routes_of(gw)
    assert data["generation"] == 1
    assert len(data["last_error"]) == 1
    assert data["last_error"][0].startswith(f"{gw.path}: cannot read route file")
    assert gw.log().count("cannot read route file") == 1
    assert gw.metric("strangler_config_reloads_total", result="failed") == 1

    gw.write_routes(routes)  # the same file again
    deadline = time.monotonic() + 10
    while routes_of(gw)["last_error"] is not None:
        assert time.monotonic() < deadline, "the restored file was not noticed"
        time.sleep(0.05)

    assert routes_of(gw)["generation"] == 1  # nothing changed, so no new snapshot
    assert httpx.get(gw.admin_url + "/readyz", timeout=5).json()["last_reload_error"] is None
    assert backends_seen(gw, 5) == {"orders": 5}
