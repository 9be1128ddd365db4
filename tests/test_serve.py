"""`strangler serve` as a real process: settings, start-up errors, draining, workers.

Every test runs the gateway the way production does (``python -m
strangler.cli serve``) in front of the stub backends, and talks to it over
real sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway import GatewayProcess, route_file

from legacy_stub.testing import free_port
from strangler.metrics import FLUSH_INTERVAL

pytestmark = pytest.mark.timeout(60)

Gateway = Callable[..., GatewayProcess]
MONOLITH_ONLY = {"name": "monolith", "weight": 100}


def one_route(monolith: str, orders: str, **server: Any) -> dict[str, Any]:
    """Everything goes to the monolith; ``orders`` is declared but unused."""
    return route_file(
        {"monolith": monolith, "orders": orders},
        [{"name": "all", "match": {"path_prefix": "/"}, "backends": [MONOLITH_ONLY]}],
        **server,
    )


def split_routes(
    monolith: str, orders: str, monolith_weight: int, orders_weight: int, *, rest: bool = True
) -> dict[str, Any]:
    """Route "echo" splits ``/__stub/echo`` between the stubs; "rest" sends the
    rest to the monolith."""
    return route_file(
        {"monolith": monolith, "orders": orders},
        [
            {
                "name": "echo",
                "match": {"path_prefix": "/__stub/echo"},
                "backends": [
                    {"name": "monolith", "weight": monolith_weight},
                    {"name": "orders", "weight": orders_weight},
                ],
            },
            {"name": "rest", "match": {"path_prefix": "/"}, "backends": [MONOLITH_ONLY]},
        ][: 2 if rest else 1],
    )


def refused(url: str) -> bool:
    """True when a new connection to ``url`` is refused (nothing listens)."""
    try:
        httpx.get(url, timeout=2)
    except httpx.ConnectError:
        return True
    return False


class Background:
    """One request in a thread; ``result`` is the response or the exception."""

    def __init__(self, url: str, timeout: float = 15) -> None:
        self.result: httpx.Response | Exception | None = None
        self.finished_at = 0.0
        self._thread = threading.Thread(target=self._run, args=(url, timeout), daemon=True)
        self._thread.start()

    def _run(self, url: str, timeout: float) -> None:
        try:
            self.result = httpx.get(url, timeout=timeout)
        except Exception as exc:  # the test inspects it
            self.result = exc
        self.finished_at = time.monotonic()

    def wait(self, timeout: float = 15) -> httpx.Response | Exception | None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the background request never finished"
        return self.result


def wait_exit(gw: GatewayProcess, timeout: float) -> int:
    assert gw.proc is not None
    return gw.proc.wait(timeout)


# ------------------------------------------------------------------ settings


def test_port_and_admin_port_come_from_environment_over_the_route_file(
    gateway: Gateway, monolith: str, orders: str
) -> None:
    port, admin_port = free_port(), free_port()
    gw = gateway(
        one_route(monolith, orders),
        start=False,
        env={"STRANGLER_PORT": str(port), "STRANGLER_ADMIN_PORT": str(admin_port)},
    )
    file_port, file_admin_port = gw.port, gw.admin_port
    gw.port, gw.admin_port = port, admin_port  # where the gateway should listen
    gw.start()

    assert httpx.get(gw.url + "/__stub/echo", timeout=5).status_code == 200
    assert httpx.get(gw.admin_url + "/healthz", timeout=5).status_code == 200
    assert refused(f"http://127.0.0.1:{file_port}/__strangler/healthz")
    assert refused(f"http://127.0.0.1:{file_admin_port}/healthz")


def test_port_flags_win_over_environment(gateway: Gateway, monolith: str, orders: str) -> None:
    env_port, env_admin_port = free_port(), free_port()
    flag_port, flag_admin_port = free_port(), free_port()
    gw = gateway(
        one_route(monolith, orders),
        start=False,
        env={"STRANGLER_PORT": str(env_port), "STRANGLER_ADMIN_PORT": str(env_admin_port)},
        args=("--port", str(flag_port), "--admin-port", str(flag_admin_port)),
    )
    gw.port, gw.admin_port = flag_port, flag_admin_port
    gw.start()

    assert httpx.get(gw.url + "/__stub/echo", timeout=5).status_code == 200
    assert httpx.get(gw.admin_url + "/readyz", timeout=5).status_code == 200
    assert refused(f"http://127.0.0.1:{env_port}/__strangler/healthz")
    assert refused(f"http://127.0.0.1:{env_admin_port}/healthz")


@pytest.mark.parametrize("workers", [1, 2])
def test_invalid_route_file_at_start_exits_1_with_the_check_messages(
    gateway: Gateway, monolith: str, orders: str, workers: int
) -> None:
    routes = one_route(monolith, orders)
    routes["routes"][0]["backends"] = [{"name": "nowhere", "weight": -1}]
    gw = gateway(routes, start=False, workers=workers)

    check = subprocess.run(
        [gw.command()[0], "-m", "strangler.cli", "check", str(gw.path)],
        env=gw.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    served = subprocess.run(gw.command(), env=gw.env, capture_output=True, text=True, timeout=30)

    assert check.returncode == 1
    messages = check.stderr.strip().splitlines()
    assert messages and all(str(gw.path) in line for line in messages)
    assert served.returncode == 1
    served_lines = served.stderr.splitlines()
    for line in messages:
        assert line in served_lines
    assert refused(gw.url + "/__strangler/healthz")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_in_use_fails_the_start_with_exit_1_and_a_clear_message(
    gateway: Gateway, monolith: str, orders: str, workers: int
) -> None:
    gw = gateway(one_route(monolith, orders), start=False, workers=workers)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", gw.admin_port))
        taken.listen()
        served = subprocess.run(
            gw.command(), env=gw.env, capture_output=True, text=True, timeout=30
        )

    assert served.returncode == 1
    assert (
        f"strangler serve: cannot listen on 127.0.0.1:{gw.admin_port} (admin port)"
        in served.stderr
    )
    assert "Traceback" not in served.stderr
    assert refused(gw.url + "/__strangler/healthz")


# ------------------------------------------------------------------ draining


@pytest.mark.parametrize(
    ("workers", "whole_group"),
    [(1, False), (2, False), (2, True)],
    ids=["one-process", "two-workers", "two-workers-group-signalled"],
)
def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0(
    gateway: Gateway, monolith: str, orders: str, workers: int, whole_group: bool
) -> None:
    gw = gateway(one_route(monolith, orders), workers=workers)
    assert gw.proc is not None
    # like systemd or `kill -TERM -PGID`: the workers get SIGTERM directly as well
    also = _worker_pids(gw.proc.pid) if whole_group else set()
    slow = Background(gw.url + "/api/slow?ms=2000")
    time.sleep(0.3)
    gw.signal(signal.SIGTERM)
    for pid in also:
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)

    assert refused(gw.url + "/__strangler/healthz")
    result = slow.wait()
    assert isinstance(result, httpx.Response), result
    assert result.status_code == 200
    assert result.headers["x-strangler-backend"] == "monolith"
    assert wait_exit(gw, 10) == 0
    assert "Traceback" not in gw.log()


@pytest.mark.parametrize("drain", ["0.5", "1"])
def test_drain_timeout_cuts_a_request_that_outlives_it_and_still_exits_0(
    gateway: Gateway, monolith: str, orders: str, drain: str
) -> None:
    gw = gateway(one_route(monolith, orders), args=("--drain-timeout", drain))
    started = time.monotonic()
    slow = Background(gw.url + "/api/slow?ms=5000")
    time.sleep(0.3)
    gw.signal(signal.SIGTERM)
    signalled = time.monotonic()

    code = wait_exit(gw, 10)
    exited = time.monotonic()
    result = slow.wait()

    assert code == 0
    assert float(drain) <= exited - signalled <= float(drain) + 2.5
    # the request was cut, not answered after its full five seconds
    assert not (isinstance(result, httpx.Response) and result.status_code == 200)
    assert slow.finished_at - started < 4.5


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_signal_stops_draining_and_exits_at_once(
    gateway: Gateway, monolith: str, orders: str, workers: int
) -> None:
    gw = gateway(one_route(monolith, orders), workers=workers)  # drain time: the default 20 s
    slow = Background(gw.url + "/api/slow?ms=8000")
    time.sleep(0.3)
    gw.signal(signal.SIGTERM)
    time.sleep(0.5)
    assert gw.proc is not None and gw.proc.poll() is None  # draining
    gw.signal(signal.SIGINT)
    again = time.monotonic()

    code = wait_exit(gw, 10)

    assert code == 0
    assert time.monotonic() - again < 2
    result = slow.wait()
    assert not (isinstance(result, httpx.Response) and result.status_code == 200)


# ------------------------------------------------------------------ workers


def _worker_pids(supervisor: int) -> set[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    pids: set[int] = set()
    for children in Path(f"/proc/{supervisor}/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"spawn_main" in cmdline:
                pids.add(int(pid))
    return pids


def _running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _requests_per_process(metrics_dir: Path) -> dict[int, float]:
    """strangler_requests_total as each process recorded it in its multiprocess file."""
    from prometheus_client.mmap_dict import MmapedDict

    per_pid: dict[int, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.split("_")[-1])
        total = 0.0
        for key, value, _ts, _pos in MmapedDict.read_all_values_from_file(str(path)):  # type: ignore[no-untyped-call]
            if '"strangler_requests_total"' in key:
                total += value
        per_pid[pid] = total
    return per_pid


async def _send(url: str, n: int, concurrency: int) -> Counter[int]:
    statuses: Counter[int] = Counter()
    # no keep-alive: every request is a new connection, so both workers accept some
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        queue = iter(range(n))

        async def worker() -> None:
            for _ in queue:
                resp = await client.get(url)
                statuses[resp.status_code] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def _settled_metric(gw: Gateway, name: str, **labels: str) -> float:
    """The metric once the workers have handed over their counts (they do every
    FLUSH_INTERVAL, so a scrape lags by that much): its value when it stopped moving."""
    last = gw.metric(name, **labels)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(FLUSH_INTERVAL * 2)
        now = gw.metric(name, **labels)
        if now == last:
            return now
        last = now
    return last


def test_two_workers_count_every_request_exactly_once_in_the_shared_metrics(
    gateway: Gateway, monolith: str, orders: str, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"left over from an earlier run")
    gw = gateway(
        split_routes(monolith, orders, 40, 60),
        workers=2,
        env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
    )
    assert gw.proc is not None
    workers = _worker_pids(gw.proc.pid)
    assert len(workers) == 2

    statuses = asyncio.run(_send(gw.url + "/__stub/echo", 400, 20))

    assert statuses == {200: 400}
    assert _settled_metric(gw, "strangler_requests_total") == 400
    assert gw.metric("strangler_requests_total", route="echo", status_class="2xx") == 400
    assert gw.metric("strangler_request_duration_seconds_count", route="echo") == 400
    per_pid = _requests_per_process(metrics_dir)
    assert 999999 not in per_pid  # the directory was wiped at start
    assert {pid for pid, n in per_pid.items() if n > 0} == workers  # both workers served
    assert gw.metric("strangler_route_weight", route="echo", backend="monolith") == 40
    assert gw.metric("strangler_route_weight", route="echo", backend="orders") == 60
    assert gw.metric("strangler_route_weight", route="rest", backend="monolith") == 100

    # One edit: new weights, route "rest" removed. Every process reloads; the
    # gauge follows, the removed route's series goes, the reload counts once.
    gw.write_routes(split_routes(monolith, orders, 10, 90, rest=False))
    deadline = time.monotonic() + 10
    while gw.metric("strangler_route_weight", route="echo", backend="orders") != 90:
        assert time.monotonic() < deadline, gw.metrics()
        time.sleep(0.1)
    time.sleep(0.6)  # several poll intervals: every worker has reloaded too
    text = gw.metrics()
    assert gw.metric("strangler_route_weight", route="echo", backend="monolith") == 10
    assert 'route="rest"' not in "".join(
        line for line in text.splitlines() if line.startswith("strangler_route_weight")
    )
    assert gw.metric("strangler_config_reloads_total", result="ok") == 1
    assert httpx.get(gw.url + "/", timeout=5).status_code == 404  # in the workers too

    assert gw.stop(timeout=15) == 0
    assert not any(_running(pid) for pid in workers)


def test_a_dead_worker_is_replaced_on_the_last_good_config_and_its_counts_are_kept(
    gateway: Gateway, monolith: str, orders: str, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "prom"
    gw = gateway(
        split_routes(monolith, orders, 0, 100),
        workers=2,
        env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
    )
    assert gw.proc is not None
    workers = _worker_pids(gw.proc.pid)
    assert asyncio.run(_send(gw.url + "/__stub/echo", 200, 20)) == {200: 200}
    victim = min(workers)
    assert list(metrics_dir.glob(f"gauge_live*_{victim}.db"))  # in-flight gauge of the worker

    gw.write_routes("routes: [not, a, route, file")
    deadline = time.monotonic() + 10
    while gw.metric("strangler_config_reloads_total", result="failed") < 1:
        assert time.monotonic() < deadline, gw.metrics()
        time.sleep(0.1)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not (len(_worker_pids(gw.proc.pid)) == 2 and victim not in _worker_pids(gw.proc.pid)):
        assert time.monotonic() < deadline, "no replacement worker"
        time.sleep(0.1)
    replacement = _worker_pids(gw.proc.pid) - workers
    time.sleep(1.5)  # the replacement is up and has polled the invalid file

    assert len(replacement) == 1
    assert _running(replacement.pop())
    assert not list(metrics_dir.glob(f"gauge_live*_{victim}.db"))  # marked dead
    assert gw.log().count(f"(pid {victim}) exited with -9; restarting") == 1
    assert httpx.get(gw.admin_url + "/readyz", timeout=5).json()["workers"] == 2
    statuses = asyncio.run(_send(gw.url + "/__stub/echo", 300, 20))
    assert statuses == {200: 300}
    assert _settled_metric(gw, "strangler_requests_total", route="echo", backend="orders") == 500
    assert gw.metric("strangler_config_reloads_total", result="failed") == 1
    assert gw.stop(timeout=15) == 0
