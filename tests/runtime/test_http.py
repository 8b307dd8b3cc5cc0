"""serve_kit.runtime.http: the Open Inference Protocol over HTTP/1.1, driven by real tritonclient.http.

The server is the real one: `serve()` (ModelManager, HTTP frontend) on its own event loop in a
thread, or `serve-kit serve` as a subprocess. The repository holds the real digits model built
by `serve-kit optimize --recipe digits-cnn` (served outputs are compared with the reference
outputs stored in its samples.npz) plus tiny ONNX models. What tritonclient cannot send
(pipelining, malformed HTTP, truncated and oversized bodies, random bodies) goes over raw sockets.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rt_models import config, identity_onnx, seq_onnx, write_version
from rt_server import (InProcessServer, RawConnection, perf_analyzer_env, port_of, read_line, request,
                       request_bytes, run_perf_analyzer, start_cli, wait_ready)

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra")
from tritonclient.utils import InferenceServerException  # noqa: E402

from serve_kit import __version__  # noqa: E402
from serve_kit.runtime import protocol  # noqa: E402
from serve_kit.runtime.http import EXTENSIONS  # noqa: E402

TOKEN = "http-test-token"
T = 20.0  # seconds: every client call is bounded, so a hung server fails a test instead of the run
MAX_BODY = 256 * 1024
WIDE = 4096  # the `unbatched` model's row: 16 KB


# ---------------------------------------------------------------------------------------------
# The repository and the servers


@pytest.fixture(scope="module")
def repo(digits_repo, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("http-repo")
    shutil.copytree(digits_repo / "digits", root / "digits")
    seq_cfg = config("seq", max_batch_size=8, inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
                     outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, -1]},
                              {"name": "s", "datatype": "FP32", "shape": [-1, 1]}])
    write_version(root, seq_cfg, seq_onnx())
    write_version(root, config("spare", 4, 4, max_batch_size=4), identity_onnx(4))
    # Unbatched: its answers are sent with the GIL released, around the transport (_Connection._write).
    write_version(root, config("unbatched", WIDE, WIDE, dynamic_batching=None), identity_onnx(WIDE))
    return root


@pytest.fixture(scope="module")
def samples(repo):
    with np.load(repo / "digits" / "1" / "samples.npz") as z:
        return z["input.input"], z["reference.logits"]


@pytest.fixture(scope="module")
def server(repo):
    s = InProcessServer(repo, max_body_bytes=MAX_BODY, management_token=TOKEN, exit_timeout=5).start()
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    c = httpclient.InferenceServerClient(server.url, connection_timeout=T, network_timeout=T)
    yield c
    c.close()


def digits_input(x: np.ndarray, binary: bool):
    i = httpclient.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=binary)
    return i


def fp32_input(x: np.ndarray, name: str = "x", binary: bool = True):
    i = httpclient.InferInput(name, list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=binary)
    return i


def assert_serving(server, samples) -> None:
    """The server still answers inference correctly, on a fresh connection."""
    x, ref = samples
    c = httpclient.InferenceServerClient(server.url, connection_timeout=T, network_timeout=T)
    try:
        got = c.infer("digits", [digits_input(x[:2], True)]).as_numpy("logits")
        np.testing.assert_allclose(got, ref[:2], rtol=1e-4, atol=1e-4)
    finally:
        c.close()


def status_of(e: pytest.ExceptionInfo) -> str:
    return e.value.status()


# ---------------------------------------------------------------------------------------------
# Health, metadata, configuration


def test_health(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    assert not client.is_model_ready("digits", "2")
    assert not client.is_model_ready("no-such-model")


def test_server_metadata(client):
    md = client.get_server_metadata()
    assert (md["name"], md["version"]) == ("serve-kit", __version__)
    assert md["extensions"] == EXTENSIONS and "binary_tensor_data" in md["extensions"]


def test_model_metadata(client):
    md = client.get_model_metadata("digits")
    assert (md["name"], md["versions"], md["platform"]) == ("digits", ["1"], "onnxruntime_onnx")
    assert md["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert md["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_metadata("digits", "1")["versions"] == ["1"]
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nope")
    assert status_of(e) == "404" and "nope" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("digits", "3")
    assert status_of(e) == "404" and "3" in e.value.message()


def test_model_config(client, repo):
    cfg = client.get_model_config("digits")
    assert (cfg["name"], cfg["platform"], cfg["backend"], cfg["max_batch_size"]) == \
        ("digits", "onnxruntime_onnx", "onnxruntime", 64)
    # Triton's convention: dims without the batch dimension when max_batch_size > 0.
    assert [(i["name"], i["data_type"], i["dims"]) for i in cfg["input"]] == [("input", "TYPE_FP32", [1, 8, 8])]
    assert [(o["name"], o["data_type"], o["dims"]) for o in cfg["output"]] == [("logits", "TYPE_FP32", [10])]
    assert cfg["dynamic_batching"]["preferred_batch_size"] == [16, 32]
    assert cfg["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 256
    assert client.get_model_config("digits", "1")["name"] == "digits"
    with pytest.raises(InferenceServerException) as e:
        client.get_model_config("digits", "5")  # a version that is not serving
    assert status_of(e) == "404"
    with pytest.raises(InferenceServerException) as e:
        client.get_model_config("nope")
    assert status_of(e) == "404"


# ---------------------------------------------------------------------------------------------
# Inference


@pytest.mark.parametrize("binary_in, binary_out", [(False, False), (True, True), (True, False), (False, True)])
def test_infer_matches_the_reference_outputs(client, samples, binary_in, binary_out):
    x, ref = samples
    res = client.infer("digits", [digits_input(x, binary_in)],
                       outputs=[httpclient.InferRequestedOutput("logits", binary_data=binary_out)],
                       request_id=f"r-{binary_in}-{binary_out}")
    got = res.as_numpy("logits")
    assert got.dtype == np.float32 and got.shape == (len(x), 10)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert (got.argmax(1) == ref.argmax(1)).all()
    resp = res.get_response()
    assert (resp["model_name"], resp["model_version"], resp["id"]) == ("digits", "1", f"r-{binary_in}-{binary_out}")
    (out,) = resp["outputs"]
    assert ("binary_data_size" in out.get("parameters", {})) is binary_out
    assert ("data" in out) is not binary_out


def test_infer_binary_output_by_default(client, samples):
    """No outputs named: tritonclient asks for every output as binary (`binary_data_output`)."""
    x, ref = samples
    res = client.infer("digits", [digits_input(x[:3], True)], model_version="1")
    assert res.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 3 * 10 * 4
    np.testing.assert_allclose(res.as_numpy("logits"), ref[:3], rtol=1e-4, atol=1e-4)


def test_infer_matches_over_raw_http_and_the_codec(server, samples):
    """The wire format itself (not only tritonclient's reading of it): header length, layout."""
    x, ref = samples
    body, headers = protocol.encode_infer_request({"input": x}, binary=True, binary_output=True)
    r = request(server.port, "POST", "/v2/models/digits/infer", body, headers)
    assert r.status == 200 and r.headers["content-type"] == "application/octet-stream"
    hl = int(r.headers["inference-header-content-length"])
    header = json.loads(r.body[:hl])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == len(r.body) - hl == len(x) * 40
    got = np.frombuffer(r.body[hl:], "<f4").reshape(len(x), 10)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_requested_outputs(client):
    x = np.random.default_rng(3).standard_normal((2, 5)).astype(np.float32)
    y_ref, s_ref = 2 * np.maximum(x, 0), x.sum(1, keepdims=True)
    only_s = client.infer("seq", [fp32_input(x)], outputs=[httpclient.InferRequestedOutput("s")])
    assert [o["name"] for o in only_s.get_response()["outputs"]] == ["s"]
    assert only_s.as_numpy("y") is None
    np.testing.assert_allclose(only_s.as_numpy("s"), s_ref, rtol=1e-5, atol=1e-5)
    mixed = client.infer("seq", [fp32_input(x, binary=False)],
                         outputs=[httpclient.InferRequestedOutput("s", binary_data=False),
                                  httpclient.InferRequestedOutput("y", binary_data=True)])
    outs = mixed.get_response()["outputs"]
    assert [o["name"] for o in outs] == ["s", "y"]  # the request's order
    assert "data" in outs[0] and outs[1]["parameters"]["binary_data_size"] == x.size * 4
    np.testing.assert_allclose(mixed.as_numpy("y"), y_ref, rtol=1e-6)
    np.testing.assert_allclose(mixed.as_numpy("s"), s_ref, rtol=1e-5, atol=1e-5)
    every = client.infer("seq", [fp32_input(x)])
    assert [o["name"] for o in every.get_response()["outputs"]] == ["y", "s"]  # the config's order
    with pytest.raises(InferenceServerException) as e:
        client.infer("seq", [fp32_input(x)], outputs=[httpclient.InferRequestedOutput("q")])
    assert status_of(e) == "400" and "'q'" in e.value.message()


def test_statistics(client, samples):
    x, _ = samples
    before = client.get_inference_statistics("digits", "1")["model_stats"][0]
    for _ in range(3):
        client.infer("digits", [digits_input(x[:4], True)])
    (after,) = client.get_inference_statistics("digits", "1")["model_stats"]
    assert (after["name"], after["version"]) == ("digits", "1")
    assert after["inference_count"] - before["inference_count"] == 12  # samples, not requests
    ok = after["inference_stats"]["success"]
    assert ok["count"] - before["inference_stats"]["success"]["count"] == 3
    assert ok["ns"] > before["inference_stats"]["success"]["ns"] and after["last_inference"] > 0
    assert after["batch_stats"] and all(b["compute_infer"]["count"] > 0 for b in after["batch_stats"])
    # No model named: every model's statistics (GET /v2/models/stats, tritonclient's default).
    everything = client.get_inference_statistics()["model_stats"]
    assert {m["name"] for m in everything} == {"digits", "seq", "spare", "unbatched"}
    with pytest.raises(InferenceServerException) as e:
        client.get_inference_statistics("nope")
    assert status_of(e) == "404"
    with pytest.raises(InferenceServerException) as e:
        client.get_inference_statistics("digits", "4")
    assert status_of(e) == "404"


def test_repository_index(client, server):
    index = client.get_model_repository_index()
    states = {(m["name"], m.get("version")): m["state"] for m in index}
    assert states[("digits", "1")] == states[("seq", "1")] == "READY"
    assert {name for name, _ in states} == {"digits", "seq", "spare", "unbatched"}
    # Triton's ready filter, in the request body.
    r = request(server.port, "POST", "/v2/repository/index", b'{"ready": true}')
    assert r.status == 200 and all(m["state"] == "READY" for m in r.json())
    r = request(server.port, "POST", "/v2/repository/index", b"[1, 2")
    assert r.status == 400 and "JSON" in r.json()["error"]


# ---------------------------------------------------------------------------------------------
# Model management


def test_management_is_disabled_by_default(repo):
    plain = InProcessServer(repo, models=["spare"]).start()
    try:
        c = httpclient.InferenceServerClient(plain.url, connection_timeout=T, network_timeout=T)
        for call in (c.load_model, c.unload_model):
            with pytest.raises(InferenceServerException) as e:
                call("spare", headers={"Authorization": f"Bearer {TOKEN}"})
            assert status_of(e) == "403" and "disabled" in e.value.message()
        assert c.is_model_ready("spare")
        assert [m["name"] for m in c.get_model_repository_index() if m["state"] == "READY"] == ["spare"]
        c.close()
    finally:
        assert plain.stop() == 0


def test_management_needs_the_right_token(client, server):
    x = np.ones((1, 4), np.float32)
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"bearer {TOKEN}"}):
        for call in (client.unload_model, client.load_model):
            with pytest.raises(InferenceServerException) as e:
                call("spare", headers=headers)
            assert status_of(e) == "401" and "token" in e.value.message()
    assert client.is_model_ready("spare")

    bearer = {"Authorization": f"Bearer {TOKEN}"}
    client.unload_model("spare", headers=bearer)
    assert not client.is_model_ready("spare")
    with pytest.raises(InferenceServerException) as e:
        client.infer("spare", [fp32_input(x)])
    assert status_of(e) == "404" and "spare" in e.value.message()
    assert client.is_server_ready()  # unloaded on purpose: the server stays ready

    client.load_model("spare", headers=bearer)
    assert client.is_model_ready("spare")
    np.testing.assert_array_equal(client.infer("spare", [fp32_input(x)]).as_numpy("y"), x)

    with pytest.raises(InferenceServerException) as e:
        client.load_model("not-in-repo", headers=bearer)
    assert status_of(e) == "400" and "not-in-repo" in e.value.message()
    # A config override would serve what no manifest vouches for: refused, not silently ignored.
    with pytest.raises(InferenceServerException) as e:
        client.load_model("spare", headers=bearer, config='{"max_batch_size": 1}')
    assert status_of(e) == "400" and "config" in e.value.message()
    r = request(server.port, "POST", "/v2/repository/models/spare/load", b"not json",
                {"Authorization": f"Bearer {TOKEN}"})
    assert r.status == 400 and "JSON" in r.json()["error"]
    assert client.is_model_ready("spare")


