"""Response caching: RFC 9111 shared-cache semantics over Redis, with a
bounded in-process layer in front.

The pieces, each small:

* `Entry`: one stored response (status, headers, body, the times that make
  its age, its freshness lifetime, the request header values it varies on).
  It encodes to one Redis value.
* `RoutePolicy`: one route's ``cache:`` block compiled for the request path:
  the key of a request, which stored variant matches it, whether a response
  may be stored and how long it stays fresh (the rules themselves are in
  `cachecontrol`).
* `MemoryLayer`: an LRU bounded in bytes, per process. Evictions are counted.
* `ResponseCache`: the two layers together, single-flight fills, the fill
  lock shared through Redis, invalidation and purge. It outlives reloads.

Keys are ``<prefix>cache:<route>:<scope>:<path>?<query>@<host>`` where scope
is the backend that produced the response (``*`` when the route declares its
backends equivalent): a canary's answers never reach legacy users. A key
holds a Redis hash of variants (``Vary``), at most `MAX_VARIANTS`.

Redis is never in the failure domain: every call goes through
`SharedState.run` (fail-fast, paused after an error, logged once per outage),
and a request whose Redis call fails carries on with the in-process layer.
Invalidations and purges are published on a capped Redis stream that every
replica reads every half second, so a replica's in-process layer forgets
what another replica invalidated within a second.
"""

from __future__ import annotations

import asyncio
import fnmatch
import gc
import json
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from strangler import cachecontrol as cc
from strangler import metrics, tasks
from strangler.config import Cache
from strangler.shared import SharedState

__all__ = [
    "Entry",
    "MemoryLayer",
    "RequestInfo",
    "ResponseCache",
    "RoutePolicy",
]

logger = logging.getLogger(__name__)

#: Variants (distinct Vary values) kept per key; the oldest goes first.
MAX_VARIANTS = 16
#: How long an entry with validators is kept past its freshness, for revalidation.
REVALIDATE_KEEP = 600.0
#: Redis writes in flight at once; more are skipped (and counted).
MAX_PENDING_WRITES = 64
#: How often replicas read the invalidation stream.
EVENT_SYNC_INTERVAL = 0.5
#: Events kept in the stream.
EVENT_STREAM_LEN = 10000
#: Keys longer than this keep a hash of their tail.
MAX_KEY_CHARS = 1024
#: Entries stored between two young-generation collections (see MemoryLayer.put).
COLLECT_EVERY = 2000
#: Poll period while another replica fills an entry.
FILL_POLL = 0.05

# What build_entry does with a response header, by name (absent: keep it, nothing else).
_CACHING, _DATE, _ETAG, _EXPIRES, _LAST_MODIFIED, _LENGTH, _NOT_KEPT, _AGE, _COOKIE = range(9)
_ROLE = {
    b"content-length": _LENGTH,
    b"cache-control": _CACHING,
    b"cdn-cache-control": _CACHING,
    b"vary": _CACHING,
    b"date": _DATE,
    b"etag": _ETAG,
    b"expires": _EXPIRES,
    b"last-modified": _LAST_MODIFIED,
    b"age": _AGE,
    b"set-cookie": _COOKIE,
    b"set-cookie2": _COOKIE,
    b"x-strangler-cache": _NOT_KEPT,
}
#: Response header fields an entry does not keep.
_SKIP_STORED = frozenset(name for name, role in _ROLE.items() if role >= _NOT_KEPT)
#: Bytes an entry counts for besides its body and header block: what the process
#: holds for it (its key of about 100 characters, the tuple, the times, the LRU's
#: bookkeeping), measured, so that the layer's bound is close to its real memory.
ENTRY_OVERHEAD = 700
# Header fields a 304 must not change in the stored response (RFC 9111 §3.2).
_NOT_UPDATED = frozenset({b"content-length", b"content-encoding", b"transfer-encoding"})
_304_FIELDS = frozenset(
    {
        b"cache-control",
        b"content-location",
        b"date",
        b"etag",
        b"expires",
        b"last-modified",
        b"vary",
    }
)
#: Methods known to be safe (RFC 9110 §9.2.1); every other one, unknown ones
#: included, invalidates what the cache holds for its URI (RFC 9111 §4.4).
_SAFE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


# --------------------------------------------------------------------------- entries


