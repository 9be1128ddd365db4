"""The project's exceptions.

Third-party errors (aiohttp, redis, pydantic, yaml) are translated at the
module boundary that talks to them, so nothing outside that module needs to
know which library raised::

    StranglerError
    ├── ConfigError                  the route file is unreadable or invalid
    ├── StartupError                 the gateway cannot start (a port is taken)
    └── UpstreamError                a backend could not give us a response
        ├── UpstreamConnectError     refused, unreachable, DNS: nothing was sent
        ├── UpstreamTimeout          connect, read, per-try or deadline timeout
        ├── UpstreamProtocolError    reset / closed / malformed response
        └── CircuitOpen              the backend's breaker is open: not even tried

Each `UpstreamError` carries ``backend`` (the name from the route file) and
``sent``: whether any byte of the request may have reached the backend. A
request that was never sent can be retried or sent to a fallback whatever its
method; one that was sent must not be repeated unless it is idempotent.
"""

from __future__ import annotations


class StranglerError(Exception):
    """Base class for every error this project raises on purpose."""


class ConfigError(StranglerError):
    """The route file could not be loaded.

    ``messages`` holds one human-readable line per problem, each naming the
    file, the route, the field and (where YAML gives one) the line.
    """

    def __init__(self, messages: list[str]) -> None:
        self.messages = list(messages)
        super().__init__("\n".join(self.messages))


class StartupError(StranglerError):
    """The gateway cannot start (a port is taken, ...); the message says why."""


class UpstreamError(StranglerError):
    """A backend failed to produce a response."""

    #: Short label used in metrics (``strangler_upstream_errors_total{kind}``).
    kind = "error"
    #: HTTP status the gateway answers with when nothing else can be done.
    status = 502

    def __init__(self, message: str, *, backend: str = "", sent: bool = False) -> None:
        super().__init__(message)
        self.backend = backend
        self.sent = sent

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r}, backend={self.backend!r}, sent={self.sent})"


class UpstreamConnectError(UpstreamError):
    """The connection could not be opened; no request byte left the gateway."""

    kind = "connect"


class UpstreamTimeout(UpstreamError):
    """Connecting, sending or reading took longer than the backend's timeout."""

    kind = "timeout"
    status = 504


class UpstreamProtocolError(UpstreamError):
    """The connection was reset or closed early, or the response was malformed."""

    kind = "protocol"


class CircuitOpen(UpstreamError):
    """The backend's circuit breaker is open (or half-open with its one trial
    already under way), so the request was not sent. ``retry_after`` is the
    number of seconds until the breaker lets a trial request through."""

    kind = "breaker_open"
    status = 503

    def __init__(self, message: str, *, backend: str = "", retry_after: float = 1.0) -> None:
        super().__init__(message, backend=backend, sent=False)
        self.retry_after = retry_after
