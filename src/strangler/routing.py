"""The route table: matching requests and choosing a backend.

`compile_table` turns a validated `RouteFile` into an immutable `RouteTable`.
Everything expensive (regexes, lower-casing, weight boundaries) happens there,
once per reload, so matching a request is a few string comparisons.

Backend choice (decision 5 in the design): a stable hash of
``(route name, sticky key)`` gives a bucket 0..9999, compared against the
cumulative weights in file order. Every replica computes the same answer with
no shared state, and raising the weight of the *last* backend (the new
service, by convention) only moves the boundary down, so a user already on the
new service stays there. Without a sticky key the bucket is random.

Paths are normalized before matching and forwarding (`normalize_path`):
unreserved percent-escapes decoded, dot segments removed, duplicate slashes
merged, so ``/api/orders/../admin`` is routed *and* forwarded as
``/api/admin``. An encoded slash or backslash is refused unless the route
allows it, because backends disagree on what it means (path confusion).
"""

from __future__ import annotations

import hashlib
import random
import re
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field

from strangler.config import Route, RouteFile

__all__ = [
    "BUCKETS",
    "BadPath",
    "CompiledRoute",
    "NormalizedPath",
    "RouteTable",
    "bucket_for",
    "compile_table",
    "normalize_path",
]

BUCKETS = 10_000

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Bytes allowed literally in a normalized path (RFC 3986 pchar + '/'), '%' for escapes.
_PATH_SAFE = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/%"
)
#: The same bytes, for ``bytes.translate(None, delete)``: what is left was not safe.
_PATH_SAFE_BYTES = bytes(sorted(_PATH_SAFE))
_HEX = frozenset(b"0123456789abcdefABCDEF")


class BadPath(ValueError):
    """The request target cannot be normalized (answered with 400)."""


@dataclass(frozen=True, slots=True)
class NormalizedPath:
    path: str
    #: The raw path contained %2F, %5C or a backslash.
    encoded_slash: bool = False


def _remove_dot_segments(segments: list[str]) -> list[str]:
    out: list[str] = []
    for seg in segments:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    return out


_normalized: dict[bytes, NormalizedPath] = {}
#: Raw paths whose normalized form is remembered (the paths a gateway sees repeat).
NORMALIZED_MEMO = 4096


def normalize_path(raw: bytes) -> NormalizedPath:
    """`_normalize`, remembered for the last few thousand distinct paths."""
    found = _normalized.get(raw)
    if found is None:
        found = _normalize(raw)  # raises BadPath: never remembered
        if len(_normalized) >= NORMALIZED_MEMO:
            _normalized.clear()
        _normalized[raw] = found
    return found


def _normalize(raw: bytes) -> NormalizedPath:
    """Normalize a raw request path (no query string).

    Decodes percent-escapes of unreserved characters, upper-cases the others,
    percent-encodes bytes that may not appear literally, merges duplicate
    slashes and removes ``.``/``..`` segments (never above the root).
    """
    if not raw.startswith(b"/"):
        raise BadPath("the request target must be an absolute path")
    # Fast path: nothing to decode, no dot segment, no empty segment.
    if (
        b"%" not in raw
        and b"/." not in raw
        and b"//" not in raw
        and b"\\" not in raw
        and not raw.translate(None, _PATH_SAFE_BYTES)
    ):
        return NormalizedPath(raw.decode("ascii"))

    encoded_slash = False
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        b = raw[i]
        if b == 0x25:  # '%'
            if i + 2 >= n:
                raise BadPath("truncated percent-escape in path")
            h1, h2 = raw[i + 1], raw[i + 2]
            if h1 not in _HEX or h2 not in _HEX:
                raise BadPath("invalid percent-escape in path")
            value = int(raw[i + 1 : i + 3], 16)
            if value in _UNRESERVED:
                out.append(value)
            else:
                if value in (0x2F, 0x5C):
                    encoded_slash = True
                out += b"%%%02X" % value
            i += 3
            continue
        if b == 0x5C:  # backslash
            encoded_slash = True
            out += b"%5C"
        elif b in _PATH_SAFE:
            out.append(b)
        else:
            out += b"%%%02X" % b
        i += 1

    segments = out.decode("ascii").split("/")[1:]
    trailing = bool(segments) and segments[-1] in ("", ".", "..")
    segments = [s for s in segments if s != ""]
    segments = _remove_dot_segments(segments)
    path = "/" + "/".join(segments)
    if trailing and segments:
        path += "/"
    return NormalizedPath(path, encoded_slash)


