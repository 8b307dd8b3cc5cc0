"""Circuit breaker and response cache through config.yaml on a real server (HTTP on 127.0.0.1):
503 + Retry-After while open, not ready, stats and metrics; cache hits without executions, never
across versions."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from rt_models import config, mlp_onnx, mlp_reference, mlp_weights, probe_config, write_probe, write_version
from rt_server import InProcessServer, request, wait_until

TOKEN = "resilience-token"


def body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}]}).encode()


def infer(port: int, model: str, x: np.ndarray, version: int | None = None):
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    return request(port, "POST", path, body(x), {"Content-Type": "application/json"})


def metric(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name):line.rindex("}")]))
            if all(got.get(k) == str(v) for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


def stats_of(port: int, model: str, version: int) -> dict:
    r = request(port, "GET", f"/v2/models/{model}/versions/{version}/stats")
    assert r.status == 200, r
    return r.json()["model_stats"][0]


@pytest.fixture
def flag(tmp_path):
    return tmp_path / "failing"


def test_breaker_opens_sheds_half_opens_and_closes(tmp_path, flag):
    root = tmp_path / "repo"
    write_probe(root, probe_config("flaky", max_batch_size=4, circuit_breaker={
        "window_seconds": 30, "min_requests": 4, "max_error_rate": 0.5, "open_seconds": 1.5,
        "half_open_probes": 2}), fail_file=str(flag))
    s = InProcessServer(root, exit_timeout=5).start()
    try:
        x = np.ones((1, 4), np.float32)
        assert infer(s.port, "flaky", x).status == 200
        flag.write_text("1")
        codes = [infer(s.port, "flaky", x).status for _ in range(3)]
        assert codes == [500, 500, 500]  # 3 failures of 4 in the window: open
        r = infer(s.port, "flaky", x)
        assert r.status == 503 and int(r.headers["retry-after"]) >= 1
        assert "circuit breaker open" in r.json()["error"]
        assert request(s.port, "GET", "/v2/models/flaky/ready").status == 400
        assert request(s.port, "GET", "/v2/models/flaky/versions/1/ready").status == 400
        st = stats_of(s.port, "flaky", 1)
        assert st["breaker"]["state"] == "open" and st["breaker"]["window_requests"] == 4
        assert st["breaker"]["error_rate"] == pytest.approx(0.75)
        executions = st["execution_count"]
        text = request(s.port, "GET", "/metrics").body.decode()
        assert metric(text, "serve_kit_breaker_state", model="flaky", version=1) == 1
        assert metric(text, "serve_kit_breaker_transitions_total", model="flaky", version=1, to="open") == 1
        assert metric(text, "serve_kit_breaker_rejected_total", model="flaky", version=1) == 1
        assert metric(text, "serve_kit_requests_total", model="flaky", version=1, status="503") == 1
        assert stats_of(s.port, "flaky", 1)["execution_count"] == executions  # refused, not run

        flag.unlink()  # the backend recovers; after the cool-down the probes close it
        assert wait_until(lambda: request(s.port, "GET", "/v2/models/flaky/ready").status == 200, 30)
        assert [infer(s.port, "flaky", x).status for _ in range(3)] == [200, 200, 200]
        st = stats_of(s.port, "flaky", 1)
        assert st["breaker"]["state"] == "closed"
        text = request(s.port, "GET", "/metrics").body.decode()
        assert metric(text, "serve_kit_breaker_state", model="flaky", version=1) == 0
        for to in ("half_open", "closed"):
            assert metric(text, "serve_kit_breaker_transitions_total", model="flaky", version=1, to=to) == 1
    finally:
        s.stop()


def test_a_failing_probe_reopens_and_client_errors_never_open(tmp_path, flag):
    root = tmp_path / "repo"
    write_probe(root, probe_config("flaky", max_batch_size=4, circuit_breaker={
        "min_requests": 2, "open_seconds": 1, "half_open_probes": 1}), fail_file=str(flag))
    s = InProcessServer(root, exit_timeout=5).start()
    try:
        bad = np.ones((1, 3), np.float32)  # wrong width: 400, never counted
        assert [infer(s.port, "flaky", bad).status for _ in range(10)] == [400] * 10
        assert stats_of(s.port, "flaky", 1)["breaker"]["state"] == "closed"
        flag.write_text("1")
        x = np.ones((1, 4), np.float32)
        assert [infer(s.port, "flaky", x).status for _ in range(3)] == [500, 500, 503]
        assert wait_until(lambda: request(s.port, "GET", "/v2/models/flaky/ready").status == 200, 30)
        assert infer(s.port, "flaky", x).status == 500  # the probe fails: open again
        assert stats_of(s.port, "flaky", 1)["breaker"]["state"] == "open"
        assert infer(s.port, "flaky", x).status == 503
    finally:
        s.stop()


def test_cache_serves_hits_without_executions_and_never_across_versions(tmp_path):
    root = tmp_path / "repo"
    w1 = mlp_weights(4, 8, 4, seed=1)
    w2 = mlp_weights(4, 8, 4, seed=2)
    cfg = config("mlp", 4, 4, max_batch_size=8, version_policy={"all": True},
                 response_cache={"max_bytes": 1 << 20})
    write_version(root, cfg, mlp_onnx(*w1))
    s = InProcessServer(root, exit_timeout=5, management_token=TOKEN).start()
    try:
        x = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
        r = infer(s.port, "mlp", x)
        assert r.status == 200
        y1 = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(2, 4)
        np.testing.assert_allclose(y1, mlp_reference(x, *w1), rtol=1e-5, atol=1e-6)
        before = stats_of(s.port, "mlp", 1)
        for _ in range(3):
            again = infer(s.port, "mlp", x)
            assert again.status == 200 and again.json()["outputs"] == r.json()["outputs"]
        after = stats_of(s.port, "mlp", 1)
        assert after["execution_count"] == before["execution_count"]
        assert after["inference_stats"]["cache_hit"]["count"] == 3
        assert after["inference_stats"]["cache_miss"]["count"] == 1
        text = request(s.port, "GET", "/metrics").body.decode()
        assert metric(text, "serve_kit_cache_hits_total", model="mlp", version=1) == 3
        assert metric(text, "serve_kit_cache_entries", model="mlp", version=1) == 1
        assert 0 < metric(text, "serve_kit_cache_bytes", model="mlp", version=1) <= 1 << 20

        write_version(root, cfg, mlp_onnx(*w2))  # version 2: other weights, same inputs asked
        r = request(s.port, "POST", "/v2/repository/models/mlp/load", b"",
                    {"Authorization": f"Bearer {TOKEN}"})
        assert r.status == 200, r
        r2 = infer(s.port, "mlp", x)  # the latest version: 2
        y2 = np.array(r2.json()["outputs"][0]["data"], np.float32).reshape(2, 4)
        np.testing.assert_allclose(y2, mlp_reference(x, *w2), rtol=1e-5, atol=1e-6)
        assert not np.allclose(y1, y2)
        assert stats_of(s.port, "mlp", 2)["inference_stats"]["cache_hit"]["count"] == 0
        r1 = infer(s.port, "mlp", x, version=1)
        np.testing.assert_allclose(np.array(r1.json()["outputs"][0]["data"], np.float32).reshape(2, 4), y1,
                                   rtol=1e-5, atol=1e-6)
        # The reload emptied version 1's cache (a miss), but its counters carry on.
        v1 = stats_of(s.port, "mlp", 1)["inference_stats"]
        assert (v1["cache_hit"]["count"], v1["cache_miss"]["count"]) == (3, 2)
        r2b = infer(s.port, "mlp", x, version=2)
        assert r2b.json()["outputs"] == r2.json()["outputs"]
        assert stats_of(s.port, "mlp", 2)["inference_stats"]["cache_hit"]["count"] == 1
    finally:
        s.stop()


def test_bad_resilience_config_is_a_clear_load_error(tmp_path):
    root = tmp_path / "repo"
    write_probe(root, probe_config("ok", max_batch_size=4))
    mdir = root / "bad"
    (mdir).mkdir(parents=True)
    text = (root / "ok" / "config.yaml").read_text().replace("name: ok", "name: bad")
    (mdir / "config.yaml").write_text(text + "circuit_breaker:\n  max_error_rate: 1.5\n")
    s = InProcessServer(root, exit_timeout=5).start()
    try:
        r = request(s.port, "GET", "/v2/models/bad/ready")
        assert r.status == 400
        idx = request(s.port, "POST", "/v2/repository/index", b"{}").json()
        bad = [e for e in idx if e["name"] == "bad"][0]
        assert bad["state"] == "UNAVAILABLE" and "max_error_rate" in bad["reason"]
    finally:
        s.stop()


def test_grpc_open_breaker_is_unavailable_with_pushback_and_not_ready(tmp_path, flag):
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    from rt_server import GrpcServer

    root = tmp_path / "repo"
    write_probe(root, probe_config("flaky", max_batch_size=4, circuit_breaker={
        "min_requests": 2, "open_seconds": 30}), fail_file=str(flag))
    s = GrpcServer(root, plain={}).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{s.plain.port}")
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def call():
            req = service_pb2.ModelInferRequest(model_name="flaky")
            t = req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
            t.contents.fp32_contents.extend([1, 2, 3, 4])
            return stub.ModelInfer(req, timeout=30)

        assert stub.ModelReady(service_pb2.ModelReadyRequest(name="flaky"), timeout=30).ready
        flag.write_text("1")
        codes = []
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as e:
                call()
            codes.append(e.value.code().name)
        assert codes == ["INTERNAL", "INTERNAL", "UNAVAILABLE"]
        assert "circuit breaker open" in e.value.details()
        pushback = dict(e.value.trailing_metadata() or ())
        assert 25_000 <= int(pushback["grpc-retry-pushback-ms"]) <= 30_000
        assert not stub.ModelReady(service_pb2.ModelReadyRequest(name="flaky"), timeout=30).ready
    finally:
        channel.close()
        s.stop()
