"""The runtime under faults: overload, SIGTERM under load, backends that raise or hang, reloads
under load (and of a corrupted version), hostile binary tensors. Real servers on 127.0.0.1 only
(in-process, or `serve-kit serve` as a subprocess), real HTTP clients on threads; each test is
bounded in time and in requests.

Test-only backends (rt_models.ProbeBackend) sleep, raise or hang on purpose; they are real Backend
classes run by the real scheduler.
"""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from rt_models import ProbeBackend, config, mlp_onnx, mlp_reference, mlp_weights, probe_config, seq_onnx, \
    write_probe, write_version
from rt_server import InProcessServer, RawConnection, port_of, request, request_bytes, start_cli, wait_ready

from serve_kit.runtime import protocol

TOKEN = "faults-token"
T = 20.0


def _body(x: np.ndarray, **params) -> bytes:
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    if params:
        doc["parameters"] = params
    return json.dumps(doc).encode()


def _metric(port: int, name: str, **labels) -> float:
    text = request(port, "GET", "/metrics").body.decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class _Client:
    """A keep-alive http.client connection that reconnects after the server closed it."""

    def __init__(self, port: int, timeout: float = T):
        self.port, self.timeout = port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: bytes, headers: dict | None = None) -> tuple[int, bytes, dict]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            self.conn.request("POST", path, body=body, headers=headers or {})
            r = self.conn.getresponse()
            data = r.read()
        except BaseException:
            self.conn.close()
            self.conn = None
            raise
        if r.getheader("Connection", "").lower() == "close":
            self.conn.close()
            self.conn = None
        return r.status, data, {k.lower(): v for k, v in r.getheaders()}

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


# ---------------------------------------------------------------------------------------------
# One in-process server for the in-process fault tests


MLP = mlp_weights(4, 8, 3, seed=1)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults-repo")
    # 1 instance, 50 ms a request, no batching (max_batch_size 1): 20 requests/s, at most 4 waiting.
    write_probe(root, probe_config("slow", max_batch_size=1, dynamic_batching={
        "max_queue_delay_microseconds": 0, "max_queue_size": 4}), delay_s=0.05)
    # Each request alone (no dynamic batching), so a failing one fails only itself.
    write_probe(root, probe_config("raiser", max_batch_size=4), fail_value=-1)
    write_probe(root, probe_config("hanger", max_batch_size=4, dynamic_batching={
        "max_queue_delay_microseconds": 0, "max_queue_size": 8}), hang_value=-2)
    mlp_cfg = config("mlp", 4, 3, max_batch_size=8, dynamic_batching={"max_queue_delay_microseconds": 500})
    write_version(root, mlp_cfg, mlp_onnx(*MLP))
    write_version(root, config("reload", 4, 3, max_batch_size=8,
                               dynamic_batching={"max_queue_delay_microseconds": 500}), mlp_onnx(*MLP))
    seq_cfg = config("seq", max_batch_size=8, inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
                     outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, -1]},
                              {"name": "s", "datatype": "FP32", "shape": [-1, 1]}])
    write_version(root, seq_cfg, seq_onnx())
    return root


@pytest.fixture(scope="module")
def server(repo):
    s = InProcessServer(repo, management_token=TOKEN, exit_timeout=5).start()
    yield s
    ProbeBackend.release.set()
    assert s.stop() == 0


def assert_alive(server) -> None:
    assert request(server.port, "GET", "/v2/health/ready").status == 200
    status, body, _ = _Client(server.port).post("/v2/models/mlp/infer", _body(np.ones((1, 4), np.float32)))
    assert status == 200, body


# ---------------------------------------------------------------------------------------------
# Overload at twice the capacity


