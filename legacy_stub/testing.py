"""Starting and stopping stub processes from tests.

Tests run the stubs as real subprocesses, the way the gateway meets its
backends in production: separate processes, real sockets, real signals.
The functions here keep that boilerplate out of every test module::

    port = free_port()
    proc = start_stub("monolith", port)          # waits for /healthz
    try:
        ...  # talk to stub_url(port)
    finally:
        assert stop_stub(proc) == 0
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

__all__ = ["KINDS", "free_port", "start_stub", "stop_stub", "stub_url", "wait_http"]

KINDS = ("monolith", "orders")
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS may hand it out again later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def stub_url(port: int, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{port}"


def wait_http(
    url: str, timeout: float = 10, *, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll ``url`` until it answers 2xx; raise TimeoutError, or RuntimeError if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    with httpx.Client(timeout=1.0) as client:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
            try:
                response = client.get(url)
            except httpx.TransportError as exc:
                last_error = repr(exc)
            else:
                if response.is_success:
                    return
                last_error = f"status {response.status_code}"
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{url} not ready after {timeout}s: {last_error}")
            time.sleep(0.05)


def start_stub(
    kind: str,
    port: int,
    *args: str,
    host: str = "127.0.0.1",
    wait: bool = True,
    timeout: float = 10,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``python -m legacy_stub KIND --port PORT *args``, by default waiting for /healthz.

    The process inherits stdout and stderr (pytest captures them). If it does
    not become healthy in ``timeout`` seconds it is killed and the error raised.
    ``env`` adds to (or overrides) the inherited environment.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (_PACKAGE_ROOT, full_env.get("PYTHONPATH")) if p
    )
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    command = [sys.executable, "-m", "legacy_stub", kind, "--host", host, "--port", str(port)]
    proc = subprocess.Popen([*command, *args], env=full_env)
    if wait:
        try:
            wait_http(stub_url(port, host) + "/healthz", timeout, proc=proc)
        except BaseException:
            stop_stub(proc, timeout=2)
            raise
    return proc


def stop_stub(proc: subprocess.Popen[bytes], timeout: float = 5) -> int:
    """Send SIGTERM, wait up to ``timeout`` seconds (then SIGKILL); return the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)