# ---------------------------------------------------------------------------------------------
# Client errors: the right status, a message naming what was wrong, and the server goes on


def _raw_input(name, datatype, shape, data: bytes):
    """An InferInput whose binary data is whatever the test says (tritonclient checks sizes itself)."""
    i = httpclient.InferInput(name, shape, datatype)
    i._raw_data = data
    i._parameters["binary_data_size"] = len(data)
    return i


@pytest.mark.parametrize("model, version, inputs, status, words", [
    ("nope", "", [_raw_input("input", "FP32", [1, 1, 8, 8], b"\0" * 256)], "404", ["nope", "digits"]),
    ("digits", "2", [_raw_input("input", "FP32", [1, 1, 8, 8], b"\0" * 256)], "404", ["version 2"]),
    ("digits", "0", [_raw_input("input", "FP32", [1, 1, 8, 8], b"\0" * 256)], "400", ["version", "'0'"]),
    ("digits", "x", [_raw_input("input", "FP32", [1, 1, 8, 8], b"\0" * 256)], "400", ["version", "'x'"]),
    ("digits", "", [_raw_input("input", "FP32", [1, 8, 8], b"\0" * 256)], "400", ["'input'", "dimensions"]),
    ("digits", "", [_raw_input("input", "FP32", [1, 1, 8, 9], b"\0" * 288)], "400", ["'input'", "[1, 1, 8, 9]"]),
    ("digits", "", [_raw_input("input", "FP64", [1, 1, 8, 8], b"\0" * 512)], "400", ["'input'", "FP64", "FP32"]),
    ("digits", "", [_raw_input("input", "FP32", [1, 1, 8, 8], b"\0" * 255)], "400", ["'input'", "255 bytes", "256"]),
    ("digits", "", [_raw_input("input", "FP32", [65, 1, 8, 8], b"\0" * 65 * 256)], "400", ["'input'", "batch size 65"]),
    ("digits", "", [_raw_input("pixels", "FP32", [1, 1, 8, 8], b"\0" * 256)], "400", ["'pixels'", "unknown input"]),
])
def test_bad_requests(server, client, samples, model, version, inputs, status, words):
    with pytest.raises(InferenceServerException) as e:
        client.infer(model, inputs, model_version=version)
    assert status_of(e) == status, e.value
    assert all(w in e.value.message() for w in words), e.value.message()
    assert_serving(server, samples)


