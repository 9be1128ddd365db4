"""The admin port: a Starlette app, bound to 127.0.0.1 unless configured.

Read-only endpoints are open (the port is not meant to be reachable from the
internet); every mutating call needs ``Authorization: Bearer
$STRANGLER_ADMIN_TOKEN``. Without a configured token, mutating calls are
refused outright rather than left open.

=================  ======  ==================================================
path               method  what
=================  ======  ==================================================
/healthz           GET     the process is up
/readyz            GET     a route file is loaded (503 otherwise); detail
/metrics           GET     Prometheus text format (all workers)
/api/routes        GET     effective routes, weights and backends
/api/backends      GET     breaker state, recent failures, retry budget, fallbacks
/api/reload        POST    re-read the route file now (token)
/api/cache/purge   POST    purge cached responses by route, path prefix or URL (token)
/api/shadow/report GET     shadow comparison per route and endpoint (?route=NAME)
/api/shadow/reset  POST    forget the comparison counts, of one route or all (token)
=================  ======  ==================================================
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from strangler import metrics
from strangler.cache import PurgeRequest
from strangler.runtime import ReloadResult, Runtime
from strangler.shadow import route_report

__all__ = ["create_app"]

ReloadHook = Callable[[str], Awaitable[ReloadResult]]


def _authorized(request: Request, token: str | None) -> Response | None:
    """None when the request carries the admin token, else the error response."""
    if not token:
        return JSONResponse(
            {"error": "forbidden", "message": "set STRANGLER_ADMIN_TOKEN to enable admin changes"},
            status_code=403,
        )
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        return JSONResponse(
            {"error": "unauthorized", "message": "a valid bearer token is required"},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="strangler-admin"'},
        )
    return None


def _bad_purge(message: str) -> Response:
    return JSONResponse({"error": "bad_request", "message": message}, status_code=400)


def create_app(
    runtime: Runtime,
    *,
    token: str | None = None,
    reload: ReloadHook | None = None,
    extra_status: Callable[[], dict[str, Any]] | None = None,
) -> Starlette:
    """Build the admin app. ``reload`` overrides what ``POST /api/reload`` does
    (the multi-worker supervisor also signals its workers)."""
    do_reload: ReloadHook = reload or runtime.reload

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        detail: dict[str, Any] = {
            "ready": runtime.ready,
            "file": str(runtime.path),
            "generation": runtime.current.generation if runtime.ready else 0,
            "last_reload_error": list(runtime.last_error) or None,
        }
        if extra_status is not None:
            detail.update(extra_status())
        return JSONResponse(detail, status_code=200 if runtime.ready else 503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def routes(request: Request) -> Response:
        if not runtime.ready:
            return JSONResponse({"error": "not_ready"}, status_code=503)
        return JSONResponse(runtime.describe())

    async def backends(request: Request) -> Response:
        if not runtime.ready:
            return JSONResponse({"error": "not_ready"}, status_code=503)
        snap = runtime.current
        if metrics.multiprocess_dir():
            # The supervisor proxies nothing: report what the workers published.
            per_backend = metrics.backend_summary()
            return JSONResponse(
                {
                    "source": "metrics of all workers",
                    "backends": {
                        name: {"url": b.url, **per_backend.get(name, {})}
                        for name, b in snap.config.backends.items()
                    },
                }
            )
        return JSONResponse(
            {
                "source": "this process",
                "redis": None if runtime.shared is None else {"up": runtime.shared.up},
                "backends": {
                    name: {"url": b.url, **snap.guards[name].describe()}
                    for name, b in snap.config.backends.items()
                },
            }
        )

    async def reload_endpoint(request: Request) -> Response:
        denied = _authorized(request, token)
        if denied is not None:
            return denied
        result = await do_reload("admin API")
        return JSONResponse(result.as_dict(), status_code=200 if result.ok else 422)

    async def purge_endpoint(request: Request) -> Response:
        denied = _authorized(request, token)
        if denied is not None:
            return denied
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not body:
            return _bad_purge("send a JSON object with route, prefix and/or url")
        unknown = set(body) - {"route", "prefix", "url"}
        if unknown:
            return _bad_purge(f"unknown fields: {', '.join(sorted(map(str, unknown)))}")
        for name in ("route", "prefix", "url"):
            value = body.get(name)
            if value is not None and (not isinstance(value, str) or not value):
                return _bad_purge(f"{name} must be a non-empty string")
        for name in ("prefix", "url"):
            if body.get(name) is not None and not body[name].startswith("/"):
                return _bad_purge(f"{name} must start with '/' (a path, not a full URL)")
        what = PurgeRequest(route=body.get("route"), prefix=body.get("prefix"), url=body.get("url"))
        if what.route is not None and runtime.ready:
            if what.route not in runtime.current.table.by_name:
                return JSONResponse(
                    {"error": "not_found", "message": f"no route named {what.route!r}"},
                    status_code=404,
                )
        result = await runtime.cache.purge(what)
        if metrics.multiprocess_dir() and runtime.shared is None:
            result["warning"] = (
                "several workers and no Redis: each worker's in-process layer keeps its "
                "entries until they expire"
            )
        return JSONResponse({"purged": what.as_dict(), **result})

    async def shadow_report(request: Request) -> Response:
        if not runtime.ready:
            return JSONResponse({"error": "not_ready"}, status_code=503)
        snap = runtime.current
        wanted = request.query_params.get("route")
        policies = dict(snap.shadows)
        if wanted is not None:
            if wanted not in policies:
                return JSONResponse(
                    {"error": "not_found", "message": f"route {wanted!r} does not shadow"},
                    status_code=404,
                )
            policies = {wanted: policies[wanted]}
        routes: dict[str, Any] = {}
        source = "this process"
        for name, policy in policies.items():
            counts, samples, source = await runtime.shadower.totals(name)
            routes[name] = {
                "shadow_backend": policy.backend,
                "percent": round(policy.fraction * 100, 3),
                "noise_percent": round(policy.noise_fraction * 100, 3),
                "relative_threshold": round(policy.relative * 100, 3),
                "absolute_threshold": round(policy.absolute * 100, 5),
                "endpoints": route_report(
                    counts, samples, relative=policy.relative, absolute=policy.absolute
                ),
            }
        payload: dict[str, Any] = {"source": source, "routes": routes}
        if metrics.multiprocess_dir() and runtime.shared is None:
            payload["warning"] = (
                "several workers and no Redis: the workers' comparisons are not visible "
                "here; configure redis to see them"
            )
        return JSONResponse(payload)

    async def shadow_reset(request: Request) -> Response:
        denied = _authorized(request, token)
        if denied is not None:
            return denied
        if not runtime.ready:
            return JSONResponse({"error": "not_ready"}, status_code=503)
        try:
            body = await request.json() if await request.body() else {}
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return JSONResponse(
                {"error": "bad_request", "message": "send a JSON object"}, status_code=400
            )
        names = list(runtime.current.shadows)
        route = body.get("route")
        if route is not None:
            if route not in names:
                return JSONResponse(
                    {"error": "not_found", "message": f"route {route!r} does not shadow"},
                    status_code=404,
                )
            names = [route]
        await runtime.shadower.reset(names)
        return JSONResponse({"reset": names})

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_endpoint),
            Route("/api/routes", routes),
            Route("/api/backends", backends),
            Route("/api/reload", reload_endpoint, methods=["POST"]),
            Route("/api/cache/purge", purge_endpoint, methods=["POST"]),
            Route("/api/shadow/report", shadow_report),
            Route("/api/shadow/reset", shadow_reset, methods=["POST"]),
        ]
    )
