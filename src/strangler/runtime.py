"""The current snapshot and hot reload.

A `Snapshot` is immutable: the validated config, the compiled route table, the
upstream pools and the few settings the request path reads. A reload builds a
whole new snapshot and swaps one reference (`Runtime.current`); a request
reads that reference once, so in-flight requests finish on the snapshot they
started with.

Reloads come from three places: the file poller (``os.stat`` every
``server.reload_interval``: device, inode, mtime and size, which catches
editors' write-then-rename and ConfigMap symlink swaps), SIGHUP, and
``POST /api/reload``. An invalid file keeps the last good snapshot; the error
messages are logged, counted and kept for ``/readyz`` and ``/api/routes``.

With several workers, the supervisor's runtime publishes the reload count,
the generation and the weights; the workers' runtimes (``publish_metrics=False``)
reload the same file without counting each reload once more per process.

Upstream pools are keyed by backend name and survive a reload that does not
change the backend's settings; a pool whose backend changed or vanished is
retired and closes after its last in-flight request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strangler import config as config_mod
from strangler import metrics, tasks
from strangler.cache import ResponseCache, RoutePolicy
from strangler.config import RouteFile
from strangler.exceptions import ConfigError
from strangler.resilience import Breaker, Guard, RetryPolicy
from strangler.routing import RouteTable, compile_table
from strangler.shadow import Shadower, ShadowPolicy
from strangler.shadowproc import ShadowProcess
from strangler.shared import SharedState
from strangler.upstream import Forwarding, Pool, create_pool

__all__ = ["ReloadResult", "Runtime", "Snapshot"]

logger = logging.getLogger(__name__)

PoolFactory = Callable[[str, RouteFile], Pool]

# Settings read at start only; changing them needs a restart.
_RESTART_ONLY = ("host", "port", "admin_host", "admin_port", "drain_timeout", "keepalive_timeout")


def default_pool_factory(name: str, cfg: RouteFile) -> Pool:
    timeouts = cfg.backend_timeouts(name)
    return create_pool(
        name,
        cfg.backends[name].url,
        client=cfg.backend_client(name),
        connect_timeout=timeouts.connect,
        read_timeout=timeouts.read,
        pool_size=cfg.backend_pool_size(name),
        keepalive=cfg.backend_keepalive(name),
    )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one request needs, frozen at the moment it started."""

    config: RouteFile
    table: RouteTable
    pools: Mapping[str, Pool]
    #: Breaker, retry budget and recent failures per backend (survive reloads).
    guards: Mapping[str, Guard]
    #: Retry policy per (route, backend): the backend's, with the route's overrides.
    policies: Mapping[tuple[str, str], RetryPolicy]
    generation: int
    loaded_at: float
    forwarding: Forwarding
    debug_headers: bool
    max_body_bytes: int
    max_header_bytes: int
    max_header_count: int
    access_log: bool = field(default=False)
    #: Cache policy per route name, for the routes that cache.
    caches: Mapping[str, RoutePolicy] = field(default_factory=dict)
    #: Shadow policy per route name, for the routes that shadow.
    shadows: Mapping[str, ShadowPolicy] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    changed: bool
    generation: int
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "changed": self.changed,
            "generation": self.generation,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
        }


# A signature no file has: the first poll re-reads the file.
_UNKNOWN_SIGNATURE = (-1, -1, -1, -1)