def test_json_input_errors_name_the_input(client):
    i = httpclient.InferInput("input", [1, 1, 8, 8], "FP32")
    i.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32), binary_data=False)
    i._data = i._data[:-1]  # 63 values for 64
    with pytest.raises(InferenceServerException) as e:
        client.infer("digits", [i])
    assert status_of(e) == "400" and "'input'" in e.value.message() and "63" in e.value.message()


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_refused_requests_are_counted_in_metrics_and_statistics(server, client):
    def scrape():
        r = request(server.port, "GET", "/metrics")
        assert r.status == 200
        return r.body.decode()

    def failures():
        return client.get_inference_statistics("seq", "1")["model_stats"][0]["inference_stats"]["fail"]["count"]

    before, fail_before = scrape(), failures()
    bad_shape = [_raw_input("x", "FP32", [1, 3], b"\0" * 8)]
    for _ in range(3):
        with pytest.raises(InferenceServerException):
            client.infer("seq", bad_shape)
    r = request(server.port, "POST", "/v2/models/seq/infer", b"{not json")
    assert r.status == 400
    r = request(server.port, "POST", "/v2/models/seq/versions/1/infer", b"{}")
    assert r.status == 400
    # Not counted: no such model or version to count them against (and no label per made-up name).
    assert request(server.port, "POST", "/v2/models/made-up/infer", b"{}").status == 404
    assert request(server.port, "POST", "/v2/models/seq/versions/9/infer", b"{}").status == 400
    after = scrape()
    lab = {"model": "seq", "version": "1"}
    assert _metric(after, "serve_kit_requests_total", **lab, status="400") \
        - _metric(before, "serve_kit_requests_total", **lab, status="400") == 5
    assert _metric(after, "serve_kit_request_failures_total", **lab, status="400") \
        - _metric(before, "serve_kit_request_failures_total", **lab, status="400") == 5
    assert "made-up" not in after and 'version="9"' not in after
    assert failures() - fail_before == 5


