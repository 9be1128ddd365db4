"""Serving a stub app until SIGTERM or SIGINT, then exiting cleanly.

Test harnesses and deploy scripts stop the stubs with SIGTERM and treat any
non-zero exit as a failure, so shutdown is explicit here: the signal sets an
event, in-flight requests get a short grace period, and `serve` returns.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from aiohttp import web

__all__ = ["serve", "url_for_address"]

logger = logging.getLogger(__name__)

ACCESS_LOGGER = logging.getLogger("legacy_stub.access")


def url_for_address(address: Any) -> str:
    host, port = address[0], address[1]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def serve(
    app: web.Application,
    *,
    name: str,
    host: str,
    port: int,
    access_log: bool = False,
    shutdown_timeout: float = 2.0,
    backlog: int = 1024,
) -> None:
    """Run ``app`` on ``host:port`` until SIGTERM/SIGINT; port 0 picks a free port."""
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=ACCESS_LOGGER if access_log else None,
        shutdown_timeout=shutdown_timeout,
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        site = web.TCPSite(runner, host, port, backlog=backlog, reuse_address=True)
        await site.start()
        urls = ", ".join(url_for_address(a) for a in runner.addresses)
        logger.info("%s listening on %s", name, urls)
        await stop.wait()
        logger.info("%s shutting down", name)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await runner.cleanup()
