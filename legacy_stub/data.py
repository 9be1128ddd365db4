"""Deterministic seed data shared by the stand-in monolith and the orders service.

The gateway's shadow comparison and the migration tests only make sense if the
legacy app and the extracted service start from the *same* state, even though
they run as separate processes. Everything here is derived from a fixed seed
with :class:`random.Random`, never from the clock, hash order or the process
id, so two processes started independently serve byte-identical data apart
from the per-response noise fields (:func:`noise`).

The order store is the only mutable state: each process owns one, and because
both start from the same seed orders and the same id counter, the same
sequence of writes produces the same ids in both.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeGuard

__all__ = [
    "CATALOG_SIZE",
    "CURRENCY",
    "DOWNLOAD_BLOCK",
    "FIRST_NEW_ORDER_ID",
    "ITEMS",
    "ITEMS_BY_ID",
    "MAX_DOWNLOAD_SIZE",
    "ORDER_STATUSES",
    "PASSWORD",
    "SEED",
    "SEED_ORDER_COUNT",
    "USERS",
    "USERS_BY_ID",
    "USERS_BY_NAME",
    "USER_COUNT",
    "Item",
    "OrderError",
    "OrderStore",
    "User",
    "copy_order",
    "download_pattern",
    "isoformat",
    "noise",
    "seed_orders",
    "utcnow_iso",
]

SEED = 20240601
CATALOG_SIZE = 50
USER_COUNT = 20
SEED_ORDER_COUNT = 30
FIRST_NEW_ORDER_ID = 1000
CURRENCY = "EUR"
PASSWORD = "secret"
"""Every seed user logs in with this password."""

ORDER_STATUSES = ("pending", "paid", "shipped", "delivered", "cancelled")
SHIPPING_METHODS = ("standard", "express", "pickup")
MAX_QTY = 1000

_CATEGORIES = ("books", "electronics", "garden", "kitchen", "toys")
_ADJECTIVES = (
    "Classic", "Compact", "Deluxe", "Eco", "Ergonomic", "Heavy-duty", "Mini",
    "Portable", "Premium", "Rustic", "Smart", "Vintage",
)  # fmt: skip
_NOUNS = {
    "books": ("Atlas", "Cookbook", "Novel", "Field Guide", "Almanac"),
    "electronics": ("Headphones", "Charger", "Speaker", "Lamp", "Keyboard"),
    "garden": ("Trowel", "Planter", "Hose", "Birdhouse", "Shears"),
    "kitchen": ("Kettle", "Skillet", "Grinder", "Cutting Board", "Teapot"),
    "toys": ("Kite", "Puzzle", "Robot", "Yo-yo", "Train Set"),
}
_USERNAMES = (
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
    "mallory", "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter",
    "zoe",
)  # fmt: skip
_COUNTRIES = ("DE", "FR", "NL", "AT", "BE", "IT", "ES")
_EPOCH = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)


def isoformat(moment: datetime) -> str:
    """ISO-8601 UTC with microseconds, the one timestamp format both apps emit."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def utcnow_iso() -> str:
    return isoformat(datetime.now(UTC))


def noise() -> dict[str, str]:
    """Fields that differ on every response, like real apps' request metadata.

    They exist so that anything comparing legacy and new responses has to
    learn to ignore them.
    """
    return {"generated_at": utcnow_iso(), "trace_id": str(uuid.uuid4())}


@dataclass(frozen=True, slots=True)
class Item:
    id: int
    sku: str
    name: str
    category: str
    price: float
    stock: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sku": self.sku,
            "name": self.name,
            "category": self.category,
            "price": self.price,
            "currency": CURRENCY,
            "stock": self.stock,
        }


@dataclass(frozen=True, slots=True)
class User:
    id: int
    username: str
    name: str
    email: str
    country: str
    created_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "username": self.username,
            "name": self.name,
            "email": self.email,
            "country": self.country,
            "created_at": self.created_at,
        }


def _build_catalog(rng: random.Random) -> tuple[Item, ...]:
    items = []
    for item_id in range(1, CATALOG_SIZE + 1):
        category = _CATEGORIES[(item_id - 1) % len(_CATEGORIES)]
        name = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS[category])}"
        price = round(rng.randint(150, 25000) / 100, 2)
        items.append(
            Item(
                id=item_id,
                sku=f"{category[:3].upper()}-{item_id:04d}",
                name=name,
                category=category,
                price=price,
                stock=rng.randint(0, 500),
            )
        )
    return tuple(items)


def _build_users(rng: random.Random) -> tuple[User, ...]:
    users = []
    for user_id, username in enumerate(_USERNAMES[:USER_COUNT], start=1):
        created = _EPOCH - timedelta(days=rng.randint(30, 900), seconds=rng.randint(0, 86399))
        users.append(
            User(
                id=user_id,
                username=username,
                name=username.capitalize(),
                email=f"{username}@example.com",
                country=rng.choice(_COUNTRIES),
                created_at=isoformat(created),
            )
        )
    return tuple(users)


def _order_total(lines: list[dict[str, Any]]) -> float:
    total: float = sum(line["price"] * line["qty"] for line in lines)
    return round(total, 2)


def _make_order(
    order_id: int,
    user: User,
    lines: list[dict[str, Any]],
    *,
    status: str,
    shipping_method: str,
    created_at: str,
) -> dict[str, Any]:
    return {
        "id": order_id,
        "user_id": user.id,
        "items": lines,
        "total": _order_total(lines),
        "currency": CURRENCY,
        "status": status,
        "shipping": {"method": shipping_method, "country": user.country},
        "created_at": created_at,
    }


