"""The client's decisions, with no I/O: retry backoff, the per-endpoint circuit breaker, replica
balancing with outlier ejection, and the latency window behind hedging. Pure and clock-injected,
so they are unit-tested without sleeping; the sync and async clients share them.

Written here rather than taken from a library: urllib3's Retry and gRPC's retry service config
each cover one transport and neither knows Idempotency-Key, replica ejection or hedging across
replicas; pybreaker and tenacity are not in the environment and would cover one piece each."""

from __future__ import annotations

import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field

Clock = Callable[[], float]


class _Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class RetryPolicy(_Policy):
    """Retries of one call on 503 / 429 / UNAVAILABLE / RESOURCE_EXHAUSTED / connection errors."""

    max_attempts: int | None = Field(None, ge=1)
    """Attempts in all (the first included); None: as many as the deadline allows."""
    base_s: float = Field(0.05, gt=0)
    """Backoff cap of the first retry; doubles per retry (exponential backoff)."""
    max_backoff_s: float = Field(2.0, gt=0)
    """Largest backoff cap. The sleep is uniform in [0, cap] (full jitter)."""

    def backoff(self, retry: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Seconds to sleep before retry number `retry` (1 = the first retry): full jitter, but never
        less than `retry_after` (the server's Retry-After / grpc-retry-pushback-ms advice, when
        every replica gave one)."""
        cap = min(self.max_backoff_s, self.base_s * 2 ** (retry - 1))
        sleep = rng.uniform(0, cap)
        return max(sleep, retry_after) if retry_after is not None else sleep


class BreakerPolicy(_Policy):
    """The client-side circuit breaker of one endpoint (model), fed by the outcome of every call
    (after its retries): a call that failed for a server-side reason is a failure; 4xx are not."""

    consecutive_failures: int = Field(5, ge=1)
    """This many failed calls in a row open it."""
    window: int = Field(50, ge=1)
    """Calls in the rolling window of the error rate."""
    min_calls: int = Field(20, ge=1)
    """Fewer calls in the window: the error rate never opens it."""
    max_error_rate: float = Field(0.5, gt=0, le=1)
    """Share of failed calls in the window that opens it."""
    open_s: float = Field(5.0, gt=0)
    """Cool-down before half-open."""
    half_open_probes: int = Field(1, ge=1)
    """Calls let through half-open: all succeed -> closed, one fails -> open again."""


class EjectionPolicy(_Policy):
    """Outlier detection of replicas, as Envoy's: consecutive failures (5xx, connection errors,
    per-try timeouts) eject a replica for base_s * 2^n seconds (n = its earlier ejections)."""

    consecutive_failures: int = Field(3, ge=1)
    """Failures in a row that eject a replica."""
    base_s: float = Field(5.0, gt=0)
    """First ejection's length; doubles with each later ejection of the same replica."""
    max_s: float = Field(300.0, gt=0)
    """Longest ejection."""
    max_ejection_percent: float = Field(50.0, ge=0, le=100)
    """Never eject more than this share of the replicas (at least one always stays in)."""


class HedgePolicy(_Policy):
    """Hedged requests: when the first attempt has not answered after `delay_s` (or the observed
    latency percentile), send a copy to another replica; the first answer wins, the other is
    cancelled. Both copies carry the same Idempotency-Key."""

    delay_s: float | None = Field(None, gt=0)
    """Fixed hedge delay; None: the `percentile` of the recent successful latencies."""
    percentile: float = Field(95.0, gt=0, lt=100)
    """Latency percentile used as the delay when `delay_s` is None."""
    min_samples: int = Field(20, ge=1)
    """With fewer latencies observed (and no `delay_s`), no hedge is sent."""
    max_hedges: int = Field(1, ge=1)
    """Extra copies per attempt."""