def bucket_for(route_name: str, key: str) -> int:
    """The stable bucket 0..9999 of a sticky key on a route (same on every replica)."""
    digest = hashlib.blake2b(
        route_name.encode() + b"\x00" + key.encode("utf-8", "surrogateescape"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def _boundaries(weights: Sequence[int]) -> tuple[int, ...]:
    """Cumulative upper bounds in buckets, e.g. weights (90, 10) → (9000, 10000)."""
    total = sum(weights)
    cum, out = 0, []
    for w in weights:
        cum += w
        out.append(cum * BUCKETS // total)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """One route, ready for the request path. Immutable."""

    name: str
    index: int
    # matching
    prefix: str | None
    exact: str | None
    regex: re.Pattern[str] | None
    methods: frozenset[str] | None
    host: str | None
    host_suffix: str | None
    headers: tuple[tuple[bytes, bytes], ...]
    # choice
    backends: tuple[str, ...]
    weights: tuple[int, ...]
    bounds: tuple[int, ...]
    sticky_header: bytes | None
    sticky_cookie: str | None
    sticky_client_ip: bool
    allow_override: bool
    fallback: str | None
    # forwarding
    rewrite_from: str | None
    rewrite_to: str
    preserve_host: bool
    allow_encoded_slash: bool
    source: Route = field(repr=False, compare=False)

    def matches(
        self, method: str, host: str, path: str, headers: Sequence[tuple[bytes, bytes]]
    ) -> bool:
        if self.prefix is not None:
            p = self.prefix
            if not path.startswith(p):
                return False
            if len(path) != len(p) and p[-1] != "/" and path[len(p)] != "/":
                return False
        elif self.exact is not None:
            if path != self.exact:
                return False
        elif self.regex is not None and self.regex.match(path) is None:
            return False
        if self.methods is not None and method not in self.methods:
            return False
        if self.host is not None and host != self.host:
            return False
        if self.host_suffix is not None and not host.endswith(self.host_suffix):
            return False
        if self.headers:
            for name, value in self.headers:
                for hname, hvalue in headers:
                    if hname == name and hvalue == value:
                        break
                else:
                    return False
        return True

    def sticky_key(
        self, headers: Sequence[tuple[bytes, bytes]], client_ip: str | None
    ) -> str | None:
        """The value that identifies the user for this route, if any."""
        if self.sticky_header is not None:
            for name, value in headers:
                if name == self.sticky_header:
                    return value.decode("latin-1") or None
            return None
        if self.sticky_cookie is not None:
            prefix = self.sticky_cookie + "="
            for name, value in headers:
                if name == b"cookie":
                    for part in value.decode("latin-1").split(";"):
                        part = part.strip()
                        if part.startswith(prefix):
                            return part[len(prefix) :] or None
            return None
        if self.sticky_client_ip:
            return client_ip
        return None

    def choose_bucket(self, bucket: int) -> str:
        """The backend owning ``bucket`` under the current weights."""
        return self.backends[bisect_right(self.bounds, bucket)]

    def choose(
        self,
        headers: Sequence[tuple[bytes, bytes]],
        client_ip: str | None,
        override: str | None = None,
    ) -> str:
        """Override header → sticky bucket → random bucket."""
        if (
            override is not None
            and self.allow_override
            and (override in self.backends or override == self.fallback)
        ):
            return override
        if len(self.backends) == 1:
            return self.backends[0]
        key = self.sticky_key(headers, client_ip)
        bucket = bucket_for(self.name, key) if key is not None else random.randrange(BUCKETS)
        return self.choose_bucket(bucket)

    def rewrite(self, path: str) -> str:
        """Apply the route's prefix rewrite (segment-aware)."""
        src = self.rewrite_from
        if src is None:
            return path
        if not path.startswith(src):
            return path
        rest = path[len(src) :]
        if rest and src[-1] != "/" and rest[0] != "/":
            return path
        new = self.rewrite_to + rest
        if not new.startswith("/"):
            new = "/" + new
        return new.replace("//", "/") if "//" in new else new


def _compile_route(route: Route, index: int) -> CompiledRoute:
    m = route.match
    host = host_suffix = None
    if m.host:
        h = m.host.lower()
        if h.startswith("*."):
            host_suffix = h[1:]
        else:
            host = h
    sticky = route.sticky
    rw_from: str | None = None
    rw_to = ""
    if route.rewrite is not None:
        if route.rewrite.strip_prefix is not None:
            rw_from = route.rewrite.strip_prefix
        elif route.rewrite.replace_prefix is not None:
            rw_from = route.rewrite.replace_prefix.from_
            rw_to = route.rewrite.replace_prefix.to
    weights = tuple(b.weight for b in route.backends)
    return CompiledRoute(
        name=route.name,
        index=index,
        prefix=m.path_prefix,
        exact=m.path,
        regex=re.compile(m.regex) if m.regex is not None else None,
        methods=frozenset(m.methods) if m.methods else None,
        host=host,
        host_suffix=host_suffix,
        headers=tuple(
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (m.headers or {}).items()
        ),
        backends=tuple(b.name for b in route.backends),
        weights=weights,
        bounds=_boundaries(weights),
        sticky_header=sticky.header.lower().encode("latin-1") if sticky and sticky.header else None,
        sticky_cookie=sticky.cookie if sticky and sticky.cookie else None,
        sticky_client_ip=bool(sticky and sticky.client_ip),
        allow_override=route.allow_override,
        fallback=route.fallback,
        rewrite_from=rw_from,
        rewrite_to=rw_to,
        preserve_host=route.preserve_host,
        allow_encoded_slash=route.allow_encoded_slash,
        source=route,
    )


@dataclass(frozen=True, slots=True)
class RouteTable:
    """The compiled routes in file order. First match wins."""

    routes: tuple[CompiledRoute, ...]
    by_name: dict[str, CompiledRoute]

    def match(
        self, method: str, host: str, path: str, headers: Sequence[tuple[bytes, bytes]]
    ) -> CompiledRoute | None:
        for route in self.routes:
            if route.matches(method, host, path, headers):
                return route
        return None


def compile_table(cfg: RouteFile) -> RouteTable:
    routes = tuple(_compile_route(r, i) for i, r in enumerate(cfg.routes))
    return RouteTable(routes=routes, by_name={r.name: r for r in routes})
