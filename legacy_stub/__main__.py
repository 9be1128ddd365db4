"""Command line for the stub backends; see the `legacy_stub` package docstring."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from legacy_stub import faults
from legacy_stub.server import serve

logger = logging.getLogger("legacy_stub")

DEFAULT_PORTS = {"monolith": 8081, "orders": 8082}


def _fault(spec: str) -> faults.Fault:
    try:
        return faults.Fault.parse_cli(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad --fault {spec!r}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m legacy_stub",
        description="Stand-in legacy monolith and extracted orders service.",
    )
    sub = parser.add_subparsers(dest="kind", required=True, metavar="{monolith,orders}")
    for kind, help_text in (
        ("monolith", "the legacy shop"),
        ("orders", "the extracted orders service"),
    ):
        p = sub.add_parser(kind, help=help_text)
        p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
        p.add_argument(
            "--port",
            type=int,
            default=DEFAULT_PORTS[kind],
            help=f"port (default {DEFAULT_PORTS[kind]}; 0 picks a free one)",
        )
        p.add_argument(
            "--fault",
            action="append",
            default=[],
            type=_fault,
            metavar="PREFIX:KEY=VALUE,...",
            help="start with a fault, e.g. /api/orders:latency_ms=200,error_rate=0.5 "
            "(keys: latency_ms, error_rate, error_status, drop_rate, drop_mode); repeatable",
        )
        p.add_argument("--access-log", action="store_true", help="log every request")
        p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
        p.add_argument(
            "--shutdown-timeout",
            type=float,
            default=2.0,
            help="seconds in-flight requests get after SIGTERM (default 2)",
        )
        if kind == "orders":
            p.add_argument(
                "--differences",
                default="",
                metavar="FIELD,FIELD",
                help="order fields to alter in responses, e.g. total,status,items.price",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.kind == "monolith":
        from legacy_stub.monolith import create_monolith_app

        app = create_monolith_app(fault_list=args.fault)
    else:
        from legacy_stub.orders import Differences, create_orders_app

        try:
            app = create_orders_app(
                differences=Differences.parse(args.differences), fault_list=args.fault
            )
        except ValueError as exc:
            logger.error("bad --differences: %s", exc)
            return 2
    try:
        asyncio.run(
            serve(
                app,
                name=args.kind,
                host=args.host,
                port=args.port,
                access_log=args.access_log,
                shutdown_timeout=args.shutdown_timeout,
            )
        )
    except OSError as exc:
        logger.error("cannot serve %s on %s:%s: %s", args.kind, args.host, args.port, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