def test_overload_is_200_or_503_and_accepted_requests_meet_their_deadline(server):
    capacity, rate, duration = 20.0, 40.0, 3.0  # requests/s the model serves, offered, seconds
    timeout_us = 400_000  # request deadline: 4 queued x 50 ms + 50 ms running fits well inside
    body = _body(np.full((1, 4), 3, np.float32), timeout=timeout_us)
    before = {s: _metric(server.port, "serve_kit_requests_total", model="slow", version="1", status=s)
              for s in ("200", "503", "504")}
    local = threading.local()

    def one(at: float):
        time.sleep(max(0.0, at - time.monotonic()))
        client = getattr(local, "client", None) or _Client(server.port, timeout=10)
        local.client = client
        t0 = time.monotonic()
        status, data, _ = client.post("/v2/models/slow/infer", body)
        return status, time.monotonic() - t0, data

    n = int(rate * duration)
    start = time.monotonic() + 0.05
    with ThreadPoolExecutor(32) as pool:  # open loop: sends on schedule, whatever the answers
        futures = [pool.submit(one, start + i / rate) for i in range(n)]
        results = [f.result(timeout=30) for f in futures]  # every request answered: no hangs
    statuses = [s for s, _, _ in results]
    ok = [lat for s, lat, _ in results if s == 200]
    refused = [json.loads(d) for s, _, d in results if s == 503]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))  # no 500, no 504
    # The model served about its capacity and refused the rest at once.
    assert 0.6 * capacity * duration <= len(ok) <= capacity * (duration + 1), (len(ok), len(refused))
    assert len(refused) >= 0.25 * n
    assert all("queue is full" in r["error"] and "max_queue_size 4" in r["error"] for r in refused)
    # Accepted requests ran before their deadline and finished within it plus one execution
    # (and some slack for a busy machine).
    assert max(ok) < timeout_us / 1e6 + 0.05 + 0.5, max(ok)
    # The server counted exactly what the clients saw.
    for s, count in (("200", len(ok)), ("503", len(refused)), ("504", 0)):
        assert _metric(server.port, "serve_kit_requests_total", model="slow", version="1", status=s) \
            - before[s] == count
    assert_alive(server)


# ---------------------------------------------------------------------------------------------
# Backends that raise or hang


def test_a_raising_backend_fails_only_its_requests(server):
    values = [-1 if i % 3 == 0 else i for i in range(24)]
    before = _metric(server.port, "serve_kit_requests_total", model="raiser", version="1", status="400")

    def one(v):
        return _Client(server.port).post("/v2/models/raiser/infer", _body(np.full((1, 4), v, np.float32)))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, values, timeout=T))
    for v, (status, data, _) in zip(values, results):
        if v == -1:
            # The backend runs other inputs (its warm-up input): the poison is the input's fault.
            assert status == 400 and "poison value" in json.loads(data)["error"], data
        else:
            assert status == 200, data
            out = protocol.decode_infer_response(data, None)
            np.testing.assert_array_equal(out.outputs["y"], np.full((1, 4), 2 * v, np.float32))
    # Requests ran alone: each poisoned call held exactly one request.
    poisoned = [c for c in ProbeBackend.calls if c["first"] and c["first"][0] == -1]
    assert len(poisoned) == values.count(-1) and all(c["rows"] == 1 for c in poisoned)
    assert _metric(server.port, "serve_kit_requests_total", model="raiser", version="1", status="400") \
        - before == values.count(-1)
    assert_alive(server)


def test_a_hung_backend_holds_only_its_own_model(server):
    hung: list = []
    stuck = threading.Thread(target=lambda: hung.append(_Client(server.port, timeout=30).post(
        "/v2/models/hanger/infer", _body(np.full((1, 4), -2, np.float32)))), daemon=True)
    stuck.start()
    try:
        deadline = time.monotonic() + 10
        while not any(c["first"] == [-2.0] for c in ProbeBackend.calls):
            assert time.monotonic() < deadline, "the hanging request never reached the backend"
            time.sleep(0.01)
        t0 = time.monotonic()
        assert request(server.port, "GET", "/v2/health/live").status == 200
        assert request(server.port, "GET", "/v2/health/ready").status == 200
        assert request(server.port, "GET", "/v2/models/hanger").status == 200
        status, data, _ = _Client(server.port).post("/v2/models/raiser/infer", _body(np.ones((1, 4), np.float32)))
        assert status == 200, data
        status, data, _ = _Client(server.port).post("/v2/models/mlp/infer", _body(np.ones((2, 4), np.float32)))
        assert status == 200, data
        # A request queued behind the hung one gets its deadline answer instead of waiting forever.
        status, data, _ = _Client(server.port).post("/v2/models/hanger/infer",
                                                    _body(np.ones((1, 4), np.float32), timeout=200_000))
        assert status == 504 and "timed out" in json.loads(data)["error"], data
        assert time.monotonic() - t0 < 5
        assert not hung  # still stuck
    finally:
        ProbeBackend.release.set()
    stuck.join(T)
    assert hung and hung[0][0] == 200
    assert_alive(server)


# ---------------------------------------------------------------------------------------------
# Reloads under load


