"""The resilient client against real `serve-kit serve` processes on 127.0.0.1 (ONNX Runtime's
identity model and the test-probe backend that sleeps): restarts, hangs, slow replicas, 4xx,
the breaker, HTTP and gRPC, sync and async."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import numpy as np
import pytest

from client_kit import ident_repo, probe_repo
from serve_kit.client import (AsyncClient, BreakerPolicy, CircuitOpen, Client, ConnectionFailed, DeadlineExceeded,
                              EjectionPolicy, HedgePolicy, RetryPolicy, ServerError)

X = np.arange(8, dtype=np.float32).reshape(2, 4)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_ready_metadata_and_infer_both_protocols(tmp_path, served, protocol):
    s = served(ident_repo(tmp_path / "repo"))
    with Client(s.url(protocol)) as c:
        assert c.ready()
        meta = c.metadata("ident")
        assert meta["name"] == "ident" and meta["inputs"][0]["name"] == "x" and meta["inputs"][0]["shape"] == [-1, 4]
        r = c.infer("ident", {"x": X})
        np.testing.assert_array_equal(r["y"], X)
        assert r.model == "ident" and r.version == 1 and r.attempts == 1 and r.replica == s.url(protocol)
        assert len(r.request_id) == 32
        r2 = c.infer("ident", {"x": X}, version=1, outputs=["y"], headers={"idempotency-key": "my-key-1"})
        assert r2.request_id == "my-key-1" and r2.version == 1


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_errors_are_not_retried(tmp_path, served, protocol):
    s = served(ident_repo(tmp_path / "repo"))
    before = s.requests_total("400")
    with Client(s.url(protocol), retry=RetryPolicy(max_attempts=5)) as c:
        with pytest.raises(ServerError) as e:
            c.infer("ident", {"x": np.zeros((2, 3), np.float32)})  # wrong width
        assert e.value.status == 400 and s.url(protocol) in str(e.value) and "400" in str(e.value)
        with pytest.raises(ServerError) as e:
            c.infer("nope", {"x": X})
        assert e.value.status == 404
        assert c.aio.breaker("ident").state == "closed"  # the caller's mistakes say nothing of the endpoint
    if protocol == "http":  # the gRPC frontend does not count the requests it refuses at decode
        assert s.requests_total("400") == before + 1  # sent once, never retried


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_request_over_the_size_limit_is_413_and_not_retried(tmp_path, served, protocol):
    s = served(ident_repo(tmp_path / "repo"), "--max-body-mb", "0.01")
    big = np.zeros((8, 4), np.float32).repeat(100, axis=0)  # 3,200 x 4 FP32: 51 kB > 10 kB
    with Client(s.url(protocol), retry=RetryPolicy(base_s=1.0, max_backoff_s=5.0)) as c:
        t = time.monotonic()
        with pytest.raises(ServerError) as e:
            c.infer("ident", {"x": big}, deadline=20)
        assert time.monotonic() - t < 5  # no backoff slept: not retried
    assert e.value.status == 413, str(e.value)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_shed_calls_wait_for_retry_after_and_then_succeed(tmp_path, served, protocol):
    s = served(probe_repo(tmp_path / "slow", delay_s=1.0), "--max-queue-ms", "500")

    async def main():
        async with AsyncClient(s.url(protocol), deadline=60, retry=RetryPolicy(base_s=0.01, max_backoff_s=0.02)) as c:
            async def one(i):
                await asyncio.sleep(0.2 * i)  # one by one, so that they queue instead of sharing a batch
                t = time.monotonic()
                r = await c.infer("probe", {"x": X + i})
                return r, time.monotonic() - t
            return await asyncio.gather(*(one(i) for i in range(4)))

    results = asyncio.run(main())
    for i, (r, _) in enumerate(results):
        np.testing.assert_array_equal(r["y"], 2 * (X + i))
    retried = [t for r, t in results if r.attempts > 1]
    assert retried, "no call was shed: the test did not overload the server"
    # Each shed call slept the server's Retry-After (>= 1 s) before trying again, not the 20 ms
    # backoff: a handful of 503s in all, where polling every 20 ms would collect dozens.
    assert all(r.attempts <= 4 for r, _ in results), [r.attempts for r, _ in results]
    assert len(retried) <= s.requests_total("503") <= 3 * len(retried)


def _load(call, stop: threading.Event, results: list, errors: list):
    while not stop.is_set():
        try:
            results.append(call())
        except Exception as e:  # noqa: BLE001 - every failure is the test's finding
            errors.append(e)


def test_sync_http_server_killed_and_restarted_mid_load_costs_no_failed_call(tmp_path, served):
    s = served(ident_repo(tmp_path / "repo"))
    results, errors, stop = [], [], threading.Event()
    with Client(s.http, deadline=90, retry=RetryPolicy(base_s=0.05, max_backoff_s=0.5)) as c:
        workers = [threading.Thread(target=_load, args=(lambda: c.infer("ident", {"x": X}), stop, results, errors))
                   for _ in range(3)]
        for w in workers:
            w.start()
        try:
            assert _wait(lambda: len(results) >= 20, 60)
            s.restart()
            n = len(results)
            assert _wait(lambda: len(results) >= n + 20, 60)
        finally:
            stop.set()
            for w in workers:
                w.join(120)
    assert errors == []
    assert any(r.attempts > 1 for r in results), "no call was retried: the restart did not happen mid-load"
    assert all(np.array_equal(r["y"], X) for r in results)


def test_async_grpc_server_killed_and_restarted_mid_load_costs_no_failed_call(tmp_path, served):
    s = served(ident_repo(tmp_path / "repo"))

    async def main():
        results, errors = [], []
        async with AsyncClient(s.grpc, deadline=90, retry=RetryPolicy(base_s=0.05, max_backoff_s=0.5)) as c:
            done = asyncio.Event()

            async def worker():
                while not done.is_set():
                    try:
                        results.append(await c.infer("ident", {"x": X}))
                    except Exception as e:  # noqa: BLE001
                        errors.append(e)

            tasks = [asyncio.ensure_future(worker()) for _ in range(3)]
            while len(results) < 20:
                await asyncio.sleep(0.05)
            await asyncio.get_running_loop().run_in_executor(None, s.restart)
            n = len(results)
            end = time.monotonic() + 60
            while len(results) < n + 20 and time.monotonic() < end:
                await asyncio.sleep(0.05)
            done.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
        return results, errors, n

    results, errors, n = asyncio.run(main())
    assert errors == []
    assert len(results) >= n + 20
    assert any(r.attempts > 1 for r in results), "no call was retried: the restart did not happen mid-load"


def _wait(pred, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_async_hanging_replica_is_ejected_and_calls_go_to_the_healthy_one(tmp_path, served, protocol):
    healthy = served(probe_repo(tmp_path / "healthy"))
    hanging = served(probe_repo(tmp_path / "hanging", delay_s=20))

    async def main():
        async with AsyncClient([hanging.url(protocol), healthy.url(protocol)], deadline=60, per_try_timeout=1.0,
                               ejection=EjectionPolicy(consecutive_failures=1, base_s=120), seed=3) as c:
            results = [await c.infer("probe", {"x": X}) for _ in range(12)]
            return results, {r.url: r for r in c.balancer.replicas}

    results, replicas = asyncio.run(main())
    assert all(r.replica == healthy.url(protocol) for r in results)
    assert all(np.array_equal(r["y"], 2 * X) for r in results)
    assert replicas[hanging.url(protocol)].ejections == 1 and replicas[healthy.url(protocol)].ejections == 0
    # one try (at most a hedge-free retry) was spent on the hanging replica, then it was out
    assert sum(r.attempts for r in results) <= len(results) + 1


@pytest.fixture
def fast_and_slow(tmp_path, served):
    return served(probe_repo(tmp_path / "fast")), served(probe_repo(tmp_path / "slow", delay_s=1.5))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_hedging_cuts_the_tail_of_one_slow_replica(fast_and_slow, protocol):
    fast, slow = fast_and_slow
    urls = [fast.url(protocol), slow.url(protocol)]

    def latencies(**options):
        out = []
        with Client(urls, deadline=60, seed=5, **options) as c:
            for _ in range(10):
                t = time.monotonic()
                r = c.infer("probe", {"x": X})
                out.append((time.monotonic() - t, r))
        return out

    plain = latencies()
    assert max(t for t, _ in plain) >= 1.5  # some calls landed on the slow replica and waited
    hedged = latencies(hedge=HedgePolicy(delay_s=0.1))
    assert max(t for t, _ in hedged) < 1.0, str([(round(t, 3), r.replica[-5:], r.attempts) for t, r in hedged])
    assert all(r.replica == fast.url(protocol) for _, r in hedged)
    assert any(r.attempts == 2 for _, r in hedged)  # the hedge was sent (and won) at least once


def test_breaker_opens_after_consecutive_failed_calls(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}", retry=RetryPolicy(max_attempts=2, base_s=0.01),
                breaker=BreakerPolicy(consecutive_failures=2, open_s=30)) as c:
        for _ in range(2):
            with pytest.raises(ConnectionFailed) as e:
                c.infer("ident", {"x": X})
            assert f"127.0.0.1:{port}" in str(e.value)
        with pytest.raises(CircuitOpen) as e:
            c.infer("ident", {"x": X})
        assert 0 < e.value.retry_after <= 30
        assert c.aio.breaker("other").allow()  # per endpoint


def test_deadline_bounds_the_retries_and_names_the_last_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Client(f"grpc://127.0.0.1:{port}", retry=RetryPolicy(base_s=0.05, max_backoff_s=0.2)) as c:
        t = time.monotonic()
        with pytest.raises(DeadlineExceeded) as e:
            c.infer("ident", {"x": X}, deadline=1.0)
        assert time.monotonic() - t < 10
        assert f"127.0.0.1:{port}" in str(e.value) and e.value.last is not None


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_retries_of_a_slow_call_are_counted_once_by_the_server(tmp_path, served, protocol):
    """Each try gives up after 0.4 s on work that takes 1 s. With the server deduping on the key,
    a later try shares the first one's result and the work runs once; without it every try runs
    the work again (behind the previous ones) and the call never gets an answer in time."""
    s = served(probe_repo(tmp_path / "slow", delay_s=1.0))
    before = s.requests_total("200")
    answered = None
    with Client(s.url(protocol), deadline=8, per_try_timeout=0.4, retry=RetryPolicy(base_s=0.05, max_backoff_s=0.1),
                ejection=EjectionPolicy(consecutive_failures=100)) as c:
        try:
            answered = c.infer("probe", {"x": X})
        except DeadlineExceeded:
            pass
    time.sleep(3)  # any duplicate run has finished (and been counted) by now
    runs = s.requests_total("200") - before
    assert answered is not None and answered.attempts > 1 and runs == 1, f"one call ran {runs} times"


def test_a_key_reused_for_another_request_is_refused_not_retried(tmp_path, served):
    s = served(ident_repo(tmp_path / "repo"))
    with Client(s.http) as c:
        c.infer("ident", {"x": X}, headers={"Idempotency-Key": "k-1"})
        with pytest.raises(ServerError) as e:
            c.infer("ident", {"x": X + 1}, headers={"Idempotency-Key": "k-1"})
    assert e.value.status == 422 and "Idempotency-Key" in e.value.server_message


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_result_says_which_target_of_a_route_answered(tmp_path, served, protocol):
    repo = ident_repo(tmp_path / "repo")
    (repo / "routes.yaml").write_text("routes:\n  - endpoint: front\n    targets:\n"
                                      "      - {model: ident, version: 1, weight: 1}\n")
    s = served(repo)
    with Client(s.url(protocol)) as c:
        r = c.infer("front", {"x": X})
    np.testing.assert_array_equal(r["y"], X)
    assert (r.model, r.version, r.target, r.fallback, r.cache_hit) == ("front", 1, "ident/1", False, False)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_404_is_final_unless_the_replica_served_the_model_before(tmp_path, served, protocol):
    """A wrong name fails at once; a model this replica answered before and now reports unknown
    (unloaded for a reload, a restart that is still loading) is waited for within the deadline."""
    from rt_server import request

    s = served(ident_repo(tmp_path / "repo"), "--enable-management", "--management-token", "tok")
    auth = {"Authorization": "Bearer tok"}
    with Client(s.url(protocol), deadline=30, retry=RetryPolicy(base_s=0.05, max_backoff_s=0.2)) as c:
        with pytest.raises(ServerError) as e:
            c.infer("no-such-model", {"x": X})
        assert e.value.status == 404
        assert c.infer("ident", {"x": X}).attempts == 1
        assert request(s.http_port, "POST", "/v2/repository/models/ident/unload", b"{}", auth).status == 200
        threading.Timer(1.0, lambda: request(s.http_port, "POST", "/v2/repository/models/ident/load", b"{}",
                                             auth)).start()
        r = c.infer("ident", {"x": X})
        np.testing.assert_array_equal(r["y"], X)
        assert r.attempts > 1
