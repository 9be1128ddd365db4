"""Pieces both stub apps share: JSON responses and the ``/__stub`` test endpoints.

The test endpoints exist to observe the gateway from the backend's side:
``/__stub/echo`` reports the request exactly as it arrived (raw path, header
order and repeats, body size and hash), ``/__stub/status/{code}`` answers with
any status, and ``/__stub/cookies`` sends several ``Set-Cookie`` headers.
Their answers carry no noise fields, since they describe the request rather
than shop data.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from legacy_stub.data import noise

__all__ = [
    "SERVICE_KEY",
    "BadQuery",
    "api_errors_middleware",
    "error_response",
    "install_common",
    "json_with_noise",
    "query_int",
]

logger = logging.getLogger(__name__)

SERVICE_KEY = web.AppKey("service", str)
ECHO_BODY_TEXT_LIMIT = 64 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_with_noise(payload: dict[str, Any], *, status: int = 200) -> web.Response:
    """A JSON response with ``generated_at`` and ``trace_id`` added at top level."""
    payload.update(noise())
    return web.json_response(payload, status=status)


def error_response(status: int, code: str, detail: str) -> web.Response:
    return json_with_noise({"error": code, "detail": detail}, status=status)


class BadQuery(ValueError):
    """A malformed query parameter; `api_errors_middleware` turns it into a JSON 400."""


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter; raise `BadQuery` if it is malformed or out of range."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadQuery(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise BadQuery(f"{name} must be in {low}..{high}")
    return value


@web.middleware
async def api_errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bad queries and unknown ``/api`` routes answer JSON, as an API would.

    Without this, aiohttp answers unknown routes in plain text.
    """
    try:
        return await handler(request)
    except BadQuery as exc:
        return error_response(400, "bad_request", str(exc))
    except web.HTTPNotFound as exc:
        if not request.path.startswith("/api/"):
            raise
        return error_response(exc.status, "not_found", exc.reason)
    except web.HTTPMethodNotAllowed as exc:
        if not request.path.startswith("/api/"):
            raise
        response = error_response(exc.status, "method_not_allowed", exc.reason)
        response.headers["Allow"] = exc.headers.get("Allow", "")
        return response


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def echo(request: web.Request) -> web.Response:
    """Describe the request as received; the body is read streaming, never buffered whole."""
    digest = hashlib.sha256()
    size = 0
    head = bytearray()
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        digest.update(chunk)
        if len(head) <= ECHO_BODY_TEXT_LIMIT:
            head += chunk[: ECHO_BODY_TEXT_LIMIT + 1 - len(head)]
    body_text: str | None = None
    if len(head) <= ECHO_BODY_TEXT_LIMIT:
        try:
            body_text = head.decode("utf-8")
        except UnicodeDecodeError:
            body_text = None
    target = request.raw_path
    path, _, query_string = target.partition("?")
    version = request.version
    return web.json_response(
        {
            "service": request.app[SERVICE_KEY],
            "method": request.method,
            "path": path,
            "query_string": query_string,
            "target": target,
            "http_version": f"{version.major}.{version.minor}",
            "remote": request.remote,
            "headers": [[_decode(name), _decode(value)] for name, value in request.raw_headers],
            "body_bytes": size,
            "body_sha256": digest.hexdigest(),
            "body_text": body_text,
        }
    )


async def status(request: web.Request) -> web.StreamResponse:
    """Answer with the requested status; ``?location=`` adds a Location header."""
    try:
        code = int(request.match_info["code"])
    except ValueError:
        code = 0
    if not 200 <= code <= 599:
        return web.json_response(
            {"error": "bad_request", "detail": "status must be 200..599"}, status=400
        )
    headers = {}
    if "location" in request.query:
        headers["Location"] = request.query["location"]
    if code in _NO_BODY_STATUSES:
        return web.Response(status=code, headers=headers)
    return web.json_response(
        {"status": code, "service": request.app[SERVICE_KEY]}, status=code, headers=headers
    )


async def cookies(request: web.Request) -> web.Response:
    response = web.json_response({"cookies": ["a", "b", "c"]})
    for name, value in (("a", "1"), ("b", "2"), ("c", "3")):
        response.set_cookie(name, value, path="/")
    return response


CACHEABLE_KEY = web.AppKey("cacheable_hits", dict)


async def cacheable(request: web.Request) -> web.StreamResponse:
    """A response whose caching headers the query sets, for cache tests.

    ``?h=Name:Value`` (repeatable) adds a response header; ``?status=N`` sets
    the status; ``?size=N`` pads the body to about N bytes. Conditional
    requests are answered 304 when ``If-None-Match`` matches the ETag set or
    ``If-Modified-Since`` is not older than the Last-Modified set. The body
    counts the hits on this exact target (``n``) and echoes the request's
    ``Accept-Language`` and ``Authorization`` presence, so a test can tell a
    cached answer from a fresh one.
    """
    hits: dict[str, int] = request.app[CACHEABLE_KEY]
    target = request.raw_path
    hits[target] = hits.get(target, 0) + 1
    headers: list[tuple[str, str]] = []
    for item in request.query.getall("h", []):
        name, sep, value = item.partition(":")
        if sep:
            headers.append((name.strip(), value.strip()))
    names = {n.lower(): v for n, v in headers}
    etag = names.get("etag")
    inm = request.headers.get("If-None-Match")
    lm = names.get("last-modified")
    ims = request.headers.get("If-Modified-Since")
    not_modified = False
    if inm is not None and etag is not None:
        not_modified = etag in [t.strip() for t in inm.split(",")]
    elif ims is not None and lm is not None:
        since = parsedate_to_datetime_or_none(ims)
        modified = parsedate_to_datetime_or_none(lm)
        not_modified = since is not None and modified is not None and modified <= since
    if not_modified:
        response = web.Response(status=304)
    else:
        code = int(request.query.get("status", "200"))
        payload = {
            "service": request.app[SERVICE_KEY],
            "target": target,
            "n": hits[target],
            "accept_language": request.headers.get("Accept-Language"),
            "authorized": "Authorization" in request.headers,
            "method": request.method,
        }
        size = int(request.query.get("size", "0"))
        if size:
            payload["pad"] = "x" * size
        response = web.json_response(payload, status=code)
    for name, value in headers:
        response.headers.add(name, value)
    return response


def parsedate_to_datetime_or_none(value: str) -> Any:
    import email.utils

    try:
        return email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None


def install_common(app: web.Application, service: str) -> None:
    """Register ``/healthz`` and the ``/__stub`` test endpoints."""
    app[SERVICE_KEY] = service
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/__stub/echo", echo)
    app.router.add_route("*", "/__stub/echo/{tail:.*}", echo)
    app.router.add_route("*", r"/__stub/status/{code}", status)
    app.router.add_get("/__stub/cookies", cookies)
    app[CACHEABLE_KEY] = {}
    app.router.add_route("*", "/__stub/cacheable/{tail:.*}", cacheable)
