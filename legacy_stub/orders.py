"""The orders API, and the stand-in "extracted" orders service built on it.

The monolith and the orders service mount the very same handlers over the
same seed data, so by default the new service answers exactly like the legacy
one (apart from noise fields). That is what a finished extraction looks like,
and what the gateway's shadow comparison should report as "no differences".

To prove the comparison catches real divergence, the orders service has a
deliberate-difference knob: a set of field names whose values it alters in
every order it returns. Set it at start with ``--differences total,status``
or at run time with ``PUT /__stub/differences {"fields": [...]}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
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
from legacy_stub.data import ORDER_STATUSES, OrderError, OrderStore, copy_order, isoformat

__all__ = [
    "DIFFERENCE_FIELDS",
    "DIFFERENCES_KEY",
    "STORE_KEY",
    "Differences",
    "add_order_routes",
    "create_orders_app",
]

logger = logging.getLogger(__name__)

Order = dict[str, Any]


def _total(order: Order) -> None:
    order["total"] = round(order["total"] + 0.01, 2)


def _status(order: Order) -> None:
    order["status"] = order["status"].upper()


def _currency(order: Order) -> None:
    order["currency"] = order["currency"].lower()


def _user_id(order: Order) -> None:
    order["user_id"] += 1


def _created_at(order: Order) -> None:
    moment = datetime.fromisoformat(order["created_at"])
    order["created_at"] = isoformat(moment + timedelta(seconds=1))


def _shipping_method(order: Order) -> None:
    order["shipping"]["method"] = order["shipping"]["method"].upper()


def _shipping_country(order: Order) -> None:
    order["shipping"]["country"] = order["shipping"]["country"].lower()


def _items_price(order: Order) -> None:
    for line in order["items"]:
        line["price"] = round(line["price"] + 1, 2)


def _items_qty(order: Order) -> None:
    for line in order["items"]:
        line["qty"] += 1


DIFFERENCE_FIELDS: dict[str, Callable[[Order], None]] = {
    "total": _total,  # +0.01
    "status": _status,  # upper case
    "currency": _currency,  # lower case
    "user_id": _user_id,  # +1
    "created_at": _created_at,  # one second later
    "shipping.method": _shipping_method,  # upper case
    "shipping.country": _shipping_country,  # lower case
    "items.price": _items_price,  # +1 on every line
    "items.qty": _items_qty,  # +1 on every line
}
"""Each alters only its own field; e.g. ``items.price`` leaves ``total`` alone."""


class Differences:
    """The fields the orders service currently alters."""

    def __init__(self, fields: Iterable[str] = ()) -> None:
        self.fields: tuple[str, ...] = ()
        self.set(fields)

    @staticmethod
    def parse(spec: str) -> list[str]:
        """Split the ``--differences`` value ``"total, status"`` into names."""
        return [name.strip() for name in spec.split(",") if name.strip()]

    def set(self, fields: Iterable[str]) -> None:
        wanted = list(dict.fromkeys(fields))
        unknown = [name for name in wanted if name not in DIFFERENCE_FIELDS]
        if unknown:
            raise ValueError(
                f"unknown difference fields {unknown}; known: {sorted(DIFFERENCE_FIELDS)}"
            )
        self.fields = tuple(wanted)

    def render(self, order: Order) -> Order:
        """The response body for ``order``: a copy, altered, plus noise fields."""
        if not self.fields:
            return {**order}
        copy = copy_order(order)
        for name in self.fields:
            DIFFERENCE_FIELDS[name](copy)
        return copy


STORE_KEY = web.AppKey("order_store", OrderStore)
DIFFERENCES_KEY = web.AppKey("differences", Differences)


async def _list_orders(request: web.Request) -> web.Response:
    user_id = query_int(request, "user_id", 0, 0, 2**31)
    status = request.query.get("status") or None
    if status is not None and status not in ORDER_STATUSES:
        return error_response(400, "bad_request", f"status must be one of {ORDER_STATUSES}")
    limit = query_int(request, "limit", 100, 1, 1000)
    offset = query_int(request, "offset", 0, 0, 2**31)
    matching = request.app[STORE_KEY].find(user_id=user_id or None, status=status)
    render = request.app[DIFFERENCES_KEY].render
    return json_with_noise(
        {
            "orders": [render(order) for order in matching[offset : offset + limit]],
            "count": len(matching),
            "limit": limit,
            "offset": offset,
        }
    )


async def _get_order(request: web.Request) -> web.Response:
    order_id = int(request.match_info["id"])
    order = request.app[STORE_KEY].get(order_id)
    if order is None:
        return error_response(404, "not_found", f"no order with id {order_id}")
    return json_with_noise(request.app[DIFFERENCES_KEY].render(order))


async def _create_order(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return error_response(400, "bad_request", "body must be JSON")
    try:
        order = request.app[STORE_KEY].create(body)
    except OrderError as exc:
        return error_response(exc.status, exc.code, exc.detail)
    response = json_with_noise(request.app[DIFFERENCES_KEY].render(order), status=201)
    response.headers["Location"] = f"/api/orders/{order['id']}"
    return response


async def _delete_order(request: web.Request) -> web.Response:
    order_id = int(request.match_info["id"])
    if not request.app[STORE_KEY].delete(order_id):
        return error_response(404, "not_found", f"no order with id {order_id}")
    return json_with_noise({"id": order_id, "deleted": True})


def add_order_routes(app: web.Application, differences: Differences | None = None) -> None:
    """Mount the orders API on ``app`` with its own store."""
    app[STORE_KEY] = OrderStore()
    app[DIFFERENCES_KEY] = differences if differences is not None else Differences()
    app.router.add_get("/api/orders", _list_orders)
    app.router.add_post("/api/orders", _create_order)
    app.router.add_get(r"/api/orders/{id:\d+}", _get_order)
    app.router.add_delete(r"/api/orders/{id:\d+}", _delete_order)


async def _get_differences(request: web.Request) -> web.Response:
    return web.json_response(
        {"fields": list(request.app[DIFFERENCES_KEY].fields), "available": list(DIFFERENCE_FIELDS)}
    )


async def _put_differences(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    fields = body.get("fields") if isinstance(body, dict) else None
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        return web.json_response(
            {"error": "bad_request", "detail": 'body must be {"fields": ["name", ...]}'},
            status=400,
        )
    differences = request.app[DIFFERENCES_KEY]
    try:
        differences.set(fields)
    except ValueError as exc:
        return web.json_response({"error": "bad_request", "detail": str(exc)}, status=400)
    logger.info("differences set: %s", json.dumps(list(differences.fields)))
    return await _get_differences(request)


def create_orders_app(
    *, differences: Iterable[str] = (), fault_list: Iterable[faults.Fault] = ()
) -> web.Application:
    """The extracted orders service: orders API, health, test endpoints, knobs."""
    app = web.Application(middlewares=[api_errors_middleware])
    faults.install(app, fault_list)
    install_common(app, "orders")
    add_order_routes(app, Differences(differences))
    app.router.add_get("/__stub/differences", _get_differences)
    app.router.add_put("/__stub/differences", _put_differences)
    return app
