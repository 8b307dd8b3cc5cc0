"""Shared pieces of the hostile-input suite (see conftest.py for what every test asserts)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RUNTIME_TESTS = Path(__file__).resolve().parents[1] / "runtime"
if str(RUNTIME_TESTS) not in sys.path:
    sys.path.insert(0, str(RUNTIME_TESTS))

from rt_models import _finish, mlp_reference, mlp_weights  # noqa: E402
from rt_server import port_of, start_cli, wait_ready  # noqa: E402

STALL_BOUND_S = 5.0
"""No answer to the well-behaved client may take longer than this while a test attacks."""
P99_BOUND_S = 2.0
RSS_GROWTH_BOUND = 400 * 1024 * 1024
"""The server's RSS may grow by at most this much over the whole suite (bodies are bounded)."""

MLP = mlp_weights(4, 8, 3, seed=7)
GATHER_ROWS = 5


def gather_onnx() -> bytes:
    """y[b] = T[idx[b]]: fails at run time (in ONNX Runtime) on an index out of range."""
    from onnx import TensorProto, helper, numpy_helper

    table = np.arange(GATHER_ROWS * 3, dtype=np.float32).reshape(GATHER_ROWS, 3)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)], "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, 3])],
        initializer=[numpy_helper.from_array(table, "table")])
    return _finish(graph)


@dataclass
class Server:
    proc: object
    http_port: int
    grpc_port: int
    baseline_rss: int = 0
    log: list = field(default_factory=list)

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0


def serve_once(repo: Path, *extra: str) -> Server:
    """`serve-kit serve REPO` as a subprocess on free ports (stop it with `stop_server`)."""
    proc = start_cli([str(repo), "--http-port", "0", "--grpc-port", "0", "--read-timeout", "5", *extra])
    info = wait_ready(proc)
    server = Server(proc, port_of(info), int(info["grpc_port"]))
    # stderr is drained on a thread so that a chatty server (tracebacks are the bug we look for)
    # never blocks on a full pipe; tests look at it with `server.log`.
    threading.Thread(target=lambda: server.log.extend(proc.stderr), daemon=True).start()
    return server


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(30)
        except Exception:  # noqa: BLE001 - a server that does not exit is killed, and the test says so
            server.proc.kill()
            server.proc.wait(10)
            raise AssertionError("serve-kit serve did not exit on SIGTERM")


def infer_body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}]}).encode()


def post(port: int, path: str, body: bytes, timeout: float = 30) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def assert_correct_mlp(status: int, data: bytes, x: np.ndarray) -> None:
    assert status == 200, data[:500]
    out = json.loads(data)["outputs"][0]
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(out["shape"]),
                               mlp_reference(x, *MLP), rtol=1e-5, atol=1e-5)


def assert_alive(server: Server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    conn.request("GET", "/v2/health/ready")
    r = conn.getresponse()
    r.read()
    conn.close()
    assert r.status == 200
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert_correct_mlp(*post(server.http_port, "/v2/models/mlp/infer", infer_body(x)), x)


class GoodClient:
    """A well-behaved client on a keep-alive connection: valid requests back to back (a short pause
    between them), every answer checked against the reference; latencies and failures recorded."""

    def __init__(self, port: int):
        self.port = port
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="good-client", daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(0)
        conn = None
        while not self._stop.is_set():
            x = rng.standard_normal((1, 4)).astype(np.float32)
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=STALL_BOUND_S * 4)
                conn.request("POST", "/v2/models/mlp/infer", body=infer_body(x))
                r = conn.getresponse()
                data = r.read()
                self.latencies.append(time.monotonic() - t0)
                assert_correct_mlp(r.status, data, x)
            except Exception as e:  # noqa: BLE001 - recorded, asserted at the end
                self.failures.append(f"{type(e).__name__}: {e}"[:300])
                if conn is not None:
                    conn.close()
                conn = None
            self._stop.wait(0.01)
        if conn is not None:
            conn.close()

    def __enter__(self) -> "GoodClient":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(STALL_BOUND_S * 5)

    def check(self) -> None:
        assert not self.failures, self.failures[:5]
        assert self.latencies, "the well-behaved client got no answer at all"
        lat = sorted(self.latencies)
        p99 = lat[int(0.99 * (len(lat) - 1))]
        assert lat[-1] < STALL_BOUND_S and p99 < P99_BOUND_S, \
            f"well-behaved client stalled: max {lat[-1]:.2f} s, p99 {p99:.2f} s over {len(lat)} requests"


def assert_unharmed(server: Server) -> None:
    assert server.proc.poll() is None, "the server exited"
    assert_alive(server)
    grown = server.rss() - server.baseline_rss
    assert grown < RSS_GROWTH_BOUND, f"server RSS grew by {grown / 2**20:.0f} MiB"


HYPOTHESIS_CASES = int(os.environ.get("SK_HOSTILE_CASES", "150"))
"""Cases per property test (bounded: the whole suite must stay under 3 minutes on 2 cores)."""


def exchange(port: int, data: bytes, *, half_close: bool = False, timeout: float = 20) -> bytes:
    """Send `data` (then FIN when `half_close`) and read until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused early and closed: what it answered is still readable
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            except socket.timeout:
                raise AssertionError(f"no answer and no close within {timeout} s; got {out[:200]!r}")
            if not chunk:
                break
            out += chunk
    return out
