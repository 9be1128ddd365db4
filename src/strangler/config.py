"""The route file: schema, loading and validation.

The route file is YAML validated by pydantic v2 models. Two rules shape this
module:

* **Every error in one run.** pydantic runs model validators only when field
  validation succeeded, so one bad field would hide every cross-reference
  error (an unknown backend, a duplicate route name). We therefore validate
  each section on its own (server, redis, defaults, each backend, each route),
  then run the cross-reference checks ourselves over whatever parsed, and
  merge the messages.
* **Messages a person can act on.** Each message names the file, the route
  (or backend), the field and, where YAML gives one, the line::

      routes/demo.yaml:14: route 'orders': backends.1.name: unknown backend 'ordres'

Nothing here runs on the request path: `routing.compile_table` turns a
validated `RouteFile` into immutable runtime objects.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from strangler.diff import DEFAULT_IGNORE_HEADERS, DiffOptions
from strangler.exceptions import ConfigError

__all__ = [
    "Backend",
    "Breaker",
    "Cache",
    "Shadow",
    "ShadowCompare",
    "Retry",
    "RetryBudget",
    "RetryOverride",
    "Defaults",
    "Limits",
    "Match",
    "RedisSettings",
    "Rewrite",
    "Route",
    "RouteFile",
    "Server",
    "Sticky",
    "Timeouts",
    "WeightedBackend",
    "json_schema",
    "load",
    "loads",
]

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _parse_duration(value: Any) -> Any:
    """Accept ``1.5``, ``"500ms"``, ``"2s"``, ``"1m"``; return seconds as float."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 2s or 1m")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m is None:
            raise ValueError(f"invalid duration {value!r}: use a number of seconds or 500ms/2s/1m")
        return float(m.group(1)) * _UNITS[m.group(2)]
    return value


#: Seconds, written in YAML as a number or with a unit (``500ms``, ``2s``, ``1m``).
Duration = Annotated[
    float,
    BeforeValidator(_parse_duration),
    Field(ge=0, json_schema_extra={"examples": ["500ms", "2s", 1.5]}),
]

