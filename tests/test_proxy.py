"""The proxy port end to end: paths, headers, errors, limits, methods, metrics.

Every test talks to a real gateway process (``strangler serve``) in front of
the real stub backends on 127.0.0.1. Most tests share one gateway whose route
file is built below; tests that need other server settings start their own.

The ``echo`` backend is the monolith with ``/__stub/echo`` as its base path,
so a request forwarded as ``/api/admin`` arrives as ``/__stub/echo/api/admin``
and the stub reports it exactly as it came off the wire.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from gateway import GatewayProcess, route_file
from threaded_server import ThreadedServer

from legacy_stub.testing import free_port, stub_url
from strangler.exceptions import UpstreamConnectError, UpstreamProtocolError
from strangler.upstream import CLIENTS, create_pool

pytestmark = pytest.mark.timeout(60)

ECHO = "/__stub/echo"
TIMEOUT = httpx.Timeout(5.0)
HOP_BY_HOP = ("connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade")
# What must never leak from the gateway's internals into an error body.
LEAK_MARKERS = (
    "Traceback",
    "Exception",
    "aiohttp",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ClientOSError",
    "TimeoutError",
    'File "',
)


# ---------------------------------------------------------------- a raw backend


class RawBackend(ThreadedServer):
    """A hand-written HTTP/1.1 backend, for responses the stubs cannot give.

    ``GET /raw/hop`` answers with hop-by-hop headers (including one named in
    ``Connection``) next to ordinary ones and three ``Set-Cookie`` lines;
    ``/raw/truncated-length`` and ``/raw/truncated-chunked`` hang up after
    100 KB of a longer body; ``/raw/trickle`` sends one chunk, then a second
    only after ``TRICKLE_PAUSE`` seconds; ``/raw/status-999`` is not HTTP;
    ``/cachedraw/truncated`` is a cacheable response that hangs up early.
    Runs its own event loop in a thread; every connection is closed after one
    response.
    """

    HOP_RESPONSE = (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/plain\r\n"
        b"Content-Length: 2\r\n"
        b"Connection: keep-alive, X-Secret\r\n"
        b"X-Secret: 1\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Trailer: X-Checksum\r\n"
        b"TE: trailers\r\n"
        b"Upgrade: h2c\r\n"
        b"Set-Cookie: a=1; Path=/\r\n"
        b"Set-Cookie: b=2; Path=/\r\n"
        b"Set-Cookie: c=3; Path=/\r\n"
        b"X-Kept: yes\r\n"
        b"\r\n"
        b"ok"
    )
    PART = b"p" * 100_000
    TRUNCATED_LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + PART
    TRUNCATED_CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (
        len(PART),
        PART,
    )
    CACHED_TRUNCATED = (
        b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 1000\r\n\r\n" + b"p" * 100
    )
    STATUS_999 = b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n"
    TRICKLE_PAUSE = 1.5
    NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1]
            if target == b"/raw/trickle":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                await writer.drain()
                await asyncio.sleep(self.TRICKLE_PAUSE)
                writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
                await writer.drain()
                return
            writer.write(
                {
                    b"/raw/hop": self.HOP_RESPONSE,
                    b"/raw/truncated-length": self.TRUNCATED_LENGTH,
                    b"/raw/truncated-chunked": self.TRUNCATED_CHUNKED,
                    b"/raw/status-999": self.STATUS_999,
                    b"/cachedraw/truncated": self.CACHED_TRUNCATED,
                }.get(target, self.NOT_FOUND)
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture(scope="module")
def raw_backend() -> Iterator[RawBackend]:
    backend = RawBackend().start()
    yield backend
    backend.stop()


# ---------------------------------------------------------------- the gateway

MAX_BODY = 1024 * 1024
MAX_HEADER_COUNT = 30
MAX_HEADER_BYTES = 4096


def _routes(monolith: str, raw: str, refused: str) -> dict[str, Any]:
    def route(name: str, prefix: str, backend: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "match": {"path_prefix": prefix},
            "backends": [{"name": backend, "weight": 100}],
            **extra,
        }

    cfg = route_file(
        {
            "echo": monolith + ECHO,
            "legacy": monolith,
            "flaky": monolith,
            "slow": monolith,
            "raw": raw,
            "gone": refused,
        },
        [
            route("orders", "/api/orders", "echo"),
            route("admin", "/api/admin", "echo"),
            route("files", "/files", "echo", allow_encoded_slash=True),
            route("preserved", "/preserved", "echo", preserve_host=True),
            route("stripped", "/svc", "echo", rewrite={"strip_prefix": "/svc"}),
            route(
                "renamed",
                "/old",
                "echo",
                rewrite={"replace_prefix": {"from": "/old", "to": "/new"}},
            ),
            route("echo", "/echo", "echo", rewrite={"strip_prefix": "/echo"}),
            route("stub", "/__stub", "legacy"),
            route("upload", "/api/upload", "legacy"),
            route("slow", "/api/slow", "slow"),
            route("dropped", "/api/dropped", "flaky"),
            route("raw", "/raw", "raw"),
            route("cachedraw", "/cachedraw", "raw", cache={}),
            route("gone", "/gone", "gone"),
        ],
        limits={
            "max_body_bytes": MAX_BODY,
            "max_header_count": MAX_HEADER_COUNT,
            "max_header_bytes": MAX_HEADER_BYTES,
        },
    )
    cfg["backends"]["slow"]["timeouts"] = {"connect": "1s", "read": "300ms"}
    return cfg


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, monolith: str, raw_backend: RawBackend
) -> Iterator[GatewayProcess]:
    directory = tmp_path_factory.mktemp("proxy-gateway")
    refused = stub_url(free_port())
    proc = GatewayProcess(directory, _routes(monolith, raw_backend.url, refused)).start()
    yield proc
    proc.stop(timeout=10)


@pytest.fixture
def client(gw: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=TIMEOUT) as c:
        yield c


def raw_get(base_url: str, target: str) -> httpx.Response:
    """GET ``target`` byte for byte (http.client neither normalizes nor re-encodes it)."""
    url = httpx.URL(base_url)
    assert url.host and url.port
    conn = http.client.HTTPConnection(url.host, url.port, timeout=5)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        content = resp.read()
        return httpx.Response(resp.status, headers=resp.getheaders(), content=content)
    finally:
        conn.close()


def header_values(echo: dict[str, Any], name: str) -> list[str]:
    """Values of ``name`` (any case) in an echo report, in order."""
    return [v for n, v in echo["headers"] if n.lower() == name.lower()]


def assert_clean_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    """A small JSON error from the gateway: error, message, request_id; nothing internal."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    for marker in LEAK_MARKERS:
        assert marker not in resp.text
    body: dict[str, Any] = resp.json()
    assert set(body) == {"error", "message", "request_id"}
    assert body["request_id"] == resp.headers["x-request-id"]
    assert len(resp.content) < 512
    return body


