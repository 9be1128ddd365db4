"""Circuit breakers, retries with backoff and a budget, deadlines.

One `Guard` per backend holds its breaker, its retry budget and its recent
failures; guards are keyed by backend name and survive reloads that do not
change their settings. `Guard.call` is one logical request to one backend:

    try:   breaker allows?  → send under min(per-try timeout, time to deadline)
    outcome: a response (5xx counts as a breaker failure) or an UpstreamError
    retry? retryable outcome, attempts left, method allowed (or never sent),
           body replayable, Retry-After / backoff fits the deadline, budget
    →      release the failed response, sleep, try again

The success path is one `pool.send` plus two attribute checks: retries are
only planned after a failure, so a healthy backend pays nothing for them.

What counts as a breaker failure: connect errors, timeouts, protocol errors
and 5xx answers. A 4xx is the backend working (a success); a cancellation
(the client went away, the drain cut the request) is neither.

pybreaker's async support is broken (``call`` on a coroutine function counts
a success and never sees the exception; half-open lets every waiting
coroutine through), so pybreaker is used as the state machine only: its
``call`` is driven synchronously with the outcome we already have, and a gate
here admits exactly one trial request while half-open.

Backoff is tenacity's ``wait_random_exponential`` (exponential with full
jitter); the stop decision is tenacity's ``stop_after_attempt |
stop_before_delay`` evaluated on a ``RetryCallState``. tenacity's own retry
loop is not used: it releases an outcome before knowing whether another try
will happen, and the last 5xx must reach the client (or the fallback) intact.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from typing import Any

import pybreaker
from tenacity import RetryCallState, stop_after_attempt, stop_before_delay, wait_random_exponential

from strangler import config, metrics
from strangler.exceptions import CircuitOpen, UpstreamError, UpstreamTimeout
from strangler.upstream import Pool, UpstreamResponse

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "Breaker", "Guard", "RetryPolicy"]

logger = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
_STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}

Outcome = UpstreamResponse | UpstreamError


# ----------------------------------------------------------------------- policy


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A compiled `config.Retry`: everything the request path reads, prebuilt."""

    attempts: int
    per_try_timeout: float | None
    deadline: float | None
    on_status: frozenset[int]
    methods: frozenset[str]
    buffer_bytes: int
    max_backoff: float
    wait: wait_random_exponential

    @classmethod
    def build(cls, retry: config.Retry) -> RetryPolicy:
        return cls(
            attempts=retry.attempts,
            per_try_timeout=retry.per_try_timeout,
            deadline=retry.deadline,
            on_status=frozenset(retry.on_status),
            methods=frozenset(retry.methods),
            buffer_bytes=retry.buffer_bytes,
            max_backoff=retry.max_backoff,
            wait=wait_random_exponential(multiplier=retry.backoff, max=retry.max_backoff),
        )

    @property
    def retries(self) -> bool:
        return self.attempts > 1


def _retry_after(resp: UpstreamResponse) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    for name, value in resp.headers:
        if name.lower() == b"retry-after":
            text = value.decode("latin-1").strip()
            if text.isdigit():
                return float(text)
            try:
                when = email.utils.parsedate_to_datetime(text)
            except (TypeError, ValueError):
                return None
            return max(0.0, when.timestamp() - time.time())
    return None


# ---------------------------------------------------------------------- breaker


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, breaker: Breaker) -> None:
        self.breaker = breaker

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self.breaker._changed(old_state.name if old_state else CLOSED, new_state.name)


