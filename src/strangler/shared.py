"""State shared by all replicas through Redis, never in the failure domain.

Redis (ElastiCache in production) is optional. Every call here is fail-fast:
a blocking pool that waits at most 50 ms for a connection, 100 ms socket
timeouts, no retries; after any error the client stops trying for a few
seconds (a tiny breaker of its own) and the gateway carries on with its
in-process state. Errors are counted and logged once per outage, not once
per request; Redis coming back is picked up by the next call after the pause.

Shared circuit breakers: when a breaker opens on a replica's own failures,
``<prefix>breaker:<backend>`` is set to the wall-clock time it will half-open
(expiring then). Every replica reads those keys every half second with one
MGET and opens its own breaker for the rest of that time, so a backend one
replica found dead is spared by the whole fleet within a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from strangler import metrics

if TYPE_CHECKING:
    from strangler.resilience import Breaker, Guard

__all__ = ["SharedState"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: After a Redis error, do not try again for this long.
PAUSE_AFTER_ERROR = 3.0
#: How often replicas look for breakers opened elsewhere.
BREAKER_SYNC_INTERVAL = 0.5


class SharedState:
    """A fail-fast view of Redis for the features that share state."""

    def __init__(self, url: str, prefix: str = "strangler:") -> None:
        self.url = url
        self.prefix = prefix
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=20,
            timeout=0.05,
            socket_connect_timeout=0.1,
            socket_timeout=0.1,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=30,
        )
        self.redis: Redis = Redis(connection_pool=pool)
        self._paused_until = 0.0
        self._down = False

    def __repr__(self) -> str:
        return f"SharedState({self.url!r}, prefix={self.prefix!r}, up={self.up})"

    @property
    def up(self) -> bool:
        return not self._down

    @property
    def paused(self) -> bool:
        """Within the pause after an error: calls are skipped, not tried."""
        return time.monotonic() < self._paused_until

    async def run(self, what: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """Run one Redis call; on any error return None and pause for a while."""
        if time.monotonic() < self._paused_until:
            metrics.REDIS_ERRORS.labels("skipped").inc()
            return None
        try:
            result = await call()
        except (TimeoutError, RedisError, OSError) as exc:
            self._paused_until = time.monotonic() + PAUSE_AFTER_ERROR
            metrics.REDIS_ERRORS.labels("error").inc()
            if not self._down:
                self._down = True
                logger.warning(
                    "redis unavailable (%s: %s); working without it, retrying every %.0fs",
                    what,
                    exc,
                    PAUSE_AFTER_ERROR,
                )
            return None
        if self._down:
            self._down = False
            logger.info("redis is back (%s)", what)
        return result

    # ----------------------------------------------------------- breakers

    def _breaker_key(self, backend: str) -> str:
        return f"{self.prefix}breaker:{backend}"

    async def publish_open(self, breaker: Breaker) -> None:
        """Tell the other replicas; a breaker still open after a Redis outage is
        published again by `sync_breakers` (``breaker.unpublished``)."""
        ttl_ms = int((breaker.open_until_wall - time.time()) * 1000)
        if ttl_ms <= 0:
            breaker.unpublished = False
            return
        key = self._breaker_key(breaker.backend)
        value = f"{breaker.open_until_wall:.3f}"
        done = await self.run("publish breaker", lambda: self.redis.set(key, value, px=ttl_ms))
        if done:
            breaker.unpublished = False

    async def open_breakers(self, backends: Iterable[str]) -> dict[str, float]:
        names = list(backends)
        if not names:
            return {}
        keys = [self._breaker_key(n) for n in names]
        values: list[Any] | None = await self.run("read breakers", lambda: self.redis.mget(keys))
        out: dict[str, float] = {}
        for name, value in zip(names, values or (), strict=False):
            if value:
                try:
                    out[name] = float(value)
                except ValueError:
                    continue
        return out

    async def sync_breakers(self, guards: Callable[[], dict[str, Guard]]) -> None:
        """Forever: open local breakers that another replica opened."""
        while True:
            await asyncio.sleep(BREAKER_SYNC_INTERVAL)
            current = guards()
            opened = await self.open_breakers(
                name for name, g in current.items() if g.breaker is not None
            )
            for name, until in opened.items():
                guard = current.get(name)
                if guard is not None and guard.breaker is not None:
                    guard.breaker.force_open(until)
            for guard in current.values():
                breaker = guard.breaker
                if breaker is not None and breaker.unpublished and breaker.state == "open":
                    await self.publish_open(breaker)

    async def close(self) -> None:
        try:
            await self.redis.aclose()
        except (RedisError, OSError):
            pass