# ---------------------------------------------------------------------------------------------
# HTTP itself: limits, malformed input, pipelining, keep-alive, methods


def test_body_over_the_limit_is_413_and_answered(server, samples):
    big = b'{"inputs": [' + b" " * (3 * MAX_BODY) + b"]}"
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=T)
    t0 = time.monotonic()
    c.request("POST", "/v2/models/digits/infer", body=big, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    body = r.read()
    assert r.status == 413, body
    assert str(MAX_BODY) in json.loads(body)["error"] and r.getheader("Connection") == "close"
    assert time.monotonic() - t0 < 10
    c.close()

    # Without Content-Length (chunked): the limit is enforced as the body streams in.
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=T)
    c.request("POST", "/v2/models/digits/infer", body=iter([b"x" * 65536] * 8), encode_chunked=True)
    r = c.getresponse()
    assert r.status == 413 and "error" in json.loads(r.read())
    c.close()
    assert_serving(server, samples)


def test_expect_100_continue(server, samples):
    x, ref = samples
    body, headers = protocol.encode_infer_request({"input": x}, binary=True)
    with RawConnection(server.port) as c:
        head = request_bytes("POST", "/v2/models/digits/infer", b"", {**headers, "Expect": "100-continue",
                                                                       "Content-Length": str(len(body))})
        c.send(head.replace(b"Content-Length: 0\r\n", b""))
        interim = c.read_response()
        assert interim.status == 100
        c.send(body)
        r = c.read_response()
        assert r.status == 200 and "inference-header-content-length" not in r.headers  # JSON output
        got = protocol.decode_infer_response(r.body, None)
        np.testing.assert_allclose(got.outputs["logits"], ref, rtol=1e-4, atol=1e-4)
    # Over the limit: the final answer comes at once and the body is never sent.
    with RawConnection(server.port) as c:
        c.send(f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * MAX_BODY}\r\n"
               "Expect: 100-continue\r\n\r\n".encode())
        r = c.read_response()
        assert r.status == 413 and c.closed_by_peer()


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET /v2 HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"POST /v2/models/digits/infer HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    b"POST /v2/models/digits/infer HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    b"GET /v2 HTTP/9.9\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40)),  # a TLS ClientHello
])
def test_malformed_http_is_400(server, samples, raw):
    with RawConnection(server.port) as c:
        c.send(raw)
        r = c.read_response()
        assert r.status == 400 and "malformed" in r.json()["error"], r
        assert r.headers["connection"] == "close" and c.closed_by_peer()
    assert_serving(server, samples)


