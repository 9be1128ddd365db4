"""HTTP caching rules for a shared cache (RFC 9111), as pure functions.

The cache (Redis plus an in-process layer) decides with these whether a
response may be stored, how long it stays fresh, how old a stored response
is, and whether it must be revalidated. Nothing here does I/O or reads a
clock: callers pass ``now`` and the request/response times, which keeps the
rules testable and the request path cheap.

Shared-cache specifics this module applies:

* ``s-maxage`` beats ``max-age`` beats ``Expires`` (§4.2.1); heuristic
  freshness only when the route enables it (§4.2.2).
* ``private`` and ``no-store`` responses are never stored (§3, §5.2.2.6),
  nor are those with ``Vary: *`` or, unless the route opts in, ``Set-Cookie``.
* A request with ``Authorization`` is stored only when the response says
  ``public``, ``s-maxage`` or ``must-revalidate`` (§3.5).
* ``no-cache`` (and ``must-revalidate`` / ``proxy-revalidate`` once stale)
  require revalidation before use (§4.2.4, §5.2.2.2).
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "CacheControl",
    "Verdict",
    "age_seconds",
    "current_age",
    "freshness_lifetime",
    "http_date",
    "may_serve_stale",
    "needs_revalidation",
    "storable",
    "targeted",
]

#: delta-seconds larger than this are treated as this (RFC 9111 §1.2.2).
MAX_DELTA = 2**31

#: Statuses a cache may store with heuristic freshness (RFC 9110 §15.1).
HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})

#: Statuses this cache understands well enough to store at all.
UNDERSTOOD_STATUSES = HEURISTIC_STATUSES | {302, 307}


@dataclass(frozen=True, slots=True)
class CacheControl:
    """Parsed ``Cache-Control`` directives (names lower-cased)."""

    directives: Mapping[str, str | None]

    @classmethod
    def parse(cls, values: Iterable[bytes | str]) -> CacheControl:
        """Parse every ``Cache-Control`` field line of a message.

        Quoted values may contain commas; a directive repeated with different
        values is kept as its first occurrence, and unknown directives are
        kept (and ignored by the rules here).
        """
        out: dict[str, str | None] = {}
        for raw in values:
            text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
            for part in _split_directives(text):
                name, sep, value = part.partition("=")
                name = name.strip().lower()
                if not name:
                    continue
                if sep:
                    value = value.strip()
                    if len(value) >= 2 and value[0] == value[-1] == '"':
                        value = value[1:-1]
                    out.setdefault(name, value)
                else:
                    out.setdefault(name, None)
        return cls(out)

    def has(self, name: str) -> bool:
        return name in self.directives

    def seconds(self, name: str) -> int | None:
        """A delta-seconds directive; None when absent or malformed."""
        value = self.directives.get(name)
        if value is None or not value.isdigit():
            return None
        return min(int(value), MAX_DELTA)


_SF_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_SF_BARE = re.compile(
    r'-?\d{1,15}(?:\.\d{1,3})?|"(?:[^"\\]|\\["\\])*"|[A-Za-z*][!#$%&\'*+\-.^_`|~0-9A-Za-z:/]*'
    r"|\?[01]|:[A-Za-z0-9+/=]*:"
)
#: Directives whose value must be an Integer in a targeted field (RFC 9213 §2.1).
_SF_INTEGERS = frozenset({"max-age", "s-maxage", "stale-while-revalidate", "stale-if-error"})


def targeted(values: Iterable[bytes | str]) -> CacheControl | None:
    """``CDN-Cache-Control`` (RFC 9213): a Structured Fields Dictionary with
    Cache-Control's directives, for caches like this one. None when the field
    does not parse or a directive has the wrong type: then the cache ignores it
    and ``Cache-Control`` decides, as the RFC requires."""
    text = ", ".join(v.decode("latin-1") if isinstance(v, bytes) else v for v in values)
    out: dict[str, str | None] = {}
    for member in text.split(","):
        member = member.strip(" \t")
        key, eq, value = member.partition("=")
        if not _SF_KEY.fullmatch(key):
            return None
        value = value.split(";", 1)[0]  # parameters carry nothing the cache uses
        if eq and not _SF_BARE.fullmatch(value):
            return None
        if key in _SF_INTEGERS and not (eq and value.lstrip("-").isdigit()):
            return None
        out.setdefault(key, value if eq and value != "?1" else None)
    return CacheControl(out)


def _split_directives(text: str) -> list[str]:
    if '"' not in text:  # the common case: nothing quoted
        return [p.strip() for p in text.split(",") if p.strip()]
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


_last_date: tuple[bytes | str | None, float | None] = (None, None)


def http_date(value: bytes | str | None) -> float | None:
    """An HTTP-date as a Unix timestamp; None when absent or invalid
    (an invalid ``Expires`` means "already expired" to the caller).

    The last answer is remembered: responses within one second share their
    ``Date``, and parsing one costs about 10 µs."""
    global _last_date
    if value is None:
        return None
    if value == _last_date[0]:
        return _last_date[1]
    result = _parse_http_date(value)
    _last_date = (value, result)
    return result


_MONTHS = {
    m: i + 1
    for i, m in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
    )
}
_DAY = r"(?:mon|tue|wed|thu|fri|sat|sun)"
_TIME = r"(\d\d):(\d\d):(\d\d)"
#: The three HTTP-date forms a recipient must accept (RFC 9110 §5.6.7); names in any case.
_IMF_FIXDATE = re.compile(rf"{_DAY}, (\d\d) ([a-z]{{3}}) (\d{{4}}) {_TIME} gmt", re.I)
_RFC850 = re.compile(
    rf"(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday), "
    rf"(\d\d)-([a-z]{{3}})-(\d\d) {_TIME} gmt",
    re.I,
)
_ASCTIME = re.compile(rf"{_DAY} ([a-z]{{3}}) ([ \d]\d) {_TIME} (\d{{4}})", re.I)


def _parse_http_date(value: bytes | str) -> float | None:
    """Strictly: anything but the three forms is invalid (an invalid ``Expires``
    means the response is already stale, so leniency here would keep
    responses fresh that the origin meant to expire)."""
    text = (value.decode("latin-1") if isinstance(value, bytes) else value).strip()
    if m := _IMF_FIXDATE.fullmatch(text):
        day, mon, year, hh, mm, ss = m.groups()
    elif m := _RFC850.fullmatch(text):
        day, mon, yy, hh, mm, ss = m.groups()
        # A two-digit year more than 50 years ahead is the last such year in the past.
        this_year = time.gmtime().tm_year
        year_n = this_year - this_year % 100 + int(yy)
        if year_n > this_year + 50:
            year_n -= 100
        year = str(year_n)
    elif m := _ASCTIME.fullmatch(text):
        mon, day, hh, mm, ss, year = m.groups()
    else:
        return None
    month = _MONTHS.get(mon.lower())
    d, h, mi, sec = int(day), int(hh), int(mm), int(ss)
    if month is None or not (1 <= d <= 31 and h <= 23 and mi <= 59 and sec <= 60):
        return None
    return float(calendar.timegm((int(year), month, d, h, mi, sec, 0, 0, 0)))


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a response may be stored, and why not."""

    store: bool
    reason: str = ""