def _build_seed_orders(rng: random.Random) -> tuple[dict[str, Any], ...]:
    orders = []
    for order_id in range(1, SEED_ORDER_COUNT + 1):
        user = USERS[rng.randrange(len(USERS))]
        picked = rng.sample(range(len(ITEMS)), rng.randint(1, 4))
        lines = [
            {"item_id": ITEMS[i].id, "qty": rng.randint(1, 5), "price": ITEMS[i].price}
            for i in sorted(picked)
        ]
        created = _EPOCH + timedelta(hours=7 * order_id, minutes=rng.randint(0, 59))
        orders.append(
            _make_order(
                order_id,
                user,
                lines,
                status=rng.choice(ORDER_STATUSES),
                shipping_method=rng.choice(SHIPPING_METHODS),
                created_at=isoformat(created),
            )
        )
    return tuple(orders)


# One generator, consumed in a fixed order, so every process derives the same values.
_rng = random.Random(SEED)
ITEMS: tuple[Item, ...] = _build_catalog(_rng)
USERS: tuple[User, ...] = _build_users(_rng)
_SEED_ORDERS: tuple[dict[str, Any], ...] = _build_seed_orders(_rng)
del _rng

ITEMS_BY_ID: dict[int, Item] = {item.id: item for item in ITEMS}
USERS_BY_ID: dict[int, User] = {user.id: user for user in USERS}
USERS_BY_NAME: dict[str, User] = {user.username: user for user in USERS}


def copy_order(order: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``order`` that shares no mutable part with it."""
    return {
        **order,
        "items": [dict(line) for line in order["items"]],
        "shipping": dict(order["shipping"]),
    }


def seed_orders() -> list[dict[str, Any]]:
    """Fresh, independent copies of the seed orders (ids 1..SEED_ORDER_COUNT)."""
    return [copy_order(order) for order in _SEED_ORDERS]


class OrderError(ValueError):
    """A create-order request the shop refuses; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def _positive_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class OrderStore:
    """In-memory orders of one process, starting from the seed orders.

    New orders get ids from a counter starting at ``FIRST_NEW_ORDER_ID``. All
    methods are synchronous and therefore atomic on the event loop.
    """

    def __init__(self) -> None:
        self._orders: dict[int, dict[str, Any]] = {o["id"]: o for o in seed_orders()}
        self._next_id = FIRST_NEW_ORDER_ID

    def get(self, order_id: int) -> dict[str, Any] | None:
        return self._orders.get(order_id)

    def find(
        self, *, user_id: int | None = None, status: str | None = None
    ) -> list[dict[str, Any]]:
        """Orders in id order (seed first, then creation order), optionally filtered."""
        return [
            order
            for order in self._orders.values()
            if (user_id is None or order["user_id"] == user_id)
            and (status is None or order["status"] == status)
        ]

    def delete(self, order_id: int) -> bool:
        return self._orders.pop(order_id, None) is not None

    def __len__(self) -> int:
        return len(self._orders)

    def create(self, body: Any) -> dict[str, Any]:
        """Validate a create-order body and store the order; raise `OrderError` if refused."""
        if not isinstance(body, dict):
            raise OrderError(400, "bad_request", "body must be a JSON object")
        user_id = body.get("user_id")
        if not _positive_int(user_id):
            raise OrderError(400, "bad_request", "user_id must be a positive integer")
        user = USERS_BY_ID.get(user_id)
        if user is None:
            raise OrderError(422, "unknown_user", f"no user with id {user_id}")
        raw_lines = body.get("items")
        if not isinstance(raw_lines, list) or not raw_lines:
            raise OrderError(400, "bad_request", "items must be a non-empty list")
        lines = []
        for raw in raw_lines:
            if not isinstance(raw, dict):
                raise OrderError(400, "bad_request", "each item must be an object")
            item_id, qty = raw.get("item_id"), raw.get("qty", 1)
            if not _positive_int(item_id) or not _positive_int(qty) or qty > MAX_QTY:
                raise OrderError(
                    400, "bad_request", f"item_id must be a positive integer, qty 1..{MAX_QTY}"
                )
            item = ITEMS_BY_ID.get(item_id)
            if item is None:
                raise OrderError(422, "unknown_item", f"no item with id {item_id}")
            lines.append({"item_id": item.id, "qty": qty, "price": item.price})
        shipping = body.get("shipping") or {}
        method = shipping.get("method", "standard") if isinstance(shipping, dict) else None
        if method not in SHIPPING_METHODS:
            raise OrderError(
                400, "bad_request", f"shipping.method must be one of {SHIPPING_METHODS}"
            )
        order = _make_order(
            self._next_id,
            user,
            lines,
            status="pending",
            shipping_method=method,
            created_at=utcnow_iso(),
        )
        self._orders[order["id"]] = order
        self._next_id += 1
        return order


DOWNLOAD_BLOCK = bytes(range(256)) * 256
"""64 KiB; the download body is this block repeated and cut to length."""

MAX_DOWNLOAD_SIZE = 4 * 1024**3
_DOWNLOAD_CHUNK = DOWNLOAD_BLOCK * 16  # 1 MiB writes keep per-chunk overhead low


def download_pattern(size: int) -> Iterator[bytes]:
    """Yield the exact bytes ``GET /api/download?size=<size>`` sends, in chunks.

    Byte ``i`` of the body is ``i % 256``; tests hash this to check what the
    gateway delivered without either side holding the whole body in memory.
    """
    if size < 0:
        raise ValueError("size must be >= 0")
    chunk = _DOWNLOAD_CHUNK
    full, rest = divmod(size, len(chunk))
    for _ in range(full):
        yield chunk
    if rest:
        yield chunk[:rest]