def test_reload_under_load_loses_nothing_and_a_corrupted_version_is_refused(server, repo):
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    stop = threading.Event()
    results: list = []  # (status, model_version or error text)
    lock = threading.Lock()

    def client(seed: int):
        rng = np.random.default_rng(seed)
        c = _Client(server.port)
        while not stop.is_set():
            x = rng.standard_normal((int(rng.integers(1, 4)), 4)).astype(np.float32)
            try:
                status, data, _ = c.post("/v2/models/reload/infer", _body(x))
            except Exception as e:  # noqa: BLE001 - a lost request is a failure to report
                with lock:
                    results.append((None, repr(e)))
                continue
            if status == 200:
                out = protocol.decode_infer_response(data, None)
                good = np.allclose(out.outputs["y"], mlp_reference(x, *MLP), rtol=1e-4, atol=1e-5)
                entry = (200, out.version) if good else (-1, "wrong result")
            else:
                entry = (status, data.decode())
            with lock:
                results.append(entry)
        c.close()

    before = _metric(server.port, "serve_kit_requests_total", model="reload", version="1", status="200")
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    try:
        loader = _Client(server.port)
        time.sleep(0.2)
        for _ in range(6):
            status, data, _ = loader.post("/v2/repository/models/reload/load", b"", bearer)
            assert status == 200, data
            time.sleep(0.05)
        during_reloads = len(results)

        # Version 2 arrives, but its model file was changed after its manifest was written.
        w2 = mlp_weights(4, 8, 3, seed=2)
        assert write_version(repo, config("reload", 4, 3, max_batch_size=8,
                                          dynamic_batching={"max_queue_delay_microseconds": 500}), mlp_onnx(*w2)) == 2
        model_file = repo / "reload" / "2" / "model.onnx"
        data = bytearray(model_file.read_bytes())
        data[-1] ^= 0xFF
        model_file.write_bytes(bytes(data))
        status, body, _ = loader.post("/v2/repository/models/reload/load", b"", bearer)
        assert status == 400, body
        error = json.loads(body)["error"]
        assert "version 2" in error and "verification" in error and "keep serving" in error, error
        time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(T)
    assert during_reloads >= 20, "the clients barely ran while the model reloaded"
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:5]
    assert {v for _, v in results} == {1}  # the corrupted version 2 never served
    # Counters survive the reloads: every answer the clients got is counted once.
    assert _metric(server.port, "serve_kit_requests_total", model="reload", version="1", status="200") \
        - before == len(results)
    index = {(m["name"], m.get("version")): m["state"] for m in json.loads(
        request(server.port, "POST", "/v2/repository/index").body)}
    assert index[("reload", "1")] == "READY" and ("reload", "2") not in index
    assert_alive(server)


# ---------------------------------------------------------------------------------------------
# Hostile binary tensors


def _binary(doc: dict, tail: bytes, header_length: int | str | None = None) -> tuple[bytes, dict]:
    header = json.dumps(doc, allow_nan=True).encode()
    hl = len(header) if header_length is None else header_length
    return header + tail, {"Inference-Header-Content-Length": str(hl), "Content-Type": "application/octet-stream"}


def _input(shape, size, datatype="FP32", name="x") -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}]}


@pytest.mark.parametrize("model, body_headers, words", [
    ("mlp", _binary(_input([2**62, 4], 16), b"\0" * 16), ["'x'", "batch size"]),
    ("mlp", _binary(_input([1, 4], 16), b"\0" * 15), ["'x'", "runs past"]),
    ("mlp", _binary(_input([1, 4], 15), b"\0" * 15), ["'x'", "15 bytes", "16"]),
    ("mlp", _binary(_input([1, 4], 16), b"\0" * 17), ["1 bytes", "not claimed"]),
    ("mlp", _binary(_input([1, 4], 10**12), b"\0" * 16), ["'x'", "runs past"]),
    ("mlp", _binary(_input([1, 4], float("nan")), b"\0" * 16), ["'x'", "binary_data_size"]),
    ("mlp", _binary(_input([float("nan"), 4], 16), b"\0" * 16), ["'x'", "shape"]),
    ("mlp", _binary(_input([1, float("inf")], 16), b"\0" * 16), ["'x'", "shape"]),
    ("mlp", _binary(_input([-1, 4], 16), b"\0" * 16), ["'x'", "non-negative"]),
    ("mlp", _binary(_input([1, 4], 16), b"\0" * 16, header_length=10**9), ["Inference-Header-Content-Length"]),
    ("mlp", _binary(_input([1, 4], 16), b"\0" * 16, header_length=-1), ["Inference-Header-Content-Length"]),
    ("mlp", _binary(_input([1, 4], 16), b"\0" * 16, header_length="1e3"), ["Inference-Header-Content-Length"]),
    ("mlp", _binary(_input([1, 4], 16), b"\0" * 16, header_length=5), ["not valid JSON"]),
    ("mlp", _binary(_input([1, 4], 32, "FP64"), b"\0" * 32), ["'x'", "FP64"]),
    ("seq", _binary(_input([1, 2**40], 16), b"\0" * 16), ["'x'", "limit"]),
    ("seq", _binary(_input([8, 2**62], 0), b""), ["'x'", "limit"]),
    ("seq", _binary(_input([1, 0, 2**62], 0), b""), ["'x'", "dimensions"]),
])
def test_hostile_binary_tensors_are_400(server, model, body_headers, words):
    body, headers = body_headers
    status, data, _ = _Client(server.port).post(f"/v2/models/{model}/infer", body, headers)
    assert status == 400, data
    error = json.loads(data)["error"]
    assert all(w in error for w in words), error
    assert_alive(server)


