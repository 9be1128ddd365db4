"""Shared fixtures: stub backends and gateways as real processes on 127.0.0.1."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway import GatewayProcess

from legacy_stub.testing import free_port, start_stub, stop_stub, stub_url


@pytest.fixture(scope="session")
def monolith() -> Iterator[str]:
    """URL of a running legacy monolith stub (shared; reset faults after use)."""
    port = free_port()
    proc = start_stub("monolith", port)
    yield stub_url(port)
    stop_stub(proc)


@pytest.fixture(scope="session")
def orders() -> Iterator[str]:
    """URL of a running extracted orders-service stub (shared)."""
    port = free_port()
    proc = start_stub("orders", port)
    yield stub_url(port)
    stop_stub(proc)


@pytest.fixture
def clean_stubs(monolith: str, orders: str) -> Iterator[None]:
    """Clears fault knobs and hit counters before and after a test."""

    def reset() -> None:
        for url in (monolith, orders):
            httpx.delete(url + "/__stub/faults", timeout=5)
            httpx.post(url + "/__stub/stats/reset", timeout=5)

    reset()
    yield
    reset()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Factory: ``gateway(routes_dict, workers=1, env=None)`` → a started gateway."""
    started: list[GatewayProcess] = []
    counter = 0

    def make(routes: dict[str, Any], *, start: bool = True, **kw: Any) -> GatewayProcess:
        nonlocal counter
        counter += 1
        directory = tmp_path / f"gw{counter}"
        directory.mkdir()
        gw = GatewayProcess(directory, routes, **kw)
        started.append(gw)
        return gw.start() if start else gw

    yield make
    for gw in started:
        try:
            gw.stop(timeout=10)
        except subprocess.SubprocessError:
            pass


@pytest.fixture
def refused_url() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    return stub_url(free_port())


class RedisServer:
    """A real redis-server on 127.0.0.1 that a test may stop and start again."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run scripts/setup --dev")
        self.proc = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server per test (stop()/start() to simulate an outage)."""
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()
