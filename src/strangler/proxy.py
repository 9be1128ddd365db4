"""The proxy port: a raw ASGI app, one request read top to bottom.

`ProxyApp.handle` is the spine of the gateway::

    read headers once: request id, limits, host, body framing
    normalize the path                      (routing.normalize_path)
    snapshot = runtime.current              (immutable; swapped on reload)
    route = snapshot.table.match(...)       (first match in file order)
    backend = route.choose(...)             (override → sticky bucket → weights)
    GET/HEAD on a caching route             (cache hit → answer; miss → fill, once per key)
    call the backend                        (breaker, retries, deadline; fallback)
    stream the response back                (an unsafe method first invalidates the cache)
    hand a copy to the shadower             (after the client has its answer)
    record metrics and the access log

Starlette's Request/Response objects cost about a third of the throughput
here, so this module speaks ASGI directly. It never buffers a whole body:
request bodies stream to the backend (small ones with a known length are
read first, which is cheaper), response bodies stream to the client.

Edge cases handled on purpose: a client that disconnects mid-download stops
the upstream read (uvicorn's ``send`` silently drops writes after a
disconnect, so a watcher task listens for ``http.disconnect``); an upstream
that fails after the response started cannot change the status any more, so
the connection is closed without completing the body and the client sees a
truncated response rather than a wrong one.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, NamedTuple

from strangler import metrics, tasks
from strangler.cache import (
    Entry,
    Flight,
    Freshness,
    RequestInfo,
    RoutePolicy,
    is_unsafe,
    not_modified_headers,
)
from strangler.diff import Captured
from strangler.exceptions import CircuitOpen, UpstreamError
from strangler.routing import BadPath, CompiledRoute, normalize_path
from strangler.runtime import Runtime, Snapshot
from strangler.shadow import Job, Shadower, ShadowPolicy, Tee
from strangler.upstream import UpstreamResponse, build_request_headers, clean_response_headers

__all__ = ["ProxyApp"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("strangler.access")

HEALTH_PATH = b"/__strangler/healthz"
_SMALL_BODY = 64 * 1024
_VIA = (b"via", b"1.1 strangler")
_JSON = (b"content-type", b"application/json")
_CONDITIONAL = frozenset({b"if-none-match", b"if-modified-since", b"if-match", b"if-range"})
_STALE = (b"warning", b'110 - "Response is Stale"')
_REVALIDATION_FAILED = (b"warning", b'111 - "Revalidation Failed"')


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


#: 64 random bits per process (seeded from os.urandom), then a counter: unique across
#: processes and replicas, and cheaper than random bits per request.
_ID_PREFIX = f"{random.Random().getrandbits(64):016x}"
_id_counter = itertools.count(random.Random().getrandbits(32))


def _new_request_id() -> str:
    """32 hex digits, without the getrandbits (or os.urandom syscall) per request."""
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


def _valid_request_id(value: bytes) -> bool:
    return 0 < len(value) <= 200 and all(0x21 <= b <= 0x7E for b in value)


_hostnames: dict[bytes, str] = {}


def _hostname(host: bytes) -> str:
    """``Example.COM:8080`` → ``example.com``; ``[::1]:80`` → ``[::1]``.
    Remembered for the few hosts a gateway sees (bounded)."""
    name = _hostnames.get(host)
    if name is None:
        if len(_hostnames) >= 1024:
            _hostnames.clear()
        name = _hostnames[host] = _parse_hostname(host)
    return name


def _parse_hostname(host: bytes) -> str:
    h = host.decode("latin-1").lower()
    if h.startswith("["):
        end = h.find("]")
        return h[: end + 1] if end != -1 else h
    colon = h.rfind(":")
    return h[:colon] if colon != -1 else h


async def _read_up_to(receive: Receive, bound: int) -> tuple[list[bytes], int, bool]:
    """Read body messages until the end or past ``bound`` bytes.

    Returns the chunks, their total size and whether the body ended (the
    message that crosses ``bound`` may also be the last one: then the body
    ended, and nothing more may be awaited from ``receive``).
    """
    parts: list[bytes] = []
    received = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = msg.get("body", b"")
        if chunk:
            received += len(chunk)
            parts.append(chunk)
        ended = not msg.get("more_body", False)
        if ended or received > bound:
            return parts, received, ended


async def _read_small_body(receive: Receive, length: int) -> bytes:
    parts, received, ended = await _read_up_to(receive, length)
    if not ended or received > length:
        raise _BodyTooLarge()
    return b"".join(parts)


class _StreamedBody:
    """The request body as an async iterator, enforcing the size limit.

    ``prefix`` holds chunks already read (while trying to buffer the body for
    retries); they are yielded first. ``started`` tells whether any byte was
    handed to a backend, after which the body cannot go anywhere else.
    """

    __slots__ = (
        "receive",
        "limit",
        "prefix",
        "received",
        "too_large",
        "client_gone",
        "done",
        "started",
    )

    def __init__(
        self, receive: Receive, limit: int, prefix: list[bytes] | None = None, received: int = 0
    ) -> None:
        self.receive = receive
        self.limit = limit
        self.prefix = prefix or []
        self.received = received
        self.too_large = False
        self.client_gone = False
        self.done = False
        self.started = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        for chunk in self.prefix:
            yield chunk
        self.prefix = []
        while True:
            msg = await self.receive()
            if msg["type"] == "http.disconnect":
                self.client_gone = True
                raise _ClientGone()
            chunk = msg.get("body", b"")
            if chunk:
                self.received += len(chunk)
                if self.received > self.limit:
                    self.too_large = True
                    raise _BodyTooLarge()
                yield chunk
            if not msg.get("more_body", False):
                self.done = True
                return


async def _request_body(
    receive: Receive,
    content_length: bytes | None,
    length: int,
    chunked: bool,
    limit: int,
    replay_bytes: int,
) -> bytes | _StreamedBody | None:
    """The request body as bytes when it is small or must be replayable
    (retries, fallback: up to ``replay_bytes``), else as a stream.

    A chunked body is read up to ``replay_bytes``; if it goes on past that,
    what was read becomes the prefix of the stream and the body is not
    replayable (one that ended just past it is returned whole as bytes, and
    `_replayable` still keeps it from being retried).
    """
    if not chunked:
        if content_length is None:
            return None
        if length <= max(_SMALL_BODY, replay_bytes):
            return await _read_small_body(receive, length)
        return _StreamedBody(receive, limit)
    if replay_bytes <= 0:
        return _StreamedBody(receive, limit)
    parts, received, ended = await _read_up_to(receive, replay_bytes)
    if received > limit:
        raise _BodyTooLarge()
    if ended:  # whole, though possibly past replay_bytes (then never retried)
        return b"".join(parts)
    return _StreamedBody(receive, limit, parts, received)


def _may_fall_back(fallback: str, backend: str, body: bytes | _StreamedBody | None) -> bool:
    """The fallback differs, and the body can still be sent to it."""
    if fallback == backend:
        return False
    return not isinstance(body, _StreamedBody) or not body.started


def _replayable(body: bytes | _StreamedBody | None, buffer_bytes: int) -> bool:
    """Can the body be sent again? Only a buffered one within ``buffer_bytes``
    (small bodies are read whole for speed, but retrying them is bounded the same)."""
    if isinstance(body, _StreamedBody):
        return False
    return body is None or len(body) <= buffer_bytes


def _raise_if_client_side(body: bytes | _StreamedBody | None) -> None:
    """An upstream failure that was really the client's: too large, or gone."""
    if isinstance(body, _StreamedBody):
        if body.too_large:
            raise _BodyTooLarge()
        if body.client_gone:
            raise _ClientGone()