# ---------------------------------------------------------------- paths


def test_raw_requests_put_the_target_on_the_wire_unchanged(monolith: str) -> None:
    # The path tests below rely on this: sent straight to the stub, nothing is normalized.
    resp = raw_get(monolith, ECHO + "/api/orders/../admin//x/%61%2F")
    assert resp.json()["path"] == ECHO + "/api/orders/../admin//x/%61%2F"


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        ("/api/orders/../admin", "/api/admin"),
        ("/api/orders/./../admin/./x", "/api/admin/x"),
        ("//api///admin//x", "/api/admin/x"),
        ("/api/%61dmin/%7Euser", "/api/admin/~user"),
        ("/api/orders/%2e%2e/admin", "/api/admin"),
        ("/api/orders/../../../../api/admin", "/api/admin"),
    ],
)
def test_paths_are_normalized_before_matching_and_forwarding(
    gw: GatewayProcess, target: str, forwarded: str
) -> None:
    resp = raw_get(gw.url, target)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-strangler-route"] == "admin"
    assert resp.json()["path"] == ECHO + forwarded


def test_query_string_is_forwarded_untouched(gw: GatewayProcess) -> None:
    resp = raw_get(gw.url, "/api/admin/x?a=%2F&b=..%2F&a=2")
    assert resp.json()["target"] == ECHO + "/api/admin/x?a=%2F&b=..%2F&a=2"


@pytest.mark.parametrize("target", ["/api/admin/a%2Fb", "/api/admin/a%2fb", "/api/admin/a%5Cb"])
def test_encoded_slash_is_refused_by_default(gw: GatewayProcess, target: str) -> None:
    body = assert_clean_error(raw_get(gw.url, target), 400)
    assert body["error"] == "bad_path"


