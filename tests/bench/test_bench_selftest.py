"""The load generator's self-test: a server that stalls for one second.

Open loop at 100 requests/s: every request due during the stall is timed from its intended send
time, so about a hundred requests report 0-1000 ms and the p99 shows the stall. Closed loop on
the same stall: the one waiting client sends nothing while it waits, so the stall is a single
slow request among thousands (only the max shows it): coordinated omission.
"""

from __future__ import annotations

import pytest

from bench_servers import TinyServer, bench_json

RUN = ["--synthetic", "--warmup", "0.5", "--duration", "4", "--window", "1"]


@pytest.fixture
def stalling_server():
    # The stall starts 2 s after the load begins: 1.5 s into the 4 s of measurement.
    server = TinyServer(stall_after_s=2.0, stall_s=1.0).start()
    yield server
    server.stop()


def test_open_loop_shows_a_one_second_stall_in_p99(stalling_server):
    report = bench_json(["--url", stalling_server.url, "--model", "tiny", "--rate", "100", *RUN])
    r = report["results"][0]
    assert report["synthetic"] is True and report["inputs"]["synthetic"] is True
    assert stalling_server.stall_window is not None
    assert r["mode"] == "open" and r["errors_total"] == 0
    assert r["p99_ms"] >= 900, r
    assert 950 <= r["max_ms"] <= 1100
    # every window's requests were answered and counted; the achieved rate is the offered one
    assert 300 <= r["requests"] <= 500 and r["offered_per_s"] == pytest.approx(r["requests_per_s"])
    assert max(r["per_window"]["p50_ms"]) > 100  # the stalled window
    assert min(r["per_window"]["p50_ms"]) < 50   # the others


def test_closed_loop_hides_the_same_stall(stalling_server):
    report = bench_json(["--url", stalling_server.url, "--model", "tiny", "--concurrency", "1", *RUN])
    r = report["results"][0]
    assert stalling_server.stall_window is not None
    assert r["mode"] == "closed" and r["errors_total"] == 0
    assert r["requests"] > 1000  # a fast server: thousands of requests, one of which waited out the stall
    assert r["max_ms"] >= 900
    assert r["p99_ms"] < 100, r
