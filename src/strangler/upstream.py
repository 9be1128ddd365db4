"""Talking to backends: header hygiene, forwarding headers, pooled clients.

One pool per backend, behind the `Pool` seam. Two clients implement it:

* `H1UpstreamPool` (the default, ``client: h1``): the lean HTTP/1.1 pool of
  `strangler.h1client`, built on asyncio protocols and httptools. It costs
  about a fifth of aiohttp's CPU per request.
* `AiohttpPool` (``client: aiohttp``): aiohttp's ``ClientSession``, configured
  for a proxy as the pitfalls page says. Kept as a well-known alternative.

Both translate every error into the project's `UpstreamError` tree, with
``sent`` telling whether the request may have reached the backend. Nothing
outside this module and `h1client` touches sockets or aiohttp.

Header rules (RFC 9110 §7.6.1): hop-by-hop headers — ``Connection``,
``Keep-Alive``, ``Proxy-Connection``, ``TE``, ``Trailer``,
``Transfer-Encoding``, ``Upgrade`` and every header named in ``Connection`` —
are dropped in both directions. ``X-Forwarded-For`` is appended to only when
the peer is a trusted proxy; otherwise the client's own value is replaced, so
a client cannot forge its address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Protocol

import aiohttp
from yarl import URL

from strangler import tasks
from strangler.exceptions import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from strangler.h1client import H1Pool

__all__ = [
    "CLIENTS",
    "HOP_BY_HOP",
    "AiohttpPool",
    "Forwarding",
    "H1UpstreamPool",
    "Pool",
    "UpstreamResponse",
    "build_request_headers",
    "clean_response_headers",
    "create_pool",
]

logger = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Request headers the gateway sets itself or must not forward.
_REQUEST_DROP = HOP_BY_HOP | {
    b"host",
    b"expect",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-request-id",
    b"x-strangler-backend",
    b"forwarded",
}
_VIA = (b"via", b"1.1 strangler")
_RESPONSE_DROP = HOP_BY_HOP | {b"x-request-id"}
#: Connection values that name no other field (the usual ones).
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})

_CHUNK = 64 * 1024
#: How long a retired pool waits for its busy connections before closing anyway.
_RETIRE_GRACE = 600.0


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


class Forwarding:
    """Builds the ``X-Forwarded-*`` headers; knows which peers are trusted."""

    __slots__ = ("_nets", "_cache")

    def __init__(self, trusted_proxies: Sequence[str] = ()) -> None:
        self._nets = tuple(ipaddress.ip_network(c, strict=False) for c in trusted_proxies)
        self._cache: dict[str, bool] = {}

    def is_trusted(self, ip: str | None) -> bool:
        if not self._nets or not ip:
            return False
        hit = self._cache.get(ip)
        if hit is None:
            try:
                addr = ipaddress.ip_address(ip)
                hit = any(addr in net for net in self._nets)
            except ValueError:
                hit = False
            if len(self._cache) < 4096:  # bounded: peers are load balancers, not clients
                self._cache[ip] = hit
        return hit

    def client_ip(self, peer: str | None, xff: bytes | None) -> str | None:
        """The client's address: the right-most untrusted hop, if the peer is trusted."""
        if xff is None or not self.is_trusted(peer):
            return peer
        for hop in reversed(xff.decode("latin-1").split(",")):
            hop = hop.strip()
            if hop and not self.is_trusted(hop):
                return hop
        return peer


def build_request_headers(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    host: bytes,
    peer: str | None,
    scheme: str,
    request_id: bytes,
    forwarding: Forwarding,
) -> list[tuple[bytes, bytes]]:
    """The headers sent upstream: hygiene, Host, X-Forwarded-*, X-Request-ID, Via.

    ``host`` is the Host value to send (the backend's, or the client's when the
    route preserves it). Forwarding headers from an untrusted peer are dropped,
    ``Forwarded`` included, so a client cannot forge its address.
    """
    trusted = forwarding.is_trusted(peer)
    conn: frozenset[bytes] | tuple[()] = ()
    for name, _ in headers:
        if name == b"connection":
            conn = _connection_tokens(headers)
            break
    out: list[tuple[bytes, bytes]] = [(b"host", host)]
    xff: bytes | None = None
    xfp: bytes | None = None
    xfh: bytes | None = None
    client_host: bytes | None = None
    for name, value in headers:
        if name in _REQUEST_DROP or name in conn:
            if name == b"host":
                client_host = value
            elif trusted:
                if name == b"x-forwarded-for":
                    xff = value if xff is None else xff + b", " + value
                elif name == b"x-forwarded-proto":
                    xfp = value
                elif name == b"x-forwarded-host":
                    xfh = value
                elif name == b"forwarded":
                    out.append((name, value))
            continue
        out.append((name, value))
    if peer:
        xff = xff + b", " + peer.encode() if xff else peer.encode()
    if xff:
        out.append((b"x-forwarded-for", xff))
    out.append((b"x-forwarded-proto", xfp or scheme.encode()))
    if xfh or client_host:
        out.append((b"x-forwarded-host", xfh or client_host or b""))
    out.append((b"x-request-id", request_id))
    out.append(_VIA)
    return out


