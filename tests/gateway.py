"""Running a real gateway process from tests.

`GatewayProcess` writes a route file, starts ``strangler serve`` on free
ports on 127.0.0.1 and waits for ``/__strangler/healthz``. Route files are
given as plain dicts; ``server.port`` and ``server.admin_port`` are filled in.
`write_routes` replaces the file atomically (write, then rename), the way
editors and config-management tools do, so a poll never sees half a file.
The gateway's stderr is copied to ``log_path`` (and still shown with the
test's output), so tests can check what it logged.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from legacy_stub.testing import free_port, stop_stub, wait_http

ADMIN_TOKEN = "test-admin-token"


def route_file(
    backends: dict[str, str],
    routes: list[dict[str, Any]],
    **server: Any,
) -> dict[str, Any]:
    """A route-file dict: ``backends`` maps name → URL."""
    return {
        "server": {"debug_headers": True, **server},
        "backends": {name: {"url": url} for name, url in backends.items()},
        "routes": routes,
    }


class GatewayProcess:
    def __init__(
        self,
        directory: Path,
        routes: dict[str, Any],
        *,
        workers: int = 1,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.path = directory / "routes.yaml"
        self.log_path = directory / "gateway.log"
        self.port = free_port()
        self.admin_port = free_port()
        self.workers = workers
        self.env = {**os.environ, "STRANGLER_ADMIN_TOKEN": ADMIN_TOKEN, **(env or {})}
        self.env.setdefault("STRANGLER_LOG_FORMAT", "text")
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self._tee: threading.Thread | None = None
        self.write_routes(routes)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def render(self, routes: dict[str, Any]) -> str:
        """The YAML text `write_routes` writes for ``routes``."""
        routes = copy.deepcopy(routes)
        server = routes.setdefault("server", {})
        server["port"] = self.port
        server["admin_port"] = self.admin_port
        server.setdefault("reload_interval", 0.2)
        return yaml.safe_dump(routes, sort_keys=False)

    def write_routes(self, routes: dict[str, Any] | str) -> None:
        text = self.render(routes) if isinstance(routes, dict) else routes
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)

    def command(self) -> list[str]:
        """The ``strangler serve`` command line this gateway runs."""
        return [
            sys.executable, "-m", "strangler.cli", "serve",
            "--routes", str(self.path),
            "--workers", str(self.workers),
            *self.args,
        ]

    def start(self, timeout: float = 15) -> GatewayProcess:
        self.proc = subprocess.Popen(self.command(), env=self.env, stderr=subprocess.PIPE)
        self._tee = threading.Thread(
            target=_copy_stream, args=(self.proc, self.log_path), daemon=True
        )
        self._tee.start()
        try:
            wait_http(self.url + "/__strangler/healthz", timeout, proc=self.proc)
            wait_http(self.admin_url + "/healthz", timeout, proc=self.proc)
        except BaseException:
            self.stop(timeout=2)
            raise
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        proc = self.proc
        if proc is None:
            return 0
        code = stop_stub(proc, timeout)  # SIGTERM, wait, SIGKILL if it hangs
        if self._tee is not None:
            self._tee.join(5)
        return code

    def log(self) -> str:
        """What the gateway has written to stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 10) -> str:
        """Wait until ``text`` appears in the log; return the whole log."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if text in log:
                return log
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{text!r} not logged; log so far:\n{log}")
            time.sleep(0.05)

    def metrics(self) -> str:
        return httpx.get(self.admin_url + "/metrics", timeout=5).text

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            series, _, value = line.rpartition(" ")
            metric_name, _, label_text = series.partition("{")
            if metric_name != name:
                continue
            if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                total += float(value)
        return total

    def wait_generation(self, generation: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = httpx.get(self.admin_url + "/api/routes", timeout=5).json()
            if data["generation"] >= generation:
                return
            time.sleep(0.05)
        raise TimeoutError(f"generation {generation} not reached")


def _copy_stream(proc: subprocess.Popen[bytes], path: Path) -> None:
    """Copy the process's stderr to ``path`` and to our own stderr, line by line."""
    assert proc.stderr is not None
    with path.open("ab") as out:
        for line in proc.stderr:
            out.write(line)
            out.flush()
            try:
                os.write(2, line)
            except OSError:
                pass
