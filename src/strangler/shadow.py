"""Shadow traffic: copies of requests sent to another backend, compared off
the request path, with Diffy-style noise filtering and a report.

How a copy travels:

1. The proxy decides before reading the body (`ShadowPolicy.wants`): the
   method is copied, the sample says yes, and the primary backend is not the
   shadow backend itself. A copied body must be buffered, up to
   ``max_body_bytes``.
2. While the primary response streams to the client, its body is teed up to
   ``max_response_bytes`` (`Tee`).
3. After the last byte went to the client, `Shadower.submit` hands the copy
   over: to a free worker slot (``server.shadow_concurrency``), else to a
   bounded queue (``server.shadow_queue``), else it is dropped and counted.
4. A worker sends the copy (own timeout, never retried, errors never reach
   anyone but the report), and for ``noise_percent`` of safe requests calls
   the primary again: the fields that differ between two answers of the
   *same* backend are noise.
5. `diff.compare` gives the differing fields. Counts go to `ShadowStats`
   per (route, endpoint); the endpoint is the method plus the path template.

The report (`report`) keeps a field only when its candidate diff rate beats
its noise rate by the relative and absolute thresholds (`diff.significant`),
so timestamps and generated ids drop out with no configuration. A request is
*mismatched* when at least one of its differing fields is reported; the
combinations of differing fields (signatures) are counted to know that.

With Redis, each process adds its counts to ``<prefix>shadow:<route>``
hashes every second (one pipeline), and keeps the first example of each
field in ``<prefix>shadow:<route>:samples``: the report then covers every
replica. Counts not yet flushed survive a Redis outage in memory. Everything
is capped: endpoints per route, fields and signatures per endpoint.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from strangler import diff, metrics, tasks
from strangler.config import Shadow
from strangler.exceptions import UpstreamError
from strangler.upstream import Pool, clean_response_headers

if TYPE_CHECKING:
    from strangler.shared import SharedState

__all__ = ["ShadowPolicy", "ShadowStats", "Shadower", "Tee"]

logger = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Endpoints kept per route; more are counted under OTHER_ENDPOINT.
MAX_ENDPOINTS = 200
OTHER_ENDPOINT = "(other endpoints)"
#: Fields and field signatures kept per endpoint.
MAX_FIELDS = 300
MAX_SIGNATURES = 200
OVERFLOW_SIGNATURE = "\x1eoverflow"
#: Compare in a thread above this many body bytes (keeps the event loop free).
THREAD_COMPARE_BYTES = 64 * 1024
#: Paths whose endpoint name is remembered (per route).
ENDPOINT_MEMO = 4096
FLUSH_INTERVAL = 1.0
SEP = "\x1f"
FIELD_SEP = "\x1e"

_random = random.Random()
_SHADOW_MARK = (b"x-strangler-shadow", b"1")


def _to_metrics(kind: str, route: str, label: str, n: int = 1) -> None:
    if kind == "requests":
        metrics.tally(metrics.SHADOW_REQUESTS, route, label, n=n)
        return
    # "skipped" (a request not copied) or "capped" (a reason only)
    metrics.tally(metrics.SHADOW_SKIPPED, route, label, n=n)
    if kind == "skipped":
        metrics.tally(metrics.SHADOW_REQUESTS, route, "skipped", n=n)


#: Where counts go: the metrics, or (in the shadow worker process) a batch for the gateway.
count: Callable[..., None] = _to_metrics


def set_sink(sink: Callable[..., None]) -> None:
    global count
    count = sink


class Tee:
    """The first ``limit`` bytes of a streamed body, and whether it went on."""

    __slots__ = ("limit", "parts", "size", "truncated")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        if self.truncated or not chunk:
            return
        room = self.limit - self.size
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[:room]
        self.parts.append(chunk)
        self.size += len(chunk)

    def body(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)


class ShadowPolicy:
    """One route's ``shadow:`` block, compiled."""

    __slots__ = (
        "route",
        "backend",
        "fraction",
        "methods",
        "timeout",
        "max_body_bytes",
        "max_response_bytes",
        "noise_fraction",
        "relative",
        "absolute",
        "options",
        "templater",
        "_endpoints",
    )

    def __init__(self, route: str, settings: Shadow) -> None:
        self.route = route
        self.backend = settings.backend
        self.fraction = settings.percent / 100.0
        self.methods = frozenset(settings.methods)
        self.timeout = settings.timeout
        self.max_body_bytes = settings.max_body_bytes
        self.max_response_bytes = settings.max_response_bytes
        self.noise_fraction = settings.noise_percent / 100.0
        self.relative = settings.relative_threshold / 100.0
        self.absolute = settings.absolute_threshold / 100.0
        self.options = settings.compare.options()
        self.templater = diff.Templater(settings.endpoints)
        self._endpoints: dict[tuple[str, str], str] = {}

    def wants(self, method: str, backend: str) -> bool:
        """Copy this request? (Counts the copies skipped because the primary
        is the shadow backend itself, as after a flip to 100%.)"""
        if method not in self.methods:
            return False
        if self.fraction < 1.0 and _random.random() >= self.fraction:
            return False
        if backend == self.backend:
            count("skipped", self.route, "same_backend")
            return False
        return True

    def endpoint(self, method: str, path: str) -> str:
        """``GET /api/orders/{n}``; remembered for the paths seen last (bounded)."""
        key = (method, path)
        name = self._endpoints.get(key)
        if name is None:
            if len(self._endpoints) >= ENDPOINT_MEMO:
                self._endpoints.clear()
            name = self._endpoints[key] = f"{method} {self.templater.template(path)}"
        return name


