"""Side-by-side throughput/latency benchmark: the gateway versus a tuned nginx reverse proxy.

The gateway's performance target is stated relative to nginx doing the same job on the same
machine, so absolute numbers from a laptop or a CI runner are meaningless on their own. This
command therefore measures both proxies in one run, under identical conditions:

* one fast fixed-response backend (nginx returning a ~56-byte JSON body), so the backend is never
  the bottleneck and what is measured is the proxy hop itself;
* nginx as a keep-alive tuned reverse proxy in front of that backend (1 worker);
* the gateway (``strangler serve --workers 1``) in front of the same backend;
* the same ``wrk`` load against each, after a short warm-up.

The two proxies run one after the other, never together, so they do not compete for CPU; the
backend runs throughout. The last line of output is a single ratio line that is easy to grep
from CI logs::

    ratio gateway/nginx: throughput 0.27, p50 added +0.84 ms (nginx 0.61 ms, gateway 1.45 ms), ...

Usage::

    .venv/bin/python loadtests/bench.py [--duration 10] [--connections 32] [--scenario plain]
                                        [--json out.json] [--profile]

This is a measurement, not a gate: it exits non-zero only when it cannot run (missing tools,
a target that fails to start, wrk failing), never because the gateway is slower than hoped.

Scenarios live in ``SCENARIOS``; each is one small function that returns the gateway route file
(and optionally the request path), so adding e.g. a cache or shadowing scenario is a few lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

LOADTESTS_DIR = Path(__file__).resolve().parent
HOST = "127.0.0.1"  # the benchmark only ever targets loopback

#: Fixed response body of the fast backend. Small on purpose: the benchmark measures per-request
#: proxy overhead, not bandwidth.
BACKEND_BODY = '{"status":"ok","service":"bench-backend","data":[1,2,3]}'

#: Warm-up before each measured run, so connection pools, JIT-free but cache-warm code paths and
#: kernel socket buffers are in steady state before numbers are taken.
WARMUP_SECONDS = 2
UNLOADED_SECONDS = 3

#: wrk reports times as e.g. ``379.00us``, ``1.45ms``, ``2.01s``, ``1.00m``.
_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


class BenchError(RuntimeError):
    """A failure to *run* the benchmark (as opposed to a disappointing result)."""


def log(message: str) -> None:
    """Progress goes to stderr so stdout stays the table plus the final ratio line."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScenarioContext:
    """What a scenario needs to know to write its route file."""

    backend_url: str
    port: int
    admin_port: int


@dataclass(frozen=True)
class Scenario:
    """A gateway configuration to benchmark plus the path wrk requests (on both proxies)."""

    routes_yaml: str
    path: str = "/"
    #: A wrk Lua script (text) shaping the requests, for both proxies; None: plain GETs of path.
    wrk_script: str | None = None


ScenarioFactory = Callable[[ScenarioContext], Scenario]

#: Scenario name -> factory. Register new ones with ``@scenario("name")``.
SCENARIOS: dict[str, ScenarioFactory] = {}


def scenario(name: str) -> Callable[[ScenarioFactory], ScenarioFactory]:
    """Register a scenario under ``name`` so ``--scenario name`` can select it."""

    def register(factory: ScenarioFactory) -> ScenarioFactory:
        SCENARIOS[name] = factory
        return factory

    return register


def server_block(ctx: ScenarioContext) -> str:
    """The ``server:`` section shared by every scenario (debug headers off: they cost time)."""
    return f"server: {{port: {ctx.port}, admin_port: {ctx.admin_port}, debug_headers: false}}\n"


def fast_backend_block(ctx: ScenarioContext, pool_size: int = 100) -> str:
    """A ``backends:`` section with just the fast fixed-response backend, named ``fast``."""
    return f'backends:\n  fast: {{url: "{ctx.backend_url}", pool_size: {pool_size}}}\n'


@scenario("plain")
def plain_scenario(ctx: ScenarioContext) -> Scenario:
    """Pure proxy overhead: one catch-all route, one backend, no cache/retries/shadowing."""
    routes = textwrap.dedent(
        """\
        routes:
          - name: bench
            match: {path_prefix: /}
            backends: [{name: fast, weight: 100}]
        """
    )
    return Scenario(routes_yaml=server_block(ctx) + fast_backend_block(ctx) + routes)


