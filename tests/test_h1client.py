"""Tests for the HTTP/1.1 upstream pool against real servers on 127.0.0.1.

Well-behaved upstreams are aiohttp.web applications; misbehaving ones (never
answering, closing early, malformed or unusual framing, keep-alive races) are
raw ``asyncio.start_server`` handlers that write exact bytes.

Every test runs on both the default asyncio loop and uvloop (the gateway's
production loop): their transports differ in exactly the places this client
relies on (writelines, flow-control callbacks, timer resolution).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import hashlib
import json
import random
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop
from aiohttp import web

from strangler.exceptions import (
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from strangler.h1client import H1Pool

MiB = 1024 * 1024
LOOPS = ["asyncio", "uvloop"]
CASE_TIMEOUT = 20.0

AsyncCase = Callable[[], Coroutine[Any, Any, None]]


def both_loops(case: AsyncCase) -> Callable[[str], None]:
    """Turn an async test body into a sync test run once per event loop."""

    def test(loop_kind: str) -> None:
        factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(asyncio.wait_for(case(), CASE_TIMEOUT))

    test.__name__ = case.__name__
    test.__qualname__ = case.__qualname__
    test.__doc__ = case.__doc__
    return pytest.mark.parametrize("loop_kind", LOOPS)(test)


# -- servers -------------------------------------------------------------------

PEERS = web.AppKey[list[tuple[str, int]]]("peers")
INFLIGHT = web.AppKey[list[int]]("inflight")  # [now, peak]


@web.middleware
async def _track(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    assert request.transport is not None
    request.app[PEERS].append(request.transport.get_extra_info("peername"))
    counter = request.app[INFLIGHT]
    counter[0] += 1
    counter[1] = max(counter[1], counter[0])
    try:
        return await handler(request)
    finally:
        counter[0] -= 1


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text="hello", headers={"X-Echo-Host": request.host})


async def _slow_hello(request: web.Request) -> web.Response:
    await asyncio.sleep(0.01)
    return web.Response(text="hello")


async def _cookies(request: web.Request) -> web.Response:
    resp = web.Response(text="c")
    resp.headers.add("Set-Cookie", "a=1; Path=/")
    resp.headers.add("X-Between", "x")
    resp.headers.add("Set-Cookie", "b=2; HttpOnly")
    resp.headers.add("Set-Cookie", "c=3")
    return resp


async def _chunked(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for i in range(5):
        await resp.write(b"part%d;" % i)
        await asyncio.sleep(0.005)
    await resp.write_eof()
    return resp


async def _doc(request: web.Request) -> web.Response:
    return web.Response(body=b"x" * 1000, content_type="text/plain")


async def _no_content(request: web.Request) -> web.Response:
    return web.Response(status=204)


async def _not_modified(request: web.Request) -> web.Response:
    return web.Response(status=304, headers={"ETag": '"v1"'})


async def _close_after(request: web.Request) -> web.Response:
    resp = web.Response(text="bye")
    resp.force_close()
    return resp


async def _echo(request: web.Request) -> web.Response:
    # ?stall=S: a slow upstream that starts reading the body only after S seconds.
    await asyncio.sleep(float(request.query.get("stall", "0")))
    digest = hashlib.sha256()
    size = 0
    async for data in request.content.iter_any():
        digest.update(data)
        size += len(data)
    info = {
        "method": request.method,
        "path": request.path_qs,
        "cl": request.headers.get("Content-Length"),
        "te": request.headers.get("Transfer-Encoding"),
        "size": size,
        "sha256": digest.hexdigest(),
    }
    return web.json_response(info)


async def _download(request: web.Request) -> web.StreamResponse:
    total = int(request.query["n"])
    block = b"d" * (64 * 1024)
    resp = web.StreamResponse(headers={"Content-Length": str(total)})
    await resp.prepare(request)
    sent = 0
    while sent < total:
        piece = block[: total - sent]
        await resp.write(piece)
        sent += len(piece)
    await resp.write_eof()
    return resp


def make_app() -> web.Application:
    app = web.Application(middlewares=[_track])
    app[PEERS] = []
    app[INFLIGHT] = [0, 0]
    app.router.add_get("/hello", _hello)
    app.router.add_get("/slow", _slow_hello)
    app.router.add_get("/cookies", _cookies)
    app.router.add_get("/chunked", _chunked)
    app.router.add_get("/doc", _doc)
    app.router.add_get("/204", _no_content)
    app.router.add_get("/304", _not_modified)
    app.router.add_get("/close", _close_after)
    app.router.add_route("*", "/echo", _echo)
    app.router.add_route("*", "/app/echo", _echo)
    app.router.add_get("/download", _download)
    return app


@contextlib.asynccontextmanager
async def app_server() -> AsyncIterator[tuple[str, web.Application]]:
    app = make_app()
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        await runner.cleanup()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A TCP server running ``handler`` per connection and counting them."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed_by_peer = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """Read one request head and its Content-Length body (b"" at EOF)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b"", b""
    m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    body = await reader.readexactly(int(m.group(1))) if m else b""
    return head, body