class Entry(NamedTuple):
    """One stored response: a tuple of atomic values.

    The in-process layer keeps entries as plain tuples, and the garbage
    collector stops tracking a tuple that holds only atomic values the first
    time it looks at it: 100,000 cached responses cost a collection nothing,
    where objects of a class would each be scanned (a pause of tens of
    milliseconds). That is why the header fields are packed into one bytes
    value (`head`; `headers` unpacks them): a tuple of pairs would take the
    collector one look per level of nesting, long enough for every stored
    response to reach its oldest generation. Make entries with `make`, which
    derives the fields after ``stale_if_error``.
    """

    status: int
    #: The header fields, packed: names and values joined by NUL (which HTTP
    #: forbids in both, and the parser rejects).
    head: bytes
    body: bytes
    #: Wall-clock times of the request that produced it and of its response.
    request_time: float
    response_time: float
    #: Corrected initial age (RFC 9111 §4.2.3) at ``response_time``.
    initial_age: float
    #: Freshness lifetime in seconds.
    lifetime: float
    #: (header name, request value or None) for every header it varies on.
    vary: tuple[tuple[str, str | None], ...]
    backend: str
    #: Windows in seconds past freshness for stale serving.
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    # Derived by `make` (or by RoutePolicy.build_entry, which has them at hand):
    etag: bytes | None = None
    last_modified: bytes | None = None
    no_cache: bool = False
    #: ``public``, ``s-maxage`` or ``must-revalidate``: may answer requests with Authorization.
    shareable: bool = False
    #: Not ``must-revalidate``, ``proxy-revalidate`` or ``no-cache``: may be served stale.
    may_stale: bool = True
    vary_names: tuple[str, ...] = ()
    #: The variant's field in the Redis hash (and its identity in memory).
    vkey: str = ""
    expires_at: float = 0.0
    size: int = 0
    #: The route that stored it (set by the layer that holds it).
    route: str = ""

    @classmethod
    def make(
        cls,
        *,
        status: int,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        request_time: float,
        response_time: float,
        initial_age: float,
        lifetime: float,
        vary: Iterable[tuple[str, str | None]],
        backend: str,
        stale_while_revalidate: float = 0.0,
        stale_if_error: float = 0.0,
        route: str = "",
    ) -> Entry:
        """An entry with its derived fields worked out from the others.
        Raises ValueError for a header field holding NUL (see `head`)."""
        headers = tuple(headers)
        head = _pack(headers)
        if head is None:
            raise ValueError("a header field holds NUL")
        vary = tuple(vary)
        values: list[bytes] = []
        cdn: list[bytes] = []
        etag = last_modified = None
        for name, value in headers:
            if name == b"cache-control":
                values.append(value)
            elif name == b"cdn-cache-control":
                cdn.append(value)
            elif name == b"etag":
                etag = value
            elif name == b"last-modified":
                last_modified = value
        control, _ = _directives(values, cdn)
        keep = _keep_for(
            lifetime,
            initial_age,
            _past_freshness(
                stale_while_revalidate,
                stale_if_error,
                etag is not None or last_modified is not None,
            ),
        )
        return cls(
            status,
            head,
            body,
            request_time,
            response_time,
            initial_age,
            lifetime,
            vary,
            backend,
            stale_while_revalidate,
            stale_if_error,
            etag,
            last_modified,
            *_flags(control),
            tuple(n for n, _ in vary),
            _vkey(vary),
            response_time + keep,
            len(body) + len(head) + ENTRY_OVERHEAD,
            route,
        )

    @property
    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """The header fields as (name, value) pairs."""
        parts = iter(self.head.split(b"\0"))
        return tuple(zip(parts, parts, strict=False))

    def header_list(self) -> list[tuple[bytes, bytes]]:
        """The header fields as a new list of pairs (to answer with)."""
        parts = iter(self.head.split(b"\0"))
        return list(zip(parts, parts, strict=False))

    def updated(self, **changes: Any) -> Entry:
        """A copy with some of the fields `make` takes changed (the rest re-derived)."""
        fields = {name: getattr(self, name) for name in _MADE_FROM}
        fields.update(changes)
        return Entry.make(**fields)

    @property
    def control(self) -> cc.CacheControl:
        """The stored directives that decide, parsed (not on the request path)."""
        return _directives(
            [v for n, v in self.headers if n == b"cache-control"],
            [v for n, v in self.headers if n == b"cdn-cache-control"],
        )[0]

    def age(self, now: float) -> float:
        return self.initial_age + max(0.0, now - self.response_time)

    def keep_for(self) -> float:
        """Seconds past the response this entry is worth keeping."""
        return _keep_for(
            self.lifetime,
            self.initial_age,
            _past_freshness(
                self.stale_while_revalidate,
                self.stale_if_error,
                self.etag is not None or self.last_modified is not None,
            ),
        )

    def expired(self, now: float) -> bool:
        return now > self.expires_at

    def encode(self) -> bytes:
        meta = {
            "s": self.status,
            "h": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers],
            "rq": self.request_time,
            "rs": self.response_time,
            "ia": self.initial_age,
            "l": self.lifetime,
            "v": [list(p) for p in self.vary],
            "b": self.backend,
            "swr": self.stale_while_revalidate,
            "sie": self.stale_if_error,
        }
        return json.dumps(meta, separators=(",", ":")).encode() + b"\n" + self.body

    @classmethod
    def decode(cls, blob: bytes) -> Entry | None:
        """The entry, or None for anything unreadable (never raises)."""
        head, sep, body = blob.partition(b"\n")
        if not sep:
            return None
        try:
            meta = json.loads(head)
            return cls.make(
                status=int(meta["s"]),
                headers=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in meta["h"]],
                body=body,
                request_time=float(meta["rq"]),
                response_time=float(meta["rs"]),
                initial_age=float(meta["ia"]),
                lifetime=float(meta["l"]),
                vary=tuple((str(n), None if v is None else str(v)) for n, v in meta["v"]),
                backend=str(meta["b"]),
                stale_while_revalidate=float(meta.get("swr", 0.0)),
                stale_if_error=float(meta.get("sie", 0.0)),
            )
        except (ValueError, KeyError, TypeError, UnicodeError, AttributeError):
            return None


_MADE_FROM = (
    "status",
    "headers",
    "body",
    "request_time",
    "response_time",
    "initial_age",
    "lifetime",
    "vary",
    "backend",
    "stale_while_revalidate",
    "stale_if_error",
    "route",
)