def test_backslash_in_path_is_refused_by_default(gw: GatewayProcess) -> None:
    body = assert_clean_error(raw_get(gw.url, "/api/admin/a\\b"), 400)
    assert body["error"] == "bad_path"


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [("/files/a%2Fb/c%2fd", "/files/a%2Fb/c%2Fd"), ("/files/a\\b%5C", "/files/a%5Cb%5C")],
)
def test_encoded_slash_is_forwarded_encoded_when_the_route_allows_it(
    gw: GatewayProcess, target: str, forwarded: str
) -> None:
    resp = raw_get(gw.url, target)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-strangler-route"] == "files"
    assert resp.json()["path"] == ECHO + forwarded


def test_request_matching_no_route_gets_a_json_404(client: httpx.Client) -> None:
    resp = client.get("/nowhere/at/all", headers={"X-Request-ID": "lost-1"})
    body = assert_clean_error(resp, 404)
    assert body["error"] == "no_route"
    assert body["request_id"] == "lost-1"
    assert "x-strangler-route" not in resp.headers


def test_health_endpoint_answers_on_the_proxy_port(client: httpx.Client) -> None:
    resp = client.get("/__strangler/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}


# ---------------------------------------------------------------- headers


def test_hop_by_hop_headers_are_not_forwarded(client: httpx.Client) -> None:
    resp = client.get(
        "/echo/hop",
        headers={
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "s3cret",
            "Keep-Alive": "timeout=5",
            "Proxy-Connection": "keep-alive",
            "TE": "trailers",
            "Trailer": "X-Checksum",
            "Upgrade": "h2c",
            "X-Kept": "yes",
        },
    )
    assert resp.status_code == 200, resp.text
    echo = resp.json()
    names = {n.lower() for n, _ in echo["headers"]}
    for name in (*HOP_BY_HOP, "x-secret"):
        assert name not in names, f"{name} was forwarded"
    assert header_values(echo, "x-kept") == ["yes"]


def test_hop_by_hop_response_headers_are_not_returned(client: httpx.Client) -> None:
    resp = client.get("/raw/hop")
    assert resp.status_code == 200
    assert resp.text == "ok"
    for name in ("x-secret", "keep-alive", "proxy-connection", "trailer", "te", "upgrade"):
        assert name not in resp.headers, f"{name} leaked to the client"
    assert "x-secret" not in resp.headers.get("connection", "").lower()
    assert resp.headers["x-kept"] == "yes"


def test_repeated_set_cookie_headers_are_kept(client: httpx.Client) -> None:
    from_stub = client.get("/__stub/cookies")
    assert from_stub.status_code == 200
    assert [c.split(";")[0] for c in from_stub.headers.get_list("set-cookie")] == [
        "a=1",
        "b=2",
        "c=3",
    ]
    from_raw = client.get("/raw/hop")
    assert from_raw.headers.get_list("set-cookie") == [
        "a=1; Path=/",
        "b=2; Path=/",
        "c=3; Path=/",
    ]


def test_forged_x_forwarded_for_is_dropped_from_an_untrusted_peer(client: httpx.Client) -> None:
    echo = client.get("/echo/xff", headers={"X-Forwarded-For": "1.2.3.4"}).json()
    assert header_values(echo, "x-forwarded-for") == ["127.0.0.1"]


def test_x_forwarded_for_is_appended_for_a_trusted_peer(
    gateway: Callable[..., GatewayProcess], monolith: str
) -> None:
    trusted = gateway(
        route_file(
            {"echo": monolith + ECHO},
            [
                {
                    "name": "all",
                    "match": {"path_prefix": "/"},
                    "backends": [{"name": "echo", "weight": 1}],
                }
            ],
            trusted_proxies=["127.0.0.1/32"],
        )
    )
    resp = httpx.get(
        trusted.url + "/x",
        headers={
            "X-Forwarded-For": "1.2.3.4",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "shop.example.com",
        },
        timeout=TIMEOUT,
    )
    echo = resp.json()
    assert header_values(echo, "x-forwarded-for") == ["1.2.3.4, 127.0.0.1"]
    assert header_values(echo, "x-forwarded-proto") == ["https"]
    assert header_values(echo, "x-forwarded-host") == ["shop.example.com"]


def test_x_forwarded_proto_and_host_are_set(gw: GatewayProcess, client: httpx.Client) -> None:
    echo = client.get(
        "/echo/fwd", headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"}
    ).json()
    assert header_values(echo, "x-forwarded-proto") == ["http"]
    assert header_values(echo, "x-forwarded-host") == [f"127.0.0.1:{gw.port}"]


def test_request_id_from_the_client_is_kept(client: httpx.Client) -> None:
    resp = client.get("/echo/rid", headers={"X-Request-ID": "abc-123"})
    assert resp.headers["x-request-id"] == "abc-123"
    assert header_values(resp.json(), "x-request-id") == ["abc-123"]


def test_request_id_is_generated_when_missing(client: httpx.Client) -> None:
    first = client.get("/echo/rid")
    second = client.get("/echo/rid")
    generated = first.headers["x-request-id"]
    assert len(generated) >= 16
    assert header_values(first.json(), "x-request-id") == [generated]
    assert second.headers["x-request-id"] != generated


def test_invalid_request_id_is_replaced(client: httpx.Client) -> None:
    resp = client.get("/echo/rid", headers={"X-Request-ID": "x" * 300})
    generated = resp.headers["x-request-id"]
    assert generated != "x" * 300
    assert header_values(resp.json(), "x-request-id") == [generated]


def test_backend_host_is_sent_by_default(monolith: str, client: httpx.Client) -> None:
    echo = client.get("/echo/host", headers={"Host": "shop.example.com"}).json()
    assert header_values(echo, "host") == [httpx.URL(monolith).netloc.decode()]


def test_preserve_host_forwards_the_clients_host(client: httpx.Client) -> None:
    echo = client.get("/preserved/x", headers={"Host": "shop.example.com"}).json()
    assert header_values(echo, "host") == ["shop.example.com"]


def test_strip_prefix_rewrites_the_forwarded_path(client: httpx.Client) -> None:
    assert client.get("/svc/orders/7").json()["path"] == ECHO + "/orders/7"
    assert client.get("/svc").json()["path"] == ECHO + "/"


def test_replace_prefix_rewrites_the_forwarded_path(client: httpx.Client) -> None:
    resp = client.get("/old/items/3", params={"q": "1"})
    assert resp.headers["x-strangler-route"] == "renamed"
    assert resp.json()["target"] == ECHO + "/new/items/3?q=1"


def test_response_carries_via_and_debug_headers(client: httpx.Client) -> None:
    resp = client.get("/echo/debug")
    assert resp.headers["x-strangler-route"] == "echo"
    assert resp.headers["x-strangler-backend"] == "echo"
    assert header_values(resp.json(), "via") == ["1.1 strangler"]


# ---------------------------------------------------------------- upstream failures


def test_refused_connection_answers_502(gw: GatewayProcess, client: httpx.Client) -> None:
    before = gw.metric("strangler_upstream_errors_total", backend="gone", kind="connect")
    resp = client.get("/gone/x")
    body = assert_clean_error(resp, 502)
    assert body["error"] == "upstream_unavailable"
    after = gw.metric("strangler_upstream_errors_total", backend="gone", kind="connect")
    assert after == before + 1


def test_slow_backend_answers_504_after_its_read_timeout(
    gw: GatewayProcess, client: httpx.Client
) -> None:
    before = gw.metric("strangler_upstream_errors_total", backend="slow", kind="timeout")
    started = time.monotonic()
    resp = client.get("/api/slow", params={"ms": 3000})
    elapsed = time.monotonic() - started
    body = assert_clean_error(resp, 504)
    assert body["error"] == "upstream_timeout"
    assert elapsed < 2.0
    after = gw.metric("strangler_upstream_errors_total", backend="slow", kind="timeout")
    assert after == before + 1


@pytest.mark.usefixtures("clean_stubs")
@pytest.mark.parametrize("mode", ["reset", "close"])
def test_backend_dropping_the_connection_answers_502(
    gw: GatewayProcess, monolith: str, client: httpx.Client, mode: str
) -> None:
    httpx.put(
        monolith + "/__stub/faults",
        json={"prefix": "/api/dropped", "drop_rate": 1, "drop_mode": mode},
        timeout=TIMEOUT,
    ).raise_for_status()
    before = gw.metric("strangler_upstream_errors_total", backend="flaky", kind="protocol")
    resp = client.get("/api/dropped")
    body = assert_clean_error(resp, 502)
    assert body["error"] == "upstream_unavailable"
    after = gw.metric("strangler_upstream_errors_total", backend="flaky", kind="protocol")
    assert after == before + 1
    # The gateway itself is fine afterwards.
    assert client.get("/echo/after").status_code == 200


def test_a_status_that_is_not_http_answers_502(gw: GatewayProcess, client: httpx.Client) -> None:
    before = gw.metric("strangler_upstream_errors_total", backend="raw", kind="protocol")
    body = assert_clean_error(client.get("/raw/status-999"), 502)
    assert body["error"] == "upstream_unavailable"
    after = gw.metric("strangler_upstream_errors_total", backend="raw", kind="protocol")
    assert after == before + 1


def test_a_body_breaking_off_while_the_cache_reads_it_answers_502(
    gw: GatewayProcess, client: httpx.Client
) -> None:
    # The cache reads a small body whole before answering, so nothing was sent
    # yet: the client gets a clean 502 rather than a truncated 200.
    before = gw.metric("strangler_upstream_errors_total", backend="raw", kind="protocol")
    body = assert_clean_error(client.get("/cachedraw/truncated"), 502)
    assert body["error"] == "upstream_unavailable"
    after = gw.metric("strangler_upstream_errors_total", backend="raw", kind="protocol")
    assert after == before + 1
    assert client.get("/echo/after").status_code == 200


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_backend_failing_mid_body_truncates_the_response(
    gw: GatewayProcess, client: httpx.Client, framing: str
) -> None:
    before = gw.metric("strangler_upstream_errors_total", backend="raw", kind="protocol")
    received = 0
    with pytest.raises(httpx.RemoteProtocolError):  # never a complete-looking response
        with client.stream("GET", f"/raw/truncated-{framing}") as resp:
            assert resp.status_code == 200
            for chunk in resp.iter_raw():
                received += len(chunk)
    assert received <= len(RawBackend.PART)
    after = gw.metric("strangler_upstream_errors_total", backend="raw", kind="protocol")
    assert after == before + 1
    assert client.get("/echo/after").status_code == 200


def test_each_body_chunk_is_forwarded_as_soon_as_it_arrives(client: httpx.Client) -> None:
    started = time.monotonic()
    with client.stream("GET", "/raw/trickle") as resp:
        chunks = resp.iter_raw()
        first = next(chunks)
        first_at = time.monotonic() - started
        rest = b"".join(chunks)
    assert first == b"first"
    assert rest == b"second"
    # The first chunk must not wait for the second one.
    assert first_at < RawBackend.TRICKLE_PAUSE * 0.5


@pytest.mark.parametrize("client_kind", sorted(CLIENTS))
async def test_refused_upstream_is_reported_as_not_sent(refused_url: str, client_kind: str) -> None:
    async def streamed() -> AsyncIterator[bytes]:
        yield b"payload"

    pool = create_pool("gone", refused_url, client=client_kind)
    await pool.start()
    try:
        for body in (None, b"payload", streamed()):
            with pytest.raises(UpstreamConnectError) as info:
                await pool.send("POST", "/x", [(b"host", pool.host_header)], body)
            assert info.value.sent is False
    finally:
        await pool.close()


@pytest.mark.parametrize("client_kind", sorted(CLIENTS))
async def test_request_that_reached_the_backend_is_reported_as_sent(client_kind: str) -> None:
    heads: list[bytes] = []

    async def read_head_then_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    async def empty() -> AsyncIterator[bytes]:
        return
        yield b""  # pragma: no cover - makes this an async generator

    async def one_chunk() -> AsyncIterator[bytes]:
        yield b"payload"

    server = await asyncio.start_server(read_head_then_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = create_pool("closer", stub_url(port), client=client_kind)
    await pool.start()
    try:
        for body in (None, b"payload", one_chunk(), empty()):
            with pytest.raises(UpstreamProtocolError) as info:
                await pool.send("POST", "/x", [(b"host", pool.host_header)], body)
            assert info.value.sent is True, f"body {body!r}"
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()
    assert len(heads) == 4


# ---------------------------------------------------------------- limits


def stub_hits(monolith: str, path: str) -> int:
    stats = httpx.get(monolith + "/__stub/stats", timeout=TIMEOUT).json()
    return int(stats["by_path"].get(path, 0))


@pytest.mark.usefixtures("clean_stubs")
def test_body_over_the_limit_with_content_length_is_refused_before_forwarding(
    monolith: str, client: httpx.Client
) -> None:
    resp = client.post("/api/upload", content=b"x" * (MAX_BODY + 1))
    body = assert_clean_error(resp, 413)
    assert body["error"] == "body_too_large"
    assert stub_hits(monolith, "/api/upload") == 0


@pytest.mark.usefixtures("clean_stubs")
def test_body_at_the_limit_is_forwarded(client: httpx.Client) -> None:
    data = bytes(range(256)) * (MAX_BODY // 256)
    resp = client.post("/api/upload", content=data)
    assert resp.status_code == 200, resp.text
    assert resp.json()["sha256"] == hashlib.sha256(data).hexdigest()


def test_chunked_body_over_the_limit_is_refused_with_413(client: httpx.Client) -> None:
    def body() -> Iterator[bytes]:
        for _ in range(8 * MAX_BODY // 65536):
            yield b"y" * 65536

    started = time.monotonic()
    resp = client.post("/api/upload", content=body())
    assert time.monotonic() - started < 4
    assert "content-length" not in resp.request.headers
    body_json = assert_clean_error(resp, 413)
    assert body_json["error"] == "body_too_large"
    # The same backend (its pool dropped the half-sent connection) still works.
    after = client.post("/api/upload", content=b"ok")
    assert after.status_code == 200, after.text
    assert after.json()["bytes"] == 2


def test_too_many_headers_are_refused_with_431(client: httpx.Client) -> None:
    headers = {f"X-Extra-{i}": "1" for i in range(MAX_HEADER_COUNT)}
    body = assert_clean_error(client.get("/echo/h", headers=headers), 431)
    assert body["error"] == "headers_too_large"


def test_oversized_headers_are_refused_with_431(client: httpx.Client) -> None:
    body = assert_clean_error(client.get("/echo/h", headers={"X-Big": "b" * MAX_HEADER_BYTES}), 431)
    assert body["error"] == "headers_too_large"
    assert client.get("/echo/h", headers={"X-Big": "b" * 1000}).status_code == 200


# ---------------------------------------------------------------- methods and bodies


def test_post_json_body_is_forwarded_intact(client: httpx.Client) -> None:
    payload = json.dumps({"user_id": 7, "items": [{"item_id": 1, "qty": 2}], "note": "ünï"})
    data = payload.encode()
    resp = client.post("/echo/orders", content=data, headers={"Content-Type": "application/json"})
    echo = resp.json()
    assert echo["method"] == "POST"
    assert echo["body_bytes"] == len(data)
    assert echo["body_sha256"] == hashlib.sha256(data).hexdigest()
    assert header_values(echo, "content-type") == ["application/json"]


def test_chunked_request_body_is_streamed_through(client: httpx.Client) -> None:
    chunks = [bytes([i]) * 70_000 for i in range(5)]
    resp = client.put("/echo/stream", content=iter(chunks))
    echo = resp.json()
    assert echo["method"] == "PUT"
    assert echo["body_sha256"] == hashlib.sha256(b"".join(chunks)).hexdigest()


def test_head_request_gets_headers_and_no_body(client: httpx.Client) -> None:
    get = client.get("/echo/head")
    head = client.head("/echo/head")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert "x-request-id" in head.headers


@pytest.mark.parametrize("status", [204, 304])
def test_bodyless_statuses_pass_through(client: httpx.Client, status: int) -> None:
    resp = client.get(f"/__stub/status/{status}")
    assert resp.status_code == status
    assert resp.content == b""
    # The connection is still usable.
    assert client.get("/__stub/status/200").status_code == 200


def test_error_statuses_from_the_backend_are_passed_through(client: httpx.Client) -> None:
    resp = client.get("/__stub/status/503")
    assert resp.status_code == 503
    assert resp.json() == {"status": 503, "service": "monolith"}


# ---------------------------------------------------------------- metrics


def test_requests_are_counted_by_route_backend_and_status_class(
    gw: GatewayProcess, client: httpx.Client
) -> None:
    def count(status_class: str) -> float:
        return gw.metric(
            "strangler_requests_total", route="stub", backend="legacy", status_class=status_class
        )

    ok, server_errors = count("2xx"), count("5xx")
    for _ in range(3):
        client.get("/__stub/status/200")
    client.get("/__stub/status/500")
    assert count("2xx") == ok + 3
    assert count("5xx") == server_errors + 1
