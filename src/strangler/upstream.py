"""Talking to backends: header hygiene, forwarding headers, pooled clients.

One `UpstreamPool` per backend, each owning an aiohttp ``ClientSession``
configured for a proxy (see the pitfalls page): no cookie jar (user A's
cookies would ride on user B's request), no decompression (bytes go through
as they came), no automatic ``User-Agent``/``Accept``/``Content-Type``, raw
headers read from ``raw_headers`` so repeated ``Set-Cookie`` lines survive.

Every aiohttp error is translated here into the project's own
`UpstreamError` tree, with ``sent`` telling whether the request may have
reached the backend. Nothing outside this module imports aiohttp.

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

__all__ = [
    "HOP_BY_HOP",
    "Forwarding",
    "Pool",
    "UpstreamPool",
    "UpstreamResponse",
    "clean_response_headers",
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
}
_RESPONSE_DROP = HOP_BY_HOP | {b"x-request-id"}

_CHUNK = 64 * 1024


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
    host: str,
    peer: str | None,
    scheme: str,
    request_id: str,
    forwarding: Forwarding,
) -> list[tuple[str, str]]:
    """The headers sent upstream: hygiene, Host, X-Forwarded-*, X-Request-ID, Via.

    ``host`` is the Host value to send (the backend's, or the client's when the
    route preserves it).
    """
    trusted = forwarding.is_trusted(peer)
    conn = _connection_tokens(headers) if any(n == b"connection" for n, _ in headers) else ()
    out: list[tuple[str, str]] = [("Host", host)]
    xff: str | None = None
    xfp: str | None = None
    xfh: str | None = None
    client_host: str | None = None
    for name, value in headers:
        if name in _REQUEST_DROP or name in conn:
            if trusted:
                if name == b"x-forwarded-for":
                    xff = (
                        value.decode("latin-1")
                        if xff is None
                        else f"{xff}, {value.decode('latin-1')}"
                    )
                elif name == b"x-forwarded-proto":
                    xfp = value.decode("latin-1")
                elif name == b"x-forwarded-host":
                    xfh = value.decode("latin-1")
            if name == b"host":
                client_host = value.decode("latin-1")
            continue
        out.append((name.decode("latin-1"), value.decode("latin-1")))
    if peer:
        xff = f"{xff}, {peer}" if xff else peer
    if xff:
        out.append(("X-Forwarded-For", xff))
    out.append(("X-Forwarded-Proto", xfp or scheme))
    if xfh or client_host:
        out.append(("X-Forwarded-Host", xfh or client_host or ""))
    out.append(("X-Request-ID", request_id))
    return out


def clean_response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Upstream response headers minus hop-by-hop and the backend's request id."""
    raw = list(raw)
    conn = _connection_tokens(raw)
    out: list[tuple[bytes, bytes]] = []
    for name, value in raw:
        lname = name.lower()
        if lname in _RESPONSE_DROP or lname in conn:
            continue
        out.append((lname, value))
    return out


class UpstreamResponse(Protocol):
    status: int
    headers: list[tuple[bytes, bytes]]

    async def read_chunk(self) -> bytes:
        """The next body chunk; ``b""`` at the end."""
        ...

    def at_eof(self) -> bool:
        """Whether the whole body has been read (the last chunk needs no extra read)."""
        ...

    def release(self) -> None:
        """Return the connection to the pool (or close it if the body is not done)."""
        ...


class Pool(Protocol):
    name: str
    host_header: str
    inflight: int

    async def start(self) -> None: ...

    async def send(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: AsyncIterable[bytes] | bytes | None,
    ) -> UpstreamResponse: ...

    async def close(self) -> None: ...


class _AiohttpResponse:
    __slots__ = ("status", "headers", "_resp", "_backend", "_pool")

    def __init__(self, resp: aiohttp.ClientResponse, backend: str, pool: UpstreamPool) -> None:
        self._resp = resp
        self._backend = backend
        self._pool = pool
        self.status = resp.status
        self.headers = clean_response_headers(resp.raw_headers)

    async def read_chunk(self) -> bytes:
        try:
            return await self._resp.content.readany()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _map_error(exc, self._backend, sent=True) from exc

    def at_eof(self) -> bool:
        return self._resp.content.at_eof()

    def release(self) -> None:
        resp, self._resp = self._resp, None  # type: ignore[assignment]
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
    """Wraps a streamed request body to learn whether the request may have left.

    aiohttp holds the request head back until the first body chunk, or until
    the end of the body when there is none, and sends them together.
    """

    __slots__ = ("source", "started")

    def __init__(self, source: AsyncIterable[bytes]) -> None:
        self.source = source
        self.started = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.source:
            self.started = True
            yield chunk
        self.started = True  # an empty body: the head goes out with the end of the body


class UpstreamPool:
    """A pooled aiohttp client for one backend. Create it anywhere; `start` it
    inside the running loop; `close` it on shutdown (or when a reload retired
    it and its last in-flight request finished)."""

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
        self.host_header = parsed.raw_host or ""
        if parsed.explicit_port:
            self.host_header += f":{parsed.port}"
        self._base_path = parsed.raw_path.rstrip("/")
        self._origin = str(parsed.origin())
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.pool_size = pool_size
        self.keepalive = keepalive
        self.inflight = 0
        self._retired = False
        self._session: aiohttp.ClientSession | None = None
        self._closing: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (
            f"UpstreamPool({self.name!r}, {self.url!r}, connect={self.connect_timeout}, "
            f"read={self.read_timeout}, pool_size={self.pool_size})"
        )

    def same_settings(self, other: UpstreamPool) -> bool:
        return (
            self.url,
            self.connect_timeout,
            self.read_timeout,
            self.pool_size,
            self.keepalive,
        ) == (
            other.url,
            other.connect_timeout,
            other.read_timeout,
            other.pool_size,
            other.keepalive,
        )

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
        headers: list[tuple[str, str]],
        body: AsyncIterable[bytes] | bytes | None,
    ) -> UpstreamResponse:
        session = self._session
        if session is None:
            raise UpstreamConnectError(f"backend {self.name} is not started", backend=self.name)
        url = URL(self._origin + self._base_path + target, encoded=True)
        tracker = _BodyTracker(body) if body is not None and not isinstance(body, bytes) else None
        self.inflight += 1
        try:
            resp = await session.request(
                method,
                url,
                headers=headers,
                data=tracker if tracker is not None else body,
                allow_redirects=False,
                compress=None,
            )
        except asyncio.CancelledError:
            self._done()
            raise
        except Exception as exc:
            self._done()
            sent = tracker.started if tracker is not None else True
            if isinstance(body, bytes) or body is None:
                # Without a streamed body we cannot tell whether the head went out; be safe.
                sent = not isinstance(
                    exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError
                )
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
