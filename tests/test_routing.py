"""Routing: path normalization, matching order, weighted sticky backend choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest

from strangler import config
from strangler.routing import (
    BUCKETS,
    BadPath,
    RouteTable,
    bucket_for,
    compile_table,
    normalize_path,
)


def table(
    routes: list[dict[str, Any]], backends: tuple[str, ...] = ("legacy", "orders")
) -> RouteTable:
    cfg = config.RouteFile.model_validate(
        {
            "backends": {
                b: {"url": f"http://127.0.0.1:{8081 + i}"} for i, b in enumerate(backends)
            },
            "routes": routes,
        }
    )
    return compile_table(cfg)


def split_route(legacy: int, orders: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": "orders",
        "match": {"path_prefix": "/api/orders"},
        "backends": [{"name": "legacy", "weight": legacy}, {"name": "orders", "weight": orders}],
        **extra,
    }


# --------------------------------------------------------------- normalization


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"/api/orders", "/api/orders"),
        (b"/api/orders/../admin", "/api/admin"),
        (b"/api/./orders//1", "/api/orders/1"),
        (b"//api///orders", "/api/orders"),
        (b"/a/b/../../../../etc", "/etc"),
        (b"/api/%6Frders", "/api/orders"),  # unreserved escape decoded
        (b"/api/orders/%2e%2e/admin", "/api/admin"),  # encoded dots are dot segments too
        (b"/a%20b", "/a%20b"),  # reserved/other escapes kept
        (b"/a%3fb", "/a%3Fb"),  # and upper-cased
        (b"/caf\xc3\xa9", "/caf%C3%A9"),  # raw non-ASCII bytes percent-encoded
        (b"/dir/", "/dir/"),
        (b"/dir/.", "/dir/"),
        (b"/", "/"),
    ],
)
def test_paths_are_normalized(raw: bytes, expected: str) -> None:
    norm = normalize_path(raw)
    assert norm.path == expected
    assert not norm.encoded_slash


@pytest.mark.parametrize("raw", [b"/a%2Fb", b"/a%2fb", b"/a%5Cb", b"/a\\b"])
def test_encoded_slash_and_backslash_are_flagged(raw: bytes) -> None:
    assert normalize_path(raw).encoded_slash


@pytest.mark.parametrize("raw", [b"/a%zz", b"/a%4", b"/a%", b"a/b", b"*"])
def test_malformed_paths_are_rejected(raw: bytes) -> None:
    with pytest.raises(BadPath):
        normalize_path(raw)


# -------------------------------------------------------------------- matching


def test_first_match_in_file_order_wins() -> None:
    t = table(
        [
            {
                "name": "exact",
                "match": {"path": "/api/orders/special"},
                "backends": [{"name": "orders", "weight": 1}],
            },
            split_route(100, 0),
            {
                "name": "all",
                "match": {"path_prefix": "/"},
                "backends": [{"name": "legacy", "weight": 1}],
            },
        ]
    )
    assert t.match("GET", "", "/api/orders/special", []).name == "exact"  # type: ignore[union-attr]
    assert t.match("GET", "", "/api/orders/1", []).name == "orders"  # type: ignore[union-attr]
    assert t.match("GET", "", "/other", []).name == "all"  # type: ignore[union-attr]


def test_prefix_matches_on_segment_boundary() -> None:
    t = table([split_route(1, 1)])
    assert t.match("GET", "", "/api/orders", []) is not None
    assert t.match("GET", "", "/api/orders/7", []) is not None
    assert t.match("GET", "", "/api/ordersx", []) is None
    assert t.match("GET", "", "/api", []) is None


def test_methods_host_headers_and_regex_narrow_the_match() -> None:
    t = table(
        [
            {
                "name": "r",
                "match": {
                    "regex": r"^/api/users/\d+$",
                    "methods": ["GET"],
                    "host": "*.example.com",
                    "headers": {"X-Beta": "1"},
                },
                "backends": [{"name": "orders", "weight": 1}],
            }
        ]
    )
    hdrs = [(b"x-beta", b"1")]
    assert t.match("GET", "shop.example.com", "/api/users/12", hdrs) is not None
    assert t.match("POST", "shop.example.com", "/api/users/12", hdrs) is None
    assert t.match("GET", "example.org", "/api/users/12", hdrs) is None
    assert t.match("GET", "shop.example.com", "/api/users/12", []) is None
    assert t.match("GET", "shop.example.com", "/api/users/x", hdrs) is None


def test_prefix_rewrite_strip_and_replace() -> None:
    t = table(
        [
            split_route(1, 0, rewrite={"strip_prefix": "/api"}),
            {
                "name": "v1",
                "match": {"path_prefix": "/v1"},
                "backends": [{"name": "legacy", "weight": 1}],
                "rewrite": {"replace_prefix": {"from": "/v1", "to": "/internal/v2"}},
            },
        ]
    )
    orders = t.by_name["orders"]
    assert orders.rewrite("/api/orders/1") == "/orders/1"
    assert orders.rewrite("/api") == "/"
    assert orders.rewrite("/apix") == "/apix"
    assert t.by_name["v1"].rewrite("/v1/items") == "/internal/v2/items"


# ---------------------------------------------------------------- choosing


@pytest.mark.parametrize(("legacy", "orders"), [(90, 10), (50, 50), (1, 99), (3, 7)])
def test_random_split_is_within_1_5_points_over_20000_requests(legacy: int, orders: int) -> None:
    route = table([split_route(legacy, orders)]).by_name["orders"]
    counts = Counter(route.choose([], None) for _ in range(20_000))
    share = 100 * counts["orders"] / 20_000
    assert abs(share - 100 * orders / (legacy + orders)) <= 1.5


def test_sticky_split_is_within_1_5_points_over_20000_users() -> None:
    route = table([split_route(80, 20, sticky={"header": "X-User-Id"})]).by_name["orders"]
    counts = Counter(
        route.choose([(b"x-user-id", f"user-{i}".encode())], None) for i in range(20_000)
    )
    assert abs(100 * counts["orders"] / 20_000 - 20) <= 1.5


def test_sticky_key_always_gets_the_same_backend() -> None:
    route = table([split_route(50, 50, sticky={"cookie": "session"})]).by_name["orders"]
    for i in range(200):
        hdrs = [(b"cookie", f"theme=dark; session=s{i}; lang=en".encode())]
        first = route.choose(hdrs, None)
        assert all(route.choose(hdrs, None) == first for _ in range(20))


def test_client_ip_can_be_the_sticky_key() -> None:
    route = table([split_route(50, 50, sticky={"client_ip": True})]).by_name["orders"]
    for i in range(100):
        ip = f"10.0.{i // 256}.{i % 256}"
        assert len({route.choose([], ip) for _ in range(10)}) == 1


def test_sticky_buckets_are_identical_on_every_replica() -> None:
    """Another interpreter (another replica, another hash seed) computes the same buckets."""
    keys = [f"user-{i}" for i in range(500)]
    local = [bucket_for("orders", k) for k in keys]
    code = (
        "import json, sys; from strangler.routing import bucket_for; "
        "print(json.dumps([bucket_for('orders', k) for k in json.loads(sys.argv[1])]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(keys)],
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    assert json.loads(out) == local
    assert all(0 <= b < BUCKETS for b in local)


@pytest.mark.parametrize("new_first", [False, True])
def test_weight_increase_never_moves_a_user_back_to_legacy(new_first: bool) -> None:
    users = [[(b"x-user-id", f"u{i}".encode())] for i in range(5_000)]
    on_new: set[int] = set()
    for weight in (0, 1, 5, 10, 25, 50, 75, 99, 100):
        backends = [
            {"name": "legacy", "weight": 100 - weight},
            {"name": "orders", "weight": weight},
        ]
        if new_first:
            backends.reverse()
        if weight == 100:
            backends = [b for b in backends if b["weight"]]
        route = table(
            [
                {
                    "name": "orders",
                    "match": {"path_prefix": "/"},
                    "backends": backends,
                    "sticky": {"header": "X-User-Id"},
                }
            ]
        ).by_name["orders"]
        now_new = {i for i, h in enumerate(users) if route.choose(h, None) == "orders"}
        assert on_new <= now_new, f"users moved back to legacy at weight {weight}"
        on_new = now_new
    assert len(on_new) == len(users)


def test_missing_sticky_key_falls_back_to_a_random_bucket() -> None:
    route = table([split_route(50, 50, sticky={"header": "X-User-Id"})]).by_name["orders"]
    assert len({route.choose([], None) for _ in range(200)}) == 2


def test_override_header_forces_a_backend_only_when_allowed() -> None:
    allowed = table([split_route(100, 0, allow_override=True)]).by_name["orders"]
    assert allowed.choose([], None, override="orders") == "orders"
    assert allowed.choose([], None, override="unknown") == "legacy"
    denied = table([split_route(100, 0)]).by_name["orders"]
    assert denied.choose([], None, override="orders") == "legacy"


def test_zero_weight_backend_is_never_chosen() -> None:
    route = table([split_route(100, 0)]).by_name["orders"]
    assert {route.choose([], None) for _ in range(2_000)} == {"legacy"}
