"""The stand-in legacy monolith: a small shop the gateway migrates away from.

It has the traits that make a real migration hard, on purpose: cookie
sessions (two ``Set-Cookie`` headers on login), streaming uploads and
downloads far bigger than memory should hold, slow endpoints, noisy response
fields, and the orders API that the orders service re-implements.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import logging
import secrets
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from legacy_stub import faults
from legacy_stub.common import (
    api_errors_middleware,
    error_response,
    install_common,
    json_with_noise,
    query_int,
)
from legacy_stub.data import (
    ITEMS,
    ITEMS_BY_ID,
    MAX_DOWNLOAD_SIZE,
    PASSWORD,
    USERS_BY_ID,
    USERS_BY_NAME,
    download_pattern,
)
from legacy_stub.orders import STORE_KEY, add_order_routes

__all__ = ["SESSION_COOKIE", "CSRF_COOKIE", "SALES_REPORT_DELAY", "create_monolith_app"]

logger = logging.getLogger(__name__)

SESSION_COOKIE = "session"
CSRF_COOKIE = "csrftoken"
SALES_REPORT_DELAY = 0.3
MAX_SLOW_MS = 60_000
UPLOAD_CHUNK = 65536

SESSIONS_KEY = web.AppKey("sessions", dict[str, int])

_CATEGORIES = sorted({item.category for item in ITEMS})


async def _home(request: web.Request) -> web.Response:
    links = "".join(
        f'<li><a href="/api/items?category={c}">{html.escape(c.title())}</a></li>'
        for c in _CATEGORIES
    )
    body = (
        '<!doctype html><html><head><meta charset="utf-8"><title>Legacy Shop</title></head>'
        f"<body><h1>Legacy Shop</h1><ul>{links}</ul>"
        '<p><a href="/api/orders">Orders</a> &middot; <a href="/api/me">My account</a></p>'
        "</body></html>"
    )
    return web.Response(text=body, content_type="text/html")


async def _list_items(request: web.Request) -> web.Response:
    limit = query_int(request, "limit", 20, 1, 100)
    offset = query_int(request, "offset", 0, 0, 2**31)
    category = request.query.get("category") or None
    matching = [i for i in ITEMS if category is None or i.category == category]
    return json_with_noise(
        {
            "items": [i.to_json() for i in matching[offset : offset + limit]],
            "count": len(matching),
            "limit": limit,
            "offset": offset,
        }
    )


async def _get_item(request: web.Request) -> web.Response:
    item_id = int(request.match_info["id"])
    item = ITEMS_BY_ID.get(item_id)
    if item is None:
        return error_response(404, "not_found", f"no item with id {item_id}")
    return json_with_noise(item.to_json())


async def _get_user(request: web.Request) -> web.Response:
    user_id = int(request.match_info["id"])
    user = USERS_BY_ID.get(user_id)
    if user is None:
        return error_response(404, "not_found", f"no user with id {user_id}")
    return json_with_noise(user.to_json())


async def _credentials(request: web.Request) -> tuple[Any, Any]:
    if request.content_type == "application/json":
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return None, None
        if not isinstance(body, dict):
            return None, None
        return body.get("username"), body.get("password")
    form = await request.post()
    return form.get("username"), form.get("password")


async def _login(request: web.Request) -> web.Response:
    username, password = await _credentials(request)
    user = USERS_BY_NAME.get(username) if isinstance(username, str) else None
    if user is None or password != PASSWORD:
        return error_response(401, "invalid_credentials", "unknown user or wrong password")
    token = secrets.token_urlsafe(24)
    request.app[SESSIONS_KEY][token] = user.id
    response = json_with_noise(user.to_json())
    response.set_cookie(SESSION_COOKIE, token, path="/", httponly=True, samesite="Lax")
    response.set_cookie(CSRF_COOKIE, secrets.token_hex(16), path="/", samesite="Lax")
    return response


async def _logout(request: web.Request) -> web.Response:
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        request.app[SESSIONS_KEY].pop(token, None)
    response = json_with_noise({"logged_out": True})
    response.del_cookie(SESSION_COOKIE, path="/")
    response.del_cookie(CSRF_COOKIE, path="/")
    return response


async def _me(request: web.Request) -> web.Response:
    token = request.cookies.get(SESSION_COOKIE)
    user_id = request.app[SESSIONS_KEY].get(token) if token else None
    if user_id is None:
        return error_response(401, "unauthorized", "not logged in")
    return json_with_noise(USERS_BY_ID[user_id].to_json())


async def _upload(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_chunked(UPLOAD_CHUNK):
        size += len(chunk)
        digest.update(chunk)
    return json_with_noise({"bytes": size, "sha256": digest.hexdigest()})


async def _download(request: web.Request) -> web.StreamResponse:
    size = query_int(request, "size", 1024 * 1024, 0, MAX_DOWNLOAD_SIZE)
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": 'attachment; filename="download.bin"',
        }
    )
    response.content_length = size
    await response.prepare(request)
    if request.method != "HEAD":
        for chunk in download_pattern(size):
            await response.write(chunk)
    await response.write_eof()
    return response


async def _sales_report(request: web.Request) -> web.Response:
    await asyncio.sleep(SALES_REPORT_DELAY)
    revenue: dict[str, float] = dict.fromkeys(_CATEGORIES, 0.0)
    units: dict[str, int] = dict.fromkeys(_CATEGORIES, 0)
    orders = request.app[STORE_KEY].find()
    for order in orders:
        for line in order["items"]:
            category = ITEMS_BY_ID[line["item_id"]].category
            revenue[category] += line["price"] * line["qty"]
            units[category] += line["qty"]
    return json_with_noise(
        {
            "currency": "EUR",
            "orders": len(orders),
            "revenue": round(sum(revenue.values()), 2),
            "by_category": {
                c: {"revenue": round(revenue[c], 2), "units": units[c]} for c in _CATEGORIES
            },
        }
    )


async def _slow(request: web.Request) -> web.Response:
    ms = query_int(request, "ms", 1000, 0, MAX_SLOW_MS)
    await asyncio.sleep(ms / 1000)
    return json_with_noise({"slept_ms": ms})


def create_monolith_app(*, fault_list: Iterable[faults.Fault] = ()) -> web.Application:
    """The legacy shop with its health, test endpoints and fault knobs."""
    app = web.Application(middlewares=[api_errors_middleware])
    faults.install(app, fault_list)
    install_common(app, "monolith")
    app[SESSIONS_KEY] = {}
    router = app.router
    router.add_get("/", _home)
    router.add_get("/api/items", _list_items)
    router.add_get(r"/api/items/{id:\d+}", _get_item)
    router.add_get(r"/api/users/{id:\d+}", _get_user)
    router.add_post("/login", _login)
    router.add_post("/logout", _logout)
    router.add_get("/api/me", _me)
    add_order_routes(app)
    router.add_post("/api/upload", _upload)
    router.add_put("/api/upload", _upload)
    router.add_get("/api/download", _download)
    router.add_get("/api/reports/sales", _sales_report)
    router.add_get("/api/slow", _slow)
    return app