@dataclass(slots=True)
class Job:
    """One copy to send and compare (plain data: it crosses to the shadow
    worker process)."""

    route: str
    primary_backend: str
    method: str
    path: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes | None
    primary: diff.Captured
    preserve_host: bool

    def as_tuple(self) -> tuple[Any, ...]:
        p = self.primary
        return (
            self.route, self.primary_backend, self.method, self.path, self.target,
            self.headers, self.body, p.status, p.headers, p.body, p.truncated,
            self.preserve_host,
        )  # fmt: skip

    @classmethod
    def from_tuple(cls, t: tuple[Any, ...]) -> Job:
        route, backend, method, path, target, headers, body, st, ph, pb, trunc, keep = t
        return cls(
            route, backend, method, path, target, headers, body,
            diff.Captured(st, ph, pb, trunc), keep,
        )  # fmt: skip


#: What a `Shadower` needs to run a route's copies: its policy and the pools.
Resolver = Callable[[str], "tuple[ShadowPolicy, Mapping[str, Pool]] | None"]


# --------------------------------------------------------------------------- stats


class ShadowStats:
    """Counts per route, keyed ``endpoint SEP kind [SEP field]``.

    kinds: ``c`` compared, ``e`` errors, ``r`` raw mismatches (any field
    differed), ``nc`` noise samples, ``d``/``n`` a field's diffs / noise,
    ``s`` a signature (the differing fields of one request, joined).
    """

    def __init__(self) -> None:
        self.totals: dict[str, Counter[str]] = {}
        self.samples: dict[str, dict[str, tuple[str, str]]] = {}
        #: Not yet added to Redis.
        self.delta: dict[str, Counter[str]] = {}
        self.new_samples: dict[str, dict[str, tuple[str, str]]] = {}
        self._endpoints: dict[str, set[str]] = {}
        self._fields: dict[tuple[str, str], set[str]] = {}
        self._signatures: dict[tuple[str, str], set[str]] = {}

    def _endpoint(self, route: str, endpoint: str) -> str:
        known = self._endpoints.setdefault(route, set())
        if endpoint in known:
            return endpoint
        if len(known) >= MAX_ENDPOINTS:
            count("capped", route, "endpoint_cap")
            return OTHER_ENDPOINT
        known.add(endpoint)
        return endpoint

    def _add(self, route: str, key: str, n: int = 1) -> None:
        self.totals.setdefault(route, Counter())[key] += n
        self.delta.setdefault(route, Counter())[key] += n

    def _field_ok(self, route: str, endpoint: str, field: str) -> bool:
        known = self._fields.setdefault((route, endpoint), set())
        if field in known:
            return True
        if len(known) >= MAX_FIELDS:
            return False
        known.add(field)
        return True

    def record(
        self,
        route: str,
        endpoint: str,
        diffs: Mapping[str, tuple[str, str]] | None,
        noise: Mapping[str, tuple[str, str]] | None,
    ) -> None:
        """One compared copy (``diffs`` None: the copy failed)."""
        ep = self._endpoint(route, endpoint)
        if diffs:
            diffs = collapse_indexes(diffs)
        if noise:
            noise = collapse_indexes(noise)
        if diffs is None:
            self._add(route, f"{ep}{SEP}e")
            return
        self._add(route, f"{ep}{SEP}c")
        if diffs:
            self._add(route, f"{ep}{SEP}r")
            fields = [f for f in diffs if self._field_ok(route, ep, f)]
            for f in fields:
                self._add(route, f"{ep}{SEP}d{SEP}{f}")
                # Every delta carries an example of each field it counts: a
                # reset elsewhere (another replica, the gateway of this shadow
                # worker) may have dropped the one sent before.
                skey = f"{ep}{SEP}{f}"
                self.samples.setdefault(route, {}).setdefault(skey, diffs[f])
                self.new_samples.setdefault(route, {}).setdefault(skey, diffs[f])
            signature = FIELD_SEP.join(sorted(diffs))
            sigs = self._signatures.setdefault((route, ep), set())
            if signature not in sigs and len(sigs) >= MAX_SIGNATURES:
                signature = OVERFLOW_SIGNATURE
            sigs.add(signature)
            self._add(route, f"{ep}{SEP}s{SEP}{signature}")
        if noise is not None:
            self._add(route, f"{ep}{SEP}nc")
            for f in noise:
                if self._field_ok(route, ep, f):
                    self._add(route, f"{ep}{SEP}n{SEP}{f}")

    def take_delta(self) -> tuple[dict[str, Counter[str]], dict[str, dict[str, tuple[str, str]]]]:
        delta, samples = self.delta, self.new_samples
        self.delta, self.new_samples = {}, {}
        return delta, samples

    def give_back(
        self, delta: dict[str, Counter[str]], samples: dict[str, dict[str, tuple[str, str]]]
    ) -> None:
        """A flush failed: keep the counts for the next one."""
        for route, counts in delta.items():
            self.delta.setdefault(route, Counter()).update(counts)
        for route, items in samples.items():
            self.new_samples.setdefault(route, {}).update(items)

    def absorb(
        self, delta: dict[str, Counter[str]], samples: dict[str, dict[str, tuple[str, str]]]
    ) -> None:
        """Counts made elsewhere (the shadow worker process), already capped there."""
        for route, counts in delta.items():
            self.totals.setdefault(route, Counter()).update(counts)
            self.delta.setdefault(route, Counter()).update(counts)
        for route, items in samples.items():
            mine = self.samples.setdefault(route, {})
            pending = self.new_samples.setdefault(route, {})
            for key, pair in items.items():
                mine.setdefault(key, pair)
                pending.setdefault(key, pair)  # Redis keeps the first (HSETNX)

    def reset(self, route: str | None = None) -> None:
        for table in (self.totals, self.samples, self.delta, self.new_samples, self._endpoints):
            if route is None:
                table.clear()
            else:
                table.pop(route, None)
        for keyed in (self._fields, self._signatures):
            for key in [k for k in keyed if route is None or k[0] == route]:
                del keyed[key]