def test_pipelined_requests_are_answered_in_order(server, samples):
    x, ref = samples
    body, headers = protocol.encode_infer_request({"input": x}, binary=True, binary_output=True)
    with RawConnection(server.port) as c:
        # An inference (slowest), then quick ones, in one write: the answers keep the request order.
        c.send(request_bytes("POST", "/v2/models/digits/infer", body, headers)
               + request_bytes("GET", "/v2/health/ready") + request_bytes("GET", "/v2/models/nope")
               + request_bytes("GET", "/v2"))
        first = c.read_response()
        assert first.status == 200
        got = protocol.decode_infer_response(first.body, int(first.headers["inference-header-content-length"]))
        np.testing.assert_allclose(got.outputs["logits"], ref, rtol=1e-4, atol=1e-4)
        assert c.read_response().status == 200
        assert c.read_response().status == 404
        last = c.read_response()
        assert last.status == 200 and last.json()["name"] == "serve-kit"
        # Still open for more (keep-alive).
        c.send(request_bytes("GET", "/v2/health/live"))
        assert c.read_response().status == 200


def test_pipelined_requests_before_malformed_input_still_get_their_answers(server):
    with RawConnection(server.port) as c:
        c.send(request_bytes("GET", "/v2/health/live") + request_bytes("GET", "/v2/models/nope")
               + b"NOT HTTP AT ALL\r\n\r\n")
        assert c.read_response().status == 200
        assert c.read_response().status == 404
        bad = c.read_response()
        assert bad.status == 400 and bad.headers["connection"] == "close"
        assert c.closed_by_peer()


def test_a_client_pipelining_without_reading_is_paused_not_buffered_without_bound(server):
    # Far more pipelined requests than the server keeps answers for (MAX_PIPELINED): it stops
    # reading, the client's writes block on TCP flow control, and once the client reads, every
    # request is answered, in order.
    from serve_kit.runtime.http import MAX_PIPELINED

    n = MAX_PIPELINED * 100  # ~600 KB of requests: more than the socket buffers hold
    paths = [f"/v2/models/nope{i}" if i % 3 == 0 else "/v2/health/live" for i in range(n)]
    with RawConnection(server.port) as c:
        sender = threading.Thread(target=lambda: c.send(b"".join(request_bytes("GET", p) for p in paths)),
                                  daemon=True)
        sender.start()
        statuses = [c.read_response().status for _ in range(n)]
        sender.join(T)
        assert not sender.is_alive()
    assert statuses == [404 if i % 3 == 0 else 200 for i in range(n)]


def test_slow_and_idle_connections_are_closed(repo):
    srv = InProcessServer(repo, read_timeout=0.5, keep_alive_timeout=1.0).start()
    try:
        with RawConnection(srv.port) as slow:
            slow.send(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # the head never ends
            t0 = time.monotonic()
            r = slow.read_response()
            assert r.status == 408 and "not received within 0.5 s" in r.json()["error"], r
            assert time.monotonic() - t0 < 5 and slow.closed_by_peer()
        with RawConnection(srv.port) as idle:
            idle.send(request_bytes("GET", "/v2/health/live"))
            assert idle.read_response().status == 200
            assert idle.closed_by_peer(timeout=5)  # idle past 1 s: closed by the server
        with RawConnection(srv.port) as busy:  # a connection in use is not idle
            for _ in range(4):
                busy.send(request_bytes("GET", "/v2/health/live"))
                assert busy.read_response().status == 200
                time.sleep(0.4)
    finally:
        srv.stop()


def test_keep_alive_reuses_one_connection(server, samples):
    x, _ = samples
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=T)
    c.connect()
    sock = c.sock
    local = sock.getsockname()
    body, headers = protocol.encode_infer_request({"input": x[:1]}, binary=True)
    for i in range(5):
        c.request("POST", "/v2/models/digits/infer", body=body, headers=headers)
        r = c.getresponse()
        r.read()
        assert r.status == 200 and r.getheader("Connection") == "keep-alive"
        c.request("GET", "/v2/models/nope")
        r = c.getresponse()
        r.read()
        assert r.status == 404  # an error answer keeps the connection too
    assert c.sock is sock and c.sock.getsockname() == local
    c.close()
    # HTTP/1.0 without keep-alive: answered, then closed.
    with RawConnection(server.port) as raw:
        raw.send(b"GET /v2/health/live HTTP/1.0\r\n\r\n")
        r = raw.read_response()
        assert r.status == 200 and r.headers["connection"] == "close" and raw.closed_by_peer()


