"""A lean HTTP/1.1 client connection pool for proxying to one upstream.

The gateway forwards every request it does not answer itself, so the upstream
client is the hot path. A general-purpose client builds request and response
objects, cookie jars, tracing hooks and payload writers for every call; this
module does only what a reverse proxy needs: write one request head (plus the
body), parse the response with ``httptools`` and hand the body back as it
arrives, reusing keep-alive connections.

Scope and deliberate limits:

* ``http://`` only. ``https://`` upstreams raise ``ValueError`` at construction
  (TLS would be one ``ssl=`` argument to ``create_connection``, but it needs its
  own tests for handshake timeouts and certificate errors first).
* No pipelining: one request in flight per connection.
* The pool adds no header except framing (``Content-Length`` or
  ``Transfer-Encoding: chunked``); the caller passes ``Host`` and every other
  end-to-end header and never passes hop-by-hop ones. A ``Content-Length`` or
  ``Transfer-Encoding`` the caller does pass is dropped and replaced by the
  framing the pool computes (a streamed body's ``Content-Length`` is honoured
  as the declared length).
* Interim ``1xx`` responses (``100 Continue``, ``103 Early Hints``) are skipped;
  ``101 Switching Protocols`` is a protocol error because the pool never asks
  for an upgrade. Response trailers are read and dropped.

Every failure surfaces as an ``UpstreamError`` subclass from
``strangler.exceptions`` carrying the pool's ``name`` as ``backend`` and a
``sent`` flag (``False`` only when no request byte can have reached the
upstream); no ``OSError`` or parser exception escapes. The one exception is an
error raised by the caller's own body iterator, which propagates unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import cast
from urllib.parse import urlsplit

import httptools

from strangler.exceptions import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

__all__ = ["H1Pool", "H1Response"]

logger = logging.getLogger(__name__)

#: Buffered, unconsumed response body above which the socket stops being read.
_READ_HIGH_WATER = 256 * 1024
#: Bytes bodies up to this size are copied into the same write as the head.
_INLINE_BODY_MAX = 64 * 1024
#: Methods whose requests carry ``Content-Length: 0`` even without a body
#: (RFC 9110 §8.6: a request whose method defines content should say its length).
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_TOKEN_EXTRA = frozenset("!#$%&'*+-.^_`|~")
_METHODS: dict[str, bytes] = {
    m: m.encode("ascii")
    for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE")
}
_METHOD_CACHE_MAX = 64

# Connection states.
_IDLE = 0  # in the pool, handed to a waiter, or freshly connected: no exchange
_AWAIT = 1  # request written (or being written), response not complete yet
_DONE = 2  # response complete; the connection waits for H1Response.release()

_CRLF = b"\r\n"
_SEP = b": "
_VERSION_LINE_END = b" HTTP/1.1\r\n"
_CHUNKED = b"Transfer-Encoding: chunked\r\n"
_CL_ZERO = b"Content-Length: 0\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class _HeadComplete(Exception):
    """Stops the parser after the head of a response to ``HEAD``.

    ``httptools`` gives no way to tell ``llhttp`` that a response has no body
    (the C API does it by returning 1 from ``on_headers_complete``), so a HEAD
    response carrying ``Content-Length: 5`` would otherwise wait for 5 body
    bytes that never come. Raising aborts parsing; the connection then gets a
    fresh parser.
    """


class _Unexpected(Exception):
    """A message the pool did not ask for (a second response, 101), or a status
    that is not HTTP."""


#: While a request waits, its connection's timer fires at least this often and
#: re-arms itself. A deadline further away than one tick (a per-try timeout of
#: 250 ms or more) then never needs the timer cancelled and scheduled again:
#: a few timer callbacks per second per busy connection instead of two timer
#: operations per request.
_TIMER_TICK = 0.25

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class _Stale(Exception):
    """A reused connection failed before any response byte (keep-alive race)."""


class _Connection(asyncio.Protocol):
    """One upstream TCP connection and the state of its current exchange.

    The protocol callbacks only record what arrived and wake the single task
    that drives the exchange (``H1Pool.request`` and then ``H1Response``), so
    every decision is made in that task, where errors can be raised.

    Read timeouts use one lazily rescheduled timer per connection instead of a
    timer per wait: each wait moves ``_deadline`` forward, and the timer, when
    it fires, either re-arms itself (at most `_TIMER_TICK` ahead) or declares
    the timeout. A busy connection therefore creates a few timer handles per
    second rather than one per chunk, whatever the deadlines.
    """

    __slots__ = (
        "_pool",
        "_loop",
        "_read_timeout",
        "_transport",
        "_parser",
        "_closed",
        "_holds_slot",
        "_in_pool",
        "_reused",
        "_idle_since",
        "_state",
        "_is_head",
        "_head_tail",
        "_status",
        "_reason",
        "_headers",
        "_resp_headers",
        "_chunks",
        "_buffered",
        "_got_data",
        "_head_done",
        "_complete",
        "_framed",
        "_interim",
        "_keep_alive",
        "_reusable",
        "_error",
        "_waiter",
        "_deadline",
        "_timer",
        "_timed_out",
        "_started_at",
        "_write_paused",
        "_read_paused",
    )

    def __init__(self, pool: H1Pool) -> None:
        self._pool = pool
        self._loop = pool._loop
        self._read_timeout = pool._read_timeout
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._closed = False
        self._holds_slot = False
        self._in_pool = False
        self._reused = False
        self._idle_since = 0.0
        self._state = _IDLE
        self._is_head = False
        self._head_tail = b""
        self._status = 0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._resp_headers: list[tuple[bytes, bytes]] = self._headers
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._got_data = False
        self._head_done = False
        self._complete = False
        self._framed = False
        self._interim = False
        self._keep_alive = False
        self._reusable = True
        self._error: str | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timed_out = False
        self._started_at = 0.0
        self._write_paused = False
        self._read_paused = False

    # -- transport callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):  # pragma: no cover - not a TCP socket
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        if (
            not self._closed
            and self._state == _AWAIT
            and self._head_done
            and not self._complete
            and not self._framed
            and self._error is None
        ):
            # A body with neither Content-Length nor chunked framing ends at EOF.
            self._complete = True
            self._keep_alive = False
            self._state = _DONE
        self._close()

    def eof_received(self) -> bool | None:
        return None  # let the transport close; connection_lost does the rest

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    def data_received(self, data: bytes) -> None:
        if self._state != _AWAIT:
            # Bytes nobody asked for (on an idle connection, or after a complete
            # response): the peer is confused, so the connection is not reusable.
            self._keep_alive = False
            self._close(abort=True)
            return
        self._got_data = True
        if self._is_head:
            self._head_tail = (self._head_tail + data)[-4:]
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadComplete):
                # The head ended exactly at the end of what arrived, unless the
                # upstream sent a body to HEAD anyway.
                if self._head_tail != b"\r\n\r\n":
                    self._keep_alive = False
                self._parser = httptools.HttpResponseParser(self)
            else:
                self._fail(f"invalid response: {exc.__context__!r}")
                return
        except httptools.HttpParserUpgrade:
            self._fail("upstream switched protocols")
            return
        except httptools.HttpParserError as exc:
            self._fail(f"invalid response: {exc}")
            return
        if self._head_done:
            self._wake()

    # -- parser callbacks ----------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            raise _Unexpected("data after the end of the response")

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        n = len(name)
        if n == 14 or n == 17:
            low = name.lower()
            if low == b"content-length" or low == b"transfer-encoding":
                self._framed = True

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status > 599:  # not HTTP (RFC 9110 §15 has three digits from 100 to 599)
            raise _Unexpected(f"status {status} is out of range")
        if status < 200:
            if status == 101:
                raise _Unexpected("101 Switching Protocols without an upgrade request")
            # Interim response (100, 102, 103): forget it, the real one follows.
            self._interim = True
            self._headers = []
            self._reason = b""
            self._framed = False
            return
        self._status = status
        self._resp_headers = self._headers
        # Trailers of a chunked body also arrive through on_header; they go to
        # a throwaway list so the caller's header list does not change under it.
        self._headers = []
        self._head_done = True
        if self._is_head:
            self._keep_alive = self._parser.should_keep_alive()
            self._complete = True
            self._state = _DONE
            raise _HeadComplete

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _READ_HIGH_WATER and not self._read_paused:
            self._read_paused = True
            assert self._transport is not None
            self._transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()
        self._state = _DONE

    # -- exchange steps (called from the task driving the exchange) ----------

    def _start(self, is_head: bool) -> None:
        self._state = _AWAIT
        self._is_head = is_head
        self._head_tail = b""
        self._status = 0
        self._reason = b""
        self._headers = []
        self._got_data = False
        self._head_done = False
        self._complete = False
        self._framed = False
        self._interim = False
        self._keep_alive = False
        self._reusable = True
        self._timed_out = False

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self, until: float | None = None) -> None:
        """Wait for the next transport event, at most ``read_timeout`` (or
        until the loop time ``until``, if that comes first).

        On expiry ``_timed_out`` is set (it is cleared when a wait starts);
        the caller checks it after it has looked at what arrived.
        """
        loop = self._loop
        w: asyncio.Future[None] = loop.create_future()
        self._waiter = w
        self._timed_out = False
        deadline = loop.time() + self._read_timeout
        if until is not None and until < deadline:
            deadline = until
        self._deadline = deadline
        timer = self._timer
        if timer is None:
            self._timer = loop.call_at(min(deadline, loop.time() + _TIMER_TICK), self._on_timer)
        elif timer.when() > deadline + 0.001:
            timer.cancel()
            self._timer = loop.call_at(deadline, self._on_timer)
        try:
            await w
        finally:
            self._waiter = None

    def _on_timer(self) -> None:
        self._timer = None
        w = self._waiter
        if w is None or w.done() or self._closed:
            return
        # Not due yet (a tick, or uvloop firing a little early: it rounds to ms).
        now = self._loop.time()
        if self._deadline - now > 0.001:
            self._timer = self._loop.call_at(min(self._deadline, now + _TIMER_TICK), self._on_timer)
            return
        self._timed_out = True
        w.set_result(None)

    def _fail(self, message: str) -> None:
        if self._error is None and not self._complete:
            self._error = message
        self._keep_alive = False
        self._close(abort=True)

    def _close(self, abort: bool = False) -> None:
        """Close the connection (idempotent) and give its pool slot back."""
        if not self._closed:
            self._closed = True
            tr = self._transport
            if tr is not None:
                if abort:
                    tr.abort()
                else:
                    tr.close()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._wake()
        self._pool._forget(self)


class H1Response:
    """A response whose head has arrived; the body is read with `iter_body`.

    The connection stays bound to the response until `release` (or until the
    body has been read to the end, which releases it automatically), so a
    response must always be either read to the end or released.
    """

    __slots__ = ("status", "reason", "headers", "_conn", "_pool", "_released", "_consumed")

    def __init__(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        conn: _Connection,
        pool: H1Pool,
    ) -> None:
        #: Status code of the final (non-1xx) response.
        self.status = status
        #: Reason phrase as sent (may be empty).
        self.reason = reason
        #: Header fields as received: order, repeats and name case preserved.
        self.headers = headers
        self._conn: _Connection | None = conn
        self._pool = pool
        self._released = False
        self._consumed = False

    def __repr__(self) -> str:
        return f"<H1Response {self.status} {self.reason.decode('latin-1')!r}>"

    async def iter_body(self) -> AsyncIterator[bytes]:
        """Yield the body as it arrives, de-chunked, never an empty chunk.

        Everything buffered since the last step is yielded at once, so a slow
        consumer gets fewer, larger chunks. Reading the socket is paused while
        more than 256 KiB wait unconsumed and resumed when the consumer catches
        up, which keeps memory bounded whatever the body size.

        Raises ``UpstreamTimeout(sent=True)`` when no body byte arrives for
        ``read_timeout`` and ``UpstreamProtocolError(sent=True)`` when the body
        is cut short or malformed. Reaching the end releases the response (the
        connection goes back to the pool); stopping early, an error or a
        cancellation closes the connection instead.
        """
        try:
            while True:
                data = await self.read_chunk()
                if not data:
                    break
                yield data
        except BaseException:  # stopped early (GeneratorExit), failed or cancelled
            self._discard()
            raise
        self.release()

    async def read_chunk(self) -> bytes:
        """The next piece of body as it arrives; ``b""`` once it is complete.

        The proxy's streaming loop: like `iter_body` without the generator,
        and without releasing at the end (call `release`; after `at_eof` the
        connection goes back to the pool). Errors close the connection.
        """
        conn = self._conn
        if conn is None:
            if self._consumed:
                return b""
            raise RuntimeError("the response was released before its body was read")
        chunks = conn._chunks
        try:
            while True:
                if chunks:
                    if len(chunks) == 1:
                        data = chunks.popleft()
                    else:
                        data = b"".join(chunks)
                        chunks.clear()
                    conn._buffered = 0
                    if conn._read_paused and not conn._closed:
                        conn._read_paused = False
                        assert conn._transport is not None
                        conn._transport.resume_reading()
                    return data
                if conn._complete:
                    self._consumed = True
                    return b""
                if conn._closed:
                    raise UpstreamProtocolError(
                        conn._error or "connection closed before the end of the response body",
                        backend=self._pool._name,
                        sent=True,
                    )
                if conn._timed_out:
                    raise UpstreamTimeout(
                        f"no response body data for {conn._read_timeout}s",
                        backend=self._pool._name,
                        sent=True,
                    )
                await conn._wait()
        except BaseException:
            self._discard()
            raise

    def at_eof(self) -> bool:
        """True when the whole body has arrived and been handed out."""
        conn = self._conn
        if conn is None:
            return self._consumed
        return conn._complete and not conn._chunks

    async def read(self) -> bytes:
        """Read the whole body (for small bodies and tests) and release."""
        return b"".join([chunk async for chunk in self.iter_body()])

    def release(self) -> None:
        """Give the connection back: to the pool if reusable, else close it.

        Idempotent. The connection is reused only when the whole response has
        arrived (read by the caller or not), the upstream allows keep-alive and
        the request itself was sent completely.
        """
        if self._released:
            return
        self._released = True
        conn = self._conn
        self._conn = None
        if conn is None:
            return
        if conn._complete and conn._keep_alive and conn._reusable and not conn._closed:
            if conn._chunks:
                conn._chunks.clear()
                conn._buffered = 0
            if conn._read_paused:
                conn._read_paused = False
                assert conn._transport is not None
                conn._transport.resume_reading()
            self._pool._put(conn)
        else:
            conn._close(abort=True)

    def _discard(self) -> None:
        self._released = True
        conn = self._conn
        self._conn = None
        if conn is not None:
            conn._close(abort=True)


class H1Pool:
    """Keep-alive HTTP/1.1 connections to one upstream ``http://host:port``.

    Idle connections are reused most-recently-used first (LIFO), which keeps
    the warm ones warm and lets the upstream's keep-alive timeout retire the
    rest. At most ``max_connections`` connections are open or being opened;
    further requests wait in FIFO order for at most ``connect_timeout``.

    A path in ``base_url`` (``http://legacy:8080/app``) is prefixed to every
    target; a query string or user info in it is a ``ValueError``.

    Timeouts: ``connect_timeout`` bounds both waiting for a free slot and the
    TCP connect; ``read_timeout`` bounds each wait for the upstream after the
    request is written (for the response head, for each piece of body, and
    for the upstream to accept more of a streamed request body);
    ``keepalive_timeout`` is how long an idle connection may be reused. It
    should be shorter than the upstream's own idle timeout, which narrows the
    keep-alive race: the upstream closing an idle connection just as a request
    goes out on it. That race is handled by one transparent retry on a new
    connection when the request is known not to have been answered (the
    reused connection failed before any response byte), its body can be sent
    again (``bytes`` or ``None``) and its method is idempotent (RFC 9112
    §9.3.1): an upstream that crashed after reading a POST looks the same as
    one that closed an idle connection, and a POST must never be sent twice.

    Create the pool inside the event loop that will use it (for example in
    the ASGI lifespan startup): its connections belong to that loop.
    """

    __slots__ = (
        "_name",
        "_host",
        "_port",
        "_netloc",
        "_prefix",
        "_max",
        "_connect_timeout",
        "_read_timeout",
        "_keepalive_timeout",
        "_loop",
        "_idle",
        "_waiters",
        "_conns",
        "_open",
        "_closed",
    )

    def __init__(
        self,
        base_url: str,
        *,
        name: str = "",
        max_connections: int = 100,
        connect_timeout: float = 1.0,
        read_timeout: float = 30.0,
        keepalive_timeout: float = 4.0,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme == "https":
            raise ValueError(f"{base_url!r}: https upstreams are not supported yet")
        if parts.scheme != "http":
            raise ValueError(f"{base_url!r}: only http:// upstreams are supported")
        if not parts.hostname:
            raise ValueError(f"{base_url!r}: no host")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"{base_url!r}: query, fragment and user info are not allowed")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        try:
            port = parts.port or 80
        except ValueError as exc:
            raise ValueError(f"{base_url!r}: {exc}") from None
        self._name = name
        self._host = parts.hostname
        self._port = port
        self._netloc = parts.netloc
        self._prefix = parts.path.rstrip("/").encode("latin-1")
        self._max = max_connections
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._keepalive_timeout = keepalive_timeout
        self._loop = asyncio.get_running_loop()
        self._idle: deque[_Connection] = deque()
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._conns: set[_Connection] = set()
        self._open = 0
        self._closed = False

    # -- stats -----------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def idle_count(self) -> int:
        """Connections parked in the pool, ready for reuse."""
        return len(self._idle)

    @property
    def open_count(self) -> int:
        """Connections open or being opened (idle ones included)."""
        return self._open

    @property
    def waiting_count(self) -> int:
        """Requests waiting for a connection slot."""
        return len(self._waiters)

    def stats(self) -> dict[str, int]:
        """Gauges for metrics: ``idle``, ``open`` and ``waiting``."""
        return {"idle": len(self._idle), "open": self._open, "waiting": len(self._waiters)}

    # -- requests --------------------------------------------------------------

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterable[bytes] | None = None,
        timeout: float | None = None,
    ) -> H1Response:
        """Send one request and return once the response head has arrived.

        ``timeout`` (seconds from now) additionally bounds the wait for the
        response head: the per-try timeout of a retry policy, enforced by the
        connection's own timer rather than an extra one per request.

        ``target`` is the origin-form path and query (``/a/b?x=1``);
        ``headers`` must include ``Host``. The body is ``bytes`` (sent with
        ``Content-Length``, in the same write as the head when small), ``None``,
        or an async iterator of ``bytes``, streamed with flow control: with the
        declared ``Content-Length`` if ``headers`` has one (more or fewer bytes
        than declared raise ``UpstreamProtocolError``), chunked otherwise.

        If the upstream answers with an error before a streamed body is fully
        sent (say a 413), sending stops, the response is returned, and the
        connection is closed on release.

        ``ValueError`` is raised for a CR, LF or space in the target, CR or LF
        in a header, or an invalid method or declared length: they could
        otherwise smuggle a second request upstream. Cancelling the calling
        task closes the connection and re-raises.
        """
        if self._closed:
            raise UpstreamConnectError("connection pool is closed", backend=self._name)
        data, payload, stream, declared = self._encode(method, target, headers, body)
        is_head = method == "HEAD"
        retryable = stream is None and method in _IDEMPOTENT
        until = None if timeout is None else self._loop.time() + timeout
        conn = await self._acquire()
        try:
            return await self._exchange(
                conn, data, payload, stream, declared, is_head, retryable, until
            )
        except _Stale:
            pass
        # The upstream closed a reused connection just as the request went out
        # on it: retry once, on a new connection. Failing that, the first
        # attempt's bytes may have arrived, hence sent=True from here on.
        logger.debug("upstream %s closed a kept-alive connection; retrying once", self._name)
        try:
            conn = await self._acquire(fresh=True)
        except UpstreamError as exc:
            exc.sent = True
            raise
        try:
            return await self._exchange(
                conn, data, payload, stream, declared, is_head, False, until
            )
        except _Stale as exc:  # pragma: no cover - a new connection is never stale
            raise UpstreamProtocolError(
                "connection closed before the response", backend=self._name, sent=True
            ) from exc

    def _encode(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterable[bytes] | None,
    ) -> tuple[bytes, bytes | None, AsyncIterable[bytes] | None, int]:
        """Build the request head; return ``(data, payload, stream, declared)``.

        ``data`` is the head, with a small bytes body appended so head and body
        go out in one write; ``payload`` is a large bytes body to write after
        it; ``stream`` is the body iterator and ``declared`` its declared
        length (-1 for chunked).
        """
        mb = _METHODS.get(method)
        if mb is None:
            if not method or not all(c.isalnum() or c in _TOKEN_EXTRA for c in method):
                raise ValueError(f"invalid HTTP method {method!r}")
            mb = method.encode("ascii")
            if len(_METHODS) < _METHOD_CACHE_MAX:
                _METHODS[method] = mb
        if not target or " " in target:
            raise ValueError(f"invalid request target {target!r}")
        try:
            tb = target.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"request target is not latin-1: {target!r}") from None
        parts = [mb, b" ", self._prefix, tb, _VERSION_LINE_END]
        append = parts.append
        lines = 2  # request line and the final empty line
        declared_raw: bytes | None = None
        for name, value in headers:
            n = len(name)
            if n == 14 or n == 17:
                low = name.lower()
                if low == b"content-length":
                    declared_raw = value
                    continue
                if low == b"transfer-encoding":
                    continue
            append(name)
            append(_SEP)
            append(value)
            append(_CRLF)
            lines += 1
        stream: AsyncIterable[bytes] | None = None
        payload: bytes | None = None
        declared = -1
        inline = b""
        if body is None:
            if method in _BODY_METHODS:
                append(_CL_ZERO)
                lines += 1
        elif isinstance(body, bytes | bytearray | memoryview):
            size = len(body)
            if size or method in _BODY_METHODS:
                append(b"Content-Length: %d\r\n" % size)
                lines += 1
            if size > _INLINE_BODY_MAX:
                payload = bytes(body)
            elif size:
                inline = bytes(body)
        else:
            stream = body
            if declared_raw is not None:
                stripped = declared_raw.strip()
                if not stripped.isdigit():
                    raise ValueError(f"invalid Content-Length {declared_raw!r}")
                declared = int(stripped)
                append(b"Content-Length: %d\r\n" % declared)
            else:
                append(_CHUNKED)
            lines += 1
        append(_CRLF)
        if inline:
            append(inline)
        data = b"".join(parts)
        end = len(data) - len(inline)
        # Every line ends in CRLF, so any other CR or LF came from the caller.
        if data.count(b"\n", 0, end) != lines or data.count(b"\r", 0, end) != lines:
            raise ValueError("CR or LF in the request target or a header")
        return data, payload, stream, declared

    async def _exchange(
        self,
        conn: _Connection,
        data: bytes,
        payload: bytes | None,
        stream: AsyncIterable[bytes] | None,
        declared: int,
        is_head: bool,
        retryable: bool,
        until: float | None = None,
    ) -> H1Response:
        """Write the request on ``conn`` and wait for the response head.

        Raises ``_Stale`` when a reused connection failed before any response
        byte and the request can be sent again. Any failure closes the
        connection.
        """
        reused = conn._reused
        tr = conn._transport
        written = False
        name = self._name
        try:
            if conn._closed or tr is None or tr.is_closing():  # pragma: no cover
                # _acquire checked this and nothing was awaited since.
                raise UpstreamProtocolError(
                    "connection closed before the request was sent", backend=name, sent=False
                )
            conn._start(is_head)
            conn._started_at = self._loop.time()
            written = True
            try:
                tr.write(data)
                if payload is not None:
                    tr.write(payload)
            except (OSError, RuntimeError) as exc:  # transport already closed
                raise UpstreamProtocolError(
                    f"writing the request failed: {exc!r}", backend=name, sent=True
                ) from None
            if stream is not None:
                await self._send_stream(conn, tr, stream, declared)
            while not conn._head_done:
                if conn._closed:
                    if conn._error is not None:
                        raise UpstreamProtocolError(conn._error, backend=name, sent=True)
                    if reused and not conn._got_data:
                        if retryable:
                            raise _Stale
                        raise UpstreamProtocolError(
                            "kept-alive connection closed before the response; "
                            "not resent (streamed body or non-idempotent method)",
                            backend=name,
                            sent=True,
                        )
                    raise UpstreamProtocolError(
                        "connection closed before the response", backend=name, sent=True
                    )
                if conn._timed_out:
                    raise UpstreamTimeout(
                        f"no response within {conn._deadline - conn._started_at:.3g}s",
                        backend=name,
                        sent=True,
                    )
                await conn._wait(until)
            return H1Response(conn._status, conn._reason, conn._resp_headers, conn, self)
        except BaseException as exc:
            conn._close(abort=True)
            if isinstance(exc, UpstreamError | _Stale) or not isinstance(exc, Exception):
                raise  # ours, or CancelledError / KeyboardInterrupt
            if stream is not None:
                raise  # from the caller's body iterator: theirs to handle
            raise UpstreamProtocolError(  # pragma: no cover - defensive
                f"unexpected error: {exc!r}", backend=name, sent=written
            ) from exc

    async def _send_stream(
        self,
        conn: _Connection,
        tr: asyncio.Transport,
        stream: AsyncIterable[bytes],
        declared: int,
    ) -> None:
        """Stream the request body, waiting whenever the transport is full.

        Empty chunks are skipped (an empty chunk would end a chunked body).
        An error response (>= 400) that arrives first, or any response
        followed by a close, stops the upload (RFC 9112 §9.5: the upstream
        does not want the rest) and the connection is then not reusable; a
        non-error early response does not, since some upstreams answer while
        still reading.
        """
        name = self._name
        chunked = declared < 0
        sent = 0
        async for chunk in stream:
            if conn._head_done and (conn._status >= 400 or conn._closed):
                conn._reusable = False
                return
            if not chunk:
                continue
            if conn._closed:
                raise UpstreamProtocolError(
                    conn._error or "connection closed while sending the request body",
                    backend=name,
                    sent=True,
                )
            size = len(chunk)
            try:
                if chunked:
                    tr.writelines((b"%x\r\n" % size, chunk, _CRLF))
                else:
                    sent += size
                    if sent > declared:
                        raise UpstreamProtocolError(
                            f"request body longer than its Content-Length {declared}",
                            backend=name,
                            sent=True,
                        )
                    tr.write(chunk)
            except (OSError, RuntimeError) as exc:
                raise UpstreamProtocolError(
                    f"writing the request body failed: {exc!r}", backend=name, sent=True
                ) from None
            while conn._write_paused:
                if conn._head_done and (conn._status >= 400 or conn._closed):
                    conn._reusable = False
                    return
                if conn._closed:
                    raise UpstreamProtocolError(
                        conn._error or "connection closed while sending the request body",
                        backend=name,
                        sent=True,
                    )
                if conn._timed_out:
                    raise UpstreamTimeout(
                        f"upstream accepted no request body data for {conn._read_timeout}s",
                        backend=name,
                        sent=True,
                    )
                await conn._wait()
        if conn._closed:
            if conn._head_done:
                conn._reusable = False
                return
            raise UpstreamProtocolError(
                conn._error or "connection closed while sending the request body",
                backend=name,
                sent=True,
            )
        if chunked:
            tr.write(_LAST_CHUNK)
        elif sent != declared:
            raise UpstreamProtocolError(
                f"request body shorter ({sent}) than its Content-Length {declared}",
                backend=name,
                sent=True,
            )

    # -- connection management -----------------------------------------------

    async def _acquire(self, fresh: bool = False) -> _Connection:
        """Return a connection holding a pool slot: idle, handed over or new.

        ``fresh`` (the keep-alive race retry) asks for a new connection: idle
        ones are skipped, and when the pool is full the oldest idle one, or
        one handed over by a finished request, is closed to take its slot.
        """
        idle = self._idle
        while True:
            if idle and not fresh:
                limit = self._loop.time() - self._keepalive_timeout
                while idle:
                    conn = idle.pop()
                    conn._in_pool = False
                    tr = conn._transport
                    if conn._idle_since < limit or tr is None or tr.is_closing():
                        conn._close()
                        continue
                    return conn
            if self._open < self._max:
                self._open += 1
                return await self._connect()
            if fresh and idle:
                old = idle.popleft()
                old._in_pool = False
                old._holds_slot = False  # its slot passes to the new connection
                old._close()
                return await self._connect()
            got = await self._wait_for_slot()
            if got is None:
                return await self._connect()
            tr = got._transport
            if not fresh and not got._closed and tr is not None and not tr.is_closing():
                return got
            if got._holds_slot:
                got._holds_slot = False  # take over its slot
                got._close()
                return await self._connect()
            got._close()  # closed meanwhile; its slot went to someone else

    async def _wait_for_slot(self) -> _Connection | None:
        """Wait (FIFO, at most ``connect_timeout``) for a connection or a slot.

        Returns a released connection, or ``None`` when a slot was freed and
        the caller should connect. Whatever is handed over after a timeout or
        cancellation won the race is passed on, not leaked.
        """
        loop = self._loop
        fut: asyncio.Future[_Connection | None] = loop.create_future()
        self._waiters.append(fut)
        handle = loop.call_later(self._connect_timeout, self._expire_waiter, fut)
        try:
            return await fut
        except BaseException:
            try:
                self._waiters.remove(fut)
            except ValueError:
                pass
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                got = fut.result()
                if got is None:
                    self._free_slot()
                else:
                    self._put(got)
            raise
        finally:
            handle.cancel()

    def _expire_waiter(self, fut: asyncio.Future[_Connection | None]) -> None:
        if not fut.done():
            fut.set_exception(
                UpstreamTimeout(
                    f"no free connection within {self._connect_timeout}s "
                    f"({self._max} connections busy)",
                    backend=self._name,
                    sent=False,
                )
            )

    async def _connect(self) -> _Connection:
        """Open a connection in a slot the caller reserved; free it on failure."""
        conn = _Connection(self)
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self._loop.create_connection(lambda: conn, self._host, self._port)
        except TimeoutError:  # before OSError: TimeoutError is one
            self._free_slot()
            logger.debug("connect to %s (%s) timed out", self._netloc, self._name)
            raise UpstreamTimeout(
                f"connect to {self._netloc} timed out after {self._connect_timeout}s",
                backend=self._name,
                sent=False,
            ) from None
        except OSError as exc:
            self._free_slot()
            logger.debug("connect to %s (%s) failed: %r", self._netloc, self._name, exc)
            raise UpstreamConnectError(
                f"connect to {self._netloc} failed: {exc}", backend=self._name, sent=False
            ) from exc
        except BaseException:
            self._free_slot()
            raise
        conn._holds_slot = True
        self._conns.add(conn)
        if conn._closed or self._closed:
            # Closed by the peer (or the pool) before this task resumed.
            conn._close()
            raise UpstreamConnectError(
                f"connection to {self._netloc} closed right after connecting",
                backend=self._name,
                sent=False,
            )
        return conn

    def _put(self, conn: _Connection) -> None:
        """Take back a reusable connection: to the first waiter, else idle."""
        conn._state = _IDLE
        conn._reused = True
        if self._closed:
            conn._close()
            return
        waiters = self._waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                w.set_result(conn)
                return
        now = self._loop.time()
        conn._idle_since = now
        conn._in_pool = True
        idle = self._idle
        idle.append(conn)
        # Cheap sweep: the oldest idle connection is at the left end.
        limit = now - self._keepalive_timeout
        while idle and idle[0]._idle_since < limit:
            old = idle.popleft()
            old._in_pool = False
            old._close()

    def _forget(self, conn: _Connection) -> None:
        """Bookkeeping for a closed connection (idempotent)."""
        if conn._in_pool:
            conn._in_pool = False
            try:
                self._idle.remove(conn)
            except ValueError:  # pragma: no cover - flag and deque agree
                pass
        self._conns.discard(conn)
        if conn._holds_slot:
            conn._holds_slot = False
            self._free_slot()

    def _free_slot(self) -> None:
        """Pass a freed slot to the first live waiter, else shrink the count."""
        waiters = self._waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                w.set_result(None)
                return
        self._open -= 1

    async def aclose(self) -> None:
        """Close every connection and fail waiting requests; idempotent.

        Requests in flight fail with ``UpstreamProtocolError``; later requests
        fail with ``UpstreamConnectError(sent=False)``.
        """
        self._closed = True
        waiters = self._waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                w.set_exception(
                    UpstreamConnectError("connection pool is closed", backend=self._name)
                )
        for conn in list(self._conns):
            conn._close()
        self._idle.clear()
        # Let the transports run their close callbacks.
        await asyncio.sleep(0)