class CircuitBreaker:
    """closed -> open (consecutive failures or error rate) -> half_open after open_s -> closed when
    every probe succeeded, open again when one failed."""

    def __init__(self, policy: BreakerPolicy, clock: Clock = time.monotonic):
        self.policy, self.clock = policy, clock
        self.state = "closed"
        self.outcomes: deque[bool] = deque(maxlen=policy.window)
        self.consecutive = 0
        self.opened_at = 0.0
        self.probes_out = 0
        self.probes_ok = 0

    def retry_after(self) -> float:
        return max(0.0, self.opened_at + self.policy.open_s - self.clock())

    def allow(self) -> bool:
        """Whether a call may go out now (a half-open probe slot is taken by it)."""
        if self.state == "open":
            if self.retry_after() > 0:
                return False
            self.state, self.probes_out, self.probes_ok = "half_open", 0, 0
        if self.state == "half_open":
            if self.probes_out >= self.policy.half_open_probes:
                return False
            self.probes_out += 1
        return True

    def release(self) -> None:
        """A call let through ended without a verdict (cancelled by its caller): a half-open probe
        slot it held is free again."""
        if self.state == "half_open" and self.probes_out > self.probes_ok:
            self.probes_out -= 1

    def _open(self) -> None:
        self.state, self.opened_at = "open", self.clock()
        self.consecutive = 0
        self.outcomes.clear()

    def record(self, ok: bool) -> None:
        if self.state == "half_open":
            if not ok:
                self._open()
                return
            self.probes_ok += 1
            if self.probes_ok >= self.policy.half_open_probes:
                self.state, self.consecutive = "closed", 0
                self.outcomes.clear()
            return
        if self.state == "open":
            return
        self.outcomes.append(ok)
        self.consecutive = 0 if ok else self.consecutive + 1
        failures = self.outcomes.count(False)
        if (self.consecutive >= self.policy.consecutive_failures
                or (len(self.outcomes) >= self.policy.min_calls
                    and failures / len(self.outcomes) >= self.policy.max_error_rate)):
            self._open()


@dataclass(eq=False)
class Replica:
    url: str
    outstanding: int = 0
    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    not_before: float = 0.0
    """Its last Retry-After / pushback: not sent to before this time while another replica can be."""
    transport: object = field(default=None, repr=False)
    served: set = field(default_factory=set, repr=False)
    """Models this replica has answered: a 404 for one of them later is a restart or reload."""

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until


class Balancer:
    """Least outstanding requests by power of two random choices over the replicas not ejected."""

    def __init__(self, replicas: Sequence[Replica], policy: EjectionPolicy, rng: random.Random,
                 clock: Clock = time.monotonic):
        self.replicas, self.policy, self.rng, self.clock = list(replicas), policy, rng, clock

    def available(self, exclude: Sequence[Replica] = ()) -> list[Replica]:
        now = self.clock()
        return [r for r in self.replicas if not r.ejected(now) and r not in exclude]

    def pick(self, exclude: Sequence[Replica] = ()) -> Replica | None:
        """A replica for the next try: not ejected, preferably not in `exclude` (the replicas this
        call already tried or is hedging on); None when every replica is ejected."""
        now = self.clock()
        candidates = self.available(exclude), self.available()
        pool = ([r for r in candidates[0] if r.not_before <= now] or [r for r in candidates[1] if r.not_before <= now]
                or candidates[0] or candidates[1])
        if not pool:
            return None
        if len(pool) == 1:
            return pool[0]
        a, b = self.rng.sample(pool, 2)
        return a if a.outstanding <= b.outstanding else b

    def pushback_s(self) -> float:
        """Seconds until some replica not ejected may be sent to, as far as Retry-After says."""
        pool = self.available()
        return max(0.0, min(r.not_before for r in pool) - self.clock()) if pool else 0.0

    def record(self, replica: Replica, ok: bool) -> bool:
        """Count one try's outcome on `replica`; True when this failure ejected it."""
        if ok:
            replica.consecutive_failures = 0
            return False
        replica.consecutive_failures += 1
        if replica.consecutive_failures < self.policy.consecutive_failures:
            return False
        now = self.clock()
        ejected = sum(r.ejected(now) for r in self.replicas)
        limit = math.floor(len(self.replicas) * self.policy.max_ejection_percent / 100)
        if ejected + 1 > min(limit, len(self.replicas) - 1):
            return False
        replica.ejected_until = now + min(self.policy.max_s, self.policy.base_s * 2 ** replica.ejections)
        replica.ejections += 1
        replica.consecutive_failures = 0
        return True


class LatencyWindow:
    """The last `size` successful latencies, for the hedge delay's percentile."""

    def __init__(self, size: int = 256):
        self.samples: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)

    def percentile(self, p: float) -> float | None:
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]

    def hedge_delay(self, policy: HedgePolicy) -> float | None:
        if policy.delay_s is not None:
            return policy.delay_s
        if len(self.samples) < policy.min_samples:
            return None
        return self.percentile(policy.percentile)