def test_unbatched_answers_larger_than_the_socket_buffers_arrive_whole_and_in_order(server):
    # `unbatched` runs each request alone, so its answers are written with os.write when nothing is
    # queued on the transport. Pipelined answers of 192 KB each to a client that does not read at
    # first fill the socket buffers: the rest of an answer, and the answers after it, go through
    # the transport. Every byte must still arrive, in order.
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((12, WIDE), dtype=np.float32) for _ in range(6)]
    reqs = []
    for x in xs:
        body, headers = protocol.encode_infer_request({"x": x}, binary=True, binary_output=True)
        reqs.append(request_bytes("POST", "/v2/models/unbatched/infer", body, headers))
    with RawConnection(server.port) as c:
        sender = threading.Thread(target=lambda: c.send(b"".join(reqs)), daemon=True)
        sender.start()
        time.sleep(0.5)  # the answers pile up in the socket buffers and the transport
        for x in xs:
            r = c.read_response()
            assert r.status == 200, r.body[:200]
            got = protocol.decode_infer_response(r.body, int(r.headers["inference-header-content-length"]))
            np.testing.assert_array_equal(got.outputs["y"], x)
        sender.join(T)
        assert not sender.is_alive()


class _RecordingTransport:
    """What _Connection._write hands to the transport, and how much the transport holds."""

    def __init__(self, buffered: int = 0):
        self.buffered, self.written = buffered, []

    def get_write_buffer_size(self) -> int:
        return self.buffered + sum(len(d) for d in self.written)

    def write(self, data) -> None:
        self.written.append(bytes(data))