def test_nan_and_inf_are_values_not_errors(server):
    """NaN and Infinity are legal FP32 tensor values (Triton's view too): they run, and come back
    as such in binary and in JSON (the NaN/Infinity tokens Python clients read)."""
    x = np.array([[np.nan, 1, 2, 3], [1, 2, 3, 4], [np.inf, 0, 0, 0]], np.float32)
    body, headers = protocol.encode_infer_request({"x": x}, binary=True, binary_output=True)
    status, data, h = _Client(server.port).post("/v2/models/mlp/infer", body, headers)
    assert status == 200, data
    y = protocol.decode_infer_response(data, int(h["inference-header-content-length"])).outputs["y"]
    assert np.isnan(y[0]).all() and np.isfinite(y[1]).all()
    np.testing.assert_allclose(y[1], mlp_reference(x[1:2], *MLP)[0], rtol=1e-5, atol=1e-6)
    body, headers = protocol.encode_infer_request({"x": x}, binary=True, binary_output=False)
    status, data, _ = _Client(server.port).post("/v2/models/mlp/infer", body, headers)
    assert status == 200 and b"NaN" in data
    y_json = np.array(json.loads(data)["outputs"][0]["data"], np.float32).reshape(3, 3)
    np.testing.assert_array_equal(np.isnan(y_json), np.isnan(y))
    # A string is not a number, not even "NaN".
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, "NaN"]}]}
    status, data, _ = _Client(server.port).post("/v2/models/mlp/infer", json.dumps(doc).encode())
    assert status == 400 and "'x'" in json.loads(data)["error"]


def test_hostile_bodies_at_full_pipeline_depth(server):
    """Many bad requests pipelined on one connection: each answered, in order, with its own 400."""
    bad = [_binary(_input([1, 4], n), b"\0" * n) for n in range(0, 16)]
    with RawConnection(server.port) as c:
        c.send(b"".join(request_bytes("POST", "/v2/models/mlp/infer", b, h) for b, h in bad)
               + request_bytes("GET", "/v2/health/ready"))
        for n in range(16):
            r = c.read_response()
            assert r.status == 400 and f"{n} bytes" in r.json()["error"], (n, r)
        assert c.read_response().status == 200


# ---------------------------------------------------------------------------------------------
# SIGTERM under load: `serve-kit serve` as a subprocess


