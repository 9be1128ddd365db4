"""Running the gateway: one process, or a supervisor with N workers.

One worker (the default): the proxy port and the admin port are two uvicorn
servers in one uvloop event loop, sharing one `Runtime`.

Several workers: the supervisor binds the proxy socket, sets up Prometheus
multiprocess mode (a fresh ``PROMETHEUS_MULTIPROC_DIR``), spawns the workers
(each a proxy server with its own runtime and pools on the shared socket),
and serves the admin port itself, aggregating every worker's metrics. A
worker that dies is marked dead for the metrics and replaced; the new one
starts on the supervisor's last good config, so an invalid edit of the route
file cannot keep it from starting.

Signals. SIGHUP reloads the route file (single-process uvicorn would exit on
it). SIGTERM/SIGINT drain: stop accepting (the supervisor also closes its
copy of the listening socket, or the kernel would keep queueing connections
nobody accepts), let in-flight requests finish for up to ``drain_timeout``
(then they are cancelled), exit 0. A second SIGTERM/SIGINT stops waiting.
uvicorn's own signal capture re-raises the signal after shutdown (exit 143),
so our `_Server` leaves signals to us. The supervisor passes SIGHUP and
SIGTERM on to its workers, and a second stop signal as SIGQUIT: a worker
treats SIGTERM as idempotent, since it sees it twice when a whole process
group is signalled (systemd, ``kill -TERM -PGID``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Generator
from dataclasses import dataclass, replace
from multiprocessing.context import SpawnProcess
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from strangler.exceptions import StartupError

if TYPE_CHECKING:
    from strangler.config import RouteFile
    from strangler.runtime import Runtime

__all__ = ["ServeOptions", "serve"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """Resolved settings for `serve` (flags > environment > route file)."""

    routes: str
    host: str | None = None
    port: int | None = None
    admin_host: str | None = None
    admin_port: int | None = None
    workers: int = 1
    redis_url: str | None = None
    admin_token: str | None = None
    drain_timeout: float | None = None
    access_log: bool = False
    log_format: str = "text"
    log_level: str = "INFO"


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to us."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class _CoalescingTransport:
    """A transport that joins the writes of one event-loop turn into one.

    uvicorn writes a response's head and its body with two ``write`` calls,
    which on a kept-alive socket are two ``send`` syscalls: the biggest cost
    of a small proxied response. Writes are buffered until the end of the
    current loop turn (``call_soon``) and sent together; ``close`` flushes
    first. Flow control is unchanged: the real transport still sees every
    byte within the same turn and pauses the protocol as before. Everything
    else is delegated.
    """

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        self._pending = []
        if not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    # What uvicorn calls per request, without the detour through __getattr__.
    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _ProxyHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with one write per response (see above)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport))  # type: ignore[arg-type]


def _freeze_startup_objects() -> None:
    """Move everything allocated at start (modules, the config, pools) out of
    the garbage collector's sight: it lives as long as the process, and every
    full collection would scan it again (a pause in the request path's tail)."""
    gc.collect()
    gc.freeze()


def _uvicorn_config(app: Any, host: str, port: int, **kw: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="none",
        http=kw.pop("http", "httptools"),
        lifespan="off",
        access_log=False,
        log_config=None,
        server_header=False,
        date_header=False,
        ws="none",
        proxy_headers=False,  # we resolve X-Forwarded-For ourselves (trusted_proxies)
        **kw,
    )


def _resolve(opts: ServeOptions) -> tuple[ServeOptions, Any]:
    """Fill unset options from the route file; raises ConfigError."""
    from strangler import config

    cfg = config.load(opts.routes)
    s = cfg.server
    return (
        replace(
            opts,
            host=opts.host or s.host,
            port=opts.port or s.port,
            admin_host=opts.admin_host or s.admin_host,
            admin_port=opts.admin_port or s.admin_port,
            drain_timeout=s.drain_timeout if opts.drain_timeout is None else opts.drain_timeout,
            redis_url=opts.redis_url or (cfg.redis.url if cfg.redis else None),
        ),
        cfg,
    )


def _bind(host: str, port: int, what: str) -> socket.socket:
    """A bound (not yet listening) TCP socket; `StartupError` if the address is taken.

    Both ports are bound before anything else starts, so a port in use fails
    the start cleanly instead of half-way through."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port} ({what}): {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _wipe(mp_dir: str) -> None:
    """Remove metric values an earlier run left in a multiprocess directory."""
    os.makedirs(mp_dir, exist_ok=True)
    for name in os.listdir(mp_dir):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(mp_dir, name))


def _drain_seconds(opts: ServeOptions) -> float:
    return max(0.0, opts.drain_timeout if opts.drain_timeout is not None else 20.0)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        return asyncio.new_event_loop()


def serve(opts: ServeOptions) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    if opts.workers > 1:
        return _Supervisor(opts).run()
    mp_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if mp_dir:  # multiprocess mode asked for with one process: start from zero all the same
        _wipe(mp_dir)
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        return runner.run(_serve_single(opts))


async def _serve_single(opts: ServeOptions) -> int:
    from strangler.admin import create_app
    from strangler.proxy import ProxyApp
    from strangler.runtime import Runtime

    opts, cfg = _resolve(opts)
    assert opts.port is not None and opts.admin_port is not None
    proxy_sock = _bind(opts.host or "0.0.0.0", opts.port, "proxy port")
    try:
        admin_sock = _bind(opts.admin_host or "127.0.0.1", opts.admin_port, "admin port")
    except StartupError:
        proxy_sock.close()
        raise
    runtime = Runtime(opts.routes, access_log=opts.access_log, redis_url=opts.redis_url)
    await runtime.start()
    proxy = ProxyApp(runtime)
    proxy_server = _Server(
        _uvicorn_config(
            proxy,
            opts.host or "0.0.0.0",
            opts.port,
            http=_ProxyHttpProtocol,
            timeout_keep_alive=int(cfg.server.keepalive_timeout),
            # seconds as a float (uvicorn waits with asyncio.wait_for); None would wait forever
            timeout_graceful_shutdown=_drain_seconds(opts),
        )
    )
    admin_server = _Server(
        _uvicorn_config(
            create_app(runtime, token=opts.admin_token),
            opts.admin_host or "127.0.0.1",
            opts.admin_port,
        )
    )
    _freeze_startup_objects()
    loop = asyncio.get_running_loop()

    def drain(signame: str) -> None:
        if proxy_server.should_exit:
            logger.warning("%s again: exiting now", signame)
            proxy_server.force_exit = True
            return
        logger.info("%s: draining for up to %g s", signame, _drain_seconds(opts))
        proxy.draining = True
        proxy_server.should_exit = True

    from strangler import tasks

    loop.add_signal_handler(signal.SIGTERM, drain, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, drain, "SIGINT")
    loop.add_signal_handler(
        signal.SIGHUP, lambda: tasks.spawn(runtime.reload("SIGHUP"), name="sighup-reload")
    )
    logger.info(
        "strangler serving %s on http://%s:%d (admin http://%s:%d)",
        opts.routes,
        opts.host,
        opts.port,
        opts.admin_host,
        opts.admin_port,
    )
    admin_task = tasks.spawn(admin_server.serve(sockets=[admin_sock]), name="admin-server")
    try:
        await proxy_server.serve(sockets=[proxy_sock])
    finally:
        admin_server.should_exit = True
        await admin_task
        await runtime.stop()
        await tasks.cancel_all()
    if proxy_server.started or proxy_server.should_exit:
        logger.info("drained, exiting")
        return 0
    return 1


# ------------------------------------------------------------------ workers


def _worker_main(opts: ServeOptions, sock: socket.socket, index: int, initial: RouteFile) -> None:
    """Entry point of a worker process (spawned: a fresh interpreter).

    ``initial`` is the supervisor's current (valid) `RouteFile`."""
    from strangler import logs

    logs.setup(opts.log_format, opts.log_level)
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        code = runner.run(_worker_serve(opts, sock, index, initial))
    os._exit(code)


async def _worker_serve(
    opts: ServeOptions, sock: socket.socket, index: int, initial: RouteFile
) -> int:
    from strangler import metrics, tasks
    from strangler.proxy import ProxyApp
    from strangler.runtime import Runtime

    # the supervisor counts reloads and publishes the weights, once for all
    runtime = Runtime(
        opts.routes, access_log=opts.access_log, publish_metrics=False, redis_url=opts.redis_url
    )
    await runtime.start(initial=initial)
    proxy = ProxyApp(runtime)
    cfg = runtime.current.config
    server = _Server(
        _uvicorn_config(
            proxy,
            opts.host or "0.0.0.0",
            opts.port or 8080,
            http=_ProxyHttpProtocol,
            timeout_keep_alive=int(cfg.server.keepalive_timeout),
            timeout_graceful_shutdown=_drain_seconds(opts),
        )
    )
    _freeze_startup_objects()
    loop = asyncio.get_running_loop()

    def drain() -> None:  # idempotent: a process-group SIGTERM may come twice
        proxy.draining = True
        server.should_exit = True

    def exit_now() -> None:
        drain()
        server.force_exit = True

    tasks.spawn(metrics.flush_forever(), name="metrics-flush")
    loop.add_signal_handler(signal.SIGTERM, drain)
    loop.add_signal_handler(signal.SIGQUIT, exit_now)  # the supervisor's "stop waiting"
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the supervisor decides
    loop.add_signal_handler(
        signal.SIGHUP, lambda: tasks.spawn(runtime.reload("SIGHUP"), name="sighup-reload")
    )
    try:
        await server.serve(sockets=[sock])
    finally:
        await runtime.stop()
        await tasks.cancel_all()
    return 0


class _Supervisor:
    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.workers: dict[int, SpawnProcess] = {}
        self.stopping = False
        self.exit_code = 0
        self._ctx = multiprocessing.get_context("spawn")
        self._restarts: list[float] = []
        self._runtime: Runtime | None = None

    def run(self) -> int:
        mp_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        own_dir = mp_dir is None
        if mp_dir is None:
            mp_dir = tempfile.mkdtemp(prefix="strangler-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
        else:
            _wipe(mp_dir)
        try:
            with asyncio.Runner(loop_factory=_new_loop) as runner:
                return runner.run(self._main())
        finally:
            if own_dir:
                shutil.rmtree(mp_dir, ignore_errors=True)

    def _spawn(self, index: int, sock: socket.socket) -> None:
        assert self._runtime is not None
        initial = self._runtime.current.config  # last good: the file may be invalid now
        proc = self._ctx.Process(
            target=_worker_main,
            args=(self.opts, sock, index, initial),
            name=f"strangler-worker-{index}",
        )
        proc.start()
        self.workers[index] = proc
        logger.info("worker %d started (pid %s)", index, proc.pid)

    async def _main(self) -> int:
        from strangler import tasks
        from strangler.admin import create_app
        from strangler.runtime import ReloadResult, Runtime

        opts, cfg = _resolve(self.opts)
        self.opts = opts
        assert opts.port is not None and opts.admin_port is not None
        sock = _bind(opts.host or "0.0.0.0", opts.port, "proxy port")
        try:
            admin_sock = _bind(opts.admin_host or "127.0.0.1", opts.admin_port, "admin port")
        except StartupError:
            sock.close()
            raise
        runtime = self._runtime = Runtime(opts.routes, start_pools=False)
        await runtime.start()
        for i in range(opts.workers):
            self._spawn(i, sock)

        def signal_workers(sig: int) -> None:
            for proc in self.workers.values():
                if proc.pid is not None and proc.is_alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, sig)

        async def reload_all(reason: str) -> ReloadResult:
            result = await runtime.reload(reason)
            signal_workers(signal.SIGHUP)
            return result

        admin_server = _Server(
            _uvicorn_config(
                create_app(
                    runtime,
                    token=opts.admin_token,
                    reload=reload_all,
                    extra_status=lambda: {"workers": self._alive()},
                ),
                opts.admin_host or "127.0.0.1",
                opts.admin_port,
            )
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_stop(signame: str) -> None:
            if self.stopping:
                logger.warning("%s again: workers exit now", signame)
                signal_workers(signal.SIGQUIT)
            else:
                logger.info("%s: draining %d workers", signame, self._alive())
                signal_workers(signal.SIGTERM)
            self.stopping = True
            # Our copy of the listening socket would keep it listening after
            # the workers close theirs: new connections would queue unanswered.
            sock.close()
            stop.set()

        loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")
        loop.add_signal_handler(
            signal.SIGHUP, lambda: tasks.spawn(reload_all("SIGHUP"), name="sighup-reload")
        )
        admin_task = tasks.spawn(admin_server.serve(sockets=[admin_sock]), name="admin-server")
        logger.info(
            "strangler serving %s on http://%s:%d with %d workers (admin http://%s:%d)",
            opts.routes,
            opts.host,
            opts.port,
            opts.workers,
            opts.admin_host,
            opts.admin_port,
        )
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            self._reap(sock)

        deadline = time.monotonic() + (opts.drain_timeout or 0) + 5
        while any(p.is_alive() for p in self.workers.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for proc in self.workers.values():
            if proc.is_alive():
                logger.warning("worker pid %s did not drain in time; killing it", proc.pid)
                proc.kill()
            proc.join(1)
            self._mark_dead(proc)
        sock.close()
        admin_server.should_exit = True
        await admin_task
        await runtime.stop()
        await tasks.cancel_all()
        return self.exit_code

    def _alive(self) -> int:
        return sum(1 for p in self.workers.values() if p.is_alive())

    def _mark_dead(self, proc: SpawnProcess) -> None:
        from prometheus_client import multiprocess

        if proc.pid is not None:
            multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]

    def _reap(self, sock: socket.socket) -> None:
        for index, proc in list(self.workers.items()):
            if proc.is_alive() or self.stopping:
                continue
            logger.error(
                "worker %d (pid %s) exited with %s; restarting", index, proc.pid, proc.exitcode
            )
            self._mark_dead(proc)
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < 60] + [now]
            if len(self._restarts) > 10 * self.opts.workers:
                logger.error("workers keep dying; giving up")
                self.exit_code = 1
                os.kill(os.getpid(), signal.SIGTERM)
                return
            self._spawn(index, sock)