def _file_signature(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: a ConfigMap '..data' swap changes the target
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class Runtime:
    """Owns the current snapshot and everything that replaces it."""

    def __init__(
        self,
        path: str | Path,
        *,
        pool_factory: PoolFactory = default_pool_factory,
        access_log: bool = False,
        start_pools: bool = True,
        publish_metrics: bool = True,
        redis_url: str | None = None,
    ) -> None:
        self.path = Path(path)
        self._redis_url = redis_url
        self.shared: SharedState | None = None
        self._breaker_sync: asyncio.Task[None] | None = None
        self._pool_factory = pool_factory
        self._access_log = access_log
        self._start_pools = start_pools
        self._publish_metrics = publish_metrics
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._signature: tuple[int, int, int, int] | None = None
        self._current: Snapshot | None = None
        #: The response cache (both layers); outlives reloads.
        self.cache = ResponseCache(0, None, "strangler:")
        #: Shadow copies and their stats; outlives reloads.
        self.shadower = Shadower(resolve=self._shadow_target)
        self._shadow_proc: ShadowProcess | None = None
        self.last_error: tuple[str, ...] = ()
        self.last_error_at: float | None = None

    # ------------------------------------------------------------------ access

    @property
    def current(self) -> Snapshot:
        snap = self._current
        if snap is None:
            raise RuntimeError("the runtime has not loaded a route file yet")
        return snap

    @property
    def ready(self) -> bool:
        return self._current is not None

    # --------------------------------------------------------------- lifecycle

    async def start(self, *, poll: bool = True, initial: RouteFile | None = None) -> None:
        """Load the route file (raising `ConfigError` if it is invalid), open
        the pools, and start polling the file.

        With ``initial`` (a config already validated elsewhere, such as the
        supervisor's last good one for a worker it respawns) the runtime starts
        on it even if the file is invalid or gone now, and the first poll
        reads the file."""
        if initial is None:
            signature = _file_signature(self.path)
            cfg = config_mod.load(self.path)
        else:
            signature, cfg = _UNKNOWN_SIGNATURE, initial
        self._signature = signature
        url = self._redis_url or (cfg.redis.url if cfg.redis else None)
        if url and self.shared is None:
            prefix = cfg.redis.prefix if cfg.redis else "strangler:"
            self.shared = SharedState(url, prefix)
        self.cache = ResponseCache(
            cfg.server.cache_memory_bytes,
            self.shared,
            cfg.redis.prefix if cfg.redis else "strangler:",
        )
        self.shadower = Shadower(
            self.shared, cfg.redis.prefix if cfg.redis else "strangler:", self._shadow_target
        )
        await self._install(cfg)
        if self.shared is not None and self._start_pools and self._breaker_sync is None:
            self._breaker_sync = tasks.spawn(
                self.shared.sync_breakers(lambda: dict(self.current.guards)),
                name="breaker-sync",
            )
        if poll and self._poller is None:
            self._poller = tasks.spawn(self._poll(), name="route-file-poller")

    async def stop(self) -> None:
        await self.cache.stop()
        if self._shadow_proc is not None:
            await self._shadow_proc.stop()
            self._shadow_proc = None
        await self.shadower.stop()
        if self._breaker_sync is not None:
            self._breaker_sync.cancel()
            self._breaker_sync = None
        if self.shared is not None:
            await self.shared.close()
            self.shared = None
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except asyncio.CancelledError:
                pass
            self._poller = None
        snap, self._current = self._current, None
        if snap is not None:
            await asyncio.gather(*(p.close() for p in snap.pools.values()))

    # ------------------------------------------------------------------ reload

    async def reload(self, reason: str = "manual") -> ReloadResult:
        """Re-read the route file; keep the last good snapshot if it is invalid."""
        async with self._lock:
            signature = _file_signature(self.path)
            try:
                cfg = config_mod.load(self.path)
            except ConfigError as exc:
                self._signature = signature
                self.last_error = tuple(exc.messages)
                self.last_error_at = time.time()
                if self._publish_metrics:
                    metrics.CONFIG_RELOADS.labels("failed").inc()
                logger.error(
                    "reload (%s) rejected, keeping generation %d:\n%s",
                    reason,
                    self._current.generation if self._current else 0,
                    "\n".join(exc.messages),
                )
                gen = self._current.generation if self._current else 0
                return ReloadResult(False, False, gen, errors=tuple(exc.messages))
            self._signature = signature
            old = self._current
            if old is not None and old.config == cfg:
                self.last_error = ()
                return ReloadResult(True, False, old.generation)
            warnings = self._restart_warnings(old.config, cfg) if old is not None else []
            for w in warnings:
                logger.warning("%s", w)
            await self._install(cfg)
            self.last_error = ()
            if self._publish_metrics:
                metrics.CONFIG_RELOADS.labels("ok").inc()
            logger.info("reload (%s): generation %d", reason, self.current.generation)
            return ReloadResult(True, True, self.current.generation, warnings=tuple(warnings))

    @staticmethod
    def _restart_warnings(old: RouteFile, new: RouteFile) -> list[str]:
        return [
            f"server.{name} changed ({getattr(old.server, name)} → {getattr(new.server, name)}); "
            "it takes effect after a restart"
            for name in _RESTART_ONLY
            if getattr(old.server, name) != getattr(new.server, name)
        ]

    async def _install(self, cfg: RouteFile) -> None:
        """Build and swap in a new snapshot, reusing unchanged pools."""
        old = self._current
        old_pools = dict(old.pools) if old is not None else {}
        pools: dict[str, Pool] = {}
        started: list[Pool] = []
        for name in cfg.backends:
            candidate = self._pool_factory(name, cfg)
            existing = old_pools.get(name)
            if existing is not None and existing.same_settings(candidate):
                pools[name] = existing
            else:
                pools[name] = candidate
                started.append(candidate)
        if self._start_pools:
            for pool in started:
                await pool.start()
        guards = self._guards(cfg, old.guards if old is not None else {})
        policies = {
            (route.name, name): RetryPolicy.build(cfg.backend_retry(name, route))
            for route in cfg.routes
            for name in {b.name for b in route.backends} | ({route.fallback} - {None})
            if name is not None
        }
        server = cfg.server
        snap = Snapshot(
            config=cfg,
            table=compile_table(cfg),
            pools=pools,
            guards=guards,
            policies=policies,
            generation=(old.generation + 1) if old is not None else 1,
            loaded_at=time.time(),
            forwarding=Forwarding(server.trusted_proxies),
            debug_headers=server.debug_headers,
            max_body_bytes=server.limits.max_body_bytes,
            max_header_bytes=server.limits.max_header_bytes,
            max_header_count=server.limits.max_header_count,
            access_log=self._access_log,
            caches={r.name: RoutePolicy(r.name, r.cache) for r in cfg.routes if r.cache},
            shadows={r.name: ShadowPolicy(r.name, r.shadow) for r in cfg.routes if r.shadow},
        )
        self.shadower.configure(server.shadow_concurrency, server.shadow_queue)
        self.cache.memory.max_bytes = server.cache_memory_bytes
        if snap.caches and self._start_pools:
            self.cache.start()  # idempotent: follows other replicas' invalidations
        if snap.shadows and self._start_pools:
            self.shadower.start()  # idempotent: adds this process's diff stats to Redis
            await self._shadow_worker(cfg)
        self._current = snap
        if self._publish_metrics:
            metrics.CONFIG_GENERATION.set(snap.generation)
            metrics.set_weights(
                {r.name: {b.name: b.weight for b in r.backends} for r in cfg.routes}
            )
        for name, pool in old_pools.items():
            if pools.get(name) is not pool:
                pool.retire()

    def _guards(self, cfg: RouteFile, old: Mapping[str, Guard]) -> dict[str, Guard]:
        """Keep a backend's guard (and its breaker state) unless its settings changed."""
        guards: dict[str, Guard] = {}
        for name in cfg.backends:
            breaker, budget = cfg.backend_breaker(name), cfg.backend_retry_budget(name)
            existing = old.get(name)
            if existing is not None and existing.same_settings(breaker, budget):
                guards[name] = existing
            else:
                guards[name] = Guard(name, breaker, budget, on_open=self._breaker_opened)
        return guards

    async def _shadow_worker(self, cfg: RouteFile) -> None:
        """Copies go through a child process unless ``server.shadow_worker`` is off."""
        if not cfg.server.shadow_worker:
            if self._shadow_proc is not None:
                await self._shadow_proc.stop()
                self._shadow_proc = None
            self.shadower.offload = None
            return
        if self._shadow_proc is None:
            self._shadow_proc = ShadowProcess(self.shadower)
            await self._shadow_proc.start(cfg)
            self.shadower.offload = self._shadow_proc.submit
        else:
            self._shadow_proc.configure(cfg)

    def _shadow_target(self, route: str) -> tuple[ShadowPolicy, Mapping[str, Pool]] | None:
        """The current policy and pools for a route's shadow copies."""
        snap = self._current
        if snap is None or route not in snap.shadows:
            return None
        return snap.shadows[route], snap.pools

    def _breaker_opened(self, breaker: Breaker) -> None:
        """A breaker opened on this replica's own failures: tell the others."""
        if self.shared is not None:
            tasks.spawn(self.shared.publish_open(breaker), name=f"share-open-{breaker.backend}")

    async def _poll(self) -> None:
        while True:
            interval = self._current.config.server.reload_interval if self._current else 1.0
            await asyncio.sleep(interval)
            try:
                if _file_signature(self.path) != self._signature:
                    await self.reload("file changed")
            except Exception:  # never let the poller die
                logger.exception("route-file poller failed; will retry")

    # ------------------------------------------------------------------ views

    def describe(self) -> dict[str, Any]:
        """The effective routes and weights, for ``GET /api/routes``."""
        snap = self.current
        routes = []
        for r in snap.config.routes:
            total = sum(b.weight for b in r.backends)
            routes.append(
                {
                    "name": r.name,
                    "match": r.match.model_dump(exclude_none=True),
                    "backends": [
                        {
                            "name": b.name,
                            "weight": b.weight,
                            "percent": round(100 * b.weight / total, 2) if total else 0.0,
                        }
                        for b in r.backends
                    ],
                    "sticky": r.sticky.model_dump(exclude_none=True) if r.sticky else None,
                    "fallback": r.fallback,
                    "allow_override": r.allow_override,
                    "rewrite": r.rewrite.model_dump(exclude_none=True, by_alias=True)
                    if r.rewrite
                    else None,
                    "preserve_host": r.preserve_host,
                }
            )
        return {
            "file": str(self.path),
            "generation": snap.generation,
            "loaded_at": snap.loaded_at,
            "last_error": list(self.last_error) or None,
            "last_error_at": self.last_error_at,
            "backends": {
                name: {
                    "url": b.url,
                    "timeouts": snap.config.backend_timeouts(name).model_dump(),
                    "pool_size": snap.config.backend_pool_size(name),
                }
                for name, b in snap.config.backends.items()
            },
            "routes": routes,
        }