async def _watch_disconnect(receive: Receive) -> None:
    """Returns when the client disconnects (or the response completes)."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


class _CacheableRequest(NamedTuple):
    """What the cache path needs of one GET/HEAD request on a caching route
    (a tuple: made on every such request, it must be cheap to make)."""

    scope: Scope
    method: str
    path: str
    raw_host: bytes
    host: str
    query: bytes
    target: str
    headers: list[tuple[bytes, bytes]]
    peer: str | None
    route: CompiledRoute
    backend: str
    request_id: str
    started: float
    receive: Receive
    #: A stale-while-revalidate refresh: no client, no request metrics.
    background: bool = False

    def for_refresh(self) -> _CacheableRequest:
        return self._replace(receive=_never_disconnects, background=True)

    def upstream_headers(self, snap: Snapshot, info: RequestInfo) -> list[tuple[bytes, bytes]]:
        """The headers to send the backend, without the client's conditionals
        (the cache makes its own, and answers the client's itself)."""
        pool = snap.pools[self.backend]
        headers = build_request_headers(
            self.headers,
            host=self.raw_host if self.route.preserve_host and self.raw_host else pool.host_header,
            peer=self.peer,
            scheme=self.scope.get("scheme", "http"),
            request_id=self.request_id.encode(),
            forwarding=snap.forwarding,
        )
        if not info.conditional:
            return headers
        return [(n, v) for n, v in headers if n not in _CONDITIONAL]


async def _never_disconnects() -> Message:
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


async def _discard(message: Message) -> None:
    """``send`` for a background refresh: nobody is waiting for the answer."""


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int:
    """The Content-Length of a response: 0 without one (read to find out),
    unbounded when it is not a number."""
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return sys.maxsize
    return 0


async def _read_body(
    resp: UpstreamResponse, bound: int, parts: list[bytes]
) -> tuple[list[bytes], bool]:
    """Read the rest of the response body (``parts`` has what was read so far)
    up to ``bound`` bytes in all: (chunks, complete)."""
    size = sum(map(len, parts))
    if size > bound:
        return parts, False
    while not resp.at_eof():
        chunk = await resp.read_chunk()
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
        if size > bound:
            return parts, False
    return parts, True


def _same_origin_target(url: str, host: str) -> tuple[str, bytes] | None:
    """(path, query) of a Location on the request's own host, else None."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme and parts.scheme not in ("http", "https"):
        return None
    if parts.netloc and _hostname(parts.netloc.encode("latin-1")) != host:
        return None
    if not parts.path.startswith("/"):
        return None
    try:
        norm = normalize_path(parts.path.encode("latin-1"))
    except (BadPath, UnicodeError):
        return None
    return norm.path, parts.query.encode("latin-1")


class ProxyApp:
    """The ASGI callable for the proxy port."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.draining = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.handle(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        # websockets are not proxied; returning closes them with 403

    # --------------------------------------------------------------- the spine

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        if raw_path == HEALTH_PATH:
            await self._health(send)
            return

        snap = self.runtime.current
        method: str = scope["method"]
        headers: list[tuple[bytes, bytes]] = scope["headers"]

        # 1. Read the headers once: request id, limits, host, body framing.
        request_id: str | None = None
        host = b""
        content_length: bytes | None = None
        chunked = False
        override: str | None = None
        xff: bytes | None = None
        header_bytes = 0
        for name, value in headers:
            header_bytes += len(name) + len(value) + 4
            if name == b"host":
                host = value
            elif name == b"content-length":
                content_length = value
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"x-request-id":
                if _valid_request_id(value):
                    request_id = value.decode("ascii")
            elif name == b"x-forwarded-for":
                xff = value if xff is None else xff + b", " + value
            elif name == b"x-strangler-backend":
                override = value.decode("latin-1")
        if request_id is None:
            request_id = _new_request_id()
        rid = request_id.encode()
        if len(headers) > snap.max_header_count or header_bytes > snap.max_header_bytes:
            await self._reject(
                send, 431, "headers_too_large", "request headers too large", request_id
            )
            return
        length = 0
        if content_length is not None:
            try:
                length = int(content_length)
                if length < 0:
                    raise ValueError
            except ValueError:
                await self._reject(send, 400, "bad_request", "invalid Content-Length", request_id)
                return
            if length > snap.max_body_bytes:
                await self._reject(
                    send, 413, "body_too_large", "request body too large", request_id
                )
                return

        # 2. Normalize the path.
        try:
            norm = normalize_path(raw_path)
        except BadPath as exc:
            await self._reject(send, 400, "bad_path", str(exc), request_id)
            return
        path = norm.path

        # 3. Match a route on the snapshot this request started with.
        hostname = _hostname(host)
        route = snap.table.match(method, hostname, path, headers)
        if route is None:
            await self._reject(
                send, 404, "no_route", f"no route matches {method} {path}", request_id
            )
            return
        if norm.encoded_slash and not route.allow_encoded_slash:
            await self._reject(
                send, 400, "bad_path", "encoded slash or backslash in path", request_id
            )
            return

        # 4. Choose the backend.
        peer = scope["client"][0] if scope.get("client") else None
        client_ip = snap.forwarding.client_ip(peer, xff)
        backend = route.choose(headers, client_ip, override)
        pool = snap.pools[backend]

        query: bytes = scope.get("query_string", b"")
        target = route.rewrite(path)
        if query:
            target = f"{target}?{query.decode('latin-1')}"

        # 5a. GET/HEAD on a caching route: answer from the cache, or fill it.
        cache_policy = snap.caches.get(route.name) if snap.caches else None
        if (
            cache_policy is not None
            and (method == "GET" or method == "HEAD")
            and content_length is None
            and not chunked
        ):
            request = _CacheableRequest(
                scope, method, path, host, hostname, query, target, headers, peer, route,
                backend, request_id, started, receive,
            )  # fmt: skip
            if await self._cached(snap, cache_policy, request, send):
                return

        upstream_headers = build_request_headers(
            headers,
            host=host if route.preserve_host and host else pool.host_header,
            peer=peer,
            scheme=scope.get("scheme", "http"),
            request_id=rid,
            forwarding=snap.forwarding,
        )

        # 5b. Call it under breaker, retries and deadline; fall back when allowed.
        # A request copied to a shadow backend keeps its body (up to a bound).
        policy = snap.policies[(route.name, backend)]
        replay = policy.buffer_bytes if policy.retries or route.fallback else 0
        shadow = snap.shadows.get(route.name) if snap.shadows else None
        if shadow is not None and not shadow.wants(method, backend):
            shadow = None
        if shadow is not None:
            replay = max(replay, shadow.max_body_bytes)
        try:
            body = await _request_body(
                receive, content_length, length, chunked, snap.max_body_bytes, replay
            )
        except _BodyTooLarge:
            if chunked:
                await self._reject(
                    send, 413, "body_too_large", "request body too large", request_id
                )
            else:
                await self._reject(
                    send, 400, "bad_request", "body longer than Content-Length", request_id
                )
            return
        except _ClientGone:
            return

        served_by = backend
        metrics.IN_FLIGHT.value += 1
        status = 502
        try:
            try:
                resp, served_by, fallback_reason = await self._call(
                    snap, route, backend, method, target, upstream_headers, body
                )
            except _BodyTooLarge:
                status = 413
                await self._reject(
                    send, 413, "body_too_large", "request body too large", request_id
                )
                return
            except _ClientGone:
                status = 499
                return
            except UpstreamError as exc:
                status, served_by = exc.status, exc.backend
                # An open breaker is logged once, when it opens, not per request.
                logger.log(
                    logging.DEBUG if isinstance(exc, CircuitOpen) else logging.WARNING,
                    "upstream %s failed for %s %s [%s]: %s",
                    exc.backend,
                    method,
                    path,
                    request_id,
                    exc,
                )
                await self._error(send, exc, request_id, route.name if snap.debug_headers else None)
                if shadow is not None:
                    Shadower.skip(route.name, "primary_failed")
                return

            # 6. Stream the response back (a successful unsafe method first
            # invalidates what the cache holds for its URI).
            status = resp.status
            if snap.caches and is_unsafe(method) and status < 400:
                await self._invalidate(snap, hostname, path, query, resp.headers, headers)
            out_headers = clean_response_headers(resp.headers)
            tee = None
            if shadow is not None:
                primary_headers = tuple(out_headers)
                tee = Tee(shadow.max_response_bytes)
            out_headers.append((b"x-request-id", rid))
            out_headers.append(_VIA)
            if fallback_reason is not None:
                out_headers.append((b"x-strangler-fallback", fallback_reason.encode()))
            if snap.debug_headers:
                out_headers.append((b"x-strangler-route", route.name.encode()))
                out_headers.append((b"x-strangler-backend", served_by.encode()))
            status = await self._stream(
                resp, status, out_headers, method, receive, send, body, None, tee
            )

            # 7. After the client has its answer: hand a copy to the shadower.
            if shadow is not None and tee is not None:
                self._shadow(
                    snap, shadow, route, served_by, method, path, target, upstream_headers,
                    body, resp.status, status, primary_headers, tee,
                )  # fmt: skip
        finally:
            metrics.IN_FLIGHT.value -= 1
            elapsed = time.perf_counter() - started
            metrics.children(route.name, served_by).observe(status, elapsed)
            if snap.access_log:
                self._log_access(
                    scope, method, path, route.name, served_by, status, elapsed, request_id
                )

    async def _call(
        self,
        snap: Snapshot,
        route: CompiledRoute,
        backend: str,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | _StreamedBody | None,
    ) -> tuple[UpstreamResponse, str, str | None]:
        """The chosen backend under its guard, else the route's fallback.

        Falls back on an open breaker, a connect error, a timeout or a 5xx
        after retries: for the route's idempotent methods (``retry.methods``),
        and for any method when the request never reached the backend. Returns
        (response, backend that served it, fallback reason); raises the
        `UpstreamError` to answer with, or `_BodyTooLarge` / `_ClientGone`
        when the failure was the client's.
        """
        policy = snap.policies[(route.name, backend)]
        fallback = route.fallback
        try:
            resp = await snap.guards[backend].call(
                snap.pools[backend],
                policy,
                method,
                target,
                headers,
                body,
                replayable=_replayable(body, policy.buffer_bytes),
            )
        except UpstreamError as exc:
            _raise_if_client_side(body)
            metrics.UPSTREAM_ERRORS.labels(backend, exc.kind).inc()
            if fallback is None or not _may_fall_back(fallback, backend, body):
                raise
            if exc.sent and method not in policy.methods:
                raise
            reason = exc.kind
        else:
            if (
                resp.status < 500
                or fallback is None
                or method not in policy.methods
                or not _may_fall_back(fallback, backend, body)
            ):
                return resp, backend, None
            resp.release()
            reason = "status_5xx"

        # Serve it from the fallback backend instead.
        snap.guards[backend].count_fallback(reason)
        metrics.FALLBACKS.labels(route.name, reason).inc()
        pool = snap.pools[fallback]
        if not route.preserve_host:
            headers = [(b"host", pool.host_header), *headers[1:]]
        fallback_policy = snap.policies[(route.name, fallback)]
        try:
            resp = await snap.guards[fallback].call(
                pool,
                fallback_policy,
                method,
                target,
                headers,
                body,
                replayable=_replayable(body, fallback_policy.buffer_bytes),
            )
        except UpstreamError as exc:
            _raise_if_client_side(body)
            metrics.UPSTREAM_ERRORS.labels(fallback, exc.kind).inc()
            raise
        return resp, fallback, reason

    def _shadow(
        self,
        snap: Snapshot,
        shadow: ShadowPolicy,
        route: CompiledRoute,
        served_by: str,
        method: str,
        path: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | _StreamedBody | None,
        upstream_status: int,
        status: int,
        primary_headers: tuple[tuple[bytes, bytes], ...],
        tee: Tee,
    ) -> None:
        """Queue the copy of a request whose primary answer is complete."""
        if status != upstream_status:  # the client went away, or the body broke off
            Shadower.skip(route.name, "incomplete")
            return
        if isinstance(body, _StreamedBody) or (
            body is not None and len(body) > shadow.max_body_bytes
        ):
            Shadower.skip(route.name, "body_too_large")
            return
        if served_by == shadow.backend:  # the fallback was the shadow backend
            Shadower.skip(route.name, "same_backend")
            return
        primary = Captured(upstream_status, primary_headers, tee.body(), tee.truncated)
        self.runtime.shadower.submit(
            Job(
                route.name,
                served_by,
                method,
                path,
                target,
                headers,
                body,
                primary,
                route.preserve_host,
            )  # fmt: skip
        )

    async def _stream(
        self,
        resp: UpstreamResponse,
        status: int,
        headers: list[tuple[bytes, bytes]],
        method: str,
        receive: Receive,
        send: Send,
        body: bytes | _StreamedBody | None,
        prefix: list[bytes] | None = None,
        tee: Tee | None = None,
    ) -> int:
        """Send the upstream response to the client; returns the status to record.
        ``prefix`` holds body chunks already read (by the cache); ``tee`` keeps
        a bounded copy of the body (for shadow comparison)."""
        watcher: asyncio.Task[None] | None = None
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            if method == "HEAD" or status in (204, 304):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return status
            if prefix:
                last = resp.at_eof()
                for i, chunk in enumerate(prefix):
                    if tee is not None:
                        tee.add(chunk)
                    more = not last or i < len(prefix) - 1
                    await send({"type": "http.response.body", "body": chunk, "more_body": more})
                if last:
                    return status
            while True:
                # Each chunk goes out as soon as it arrives (never held back
                # for the next one: streamed responses such as server-sent
                # events must not lag); the last is marked without an extra read.
                chunk = await resp.read_chunk()
                if tee is not None:
                    tee.add(chunk)
                if not chunk or resp.at_eof():
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    return status
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if watcher is None:
                    if not isinstance(body, _StreamedBody) or body.done:
                        # A long body: start listening for the client going away.
                        watcher = tasks.spawn(_watch_disconnect(receive), name="disconnect-watcher")
                elif watcher.done():
                    return 499
        except UpstreamError as exc:
            metrics.UPSTREAM_ERRORS.labels(exc.backend, exc.kind).inc()
            logger.warning("upstream failed mid-response, closing the client connection: %s", exc)
            return 502
        finally:
            if watcher is not None:
                watcher.cancel()
            # On an early return the body is unfinished and uvicorn closes the
            # connection: the client sees a truncated response, never a
            # complete-looking wrong one.
            resp.release()

    # ------------------------------------------------------------------ cache

    async def _cached(
        self, snap: Snapshot, policy: RoutePolicy, req: _CacheableRequest, send: Send
    ) -> bool:
        """Serve a GET/HEAD on a caching route from the cache, or fill it.

        Returns False when the cache stays out of it and the caller proxies
        as usual: Range requests, ``Cache-Control: no-store``, HEAD misses,
        and a miss whose fill by another request of this process gave
        nothing usable within ``lock_timeout``.
        """
        cache = self.runtime.cache
        info = RequestInfo.read(req.headers)
        route = req.route.name
        if info.range or info.control.has("no-store"):
            metrics.tally(metrics.CACHE_REQUESTS, route, "bypass")
            return False
        now = time.time()
        key = policy.key(cache.prefix, req.backend, req.host, req.path, req.query)
        entries = cache.memory.get(key, now)
        if entries is None and cache.shared is not None:
            entries = await cache.lookup_shared(key, now)
        entry = policy.select(entries, req.headers) if entries else None
        if entry is not None and info.authorization and not policy.usable_with_authorization(entry):
            entry = None
        fresh: Freshness | None = None
        if entry is not None:
            fresh = policy.freshness(entry, info, now)
            if fresh.fresh or fresh.serve_stale:
                outcome, warning = "HIT", None
                if fresh.fresh:
                    policy.hits.n += 1
                else:  # stale-while-revalidate: refresh once, in the background
                    outcome, warning = "STALE", _STALE
                    metrics.tally(metrics.CACHE_REQUESTS, route, "stale")
                    metrics.tally(metrics.CACHE_STALE, route, "while_revalidate")
                    if cache.flight(key) is None:
                        refresh = self._fill(
                            snap, policy, req.for_refresh(), info, key, cache.begin_flight(key),
                            entry, Freshness(False, fresh.age), _discard,
                        )  # fmt: skip
                        tasks.spawn(refresh, name="cache-refresh")
                status = await self._serve_entry(
                    snap, req, info, entry, fresh.age, outcome, send, warning
                )
                self._finish(snap, req, entry.backend, status)
                return True
        if info.control.directives and info.control.has("only-if-cached"):
            policy.misses.n += 1
            await self._reject(send, 504, "not_cached", "not in the cache", req.request_id)
            return True
        if req.method == "HEAD" and entry is None:
            policy.misses.n += 1
            return False

        # Another request of this process is filling the entry: wait for it.
        flight = cache.flight(key)
        if flight is None:
            await self._fill(
                snap, policy, req, info, key, cache.begin_flight(key), entry, fresh, send
            )
            return True
        try:
            got = await asyncio.wait_for(asyncio.shield(flight.wait()), policy.lock_timeout)
        except TimeoutError:
            got = None
        if (
            got is not None
            and policy.select([got], req.headers) is not None
            and (not info.authorization or policy.usable_with_authorization(got))
        ):
            metrics.tally(metrics.CACHE_COALESCED, route, "served")
            policy.hits.n += 1
            status = await self._serve_entry(
                snap, req, info, got, got.age(time.time()), "HIT", send
            )
            self._finish(snap, req, got.backend, status)
            return True
        metrics.tally(metrics.CACHE_COALESCED, route, "gave_up")
        policy.misses.n += 1
        return False

    async def _fill(
        self,
        snap: Snapshot,
        policy: RoutePolicy,
        req: _CacheableRequest,
        info: RequestInfo,
        key: str,
        flight: Flight,
        stale: Entry | None,
        fresh: Freshness | None,
        send: Send,
    ) -> None:
        """Fetch the response (conditionally when a stale entry has validators),
        store it, and answer: the one request of this process that does, for
        ``flight``'s key."""
        cache = self.runtime.cache
        route = req.route.name
        stored: Entry | None = None
        locked = False
        served_by = req.backend
        status = 502
        if not req.background:
            metrics.IN_FLIGHT.value += 1
        try:
            if stale is None and cache.shared is not None:
                # A cold key: across replicas, one fetches and the others wait.
                locked = await cache.fill_lock(key, policy.lock_timeout)
                if not locked:
                    entries = await cache.wait_for_fill(key, policy.lock_timeout, time.time)
                    got = policy.select(entries, req.headers)
                    if got is not None and policy.freshness(got, info, time.time()).fresh:
                        stored = got
                        metrics.tally(metrics.CACHE_COALESCED, route, "served")
                        policy.hits.n += 1
                        served_by = got.backend
                        status = await self._serve_entry(
                            snap, req, info, got, got.age(time.time()), "HIT", send
                        )
                        return
            headers = req.upstream_headers(snap, info)
            if stale is not None:
                if stale.etag is not None:
                    headers.append((b"if-none-match", stale.etag))
                if stale.last_modified is not None:
                    headers.append((b"if-modified-since", stale.last_modified))
            request_time = time.time()
            try:
                resp, served_by, fallback_reason = await self._call(
                    snap, req.route, req.backend, req.method, req.target, headers, None
                )
            except UpstreamError as exc:
                served_by = exc.backend
                status = await self._fill_failed(snap, req, info, stale, fresh, exc, send)
                return
            response_time = time.time()
            if stale is not None and fresh is not None and fresh.stale_on_error:
                if resp.status >= 500:
                    resp.release()
                    status = await self._serve_stale_on_error(snap, req, info, stale, send)
                    return
            out_headers = clean_response_headers(resp.headers)
            if resp.status == 304 and stale is not None:
                resp.release()
                stored = policy.refreshed(stale, out_headers, request_time, response_time)
                cache.store(key, route, stored)
                metrics.tally(metrics.CACHE_REQUESTS, route, "revalidated")
                status = await self._serve_entry(
                    snap, req, info, stored, stored.age(time.time()), "REVALIDATED", send
                )
                return
            status = resp.status
            prefix: list[bytes] = []
            complete = False
            if req.method == "GET":
                bound = policy.max_object_bytes
                try:
                    # Usually the whole (small) body has arrived with the head.
                    body = await resp.read_chunk()
                    if resp.at_eof() and len(body) <= bound:
                        complete = True
                    elif _declared_length(out_headers) > bound:
                        prefix = [body]
                    else:
                        prefix, complete = await _read_body(resp, bound, [body])
                        if complete:
                            body = b"".join(prefix)
                except UpstreamError as exc:  # the body broke off; nothing was sent yet
                    resp.release()
                    served_by = exc.backend
                    metrics.UPSTREAM_ERRORS.labels(exc.backend, exc.kind).inc()
                    status = await self._fill_failed(snap, req, info, stale, fresh, exc, send)
                    return
                if not complete:
                    metrics.tally(metrics.CACHE_NOT_STORED, route, "too_large")
                else:
                    built = policy.build_entry(
                        status=status,
                        headers=out_headers,
                        body=body,
                        request_headers=req.headers,
                        request=info,
                        request_time=request_time,
                        response_time=response_time,
                        backend=served_by,
                    )
                    if isinstance(built, Entry):
                        stored = built
                        if served_by == req.backend:
                            cache.store(key, route, built)
                        else:  # the fallback answered: its own key
                            own = policy.key(cache.prefix, served_by, req.host, req.path, req.query)
                            cache.store(own, route, built)
                    else:
                        metrics.tally(metrics.CACHE_NOT_STORED, route, built)
                    if status in (204, 304):
                        body = b""  # no body, whatever the backend sent
            if not req.background:
                policy.misses.n += 1
            self._decorate(snap, req, out_headers, served_by, "MISS", fallback_reason)
            if complete:  # the whole body is in hand: answer with it, the connection is free
                resp.release()
                start = {"type": "http.response.start", "status": status, "headers": out_headers}
                await send(start)
                await send({"type": "http.response.body", "body": body, "more_body": False})
            else:
                status = await self._stream(
                    resp, status, out_headers, req.method, req.receive, send, None, prefix
                )
        finally:
            cache.end_flight(key, flight, stored)
            if locked:
                tasks.spawn(cache.release_lock(key), name="cache-unlock")
            if not req.background:
                metrics.IN_FLIGHT.value -= 1
            self._finish(snap, req, served_by, status)

    async def _fill_failed(
        self,
        snap: Snapshot,
        req: _CacheableRequest,
        info: RequestInfo,
        stale: Entry | None,
        fresh: Freshness | None,
        exc: UpstreamError,
        send: Send,
    ) -> int:
        """A fill failed before anything was sent: the stale entry when
        stale-if-error allows it, else the error (a miss)."""
        if stale is not None and fresh is not None and fresh.stale_on_error:
            return await self._serve_stale_on_error(snap, req, info, stale, send)
        route = req.route.name
        metrics.tally(metrics.CACHE_REQUESTS, route, "miss")  # not on the hot path
        await self._error(send, exc, req.request_id, route if snap.debug_headers else None)
        return exc.status

    async def _serve_stale_on_error(
        self,
        snap: Snapshot,
        req: _CacheableRequest,
        info: RequestInfo,
        entry: Entry,
        send: Send,
    ) -> int:
        route = req.route.name
        metrics.tally(metrics.CACHE_REQUESTS, route, "stale")
        metrics.tally(metrics.CACHE_STALE, route, "if_error")
        return await self._serve_entry(
            snap, req, info, entry, entry.age(time.time()), "STALE", send, _REVALIDATION_FAILED
        )

    async def _serve_entry(
        self,
        snap: Snapshot,
        req: _CacheableRequest,
        info: RequestInfo,
        entry: Entry,
        age: float,
        outcome: str,
        send: Send,
        warning: tuple[bytes, bytes] | None = None,
    ) -> int:
        """Answer from a stored entry, with its Age (and a 304 when the
        client's conditional headers match it)."""
        status = entry.status
        if info.not_modified(entry):
            status = 304
            headers = not_modified_headers(entry)
        else:
            headers = entry.header_list()
        headers.append((b"age", b"%d" % age))
        if warning is not None:
            headers.append(warning)
        self._decorate(snap, req, headers, entry.backend, outcome, None)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        body = b"" if req.method == "HEAD" or status == 304 else entry.body
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return status

    @staticmethod
    def _decorate(
        snap: Snapshot,
        req: _CacheableRequest,
        headers: list[tuple[bytes, bytes]],
        backend: str,
        outcome: str,
        fallback_reason: str | None,
    ) -> None:
        headers.append((b"x-request-id", req.request_id.encode()))
        headers.append(_VIA)
        if fallback_reason is not None:
            headers.append((b"x-strangler-fallback", fallback_reason.encode()))
        if snap.debug_headers:
            headers.append((b"x-strangler-cache", outcome.encode()))
            headers.append((b"x-strangler-route", req.route.name.encode()))
            headers.append((b"x-strangler-backend", backend.encode()))

    def _finish(self, snap: Snapshot, req: _CacheableRequest, backend: str, status: int) -> None:
        """Metrics and access log of a request the cache path answered."""
        if req.background:
            return
        elapsed = time.perf_counter() - req.started
        metrics.children(req.route.name, backend).observe(status, elapsed)
        if snap.access_log:
            self._log_access(
                req.scope, req.method, req.path, req.route.name, backend, status, elapsed,
                req.request_id,
            )  # fmt: skip

    async def _invalidate(
        self,
        snap: Snapshot,
        host: str,
        path: str,
        query: bytes,
        response_headers: list[tuple[bytes, bytes]],
        request_headers: list[tuple[bytes, bytes]],
    ) -> None:
        """A successful unsafe method: forget the stored responses for its URI
        and for a same-origin Location / Content-Location (RFC 9111 §4.4)."""
        targets = [(path, query)]
        for name, value in response_headers:
            lname = name.lower()
            if lname == b"location" or lname == b"content-location":
                same = _same_origin_target(value.decode("latin-1"), host)
                if same is not None:
                    targets.append(same)
        cache = self.runtime.cache
        for tpath, tquery in targets:
            route = snap.table.match("GET", host, tpath, request_headers)
            if route is None:
                continue
            policy = snap.caches.get(route.name)
            if policy is None:
                continue
            scopes = {*route.backends, *([route.fallback] if route.fallback else [])}
            keys = sorted({policy.key(cache.prefix, b, host, tpath, tquery) for b in scopes})
            await cache.invalidate(keys, route.name, "unsafe_method")

    # ---------------------------------------------------------------- answers

    async def _health(self, send: Send) -> None:
        ok = self.runtime.ready and not self.draining
        body = b'{"status":"ok"}' if ok else b'{"status":"unavailable"}'
        await send(
            {
                "type": "http.response.start",
                "status": 200 if ok else 503,
                "headers": [
                    _JSON,
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _reject(
        self, send: Send, status: int, reason: str, message: str, request_id: str
    ) -> None:
        metrics.REJECTED.labels(reason).inc()
        await self._json(
            send,
            status,
            {"error": reason, "message": message, "request_id": request_id},
            request_id,
        )

    async def _error(
        self, send: Send, exc: UpstreamError, request_id: str, route: str | None
    ) -> None:
        extra: list[tuple[bytes, bytes]] = []
        if isinstance(exc, CircuitOpen):
            reason = "circuit_open"
            extra.append((b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode()))
        elif exc.status == 504:
            reason = "upstream_timeout"
        else:
            reason = "upstream_unavailable"
        payload = {
            "error": reason,
            "message": f"backend {exc.backend!r}: {exc.kind.replace('_', ' ')}",
            "request_id": request_id,
        }
        if route:
            extra.append((b"x-strangler-route", route.encode()))
            extra.append((b"x-strangler-backend", exc.backend.encode()))
        await self._json(send, exc.status, payload, request_id, extra)

    @staticmethod
    async def _json(
        send: Send,
        status: int,
        payload: dict[str, Any],
        request_id: str,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = [
            _JSON,
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()),
            (b"cache-control", b"no-store"),
        ]
        if extra:
            headers.extend(extra)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _log_access(
        self,
        scope: Scope,
        method: str,
        path: str,
        route: str,
        backend: str,
        status: int,
        elapsed: float,
        request_id: str,
    ) -> None:
        client = scope.get("client")
        access_logger.info(
            "%s %s %s %d %.1fms route=%s backend=%s id=%s",
            client[0] if client else "-",
            method,
            path,
            status,
            elapsed * 1000,
            route,
            backend,
            request_id,
            extra={
                "client": client[0] if client else None,
                "method": method,
                "path": path,
                "status": status,
                "duration_ms": round(elapsed * 1000, 3),
                "route": route,
                "backend": backend,
                "request_id": request_id,
            },
        )

    # --------------------------------------------------------------- lifespan

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """Only used when the app is served with ``lifespan="on"`` (tests,
        embedding); `strangler serve` starts and stops the runtime itself."""
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    if not self.runtime.ready:
                        await self.runtime.start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.runtime.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return