def _pack(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """`Entry.head` for these header fields; None if one holds NUL."""
    flat = [part for pair in headers for part in pair]
    head = b"\0".join(flat)
    return head if head.count(b"\0") == len(flat) - 1 or not flat else None


def _directives(
    control: Sequence[bytes], cdn: Sequence[bytes]
) -> tuple[cc.CacheControl, bool]:
    """The response directives that decide, and whether they are the targeted
    ``CDN-Cache-Control`` (RFC 9213: this gateway is a CDN-class cache, so a
    valid one replaces ``Cache-Control`` and ``Expires``)."""
    if cdn:
        chosen = cc.targeted(cdn)
        if chosen is not None:
            return chosen, True
    return cc.CacheControl.parse(control), False


def _flags(control: cc.CacheControl) -> tuple[bool, bool, bool]:
    """An entry's ``no_cache``, ``shareable`` and ``may_stale``, from its directives."""
    return (
        control.has("no-cache"),
        control.has("public") or control.has("s-maxage") or control.has("must-revalidate"),
        cc.may_serve_stale(control),
    )


def _past_freshness(swr: float, sie: float, validators: bool) -> float:
    """Seconds an entry is worth keeping once stale: for stale serving, and
    for revalidation when it has validators."""
    return max(swr, sie, REVALIDATE_KEEP) if validators else max(swr, sie)


def _keep_for(lifetime: float, initial_age: float, past_freshness: float) -> float:
    """Seconds past the response an entry is kept."""
    return max(1.0, lifetime - initial_age + past_freshness)


def _vkey(vary: Sequence[tuple[str, str | None]]) -> str:
    return "\x1f".join(f"{n}={v}" if v is not None else n for n, v in vary)


# --------------------------------------------------------------------------- requests

_NO_DIRECTIVES = cc.CacheControl({})


#: Request header fields the cache reads (a request without any is the common case).
_REQUEST_FIELDS = frozenset(
    {
        b"cache-control",
        b"authorization",
        b"range",
        b"if-none-match",
        b"if-modified-since",
        b"if-match",
        b"if-range",
        b"pragma",
    }
)


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What the cache needs from a request's headers, read once."""

    control: cc.CacheControl
    authorization: bool = False
    range: bool = False
    if_none_match: bytes | None = None
    if_modified_since: bytes | None = None
    #: Any conditional header (the two above, If-Match, If-Range).
    conditional: bool = False

    @classmethod
    def read(cls, headers: Sequence[tuple[bytes, bytes]]) -> RequestInfo:
        for name, _ in headers:
            if name in _REQUEST_FIELDS:
                break
        else:
            return _PLAIN_REQUEST
        control: list[bytes] = []
        authorization = ranged = conditional = False
        if_none_match = if_modified_since = None
        for name, value in headers:
            if name == b"cache-control":
                control.append(value)
            elif name == b"authorization":
                authorization = True
            elif name == b"range":
                ranged = True
            elif name == b"if-none-match":
                if_none_match = value
                conditional = True
            elif name == b"if-modified-since":
                if_modified_since = value
                conditional = True
            elif name == b"if-match" or name == b"if-range":
                conditional = True
            elif name == b"pragma" and not control and value.strip().lower() == b"no-cache":
                control.append(b"no-cache")
        return cls(
            cc.CacheControl.parse(control) if control else _NO_DIRECTIVES,
            authorization,
            ranged,
            if_none_match,
            if_modified_since,
            conditional,
        )

    def not_modified(self, entry: Entry) -> bool:
        """Does the client's conditional request match the entry (RFC 9110 §13.1)?"""
        if self.if_none_match is None and self.if_modified_since is None:
            return False
        if self.if_none_match is not None:
            if entry.etag is None:
                return False
            wanted = self.if_none_match.strip()
            if wanted == b"*":
                return True
            mine = _weak(entry.etag)
            return any(_weak(tag) == mine for tag in wanted.split(b","))
        if self.if_modified_since is not None and entry.last_modified is not None:
            since = cc.http_date(self.if_modified_since)
            modified = cc.http_date(entry.last_modified)
            return since is not None and modified is not None and modified <= since
        return False


#: A request without any of the fields the cache reads.
_PLAIN_REQUEST = RequestInfo(_NO_DIRECTIVES)


def _weak(tag: bytes) -> bytes:
    tag = tag.strip()
    return tag[2:] if tag.startswith(b"W/") else tag


# --------------------------------------------------------------------------- policy

#: Distinct combinations of caching headers remembered per route.
RULES_MEMO = 256


@dataclass(frozen=True, slots=True)
class _Rules:
    """What a response's caching headers decide, whatever its other headers."""

    #: Why it may not be stored; empty when it may.
    reason: str
    control: cc.CacheControl
    #: The directives are CDN-Cache-Control's (Expires is ignored).
    targeted: bool
    #: From s-maxage, max-age or ``mode: ttl``; None when Expires or a heuristic decides.
    lifetime: float | None
    swr: float
    sie: float
    #: Seconds an entry is kept past its freshness: without validators, and with them.
    stale_window: float
    keep_validated: float
    vary_names: tuple[str, ...]
    no_cache: bool
    shareable: bool
    may_stale: bool


@dataclass(slots=True)
class Freshness:
    """How a stored entry may be used for one request."""

    fresh: bool
    age: float
    #: Stale, but inside stale-while-revalidate: serve now, refresh in the background.
    serve_stale: bool = False
    #: Stale, but inside stale-if-error: may be served if the refresh fails.
    stale_on_error: bool = False


class RoutePolicy:
    """One route's cache settings, compiled."""

    __slots__ = (
        "route",
        "mode",
        "ttl",
        "vary",
        "max_object_bytes",
        "swr",
        "sie",
        "shared_backends",
        "store_set_cookie",
        "heuristic",
        "lock_timeout",
        "_ignore",
        "_ignore_re",
        "_keep_query",
        "_heads",
        "_heads_prefix",
        "_memo",
        "hits",
        "misses",
    )

    def __init__(self, route: str, settings: Cache) -> None:
        self.route = route
        self.mode = settings.mode
        self.ttl = settings.ttl or 0.0
        self.vary = tuple(settings.vary)
        self.max_object_bytes = settings.max_object_bytes
        self.swr = settings.stale_while_revalidate
        self.sie = settings.stale_if_error
        self.shared_backends = settings.shared_backends
        self.store_set_cookie = settings.store_set_cookie
        self.heuristic = settings.heuristic
        self.lock_timeout = settings.lock_timeout
        self._ignore = frozenset(p for p in settings.ignore_query if "*" not in p)
        globs = [fnmatch.translate(p) for p in settings.ignore_query if "*" in p]
        self._ignore_re = re.compile("|".join(globs)) if globs else None
        self._keep_query = not self._ignore and self._ignore_re is None
        #: Key heads (all but path, query and host) by backend, for one prefix.
        self._heads: dict[str, str] = {}
        self._heads_prefix = ""
        self._memo: dict[tuple[Any, ...], _Rules] = {}
        #: The route's hits and misses (strangler_cache_requests_total), counted inline.
        self.hits = metrics.counter(metrics.CACHE_REQUESTS, route, "hit")
        self.misses = metrics.counter(metrics.CACHE_REQUESTS, route, "miss")

    # -- keys

    def scope(self, backend: str) -> str:
        return "*" if self.shared_backends else backend

    def key(self, prefix: str, backend: str, host: str, path: str, query: bytes) -> str:
        q = self._query(query) if query else ""
        tail = f"{path}?{q}@{host}" if q else f"{path}@{host}"
        if len(tail) > MAX_KEY_CHARS:
            import hashlib

            digest = hashlib.blake2b(tail.encode("utf-8", "surrogateescape"), digest_size=16)
            tail = f"{tail[: MAX_KEY_CHARS - 40]}#{digest.hexdigest()}"
        if prefix != self._heads_prefix:
            self._heads.clear()
            self._heads_prefix = prefix
        head = self._heads.get(backend)
        if head is None:
            head = self._heads[backend] = f"{prefix}cache:{self.route}:{self.scope(backend)}:"
        return head + tail

    def _query(self, query: bytes) -> str:
        text = query.decode("latin-1")
        if self._keep_query:
            return text
        kept = []
        for part in text.split("&"):
            name = part.split("=", 1)[0]
            if name in self._ignore or (self._ignore_re and self._ignore_re.match(name)):
                continue
            kept.append(part)
        return "&".join(kept)

    # -- reading

    def vary_names(self, vary: list[bytes]) -> tuple[str, ...]:
        """The request headers an entry varies on: the route's, and the ones the
        response's ``Vary`` lines name."""
        if not vary and not self.vary:
            return ()
        names = set(self.vary)
        for value in vary:
            for name in value.decode("latin-1").split(","):
                name = name.strip().lower()
                if name:
                    names.add(name)
        return tuple(sorted(names))

    @staticmethod
    def request_value(headers: Sequence[tuple[bytes, bytes]], name: str) -> str | None:
        """All lines of a request header, joined, with whitespace normalized
        (RFC 9111 §4.1 allows a cache to normalize before matching)."""
        wanted = name.encode("latin-1")
        values = [v.decode("latin-1").strip() for n, v in headers if n == wanted]
        if not values:
            return None
        return ", ".join(" ".join(v.split()) for v in values)

    def select(
        self, entries: Sequence[Entry] | None, headers: Sequence[tuple[bytes, bytes]]
    ) -> Entry | None:
        """The stored variant whose varying request headers match this request."""
        if not entries:
            return None
        if len(entries) == 1 and not entries[0].vary and not self.vary:
            return entries[0]  # the common case: nothing varies
        best: Entry | None = None
        for entry in entries:
            if not set(self.vary).issubset(entry.vary_names):
                continue  # stored before the route varied on more headers
            if all(self.request_value(headers, n) == v for n, v in entry.vary):
                if best is None or entry.response_time > best.response_time:
                    best = entry
        return best

    def freshness(self, entry: Entry, request: RequestInfo, now: float) -> Freshness:
        """Fresh, servable stale, or in need of revalidation, for this request."""
        age = entry.age(now)
        lifetime = entry.lifetime
        rc = request.control
        fresh = age < lifetime
        if fresh and not rc.directives and not entry.no_cache:
            return Freshness(True, age)  # the common case
        max_age = rc.seconds("max-age")
        if max_age is not None and age > max_age:
            fresh = False
        min_fresh = rc.seconds("min-fresh")
        if min_fresh is not None and lifetime - age < min_fresh:
            fresh = False
        if fresh and (entry.no_cache or rc.has("no-cache")):
            fresh = False
        if fresh:
            return Freshness(True, age)
        may_stale = entry.may_stale and not rc.has("no-cache")
        staleness = age - lifetime
        if may_stale and rc.has("max-stale"):
            limit = rc.seconds("max-stale")
            if limit is None or staleness <= limit:
                return Freshness(True, age)
        swr = entry.stale_while_revalidate
        sie = entry.stale_if_error
        return Freshness(
            False,
            age,
            serve_stale=may_stale and staleness <= swr and max_age is None,
            stale_on_error=may_stale and staleness <= sie,
        )

    def usable_with_authorization(self, entry: Entry) -> bool:
        """RFC 9111 §3.5: a response may answer a request with Authorization
        only when it says so."""
        return entry.shareable

    # -- storing

    def build_entry(
        self,
        *,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        request_headers: Sequence[tuple[bytes, bytes]],
        request: RequestInfo,
        request_time: float,
        response_time: float,
        backend: str,
    ) -> Entry | str:
        """The entry to store, or why the response may not be stored. The
        stored header fields get a Content-Length if they have none.

        Every response stored goes through here, so it takes one pass over the
        headers with one dictionary lookup per header, and leaves the parsing
        of the caching headers to `_rules`, which remembers what it decided.
        """
        if status == 206:
            return "status"
        role_of = _ROLE.get
        stored: list[bytes] = []  # names and values, to pack into Entry.head
        caching: list[tuple[bytes, bytes]] = []  # Cache-Control, CDN-Cache-Control, Vary
        expires = date_value = last_modified = etag = age = None
        set_cookie = has_length = False
        for pair in headers:
            name, value = pair
            role = role_of(name)
            if role is None:
                stored += pair
                continue
            if role >= _NOT_KEPT:
                if role == _AGE:
                    if age is None:  # the first line counts
                        age = value
                elif role == _COOKIE:
                    set_cookie = True
                continue
            stored += pair
            if role == _CACHING:
                caching.append(pair)
            elif role == _DATE:
                date_value = value
            elif role == _ETAG:
                etag = value
            elif role == _EXPIRES:
                # More than one line is invalid, which means already expired (§5.3).
                expires = value if expires is None else b"invalid"
            elif role == _LAST_MODIFIED:
                last_modified = value
            else:
                has_length = True
        if not has_length and status not in (204, 304):  # it says how long its whole body is
            stored += (b"content-length", b"%d" % len(body))
        rules = self._rules(status, caching, set_cookie, request, expires is not None)
        if rules.reason:
            return rules.reason
        head = b"\0".join(stored)
        if head.count(b"\0") != len(stored) - 1 and stored:
            return "invalid-header"  # NUL in a field: the parser never lets one through
        date = cc.http_date(date_value) if date_value is not None else None
        lifetime = rules.lifetime
        if lifetime is None:
            lifetime = cc.freshness_lifetime(
                rules.control,
                date=date,
                expires=None if rules.targeted else expires,
                last_modified=cc.http_date(last_modified) if last_modified is not None else None,
                response_time=response_time,
                heuristic=self.heuristic,
            )
        # The corrected initial age (RFC 9111 §4.2.3), as cc.current_age at response_time.
        apparent_age = response_time - date if date is not None and date < response_time else 0.0
        initial_age = response_time - request_time
        if age is not None:
            initial_age += cc.age_seconds(age)
        if apparent_age > initial_age:
            initial_age = apparent_age
        validators = etag is not None or last_modified is not None
        if lifetime <= initial_age and not validators and rules.stale_window <= 0:
            return "no-freshness"
        keep = _keep_for(
            lifetime, initial_age, rules.keep_validated if validators else rules.stale_window
        )
        varied = (
            tuple((n, self.request_value(request_headers, n)) for n in rules.vary_names)
            if rules.vary_names
            else ()
        )
        return _new_entry(
            Entry,
            (
                status,
                head,
                body,
                request_time,
                response_time,
                initial_age,
                lifetime,
                varied,
                backend,
                rules.swr,
                rules.sie,
                etag,
                last_modified,
                rules.no_cache,
                rules.shareable,
                rules.may_stale,
                rules.vary_names,
                _vkey(varied) if varied else "",
                response_time + keep,
                len(body) + len(head) + ENTRY_OVERHEAD,
                self.route,
            ),
        )

    def _rules(
        self,
        status: int,
        caching: list[tuple[bytes, bytes]],
        set_cookie: bool,
        request: RequestInfo,
        has_expires: bool,
    ) -> _Rules:
        """What the caching headers decide, remembered: a backend sends the same
        few combinations of them, and parsing them each time costs more than the
        rest of storing a response."""
        rc = request.control
        key = (
            status,
            set_cookie,
            request.authorization,
            rc is not _NO_DIRECTIVES and rc.has("no-store"),
            has_expires,
            *caching,
        )
        rules = self._memo.get(key)
        if rules is None:
            if len(self._memo) >= RULES_MEMO:
                self._memo.clear()
            rules = self._memo[key] = self._decide(
                status,
                [v for n, v in caching if n == b"cache-control"],
                [v for n, v in caching if n == b"cdn-cache-control"],
                [v for n, v in caching if n == b"vary"],
                set_cookie,
                request,
                has_expires,
            )
        return rules

    def _decide(
        self,
        status: int,
        control: list[bytes],
        cdn: list[bytes],
        vary: list[bytes],
        set_cookie: bool,
        request: RequestInfo,
        has_expires: bool,
    ) -> _Rules:
        response_cc, from_cdn = _directives(control, cdn)
        no_cache, shareable, may_stale = _flags(response_cc)
        verdict = cc.storable(
            method="GET",
            status=status,
            request_cc=request.control,
            response_cc=response_cc,
            has_authorization=request.authorization,
            has_set_cookie=set_cookie,
            vary=b",".join(vary).decode("latin-1") or None,
            # only its presence matters here (and none when CDN-Cache-Control decides)
            expires=b"" if has_expires and not from_cdn else None,
            heuristic=self.heuristic or self.mode == "ttl",
            allow_set_cookie=self.store_set_cookie,
        )
        lifetime: float | None = None  # None: it depends on the response's dates
        if self.mode == "ttl":
            lifetime = self.ttl
        elif (explicit := response_cc.seconds("s-maxage")) is not None:
            lifetime = float(explicit)
        elif (explicit := response_cc.seconds("max-age")) is not None:
            lifetime = float(explicit)
        swr_directive = response_cc.seconds("stale-while-revalidate")
        sie_directive = response_cc.seconds("stale-if-error")
        swr = float(swr_directive) if swr_directive is not None else self.swr
        sie = float(sie_directive) if sie_directive is not None else self.sie
        return _Rules(
            reason="" if verdict.store else verdict.reason,
            control=response_cc,
            targeted=from_cdn,
            lifetime=lifetime,
            swr=swr,
            sie=sie,
            stale_window=_past_freshness(swr, sie, False),
            keep_validated=_past_freshness(swr, sie, True),
            vary_names=self.vary_names(vary),
            no_cache=no_cache,
            shareable=shareable,
            may_stale=may_stale,
        )

    def refreshed(
        self,
        entry: Entry,
        headers: Sequence[tuple[bytes, bytes]],
        request_time: float,
        response_time: float,
    ) -> Entry:
        """The entry after a 304: its headers updated with the 304's, its age
        and freshness recomputed (RFC 9111 §4.3.4)."""
        updated = {n for n, _ in headers if n not in _NOT_UPDATED and n not in _SKIP_STORED}
        merged = [(n, v) for n, v in entry.headers if n not in updated]
        merged.extend((n, v) for n, v in headers if n in updated)
        built = self.build_entry(
            status=entry.status,
            headers=merged,
            body=entry.body,
            request_headers=[
                (n.encode("latin-1"), v.encode("latin-1")) for n, v in entry.vary if v is not None
            ],
            request=RequestInfo(cc.CacheControl({})),
            request_time=request_time,
            response_time=response_time,
            backend=entry.backend,
        )
        if isinstance(built, str):
            # Still usable for this one answer, just not worth keeping fresh.
            return entry.updated(
                headers=merged,
                request_time=request_time,
                response_time=response_time,
                initial_age=0.0,
                lifetime=0.0,
            )
        return built


def not_modified_headers(entry: Entry) -> list[tuple[bytes, bytes]]:
    """The stored header fields a 304 answer carries (RFC 9110 §15.4.5)."""
    return [(n, v) for n, v in entry.headers if n in _304_FIELDS]


def is_unsafe(method: str) -> bool:
    return method not in _SAFE


# --------------------------------------------------------------------------- memory layer


class MemoryLayer:
    """Per-process LRU of variants by key, bounded in bytes.

    A key holds its entry as a plain tuple of atomic values, which the
    garbage collector stops tracking the first time it looks (see `Entry`);
    a key with several variants holds a list of them. `get` hands out
    `Entry` views.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        #: key -> its one variant (a plain tuple: see `Entry`), or a list of them.
        self._data: OrderedDict[str, tuple[Any, ...] | list[tuple[Any, ...]]] = OrderedDict()
        self._evictions: dict[str, metrics.Tally] = {}
        self._since_collect = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str, now: float) -> list[Entry] | None:
        item = self._data.get(key)
        if item is None:
            return None
        if type(item) is tuple:  # one variant: the common case
            if now <= item[_EXPIRES_AT]:
                self._data.move_to_end(key)
                return [_new_entry(Entry, item)]
            self._remove(key, [item])
            return None
        live = [t for t in item if now <= t[_EXPIRES_AT]]
        if len(live) < len(item):
            self.bytes -= sum(t[_SIZE] for t in item) - sum(t[_SIZE] for t in live)
            self._gauge()
            if not live:
                del self._data[key]
                return None
            self._data[key] = live[0] if len(live) == 1 else live
        self._data.move_to_end(key)
        return [_new_entry(Entry, t) for t in live]

    def put(self, key: str, route: str, entry: Entry) -> bool:
        size = entry.size
        if size > self.max_bytes:
            return False
        if entry.route != route:
            entry = entry._replace(route=route)
        data = self._data
        old = data.pop(key, None)
        if old is None:  # the common case: a new key
            data[key] = tuple(entry)  # a plain tuple: see Entry
        else:
            kept: list[tuple[Any, ...]] = []
            vk = entry.vkey
            for t in [old] if type(old) is tuple else old:
                if t[_VKEY] == vk:
                    self.bytes -= t[_SIZE]
                else:
                    kept.append(t)
            kept.append(tuple(entry))
            while len(kept) > MAX_VARIANTS:
                self.bytes -= kept.pop(0)[_SIZE]
            data[key] = kept[0] if len(kept) == 1 else kept
        self.bytes += size
        if self.bytes > self.max_bytes:
            self._evict()
        metrics.CACHE_MEMORY.value = self.bytes
        self._since_collect += 1
        if self._since_collect >= COLLECT_EVERY:
            # The collector starts a young-generation pass after 700 more objects
            # are made than freed. An evicted entry freed makes up for a new one
            # made, so once the layer is full no pass comes, new entries are never
            # looked at (and untracked), and when a pass does come it scans all of
            # them at once: 50-90 ms. A pass every COLLECT_EVERY stores keeps it short.
            self._since_collect = 0
            gc.collect(0)
        return True

    def _evict(self) -> None:
        """Drop the least recently used keys until the layer fits its bound."""
        data = self._data
        while self.bytes > self.max_bytes and data:
            _, gone = data.popitem(last=False)
            variants = [gone] if type(gone) is tuple else gone
            self.bytes -= sum(t[_SIZE] for t in variants)
            route = variants[0][_ROUTE]
            counted = self._evictions.get(route)
            if counted is None:
                counted = self._evictions[route] = metrics.counter(metrics.CACHE_EVICTIONS, route)
            counted.n += len(variants)

    def _remove(self, key: str, variants: Sequence[tuple[Any, ...]]) -> None:
        del self._data[key]
        self.bytes -= sum(t[_SIZE] for t in variants)
        self._gauge()

    def drop(self, keys: Iterable[str]) -> int:
        n = 0
        for key in keys:
            item = self._data.pop(key, None)
            if item is not None:
                variants = [item] if type(item) is tuple else item
                self.bytes -= sum(t[_SIZE] for t in variants)
                n += len(variants)
        self._gauge()
        return n

    def drop_matching(self, test: Callable[[str], bool]) -> int:
        return self.drop([k for k in self._data if test(k)])

    def _gauge(self) -> None:
        metrics.CACHE_MEMORY.value = self.bytes


_EXPIRES_AT = Entry._fields.index("expires_at")
_SIZE = Entry._fields.index("size")
_VKEY = Entry._fields.index("vkey")
_ROUTE = Entry._fields.index("route")
_new_entry = tuple.__new__


# --------------------------------------------------------------------------- the cache


@dataclass(frozen=True, slots=True)
class PurgeRequest:
    """What to purge: all of a route, a path prefix, or one URL (path?query)."""

    route: str | None = None
    prefix: str | None = None
    url: str | None = None

    def matches(self, key: str, key_prefix: str) -> bool:
        """Does this key (``<prefix>cache:<route>:<scope>:<path>?<q>@<host>``) match?"""
        rest = key[len(key_prefix) + len("cache:") :]
        # Route names may hold ':' (never '/'); the path starts with '/'.
        head, sep, tail = rest.partition(":/")
        route = head.rpartition(":")[0]
        tail = sep[1:] + tail
        if self.route is not None and route != self.route:
            return False
        target, at, host = tail.rpartition("@")
        if not at or "#" in host:  # a long key: its tail was cut and hashed (see `key`)
            target = tail.rpartition("#")[0]
        if self.prefix is not None and not _under(target, self.prefix):
            return False
        return not (self.url is not None and target != self.url)

    def as_dict(self) -> dict[str, str]:
        return {
            k: v
            for k, v in (("route", self.route), ("prefix", self.prefix), ("url", self.url))
            if v
        }


def _under(target: str, prefix: str) -> bool:
    """Is ``path?query`` at or under ``prefix``, on a segment boundary (as a
    route's ``path_prefix``: ``/api`` covers ``/api/x`` and ``/api?q``, not ``/apix``)?"""
    if not target.startswith(prefix):
        return False
    if len(target) == len(prefix) or prefix.endswith("/"):
        return True
    return target[len(prefix)] in "/?"


_UNLOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class Flight:
    """A fill in progress. The future others wait on is made only when
    someone waits (most fills have nobody waiting)."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: asyncio.Future[Entry | None] | None = None

    def wait(self) -> asyncio.Future[Entry | None]:
        if self._waiters is None:
            self._waiters = asyncio.get_running_loop().create_future()
        return self._waiters

    def finish(self, entry: Entry | None) -> None:
        if self._waiters is not None and not self._waiters.done():
            self._waiters.set_result(entry)


class ResponseCache:
    """The in-process layer plus Redis, shared by every route of a process."""

    def __init__(self, memory_bytes: int, shared: SharedState | None, prefix: str) -> None:
        self.memory = MemoryLayer(memory_bytes)
        self.shared = shared
        self.prefix = prefix
        self._flights: dict[str, Flight] = {}
        self._stored: dict[str, metrics.Tally] = {}
        self._pending_writes = 0
        self._origin = f"{os.getpid()}-{id(self):x}"
        # Follow events from a little before now (stream ids are Redis's clock in ms;
        # re-applying an old invalidation to a fresh in-process layer is harmless).
        self._last_event = f"{int((time.time() - 5.0) * 1000)}-0"
        self._sync: asyncio.Task[None] | None = None

    # -- lifecycle

    def start(self) -> None:
        if self.shared is not None and self._sync is None:
            self._sync = tasks.spawn(self._follow_events(), name="cache-events")

    async def stop(self) -> None:
        if self._sync is not None:
            self._sync.cancel()
            self._sync = None

    # -- lookup

    async def lookup_shared(self, key: str, now: float) -> list[Entry] | None:
        """The stored variants of a key in Redis (the caller looked in `memory` first);
        what it finds is kept in memory too."""
        shared = self.shared
        if shared is None:
            return None
        raw: Any = await shared.run("cache lookup", lambda: shared.redis.hgetall(key))
        if raw is None:  # Redis failed or is paused after a failure
            metrics.tally(metrics.CACHE_REDIS_BYPASS, "lookup")
            return None
        entries = [e for e in (Entry.decode(v) for v in raw.values()) if e is not None]
        live = [e for e in entries if not e.expired(now)]
        if not live:
            return None
        route = key[len(self.prefix) + len("cache:") :].partition(":")[0]
        for e in live:
            self.memory.put(key, route, e)
        return live

    # -- single-flight

    def flight(self, key: str) -> Flight | None:
        """The fill in progress for this key in this process, if any."""
        return self._flights.get(key)

    def begin_flight(self, key: str) -> Flight:
        flight = self._flights[key] = Flight()
        return flight

    def end_flight(self, key: str, flight: Flight, entry: Entry | None) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.finish(entry)

    async def fill_lock(self, key: str, timeout: float) -> bool:
        """Take the fleet-wide fill lock for a key. True when this replica
        should fetch: it holds the lock, or Redis is not there to ask."""
        shared = self.shared
        if shared is None:
            return True
        got = await shared.run(
            "cache lock",
            lambda: shared.redis.set(f"{key}|lock", self._origin, nx=True, px=int(timeout * 1000)),
        )
        if got is None:
            return not await self._lock_held(key)
        return bool(got)

    async def _lock_held(self, key: str) -> bool:
        # `set nx` answers None both when the lock is taken and when Redis
        # failed; only a working Redis saying "exists" means someone holds it.
        shared = self.shared
        if shared is None or not shared.up or shared.paused:
            return False
        held = await shared.run("cache lock", lambda: shared.redis.exists(f"{key}|lock"))
        return bool(held)

    async def release_lock(self, key: str) -> None:
        """Delete the fill lock if it is still ours (it may have expired and
        been taken by another replica)."""
        shared = self.shared
        if shared is not None:
            await shared.run(
                "cache unlock",
                lambda: shared.redis.eval(_UNLOCK, 1, f"{key}|lock", self._origin),
            )

    async def wait_for_fill(
        self, key: str, timeout: float, now: Callable[[], float]
    ) -> list[Entry] | None:
        """Another replica holds the fill lock: poll Redis for its entry, bounded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(FILL_POLL)
            entries = await self.lookup_shared(key, now())
            if entries:
                return entries
            if not await self._lock_held(key):
                return None
        return None

    # -- storing

    def store(self, key: str, route: str, entry: Entry) -> None:
        """Keep the entry in this process now; write it to Redis in the background."""
        if self.memory.put(key, route, entry):
            counted = self._stored.get(route)
            if counted is None:
                counted = self._stored[route] = metrics.counter(
                    metrics.CACHE_STORES, route, "memory"
                )
            counted.n += 1
        shared = self.shared
        if shared is None:
            return
        if self._pending_writes >= MAX_PENDING_WRITES:
            metrics.tally(metrics.CACHE_NOT_STORED, route, "redis_busy")
            return
        self._pending_writes += 1
        tasks.spawn(self._write(shared, key, route, entry), name="cache-write")

    async def _write(self, shared: SharedState, key: str, route: str, entry: Entry) -> None:
        try:
            ttl_ms = max(1000, int(entry.keep_for() * 1000))
            blob = entry.encode()
            field_name = entry.vkey

            async def write() -> bool:
                async with shared.redis.pipeline(transaction=False) as pipe:
                    pipe.hset(key, field_name, blob)
                    pipe.hlen(key)
                    pipe.pexpire(key, ttl_ms, gt=True)
                    pipe.pexpire(key, ttl_ms, nx=True)
                    result = await pipe.execute()
                if int(result[1]) > MAX_VARIANTS:
                    await shared.redis.delete(key)
                    await shared.redis.hset(key, field_name, blob)
                    await shared.redis.pexpire(key, ttl_ms)
                return True

            done = await shared.run("cache store", write)
            if done:
                metrics.tally(metrics.CACHE_STORES, route, "redis")
            else:
                metrics.tally(metrics.CACHE_REDIS_BYPASS, "store")
        finally:
            self._pending_writes -= 1

    # -- invalidation and purge

    async def invalidate(self, keys: Sequence[str], route: str, cause: str) -> None:
        """Forget these keys here, in Redis, and (through the event stream) on
        every other replica."""
        self.memory.drop(keys)
        metrics.tally(metrics.CACHE_INVALIDATIONS, route, cause)
        shared = self.shared
        if shared is None or not keys:
            return

        async def forget() -> None:
            async with shared.redis.pipeline(transaction=False) as pipe:
                pipe.delete(*keys)
                pipe.xadd(
                    self._events_key,
                    {"o": self._origin, "k": "keys", "v": json.dumps(list(keys))},
                    maxlen=EVENT_STREAM_LEN,
                    approximate=True,
                )
                await pipe.execute()

        await shared.run("cache invalidate", forget)

    async def purge(self, what: PurgeRequest) -> dict[str, Any]:
        """Purge matching entries everywhere; returns what was removed."""
        dropped = self.memory.drop_matching(lambda k: what.matches(k, self.prefix))
        if what.route:
            metrics.tally(metrics.CACHE_INVALIDATIONS, what.route, "purge")
        out: dict[str, Any] = {"memory_entries": dropped, "redis_keys": 0, "redis": "absent"}
        shared = self.shared
        if shared is None:
            return out
        pattern = f"{self.prefix}cache:{_glob_escape(what.route) if what.route else '*'}:*"

        async def scan_and_delete() -> int:
            deleted = 0
            batch: list[str] = []
            async for raw in shared.redis.scan_iter(match=pattern, count=1000):
                key = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
                if key.endswith("|lock") or not what.matches(key, self.prefix):
                    continue
                batch.append(key)
                if len(batch) >= 500:
                    deleted += int(await shared.redis.delete(*batch))
                    batch = []
            if batch:
                deleted += int(await shared.redis.delete(*batch))
            await shared.redis.xadd(
                self._events_key,
                {"o": self._origin, "k": "purge", "v": json.dumps(what.as_dict())},
                maxlen=EVENT_STREAM_LEN,
                approximate=True,
            )
            return deleted

        # A purge may scan many keys: not the request path's fail-fast bounds.
        try:
            deleted = await asyncio.wait_for(scan_and_delete(), timeout=30.0)
        except Exception as exc:  # noqa: BLE001 - reported to the operator
            out["redis"] = f"failed: {type(exc).__name__}: {exc}"
            return out
        out["redis_keys"] = deleted
        out["redis"] = "ok"
        return out

    @property
    def _events_key(self) -> str:
        return f"{self.prefix}cache:events"

    async def _follow_events(self) -> None:
        """Forever: apply other replicas' invalidations and purges to this
        process's in-process layer."""
        shared = self.shared
        assert shared is not None
        while True:
            await asyncio.sleep(EVENT_SYNC_INTERVAL)
            await self.apply_events(shared)

    async def apply_events(self, shared: SharedState) -> None:
        got: Any = await shared.run(
            "cache events",
            lambda: shared.redis.xread({self._events_key: self._last_event}, count=500),
        )
        if not got:
            return
        for _stream, events in got:
            for event_id, data in events:
                self._last_event = event_id.decode() if isinstance(event_id, bytes) else event_id
                self._apply(data)

    def _apply(self, data: dict[bytes, bytes]) -> None:  # one stream event
        if data.get(b"o", b"").decode() == self._origin:
            return
        kind = data.get(b"k", b"").decode()
        try:
            value = json.loads(data.get(b"v", b"null"))
        except ValueError:
            return
        if kind == "keys" and isinstance(value, list):
            self.memory.drop(str(k) for k in value)
        elif kind == "purge" and isinstance(value, dict):
            what = PurgeRequest(
                route=value.get("route"), prefix=value.get("prefix"), url=value.get("url")
            )
            self.memory.drop_matching(lambda k: what.matches(k, self.prefix))
