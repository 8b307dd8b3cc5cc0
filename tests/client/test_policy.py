"""The client's pure decisions: backoff, breaker, balancing and ejection, the hedge delay."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_kit.client import BreakerPolicy, EjectionPolicy, HedgePolicy, RetryPolicy
from serve_kit.client.policy import Balancer, CircuitBreaker, LatencyWindow, Replica


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@settings(max_examples=200, deadline=None)
@given(retry=st.integers(1, 40), base=st.floats(0.001, 1), cap=st.floats(0.01, 10),
       after=st.none() | st.floats(0, 30), seed=st.integers(0, 2**32))
def test_backoff_is_full_jitter_under_the_cap_and_honours_retry_after(retry, base, cap, after, seed):
    p = RetryPolicy(base_s=base, max_backoff_s=cap)
    s = p.backoff(retry, random.Random(seed), after)
    bound = min(cap, base * 2 ** (retry - 1))
    if after is None:
        assert 0 <= s <= bound
    else:
        assert after <= s <= max(after, bound)


def test_backoff_spreads_over_the_whole_range():
    p = RetryPolicy(base_s=0.1, max_backoff_s=10)
    rng = random.Random(0)
    draws = [p.backoff(4, rng) for _ in range(2000)]
    assert min(draws) < 0.05 and max(draws) > 0.75 and max(draws) <= 0.8


def test_breaker_opens_on_consecutive_failures_then_half_open_probe_closes_it():
    clock = FakeClock()
    b = CircuitBreaker(BreakerPolicy(consecutive_failures=3, open_s=5, half_open_probes=2), clock)
    for _ in range(2):
        assert b.allow()
        b.record(False)
    b.record(True)  # a success resets the run
    for _ in range(3):
        assert b.allow()
        b.record(False)
    assert b.state == "open" and not b.allow() and b.retry_after() == pytest.approx(5)
    clock.t += 5
    assert b.allow() and b.allow() and not b.allow()  # two probes, no third
    assert b.state == "half_open"
    b.record(True)
    b.record(True)
    assert b.state == "closed" and b.allow()


def test_breaker_cancelled_probe_frees_its_slot():
    clock = FakeClock()
    b = CircuitBreaker(BreakerPolicy(consecutive_failures=1, open_s=1), clock)
    b.record(False)
    clock.t += 1
    assert b.allow() and not b.allow()
    b.release()
    assert b.state == "half_open" and b.allow()
    b.record(True)
    assert b.state == "closed"


def test_breaker_failed_probe_reopens():
    clock = FakeClock()
    b = CircuitBreaker(BreakerPolicy(consecutive_failures=1, open_s=2), clock)
    b.record(False)
    clock.t += 2
    assert b.allow()
    b.record(False)
    assert b.state == "open" and not b.allow()


@settings(max_examples=200, deadline=None)
@given(outcomes=st.lists(st.booleans(), max_size=200))
def test_breaker_error_rate_opens_only_with_enough_calls(outcomes):
    policy = BreakerPolicy(consecutive_failures=1000, window=20, min_calls=10, max_error_rate=0.5)
    b = CircuitBreaker(policy, FakeClock())
    window: list[bool] = []
    for ok in outcomes:
        b.record(ok)
        window = (window + [ok])[-20:]
        should = len(window) >= 10 and window.count(False) / len(window) >= 0.5
        assert (b.state == "open") == should
        if should:
            return


def test_balancer_prefers_fewer_outstanding_and_avoids_excluded():
    rs = [Replica(f"http://r{i}") for i in range(3)]
    rs[0].outstanding, rs[1].outstanding, rs[2].outstanding = 5, 0, 5
    bal = Balancer(rs, EjectionPolicy(), random.Random(1), FakeClock())
    picks = [bal.pick() for _ in range(300)]
    # power of two: r1 wins every draw it is in (2/3 of them); never picked when r0/r2 are the pair
    assert 0.55 < picks.count(rs[1]) / 300 < 0.8
    assert all(bal.pick(exclude=[rs[1]]) is not rs[1] for _ in range(50))
    assert bal.pick(exclude=rs) in rs  # everything excluded: still someone


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 8), pct=st.floats(0, 100), failures=st.lists(st.integers(0, 7), max_size=100))
def test_ejection_never_exceeds_max_percent_and_keeps_one(n, pct, failures):
    clock = FakeClock()
    rs = [Replica(f"http://r{i}") for i in range(n)]
    bal = Balancer(rs, EjectionPolicy(consecutive_failures=2, base_s=10, max_ejection_percent=pct), random.Random(0),
                   clock)
    for i in failures:
        bal.record(rs[i % n], False)
        ejected = sum(r.ejected(clock()) for r in rs)
        assert ejected <= max(0, min(int(n * pct / 100), n - 1))
        assert bal.pick() is not None


def test_ejection_doubles_and_expires():
    clock = FakeClock()
    rs = [Replica("http://a"), Replica("http://b")]
    bal = Balancer(rs, EjectionPolicy(consecutive_failures=2, base_s=1, max_s=3), random.Random(0), clock)
    bal.record(rs[0], False)
    assert not bal.record(rs[0], True) and not bal.record(rs[0], False)  # a success reset the run
    assert bal.record(rs[0], False)
    assert rs[0].ejected(clock()) and bal.available() == [rs[1]]
    assert all(bal.pick() is rs[1] for _ in range(20))
    clock.t += 1
    assert bal.available() == rs
    bal.record(rs[0], False)
    bal.record(rs[0], False)
    assert rs[0].ejected_until == pytest.approx(clock() + 2)  # base * 2^1
    clock.t += 2
    bal.record(rs[0], False)
    bal.record(rs[0], False)
    assert rs[0].ejected_until == pytest.approx(clock() + 3)  # capped at max_s


def test_hedge_delay_fixed_or_percentile():
    w = LatencyWindow()
    assert w.hedge_delay(HedgePolicy(delay_s=0.2)) == 0.2
    assert w.hedge_delay(HedgePolicy(min_samples=5)) is None
    for i in range(1, 101):
        w.add(i / 1000)
    assert w.hedge_delay(HedgePolicy(percentile=95)) == pytest.approx(0.095)
    assert w.percentile(50) == pytest.approx(0.050)


def test_retry_after_of_one_replica_sends_the_retry_to_another_without_waiting():
    clock = FakeClock()
    rs = [Replica("http://a"), Replica("http://b")]
    bal = Balancer(rs, EjectionPolicy(), random.Random(0), clock)
    rs[0].not_before = clock() + 2
    assert all(bal.pick() is rs[1] for _ in range(20)) and bal.pushback_s() == 0
    rs[1].not_before = clock() + 1
    assert bal.pushback_s() == pytest.approx(1)  # everyone said Retry-After: wait for the first
    assert bal.pick() in rs


def test_the_client_imports_the_codec_never_the_server():
    import subprocess
    import sys

    code = ("import sys, serve_kit.client; "
            "print(' '.join(m for m in sys.modules if m.startswith('serve_kit.runtime')))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                timeout=120).stdout.split())
    assert "serve_kit.runtime.protocol" in loaded
    assert not loaded & {"serve_kit.runtime.models", "serve_kit.runtime.http", "serve_kit.runtime.grpc_service",
                         "serve_kit.runtime.batcher", "serve_kit.runtime.server", "serve_kit.runtime.resilience"}