def _drain(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def test_write_sends_what_fits_and_leaves_the_rest_and_errors_to_the_transport():
    from serve_kit.runtime.http import _Connection

    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        conn = _Connection.__new__(_Connection)
        conn._fd = a.fileno()
        data = np.random.default_rng(1).bytes(4 << 20)  # more than a socket pair buffers
        t = _RecordingTransport()
        conn._write(t, data)
        assert len(t.written) == 1 and 0 < len(t.written[0]) < len(data)  # a partial send
        assert _drain(b) + t.written[0] == data
        # Something queued on the transport: everything goes behind it, nothing around it.
        t = _RecordingTransport(buffered=10)
        conn._write(t, b"after")
        assert t.written == [b"after"] and _drain(b) == b""
        # All of it fits: nothing for the transport.
        t = _RecordingTransport()
        conn._write(t, b"small answer")
        assert t.written == [] and _drain(b) == b"small answer"
        # The peer is gone: the transport gets the data, meets the error and closes its way.
        b.close()
        t = _RecordingTransport()
        conn._write(t, b"to nobody")
        assert t.written == [b"to nobody"]


def test_unknown_endpoints_and_wrong_methods(server):
    for method, path in [("GET", "/"), ("GET", "/v1/models/digits"), ("GET", "/v2/models/digits/infer/extra"),
                         ("GET", "/v2/repository/models/digits"), ("GET", "/v2/nonsense")]:
        r = request(server.port, method, path)
        assert r.status == 404 and path.split("?")[0] in r.json()["error"], (method, path, r)
    for method, path, allow in [("GET", "/v2/models/digits/infer", "POST"), ("PUT", "/v2/models/digits", "GET"),
                                ("GET", "/v2/repository/index", "POST"), ("DELETE", "/v2", "GET"),
                                ("POST", "/metrics", "GET"), ("POST", "/v2/models/digits/config", "GET"),
                                ("GET", "/v2/repository/models/digits/load", "POST")]:
        r = request(server.port, method, path)
        assert r.status == 405, (method, path, r)
        assert r.headers["allow"] == allow and "error" in r.json()


def test_truncated_bodies_and_vanishing_clients(server, samples):
    x, _ = samples
    body, headers = protocol.encode_infer_request({"input": x}, binary=True)
    for cut in (0, 10, len(body) // 2, len(body) - 1):
        with RawConnection(server.port) as c:
            c.send(request_bytes("POST", "/v2/models/digits/infer", body, headers)[:-(len(body) - cut) or None])
    # Content-Length larger than what is sent, then a half-close: no answer is owed, nothing breaks.
    with RawConnection(server.port) as c:
        c.send(b"POST /v2/models/digits/infer HTTP/1.1\r\nContent-Length: 100000\r\n\r\n{\"inputs\"")
        c.sock.shutdown(socket.SHUT_WR)
        assert c.closed_by_peer()
    # A client that sends a full request and leaves before the answer.
    for _ in range(5):
        with RawConnection(server.port) as c:
            c.send(request_bytes("POST", "/v2/models/digits/infer", body, headers))
    # Clients that stall half-way (in the head, in the body) hold only their own connections.
    stalled = [RawConnection(server.port), RawConnection(server.port)]
    try:
        stalled[0].send(b"POST /v2/models/digits/infer HTTP/1.1\r\nContent-Le")
        stalled[1].send(request_bytes("POST", "/v2/models/digits/infer", body, headers)[:-100])
        assert_serving(server, samples)
        assert request(server.port, "GET", "/v2/health/ready").status == 200
    finally:
        for c in stalled:
            c.close()


# ---------------------------------------------------------------------------------------------
# Random hostile bodies over a real socket: always a 4xx with a JSON error, never a 5xx


class _Prober:
    """A keep-alive connection that reconnects when the server closed it."""

    def __init__(self, port: int):
        self.port = port
        self.conn: RawConnection | None = None

    def post(self, path: str, body: bytes, headers: dict[str, str]):
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = RawConnection(self.port, timeout=T)
            try:
                self.conn.send(request_bytes("POST", path, body, headers))
                r = self.conn.read_response()
            except (ConnectionError, BrokenPipeError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
                continue
            if r.headers.get("connection") == "close":
                self.conn.close()
                self.conn = None
            return r


@pytest.fixture(scope="module")
def prober(server):
    p = _Prober(server.port)
    yield p
    if p.conn is not None:
        p.conn.close()


def _check_error(r) -> None:
    assert 400 <= r.status < 500, r
    err = r.json()["error"]
    assert isinstance(err, str) and err


header_lengths = st.one_of(st.none(), st.integers(-3, 3000).map(str), st.text(max_size=6).filter(
    lambda s: "\r" not in s and "\n" not in s and s.isprintable() and s.isascii()))


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=1500), header_length=header_lengths)
def test_random_bytes_are_4xx(server, prober, body, header_length):
    headers = {} if header_length is None else {"Inference-Header-Content-Length": header_length}
    _check_error(prober.post("/v2/models/digits/infer", body, headers))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


@st.composite
def hostile_requests(draw):
    """A valid request for digits, then damaged: fields replaced, shapes and sizes changed, binary
    data cut or padded, header length off."""
    rows = draw(st.integers(1, 3))
    binary = draw(st.booleans())
    x = np.zeros((rows, 1, 8, 8), np.float32)
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 1, 8, 8]}]}
    entry = doc["inputs"][0]
    tail = b""
    if binary:
        tail = x.tobytes()
        entry["parameters"] = {"binary_data_size": len(tail)}
    else:
        entry["data"] = x.ravel().tolist()
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["name", "datatype", "shape", "data", "size", "params", "outputs",
                                     "top", "tail", "drop"]))
        if kind == "name":
            entry["name"] = draw(st.one_of(json_values, st.just("input ")))
        elif kind == "datatype":
            entry["datatype"] = draw(st.one_of(st.sampled_from(sorted(protocol.DATATYPES)), json_values))
        elif kind == "shape":
            entry["shape"] = draw(st.one_of(st.lists(st.integers(-2, 2**64), max_size=6), json_values))
        elif kind == "data":
            entry["data"] = draw(st.one_of(json_values, st.lists(st.floats(width=32), max_size=200)))
        elif kind == "size":
            entry.setdefault("parameters", {})["binary_data_size"] = draw(st.one_of(st.integers(-5, 2**40),
                                                                                     json_values))
        elif kind == "params":
            doc["parameters"] = draw(st.dictionaries(st.sampled_from(["priority", "timeout", "binary_data_output",
                                                                      "other"]), json_values, max_size=3))
        elif kind == "outputs":
            doc["outputs"] = draw(st.one_of(json_values, st.lists(st.fixed_dictionaries(
                {"name": st.sampled_from(["logits", "nope"])}, optional={"parameters": json_values}), max_size=3)))
        elif kind == "top":
            doc[draw(st.sampled_from(["inputs", "id"]))] = draw(json_values)
        elif kind == "tail":
            tail = draw(st.one_of(st.binary(max_size=600), st.just(tail[:-1]), st.just(tail + b"\0")))
        else:
            entry.pop(draw(st.sampled_from(["name", "datatype", "shape", "data", "parameters"])), None)
    header = json.dumps(doc, allow_nan=True).encode()
    headers = {}
    if binary or tail:
        hl = len(header) + draw(st.sampled_from([0, 0, 0, -1, 1, 10**6]))
        headers["Inference-Header-Content-Length"] = str(hl)
    return header + tail, headers


@settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(req=hostile_requests())
def test_damaged_requests_are_never_5xx(server, prober, req):
    body, headers = req
    r = prober.post("/v2/models/digits/infer", body, headers)
    if r.status == 200:  # a damage that left a valid request (e.g. an extra unknown parameter)
        hl = r.headers.get("inference-header-content-length")
        out = protocol.decode_infer_response(r.body, int(hl) if hl else None)
        assert out.outputs["logits"].shape[1:] == (10,)
    else:
        _check_error(r)


def test_server_is_fine_after_the_random_bodies(server, samples, client):
    assert client.is_server_ready()
    assert_serving(server, samples)


# ---------------------------------------------------------------------------------------------
# `serve-kit serve` itself: the ready line, --max-body-mb, a port in use, SIGTERM


def test_serve_command(repo, samples, tmp_path):
    x, ref = samples
    proc = start_cli([str(repo), "--model", "digits", "--http-port", "0", "--no-grpc", "--max-body-mb", "0.0625",
                      "--exit-timeout", "5"])
    try:
        info = wait_ready(proc)
        port = port_of(info)
        assert info["grpc_port"] is None and info["http"] == f"http://127.0.0.1:{port}"
        assert [(m["name"], m.get("version"), m["state"]) for m in info["models"]] == \
            [("digits", "1", "READY"), ("seq", None, "UNAVAILABLE"), ("spare", None, "UNAVAILABLE"),
             ("unbatched", None, "UNAVAILABLE")]
        assert {m["name"]: m.get("reason") for m in info["models"]}["seq"] == "not loaded"
        c = httpclient.InferenceServerClient(f"127.0.0.1:{port}", connection_timeout=T, network_timeout=T)
        np.testing.assert_allclose(c.infer("digits", [digits_input(x, True)]).as_numpy("logits"), ref,
                                   rtol=1e-4, atol=1e-4)
        c.close()
        limit = 64 * 1024
        r = request(port, "POST", "/v2/models/digits/infer", b" " * (limit + 1))
        assert r.status == 413 and str(limit) in r.json()["error"]
        assert request(port, "POST", "/v2/models/digits/infer", b" " * limit).status == 400  # at the limit: read

        # A second server on the same port: one red line and exit 1, no traceback.
        busy = start_cli([str(repo), "--model", "digits", "--http-port", str(port), "--no-grpc"])
        out, err = busy.communicate(timeout=60)
        assert busy.returncode == 1, err
        assert "cannot start the server" in err and "--http-port" in err and "Traceback" not in err
        assert json.loads(out)["error"] == "ServeKitError"

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "stopped" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_serve_command_human_ready_line(repo, tmp_path):
    """Without --json: one ready line naming what is served, even when the repository holds
    models that were not asked for (--model) or that fail to load."""
    broken = tmp_path / "repo"
    shutil.copytree(repo, broken)
    (broken / "broken").mkdir()
    (broken / "broken" / "config.yaml").write_text("name: broken\n")
    proc = start_cli([str(broken), "--model", "spare", "--model", "broken", "--http-port", "0", "--no-grpc"],
                     json_output=False)
    try:
        line = read_line(proc)
        assert re.fullmatch(r"ready: HTTP http://127\.0\.0\.1:\d+; models: spare/1; not serving: broken \(.*\n", line,
                            re.S), line
        port = int(re.search(r":(\d+);", line).group(1))
        assert request(port, "GET", "/v2/health/ready").status == 503  # a model failed: not ready
        assert request(port, "GET", "/v2/models/spare/ready").status == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# ---------------------------------------------------------------------------------------------
# perf_analyzer (tritonclient 2.51.0's binary) over HTTP, binary tensors


def test_perf_analyzer_over_http(server, client, tmp_path):
    exe, env = perf_analyzer_env()
    before = client.get_inference_statistics("digits", "1")["model_stats"][0]["inference_count"]
    run_perf_analyzer(exe, env, ["-m", "digits", "-i", "http", "-u", server.url, "-b", "4", "--concurrency-range", "2",
                                 "--request-count", "300", "--input-tensor-format", "binary",
                                 "--output-tensor-format", "binary"], tmp_path / "perf.csv")
    after = client.get_inference_statistics("digits", "1")["model_stats"][0]["inference_count"]
    assert after - before >= 4 * 300  # it really ran its requests of batch 4 through this server
