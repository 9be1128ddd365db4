"""Run-time fault knobs and hit counters for the stub apps.

The gateway has to be tested against backends that are slow, that fail and
that drop connections, and the tests need to know how many requests actually
reached a backend (to prove retries, fallbacks, shadowing and circuit breaking
do what they claim). This module gives both apps the same middleware and the
same control API:

``PUT /__stub/faults``            set the fault for one path prefix (JSON body)
``GET /__stub/faults``            list the configured faults
``DELETE /__stub/faults``         clear all, or one with ``?prefix=``
``GET /__stub/stats``             hit counters
``POST /__stub/stats/reset``      zero the counters

Control paths (``/__stub/faults``, ``/__stub/stats``, ``/__stub/differences``)
are neither faulted nor counted. Every other request is counted on arrival,
before any fault applies, then gets the fault of the longest matching prefix:
first the latency, then possibly a dropped connection, then possibly an
injected error response.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

__all__ = [
    "CONTROL_PREFIXES",
    "DROP_MODES",
    "FAULTS_KEY",
    "STATS_KEY",
    "Fault",
    "FaultTable",
    "Stats",
    "fault_middleware",
    "install",
    "is_control_path",
    "path_has_prefix",
]

logger = logging.getLogger(__name__)

CONTROL_PREFIXES = ("/__stub/faults", "/__stub/stats", "/__stub/differences")
DROP_MODES = ("reset", "close")
MAX_LATENCY_MS = 600_000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def path_has_prefix(path: str, prefix: str) -> bool:
    """Segment-aware prefix match.

    ``/api/orders`` covers ``/api/orders`` and ``/api/orders/7``, not ``/api/ordersx``.
    """
    if prefix == "/" or path == prefix:
        return True
    base = prefix.rstrip("/")
    return path.startswith(base + "/")


def is_control_path(path: str) -> bool:
    return any(path_has_prefix(path, p) for p in CONTROL_PREFIXES)


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    if not low <= value <= high:
        raise ValueError(f"{key} must be between {low:g} and {high:g}")
    return float(value)


@dataclass(frozen=True, slots=True)
class Fault:
    """What happens to requests under ``prefix``."""

    prefix: str
    latency_ms: int = 0
    error_rate: float = 0.0
    error_status: int = 503
    drop_rate: float = 0.0
    drop_mode: str = "reset"
    """``reset``: the client gets a TCP RST; ``close``: a clean FIN with no response."""

    @classmethod
    def from_json(cls, body: Any) -> Fault:
        """Build from a control-API body; raise ValueError with a readable message."""
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        unknown = set(body) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
        prefix = body.get("prefix")
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            raise ValueError("prefix must be a string starting with '/'")
        if is_control_path(prefix):
            raise ValueError("control paths cannot be faulted")
        drop_mode = body.get("drop_mode", "reset")
        if drop_mode not in DROP_MODES:
            raise ValueError(f"drop_mode must be one of {DROP_MODES}")
        return cls(
            prefix=prefix,
            latency_ms=int(_number(body, "latency_ms", 0, 0, MAX_LATENCY_MS)),
            error_rate=_number(body, "error_rate", 0.0, 0.0, 1.0),
            error_status=int(_number(body, "error_status", 503, 400, 599)),
            drop_rate=_number(body, "drop_rate", 0.0, 0.0, 1.0),
            drop_mode=drop_mode,
        )

    @classmethod
    def parse_cli(cls, spec: str) -> Fault:
        """Parse ``PREFIX:key=value,key=value`` as given to ``--fault``."""
        prefix, sep, settings = spec.partition(":")
        body: dict[str, Any] = {"prefix": prefix}
        if sep and settings:
            for pair in settings.split(","):
                key, eq, raw = pair.partition("=")
                if not eq:
                    raise ValueError(f"expected key=value, got {pair!r}")
                key = key.strip()
                body[key] = raw.strip() if key == "drop_mode" else float(raw)
        return cls.from_json(body)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class FaultTable:
    """Faults by prefix; lookups pick the longest matching prefix."""

    def __init__(self, faults: Iterable[Fault] = ()) -> None:
        self._by_prefix: dict[str, Fault] = {}
        self._ordered: list[Fault] = []
        for fault in faults:
            self.set(fault)

    def _reorder(self) -> None:
        self._ordered = sorted(self._by_prefix.values(), key=lambda f: len(f.prefix), reverse=True)

    def set(self, fault: Fault) -> None:
        self._by_prefix[fault.prefix] = fault
        self._reorder()

    def remove(self, prefix: str) -> bool:
        found = self._by_prefix.pop(prefix, None) is not None
        self._reorder()
        return found

    def clear(self) -> None:
        self._by_prefix.clear()
        self._ordered = []

    def match(self, path: str) -> Fault | None:
        for fault in self._ordered:
            if path_has_prefix(path, fault.prefix):
                return fault
        return None

    def to_json(self) -> list[dict[str, Any]]:
        return [f.to_json() for f in sorted(self._by_prefix.values(), key=lambda f: f.prefix)]


class Stats:
    """Counts of requests that reached the app, taken on arrival."""

    def __init__(self) -> None:
        self.requests_total = 0
        self.by_path: Counter[str] = Counter()
        self.by_method: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()

    def hit(self, method: str, path: str) -> None:
        self.requests_total += 1
        self.by_path[path] += 1
        self.by_method[method] += 1

    def reset(self) -> None:
        self.requests_total = 0
        self.by_path.clear()
        self.by_method.clear()
        self.injected.clear()

    def to_json(self) -> dict[str, Any]:
        return {
            "requests_total": self.requests_total,
            "by_path": dict(self.by_path),
            "by_method": dict(self.by_method),
            "injected": {k: self.injected.get(k, 0) for k in ("latency", "error", "drop")},
        }


FAULTS_KEY = web.AppKey("faults", FaultTable)
STATS_KEY = web.AppKey("stats", Stats)


def _drop(request: web.Request, mode: str) -> None:
    transport = request.transport
    if transport is None:
        return
    if mode == "reset":
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                # Linger with a zero timeout turns the close into a RST.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                logger.debug("could not set SO_LINGER; dropping with a plain close")
        transport.abort()
    else:
        transport.close()


@web.middleware
async def fault_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if is_control_path(path):
        return await handler(request)
    app = request.app
    app[STATS_KEY].hit(request.method, path)
    fault = app[FAULTS_KEY].match(path)
    if fault is None:
        return await handler(request)
    stats = app[STATS_KEY]
    if fault.latency_ms:
        stats.injected["latency"] += 1
        await asyncio.sleep(fault.latency_ms / 1000)
    if fault.drop_rate and random.random() < fault.drop_rate:
        stats.injected["drop"] += 1
        _drop(request, fault.drop_mode)
        # The transport is gone: aiohttp's attempt to write this fails quietly.
        return web.Response(status=500)
    if fault.error_rate and random.random() < fault.error_rate:
        stats.injected["error"] += 1
        return web.json_response(
            {"error": "injected", "status": fault.error_status}, status=fault.error_status
        )
    return await handler(request)


def _bad_request(message: str) -> web.Response:
    return web.json_response({"error": "bad_request", "detail": message}, status=400)


async def _put_fault(request: web.Request) -> web.Response:
    try:
        fault = Fault.from_json(await request.json())
    except ValueError as exc:  # includes JSONDecodeError
        return _bad_request(str(exc))
    table = request.app[FAULTS_KEY]
    table.set(fault)
    logger.info("fault set: %s", fault)
    return web.json_response({"faults": table.to_json()})


async def _get_faults(request: web.Request) -> web.Response:
    return web.json_response({"faults": request.app[FAULTS_KEY].to_json()})


async def _delete_faults(request: web.Request) -> web.Response:
    table = request.app[FAULTS_KEY]
    prefix = request.query.get("prefix")
    if prefix is None:
        table.clear()
        logger.info("faults cleared")
    elif not table.remove(prefix):
        return web.json_response(
            {"error": "not_found", "detail": f"no fault for prefix {prefix!r}"}, status=404
        )
    else:
        logger.info("fault removed: %s", prefix)
    return web.json_response({"faults": table.to_json()})


async def _get_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS_KEY].to_json())


async def _reset_stats(request: web.Request) -> web.Response:
    stats = request.app[STATS_KEY]
    stats.reset()
    return web.json_response(stats.to_json())


def install(app: web.Application, faults: Iterable[Fault] = ()) -> None:
    """Attach fault state, stats, the middleware (outermost) and the control routes to ``app``."""
    app.middlewares.insert(0, fault_middleware)
    app[FAULTS_KEY] = FaultTable(faults)
    app[STATS_KEY] = Stats()
    app.router.add_put("/__stub/faults", _put_fault)
    app.router.add_get("/__stub/faults", _get_faults)
    app.router.add_delete("/__stub/faults", _delete_faults)
    app.router.add_get("/__stub/stats", _get_stats)
    app.router.add_post("/__stub/stats/reset", _reset_stats)