def storable(
    *,
    method: str,
    status: int,
    request_cc: CacheControl,
    response_cc: CacheControl,
    has_authorization: bool,
    has_set_cookie: bool,
    vary: str | None,
    expires: bytes | str | None,
    heuristic: bool,
    allow_set_cookie: bool = False,
) -> Verdict:
    """May a shared cache store this response (RFC 9111 §3)?"""
    if method not in ("GET", "HEAD"):
        return Verdict(False, "method")
    if status not in UNDERSTOOD_STATUSES:
        return Verdict(False, "status")
    if request_cc.has("no-store") or response_cc.has("no-store"):
        return Verdict(False, "no-store")
    if response_cc.has("private"):
        return Verdict(False, "private")
    if vary is not None and any(v.strip() == "*" for v in vary.split(",")):
        return Verdict(False, "vary-star")
    if has_set_cookie and not allow_set_cookie:
        return Verdict(False, "set-cookie")
    if has_authorization and not (
        response_cc.has("public")
        or response_cc.has("s-maxage")
        or response_cc.has("must-revalidate")
    ):
        return Verdict(False, "authorization")
    explicit = (
        response_cc.has("public")
        or response_cc.seconds("s-maxage") is not None
        or response_cc.seconds("max-age") is not None
        or expires is not None
        or response_cc.has("no-cache")
    )
    if not explicit and not (heuristic and status in HEURISTIC_STATUSES):
        return Verdict(False, "no-freshness")
    return Verdict(True)


def freshness_lifetime(
    response_cc: CacheControl,
    *,
    date: float | None,
    expires: bytes | str | None,
    last_modified: float | None,
    response_time: float,
    heuristic: bool,
    heuristic_fraction: float = 0.1,
    heuristic_max: float = 86400.0,
) -> float:
    """Seconds the response is fresh for (RFC 9111 §4.2.1, §4.2.2)."""
    s_maxage = response_cc.seconds("s-maxage")
    if s_maxage is not None:
        return float(s_maxage)
    max_age = response_cc.seconds("max-age")
    if max_age is not None:
        return float(max_age)
    if expires is not None:
        when = http_date(expires)
        if when is None:
            return 0.0  # an invalid Expires means already expired (§5.3)
        return max(0.0, when - (date if date is not None else response_time))
    if heuristic and last_modified is not None:
        base = date if date is not None else response_time
        return min(heuristic_max, max(0.0, (base - last_modified) * heuristic_fraction))
    return 0.0


def current_age(
    *,
    age_header: bytes | str | None,
    date: float | None,
    request_time: float,
    response_time: float,
    now: float,
) -> float:
    """The stored response's age now (RFC 9111 §4.2.3)."""
    age_value = age_seconds(age_header) if age_header is not None else 0.0
    apparent_age = max(0.0, response_time - date) if date is not None else 0.0
    response_delay = response_time - request_time
    corrected_age_value = age_value + response_delay
    corrected_initial_age = max(apparent_age, corrected_age_value)
    return corrected_initial_age + (now - response_time)


def age_seconds(age_header: bytes | str) -> float:
    """An ``Age`` value in seconds. The first member of a list counts (callers
    pass the first line); a value that is not delta-seconds (after any
    ``;parameters``) counts as 0."""
    text = age_header.decode("latin-1") if isinstance(age_header, bytes) else age_header
    first = text.split(",", 1)[0].split(";", 1)[0].strip()
    return float(min(int(first), MAX_DELTA)) if first.isdigit() else 0.0


def needs_revalidation(response_cc: CacheControl, *, fresh: bool) -> bool:
    """Must a stored response be revalidated before it is used? Always when
    it is stale, and always when it says ``no-cache`` (§4.2.4, §5.2.2.4)."""
    return not fresh or response_cc.has("no-cache")


def may_serve_stale(response_cc: CacheControl) -> bool:
    """May a stale copy be served without revalidation (stale-if-error,
    stale-while-revalidate)? Not for ``must-revalidate``, ``proxy-revalidate``
    or ``no-cache`` responses (§5.2.2.2, §5.2.2.8)."""
    return not (
        response_cc.has("must-revalidate")
        or response_cc.has("proxy-revalidate")
        or response_cc.has("no-cache")
    )
