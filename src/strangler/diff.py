"""Field-by-field comparison of a primary and a candidate response, Diffy-style.

The gateway shadows requests: the primary answers the client, a copy goes to
the candidate, and the two captured responses are compared here. A sample is
also sent to the primary twice, so per-field noise (timestamps, request ids)
can be measured the same way and subtracted. ``compare`` turns a pair of
responses into ``{field: (primary, candidate)}``; ``significant`` decides
whether a field's difference rate is more than its noise rate; ``Templater``
turns concrete paths into endpoint names so counts aggregate.

Field names:

* ``status`` — the status code.
* ``header.<name>`` — every line of that header, joined with ``", "`` in
  order; ``<missing>`` when a side has none. Value-blind headers (default
  ``set-cookie``) compare only the number of lines.
* ``$``, ``$.user.name``, ``$.items[3]``, ``$["a.b"]`` — JSON paths, when both
  sides say JSON (``application/json`` or ``+json``) and both parse. Keys
  that are not identifiers are written as JSON strings in brackets.
* ``body`` — any other body: raw bytes (rendered as size and SHA-1 prefix),
  or normalized text when ``text_normalize`` is on.

Nothing here does I/O or reads a clock, and the work is bounded: at most
``MAX_FIELDS`` fields per comparison (further differences are dropped
silently, no marker field), and JSON below ``MAX_DEPTH`` levels is compared
as a whole subtree. Credentials in headers are never rendered (``redact``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

__all__ = [
    "DEFAULT_IGNORE_HEADERS",
    "MASKED",
    "MAX_DEPTH",
    "MAX_FIELDS",
    "MISSING",
    "REDACTED",
    "Captured",
    "DiffOptions",
    "Templater",
    "compare",
    "redact",
    "significant",
]

#: Rendered for a field one side does not have.
MISSING = "<missing>"
#: Replaces every mask match in a compared string.
MASKED = "<masked>"
#: Rendered instead of any value of a credential-bearing header.
REDACTED = "<redacted>"

#: Comparison stops once this many fields differ.
MAX_FIELDS = 200
#: JSON deeper than this is compared as one canonical dump per subtree.
MAX_DEPTH = 64

#: Headers that differ between any two responses, or are hop-by-hop artefacts.
DEFAULT_IGNORE_HEADERS = frozenset(
    {"date", "server", "x-request-id", "content-length", "via", "age"}
)

_REDACTED_FIELDS = frozenset(
    {"header.authorization", "header.cookie", "header.set-cookie", "header.proxy-authorization"}
)

_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_ISO_DATETIME = (
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:[Zz]|[+-]\d{2}(?::?\d{2})?)?"
)
_HTTP_DATE = (
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} "
    r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d{2}:\d{2}:\d{2} GMT"
)
_BUILTIN_MASKS = {
    "uuid": re.compile(_UUID),
    "timestamp": re.compile(f"{_HTTP_DATE}|{_ISO_DATETIME}"),
}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Captured:
    """One response as the shadowing code captured it.

    ``headers`` are raw field lines with lower-case names; a name may repeat.
    ``truncated`` means the body was cut at the capture bound, so comparing
    it would report differences that are only in what was kept.
    """

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    truncated: bool = False


class _Wild(Enum):
    ONE = "*"
    ANY = "**"


_Token = str | int | _Wild
_State = frozenset[tuple[int, int]]
_EMPTY: _State = frozenset()


class _Globs:
    """JSON-path globs matched incrementally while walking a document.

    A state is the set of (pattern, position) pairs still alive; stepping it
    by one key or index costs O(patterns), so the walk never re-matches a
    whole path, and with no patterns every state is empty and free.
    """

    __slots__ = ("_patterns", "start")

    def __init__(self, patterns: Sequence[str]) -> None:
        self._patterns = tuple(_parse_glob(p) for p in patterns)
        self.start = self._close({(i, 0) for i in range(len(self._patterns))})

    def _close(self, pairs: set[tuple[int, int]]) -> _State:
        # ``**`` may match zero segments: whoever stands before it also stands after it.
        todo = list(pairs)
        while todo:
            i, pos = todo.pop()
            pattern = self._patterns[i]
            if pos < len(pattern) and pattern[pos] is _Wild.ANY and (i, pos + 1) not in pairs:
                pairs.add((i, pos + 1))
                todo.append((i, pos + 1))
        return frozenset(pairs)

    def step(self, state: _State, segment: str | int) -> _State:
        if not state:
            return state
        nxt: set[tuple[int, int]] = set()
        for i, pos in state:
            pattern = self._patterns[i]
            if pos == len(pattern):
                continue
            token = pattern[pos]
            if token is _Wild.ANY:
                nxt.add((i, pos))
            elif token is _Wild.ONE or (type(token) is type(segment) and token == segment):
                nxt.add((i, pos + 1))
        return self._close(nxt) if nxt else _EMPTY

    def accepts(self, state: _State) -> bool:
        return any(pos == len(self._patterns[i]) for i, pos in state)


def _parse_glob(pattern: str) -> tuple[_Token, ...]:
    """Parse ``$.a.*[2]["odd.key"].**`` into tokens.

    ``.name`` takes everything up to the next ``.``, ``[`` or ``]``; ``*`` is one
    key or index, ``**`` any number (including none); ``["**"]`` is a key
    literally named ``**``.
    """
    if not pattern.startswith("$"):
        raise ValueError(f"JSON path pattern must start with '$': {pattern!r}")
    tokens: list[_Token] = []
    decoder = json.JSONDecoder()
    i, n = 1, len(pattern)
    while i < n:
        if pattern[i] == ".":
            j = i + 1
            while j < n and pattern[j] not in ".[]":
                j += 1
            name = pattern[i + 1 : j]
            if not name:
                raise ValueError(f"empty segment in JSON path pattern {pattern!r}")
            tokens.append(_Wild(name) if name in ("*", "**") else name)
            i = j
        elif pattern[i] == "[":
            if pattern.startswith('["', i):
                try:
                    key, j = decoder.raw_decode(pattern, i + 1)
                except ValueError as exc:
                    raise ValueError(f"bad quoted key in JSON path pattern {pattern!r}") from exc
                if not pattern.startswith("]", j):
                    raise ValueError(f"unclosed '[' in JSON path pattern {pattern!r}")
                tokens.append(key)
                i = j + 1
                continue
            end = pattern.find("]", i)
            inner = pattern[i + 1 : end] if end != -1 else ""
            if inner in ("*", "**"):
                tokens.append(_Wild(inner))
            elif re.fullmatch(r"[0-9]+", inner):
                tokens.append(int(inner))
            else:
                raise ValueError(f"bad index in JSON path pattern {pattern!r}")
            i = end + 1
        else:
            raise ValueError(f"expected '.' or '[' at {i} in JSON path pattern {pattern!r}")
    return tuple(tokens)


def _compile_mask(mask: str) -> re.Pattern[str]:
    builtin = _BUILTIN_MASKS.get(mask)
    if builtin is not None:
        return builtin
    try:
        return re.compile(mask)
    except re.error as exc:
        raise ValueError(f"invalid mask regex {mask!r}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class DiffOptions:
    """What counts as a difference. Built once per config; patterns and
    regexes are compiled here, so a bad one fails at config load (ValueError)
    rather than on the request path.

    ``ignore_paths`` and ``unordered_paths`` are globs over JSON paths:
    ``$.meta.*``, ``$.items[*].updated_at``, ``$.**.etag``. An ignored path
    drops its whole subtree. Unordered arrays are compared as multisets of
    canonical items (masks and ignored paths applied; ``numeric_tolerance``
    is not, and 1 and 1.0 count as the same item). ``numeric_tolerance`` is
    relative: ``math.isclose(a, b, rel_tol=tol, abs_tol=0.0)``, so 0 and
    1e-12 always differ. ``masks`` are ``"uuid"``, ``"timestamp"`` (ISO 8601
    date-times and RFC 1123 HTTP dates) or Python regexes; they apply to JSON
    strings, and to text bodies only with ``text_normalize``.
    """

    ignore_headers: frozenset[str] = DEFAULT_IGNORE_HEADERS
    value_blind_headers: frozenset[str] = frozenset({"set-cookie"})
    ignore_paths: tuple[str, ...] = ()
    numeric_tolerance: float = 0.0
    unordered_paths: tuple[str, ...] = ()
    masks: tuple[str, ...] = ()
    text_normalize: bool = False
    max_value_chars: int = 120
    _ignore: _Globs = field(init=False, repr=False, compare=False)
    _unordered: _Globs = field(init=False, repr=False, compare=False)
    _masks: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (self.numeric_tolerance >= 0 and math.isfinite(self.numeric_tolerance)):
            raise ValueError(f"numeric_tolerance must be >= 0, got {self.numeric_tolerance!r}")
        if self.max_value_chars < 1:
            raise ValueError(f"max_value_chars must be >= 1, got {self.max_value_chars!r}")
        blind = frozenset(h.lower() for h in self.value_blind_headers)
        object.__setattr__(
            self, "ignore_headers", frozenset(h.lower() for h in self.ignore_headers)
        )
        object.__setattr__(self, "value_blind_headers", blind)
        object.__setattr__(self, "_ignore", _Globs(self.ignore_paths))
        object.__setattr__(self, "_unordered", _Globs(self.unordered_paths))
        object.__setattr__(self, "_masks", tuple(_compile_mask(m) for m in self.masks))


def redact(field: str, value: str) -> str:
    """``<redacted>`` for any value of a credential-bearing header.

    ``<missing>`` is kept: whether a side sent the header at all is the
    difference worth seeing, and it gives nothing away.
    """
    if field in _REDACTED_FIELDS and value != MISSING:
        return REDACTED
    return value


def compare(
    primary: Captured, candidate: Captured, options: DiffOptions
) -> dict[str, tuple[str, str]]:
    """The fields that differ, each with short (primary, candidate) renderings.

    Order is stable: ``status``, then headers by name, then body fields in
    document order (primary's keys first, then keys only the candidate has).
    Bodies are skipped when either side was truncated, and byte-identical
    bodies are never parsed.
    """
    out: dict[str, tuple[str, str]] = {}
    differ = _Differ(options, out)
    try:
        if primary.status != candidate.status:
            differ.add("status", str(primary.status), str(candidate.status))
        differ.headers(primary.headers, candidate.headers)
        if not (primary.truncated or candidate.truncated) and primary.body != candidate.body:
            differ.body(primary, candidate)
    except _Full:
        pass
    return out


class _Full(Exception):
    """Unwinds the walk once ``MAX_FIELDS`` fields differ."""


class _MissingType:
    __slots__ = ()


_ABSENT = _MissingType()


class _Differ:
    __slots__ = ("_opts", "_out")

    def __init__(self, options: DiffOptions, out: dict[str, tuple[str, str]]) -> None:
        self._opts = options
        self._out = out

    def add(self, field: str, primary: str, candidate: str) -> None:
        if len(self._out) >= MAX_FIELDS:
            raise _Full
        limit = self._opts.max_value_chars
        self._out[field] = (
            _truncate(redact(field, primary), limit),
            _truncate(redact(field, candidate), limit),
        )

    def headers(
        self,
        primary: tuple[tuple[bytes, bytes], ...],
        candidate: tuple[tuple[bytes, bytes], ...],
    ) -> None:
        p, c = _header_map(primary), _header_map(candidate)
        for name in sorted(p.keys() | c.keys()):
            if name in self._opts.ignore_headers:
                continue
            pv, cv = p.get(name, []), c.get(name, [])
            if name in self._opts.value_blind_headers:
                if len(pv) != len(cv):
                    self.add(f"header.{name}", _count(pv), _count(cv))
            elif pv != cv:
                self.add(
                    f"header.{name}",
                    ", ".join(pv) if pv else MISSING,
                    ", ".join(cv) if cv else MISSING,
                )

    def body(self, primary: Captured, candidate: Captured) -> None:
        if _is_json(primary.headers) and _is_json(candidate.headers):
            p_ok, p_value = _parse_json(primary.body)
            c_ok, c_value = _parse_json(candidate.body)
            if p_ok and c_ok:
                ign, unord = self._opts._ignore, self._opts._unordered
                self._walk(p_value, c_value, "$", ign.start, unord.start, 0)
                return
        if self._opts.text_normalize:
            p_text, c_text = self._text(primary.body), self._text(candidate.body)
            if p_text is not None and c_text is not None:
                if p_text != c_text:
                    self.add("body", p_text, c_text)
                return
        if primary.body != candidate.body:
            self.add("body", _digest(primary.body), _digest(candidate.body))

    def _text(self, body: bytes) -> str | None:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return None
        # Collapse first, so a mask written with single spaces still matches.
        return self._mask(_WHITESPACE.sub(" ", text).strip())

    def _mask(self, text: str) -> str:
        for mask in self._opts._masks:
            text = mask.sub(MASKED, text)
        return text

    def _walk(
        self, p: object, c: object, path: str, ign: _State, unord: _State, depth: int
    ) -> None:
        ignore, unordered = self._opts._ignore, self._opts._unordered
        if ignore.accepts(ign):
            return
        kind = _kind(p)
        if p is _ABSENT or c is _ABSENT or kind != _kind(c):
            self.add(path, _render(p), _render(c))
            return
        if depth >= MAX_DEPTH:
            if _canonical(p) != _canonical(c):
                self.add(path, _render(p), _render(c))
            return
        if isinstance(p, dict) and isinstance(c, dict):
            keys = list(p) + [k for k in c if k not in p]
            for key in keys:
                self._walk(
                    p.get(key, _ABSENT),
                    c.get(key, _ABSENT),
                    path + _key_segment(key),
                    ignore.step(ign, key),
                    unordered.step(unord, key),
                    depth + 1,
                )
        elif isinstance(p, list) and isinstance(c, list):
            if unordered.accepts(unord):
                self._multiset(p, c, path, ign, unord, depth)
                return
            for i in range(max(len(p), len(c))):
                self._walk(
                    p[i] if i < len(p) else _ABSENT,
                    c[i] if i < len(c) else _ABSENT,
                    f"{path}[{i}]",
                    ignore.step(ign, i),
                    unordered.step(unord, i),
                    depth + 1,
                )
        elif isinstance(p, str) and isinstance(c, str):
            p_masked, c_masked = self._mask(p), self._mask(c)
            if p_masked != c_masked:
                self.add(path, _render(p_masked), _render(c_masked))
        elif kind == "number" and isinstance(p, int | float) and isinstance(c, int | float):
            if not _close(p, c, self._opts.numeric_tolerance):
                self.add(path, _render(p), _render(c))
        elif p != c:  # booleans (never numbers: kinds differ); two nulls are always equal
            self.add(path, _render(p), _render(c))

    def _multiset(
        self, p: list[object], c: list[object], path: str, ign: _State, unord: _State, depth: int
    ) -> None:
        p_items = self._items(p, ign, unord, depth)
        c_items = self._items(c, ign, unord, depth)
        if p_items != c_items:
            p_only = sum((p_items - c_items).values())
            c_only = sum((c_items - p_items).values())
            self.add(path, _unmatched(len(p), p_only), _unmatched(len(c), c_only))

    def _items(self, items: list[object], ign: _State, unord: _State, depth: int) -> Counter[str]:
        ignore, unordered = self._opts._ignore, self._opts._unordered
        counts: Counter[str] = Counter()
        for i, item in enumerate(items):
            item_ign = ignore.step(ign, i)
            if not ignore.accepts(item_ign):
                value = self._normalized(item, item_ign, unordered.step(unord, i), depth + 1)
                counts[_canonical(value)] += 1
        return counts

    def _normalized(self, value: object, ign: _State, unord: _State, depth: int) -> object:
        """``value`` as unordered comparison sees it: masked strings, integral
        floats as ints, ignored paths dropped, nested unordered arrays sorted."""
        ignore, unordered = self._opts._ignore, self._opts._unordered
        if isinstance(value, str):
            return self._mask(value)
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if depth >= MAX_DEPTH:
            return value
        if isinstance(value, dict):
            out: dict[str, object] = {}
            for key, child in value.items():
                child_ign = ignore.step(ign, key)
                if not ignore.accepts(child_ign):
                    child_unord = unordered.step(unord, key)
                    out[key] = self._normalized(child, child_ign, child_unord, depth + 1)
            return out
        if isinstance(value, list):
            items: list[object] = []
            for i, child in enumerate(value):
                child_ign = ignore.step(ign, i)
                if not ignore.accepts(child_ign):
                    child_unord = unordered.step(unord, i)
                    items.append(self._normalized(child, child_ign, child_unord, depth + 1))
            if unordered.accepts(unord):
                items.sort(key=_canonical)
            return items
        return value


def _header_map(headers: tuple[tuple[bytes, bytes], ...]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in headers:
        out.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    return out


def _is_json(headers: tuple[tuple[bytes, bytes], ...]) -> bool:
    for name, value in headers:
        if name.lower() == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return False


def _reject_constant(name: str) -> object:
    raise ValueError(f"non-standard JSON constant {name}")


def _parse_json(body: bytes) -> tuple[bool, object]:
    """Strict JSON (no NaN/Infinity, which would never equal themselves)."""
    try:
        return True, json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return False, None


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: True == 1 must still differ
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "missing"


def _close(a: int | float, b: int | float, tolerance: float) -> bool:
    if a == b:
        return True
    if tolerance == 0:
        return False
    try:
        return math.isclose(a, b, rel_tol=tolerance, abs_tol=0.0)
    except OverflowError:  # an int too large for a float
        return False


def _key_segment(key: str) -> str:
    if _IDENTIFIER.fullmatch(key):
        return f".{key}"
    return f"[{json.dumps(key, ensure_ascii=False)}]"


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _render(value: object) -> str:
    return MISSING if value is _ABSENT else _canonical(value)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _digest(body: bytes) -> str:
    return f"<{len(body)} bytes sha1:{hashlib.sha1(body, usedforsecurity=False).hexdigest()[:8]}>"


def _count(values: list[str]) -> str:
    if not values:
        return MISSING
    return "1 value" if len(values) == 1 else f"{len(values)} values"


def _unmatched(total: int, unmatched: int) -> str:
    return f"{total} item{'' if total == 1 else 's'} ({unmatched} unmatched)"


def significant(
    *,
    diffs: int,
    compared: int,
    noise: int,
    noise_compared: int,
    relative: float = 0.2,
    absolute: float = 0.0003,
) -> bool:
    """Is a field's candidate difference rate more than its noise (Diffy's rule)?

    ``d = diffs / compared`` is how often the field differs between primary
    and candidate; ``n = noise / noise_compared`` how often it differs between
    two calls to the primary (0 without noise samples). The field is reported
    when ``d - n > absolute`` and, if there is noise at all,
    ``(d - n) / n > relative``.

    A ``timestamp`` field differs in 100% of candidate comparisons, but also
    in 100% of primary-vs-primary ones: ``d - n = 0``, so it drops out, while
    a field that never differs against itself is reported once it differs
    more often than ``absolute``. No candidate comparisons means nothing to report.
    """
    if compared <= 0:
        return False
    d = diffs / compared
    n = noise / noise_compared if noise_compared > 0 else 0.0
    if d - n <= absolute:
        return False
    return n == 0 or (d - n) / n > relative


class Templater:
    """Turns a concrete request path into an endpoint name for aggregation.

    Configured patterns (``/users/{user}/orders/{order}``) win, first match
    first; ``{x}`` matches exactly one non-empty segment. Other paths get
    ids collapsed segment by segment: all digits -> ``{n}``, a UUID ->
    ``{uuid}``, 16+ hex characters -> ``{hex}``. Patterns are bucketed by
    segment count at construction, so ``template`` costs one split and a few
    segment comparisons.
    """

    __slots__ = ("_by_length", "_patterns")

    def __init__(self, patterns: Sequence[str] = ()) -> None:
        self._patterns = tuple(patterns)
        self._by_length: dict[int, list[tuple[str, tuple[str | None, ...]]]] = {}
        for pattern in self._patterns:
            segments = pattern.split("/")
            compiled = tuple(None if _PLACEHOLDER.fullmatch(s) else s for s in segments)
            self._by_length.setdefault(len(segments), []).append((pattern, compiled))

    def __repr__(self) -> str:
        return f"Templater(patterns={list(self._patterns)!r})"

    def template(self, path: str) -> str:
        segments = path.split("/")
        for pattern, compiled in self._by_length.get(len(segments), ()):
            if all(
                (segment != "") if want is None else (segment == want)
                for segment, want in zip(segments, compiled, strict=True)
            ):
                return pattern
        return "/".join(_collapse(segment) for segment in segments)


_PLACEHOLDER = re.compile(r"\{[^{}/]+\}")
_UUID_SEGMENT = re.compile(_UUID)
_HEX_SEGMENT = re.compile(r"[0-9a-fA-F]{16,}")


def _collapse(segment: str) -> str:
    if segment.isascii() and segment.isdigit():
        return "{n}"
    if _UUID_SEGMENT.fullmatch(segment):
        return "{uuid}"
    if _HEX_SEGMENT.fullmatch(segment):
        return "{hex}"
    return segment
