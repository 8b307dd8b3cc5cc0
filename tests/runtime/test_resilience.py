"""serve_kit.runtime.resilience: circuit breaker (injected clock), response cache, idempotency
table, and Resilient over a real DynamicBatcher with real (probe and ONNX Runtime) backends."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from rt_models import ProbeBackend, arun, probe, probe_config

from serve_kit.config import ModelConfig
from serve_kit.runtime.batcher import DynamicBatcher
from serve_kit.runtime.resilience import (CLOSED, HALF_OPEN, OPEN, BreakerOpen, CachedOutputs, CircuitBreaker,
                                          IdempotencyConflict, IdempotencyTable, ResponseCache, Resilient,
                                          check_key, request_digest)
from serve_kit.runtime.types import BadRequest, Internal


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def breaker(clock, **kw) -> CircuitBreaker:
    opts = dict(window_seconds=10, min_requests=4, max_error_rate=0.5, open_seconds=5, half_open_probes=2)
    opts.update(kw)
    return CircuitBreaker(clock=clock, **opts)


# ---------------------------------------------------------------------------------------------
# Circuit breaker


def test_breaker_opens_cools_down_probes_and_closes():
    c = Clock()
    b = breaker(c)
    for ok in (True, False, True):
        b.record(b.acquire(), ok)
    assert b.state == CLOSED  # 3 < min_requests
    b.record(b.acquire(), False)  # 2 of 4 failed = 0.5
    assert b.state == OPEN
    assert b.acquire() is None and b.rejected == 1
    assert b.retry_after() == pytest.approx(5)
    c.t += 4.9
    assert b.state == OPEN and b.retry_after() == pytest.approx(0.1)
    c.t += 0.1
    assert b.state == HALF_OPEN
    p1, p2 = b.acquire(), b.acquire()
    assert p1 is not None and p2 is not None and b.acquire() is None  # only 2 probes
    b.record(p1, True)
    assert b.state == HALF_OPEN
    b.record(p2, True)
    assert b.state == CLOSED
    assert b.transitions == {CLOSED: 1, OPEN: 1, HALF_OPEN: 1}
    assert b.window() == (0, 0)  # a fresh window after closing


def test_a_failed_probe_reopens_and_a_neutral_one_frees_its_slot():
    c = Clock()
    b = breaker(c, min_requests=1, half_open_probes=1)
    b.record(b.acquire(), False)
    c.t += 5
    p = b.acquire()
    assert b.state == HALF_OPEN and b.acquire() is None
    b.record(p, None)  # a client error says nothing: the slot is free again
    p = b.acquire()
    assert p is not None
    b.record(p, False)
    assert b.state == OPEN and b.transitions[OPEN] == 2


def test_old_outcomes_do_not_count_after_a_transition():
    c = Clock()
    b = breaker(c, min_requests=2, half_open_probes=1)
    slow = b.acquire()  # admitted while closed, answers much later
    b.record(b.acquire(), False)
    b.record(b.acquire(), False)
    assert b.state == OPEN
    c.t += 5
    probe_ticket = b.acquire()
    b.record(slow, False)  # the closed-era request fails now: not a probe, ignored
    assert b.state == HALF_OPEN
    b.record(probe_ticket, True)
    assert b.state == CLOSED


def test_outcomes_leave_the_window_and_slow_calls_fail():
    c = Clock()
    b = breaker(c, min_requests=4, max_error_rate=0.75)
    for _ in range(3):
        b.record(b.acquire(), False)
    c.t += 11  # they are out of the window now
    b.record(b.acquire(), False)
    assert b.window() == (1, 1) and b.state == CLOSED
    s = breaker(c, min_requests=2, max_latency_ms=100)
    s.record(s.acquire(), True, 0.05)
    assert s.state == CLOSED
    s.record(s.acquire(), True, 0.2)  # a success slower than 100 ms is a failure
    assert s.state == OPEN
    assert s.snapshot() == {"state": OPEN, "error_rate": 0.5, "window_requests": 2}


def test_client_errors_never_open_it():
    c = Clock()
    b = breaker(c, min_requests=1)
    for _ in range(100):
        b.record(b.acquire(), None)
    assert b.state == CLOSED and b.window() == (0, 0)


EDGES = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (HALF_OPEN, CLOSED)}


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["acquire", "ok", "fail", "neutral", "slow", "wait"]),
                              st.floats(0, 4), st.integers(0, 7)), max_size=120),
       min_requests=st.integers(1, 6), rate=st.sampled_from([0.2, 0.5, 1.0]), probes=st.integers(1, 3))
def test_breaker_state_machine_obeys_the_rules(ops, min_requests, rate, probes):
    c = Clock()
    b = breaker(c, min_requests=min_requests, max_error_rate=rate, half_open_probes=probes, max_latency_ms=500)
    moves = []
    b.on_transition = lambda a, z: moves.append((a, z))
    tickets: list[int] = []
    since_close = 0  # outcomes recorded while closed since the last close
    opened_at = None
    for op, dt, pick in ops:
        before = b.state
        if op == "wait":
            c.t += dt
            continue
        if op == "acquire":
            cooled = opened_at is not None and c.t >= opened_at + 5
            t = b.acquire()
            if before == CLOSED:
                assert t is not None
            elif before == OPEN and not cooled:
                assert t is None
            if t is not None:
                tickets.append(t)
            continue
        if not tickets:
            continue
        t = tickets.pop(pick % len(tickets))
        ok = {"ok": True, "fail": False, "neutral": None, "slow": True}[op]
        n_moves = len(moves)
        b.record(t, ok, 1.0 if op == "slow" else 0.01)
        failed = op in ("fail", "slow")
        if before == CLOSED and ok is not None:
            since_close += 1  # an upper bound of what the breaker counted (it ignores stale tickets)
        for a, z in moves[n_moves:]:
            if z == OPEN:
                opened_at = c.t
                if a == CLOSED:
                    n, f = b.window()
                    assert since_close >= min_requests and n >= min_requests and f >= rate * n
                else:
                    assert failed  # only a failed probe reopens it
            if z == CLOSED:
                since_close = 0
                assert a == HALF_OPEN and ok is True
        if b.state == OPEN:
            assert b.acquire() is None or c.t >= opened_at + 5
    assert all(m in EDGES for m in moves)
    assert all(a == z_prev for (_, z_prev), (a, _) in zip(moves, moves[1:]))
    assert sum(b.transitions.values()) == len(moves)


def test_bad_breaker_settings_are_config_errors():
    base = {"name": "m", "backend": "onnxruntime", "max_batch_size": 4,
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]}
    ok = ModelConfig(**base, circuit_breaker={}, response_cache={"max_bytes": 1024})
    assert ok.circuit_breaker.min_requests == 20 and ok.circuit_breaker.max_error_rate == 0.5
    for bad in ({"circuit_breaker": {"window_seconds": -1}}, {"circuit_breaker": {"max_error_rate": 1.5}},
                {"circuit_breaker": {"half_open_probes": 0}}, {"circuit_breaker": {"typo": 1}},
                {"response_cache": {"max_bytes": 0}}):
        with pytest.raises(ValidationError):
            ModelConfig(**base, **bad)


# ---------------------------------------------------------------------------------------------
# Response cache


def test_cache_keys_cover_names_dtypes_shapes_bytes_and_version():
    c = ResponseCache(1 << 20, "m", 1)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    k = c.key({"x": x})
    assert c.key({"x": x.copy()}) == k
    assert c.key({"x": x[:, ::1].copy(order="F")}) == k  # memory layout does not matter
    others = [{"z": x}, {"x": x.astype(np.float64)}, {"x": x.reshape(4, 2)}, {"x": x + 1}]
    assert len({k, *(c.key(o) for o in others)}) == 5
    assert ResponseCache(1 << 20, "m", 2).key({"x": x}) != k
    s1 = np.array([[b"ab", b"c"]], dtype=object)
    s2 = np.array([[b"a", b"bc"]], dtype=object)
    assert c.key({"t": s1}) != c.key({"t": s2})


def test_cache_entries_are_read_only_copies_and_counted():
    c = ResponseCache(1 << 20)
    y = np.ones((2, 4), np.float32)
    k = c.key({"x": y})
    assert c.get(k) is None and c.misses == 1
    c.put(k, {"y": y})
    y[:] = 7  # the cache holds its own copy
    hit = c.get(k)
    assert isinstance(hit, CachedOutputs) and c.hits == 1
    assert np.all(hit["y"] == 1)
    with pytest.raises(ValueError):
        hit["y"][0, 0] = 3


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 15), st.integers(0, 600)), min_size=1, max_size=80),
       max_bytes=st.integers(1, 4000))
def test_cache_byte_bound_holds_and_evicts_least_recently_used(ops, max_bytes):
    from collections import OrderedDict

    c = ResponseCache(max_bytes)
    model: OrderedDict[int, int] = OrderedDict()  # the reference LRU: id -> size
    evicted = 0
    for is_put, i, n in ops:
        k = c.key({"i": np.array([i])})
        if is_put:
            size = len(k) + 1 + n
            assert c.put(k, {"y": np.zeros(n, np.uint8)}) == (size <= max_bytes)
            if size <= max_bytes:
                model.pop(i, None)
                model[i] = size
                while sum(model.values()) > max_bytes:
                    model.popitem(last=False)
                    evicted += 1
        else:
            hit = c.get(k)
            assert (hit is not None) == (i in model)
            if hit is not None:
                assert hit["y"].nbytes == model[i] - len(k) - 1
                model.move_to_end(i)
        assert 0 <= c.bytes == sum(model.values()) <= max_bytes
        assert len(c) == len(model) and c.evictions == evicted


# ---------------------------------------------------------------------------------------------
# Idempotency table


def test_idempotency_shares_a_running_attempt_and_replays_a_finished_one():
    async def main():
        loop = asyncio.get_running_loop()
        clock = Clock()
        t = IdempotencyTable(ttl_s=300, clock=clock)
        runs = []

        def start():
            f = loop.create_future()
            runs.append(f)
            return f

        d = request_digest({"x": np.ones((1, 4), np.float32)}, None, None)
        a, ra = t.claim("e", "k1", d, start)
        b, rb = t.claim("e", "k1", d, start)
        assert len(runs) == 1 and not ra and not rb
        b.cancel()  # one client going away does not cancel the work the other waits on
        runs[0].set_result({"y": np.zeros(2)})
        assert (await a)["y"].shape == (2,)
        c, rc = t.claim("e", "k1", d, start)
        assert rc and c.done() and len(runs) == 1 and t.replays == {"e": 1}
        with pytest.raises(IdempotencyConflict) as e:
            t.claim("e", "k1", request_digest({"x": np.zeros((1, 4), np.float32)}, None, None), start)
        assert e.value.status == 422 and "reused for a different request" in e.value.message
        t.claim("other", "k1", b"other digest", start)  # keys are per endpoint
        assert len(runs) == 2
        clock.t += 301
        _, again = t.claim("e", "k1", d, start)  # expired: runs anew
        assert not again and len(runs) == 3

    arun(main())


def test_a_failed_attempt_is_forgotten_and_bounds_hold():
    async def main():
        loop = asyncio.get_running_loop()
        t = IdempotencyTable(max_entries=3, max_bytes=10_000)

        def failing():
            f = loop.create_future()
            f.set_exception(Internal("boom"))
            return f

        f, _ = t.claim("e", "k", b"d", failing)
        with pytest.raises(Internal):
            await f
        await asyncio.sleep(0)
        assert len(t) == 0
        for i in range(10):
            def ok(i=i):
                f = loop.create_future()
                f.set_result({"y": np.zeros(i * 300, np.uint8)})
                return f
            await t.claim("e", f"k{i}", b"d", ok)[0]
            await asyncio.sleep(0)
            assert len(t) <= 3 and t.bytes <= 10_000
        assert ("e", "k9") in t._entries  # the newest is kept, the oldest went

        def refused():
            raise BadRequest("refused before it ran")

        with pytest.raises(BadRequest):
            t.claim("e", "refused", b"d", refused)
        assert ("e", "refused") not in t._entries  # nothing remembered: the retry runs

    arun(main())


@settings(max_examples=100, deadline=None)
@given(key=st.text(max_size=140))
def test_idempotency_key_must_be_printable_ascii(key):
    good = 1 <= len(key) <= 128 and all(32 <= ord(ch) <= 126 for ch in key)
    if good:
        assert check_key(key) == key
    else:
        with pytest.raises(BadRequest):
            check_key(key)


def test_request_digest_depends_on_version_and_outputs():
    x = {"x": np.ones((1, 4), np.float32)}
    d = request_digest(x, None, None)
    assert request_digest(x, 2, None) != d
    assert request_digest(x, None, ["y"]) != d
    assert request_digest(x, None, ["a", "b"]) == request_digest(x, None, ["b", "a"])


# ---------------------------------------------------------------------------------------------
# Resilient over a real DynamicBatcher


def row(v: float) -> np.ndarray:
    return np.full((1, 4), v, np.float32)


def test_resilient_opens_on_backend_failures_and_recovers(tmp_path):
    ProbeBackend.reset()
    flag = tmp_path / "failing"
    cfg = probe_config("p", max_batch_size=4)
    clock = Clock()

    async def main():
        inner = DynamicBatcher(cfg, [probe(tmp_path, fail_file=str(flag))], model="p", version=1)
        b = CircuitBreaker(10, 4, 0.5, None, 5, 2, clock=clock)
        s = Resilient(inner, breaker=b)
        assert (await s.submit({"x": row(1)}))["y"][0, 0] == 2
        flag.write_text("1")
        for _ in range(3):
            with pytest.raises(Internal):
                await s.submit({"x": row(1)})
        assert b.state == OPEN
        calls = len(ProbeBackend.calls)
        with pytest.raises(BreakerOpen) as e:
            s.submit_nowait({"x": row(1)})
        assert e.value.status == 503 and e.value.retry_after == pytest.approx(5)
        assert len(ProbeBackend.calls) == calls  # refused without reaching the backend
        assert inner.stats().fail.get(503, [0])[0] == 1  # counted as a 503 answer
        # Client errors do not count, even half-open.
        flag.unlink()
        clock.t += 5
        with pytest.raises(BadRequest):
            s.submit_nowait({"x": np.ones((9, 4), np.float32)})  # batch too large for the model
        assert b.state == HALF_OPEN
        await asyncio.gather(s.submit({"x": row(2)}), s.submit({"x": row(3)}))
        assert b.state == CLOSED and s.open is False
        await s.drain(5)

    arun(main())


def test_resilient_cache_hits_skip_the_backend(tmp_path):
    ProbeBackend.reset()
    cfg = probe_config("p", max_batch_size=4)

    async def main():
        inner = DynamicBatcher(cfg, [probe(tmp_path)], model="p", version=1)
        s = Resilient(inner, cache=ResponseCache(1 << 20, "p", 1))
        first = await s.submit({"x": row(5)})
        assert not isinstance(first, CachedOutputs)
        await asyncio.sleep(0)
        calls = len(ProbeBackend.calls)
        fut = s.submit_nowait({"x": row(5)})
        assert fut.done() and isinstance(fut.result(), CachedOutputs)
        np.testing.assert_array_equal(fut.result()["y"], first["y"])
        assert len(ProbeBackend.calls) == calls and inner.stats().execution_count == 1
        await s.submit({"x": row(6)})  # other inputs run
        assert len(ProbeBackend.calls) == calls + 1
        assert s.cache.hits == 1 and s.cache.misses == 2
        await s.drain(5)

    arun(main())


def test_a_hung_backend_opens_it_on_timeouts_so_requests_stop_piling_up(tmp_path):
    from serve_kit.runtime.types import Timeout

    ProbeBackend.reset()
    cfg = probe_config("p", max_batch_size=1)

    async def main():
        inner = DynamicBatcher(cfg, [probe(tmp_path, hang_value=-2)], model="p", version=1)
        s = Resilient(inner, breaker=CircuitBreaker(10, 3, 0.5, None, 30, 1))
        stuck = s.submit_nowait({"x": row(-2)})  # holds the only instance
        waiting = [s.submit_nowait({"x": row(i)}, timeout_us=50_000) for i in range(3)]
        for f in waiting:
            with pytest.raises(Timeout):
                await f
        await asyncio.sleep(0)  # outcomes are recorded by done-callbacks: let the last ones run
        assert s.breaker.state == OPEN, s.breaker.snapshot()
        depth = inner.queue_depth
        for _ in range(20):
            with pytest.raises(BreakerOpen):
                s.submit_nowait({"x": row(1)})
        assert inner.queue_depth == depth == 0 and s.breaker.rejected == 20
        ProbeBackend.release.set()
        await stuck
        await s.drain(5)

    arun(main())