@scenario("resilience")
def resilience_scenario(ctx: ScenarioContext) -> Scenario:
    """The plain path with everything resilience turned on: breaker, retries with a per-try
    timeout and a deadline, a retry budget and a fallback backend (never needed here)."""
    routes = textwrap.dedent(
        f"""\
          legacy: {{url: "{ctx.backend_url}", pool_size: 100}}
        defaults:
          breaker: {{enabled: true, fail_max: 5, reset_timeout: 10s}}
          retry: {{attempts: 3, per_try_timeout: 1s, deadline: 3s}}
          retry_budget: {{percent: 20, min_retries: 3}}
        routes:
          - name: bench
            match: {{path_prefix: /}}
            backends: [{{name: fast, weight: 100}}]
            fallback: legacy
        """
    )
    return Scenario(routes_yaml=server_block(ctx) + fast_backend_block(ctx) + routes)


@scenario("cache-hit")
def cache_hit_scenario(ctx: ScenarioContext) -> Scenario:
    """Every request is a hit in the in-process cache layer (the origin says max-age=3600).
    nginx is measured proxying the same path without caching: the issue's yardstick."""
    routes = textwrap.dedent(
        """\
        routes:
          - name: bench
            match: {path_prefix: /}
            backends: [{name: fast, weight: 100}]
            cache: {mode: http}
        """
    )
    return Scenario(
        routes_yaml=server_block(ctx) + fast_backend_block(ctx) + routes, path="/cached"
    )


#: Each request asks for a new URL, so every one is a cache miss that is then stored.
UNIQUE_URLS_LUA = """\
-- unique per wrk run (warm-up, measured, 1-connection): the URLs of one run are never
-- those of another, so every request of every run is a miss
run = os.time() .. "-" .. string.format("%d", os.clock() * 1000000)
counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, "/cached?run=" .. run .. "&n=" .. counter)
end
"""


@scenario("cache-miss")
def cache_miss_scenario(ctx: ScenarioContext) -> Scenario:
    """Every request misses (a new URL each time), is fetched, stored and answered: the miss
    path's cost over `plain`. The route file is cache-hit's; the in-process layer evicts as it
    fills."""
    return replace(cache_hit_scenario(ctx), wrk_script=UNIQUE_URLS_LUA)


@scenario("shadow")
def shadow_scenario(ctx: ScenarioContext) -> Scenario:
    """The plain path with every GET copied to a shadow backend (the same fast nginx under
    another name) and compared; 10% of copies also call the primary again for noise."""
    routes = textwrap.dedent(
        f"""\
          candidate: {{url: "{ctx.backend_url}", pool_size: 100}}
        routes:
          - name: bench
            match: {{path_prefix: /}}
            backends: [{{name: fast, weight: 100}}]
            shadow: {{backend: candidate, percent: 100}}
        """
    )
    return Scenario(routes_yaml=server_block(ctx) + fast_backend_block(ctx) + routes)


# --------------------------------------------------------------------------------------------
# wrk output parsing
# --------------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    """The numbers we keep from one wrk run. Latencies are in milliseconds."""

    requests_per_sec: float
    requests: int = 0
    duration_s: float = 0.0
    latency_avg_ms: float | None = None
    latency_stdev_ms: float | None = None
    latency_max_ms: float | None = None
    percentiles_ms: dict[str, float] = field(default_factory=dict)
    non_2xx_3xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    #: p50 of a separate run with one connection: the per-request cost without queueing.
    unloaded_p50_ms: float | None = None
    #: p50 of a paced run (``--pace-ms``): every connection waits between requests, so the
    #: proxy is busy but not saturated, as in production.
    paced_p50_ms: float | None = None

    @property
    def p50_ms(self) -> float | None:
        return self.percentiles_ms.get("50")

    @property
    def p99_ms(self) -> float | None:
        return self.percentiles_ms.get("99")

    @property
    def errors(self) -> int:
        """Failed requests of any kind; a run with errors measures failure paths, not proxying."""
        return self.non_2xx_3xx + sum(self.socket_errors.values())