class Breaker:
    """A circuit breaker for one backend, pybreaker underneath.

    ``state`` mirrors pybreaker's state (kept by a listener) so the request
    path reads a plain attribute. ``on_open`` is called when the breaker opens
    because of this process's own failures (not when told to by another
    replica), to share the news.
    """

    def __init__(
        self,
        backend: str,
        settings: config.Breaker,
        on_open: Callable[[Breaker], None] | None = None,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.state = CLOSED
        self.opened_at = 0.0  # monotonic
        self.open_until_wall = 0.0
        #: Opened here and not yet known to Redis (it was down): publish later.
        self.unpublished = False
        self._trial = False
        self._remote = False
        self._on_open = on_open
        self._cb = pybreaker.CircuitBreaker(
            fail_max=settings.fail_max,
            reset_timeout=settings.reset_timeout,
            name=backend,
            throw_new_error_on_trip=False,
            listeners=[_Listener(self)],
        )
        self._gauge = metrics.BREAKER_STATE.labels(backend)
        self._gauge.set(0)

    def __repr__(self) -> str:
        return f"Breaker({self.backend!r}, state={self.state!r}, failures={self.fail_counter})"

    @property
    def fail_counter(self) -> int:
        return int(self._cb.fail_counter)

    def retry_after(self) -> float:
        """Seconds until the breaker admits a trial request."""
        if self.state != OPEN:
            return 1.0
        left = self.settings.reset_timeout - (time.monotonic() - self.opened_at)
        return max(0.0, left)

    def allow(self) -> bool:
        """May a request be sent now? In half-open, only one trial at a time."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if time.monotonic() - self.opened_at < self.settings.reset_timeout:
                return False
            self._cb.half_open()  # notifies the listener: state becomes half-open
        if self._trial:
            return False
        self._trial = True
        return True

    def success(self) -> None:
        if self.state == CLOSED and self._cb.fail_counter == 0:
            return  # the common case: nothing to change
        self._trial = False
        if self.state == OPEN:
            return  # opened meanwhile (another replica): its timer decides
        self._cb.call(_succeed)

    def failure(self, exc: BaseException) -> None:
        self._trial = False
        if self.state == OPEN:
            return  # a request admitted before the breaker opened
        try:
            self._cb.call(_fail, exc)
        except BaseException:  # pybreaker re-raises the failure it recorded
            pass

    def abandon(self) -> None:
        """The admitted request ended without a verdict (cancelled)."""
        self._trial = False

    def force_open(self, open_until_wall: float) -> None:
        """Open because another replica did (shared through Redis)."""
        if self.state == OPEN:
            return
        remaining = open_until_wall - time.time()
        if remaining <= 0:
            return
        self._remote = True
        self._cb.open()
        # Align the half-open moment with the replica that opened it.
        self.opened_at = time.monotonic() - (self.settings.reset_timeout - remaining)

    def _changed(self, old: str, new: str) -> None:
        self.state = new
        self._gauge.set(_STATE_VALUE.get(new, 0))
        metrics.BREAKER_TRANSITIONS.labels(self.backend, new).inc()
        if new == OPEN:
            self.opened_at = time.monotonic()
            self.open_until_wall = time.time() + self.settings.reset_timeout
            remote, self._remote = self._remote, False
            logger.warning(
                "breaker %s: %s → open (%s); half-open in %.1fs",
                self.backend,
                old,
                "opened by another replica" if remote else f"{self.fail_counter} failures",
                self.settings.reset_timeout,
            )
            if not remote and self._on_open is not None:
                self.unpublished = True
                self._on_open(self)
        else:
            logger.warning("breaker %s: %s → %s", self.backend, old, new)
            self.unpublished = False
            if new == CLOSED:
                self._trial = False


def _succeed() -> None:
    return None


def _fail(exc: BaseException) -> None:
    raise exc


# ------------------------------------------------------------------------ budget


class RetryBudget:
    """Envoy's retry budget: retries in flight ≤ ``percent`` of active
    requests, but at least ``min_retries``."""

    __slots__ = ("percent", "min_retries", "active", "retrying")

    def __init__(self, settings: config.RetryBudget) -> None:
        self.percent = settings.percent
        self.min_retries = settings.min_retries
        self.active = 0
        self.retrying = 0

    def limit(self) -> int:
        return max(self.min_retries, int(self.active * self.percent / 100))

    def try_acquire(self) -> bool:
        if self.retrying >= self.limit():
            return False
        self.retrying += 1
        return True

    def release(self) -> None:
        self.retrying -= 1


class RecentFailures:
    """Failures per second over the last minute, for ``/api/backends``."""

    __slots__ = ("_buckets", "_second")

    def __init__(self) -> None:
        self._buckets = [0] * 60
        self._second = int(time.monotonic())

    def _roll(self) -> None:
        now = int(time.monotonic())
        gap = now - self._second
        if gap > 0:
            for i in range(1, min(gap, 60) + 1):
                self._buckets[(self._second + i) % 60] = 0
            self._second = now

    def add(self) -> None:
        self._roll()
        self._buckets[self._second % 60] += 1

    def last_minute(self) -> int:
        self._roll()
        return sum(self._buckets)


# ------------------------------------------------------------------------- guard


class Guard:
    """Resilience state of one backend and the logic of one guarded call."""

    def __init__(
        self,
        backend: str,
        breaker: config.Breaker,
        budget: config.RetryBudget,
        on_open: Callable[[Breaker], None] | None = None,
    ) -> None:
        self.backend = backend
        self.breaker_settings = breaker
        self.budget_settings = budget
        self.breaker = Breaker(backend, breaker, on_open) if breaker.enabled else None
        self.budget = RetryBudget(budget)
        self.recent = RecentFailures()
        self.fallbacks: dict[str, int] = {}
        self.retry_counts: dict[str, int] = {}
        self._retries = metrics.RETRIES

    def same_settings(self, breaker: config.Breaker, budget: config.RetryBudget) -> bool:
        return breaker == self.breaker_settings and budget == self.budget_settings

    def _count_retry(self, outcome: str) -> None:
        self.retry_counts[outcome] = self.retry_counts.get(outcome, 0) + 1
        self._retries.labels(self.backend, outcome).inc()

    def count_fallback(self, reason: str) -> None:
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1

    async def call(
        self,
        pool: Pool,
        policy: RetryPolicy,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterable[bytes] | bytes | None,
        *,
        replayable: bool,
    ) -> UpstreamResponse:
        """Send under breaker, per-try timeout, retries and deadline.

        Returns the response (possibly a 5xx once retries are exhausted: the
        caller decides about fallback) or raises the last `UpstreamError`
        (`CircuitOpen` when the breaker did not let the request out).
        """
        started = time.monotonic()
        deadline_at = started + policy.deadline if policy.deadline is not None else None
        budget = self.budget
        budget.active += 1
        try:
            outcome = await self._try(pool, policy, method, target, headers, body, deadline_at)
            if isinstance(outcome, UpstreamError):
                if not policy.retries or not self._retryable(outcome, policy, method):
                    raise outcome
            elif not policy.retries or outcome.status not in policy.on_status:
                return outcome
            elif method not in policy.methods:
                return outcome
            return await self._retry(
                started,
                outcome,
                pool,
                policy,
                method,
                target,
                headers,
                body,
                deadline_at,
                replayable,
            )
        finally:
            budget.active -= 1

    @staticmethod
    def _retryable(exc: UpstreamError, policy: RetryPolicy, method: str) -> bool:
        if isinstance(exc, CircuitOpen):
            return False
        return not exc.sent or method in policy.methods

    async def _retry(
        self,
        started: float,
        outcome: Outcome,
        pool: Pool,
        policy: RetryPolicy,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterable[bytes] | bytes | None,
        deadline_at: float | None,
        replayable: bool,
    ) -> UpstreamResponse:
        stop = stop_after_attempt(policy.attempts)
        if policy.deadline is not None:
            stop = stop | stop_before_delay(policy.deadline)  # type: ignore[assignment]
        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.start_time = started
        attempt = 1
        while True:
            # Another try? Each "no" is counted by its reason.
            if not replayable:
                self._count_retry("skipped_body")
                return _finish(outcome)
            state.attempt_number = attempt
            delay = policy.wait(state)
            if not isinstance(outcome, UpstreamError):
                after = _retry_after(outcome)
                if after is not None:
                    if deadline_at is None and after > policy.max_backoff:
                        self._count_retry("skipped_retry_after")
                        return outcome
                    delay = after
            state.outcome_timestamp = time.monotonic()
            state.upcoming_sleep = delay
            if stop(state):
                self._count_retry("exhausted" if attempt >= policy.attempts else "deadline")
                return _finish(outcome)
            if not self.budget.try_acquire():
                self._count_retry("budget_exhausted")
                return _finish(outcome)
            try:
                if not isinstance(outcome, UpstreamError):
                    outcome.release()
                if delay > 0:
                    await asyncio.sleep(delay)
                attempt += 1
                outcome = await self._try(pool, policy, method, target, headers, body, deadline_at)
            finally:
                self.budget.release()
            # Counted once it is known whether the retry left: an open breaker
            # (opened by the failures just before it) keeps it in.
            self._count_retry("breaker_open" if isinstance(outcome, CircuitOpen) else "retried")
            if isinstance(outcome, UpstreamError):
                if not self._retryable(outcome, policy, method):
                    raise outcome
            elif outcome.status not in policy.on_status:
                return outcome

    async def _try(
        self,
        pool: Pool,
        policy: RetryPolicy,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterable[bytes] | bytes | None,
        deadline_at: float | None,
    ) -> Outcome:
        """One try: breaker gate, send under the per-try timeout, record the verdict."""
        breaker = self.breaker
        if breaker is not None and not breaker.allow():
            return CircuitOpen(
                f"circuit breaker of {self.backend} is {breaker.state}",
                backend=self.backend,
                retry_after=breaker.retry_after(),
            )
        timeout = policy.per_try_timeout
        if deadline_at is not None:
            remaining = deadline_at - time.monotonic()
            timeout = remaining if timeout is None else min(timeout, remaining)
            if timeout <= 0:
                if breaker is not None:
                    breaker.abandon()
                return UpstreamTimeout(
                    f"deadline of {policy.deadline}s reached before trying {self.backend}",
                    backend=self.backend,
                )
        try:
            resp = await pool.send(method, target, headers, body, timeout)
        except UpstreamError as err:
            self._failed(err)
            return err
        except BaseException:
            if breaker is not None:
                breaker.abandon()
            raise
        if resp.status >= 500:
            self._failed(None)
        elif breaker is not None:
            breaker.success()
        return resp

    def _failed(self, exc: BaseException | None) -> None:
        self.recent.add()
        if self.breaker is not None:
            self.breaker.failure(exc or _Status5xx())

    def describe(self) -> dict[str, Any]:
        b = self.breaker
        return {
            "breaker": None
            if b is None
            else {
                "state": b.state,
                "consecutive_failures": b.fail_counter,
                "fail_max": b.settings.fail_max,
                "reset_timeout": b.settings.reset_timeout,
                "retry_after": round(b.retry_after(), 3) if b.state == OPEN else None,
            },
            "failures_last_minute": self.recent.last_minute(),
            "retry_budget": {
                "active_requests": self.budget.active,
                "retries_in_flight": self.budget.retrying,
                "limit": self.budget.limit(),
                "percent": self.budget.percent,
                "min_retries": self.budget.min_retries,
            },
            "retries": dict(self.retry_counts),
            "fallbacks_from": dict(self.fallbacks),
        }


class _Status5xx(Exception):
    """What a 5xx answer is recorded as in the breaker."""


def _finish(outcome: Outcome) -> UpstreamResponse:
    if isinstance(outcome, UpstreamError):
        raise outcome
    return outcome
