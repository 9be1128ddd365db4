"""The ``strangler`` command.

::

    strangler serve  --routes FILE [--port P] [--admin-port A] [--workers N] [--redis-url URL]
    strangler check  FILE [FILE ...]        exit 0 if valid, 1 with one line per error
    strangler schema                         JSON Schema of the route file, for editors
    strangler status [--admin URL]           effective routes and weights of a running gateway
    strangler reload [--admin URL]           ask a running gateway to re-read its route file
    strangler diffs  [ROUTE] [--admin URL]   the shadow comparison report, per endpoint

Every ``serve`` flag has a ``STRANGLER_*`` environment variable; a flag wins
over the variable, which wins over the route file's ``server:`` section.
Heavy modules are imported inside the commands: ``serve`` must set up
Prometheus multiprocess mode before prometheus-client is first imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]

DEFAULT_ADMIN = "http://127.0.0.1:9090"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"strangler: {name} must be an integer, got {value!r}") from None


def _env_bool(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def _cmd_check(args: argparse.Namespace) -> int:
    from strangler import config
    from strangler.exceptions import ConfigError

    status = 0
    for path in args.files:
        try:
            cfg = config.load(path)
        except ConfigError as exc:
            for line in exc.messages:
                print(line, file=sys.stderr)
            status = 1
        else:
            print(f"{path}: ok ({len(cfg.routes)} routes, {len(cfg.backends)} backends)")
    return status


def _cmd_schema(args: argparse.Namespace) -> int:
    from strangler import config

    print(json.dumps(config.json_schema(), indent=2))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from strangler import logs
    from strangler.exceptions import ConfigError, StartupError
    from strangler.server import ServeOptions, serve

    routes = args.routes or os.environ.get("STRANGLER_ROUTES")
    if not routes:
        print("strangler serve: give --routes FILE or set STRANGLER_ROUTES", file=sys.stderr)
        return 2
    drain_env = os.environ.get("STRANGLER_DRAIN_SECONDS")
    opts = ServeOptions(
        routes=routes,
        host=args.host or os.environ.get("STRANGLER_HOST") or None,
        port=args.port or _env_int("STRANGLER_PORT"),
        admin_host=args.admin_host or os.environ.get("STRANGLER_ADMIN_HOST") or None,
        admin_port=args.admin_port or _env_int("STRANGLER_ADMIN_PORT"),
        workers=args.workers or _env_int("STRANGLER_WORKERS") or 1,
        redis_url=args.redis_url or os.environ.get("STRANGLER_REDIS_URL") or None,
        admin_token=os.environ.get("STRANGLER_ADMIN_TOKEN") or None,
        drain_timeout=args.drain_timeout
        if args.drain_timeout is not None
        else (float(drain_env) if drain_env else None),
        access_log=args.access_log or _env_bool("STRANGLER_ACCESS_LOG"),
        log_format=args.log_format or os.environ.get("STRANGLER_LOG_FORMAT") or "text",
        log_level=args.log_level or os.environ.get("STRANGLER_LOG_LEVEL") or "INFO",
    )
    if opts.workers < 1:
        print("strangler serve: --workers must be at least 1", file=sys.stderr)
        return 2
    logs.setup(opts.log_format, opts.log_level)
    try:
        return serve(opts)
    except ConfigError as exc:
        for line in exc.messages:
            print(line, file=sys.stderr)
        return 1
    except StartupError as exc:
        print(f"strangler serve: {exc}", file=sys.stderr)
        return 1


def _admin_client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    import httpx

    headers = {}
    token = os.environ.get("STRANGLER_ADMIN_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=args.admin, headers=headers, timeout=10.0)


def _admin_get(
    args: argparse.Namespace, command: str, path: str, params: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """GET an admin endpoint; None (after saying why on stderr) when that fails."""
    import httpx

    try:
        with _admin_client(args) as client:
            resp = client.get(path, params=params)
    except httpx.HTTPError as exc:
        print(f"strangler {command}: cannot reach {args.admin}: {exc}", file=sys.stderr)
        return None
    if resp.status_code != 200:
        print(f"strangler {command}: {resp.status_code} {resp.text}", file=sys.stderr)
        return None
    data: dict[str, Any] = resp.json()
    if args.json:
        print(json.dumps(data, indent=2))
    return data


def _cmd_status(args: argparse.Namespace) -> int:
    data = _admin_get(args, "status", "/api/routes")
    if data is None:
        return 1
    if args.json:
        return 0
    print(f"{data['file']} (generation {data['generation']})")
    if data.get("last_error"):
        print("last reload FAILED, still serving the previous file:")
        for line in data["last_error"]:
            print(f"  {line}")
    for route in data["routes"]:
        split = ", ".join(f"{b['name']} {b['percent']:g}%" for b in route["backends"])
        match = " ".join(f"{k}={v}" for k, v in route["match"].items())
        print(f"  {route['name']:<20} {match:<40} {split}")
    return 0


def _cmd_reload(args: argparse.Namespace) -> int:
    import httpx

    try:
        with _admin_client(args) as client:
            resp = client.post("/api/reload")
    except httpx.HTTPError as exc:
        print(f"strangler reload: cannot reach {args.admin}: {exc}", file=sys.stderr)
        return 1
    if resp.status_code == 200:
        data = resp.json()
        print(
            f"reloaded: generation {data['generation']}"
            + ("" if data["changed"] else " (unchanged)")
        )
        return 0
    try:
        data = resp.json()
    except ValueError:
        data = {"message": resp.text}
    for line in data.get("errors") or [data.get("message", resp.text)]:
        print(line, file=sys.stderr)
    return 1


def _cmd_diffs(args: argparse.Namespace) -> int:
    params = {"route": args.route} if args.route else None
    data = _admin_get(args, "diffs", "/api/shadow/report", params)
    if data is None:
        return 1
    if args.json:
        return 0
    if data.get("warning"):
        print(f"warning: {data['warning']}")
    if not data["routes"]:
        print("no route shadows traffic")
        return 0
    print(f"source: {data['source']}")
    for name, route in data["routes"].items():
        print(
            f"route {name} -> shadow {route['shadow_backend']} ({route['percent']:g}% copied, "
            f"noise sampled on {route['noise_percent']:g}%)"
        )
        if not route["endpoints"]:
            print("  nothing compared yet")
        for ep in route["endpoints"]:
            print(
                f"  {ep['endpoint']}: compared {ep['compared']}, matched {ep['matched']}, "
                f"mismatched {ep['mismatched']}, errors {ep['errors']} "
                f"(noise samples {ep['noise_samples']})"
            )
            if ep["fields"] and not ep["noise_measured"]:
                print("    (no noise sample yet: timestamps and ids may still be listed)")
            for field in ep["fields"]:
                example = field.get("example") or {}
                print(
                    f"    {field['field']}: {field['diffs']} diffs, {field['noise']} noise"
                    + (f"  e.g. {example['primary']} -> {example['candidate']}" if example else "")
                )
            if ep["noise_fields"]:
                quiet = ", ".join(f["field"] for f in ep["noise_fields"][:8])
                more = len(ep["noise_fields"]) - 8
                print(
                    f"    noise (not reported): {quiet}" + (f" and {more} more" if more > 0 else "")
                )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="strangler", description="Strangler-fig migration gateway."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--routes", help="route file (env STRANGLER_ROUTES)")
    p.add_argument("--host", help="proxy bind address (default 0.0.0.0; env STRANGLER_HOST)")
    p.add_argument("--port", type=int, help="proxy port (default 8080; env STRANGLER_PORT)")
    p.add_argument("--admin-host", help="admin bind address (default 127.0.0.1)")
    p.add_argument("--admin-port", type=int, help="admin port (default 9090)")
    p.add_argument("--workers", type=int, help="worker processes (default 1)")
    p.add_argument("--redis-url", help="redis://host:6379/0 (env STRANGLER_REDIS_URL)")
    p.add_argument("--drain-timeout", type=float, help="seconds to drain on SIGTERM (default 20)")
    p.add_argument("--access-log", action="store_true", help="log one line per request")
    p.add_argument("--log-format", choices=["json", "text"], help="env STRANGLER_LOG_FORMAT")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("check", help="validate route files")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("schema", help="print the route file's JSON Schema")
    p.set_defaults(func=_cmd_schema)

    for name, func, text in (
        ("status", _cmd_status, "show a running gateway's routes"),
        ("reload", _cmd_reload, "reload a running gateway's route file (needs the token)"),
        ("diffs", _cmd_diffs, "show the shadow comparison report"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--admin", default=os.environ.get("STRANGLER_ADMIN_URL", DEFAULT_ADMIN))
        if name in ("status", "diffs"):
            p.add_argument("--json", action="store_true", help="raw JSON")
        if name == "diffs":
            p.add_argument("route", nargs="?", help="only this route")
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `strangler schema | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