async def wait_for_eof(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass


HOST = [(b"Host", b"upstream.test")]


def distinct_peers(app: web.Application, since: int = 0) -> int:
    """How many client connections the app served requests on."""
    peers: list[tuple[str, int]] = app[PEERS]
    return len(set(peers[since:]))


def vm_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"{key}:\s+(\d+)", f.read())
    assert m is not None
    return int(m.group(1))


#: Peak RSS growth allowed while moving a 50 MiB body. Flow control keeps it
#: near 2 MiB; without it the whole body ends up buffered (47-72 MiB measured),
#: so the bound sits well between the two.
RSS_GROWTH_LIMIT_MIB = 25


def rss_baseline() -> int:
    """Return VmRSS in KiB after resetting VmHWM to it (Linux >= 4.0).

    Free heap left by earlier tests is handed back to the OS first (glibc's
    malloc_trim); otherwise a body buffered in reused free pages would not
    show up as growth.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return vm_kib("VmRSS")


# -- basics ----------------------------------------------------------------------


@both_loops
async def test_simple_get() -> None:
    async with app_server() as (url, _app):
        pool = H1Pool(url, name="legacy")
        try:
            resp = await pool.request("GET", "/hello", [(b"Host", b"legacy.internal:8080")])
            assert resp.status == 200
            assert resp.reason == b"OK"
            assert (b"X-Echo-Host", b"legacy.internal:8080") in resp.headers
            assert await resp.read() == b"hello"
            assert pool.stats() == {"idle": 1, "open": 1, "waiting": 0}
        finally:
            await pool.aclose()


@both_loops
async def test_request_head_is_exactly_what_the_caller_passed() -> None:
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if b"chunked" in head:
                body = await reader.readuntil(b"0\r\n\r\n")
            else:
                m = re.search(rb"Content-Length: (\d+)", head)
                body = await reader.readexactly(int(m.group(1))) if m else b""
            heads.append(head + body)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    async def gen() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b""  # must not end the chunked body early
        yield b"defgh"

    async with RawServer(handler) as srv:
        pool = H1Pool(srv.url)
        try:
            hdrs = [(b"Host", b"h"), (b"X-A", b"1"), (b"x-a", b"2")]
            await (await pool.request("GET", "/g?q=1", hdrs)).read()
            await (await pool.request("POST", "/p", hdrs)).read()
            await (await pool.request("POST", "/p", hdrs, b"")).read()
            with_cl = [*hdrs, (b"content-length", b"999")]  # replaced by the real length
            await (await pool.request("PUT", "/p", with_cl, b"xyz")).read()
            await (await pool.request("POST", "/s", hdrs, gen())).read()
            await (await pool.request("DELETE", "/d", hdrs)).read()
        finally:
            await pool.aclose()
    common = b"Host: h\r\nX-A: 1\r\nx-a: 2\r\n"
    assert heads == [
        b"GET /g?q=1 HTTP/1.1\r\n" + common + b"\r\n",
        b"POST /p HTTP/1.1\r\n" + common + b"Content-Length: 0\r\n\r\n",
        b"POST /p HTTP/1.1\r\n" + common + b"Content-Length: 0\r\n\r\n",
        b"PUT /p HTTP/1.1\r\n" + common + b"Content-Length: 3\r\n\r\nxyz",
        b"POST /s HTTP/1.1\r\n"
        + common
        + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n",
        b"DELETE /d HTTP/1.1\r\n" + common + b"\r\n",
    ]
    assert srv.connections == 1


@both_loops
async def test_keepalive_reuses_one_connection_for_sequential_requests() -> None:
    async with app_server() as (url, app):
        pool = H1Pool(url)
        try:
            for _ in range(10):
                resp = await pool.request("GET", "/hello", HOST)
                assert await resp.read() == b"hello"
            assert distinct_peers(app) == 1
            assert len(app[PEERS]) == 10
        finally:
            await pool.aclose()


@both_loops
async def test_concurrency_is_bounded_by_max_connections() -> None:
    async with app_server() as (url, app):
        pool = H1Pool(url, max_connections=10, connect_timeout=5.0)
        peak_open = 0

        async def one() -> bytes:
            nonlocal peak_open
            resp = await pool.request("GET", "/slow", HOST)
            peak_open = max(peak_open, pool.open_count)
            return await resp.read()

        try:
            bodies = await asyncio.gather(*(one() for _ in range(50)))
            assert bodies == [b"hello"] * 50
            assert distinct_peers(app) <= 10
            assert app[INFLIGHT][1] <= 10
            assert peak_open <= 10
            assert pool.waiting_count == 0
        finally:
            await pool.aclose()


@both_loops
async def test_pool_wait_is_fifo_and_bounded_by_connect_timeout() -> None:
    async with app_server() as (url, app):
        pool = H1Pool(url, max_connections=1, connect_timeout=0.3)
        try:
            held = await pool.request("GET", "/hello", HOST)
            started = time.monotonic()
            with pytest.raises(UpstreamTimeout) as info:
                await pool.request("GET", "/hello", HOST)
            assert 0.2 < time.monotonic() - started < 2.0
            assert info.value.sent is False
            assert pool.waiting_count == 0

            order: list[int] = []

            async def waiter(i: int) -> None:
                resp = await pool.request("GET", "/hello", HOST)
                order.append(i)
                await resp.read()

            tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
            await asyncio.sleep(0.05)
            assert pool.waiting_count == 3
            await held.read()
            await asyncio.gather(*tasks)
            assert order == [0, 1, 2]
            assert distinct_peers(app) == 1
        finally:
            await pool.aclose()


# -- response framing --------------------------------------------------------------


@both_loops
async def test_repeated_set_cookie_preserved_in_order() -> None:
    async with app_server() as (url, _app):
        pool = H1Pool(url)
        try:
            resp = await pool.request("GET", "/cookies", HOST)
            await resp.read()
            picked = [(n, v) for n, v in resp.headers if n in (b"Set-Cookie", b"X-Between")]
            assert picked == [
                (b"Set-Cookie", b"a=1; Path=/"),
                (b"X-Between", b"x"),
                (b"Set-Cookie", b"b=2; HttpOnly"),
                (b"Set-Cookie", b"c=3"),
            ]
        finally:
            await pool.aclose()


@both_loops
async def test_chunked_response_is_dechunked() -> None:
    async with app_server() as (url, app):
        pool = H1Pool(url)
        try:
            resp = await pool.request("GET", "/chunked", HOST)
            assert (b"Transfer-Encoding", b"chunked") in resp.headers
            chunks = [c async for c in resp.iter_body()]
            assert b"".join(chunks) == b"part0;part1;part2;part3;part4;"
            assert all(chunks)
            await (await pool.request("GET", "/hello", HOST)).read()
            assert distinct_peers(app) == 1
        finally:
            await pool.aclose()


@both_loops
async def test_chunk_extensions_trailers_and_interim_responses() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
            b"3;ext=1\r\nabc\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"2\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n")
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await wait_for_eof(reader)

    async with RawServer(handler) as srv:
        pool = H1Pool(srv.url)
        try:
            resp = await pool.request("GET", "/", HOST)
            assert resp.status == 200
            assert await resp.read() == b"abcde"
            assert resp.headers == [(b"Transfer-Encoding", b"chunked"), (b"Trailer", b"X-Sum")]
            assert await (await pool.request("GET", "/", HOST)).read() == b"ok"
            assert srv.connections == 1
        finally:
            await pool.aclose()


@both_loops
async def test_response_delimited_by_close() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst;")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"second")
        await writer.drain()

    async with RawServer(handler) as srv:
        pool = H1Pool(srv.url)
        try:
            resp = await pool.request("GET", "/", HOST)
            assert await resp.read() == b"first;second"
            assert pool.stats() == {"idle": 0, "open": 0, "waiting": 0}
        finally:
            await pool.aclose()


@both_loops
async def test_http10_and_connection_close_responses_are_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        # HTTP/1.0 without keep-alive, and the server leaves the socket open.
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await wait_for_eof(reader)
        srv.closed_by_peer.set()

    async with RawServer(handler) as srv, app_server() as (url, _app):
        pool = H1Pool(srv.url)
        aio_pool = H1Pool(url)
        try:
            assert await (await pool.request("GET", "/", HOST)).read() == b"hello"
            assert pool.open_count == 0
            await asyncio.wait_for(srv.closed_by_peer.wait(), 2)

            resp = await aio_pool.request("GET", "/close", HOST)
            assert (b"Connection", b"close") in resp.headers
            assert await resp.read() == b"bye"
            assert aio_pool.open_count == 0
        finally:
            await pool.aclose()
            await aio_pool.aclose()


@both_loops
async def test_head_has_no_body_and_keeps_the_connection() -> None:
    async with app_server() as (url, app):
        pool = H1Pool(url)
        try:
            resp = await pool.request("HEAD", "/doc", HOST)
            assert resp.status == 200
            assert (b"Content-Length", b"1000") in resp.headers
            assert await resp.read() == b""
            assert await (await pool.request("GET", "/doc", HOST)).read() == b"x" * 1000
            resp = await pool.request("HEAD", "/doc", HOST)
            resp.release()
            assert await (await pool.request("GET", "/hello", HOST)).read() == b"hello"
            assert distinct_peers(app) == 1
        finally:
            await pool.aclose()


@both_loops
async def test_head_with_chunked_framing_has_no_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await wait_for_eof(reader)

    async with RawServer(handler) as srv:
        pool = H1Pool(srv.url)
        try:
            assert await (await pool.request("HEAD", "/", HOST)).read() == b""
            assert await (await pool.request("GET", "/", HOST)).read() == b"ok"
            assert srv.connections == 1
        finally:
            await pool.aclose()


@both_loops
async def test_204_and_304_have_no_body() -> None:
    async with app_server() as (url, app):
        pool = H1Pool(url)
        try:
            resp = await pool.request("GET", "/204", HOST)
            assert resp.status == 204
            assert await resp.read() == b""
            resp = await pool.request("GET", "/304", HOST)
            assert resp.status == 304
            assert (b"ETag", b'"v1"') in resp.headers
            assert await resp.read() == b""
            assert await (await pool.request("GET", "/hello", HOST)).read() == b"hello"
            assert distinct_peers(app) == 1
        finally:
            await pool.aclose()


@both_loops
async def test_release_without_reading() -> None:
    async with app_server() as (url, app):
        pool = H1Pool(url)
        try:
            # Small body already complete: the connection is still reusable.
            resp = await pool.request("GET", "/doc", HOST)
            await asyncio.sleep(0.02)
            resp.release()
            resp.release()
            assert pool.idle_count == 1
            with pytest.raises(RuntimeError):
                await resp.read()
            # Released while its body is being read: the generator must not go
            # on reading from a connection that may carry the next request.
            resp = await pool.request("GET", "/chunked", HOST)
            body = resp.iter_body()
            assert await body.__anext__() == b"part0;"
            resp.release()
            with pytest.raises(RuntimeError):
                await body.__anext__()
            assert pool.idle_count == 0
            # Large body not read: the connection must be closed.
            resp = await pool.request("GET", "/download?n=5000000", HOST)
            resp.release()
            assert pool.stats() == {"idle": 0, "open": 0, "waiting": 0}
            await (await pool.request("GET", "/hello", HOST)).read()
            peers = app[PEERS]
            assert peers[0] == peers[1] != peers[2] != peers[3]
        finally:
            await pool.aclose()


# -- request bodies ------------------------------------------------------------------


@both_loops
async def test_post_bytes_body_with_content_length() -> None:
    async with app_server() as (url, _app):
        pool = H1Pool(url)
        try:
            for body in (b"", b"small body", b"z" * 300_000):
                resp = await pool.request("POST", "/echo", HOST, body)
                info = json.loads(await resp.read())
                assert info["cl"] == str(len(body))
                assert info["te"] is None
                assert info["sha256"] == hashlib.sha256(body).hexdigest()
        finally:
            await pool.aclose()


@both_loops
async def test_base_url_path_is_prefixed() -> None:
    async with app_server() as (url, _app):
        pool = H1Pool(url + "/app/")
        try:
            info = json.loads(await (await pool.request("GET", "/echo?x=1", HOST)).read())
            assert info["path"] == "/app/echo?x=1"
        finally:
            await pool.aclose()


async def _blocks(total: int, block: int = 64 * 1024) -> AsyncIterator[bytes]:
    """Yield ``total`` bytes of b"u", a new bytes object each time (like a socket)."""
    data = b"u" * (block + 1)
    sent = 0
    while sent < total:
        piece = data[1 : 1 + min(block, total - sent)]
        sent += len(piece)
        yield piece
        await asyncio.sleep(0)


@pytest.mark.parametrize("declare_length", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("loop_kind", LOOPS)
def test_streaming_upload_50mb(loop_kind: str, declare_length: bool) -> None:
    total = 50 * MiB
    expected = hashlib.sha256()
    block = b"u" * (64 * 1024)
    for _ in range(total // len(block)):
        expected.update(block)

    async def case() -> None:
        async with app_server() as (url, _app):
            pool = H1Pool(url)
            try:
                hdrs = [*HOST, (b"Content-Length", str(total).encode())] if declare_length else HOST
                base = rss_baseline()
                resp = await pool.request("PUT", "/echo?stall=0.3", hdrs, _blocks(total))
                info = json.loads(await resp.read())
                growth_mib = (vm_kib("VmHWM") - base) / 1024
                assert info["size"] == total
                assert info["sha256"] == expected.hexdigest()
                if declare_length:
                    assert (info["cl"], info["te"]) == (str(total), None)
                else:
                    assert (info["cl"], info["te"]) == (None, "chunked")
                assert growth_mib < RSS_GROWTH_LIMIT_MIB, f"peak RSS grew by {growth_mib:.1f} MiB"
                assert pool.idle_count == 1
            finally:
                await pool.aclose()

    factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(case(), CASE_TIMEOUT))


@both_loops
async def test_streamed_download_50mb_with_slow_consumer_is_bounded() -> None:
    total = 50 * MiB
    async with app_server() as (url, _app):
        pool = H1Pool(url)
        try:
            base = rss_baseline()
            resp = await pool.request("GET", f"/download?n={total}", HOST)
            received = 0
            largest = 0
            async for chunk in resp.iter_body():
                if not received:
                    await asyncio.sleep(0.3)  # long enough for loopback to deliver it all
                received += len(chunk)
                largest = max(largest, len(chunk))
                await asyncio.sleep(0.001)
            growth_mib = (vm_kib("VmHWM") - base) / 1024
            assert received == total
            # Unconsumed data stays near the 256 KiB high-water mark.
            assert largest <= 1 * MiB
            assert growth_mib < RSS_GROWTH_LIMIT_MIB, f"peak RSS grew by {growth_mib:.1f} MiB"
            assert pool.idle_count == 1
        finally:
            await pool.aclose()


@both_loops
async def test_declared_content_length_mismatch_raises_and_closes() -> None:
    async with app_server() as (url, _app):
        pool = H1Pool(url)
        try:
            for actual in (5, 15):
                hdrs = [*HOST, (b"Content-Length", b"10")]
                with pytest.raises(UpstreamProtocolError) as info:
                    await pool.request("POST", "/echo", hdrs, _blocks(actual, 4))
                assert info.value.sent is True
                assert pool.stats() == {"idle": 0, "open": 0, "waiting": 0}
            with pytest.raises(ValueError):
                await pool.request("POST", "/echo", [*HOST, (b"Content-Length", b"x")], _blocks(1))
        finally:
            await pool.aclose()


@both_loops
async def test_early_response_stops_the_upload() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbig!"
        )
        await wait_for_eof(reader)

    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        block = b"e" * 65536
        for _ in range(4000):  # 250 MiB if nobody stops it
            pulled += 1
            yield block
            await asyncio.sleep(0)

    async with RawServer(handler) as srv:
        pool = H1Pool(srv.url)
        try:
            resp = await pool.request("POST", "/", HOST, endless())
            assert resp.status == 413
            assert await resp.read() == b"big!"
            assert pulled < 1000
            assert pool.open_count == 0
        finally:
            await pool.aclose()


@both_loops
async def test_non_error_early_response_does_not_cut_the_upload() -> None:
    sizes: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            # Answer at once, then keep reading the body (some upstreams do).
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            m = re.search(rb"Content-Length: (\d+)", head)
            sizes.append(len(await reader.readexactly(int(m.group(1))) if m else b""))

    async with RawServer(handler) as srv:
        pool = H1Pool(srv.url)
        try:
            total = 2 * MiB
            hdrs = [*HOST, (b"Content-Length", str(total).encode())]
            resp = await pool.request("POST", "/", hdrs, _blocks(total))
            assert await resp.read() == b"ok"
            assert await (await pool.request("GET", "/", HOST)).read() == b"ok"
            assert sizes == [total, 0]
            assert srv.connections == 1
        finally:
            await pool.aclose()


# -- failures -------------------------------------------------------------------------


@both_loops
async def test_refused_port_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = H1Pool(f"http://127.0.0.1:{port}", name="gone")
    try:
        with pytest.raises(UpstreamConnectError) as info:
            await pool.request("GET", "/", HOST)
        assert info.value.sent is False
        assert info.value.backend == "gone"
        assert pool.open_count == 0
    finally:
        await pool.aclose()


@both_loops
async def test_connect_timeout() -> None:
    # A listener whose accept queue is full drops SYNs: connect() hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    await asyncio.sleep(0.05)
    pool = H1Pool(f"http://127.0.0.1:{port}", connect_timeout=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout) as info:
            await pool.request("GET", "/", HOST)
        assert 0.2 < time.monotonic() - started < 2.0
        assert info.value.sent is False
        assert pool.open_count == 0
    finally:
        await pool.aclose()
        for s in fillers:
            s.close()
        listener.close()


@both_loops
async def test_server_that_never_answers_times_out() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(3600)

    async with RawServer(handler) as srv:
        pool = H1Pool(srv.url, read_timeout=0.5)
        try:
            started = time.monotonic()
            with pytest.raises(UpstreamTimeout) as info:
                await pool.request("GET", "/", HOST)
            assert 0.45 < time.monotonic() - started < 1.5
            assert info.value.sent is True
            assert pool.open_count == 0
        finally:
            await pool.aclose()


@both_loops
async def test_body_read_timeout_between_chunks() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await asyncio.sleep(3600)

    async with RawServer(handler) as srv:
        pool = H1Pool(srv.url, read_timeout=0.3)
        try:
            resp = await pool.request("GET", "/", HOST)
            got = []
            started = time.monotonic()
            with pytest.raises(UpstreamTimeout) as info:
                async for chunk in resp.iter_body():
                    got.append(chunk)
            assert 0.25 < time.monotonic() - started < 1.5
            assert got == [b"0123456789"]
            assert info.value.sent is True
            assert pool.open_count == 0
        finally:
            await pool.aclose()


@both_loops
async def test_server_closing_without_answer_is_a_protocol_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with RawServer(handler) as srv:
        pool = H1Pool(srv.url)
        try:
            with pytest.raises(UpstreamProtocolError) as info:
                await pool.request("GET", "/", HOST)
            assert info.value.sent is True
            assert srv.connections == 1  # a new connection is not retried
        finally:
            await pool.aclose()


@both_loops
async def test_truncated_and_malformed_responses() -> None:
    replies = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc",
        b"HELLO WORLD\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
    ]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(replies[srv.connections - 1])
        await writer.drain()

    async with RawServer(handler) as srv:
        pool = H1Pool(srv.url)
        try:
            for _ in replies:
                with pytest.raises(UpstreamProtocolError) as info:
                    resp = await pool.request("GET", "/", HOST)
                    await resp.read()
                assert info.value.sent is True
                assert pool.open_count == 0
        finally:
            await pool.aclose()


# -- keep-alive lifecycle ----------------------------------------------------------------


@both_loops
async def test_keepalive_race_is_retried_once_on_a_new_connection() -> None:
    bodies: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _head, body = await read_request(reader)
        bodies.append(body)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # The next request on this connection arrives just as the idle timeout
        # fires: the connection is closed without an answer.
        await reader.readuntil(b"\r\n\r\n")

    async with RawServer(handler) as srv:
        pool = H1Pool(srv.url)
        try:
            assert await (await pool.request("GET", "/", HOST)).read() == b"ok"
            assert await (await pool.request("GET", "/", HOST)).read() == b"ok"
            assert srv.connections == 2
            # An idempotent request with a bytes body can be sent again too.
            resp = await pool.request("PUT", "/", HOST, b"payload")
            assert await resp.read() == b"ok"
            assert srv.connections == 3
            assert bodies == [b"", b"", b"payload"]
        finally:
            await pool.aclose()


@both_loops
async def test_keepalive_race_never_resends_a_post() -> None:
    """A POST that met a closed kept-alive connection may have been read: never resend it."""
    bodies: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _head, body = await read_request(reader)
        bodies.append(body)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")

    async with RawServer(handler) as srv:
        pool = H1Pool(srv.url)
        try:
            assert await (await pool.request("GET", "/", HOST)).read() == b"ok"
            with pytest.raises(UpstreamProtocolError) as info:
                await pool.request("POST", "/", HOST, b"payload")
            assert info.value.sent is True
            assert srv.connections == 1
            assert bodies == [b""]
        finally:
            await pool.aclose()


@both_loops
async def test_keepalive_race_with_a_streamed_body_is_not_retried() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")

    async def gen() -> AsyncIterator[bytes]:
        yield b"abc"

    async with RawServer(handler) as srv:
        pool = H1Pool(srv.url)
        try:
            assert await (await pool.request("GET", "/", HOST)).read() == b"ok"
            with pytest.raises(UpstreamProtocolError) as info:
                await pool.request("POST", "/", HOST, gen())
            assert info.value.sent is True
            assert srv.connections == 1
        finally:
            await pool.aclose()


@both_loops
async def test_connection_closed_by_upstream_while_idle_is_discarded() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)  # idle timeout on the upstream side

    async with RawServer(handler) as srv:
        pool = H1Pool(srv.url)
        try:
            assert await (await pool.request("GET", "/", HOST)).read() == b"ok"
            await asyncio.sleep(0.2)
            assert pool.stats() == {"idle": 0, "open": 0, "waiting": 0}
            assert await (await pool.request("GET", "/", HOST)).read() == b"ok"
            assert srv.connections == 2
        finally:
            await pool.aclose()


@both_loops
async def test_idle_connection_older_than_keepalive_timeout_is_not_reused() -> None:
    async with app_server() as (url, app):
        pool = H1Pool(url, keepalive_timeout=0.2)
        try:
            await (await pool.request("GET", "/hello", HOST)).read()
            await (await pool.request("GET", "/hello", HOST)).read()
            await asyncio.sleep(0.3)
            await (await pool.request("GET", "/hello", HOST)).read()
            peers = app[PEERS]
            assert peers[0] == peers[1] != peers[2]
            assert pool.stats() == {"idle": 1, "open": 1, "waiting": 0}
        finally:
            await pool.aclose()


# -- cancellation -------------------------------------------------------------------------


@both_loops
async def test_cancellation_mid_response_closes_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await wait_for_eof(reader)
        srv.closed_by_peer.set()

    async with RawServer(handler) as srv:
        pool = H1Pool(srv.url)
        got_first = asyncio.Event()

        async def proxy_one() -> None:
            resp = await pool.request("GET", "/", HOST)
            async for _chunk in resp.iter_body():
                got_first.set()

        try:
            task = asyncio.create_task(proxy_one())
            await asyncio.wait_for(got_first.wait(), 2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert pool.stats() == {"idle": 0, "open": 0, "waiting": 0}
            await asyncio.wait_for(srv.closed_by_peer.wait(), 2)
        finally:
            await pool.aclose()


@both_loops
async def test_cancellation_while_waiting_for_the_head_closes_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await wait_for_eof(reader)
        srv.closed_by_peer.set()

    async with RawServer(handler) as srv:
        pool = H1Pool(srv.url)
        try:
            task = asyncio.create_task(pool.request("GET", "/", HOST))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert pool.open_count == 0
            await asyncio.wait_for(srv.closed_by_peer.wait(), 2)
        finally:
            await pool.aclose()


@both_loops
async def test_slot_accounting_survives_random_cancellations() -> None:
    rng = random.Random(1234)
    async with app_server() as (url, app):
        pool = H1Pool(url, max_connections=5, connect_timeout=5.0)

        async def one(path: str) -> None:
            resp = await pool.request("GET", path, HOST)
            async for _ in resp.iter_body():
                await asyncio.sleep(0)

        peak = 0

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, pool.open_count)
                await asyncio.sleep(0.001)

        sampler = asyncio.create_task(sample())
        try:
            tasks = []
            for _ in range(200):
                path = rng.choice(["/slow", "/chunked", "/hello", "/download?n=300000"])
                task = asyncio.create_task(one(path))
                tasks.append(task)
                if rng.random() < 0.4:
                    asyncio.get_running_loop().call_later(rng.random() * 0.05, task.cancel)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results)
            assert any(isinstance(r, asyncio.CancelledError) for r in results)
            assert pool.waiting_count == 0
            assert pool.open_count == pool.idle_count <= 5
            assert peak <= 5
            before = len(app[PEERS])
            await asyncio.gather(*(one("/slow") for _ in range(10)))
            assert distinct_peers(app, since=before) <= 5
        finally:
            sampler.cancel()
            await pool.aclose()


# -- validation and shutdown -------------------------------------------------------------


@both_loops
async def test_invalid_input_is_rejected() -> None:
    with pytest.raises(ValueError):
        H1Pool("https://example.test")
    with pytest.raises(ValueError):
        H1Pool("ftp://example.test")
    pool = H1Pool("http://127.0.0.1:9")
    try:
        for method, target, hdrs in [
            ("GET", "/a b", HOST),
            ("GET", "/a\r\nX-Evil: 1", HOST),
            ("GET", "/", [(b"Host", b"h\r\nX-Evil: 1")]),
            ("GET", "/", [(b"X-Evil\n", b"1")]),
            ("GE T", "/", HOST),
            ("GET", "", HOST),
        ]:
            with pytest.raises(ValueError):
                await pool.request(method, target, hdrs)
        assert pool.open_count == 0
    finally:
        await pool.aclose()


@both_loops
async def test_aclose_fails_later_requests_and_in_flight_ones() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(3600)

    async with RawServer(handler) as srv:
        pool = H1Pool(srv.url)
        task = asyncio.create_task(pool.request("GET", "/", HOST))
        await asyncio.sleep(0.05)
        await pool.aclose()
        with pytest.raises(UpstreamProtocolError):
            await task
        with pytest.raises(UpstreamConnectError) as info:
            await pool.request("GET", "/", HOST)
        assert info.value.sent is False
        assert pool.open_count == 0