def to_ms(value: str) -> float:
    """Convert a wrk time string such as ``379.00us`` or ``1.45ms`` to milliseconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(us|ms|s|m|h)\s*", value)
    if match is None:
        raise ValueError(f"unrecognised wrk time value: {value!r}")
    return float(match.group(1)) * _TIME_UNITS_MS[match.group(2)]


def parse_wrk_output(text: str) -> WrkResult:
    """Parse the text wrk prints with ``--latency``.

    Parsing text (rather than a Lua ``done()`` hook) keeps the benchmark dependent only on the
    stock Debian wrk binary with no script files to ship.
    """
    rps_match = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.MULTILINE)
    if rps_match is None:
        raise ValueError("wrk output has no 'Requests/sec:' line")
    result = WrkResult(requests_per_sec=float(rps_match.group(1)))

    total = re.search(r"^\s*(\d+) requests in ([0-9.]+)(us|ms|s|m|h)", text, re.MULTILINE)
    if total is not None:
        result.requests = int(total.group(1))
        result.duration_s = to_ms(total.group(2) + total.group(3)) / 1000.0

    stats = re.search(r"^\s*Latency\s+(\S+)\s+(\S+)\s+(\S+)\s+\S+%", text, re.MULTILINE)
    if stats is not None:
        result.latency_avg_ms = to_ms(stats.group(1))
        result.latency_stdev_ms = to_ms(stats.group(2))
        result.latency_max_ms = to_ms(stats.group(3))

    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.strip() == "Latency Distribution":
            for row in lines[index + 1 :]:
                pct = re.fullmatch(r"\s*([0-9.]+)%\s+(\S+)\s*", row)
                if pct is None:
                    break
                result.percentiles_ms[pct.group(1).removesuffix(".000")] = to_ms(pct.group(2))
            break

    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if non_2xx is not None:
        result.non_2xx_3xx = int(non_2xx.group(1))

    sock = re.search(r"Socket errors:\s*(.+)", text)
    if sock is not None:
        for kind, count in re.findall(r"(\w+) (\d+)", sock.group(1)):
            result.socket_errors[kind] = int(count)
    return result


# --------------------------------------------------------------------------------------------
# Tools and processes
# --------------------------------------------------------------------------------------------


def find_binary(name: str) -> str | None:
    """Locate a system binary, also looking in sbin dirs that a non-root PATH often lacks."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def ensure_tools() -> tuple[str, str]:
    """Return paths to nginx and wrk, installing the Debian packages when they are missing.

    Installing on demand means a fresh CI runner or dev box needs no separate setup step; the
    package index is only refreshed if a plain install fails, to keep the common path fast.
    """
    nginx, wrk = find_binary("nginx"), find_binary("wrk")
    if nginx and wrk:
        return nginx, wrk
    missing = [name for name, path in (("nginx", nginx), ("wrk", wrk)) if not path]
    if os.geteuid() != 0:
        raise BenchError(
            f"missing {', '.join(missing)}; run as root or install them first: "
            "sudo apt-get install -y nginx-light wrk"
        )
    if shutil.which("apt-get") is None:
        raise BenchError(f"missing {', '.join(missing)} and apt-get is not available")
    log(f"installing {', '.join(missing)} via apt-get ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "nginx-light", "wrk"]
    if subprocess.run(install, env=env, check=False).returncode != 0:
        log("apt-get install failed; refreshing the package index and retrying")
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(install, env=env, check=True)
    nginx, wrk = find_binary("nginx"), find_binary("wrk")
    if not (nginx and wrk):
        raise BenchError("nginx/wrk still not found after apt-get install")
    return nginx, wrk


def free_ports(count: int) -> list[int]:
    """Ask the kernel for distinct unused loopback ports.

    Kernel-chosen ports keep parallel runs and dev servers (e.g. a demo on :8080) from
    clashing; all sockets stay open until every port is chosen so no port is handed out twice.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def free_port() -> int:
    """One unused loopback port; see ``free_ports``."""
    return free_ports(1)[0]


def http_get_status(url: str, timeout: float = 1.0) -> int | None:
    """GET ``url`` bypassing any proxy from the environment; ``None`` if it can't connect."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, urllib.error.URLError):
        return None


def tail(path: Path, lines: int = 30) -> str:
    """Last lines of a log file, for error messages when a target fails to start."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ManagedProcess:
    """A child process in its own process group, so stopping it also stops its workers.

    Each child gets a new session so the whole tree (nginx master+worker, a gateway supervisor
    and its worker) can be signalled at once and a Ctrl-C on the terminal reaches only us; we
    then tear the children down deterministically in ``stop``.
    """

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None):
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            self._log.close()
            raise BenchError(f"cannot start {name} ({argv[0]}): {exc}") from exc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process group, escalate to SIGKILL if it lingers."""
        try:
            if self.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    log(f"{self.name} did not exit on SIGTERM; killing")
            # Kill leftovers in the group even when the leader already exited (orphaned workers).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        finally:
            self._log.close()


@contextlib.contextmanager
def managed(
    name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None
) -> Iterator[ManagedProcess]:
    """Run a process for the duration of a ``with`` block; always stop it on the way out."""
    process = ManagedProcess(name, argv, log_path, env)
    try:
        yield process
    finally:
        process.stop()


def wait_for_http(process: ManagedProcess, url: str, timeout: float = 30.0) -> None:
    """Block until ``url`` answers 200; fail fast with the log tail if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise BenchError(
                f"{process.name} exited with code {process.proc.returncode} during startup:\n"
                f"{tail(process.log_path)}"
            )
        if http_get_status(url) == 200:
            return
        time.sleep(0.1)
    raise BenchError(
        f"{process.name} did not answer 200 on {url} within {timeout:.0f}s:\n"
        f"{tail(process.log_path)}"
    )


# --------------------------------------------------------------------------------------------
# nginx configurations
# --------------------------------------------------------------------------------------------


def nginx_main_conf(prefix: Path, http_body: str) -> str:
    """Common nginx.conf skeleton: foreground master + 1 worker, everything inside ``prefix``.

    All paths (pid, logs, temp dirs) are explicit so the instance never touches the system
    nginx's /var/lib, /var/log or /run, and works next to a running system nginx.
    """
    return (
        textwrap.dedent(
            f"""\
        daemon off;
        master_process on;
        worker_processes 1;
        pid {prefix}/nginx.pid;
        error_log {prefix}/error.log warn;
        events {{
            worker_connections 4096;
            multi_accept on;
        }}
        http {{
            access_log off;
            client_body_temp_path {prefix}/client_body;
            proxy_temp_path {prefix}/proxy;
            fastcgi_temp_path {prefix}/fastcgi;
            uwsgi_temp_path {prefix}/uwsgi;
            scgi_temp_path {prefix}/scgi;
            keepalive_requests 100000;
            keepalive_timeout 65s;
        """
        )
        + textwrap.indent(http_body, "    ")
        + "}\n"
    )


def backend_conf(prefix: Path, port: int) -> str:
    """The fast fixed-response backend: every path answers 200 with ``BACKEND_BODY``."""
    body = textwrap.dedent(
        f"""\
        server {{
            listen {HOST}:{port} backlog=4096;
            location / {{
                default_type application/json;
                return 200 '{BACKEND_BODY}';
            }}
            location /cached {{
                default_type application/json;
                add_header Cache-Control "max-age=3600";
                return 200 '{BACKEND_BODY}';
            }}
        }}
        """
    )
    return nginx_main_conf(prefix, body)


def proxy_conf(prefix: Path, port: int, backend_port: int) -> str:
    """nginx as a fair, tuned reverse proxy: pooled keep-alive HTTP/1.1 upstream connections.

    Without ``keepalive`` + HTTP/1.1 + an empty Connection header nginx would open a new
    upstream connection per request, which would flatter the gateway's pooled client.
    X-Forwarded-For is set because the gateway adds forwarding headers too.
    """
    body = textwrap.dedent(
        f"""\
        upstream bench_backend {{
            server {HOST}:{backend_port};
            keepalive 64;
            keepalive_requests 100000;
        }}
        server {{
            listen {HOST}:{port} backlog=4096;
            location / {{
                proxy_pass http://bench_backend;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
                proxy_set_header Host $host;
                proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            }}
        }}
        """
    )
    return nginx_main_conf(prefix, body)


def start_nginx(
    nginx: str, workdir: Path, name: str, conf: Callable[[Path], str]
) -> contextlib.AbstractContextManager[ManagedProcess]:
    """Write a private prefix dir + config for one nginx instance and start it in foreground."""
    prefix = workdir / name
    prefix.mkdir()
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(conf(prefix))
    argv = [nginx, "-p", f"{prefix}/", "-c", str(conf_path), "-e", str(prefix / "error.log")]
    return managed(name, argv, prefix / "stdout.log")


# --------------------------------------------------------------------------------------------
# Load generation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSpec:
    """The wrk parameters; identical for every target so the comparison is like for like."""

    wrk: str
    threads: int
    connections: int
    duration: int
    #: Path of a wrk Lua script shaping the requests (the scenario's ``wrk_script``).
    script: str | None = None
    #: Path of a wrk Lua script pacing each connection (``--pace-ms``).
    pace_script: str | None = None
    #: Seconds of load before each measured run.
    warmup: int = WARMUP_SECONDS


def run_wrk(spec: LoadSpec, url: str, duration: int) -> WrkResult:
    """Run wrk against ``url`` and parse its report; a wrk failure is a failure to run."""
    argv = [
        spec.wrk,
        f"-t{spec.threads}",
        f"-c{spec.connections}",
        f"-d{duration}s",
        "--latency",
        *(["-s", spec.script] if spec.script else []),
        url,
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    if proc.returncode != 0:
        raise BenchError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout}")
    try:
        return parse_wrk_output(proc.stdout)
    except ValueError as exc:
        raise BenchError(f"{exc}; wrk said:\n{proc.stdout}{proc.stderr}") from exc


def measure(name: str, spec: LoadSpec, url: str) -> WrkResult:
    """Warm up, then take the measured run."""
    if spec.warmup:
        log(f"{name}: warm-up {spec.warmup}s against {url}")
        run_wrk(spec, url, spec.warmup)
    log(f"{name}: measuring {spec.duration}s (-t{spec.threads} -c{spec.connections})")
    result = run_wrk(spec, url, spec.duration)
    # Under saturation p50 is mostly queueing (about connections / throughput);
    # one connection shows what a single request costs on its own.
    log(f"{name}: measuring {UNLOADED_SECONDS}s with 1 connection (latency without queueing)")
    single = LoadSpec(
        wrk=spec.wrk, threads=1, connections=1, duration=UNLOADED_SECONDS, script=spec.script
    )
    result.unloaded_p50_ms = run_wrk(single, url, UNLOADED_SECONDS).p50_ms
    if spec.pace_script is not None:
        log(f"{name}: measuring {spec.duration}s paced (latency under moderate load)")
        paced = replace(spec, script=spec.pace_script, pace_script=None)
        result.paced_p50_ms = run_wrk(paced, url, spec.duration).p50_ms
    if result.errors:
        log(
            f"WARNING {name}: {result.non_2xx_3xx} non-2xx/3xx responses, socket errors "
            f"{result.socket_errors}; its numbers do not describe successful proxying"
        )
    return result


def py_spy_binary() -> str:
    """py-spy from the same virtualenv as this interpreter, else from PATH."""
    candidate = Path(sys.executable).parent / "py-spy"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("py-spy")
    if found is None:
        raise BenchError("--profile needs py-spy (pip install py-spy)")
    return found


def start_profiler(pid: int, duration: int, out: Path, fmt: str, workdir: Path) -> ManagedProcess:
    """Sample the gateway (and its worker subprocesses) for the length of the measured run.

    ``--subprocesses`` matters because ``serve`` may run the event loop in a child process.
    Sampling costs the gateway some throughput, so numbers from a profiled run are a little low.
    """
    argv = [
        py_spy_binary(),
        "record",
        "--pid",
        str(pid),
        "--subprocesses",
        "--duration",
        str(duration),
        "--rate",
        "100",
        "--format",
        fmt,
        "-o",
        str(out),
    ]
    return ManagedProcess("py-spy", argv, workdir / "py-spy.log", None)


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def strangler_binary() -> Path:
    """The ``strangler`` console script installed next to this interpreter (same virtualenv)."""
    return Path(sys.executable).parent / "strangler"


def bench_nginx_proxy(
    nginx: str, workdir: Path, backend_port: int, spec: LoadSpec, path: str
) -> WrkResult:
    """Start the nginx reverse proxy, measure it, stop it."""
    port = free_port()
    conf = lambda prefix: proxy_conf(prefix, port, backend_port)  # noqa: E731
    with start_nginx(nginx, workdir, "nginx-proxy", conf) as proc:
        wait_for_http(proc, f"http://{HOST}:{port}{path}")
        return measure("nginx", spec, f"http://{HOST}:{port}{path}")


def report_feature_counts(admin_port: int) -> None:
    """Log what the cache and the shadower did during the runs (from /metrics), so a
    scenario's numbers can be read with, for example, how many copies were dropped."""
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://{HOST}:{admin_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError as exc:
        log(f"gateway metrics unavailable: {exc}")
        return
    for line in text.splitlines():
        if line.startswith(("strangler_shadow_requests_total", "strangler_cache_requests_total")):
            log(f"gateway {line}")


def bench_gateway(
    workdir: Path,
    backend_port: int,
    spec: LoadSpec,
    scenario_name: str,
    profile: str | None,
) -> tuple[WrkResult, Path | None]:
    """Start the gateway with the scenario's route file, measure it (optionally profiled)."""
    binary = strangler_binary()
    if not binary.exists():
        raise BenchError(f"{binary} not found; install the project into this virtualenv")
    port, admin_port = free_ports(2)
    ctx = ScenarioContext(f"http://{HOST}:{backend_port}", port, admin_port)
    chosen = SCENARIOS[scenario_name](ctx)
    routes = workdir / f"routes-{scenario_name}.yaml"
    routes.write_text(chosen.routes_yaml)
    argv = [
        str(binary),
        "serve",
        "--routes",
        str(routes),
        "--host",
        HOST,
        "--port",
        str(port),
        "--admin-port",
        str(admin_port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "STRANGLER_LOG_FORMAT": "text"}
    url = f"http://{HOST}:{port}{chosen.path}"
    with managed("gateway", argv, workdir / "gateway.log", env) as proc:
        wait_for_http(proc, f"http://{HOST}:{port}/__strangler/healthz")
        if profile is None:
            result = measure("gateway", spec, url)
            report_feature_counts(admin_port)
            return result, None
        if spec.warmup:
            log(f"gateway: warm-up {spec.warmup}s against {url}")
            run_wrk(spec, url, spec.warmup)
        suffix = {"flamegraph": "svg", "speedscope": "speedscope.json", "raw": "txt"}[profile]
        out = LOADTESTS_DIR / f"profile-{scenario_name}.{suffix}"
        profiler = start_profiler(proc.pid, spec.duration, out, profile, workdir)
        try:
            log(f"gateway: measuring {spec.duration}s under py-spy -> {out}")
            result = run_wrk(spec, url, spec.duration)
            try:
                profiler.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log("py-spy did not finish in time; stopping it")
        finally:
            profiler.stop()
        if not out.exists():
            log(f"WARNING py-spy wrote no profile:\n{tail(profiler.log_path)}")
            return result, None
        return result, out


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_table(results: dict[str, WrkResult]) -> str:
    """A small fixed-width table: one row per target."""
    header = f"{'target':<8} {'req/s':>10} {'p50 ms':>8} {'p75 ms':>8} {'p90 ms':>8} "
    header += f"{'p99 ms':>8} {'max ms':>8} {'errors':>7} {'p50@1conn':>10}"
    rows = [header, "-" * len(header)]
    for name, res in results.items():
        pct = res.percentiles_ms
        rows.append(
            f"{name:<8} {res.requests_per_sec:>10.1f} {_fmt_ms(pct.get('50')):>8} "
            f"{_fmt_ms(pct.get('75')):>8} {_fmt_ms(pct.get('90')):>8} "
            f"{_fmt_ms(pct.get('99')):>8} {_fmt_ms(res.latency_max_ms):>8} {res.errors:>7} "
            f"{_fmt_ms(res.unloaded_p50_ms):>10}"
        )
    return "\n".join(rows)


def throughput_ratio(nginx: WrkResult, gateway: WrkResult) -> float:
    """Gateway req/s over nginx req/s (0.0 if nginx served nothing, rather than crashing)."""
    if nginx.requests_per_sec <= 0:
        return 0.0
    return gateway.requests_per_sec / nginx.requests_per_sec


def ratio_line(nginx: WrkResult, gateway: WrkResult, scenario_name: str) -> str:
    """The single grep-able summary line: throughput ratio and added median latency,
    under the full load and with one connection (no queueing)."""
    throughput = throughput_ratio(nginx, gateway)
    n50, g50 = nginx.p50_ms or 0.0, gateway.p50_ms or 0.0
    line = (
        f"ratio gateway/nginx: throughput {throughput:.2f}, p50 added {g50 - n50:+.2f} ms "
        f"(nginx {n50:.2f} ms, gateway {g50:.2f} ms)"
    )
    if nginx.unloaded_p50_ms is not None and gateway.unloaded_p50_ms is not None:
        u_n, u_g = nginx.unloaded_p50_ms, gateway.unloaded_p50_ms
        line += f", 1-connection p50 added {u_g - u_n:+.2f} ms ({u_n:.2f} vs {u_g:.2f})"
    return f"{line}, scenario={scenario_name}"


def versus_line(base: WrkResult, gateway: WrkResult, args: argparse.Namespace) -> str:
    """The scenario's cost over another scenario, both on the gateway in this run."""
    throughput = throughput_ratio(base, gateway)
    b50, g50 = base.p50_ms or 0.0, gateway.p50_ms or 0.0
    line = (
        f"ratio {args.scenario}/{args.versus}: throughput {throughput:.2f}, "
        f"p50 {g50:.2f} vs {b50:.2f} ms ({(g50 / b50 - 1) * 100 if b50 else 0.0:+.0f}%)"
    )
    if base.unloaded_p50_ms and gateway.unloaded_p50_ms:
        u_b, u_g = base.unloaded_p50_ms, gateway.unloaded_p50_ms
        line += f", 1-connection p50 {u_g:.2f} vs {u_b:.2f} ms ({(u_g / u_b - 1) * 100:+.0f}%)"
    if base.paced_p50_ms and gateway.paced_p50_ms:
        p_b, p_g = base.paced_p50_ms, gateway.paced_p50_ms
        line += (
            f", paced ({args.pace_ms} ms) p50 {p_g:.2f} vs {p_b:.2f} ms "
            f"({(p_g / p_b - 1) * 100:+.0f}%)"
        )
    return line


def median_result(runs: list[WrkResult]) -> WrkResult:
    """Each number's median over several runs of one target (the run itself when one)."""
    if len(runs) == 1:
        return runs[0]

    def med(values: list[float | None]) -> float | None:
        known = sorted(v for v in values if v is not None)
        return known[len(known) // 2] if known else None

    middle = sorted(runs, key=lambda r: r.requests_per_sec)[len(runs) // 2]
    return replace(
        middle,
        percentiles_ms={
            k: med([r.percentiles_ms.get(k) for r in runs]) or 0.0 for k in middle.percentiles_ms
        },
        unloaded_p50_ms=med([r.unloaded_p50_ms for r in runs]),
        paced_p50_ms=med([r.paced_p50_ms for r in runs]),
    )


def result_dict(result: WrkResult) -> dict[str, object]:
    data = asdict(result)
    data["errors"] = result.errors
    return data


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the gateway against a tuned nginx reverse proxy (same backend, "
        "same wrk load) and print the throughput / latency ratio."
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument(
        "--warmup",
        type=int,
        default=WARMUP_SECONDS,
        help="seconds of load before each measured run (e.g. 16 with cache-miss fills the "
        "in-process layer, so the run measures it full and evicting)",
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk -c")
    parser.add_argument("--threads", type=int, default=1, help="wrk -t (1 leaves CPU to proxies)")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="plain")
    parser.add_argument("--json", type=Path, help="also write all numbers to this JSON file")
    parser.add_argument(
        "--pace-ms",
        type=int,
        help="also measure p50 with every connection pausing this long on average between "
        "requests (moderate load; e.g. 10 with 32 connections is about 3,000 req/s)",
    )
    parser.add_argument(
        "--versus",
        choices=sorted(SCENARIOS),
        help="also measure the gateway on this scenario and print the scenario's cost over it "
        "(e.g. --scenario shadow --versus plain)",
    )
    parser.add_argument(
        "--only",
        choices=("nginx", "gateway"),
        help="measure a single target (no ratio line); useful when debugging one side",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --versus: measure the two scenarios this many times, alternating, and "
        "report the medians (small differences on a noisy machine need several rounds)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record a py-spy profile of the gateway during its measured run into "
        "loadtests/profile-<scenario>.svg",
    )
    parser.add_argument(
        "--profile-format",
        choices=("flamegraph", "speedscope", "raw"),
        default="flamegraph",
        help="py-spy output format (speedscope writes profile-<scenario>.speedscope.json, "
        "raw writes collapsed stacks to profile-<scenario>.txt)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.rounds > 1 and args.versus is None:
        parser.error("--rounds needs --versus")
    if args.duration < 1 or args.connections < 1 or args.threads < 1:
        parser.error("--duration, --connections and --threads must be >= 1")
    if args.connections < args.threads:
        parser.error("--connections must be >= --threads (wrk requirement)")
    return args


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    """Turn SIGINT/SIGTERM into KeyboardInterrupt so ``finally`` blocks stop every child."""
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    nginx, wrk = ensure_tools()
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        # Both proxies saturate a core; other busy processes skew the comparison.
        log(f"WARNING 1-minute load average is {load_before:.2f}; results may be noisy")
    spec = LoadSpec(
        wrk=wrk,
        threads=args.threads,
        connections=args.connections,
        duration=args.duration,
        warmup=args.warmup,
    )
    results: dict[str, WrkResult] = {}
    profile_path: Path | None = None
    # nginx must request the same path as the gateway; the path never depends on the ports.
    shape = SCENARIOS[args.scenario](ScenarioContext("http://unused", 0, 0))
    path = shape.path

    with tempfile.TemporaryDirectory(prefix="strangler-bench-") as tmp:
        workdir = Path(tmp)
        if shape.wrk_script is not None:
            script = workdir / "requests.lua"
            script.write_text(shape.wrk_script)
            spec = replace(spec, script=str(script))
        if args.pace_ms:
            pace = workdir / "pace.lua"
            # A random pause (mean pace_ms) keeps the connections out of step, so requests
            # arrive spread out rather than in bursts of one per connection.
            pace.write_text(
                f"function delay()\n  return math.random(0, {2 * args.pace_ms})\nend\n"
            )
            spec = replace(spec, pace_script=str(pace))
        backend_port = free_port()
        backend = lambda prefix: backend_conf(prefix, backend_port)  # noqa: E731
        with start_nginx(nginx, workdir, "backend", backend) as backend_proc:
            wait_for_http(backend_proc, f"http://{HOST}:{backend_port}/")
            log(f"backend nginx up on {HOST}:{backend_port}")
            # Sequential on purpose: both proxies must get the same CPU budget.
            if args.only in (None, "nginx"):
                results["nginx"] = bench_nginx_proxy(nginx, workdir, backend_port, spec, path)
            if args.versus is not None:
                # The same requests (the scenario's wrk script, if any) for both scenarios:
                # a Lua request() makes wrk itself slower, so it must shape both runs.
                if SCENARIOS[args.versus](ScenarioContext("http://unused", 0, 0)).wrk_script:
                    raise BenchError("--versus needs a scenario without a wrk script")
            mine: list[WrkResult] = []
            theirs: list[WrkResult] = []
            for round_no in range(args.rounds):
                if args.only in (None, "gateway"):
                    profile = args.profile_format if args.profile and not round_no else None
                    result, path_written = bench_gateway(
                        workdir, backend_port, spec, args.scenario, profile
                    )
                    mine.append(result)
                    profile_path = profile_path or path_written
                if args.versus is not None:
                    theirs.append(bench_gateway(workdir, backend_port, spec, args.versus, None)[0])
                if args.rounds > 1 and mine and theirs:
                    log(f"round {round_no + 1}: {versus_line(theirs[-1], mine[-1], args)}")
            if mine:
                results["gateway"] = median_result(mine)
            if theirs:
                results[f"gw-{args.versus}"] = median_result(theirs)

    print(
        f"scenario={args.scenario} duration={args.duration}s connections={args.connections} "
        f"threads={args.threads} cpus={os.cpu_count()}"
    )
    print(format_table(results))
    if profile_path is not None:
        print(f"profile: {profile_path} (gateway numbers above were taken under sampling)")

    ratio: str | None = None
    if "nginx" in results and "gateway" in results:
        ratio = ratio_line(results["nginx"], results["gateway"], args.scenario)

    versus: str | None = None
    if args.versus is not None and "gateway" in results:
        versus = versus_line(results[f"gw-{args.versus}"], results["gateway"], args)

    if args.json is not None:
        payload = {
            "scenario": args.scenario,
            "duration_s": args.duration,
            "connections": args.connections,
            "threads": args.threads,
            "cpus": os.cpu_count(),
            "loadavg_before": round(load_before, 2),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "profile": str(profile_path) if profile_path else None,
            "results": {name: result_dict(res) for name, res in results.items()},
            "ratio": None
            if ratio is None
            else {
                "throughput": throughput_ratio(results["nginx"], results["gateway"]),
                "p50_added_ms": (results["gateway"].p50_ms or 0.0)
                - (results["nginx"].p50_ms or 0.0),
                "p99_added_ms": (results["gateway"].p99_ms or 0.0)
                - (results["nginx"].p99_ms or 0.0),
                "line": ratio,
            },
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"json: {args.json}")

    if ratio is not None:
        print(ratio)
    if versus is not None:
        print(versus)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Also for SIGINT: a shell starts background jobs with SIGINT ignored, and `kill -INT`
    # must still tear everything down.
    signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return run(args)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; all started processes were stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
