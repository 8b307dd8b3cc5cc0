"""Graceful degradation end to end: a backend that starts failing behind an endpoint with a
fallback. Its breaker opens within the window, the fallback answers every request meanwhile (no 5xx
reaches the client), and after recovery the breaker half-opens and closes and the primary answers
again."""

from __future__ import annotations

import json
import time

import numpy as np

from serve_kit.config import RouteSpec

from rt_models import probe_config, write_probe
from rt_server import InProcessServer, request


def _infer(port: int, x: float):
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [x, 1, 2, 3]}]})
    return request(port, "POST", "/v2/models/main/infer", body.encode())


def _metric(port: int, name: str, **labels) -> float:
    total = 0.0
    for line in request(port, "GET", "/metrics").body.decode().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_failing_backend_breaker_opens_fallback_answers_then_recovers(tmp_path):
    flag = tmp_path / "failing"
    root = tmp_path / "repo"
    write_probe(root, probe_config("main", max_batch_size=4, route=RouteSpec(
        targets=[{"model": "main"}], fallback=[{"model": "small"}]), circuit_breaker={
        "window_seconds": 30, "min_requests": 4, "max_error_rate": 0.5, "open_seconds": 1.0,
        "half_open_probes": 2}), fail_file=str(flag))
    write_probe(root, probe_config("small"))
    srv = InProcessServer(root).start()
    port = srv.port
    try:
        first = _infer(port, 1.0)
        assert first.status == 200 and first.headers["serve-kit-target"] == "main/1"

        flag.write_text("1")
        answers = [_infer(port, float(i)) for i in range(30)]
        assert [a.status for a in answers] == [200] * 30, [a.body for a in answers if a.status != 200]
        assert all(a.headers["serve-kit-target"] == "small/1" and a.headers["serve-kit-fallback"] == "1"
                   for a in answers)
        assert np.allclose(answers[5].json()["outputs"][0]["data"], [10, 2, 4, 6])
        assert _metric(port, "serve_kit_breaker_state", model="main", version="1") == 1
        by_error = _metric(port, "serve_kit_fallbacks_total", endpoint="main", reason="backend_error")
        by_breaker = _metric(port, "serve_kit_fallbacks_total", endpoint="main", reason="breaker_open")
        # The breaker opened within its window (min_requests 4 with the good one): at most a few
        # requests reached the failing backend, the rest were shed to the fallback at once.
        assert 3 <= by_error <= 4 and by_breaker == 30 - by_error
        assert request(port, "GET", "/v2/models/main/versions/1/ready").status == 400

        flag.unlink()
        deadline = time.monotonic() + 60
        recovered = None
        while time.monotonic() < deadline:
            r = _infer(port, 2.0)
            assert r.status == 200
            if r.headers["serve-kit-target"] == "main/1":
                recovered = r
                break
            time.sleep(0.1)
        assert recovered is not None, "the primary never answered again after recovery"
        for _ in range(3):
            assert _infer(port, 3.0).headers["serve-kit-target"] == "main/1"
        assert _metric(port, "serve_kit_breaker_state", model="main", version="1") == 0
        assert _metric(port, "serve_kit_breaker_transitions_total", model="main", version="1", to="half_open") >= 1
        assert _metric(port, "serve_kit_breaker_transitions_total", model="main", version="1", to="closed") >= 1
        assert _metric(port, "serve_kit_route_requests_total", endpoint="main", role="fallback", code="200") >= 30
    finally:
        srv.stop()