_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_TOKEN_METHOD_RE = re.compile(r"^[A-Z]+$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Model):
    """Per-backend timeouts. ``read`` bounds the wait for the response head and
    for each body chunk, not the whole transfer (a 200 MB download may take
    longer than ``read`` as long as bytes keep coming)."""

    connect: Duration = 1.0
    read: Duration = 30.0


_RETRY_STATUSES = [502, 503, 504]
_IDEMPOTENT_DEFAULT = ["GET", "HEAD", "OPTIONS"]


def _upper_methods(v: list[str] | None) -> list[str] | None:
    if v is None:
        return v
    out = [m.upper() for m in v]
    for m in out:
        if not _TOKEN_METHOD_RE.match(m):
            raise ValueError(f"invalid method {m!r}")
    return out


class Retry(_Model):
    """Retry policy of a backend (routes may override any field).

    ``attempts`` counts the first try: 1 means no retries. Backoff between
    tries is exponential with full jitter (random between 0 and
    ``min(max_backoff, backoff * 2**n)``); a ``Retry-After`` answer is honoured
    when it fits inside the deadline.
    """

    attempts: int = Field(default=1, ge=1, le=10, description="Tries in all; 1 = no retries.")
    per_try_timeout: Duration | None = Field(
        default=None, description="Bound on each try's wait for the response head."
    )
    deadline: Duration | None = Field(
        default=None, description="Bound on all tries together, backoff included."
    )
    backoff: Duration = Field(default=0.025, description="Base of the exponential backoff.")
    max_backoff: Duration = Field(default=1.0, description="Cap of one backoff wait.")
    on_status: list[int] = Field(
        default_factory=lambda: list(_RETRY_STATUSES), description="Statuses that are retried."
    )
    methods: list[str] = Field(
        default_factory=lambda: list(_IDEMPOTENT_DEFAULT),
        description="Methods retried after the request was sent (any method is retried "
        "when it never left the gateway).",
    )
    buffer_bytes: int = Field(
        default=1024 * 1024,
        ge=0,
        description="Request bodies up to this size are buffered so they can be resent; "
        "larger ones are never retried.",
    )

    @field_validator("on_status")
    @classmethod
    def _check_statuses(cls, v: list[int]) -> list[int]:
        for code in v:
            if not 500 <= code <= 599 and code != 429:
                raise ValueError(f"only 5xx statuses and 429 can be retried, not {code}")
        return v

    _upper = field_validator("methods")(classmethod(lambda cls, v: _upper_methods(v)))


class RetryOverride(_Model):
    """A route's changes to its backends' retry policies (unset fields inherit)."""

    attempts: int | None = Field(default=None, ge=1, le=10)
    per_try_timeout: Duration | None = None
    deadline: Duration | None = None
    backoff: Duration | None = None
    max_backoff: Duration | None = None
    on_status: list[int] | None = None
    methods: list[str] | None = None
    buffer_bytes: int | None = Field(default=None, ge=0)

    _upper = field_validator("methods")(classmethod(lambda cls, v: _upper_methods(v)))

    @field_validator("on_status")
    @classmethod
    def _check_statuses(cls, v: list[int] | None) -> list[int] | None:
        return None if v is None else Retry._check_statuses(v)


class RetryBudget(_Model):
    """Envoy-style retry budget per backend: retries in flight may not exceed
    ``percent`` of the active requests, but ``min_retries`` are always allowed."""

    percent: float = Field(default=20.0, ge=0, le=100)
    min_retries: int = Field(default=3, ge=0)


class Breaker(_Model):
    """Circuit breaker per backend: ``fail_max`` consecutive failures (connect
    errors, timeouts, 5xx) open it; after ``reset_timeout`` one trial request
    is let through; its success closes it again."""

    enabled: bool = True
    fail_max: int = Field(default=5, ge=1)
    reset_timeout: Duration = Field(default=10.0, gt=0)


class Backend(_Model):
    """An upstream: the legacy monolith or an extracted service."""

    url: str = Field(description="Base URL, e.g. http://orders.internal:8080 (http only).")
    timeouts: Timeouts | None = Field(default=None, description="Defaults to defaults.timeouts.")
    pool_size: int | None = Field(
        default=None, ge=1, le=10000, description="Max open connections. Default: defaults."
    )
    keepalive: Duration | None = Field(
        default=None,
        description="Close idle pooled connections after this long. Keep it below the "
        "backend's own idle timeout. Default: defaults.keepalive.",
    )
    client: Literal["h1", "aiohttp"] | None = Field(
        default=None,
        description="Upstream client: h1 (lean, fast) or aiohttp. Default: defaults.client.",
    )
    retry: Retry | None = Field(default=None, description="Default: defaults.retry.")
    retry_budget: RetryBudget | None = Field(
        default=None, description="Default: defaults.retry_budget."
    )
    breaker: Breaker | None = Field(default=None, description="Default: defaults.breaker.")

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        m = re.match(r"^(https?)://([^/:?#]+|\[[0-9a-fA-F:.]+\])(?::(\d{1,5}))?(/[^?#]*)?$", v)
        if m is None:
            raise ValueError(f"invalid backend url {v!r}: expected http://host[:port][/base-path]")
        if m.group(1) != "http":
            raise ValueError(
                "only http:// backends are supported (terminate TLS at the load balancer)"
            )
        if m.group(3) is not None and not 0 < int(m.group(3)) < 65536:
            raise ValueError(f"invalid port in {v!r}")
        return v.rstrip("/")


class Match(_Model):
    """Which requests a route takes. Exactly one of ``path_prefix``, ``path``
    and ``regex``; ``methods``, ``host`` and ``headers`` narrow it further."""

    path_prefix: str | None = Field(
        default=None,
        description="Matches the prefix on a segment boundary: /api matches /api and "
        "/api/x, not /apix.",
    )
    path: str | None = Field(default=None, description="Exact path.")
    regex: str | None = Field(default=None, description="Python regex, matched from the start.")
    methods: list[str] | None = Field(default=None, description="e.g. [GET, POST]. Default: all.")
    host: str | None = Field(
        default=None, description="Host header without port; '*.example.com' for subdomains."
    )
    headers: dict[str, str] | None = Field(default=None, description="Exact header values.")

    @model_validator(mode="after")
    def _exactly_one_path(self) -> Match:
        given = [k for k in ("path_prefix", "path", "regex") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of path_prefix, path or regex")
        for key in ("path_prefix", "path"):
            value = getattr(self, key)
            if value is not None and not value.startswith("/"):
                raise ValueError(f"{key} must start with '/'")
        return self

    @field_validator("regex")
    @classmethod
    def _check_regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"bad regex {v!r}: {exc}") from None
        return v

    @field_validator("methods")
    @classmethod
    def _check_methods(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        out = [m.upper() for m in v]
        for m in out:
            if not _TOKEN_METHOD_RE.match(m):
                raise ValueError(f"invalid method {m!r}")
        if not out:
            raise ValueError("methods must not be empty (leave it out to match all methods)")
        return out

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v:
            for name in v:
                if not _HEADER_NAME_RE.match(name):
                    raise ValueError(f"invalid header name {name!r}")
        return v


class WeightedBackend(_Model):
    name: str
    weight: int = Field(ge=0, le=1_000_000, description="Relative share; need not sum to 100.")


class Sticky(_Model):
    """What identifies a user for sticky routing. Exactly one field."""

    header: str | None = None
    cookie: str | None = None
    client_ip: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Sticky:
        given = [k for k in ("header", "cookie", "client_ip") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("set exactly one of header, cookie or client_ip: true")
        if self.header is not None and not _HEADER_NAME_RE.match(self.header):
            raise ValueError(f"invalid header name {self.header!r}")
        return self


class PrefixReplacement(_Model):
    from_: str = Field(alias="from")
    to: str

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Rewrite(_Model):
    """Path rewrite applied before forwarding. Exactly one field."""

    strip_prefix: str | None = Field(default=None, description="/api/orders/1 → /orders/1")
    replace_prefix: PrefixReplacement | None = Field(
        default=None, description="{from: /old, to: /new}"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Rewrite:
        if (self.strip_prefix is None) == (self.replace_prefix is None):
            raise ValueError("set exactly one of strip_prefix or replace_prefix")
        prefix = self.strip_prefix if self.replace_prefix is None else self.replace_prefix.from_
        if prefix is not None and not prefix.startswith("/"):
            raise ValueError("prefixes must start with '/'")
        return self


_IGNORE_QUERY_RE = re.compile(r"^[A-Za-z0-9_.~*\[\]-]+$")


class Cache(_Model):
    """Response caching on a route (GET and HEAD only).

    ``mode: http`` caches as a shared cache under RFC 9111: the origin's
    ``Cache-Control`` / ``Expires`` decide. ``mode: ttl`` makes every
    response that may be stored fresh for ``ttl``, for origins that send no
    cache headers (``no-store``, ``private`` and ``Set-Cookie`` still keep a
    response out).
    """

    mode: Literal["http", "ttl"] = "http"
    ttl: Duration | None = Field(default=None, description="Freshness in ttl mode (required).")
    vary: list[str] = Field(
        default_factory=list,
        description="Request headers added to the key of every entry (besides the origin's Vary).",
    )
    ignore_query: list[str] = Field(
        default_factory=list,
        description="Query parameters left out of the key; '*' globs (utm_*).",
    )
    max_object_bytes: int = Field(
        default=1024 * 1024,
        ge=0,
        description="Larger responses stream through and are not stored.",
    )
    stale_while_revalidate: Duration = Field(
        default=0.0,
        description="Serve a stale entry at once for this long past its freshness, "
        "refreshing it in the background.",
    )
    stale_if_error: Duration = Field(
        default=0.0,
        description="Serve a stale entry for this long past its freshness when the "
        "backend fails, times out or its breaker is open.",
    )
    shared_backends: bool = Field(
        default=False,
        description="The route's backends answer alike: share entries between them "
        "(by default each backend's answers are cached apart).",
    )
    store_set_cookie: bool = Field(
        default=False,
        description="Store responses carrying Set-Cookie (the stored copy drops it).",
    )
    heuristic: bool = Field(
        default=False,
        description="Heuristic freshness (10% of Last-Modified age) for responses "
        "without explicit freshness.",
    )
    lock_timeout: Duration = Field(
        default=2.0,
        gt=0,
        description="How long concurrent misses wait for the one request that fills "
        "the entry (and the expiry of the fill lock in Redis).",
    )

    @field_validator("vary")
    @classmethod
    def _check_vary(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _HEADER_NAME_RE.match(name):
                raise ValueError(f"invalid header name {name!r}")
        return sorted({name.lower() for name in v})

    @field_validator("ignore_query")
    @classmethod
    def _check_ignore_query(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _IGNORE_QUERY_RE.match(name):
                raise ValueError(f"invalid query parameter name {name!r}")
        return v

    @model_validator(mode="after")
    def _ttl_mode_needs_ttl(self) -> Cache:
        if self.mode == "ttl" and not self.ttl:
            raise ValueError("mode ttl needs a ttl greater than 0")
        return self


class ShadowCompare(_Model):
    """How a shadow response is compared with the primary one."""

    ignore_headers: list[str] = Field(
        default_factory=list,
        description="Headers not compared, besides Date, Server, X-Request-ID, "
        "Content-Length, Via and Age (Set-Cookie is compared by presence only).",
    )
    ignore: list[str] = Field(
        default_factory=list,
        description="JSON paths not compared: $.meta.*, $.items[*].updated_at, $.debug.**",
    )
    numeric_tolerance: float = Field(
        default=0.0, ge=0, description="Relative tolerance for JSON numbers (0.01 = 1%)."
    )
    unordered: list[str] = Field(
        default_factory=list, description="JSON arrays compared ignoring order ($.items)."
    )
    masks: list[str] = Field(
        default_factory=list,
        description="Values masked before comparing: uuid, timestamp, or a regex.",
    )
    text: bool = Field(
        default=False,
        description="Compare non-JSON bodies as text with whitespace normalized.",
    )

    @model_validator(mode="after")
    def _compiles(self) -> ShadowCompare:
        self.options()  # bad globs and regexes fail here, at load
        return self

    def options(self) -> DiffOptions:
        return DiffOptions(
            ignore_headers=DEFAULT_IGNORE_HEADERS | {h.lower() for h in self.ignore_headers},
            ignore_paths=tuple(self.ignore),
            numeric_tolerance=self.numeric_tolerance,
            unordered_paths=tuple(self.unordered),
            masks=tuple(self.masks),
            text_normalize=self.text,
        )


class Shadow(_Model):
    """Copies of a route's requests sent to another backend and compared."""

    backend: str = Field(description="The backend that gets the copies.")
    percent: float = Field(default=100.0, ge=0, le=100, description="Share of requests copied.")
    methods: list[str] = Field(
        default_factory=lambda: ["GET", "HEAD"], description="Methods that are copied."
    )
    allow_unsafe: bool = Field(
        default=False,
        description="Allow POST/PUT/PATCH/DELETE in methods; copies carry X-Strangler-Shadow: 1.",
    )
    timeout: Duration = Field(
        default=5.0,
        gt=0,
        description="Bound on the wait for a copy's response head (body chunks: the "
        "backend's read timeout). Copies are never retried.",
    )
    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=0,
        description="Request bodies up to this size are copied; larger ones are skipped.",
    )
    max_response_bytes: int = Field(
        default=1024 * 1024,
        ge=0,
        description="Response bodies compared up to this size (larger: body not compared).",
    )
    noise_percent: float = Field(
        default=10.0,
        ge=0,
        le=100,
        description="Share of copied safe requests whose primary is called twice to measure noise.",
    )
    relative_threshold: float = Field(
        default=20.0, ge=0, description="Percent by which a field's diff rate must beat its noise."
    )
    absolute_threshold: float = Field(
        default=0.03,
        ge=0,
        description="Percent of compared requests by which a field's diff rate must beat "
        "its noise.",
    )
    endpoints: list[str] = Field(
        default_factory=list,
        description="Path templates for grouping: /api/orders/{id}. Numeric and UUID "
        "segments collapse on their own.",
    )
    compare: ShadowCompare = Field(default_factory=ShadowCompare)

    _upper = field_validator("methods")(classmethod(lambda cls, v: _upper_methods(v)))

    @model_validator(mode="after")
    def _safe_unless_allowed(self) -> Shadow:
        unsafe = sorted(set(self.methods) - {"GET", "HEAD", "OPTIONS"})
        if unsafe and not self.allow_unsafe:
            raise ValueError(
                f"methods {', '.join(unsafe)} change state: set allow_unsafe: true to copy them"
            )
        return self

    @field_validator("endpoints")
    @classmethod
    def _check_endpoints(cls, v: list[str]) -> list[str]:
        for pattern in v:
            if not pattern.startswith("/"):
                raise ValueError(f"endpoint template {pattern!r} must start with '/'")
        return v


class Route(_Model):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    match: Match
    backends: list[WeightedBackend] = Field(min_length=1)
    sticky: Sticky | None = None
    allow_override: bool = Field(
        default=False, description="Honour X-Strangler-Backend: NAME (for testers)."
    )
    fallback: str | None = Field(default=None, description="Backend to use when the chosen fails.")
    rewrite: Rewrite | None = None
    preserve_host: bool = Field(
        default=False, description="Forward the client's Host instead of the backend's."
    )
    allow_encoded_slash: bool = Field(
        default=False, description="Accept %2F, %5C and '\\' in the path instead of a 400."
    )
    retry: RetryOverride | None = Field(
        default=None, description="Overrides of the backends' retry policies on this route."
    )
    cache: Cache | None = Field(default=None, description="Cache responses (GET/HEAD).")
    shadow: Shadow | None = Field(
        default=None, description="Copy requests to another backend and compare the answers."
    )


class Limits(_Model):
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=0, description="413 above this.")
    max_header_bytes: int = Field(
        default=16 * 1024, ge=256, description="431 when all headers together exceed this."
    )
    max_header_count: int = Field(default=100, ge=1, description="431 above this many headers.")


class Server(_Model):
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=1, le=65535)
    admin_host: str = Field(default="127.0.0.1", description="Admin API bind address.")
    admin_port: int = Field(default=9090, ge=1, le=65535)
    debug_headers: bool = Field(
        default=False, description="Add X-Strangler-Route / X-Strangler-Backend to responses."
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="CIDRs whose X-Forwarded-For is trusted (e.g. the ALB's subnets).",
    )
    limits: Limits = Field(default_factory=Limits)
    drain_timeout: Duration = Field(default=20.0, description="SIGTERM drain time.")
    keepalive_timeout: Duration = Field(
        default=65.0,
        description="Client-side idle keep-alive. Behind an ALB keep it above the ALB's "
        "idle timeout (60 s).",
    )
    reload_interval: Duration = Field(default=1.0, gt=0, description="Route-file poll period.")
    shadow_queue: int = Field(
        default=1000, ge=1, description="Copies waiting to be sent; more are dropped (counted)."
    )
    shadow_worker: bool = Field(
        default=True,
        description="Send shadow copies and compare them in a child process, so their CPU "
        "is not taken from client requests (off: in the gateway's own event loop).",
    )
    shadow_concurrency: int = Field(
        default=32, ge=1, description="Copies in flight at once (per process)."
    )
    cache_memory_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=0,
        description="Bound of the in-process cache layer in front of Redis (per process).",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _check_cidrs(cls, v: list[str]) -> list[str]:
        for cidr in v:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"invalid CIDR {cidr!r}") from None
        return v


class RedisSettings(_Model):
    url: str = Field(description="redis://host:6379/0")
    prefix: str = Field(default="strangler:", description="Key prefix shared by this gateway.")


class Defaults(_Model):
    """Values a backend inherits when it does not set its own."""

    timeouts: Timeouts = Field(default_factory=Timeouts)
    pool_size: int = Field(default=100, ge=1, le=10000)
    keepalive: Duration = Field(default=4.0, description="Pooled connection idle lifetime.")
    client: Literal["h1", "aiohttp"] = Field(
        default="h1", description="Upstream client for every backend that does not set one."
    )
    retry: Retry = Field(default_factory=Retry)
    retry_budget: RetryBudget = Field(default_factory=RetryBudget)
    breaker: Breaker = Field(default_factory=Breaker)


class RouteFile(_Model):
    """The whole route file."""

    server: Server = Field(default_factory=Server)
    redis: RedisSettings | None = None
    defaults: Defaults = Field(default_factory=Defaults)
    backends: dict[str, Backend] = Field(min_length=1)
    routes: list[Route] = Field(min_length=1)

    def backend_timeouts(self, name: str) -> Timeouts:
        return self.backends[name].timeouts or self.defaults.timeouts

    def backend_pool_size(self, name: str) -> int:
        return self.backends[name].pool_size or self.defaults.pool_size

    def backend_retry(self, name: str, route: Route | None = None) -> Retry:
        """The backend's retry policy, with the route's overrides applied."""
        base = self.backends[name].retry or self.defaults.retry
        if route is None or route.retry is None:
            return base
        changes = {k: getattr(route.retry, k) for k in route.retry.model_fields_set}
        return base.model_copy(update={k: v for k, v in changes.items() if v is not None})

    def backend_breaker(self, name: str) -> Breaker:
        return self.backends[name].breaker or self.defaults.breaker

    def backend_retry_budget(self, name: str) -> RetryBudget:
        return self.backends[name].retry_budget or self.defaults.retry_budget

    def backend_client(self, name: str) -> str:
        return self.backends[name].client or self.defaults.client

    def backend_keepalive(self, name: str) -> float:
        ka = self.backends[name].keepalive
        return self.defaults.keepalive if ka is None else ka


# --------------------------------------------------------------------------- loading

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")


class _LineMap:
    """Maps a path in the parsed document (``("routes", 2, "backends")``) to
    the 1-based line of the YAML node, using the marks from ``yaml.compose``."""

    def __init__(self, text: str) -> None:
        self._lines: dict[tuple[Any, ...], int] = {}
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            return
        if root is not None:
            self._walk(root, ())

    def _walk(self, node: yaml.Node, path: tuple[Any, ...]) -> None:
        self._lines.setdefault(path, node.start_mark.line + 1)  # a key's own line wins
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value
                self._lines[(*path, key)] = key_node.start_mark.line + 1
                if isinstance(value_node, yaml.MappingNode | yaml.SequenceNode):
                    self._walk(value_node, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._walk(item, (*path, i))

    def line(self, path: Iterable[Any]) -> int | None:
        p = tuple(path)
        while p:
            if p in self._lines:
                return self._lines[p]
            p = p[:-1]
        return self._lines.get(())


class _Errors:
    def __init__(self, filename: str, lines: _LineMap) -> None:
        self.filename = filename
        self.lines = lines
        self.messages: list[str] = []

    def add(self, path: tuple[Any, ...], owner: str, field: str, msg: str) -> None:
        line = self.lines.line(path)
        where = f"{self.filename}:{line}" if line else self.filename
        parts = [where]
        if owner:
            parts.append(owner)
        if field:
            parts.append(field)
        parts.append(msg)
        self.messages.append(": ".join(parts))

    def add_validation(
        self, exc: ValidationError, base: tuple[Any, ...], owner: str, strip: int = 0
    ) -> None:
        for err in exc.errors(include_url=False):
            loc = tuple(err["loc"])[strip:]
            # pydantic reports a union/tag step in loc for some types; keep simple paths
            loc = tuple(x for x in loc if not (isinstance(x, str) and x.startswith("function-")))
            field = ".".join(str(x) for x in loc)
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            if err["type"] == "missing":
                msg = "required field is missing"
            elif err["type"] == "extra_forbidden":
                msg = "unknown field"
            self.add((*base, *loc), owner, field, msg)


def _validate(
    model: type[BaseModel], data: Any, errors: _Errors, base: tuple[Any, ...], owner: str
) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors.add_validation(exc, base, owner)
        return None


def loads(text: str, filename: str = "<routes>") -> RouteFile:
    """Parse and validate route-file text; raise `ConfigError` with every problem."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark is not None else filename
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: invalid YAML: {problem}"]) from None
    lines = _LineMap(text)
    errors = _Errors(filename, lines)
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{filename}: the route file must be a mapping with backends and routes"]
        )

    unknown = set(data) - set(RouteFile.model_fields)
    for key in sorted(unknown, key=str):
        errors.add((key,), "", str(key), "unknown top-level field")

    # 1. Sections, each on its own so one error does not hide another.
    server = _validate(Server, data.get("server") or {}, errors, ("server",), "server")
    defaults = _validate(Defaults, data.get("defaults") or {}, errors, ("defaults",), "defaults")
    redis = None
    if data.get("redis") is not None:
        redis = _validate(RedisSettings, data["redis"], errors, ("redis",), "redis")

    raw_backends = data.get("backends")
    backends: dict[str, Backend] = {}
    backend_names: set[str] = set()
    if not isinstance(raw_backends, dict) or not raw_backends:
        errors.add(("backends",), "", "backends", "must be a mapping of at least one backend")
    else:
        for name, raw in raw_backends.items():
            name = str(name)
            backend_names.add(name)
            if not _NAME_RE.match(name):
                errors.add(("backends", name), f"backend {name!r}", "", "invalid backend name")
            parsed = _validate(Backend, raw, errors, ("backends", name), f"backend {name!r}")
            if parsed is not None:
                backends[name] = parsed

    raw_routes = data.get("routes")
    routes: list[Route | None] = []
    if not isinstance(raw_routes, list) or not raw_routes:
        errors.add(("routes",), "", "routes", "must be a list of at least one route")
        raw_routes = []
    for i, raw in enumerate(raw_routes):
        rname = raw.get("name") if isinstance(raw, dict) else None
        owner = f"route {rname!r}" if isinstance(rname, str) else f"route #{i + 1}"
        routes.append(_validate(Route, raw, errors, ("routes", i), owner))

    # 2. Cross-references over whatever parsed.
    seen: dict[str, int] = {}
    for i in range(len(routes)):
        raw = raw_routes[i] if isinstance(raw_routes[i], dict) else {}
        rname = raw.get("name")
        owner = f"route {rname!r}" if isinstance(rname, str) else f"route #{i + 1}"
        if isinstance(rname, str):
            if rname in seen:
                errors.add(
                    ("routes", i, "name"),
                    owner,
                    "name",
                    f"duplicate route name (first used by route #{seen[rname] + 1})",
                )
            else:
                seen[rname] = i
        raw_backend_list = raw.get("backends")
        raw_list: list[Any] = raw_backend_list if isinstance(raw_backend_list, list) else []
        names: list[str] = []
        for j, wb in enumerate(raw_list):
            bname = wb.get("name") if isinstance(wb, dict) else None
            if isinstance(bname, str):
                names.append(bname)
                if bname not in backend_names and backend_names:
                    errors.add(
                        ("routes", i, "backends", j, "name"),
                        owner,
                        f"backends.{j}.name",
                        f"unknown backend {bname!r} (known: {', '.join(sorted(backend_names))})",
                    )
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            errors.add(
                ("routes", i, "backends"),
                owner,
                "backends",
                f"backend listed twice: {', '.join(dupes)}",
            )
        weights = [wb.get("weight") for wb in raw_list if isinstance(wb, dict)]
        if raw_list and all(isinstance(w, int) and not isinstance(w, bool) for w in weights):
            if sum(weights) <= 0:  # type: ignore[arg-type]
                errors.add(("routes", i, "backends"), owner, "backends", "weights sum to 0")
        shadow = raw.get("shadow")
        shadow_backend = shadow.get("backend") if isinstance(shadow, dict) else None
        if (
            isinstance(shadow_backend, str)
            and backend_names
            and shadow_backend not in backend_names
        ):
            errors.add(
                ("routes", i, "shadow", "backend"),
                owner,
                "shadow.backend",
                f"unknown backend {shadow_backend!r}",
            )
        fallback = raw.get("fallback")
        if isinstance(fallback, str) and backend_names and fallback not in backend_names:
            errors.add(
                ("routes", i, "fallback"), owner, "fallback", f"unknown backend {fallback!r}"
            )
    if server is not None and server.port == server.admin_port:
        errors.add(("server", "admin_port"), "server", "admin_port", "must differ from port")

    if errors.messages:
        raise ConfigError(errors.messages)
    assert server is not None and defaults is not None
    return RouteFile(
        server=server,
        redis=redis,
        defaults=defaults,
        backends=backends,
        routes=[r for r in routes if r is not None],
    )


def load(path: str | Path) -> RouteFile:
    """Read and validate a route file; raise `ConfigError` naming the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{p}: cannot read route file: {exc}"]) from None
    return loads(text, str(p))


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the route file, for editors (VS Code's YAML extension)."""
    schema = TypeAdapter(RouteFile).json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "strangler route file"
    return schema