def clean_response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Upstream response headers minus hop-by-hop and the backend's request id
    (names lower-cased)."""
    out: list[tuple[bytes, bytes]] = []
    named: list[bytes] | None = None  # Connection values naming more hop-by-hop fields
    for name, value in raw:
        lname = name.lower()
        if lname in _RESPONSE_DROP:
            if lname == b"connection" and value.lower() not in _PLAIN_CONNECTION:
                named = [value] if named is None else [*named, value]
            continue
        out.append((lname, value))
    if named is not None:
        conn = _connection_tokens((b"connection", v) for v in named)
        out = [(n, v) for n, v in out if n not in conn]
    return out


class UpstreamResponse(Protocol):
    """What the proxy reads from a backend. ``headers`` are as received (names
    in any case, hop-by-hop included); `clean_response_headers` applies the
    hygiene."""

    status: int
    headers: list[tuple[bytes, bytes]]

    async def read_chunk(self) -> bytes:
        """The next body chunk as it arrives; ``b""`` at the end."""
        ...

    def at_eof(self) -> bool:
        """Whether the whole body has been read (the last chunk needs no extra read)."""
        ...

    def release(self) -> None:
        """Return the connection to the pool (or close it if the body is not done)."""
        ...


class Pool(Protocol):
    """A pooled client for one backend."""

    name: str
    host_header: bytes

    async def start(self) -> None: ...

    async def send(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterable[bytes] | bytes | None,
        timeout: float | None = None,
    ) -> UpstreamResponse:
        """Send; ``timeout`` also bounds the wait for the response head
        (raising `UpstreamTimeout`, sent=True)."""
        ...

    def same_settings(self, other: Pool) -> bool: ...

    def retire(self) -> None: ...

    async def close(self) -> None: ...


class _PoolBase:
    """Settings and lifecycle shared by both clients."""

    client = ""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        connect_timeout: float = 1.0,
        read_timeout: float = 30.0,
        pool_size: int = 100,
        keepalive: float = 4.0,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        parsed = URL(self.url)
        host = parsed.raw_host or ""
        if parsed.explicit_port:
            host += f":{parsed.port}"
        self.host_header = host.encode("idna")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.pool_size = pool_size
        self.keepalive = keepalive
        self._retired = False

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, {self.url!r}, connect={self.connect_timeout}, "
            f"read={self.read_timeout}, pool_size={self.pool_size}, keepalive={self.keepalive})"
        )

    def _settings(self) -> tuple[object, ...]:
        return (
            self.client,
            self.url,
            self.connect_timeout,
            self.read_timeout,
            self.pool_size,
            self.keepalive,
        )

    def same_settings(self, other: Pool) -> bool:
        return isinstance(other, _PoolBase) and self._settings() == other._settings()


class H1UpstreamPool(_PoolBase):
    """The default client: the lean HTTP/1.1 pool of `strangler.h1client`.

    It costs about a fifth of aiohttp's CPU per proxied request, which is
    what lets one worker reach the throughput budget. A retired pool (its
    backend changed on reload) stops taking new requests and closes once its
    busy connections are back, checked once a second for at most
    `_RETIRE_GRACE` seconds, so a long download is not cut by a reload.
    """

    client = "h1"

    def __init__(self, name: str, url: str, **kw: float) -> None:
        super().__init__(name, url, **kw)  # type: ignore[arg-type]
        self._pool: H1Pool | None = None

    async def start(self) -> None:
        if self._pool is None:
            self._pool = H1Pool(
                self.url,
                name=self.name,
                max_connections=self.pool_size,
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                keepalive_timeout=self.keepalive,
            )

    async def send(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterable[bytes] | bytes | None,
        timeout: float | None = None,
    ) -> UpstreamResponse:
        pool = self._pool
        if pool is None:
            raise UpstreamConnectError(f"backend {self.name} is not started", backend=self.name)
        return await pool.request(method, target, headers, body, timeout)

    def busy(self) -> int:
        pool = self._pool
        return 0 if pool is None else pool.open_count - pool.idle_count

    def retire(self) -> None:
        if not self._retired:
            self._retired = True
            tasks.spawn(self._close_when_idle(), name=f"retire-pool-{self.name}")

    async def _close_when_idle(self) -> None:
        deadline = time.monotonic() + _RETIRE_GRACE
        while self.busy() > 0 and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
        await self.close()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.aclose()


class _AiohttpResponse:
    __slots__ = ("status", "headers", "_resp", "_backend", "_pool")

    def __init__(self, resp: aiohttp.ClientResponse, backend: str, pool: AiohttpPool) -> None:
        self._resp: aiohttp.ClientResponse | None = resp
        self._backend = backend
        self._pool = pool
        self.status = resp.status
        self.headers = list(resp.raw_headers)

    async def read_chunk(self) -> bytes:
        assert self._resp is not None
        try:
            return await self._resp.content.readany()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _map_error(exc, self._backend, sent=True) from exc

    def at_eof(self) -> bool:
        return self._resp is None or self._resp.content.at_eof()

    def release(self) -> None:
        resp, self._resp = self._resp, None
        if resp is None:
            return
        if resp.content.at_eof():
            resp.release()
        else:
            resp.close()
        self._pool._done()


def _map_error(exc: BaseException, backend: str, *, sent: bool) -> UpstreamError:
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout(f"connect timeout to {backend}", backend=backend, sent=False)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamConnectError(f"cannot connect to {backend}: {exc.os_error}", backend=backend)
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamTimeout(f"read timeout from {backend}", backend=backend, sent=sent)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamProtocolError(f"{backend} closed the connection", backend=backend, sent=sent)
    return UpstreamProtocolError(
        f"{backend}: {type(exc).__name__}: {exc}", backend=backend, sent=sent
    )


class _BodyTracker:
    """Wraps a streamed request body to learn whether the request went out.

    aiohttp holds the request head back until the first body chunk (or the
    end of the body when there is none), so the request counts as sent once
    the iterator yields anything or finishes.
    """

    __slots__ = ("source", "started")

    def __init__(self, source: AsyncIterable[bytes]) -> None:
        self.source = source
        self.started = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.source:
            self.started = True
            yield chunk
        self.started = True


class AiohttpPool(_PoolBase):
    """The aiohttp client (``client: aiohttp``), configured for a proxy.

    No cookie jar (user A's cookies would ride on user B's request), no
    decompression (bytes go through as they came), no automatic
    ``User-Agent``/``Accept``/``Content-Type``, headers read from
    ``raw_headers`` so repeated ``Set-Cookie`` lines survive.
    """

    client = "aiohttp"

    def __init__(self, name: str, url: str, **kw: float) -> None:
        super().__init__(name, url, **kw)  # type: ignore[arg-type]
        parsed = URL(self.url)
        self._base_path = parsed.raw_path.rstrip("/")
        self._origin = str(parsed.origin())
        self.inflight = 0
        self._session: aiohttp.ClientSession | None = None
        self._closing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._session is not None:
            return
        connector = aiohttp.TCPConnector(
            limit=self.pool_size,
            limit_per_host=0,
            keepalive_timeout=self.keepalive,
            ttl_dns_cache=10,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self.connect_timeout,
                sock_connect=self.connect_timeout,
                sock_read=self.read_timeout,
            ),
            trust_env=False,
            read_bufsize=_CHUNK,
        )

    async def send(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterable[bytes] | bytes | None,
        timeout: float | None = None,
    ) -> UpstreamResponse:
        if timeout is None:
            return await self._send(method, target, headers, body)
        try:
            async with asyncio.timeout(timeout):
                return await self._send(method, target, headers, body)
        except TimeoutError:
            raise UpstreamTimeout(
                f"no response from {self.name} within {timeout:.3g}s", backend=self.name, sent=True
            ) from None

    async def _send(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterable[bytes] | bytes | None,
    ) -> UpstreamResponse:
        session = self._session
        if session is None:
            raise UpstreamConnectError(f"backend {self.name} is not started", backend=self.name)
        url = URL(self._origin + self._base_path + target, encoded=True)
        tracker = _BodyTracker(body) if body is not None and not isinstance(body, bytes) else None
        str_headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]
        self.inflight += 1
        try:
            resp = await session.request(
                method,
                url,
                headers=str_headers,
                data=tracker if tracker is not None else body,
                allow_redirects=False,
                compress=None,
            )
        except asyncio.CancelledError:
            self._done()
            raise
        except Exception as exc:
            self._done()
            if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
                sent = False
            elif tracker is not None:
                sent = tracker.started
            else:
                sent = True  # the head may have gone out; be safe
            raise _map_error(exc, self.name, sent=sent) from exc
        return _AiohttpResponse(resp, self.name, self)

    def _done(self) -> None:
        self.inflight -= 1
        if self._retired and self.inflight <= 0 and self._closing is None:
            self._closing = tasks.spawn(self.close(), name=f"close-pool-{self.name}")

    def retire(self) -> None:
        """Close once the requests still using this pool have finished."""
        self._retired = True
        if self.inflight <= 0 and self._closing is None:
            self._closing = tasks.spawn(self.close(), name=f"close-pool-{self.name}")

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


CLIENTS: dict[str, type[H1UpstreamPool] | type[AiohttpPool]] = {
    "h1": H1UpstreamPool,
    "aiohttp": AiohttpPool,
}


def create_pool(
    name: str,
    url: str,
    *,
    client: str = "h1",
    connect_timeout: float = 1.0,
    read_timeout: float = 30.0,
    pool_size: int = 100,
    keepalive: float = 4.0,
) -> Pool:
    """A pool for one backend with the configured client."""
    return CLIENTS[client](
        name,
        url,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        pool_size=pool_size,
        keepalive=keepalive,
    )