_INDEX = re.compile(r"\[\d+\]")


def collapse_indexes(fields: Mapping[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """``$.orders[3].total`` → ``$.orders[*].total``: a field is counted once
    per request however many array items differ in it (the first example kept)."""
    out: dict[str, tuple[str, str]] = {}
    for name, pair in fields.items():
        key = _INDEX.sub("[*]", name) if "[" in name else name
        if key not in out:
            out[key] = pair
    return out


def route_report(
    counts: Mapping[str, int],
    samples: Mapping[str, tuple[str, str]],
    *,
    relative: float,
    absolute: float,
) -> list[dict[str, Any]]:
    """Per endpoint: compared, matched, mismatched, errors, and the fields
    whose diff rate beats their noise (`diff.significant`)."""
    by_endpoint: dict[str, dict[str, Any]] = {}
    for key, value in counts.items():
        ep, _, rest = key.partition(SEP)
        kind, _, field = rest.partition(SEP)
        e = by_endpoint.setdefault(ep, {"c": 0, "e": 0, "r": 0, "nc": 0, "d": {}, "n": {}, "s": {}})
        if kind in ("c", "e", "r", "nc"):
            e[kind] += int(value)
        elif kind in ("d", "n", "s"):
            e[kind][field] = e[kind].get(field, 0) + int(value)
    out = []
    for ep, e in sorted(by_endpoint.items()):
        fields = []
        noisy = []
        reported: set[str] = set()
        for field, diffs in sorted(e["d"].items(), key=lambda kv: (-kv[1], kv[0])):
            noise = e["n"].get(field, 0)
            entry: dict[str, Any] = {
                "field": field,
                "diffs": diffs,
                "noise": noise,
                "diff_rate": round(diffs / e["c"], 6) if e["c"] else 0.0,
                "noise_rate": round(noise / e["nc"], 6) if e["nc"] else 0.0,
            }
            if diff.significant(
                diffs=diffs,
                compared=e["c"],
                noise=noise,
                noise_compared=e["nc"],
                relative=relative,
                absolute=absolute,
            ):
                example = samples.get(f"{ep}{SEP}{field}")
                if example is not None:
                    entry["example"] = {"primary": example[0], "candidate": example[1]}
                fields.append(entry)
                reported.add(field)
            else:
                noisy.append(entry)
        mismatched = sum(
            n
            for sig, n in e["s"].items()
            if sig == OVERFLOW_SIGNATURE or any(f in reported for f in sig.split(FIELD_SEP))
        )
        out.append(
            {
                "endpoint": ep,
                "compared": e["c"],
                "matched": e["c"] - mismatched,
                "mismatched": mismatched,
                "errors": e["e"],
                "differing_raw": e["r"],
                "noise_samples": e["nc"],
                # Without a noise sample nothing could be filtered as noise yet.
                "noise_measured": e["nc"] > 0,
                "fields": fields,
                "noise_fields": noisy,
            }
        )
    return out


# --------------------------------------------------------------------------- the worker


class Shadower:
    """Sends copies off the request path, bounded, and keeps the stats."""

    def __init__(
        self,
        shared: SharedState | None = None,
        prefix: str = "strangler:",
        resolve: Resolver | None = None,
    ) -> None:
        self.shared = shared
        self.prefix = prefix
        self.resolve: Resolver = resolve or (lambda route: None)
        #: Sends jobs to the shadow worker process instead of running them here.
        self.offload: Callable[[Job], None] | None = None
        self.stats = ShadowStats()
        self.concurrency = 32
        self.queue_size = 1000
        self.active = 0
        self.pending: deque[Job] = deque()
        self._flusher: asyncio.Task[None] | None = None

    def configure(self, concurrency: int, queue_size: int) -> None:
        self.concurrency = concurrency
        self.queue_size = queue_size

    def start(self) -> None:
        if self.shared is not None and self._flusher is None:
            self._flusher = tasks.spawn(self._flush_forever(), name="shadow-stats-flush")

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
            if self.shared is not None:
                await self.flush(self.shared)

    # -- intake (on the request path: cheap, never blocks)

    def submit(self, job: Job) -> None:
        if self.offload is not None:
            self.offload(job)
            return
        if self.active < self.concurrency:
            self.active += 1
            tasks.spawn(self._work(job), name="shadow-copy")
        elif len(self.pending) < self.queue_size:
            self.pending.append(job)
            metrics.SHADOW_QUEUE.set(len(self.pending))
        else:
            count("requests", job.route, "dropped")

    @staticmethod
    def skip(route: str, reason: str) -> None:
        count("skipped", route, reason)

    async def _work(self, job: Job | None) -> None:
        try:
            while job is not None:
                try:
                    await self._run(job)
                except Exception:  # a bug here must not stop the worker
                    logger.exception("shadow copy failed unexpectedly")
                job = self.pending.popleft() if self.pending else None
                metrics.SHADOW_QUEUE.set(len(self.pending))
        finally:
            self.active -= 1

    # -- one copy

    async def _run(self, job: Job) -> None:
        route = job.route
        resolved = self.resolve(route)
        if resolved is None:  # the route stopped shadowing (a reload)
            count("skipped", route, "reloaded")
            return
        policy, pools = resolved
        endpoint = policy.endpoint(job.method, job.path)
        try:
            candidate = await self._fetch(job, policy, pools, policy.backend)
        except (UpstreamError, TimeoutError, OSError, KeyError) as exc:
            logger.debug("shadow copy to %s failed: %s", policy.backend, exc)
            count("requests", route, "error")
            self.stats.record(route, endpoint, None, None)
            return
        diffs = await _compare(job.primary, candidate, policy.options)
        noise: dict[str, tuple[str, str]] | None = None
        if (
            job.method in SAFE_METHODS
            and policy.noise_fraction > 0
            and _random.random() < policy.noise_fraction
        ):
            try:
                again = await self._fetch(job, policy, pools, job.primary_backend)
            except (UpstreamError, TimeoutError, OSError, KeyError):
                count("capped", route, "noise_failed")
            else:
                noise = await _compare(job.primary, again, policy.options)
        self.stats.record(route, endpoint, diffs, noise)
        count("requests", route, "mismatch" if diffs else "match")

    async def _fetch(
        self, job: Job, policy: ShadowPolicy, pools: Mapping[str, Pool], backend: str
    ) -> diff.Captured:
        """Send once (the shadow timeout bounds the wait for the head, the
        backend's read timeout each body chunk) and capture, bounded."""
        pool = pools[backend]
        headers = job.headers
        if not job.preserve_host:  # Host is always first (`build_request_headers`)
            headers = [(b"host", pool.host_header), *headers[1:]]
        if backend == policy.backend:
            headers = [*headers, _SHADOW_MARK]
        resp = await pool.send(job.method, job.target, headers, job.body, policy.timeout)
        tee = Tee(policy.max_response_bytes)
        try:
            if job.method != "HEAD":
                while not resp.at_eof():
                    chunk = await resp.read_chunk()
                    if not chunk:
                        break
                    tee.add(chunk)
                    if tee.truncated:
                        break
        finally:
            resp.release()
        return diff.Captured(
            resp.status, tuple(clean_response_headers(resp.headers)), tee.body(), tee.truncated
        )

    # -- sharing through Redis

    def _counts_key(self, route: str) -> str:
        return f"{self.prefix}shadow:{route}"

    def _samples_key(self, route: str) -> str:
        return f"{self.prefix}shadow:{route}:samples"

    async def _flush_forever(self) -> None:
        shared = self.shared
        assert shared is not None
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            await self.flush(shared)

    async def flush(self, shared: SharedState) -> None:
        delta, samples = self.stats.take_delta()
        if not delta and not samples:
            return

        async def write() -> bool:
            async with shared.redis.pipeline(transaction=False) as pipe:
                for route, counts in delta.items():
                    for key, n in counts.items():
                        pipe.hincrby(self._counts_key(route), key, n)
                for route, items in samples.items():
                    for key, pair in items.items():
                        pipe.hsetnx(self._samples_key(route), key, json.dumps(pair))
                await pipe.execute()
            return True

        if not await shared.run("shadow stats", write):
            self.stats.give_back(delta, samples)

    async def totals(
        self, route: str
    ) -> tuple[Mapping[str, int], Mapping[str, tuple[str, str]], str]:
        """The counts and samples of a route: the fleet's (Redis), else this process's."""
        shared = self.shared
        if shared is not None:
            await self.flush(shared)

            async def read() -> tuple[Any, Any]:
                async with shared.redis.pipeline(transaction=False) as pipe:
                    pipe.hgetall(self._counts_key(route))
                    pipe.hgetall(self._samples_key(route))
                    counts, raw_samples = await pipe.execute()
                return counts, raw_samples

            got = await shared.run("shadow report", read)
            if got is not None:
                counts = {k.decode(): int(v) for k, v in got[0].items()}
                parsed: dict[str, tuple[str, str]] = {}
                for k, v in got[1].items():
                    try:
                        a, b = json.loads(v)
                    except (ValueError, TypeError):
                        continue
                    parsed[k.decode()] = (str(a), str(b))
                return counts, parsed, "redis (all replicas)"
        return (
            dict(self.stats.totals.get(route, {})),
            dict(self.stats.samples.get(route, {})),
            "this process",
        )

    async def reset(self, routes: list[str]) -> None:
        for route in routes:
            self.stats.reset(route)
        shared = self.shared
        if shared is not None and routes:
            keys = [k for r in routes for k in (self._counts_key(r), self._samples_key(r))]
            await shared.run("shadow reset", lambda: shared.redis.delete(*keys))


async def _compare(
    primary: diff.Captured, candidate: diff.Captured, options: diff.DiffOptions
) -> dict[str, tuple[str, str]]:
    if len(primary.body) + len(candidate.body) > THREAD_COMPARE_BYTES:
        return await asyncio.to_thread(diff.compare, primary, candidate, options)
    return diff.compare(primary, candidate, options)
