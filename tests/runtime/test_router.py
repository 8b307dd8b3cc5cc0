"""The router on a real server: split (sticky), shadow with live agreement, blue-green switches
without a failed request, fallback, the route management API and its refusals."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from serve_kit.config import RouteSpec

from rt_models import config, mlp_onnx, mlp_weights, probe_config, write_probe, write_version
from rt_server import InProcessServer, request, wait_until

TOKEN = "route-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def _repo(root: Path) -> Path:
    """`m`: versions 1 and 2 identical (y = 2x), 3 a different model (an MLP); `alt`: y = 2x too;
    `wide`: another signature (5 inputs)."""
    cfg = probe_config("m", version_policy={"all": True})
    write_probe(root, cfg)
    write_probe(root, cfg)
    w1, w2 = mlp_weights(4, 8, 4, seed=3)
    write_version(root, config("m", version_policy={"all": True}), mlp_onnx(w1, w2))
    write_probe(root, probe_config("alt"))
    write_probe(root, probe_config("wide", width=5))
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = InProcessServer(_repo(tmp_path_factory.mktemp("router")), management_token=TOKEN).start()
    yield srv
    srv.stop()


def _port(srv) -> int:
    return int(srv.info["http"].rsplit(":", 1)[1])


def _body(x: list[float]) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, len(x)], "data": x}]}).encode()


def _put(port: int, endpoint: str, route: dict, headers=AUTH):
    return request(port, "PUT", f"/v2/routes/{endpoint}", json.dumps(route).encode(), headers)


def _metric(port: int, name: str, **labels) -> float:
    total = 0.0
    for line in request(port, "GET", "/metrics").body.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
    return total


def _infer(port: int, x=(1.0, 2.0, 3.0, 4.0), endpoint="m", headers=None):
    return request(port, "POST", f"/v2/models/{endpoint}/infer", _body(list(x)), headers or {})


def test_sticky_split_reports_the_target_and_keeps_each_key(server):
    port = _port(server)
    r = _put(port, "m", {"targets": [{"model": "m", "version": 1, "weight": 50},
                                     {"model": "m", "version": 2, "weight": 50}], "sticky": {"header": "x-user-id"}})
    assert r.status == 200, r.body
    seen = {}
    for i in range(40):
        resp = _infer(port, headers={"x-user-id": f"u{i % 10}"})
        assert resp.status == 200
        target = resp.headers["serve-kit-target"]
        assert target in ("m/1", "m/2")
        assert resp.json()["parameters"]["serve_kit_target"] == target
        assert resp.json()["model_version"] == target.split("/")[1]
        assert seen.setdefault(f"u{i % 10}", target) == target
    assert set(seen.values()) == {"m/1", "m/2"}
    # A version named in the URL bypasses the route.
    direct = request(port, "POST", "/v2/models/m/versions/3/infer", _body([1, 2, 3, 4]))
    assert direct.status == 200 and direct.json()["model_version"] == "3" and "serve-kit-target" not in direct.headers
    assert request(port, "DELETE", "/v2/routes/m", b"", AUTH).json()["source"] == "default"


def _agreement(port: int, version: str, source: str = "shadow") -> tuple[float, float]:
    s = _metric(port, "serve_kit_shadow_agreement_sum", endpoint="m", version=version, source=source)
    n = _metric(port, "serve_kit_shadow_agreement_count", endpoint="m", version=version, source=source)
    return s, n


def test_shadow_reports_agreement_of_an_identical_and_of_a_different_candidate(server):
    port = _port(server)
    rng = np.random.default_rng(0)
    for candidate, expect_identical in (("2", True), ("3", False)):
        r = _put(port, "m", {"targets": [{"model": "m", "version": 1}],
                             "shadow": {"model": "m", "version": int(candidate), "percent": 100}})
        assert r.status == 200, r.body
        s0, n0 = _agreement(port, candidate)
        for _ in range(60):
            resp = _infer(port, rng.standard_normal(4).tolist())
            assert resp.status == 200 and resp.headers["serve-kit-target"] == "m/1"
        assert wait_until(lambda: _agreement(port, candidate)[1] - n0 >= 60, timeout=30)
        s, n = _agreement(port, candidate)
        mean = (s - s0) / (n - n0)
        if expect_identical:
            assert mean == pytest.approx(1.0)
        else:
            assert mean < 0.9
        assert _metric(port, "serve_kit_route_requests_total", endpoint="m", version=candidate, role="shadow",
                       code="200") >= 60
    request(port, "DELETE", "/v2/routes/m", b"", AUTH)


def test_split_traffic_compares_the_candidate_with_the_champion(server):
    port = _port(server)
    r = _put(port, "m", {"targets": [{"model": "m", "version": 1, "weight": 1}, {"model": "m", "version": 3, "weight": 1}],
                         "compare": 1.0})
    assert r.status == 200, r.body
    rng = np.random.default_rng(1)
    for _ in range(40):
        assert _infer(port, rng.standard_normal(4).tolist()).status == 200
    assert wait_until(lambda: _agreement(port, "3", "compare")[1] >= 5, timeout=30)
    s, n = _agreement(port, "3", "compare")
    assert s / n < 0.9
    request(port, "DELETE", "/v2/routes/m", b"", AUTH)


def test_blue_green_switches_under_load_lose_no_request(server):
    port = _port(server)
    stop = threading.Event()
    results: list[tuple[int, str | None]] = []

    def load():
        while not stop.is_set():
            resp = _infer(port)
            results.append((resp.status, resp.headers.get("serve-kit-target")))

    assert _put(port, "m", {"targets": [{"model": "m", "version": 2}]}).status == 200
    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(10):
            version = 1 + i % 2
            assert _put(port, "m", {"targets": [{"model": "m", "version": version}]}).status == 200
            n = len(results)
            assert wait_until(lambda: len(results) >= n + 20, timeout=30)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert results and all(status == 200 for status, _ in results), \
        sorted({s for s, _ in results})
    assert {t for _, t in results} == {"m/1", "m/2"}
    request(port, "DELETE", "/v2/routes/m", b"", AUTH)


def test_fallback_answers_when_the_primary_is_not_serving(tmp_path):
    root = tmp_path / "repo"
    write_probe(root, probe_config("main"))
    write_probe(root, probe_config("small"))
    (root / "routes.yaml").write_text(yaml.safe_dump({"routes": [
        {"endpoint": "main", "targets": [{"model": "main"}], "fallback": [{"model": "small"}]}]}))
    srv = InProcessServer(root, management_token=TOKEN).start()
    port = _port(srv)
    try:
        ok = _infer(port, endpoint="main")
        assert ok.status == 200 and ok.headers["serve-kit-target"] == "main/1" and "serve-kit-fallback" not in ok.headers
        assert request(port, "POST", "/v2/repository/models/main/unload", b"{}", AUTH).status == 200
        for _ in range(5):
            resp = _infer(port, endpoint="main")
            assert resp.status == 200, resp.body
            assert resp.headers["serve-kit-target"] == "small/1" and resp.headers["serve-kit-fallback"] == "1"
            assert resp.json()["parameters"]["serve_kit_fallback"] is True
        assert _metric(port, "serve_kit_fallbacks_total", endpoint="main", model="small", reason="not_ready") == 5
        state = request(port, "GET", "/v2/routes/main").json()
        assert state["source"] == "routes.yaml" and state["fallback"] == [{"model": "small"}]
    finally:
        srv.stop()


def test_a_virtual_endpoint_from_routes_yaml_and_a_config_yaml_route(tmp_path):
    root = tmp_path / "repo"
    write_probe(root, probe_config("a"))
    cfg = probe_config("b", route=RouteSpec(targets=[{"model": "a"}]))
    write_probe(root, cfg)
    (root / "routes.yaml").write_text(yaml.safe_dump({"routes": [
        {"endpoint": "public", "targets": [{"model": "a", "weight": 1}, {"model": "b", "weight": 1}]}]}))
    srv = InProcessServer(root).start()
    port = _port(srv)
    try:
        assert _infer(port, endpoint="b").headers["serve-kit-target"] == "a/1"
        targets = {_infer(port, endpoint="public").headers["serve-kit-target"] for _ in range(40)}
        assert targets == {"a/1", "b/1"}
        assert request(port, "GET", "/v2/models/public").status == 200
        assert request(port, "GET", "/v2/models/public/ready").status == 200
        routes = {r["endpoint"]: r for r in request(port, "GET", "/v2/routes").json()["routes"]}
        assert routes["b"]["source"] == "config.yaml" and routes["public"]["source"] == "routes.yaml"
        assert routes["a"]["source"] == "default"
        # Management is off: a change is refused with 403 and says how to enable it.
        r = _put(port, "public", {"targets": [{"model": "a"}]})
        assert r.status == 403 and "--enable-management" in r.json()["error"]
    finally:
        srv.stop()


@pytest.mark.parametrize("route, status, words", [
    ({"targets": [{"model": "nope"}]}, 400, "target nope:latest is not ready: unknown model 'nope'"),
    ({"targets": [{"model": "m", "version": 9}]}, 400, "no version 9 serving"),
    ({"targets": [{"model": "m", "weight": 0}]}, 400, "sum to a positive number"),
    ({"targets": [{"model": "wide"}]}, 400, "incompatible signature: inputs differ"),
    ({"targets": [{"model": "m"}], "fallback": [{"model": "wide"}]}, 400, "fallback wide:latest has an incompatible"),
    ({"targets": [{"model": "m"}], "shadow": {"model": "m", "version": 7}}, 400, "shadow m:7 is not ready"),
    ({"targets": [{"model": "m"}], "if_generation": 12345}, 409, "not 12345"),
    ({"endpoint": "other", "targets": [{"model": "m"}]}, 400, "names endpoint 'other'"),
])
def test_bad_route_changes_are_refused_and_change_nothing(server, route, status, words):
    port = _port(server)
    before = request(port, "GET", "/v2/routes/m").json()
    r = _put(port, "m", route)
    assert r.status == status, r.body
    assert words in r.json()["error"], r.json()["error"]
    assert request(port, "GET", "/v2/routes/m").json() == before


def test_route_changes_need_the_token_and_count_generations(server):
    port = _port(server)
    r = _put(port, "m", {"targets": [{"model": "m", "version": 2}]}, headers={"Authorization": "Bearer wrong"})
    assert r.status == 401
    gen = request(port, "GET", "/v2/routes/m").json()["generation"]
    r = _put(port, "m", {"targets": [{"model": "m", "version": 2}], "if_generation": gen})
    assert r.status == 200 and r.json()["generation"] == gen + 1
    assert _metric(port, "serve_kit_route_generation", endpoint="m") == gen + 1
    assert _metric(port, "serve_kit_route_weight", endpoint="m", version="2") == 1.0
    assert request(port, "GET", "/v2/routes/nope").status == 404
    assert request(port, "POST", "/v2/routes/m", b"{}", AUTH).status == 405
    r = request(port, "PUT", "/v2/routes/m", b"[1]", AUTH)
    assert r.status == 400
    assert request(port, "DELETE", "/v2/routes/m", b"", AUTH).status == 200
    time.sleep(0)  # keep the module's server state at the default route for the next test


def test_grpc_sticky_key_from_metadata_and_the_target_in_the_response(tmp_path):
    grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is in the dev extra")
    from rt_server import GrpcServer
    from serve_kit.config import RoutesFile

    root = _repo(tmp_path / "repo")
    (root / "routes.yaml").write_text(yaml.safe_dump(RoutesFile(routes=[RouteSpec(
        endpoint="m", targets=[{"model": "m", "version": 1}, {"model": "m", "version": 2}],
        sticky={"header": "x-user-id"})]).model_dump(mode="json", exclude_none=True)))
    srv = GrpcServer(root, plain={}).start()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.plain.port}")
    try:
        x = grpcclient.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        seen = {}
        for i in range(30):
            key = f"user-{i % 6}"
            r = client.infer("m", [x], headers={"x-user-id": key}, client_timeout=20).get_response()
            target = r.parameters["serve_kit_target"].string_param
            assert target == f"m/{r.model_version}"
            assert seen.setdefault(key, target) == target
        assert set(seen.values()) == {"m/1", "m/2"}
    finally:
        client.close()
        srv.stop()