def test_sigterm_under_load(tmp_path):
    repo = tmp_path / "repo"
    delay = 0.4
    write_probe(repo, probe_config("batchy", max_batch_size=8, dynamic_batching={
        "max_queue_delay_microseconds": 2000, "max_queue_size": 64}), delay_s=delay)
    exit_timeout = 10.0
    proc = start_cli([str(repo), "--http-port", "0", "--no-grpc", "--exit-timeout", str(exit_timeout)],
                     test_backends=True)
    try:
        port = port_of(wait_ready(proc))
        _sigterm_under_load(proc, port, delay, exit_timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _sigterm_under_load(proc, port: int, delay: float, exit_timeout: float) -> None:
    stop = threading.Event()
    answered = threading.Event()
    records: list[tuple] = []  # (sent, done, status or error name, body)
    lock = threading.Lock()
    body = _body(np.ones((1, 4), np.float32))

    def client():
        c = _Client(port, timeout=exit_timeout + 5)
        while not stop.is_set():
            sent = time.monotonic()
            try:
                status, data, _ = c.post("/v2/models/batchy/infer", body)
                rec = (sent, time.monotonic(), status, data)
            except ConnectionRefusedError:
                with lock:
                    records.append((sent, time.monotonic(), "refused", b""))
                return  # the server stopped listening: this client is done
            except Exception as e:  # noqa: BLE001 - anything else is a lost request
                rec = (sent, time.monotonic(), type(e).__name__, str(e).encode())
            with lock:
                records.append(rec)
            answered.set()

    readiness: list[tuple[float, int | str]] = []
    refused_at: list[float] = []

    def poller():
        c = RawConnection(port, timeout=5)  # opened before SIGTERM: new connections will be refused
        while not stop.is_set():
            c.send(request_bytes("GET", "/v2/health/ready"))
            r = c.read_response()
            readiness.append((time.monotonic(), r.status))
            if r.status == 503:
                try:
                    RawConnection(port, timeout=5).close()
                except ConnectionRefusedError:
                    refused_at.append(time.monotonic())
                return
            time.sleep(0.01)

    clients = [threading.Thread(target=client, daemon=True) for _ in range(6)]
    for t in clients:
        t.start()
    poll = threading.Thread(target=poller, daemon=True)
    poll.start()
    time.sleep(2.5 * delay)  # steady load: a few batches
    answered.clear()
    assert answered.wait(5)  # a batch just finished: the next one has just started
    time.sleep(0.05)
    sig = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=exit_timeout + 5)
    finally:
        stop.set()
    exited = time.monotonic()
    for t in [*clients, poll]:
        t.join(T)
    _, err = proc.communicate(timeout=10)
    assert rc == 0, err
    assert "stopped" in err and "Traceback" not in err, err
    assert exited - sig < exit_timeout, exited - sig

    kinds = {r[2] for r in records}
    assert kinds <= {200, 503, "refused"}, [r for r in records if r[2] not in (200, 503, "refused")][:5]
    before = [r for r in records if r[0] < sig - 0.05]
    assert before and all(r[2] == 200 for r in before)
    in_flight = [r for r in records if r[0] < sig < r[1] and r[2] != "refused"]
    assert len(in_flight) >= 2, records[-10:]  # the test really had requests in flight at SIGTERM
    assert all(r[2] == 200 for r in in_flight), in_flight  # zero lost: each got its answer
    for r in records:
        if r[2] == 503:  # arrived after the signal: refused with a reason, not dropped
            assert r[0] > sig - 0.05 and "shutting down" in json.loads(r[3])["error"]
    assert any(r[2] == "refused" and r[0] > sig for r in records)  # new connections refused

    # Readiness went 503 at once, and new connections were refused, while in-flight requests
    # were still being finished.
    went_503 = next(t for t, s in readiness if s == 503)
    assert all(s == 200 for t, s in readiness if t < sig)
    last_answer = max(r[1] for r in in_flight)
    assert went_503 - sig < 0.5 and went_503 < last_answer, (went_503 - sig, last_answer - sig)
    assert refused_at and refused_at[0] < last_answer
    with pytest.raises(ConnectionRefusedError):
        RawConnection(port, timeout=5)


def test_sigterm_with_a_hung_backend_exits_within_the_exit_timeout(tmp_path):
    """A request stuck in a hung backend cannot finish: at the exit timeout it is answered 503
    (before its connection closes) and the process exits 0, once, not after one timeout per stage."""
    repo = tmp_path / "repo"
    write_probe(repo, probe_config("hanger", max_batch_size=4), hang_value=-2)
    exit_timeout = 2.5
    proc = start_cli([str(repo), "--http-port", "0", "--grpc-port", "0", "--exit-timeout", str(exit_timeout)],
                     test_backends=True)
    try:
        info = wait_ready(proc)
        port = port_of(info)
        assert info["grpc_port"] > 0
        stuck: list = []
        t = threading.Thread(target=lambda: stuck.append(_Client(port, timeout=30).post(
            "/v2/models/hanger/infer", _body(np.full((1, 4), -2, np.float32)))), daemon=True)
        t.start()
        time.sleep(0.3)
        assert not stuck
        sig = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=exit_timeout + 10)
        took = time.monotonic() - sig
        _, err = proc.communicate(timeout=10)
        assert rc == 0 and "Traceback" not in err, err
        # One exit timeout, not one per stage (HTTP, gRPC, schedulers): that took 2 x 2.5 s.
        assert exit_timeout - 0.1 < took < exit_timeout + 1.5, took
        t.join(T)
        status, data, _ = stuck[0]
        assert status == 503 and "did not finish" in json.loads(data)["error"], data
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
