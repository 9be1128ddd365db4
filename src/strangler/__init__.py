"""strangler: a strangler-fig migration gateway.

Routes request paths by weighted, sticky rules to new services or the legacy
monolith, and lets a platform team move traffic route by route while it runs.
"""

from __future__ import annotations

from strangler.exceptions import (
    CircuitOpen,
    ConfigError,
    StartupError,
    StranglerError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

__version__ = "0.1.0"

__all__ = [
    "CircuitOpen",
    "ConfigError",
    "StartupError",
    "StranglerError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamTimeout",
    "__version__",
]
