"""The HTTP frontend against hostile clients (issue 13): bounded request heads (414 / 431), read
timeouts per gap and per request, JSON bodies bounded below binary ones, half-closed connections,
upgrades and CONNECT, versions, BYTES that are not text, and a well-behaved client that keeps
getting answers while a hostile one floods the server.

A real server (serve() on a thread, real ONNX Runtime models) and raw sockets; hypothesis drives
the head and version spaces with a bounded number of cases."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rt_models import write_ident_and_text
from rt_server import InProcessServer, RawConnection, request, request_bytes

from serve_kit.runtime import protocol
from serve_kit.runtime.http import (DEFAULT_MAX_HEAD, DEFAULT_MAX_HEADER, DEFAULT_MAX_HEADERS,
                                    DEFAULT_MAX_URL)

T = 20  # seconds: every socket operation is bounded, so a hung server fails a test, not the run
MAX_BODY = 8 * 1024 * 1024
MAX_JSON = 256 * 1024
CASES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("limits-repo")
    write_ident_and_text(root)
    return root


@pytest.fixture(scope="module")
def server(repo):
    s = InProcessServer(repo, max_body_bytes=MAX_BODY, max_json_bytes=MAX_JSON, exit_timeout=5).start()
    yield s
    assert s.stop() == 0


def infer_ok(port: int, timeout: float = T) -> float:
    """One small binary inference on a fresh connection; returns its latency in seconds."""
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    body, headers = protocol.encode_infer_request({"x": x}, binary=True, binary_output=True)
    t0 = time.monotonic()
    r = request(port, "POST", "/v2/models/ident/infer", body, headers, timeout=timeout)
    elapsed = time.monotonic() - t0
    assert r.status == 200, r
    got = protocol.decode_infer_response(r.body, int(r.headers["inference-header-content-length"]))
    np.testing.assert_array_equal(got.outputs["y"], x)
    return elapsed


def answer_to(port: int, raw: bytes, timeout: float = T):
    """Send `raw`, return (the first response, whether the server then closed the connection)."""
    with RawConnection(port, timeout) as c:
        try:
            c.send(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking it all: the answer is still there
        r = c.read_response()
        # Only refusals close the connection: waiting on a kept-alive one would only cost time.
        return r, r.status in (408, 413, 414, 431) and c.closed_by_peer(timeout=5)


# ---------------------------------------------------------------------------------------------
# The request head


@CASES
@given(extra=st.integers(-64, 64))
def test_url_length_is_bounded_at_the_limit(server, extra):
    path = "/v2/models/" + "u" * (DEFAULT_MAX_URL + extra - len("/v2/models/"))
    r, closed = answer_to(server.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    if len(path) > DEFAULT_MAX_URL:
        assert r.status == 414 and "--max-url-kb" in r.json()["error"] and closed, r
    else:
        assert r.status == 404, r  # no such model: the URL itself was taken


@CASES
@given(extra=st.integers(-64, 64))
def test_one_header_line_is_bounded_at_the_limit(server, extra):
    value = "v" * (DEFAULT_MAX_HEADER + extra - len("X-Big"))
    r, closed = answer_to(server.port, f"GET /v2/health/live HTTP/1.1\r\nX-Big: {value}\r\n\r\n".encode())
    if len("X-Big") + len(value) > DEFAULT_MAX_HEADER:
        assert r.status == 431 and "--max-header-kb" in r.json()["error"] and closed, r
    else:
        assert r.status == 200, r


@CASES
@given(count=st.integers(DEFAULT_MAX_HEADERS - 5, DEFAULT_MAX_HEADERS + 5))
def test_header_count_is_bounded_at_the_limit(server, count):
    lines = "".join(f"X-H{i}: {i}\r\n" for i in range(count - 1))
    r, closed = answer_to(server.port, f"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode())
    if count > DEFAULT_MAX_HEADERS:
        assert r.status == 431 and "--max-headers" in r.json()["error"] and closed, r
    else:
        assert r.status == 200, r


@CASES
@given(sizes=st.lists(st.integers(0, 9000), min_size=1, max_size=12), url=st.integers(1, 3000))
def test_any_head_is_answered_by_its_size(server, sizes, url):
    """Heads of every composition (URL, many headers of any size): 200/404 when within every
    limit, 414/431 when over one, never a 5xx or no answer at all."""
    head = f"GET /{'p' * url} HTTP/1.1\r\n" + "".join(f"X-{i}: {'h' * n}\r\n" for i, n in enumerate(sizes)) + "\r\n"
    r, closed = answer_to(server.port, head.encode())
    too_big = len(head) > DEFAULT_MAX_HEAD or max(sizes) + 4 > DEFAULT_MAX_HEADER
    if too_big:
        assert r.status == 431 and closed, r
    else:
        assert r.status == 404, r


def test_a_head_streamed_forever_is_cut_off_after_the_limit(server):
    """A client sending one endless header (or URL) as fast as it can gets 431 (414) once the head
    is over the limit, not after the read timeout; the server reads only a bounded amount."""
    for start, status in ((b"GET /v2/health/live HTTP/1.1\r\nX-Endless: ", 431), (b"GET /", 414)):
        with RawConnection(server.port, T) as c:
            c.send(start)
            sent, t0 = 0, time.monotonic()
            chunk = b"a" * 65536
            try:
                while time.monotonic() - t0 < T:
                    c.sock.sendall(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert time.monotonic() - t0 < T / 2, "the server kept reading an endless head"
            # What the kernel's buffers took before the server stopped reading, and nothing more.
            assert sent < 32 * 1024 * 1024
            try:
                r = c.read_response()
                assert r.status == status, r
            except (ConnectionResetError, ConnectionError):
                pass  # the answer may be lost to a reset: the client sent data the server never read
    infer_ok(server.port)


def test_pipelined_heads_are_still_bounded(server):
    """Requests after the first in one write are bounded too (at most twice the limit)."""
    first = request_bytes("GET", "/v2/health/live")
    endless = b"GET /v2/health/live HTTP/1.1\r\nX-Endless: " + b"b" * (3 * DEFAULT_MAX_HEAD)
    with RawConnection(server.port, T) as c:
        c.send(first + endless)
        assert c.read_response().status == 200
        assert c.read_response().status == 431
        assert c.closed_by_peer()


# ---------------------------------------------------------------------------------------------
# Read timeouts: per gap and per request


def test_read_timeouts_apply_per_gap_and_per_request(repo):
    srv = InProcessServer(repo, read_timeout=3.0, read_idle_timeout=1.0, keep_alive_timeout=30).start()
    try:
        with RawConnection(srv.port, T) as c:  # started, then silent: the idle timeout, not the whole one
            c.send(b"GET /v2/health/live HTTP/1.1\r\n")
            t0 = time.monotonic()
            r = c.read_response()
            assert r.status == 408 and "no part of the request arrived for 1 s" in r.json()["error"], r
            assert time.monotonic() - t0 < 2.9 and c.closed_by_peer()
        with RawConnection(srv.port, T) as c:  # a byte every 0.3 s, forever: the whole-request timeout
            t0 = time.monotonic()
            stop = threading.Event()

            def drip():
                try:
                    c.sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nX-Drip: ")
                    while not stop.is_set():
                        c.sock.sendall(b"d")
                        time.sleep(0.3)
                except OSError:
                    pass

            dripper = threading.Thread(target=drip, daemon=True)
            dripper.start()
            r = c.read_response()
            stop.set()
            assert r.status == 408 and "not received within 3 s" in r.json()["error"], r
            assert time.monotonic() - t0 < T
            dripper.join(T)
        infer_ok(srv.port)
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------
# One answer per request: half close, upgrades, CONNECT


def test_a_half_closed_client_gets_its_answers(server):
    x = np.ones((1, 4), np.float32)
    body, headers = protocol.encode_infer_request({"x": x}, binary=True)
    with RawConnection(server.port, T) as c:
        c.send(request_bytes("POST", "/v2/models/ident/infer", body, headers)
               + request_bytes("GET", "/v2/health/live") + request_bytes("GET", "/v2/models/nope"))
        c.sock.shutdown(socket.SHUT_WR)  # FIN: nothing more will come
        first = c.read_response()
        assert first.status == 200, first
        assert protocol.decode_infer_response(first.body, None).outputs["y"].tolist() == x.tolist()
        assert c.read_response().status == 200
        last = c.read_response()
        assert last.status == 404  # (Connection: close, unless it was written before the FIN arrived)
        assert c.closed_by_peer()
    with RawConnection(server.port, T) as c:  # nothing owed: closed at once
        c.sock.shutdown(socket.SHUT_WR)
        assert c.closed_by_peer()


@pytest.mark.parametrize("head, status", [
    (b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", 200),
    (b"GET /v2 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
     b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n", 200),
    (b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: 127.0.0.1:80\r\n\r\n", 405),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),  # HTTP/2 with prior knowledge
])
def test_upgrade_and_connect_get_exactly_one_answer(server, head, status):
    with RawConnection(server.port, T) as c:
        c.send(head + b"\x00garbage of another protocol\r\n\r\n")
        r = c.read_response()
        assert r.status == status and r.headers["connection"] == "close", r
        assert c.closed_by_peer()
        assert c.buf == b"", f"a second, unsolicited answer: {c.buf[:200]!r}"


def test_a_post_with_upgrade_is_answered_with_its_body(server):
    """`Upgrade: h2c` on a POST (curl --http2 on http://): the upgrade is declined, the request is
    answered over HTTP/1.1 with its body (the parser skips an upgrade request's body), once."""
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    body, headers = protocol.encode_infer_request({"x": x}, binary=False)
    head = (f"POST /v2/models/ident/infer HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            f"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    for parts in ([head + body], [head, body[:10], body[10:]]):
        with RawConnection(server.port, T) as c:
            for part in parts:
                c.send(part)
                time.sleep(0.05)
            r = c.read_response()
            assert r.status == 200 and r.headers["connection"] == "close", r
            assert protocol.decode_infer_response(r.body, None).outputs["y"].tolist() == x.tolist()
            assert c.closed_by_peer() and c.buf == b""


# ---------------------------------------------------------------------------------------------
# Versions


@CASES
@given(text=st.one_of(st.integers(0, 2**70).map(str), st.text("0123456789", min_size=1, max_size=30),
                      st.sampled_from(["9" * 5000, "1" * 4301, "-1", "+1", "1_0", " 1", "１", "0x1", "1e3"])))
def test_any_version_is_400_or_404_never_5xx(server, text):
    path = f"/v2/models/ident/versions/{text}".replace(" ", "%20")
    for method, suffix in (("GET", ""), ("GET", "/ready"), ("POST", "/infer")):
        raw = f"{method} {path}{suffix} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode()
        r, _ = answer_to(server.port, raw)
        valid = text.isascii() and text.isdigit() and len(text) <= 19 and 1 <= int(text) < 2**63
        if not valid:
            assert r.status == 400, (text, r)  # not ASCII: the parser refuses the URL itself
            assert not text.isascii() or "model version" in r.json()["error"], (text, r)
        elif suffix == "":
            assert r.status == (200 if int(text) == 1 else 404), (text, r)
        else:
            assert r.status < 500, (text, r)


# ---------------------------------------------------------------------------------------------
# Bodies: JSON below binary, shapes before allocation, NaN


def test_json_bodies_have_a_lower_limit_than_binary_ones(server):
    n = MAX_JSON // 5 + 1000  # elements: a JSON body over the JSON limit, far under the binary one
    x = np.full((n // 4, 4), 0.5, np.float32)
    body, headers = protocol.encode_infer_request({"x": x[:8]}, binary=False)
    big = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                  "data": x.ravel().tolist()}]}).encode()
    assert MAX_JSON < len(big) < MAX_BODY
    r = request(server.port, "POST", "/v2/models/ident/infer", big, {"Content-Type": "application/json"}, T)
    assert r.status == 413 and "--max-json-mb" in r.json()["error"], r
    # The same tensor as binary data is taken.
    body, headers = protocol.encode_infer_request({"x": x[:4096]}, binary=True, binary_output=True)
    r = request(server.port, "POST", "/v2/models/ident/infer", body, headers, T)
    assert r.status == 400 and "batch size" in r.json()["error"]  # max_batch_size 8: past the body limits
    # A binary body whose JSON part is over the JSON limit: 413 too.
    pad = {"x" * 64: "y" * (MAX_JSON + 10)}
    header = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 16, **pad}}]}).encode()
    r = request(server.port, "POST", "/v2/models/ident/infer", header + bytes(16),
                {protocol.HEADER_LENGTH: str(len(header))}, T)
    assert r.status == 413 and "--max-json-mb" in r.json()["error"], r
    infer_ok(server.port)


@CASES
@given(shape=st.lists(st.one_of(st.integers(-2, 2**66), st.floats(allow_nan=False), st.just(10**9)),
                      min_size=1, max_size=4))
def test_huge_or_bad_shapes_are_400_without_allocation(server, shape):
    body = json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32",
                                   "parameters": {"binary_data_size": 16}}]}).encode()
    r = request(server.port, "POST", "/v2/models/ident/infer", body + bytes(16),
                {protocol.HEADER_LENGTH: str(len(body))}, T)
    assert 400 <= r.status < 500, (shape, r)
    if shape != [1, 4]:
        assert r.status == 400


def test_non_finite_floats_in_json_are_taken(server):
    x = [[float("nan"), float("inf"), -float("inf"), 1.5]] * 8
    body = json.dumps({"inputs": [{"name": "x", "shape": [8, 4], "datatype": "FP32", "data": x}],
                       "parameters": {"pad": "p" * 70_000}}).encode()  # over the small-body fallback size
    r = request(server.port, "POST", "/v2/models/ident/infer", body, {"Content-Type": "application/json"}, T)
    assert r.status == 200, r
    got = np.array(json.loads(r.body)["outputs"][0]["data"], np.float32).reshape(8, 4)
    np.testing.assert_array_equal(got, np.array(x, np.float32))
    # Malformed JSON of that size is refused from the first parse.
    r = request(server.port, "POST", "/v2/models/ident/infer", body[:-1] + b"x", {}, T)
    assert r.status == 400 and "not valid JSON" in r.json()["error"], r


# ---------------------------------------------------------------------------------------------
# One bad request must not fail others


def test_bytes_that_are_not_text_fail_only_their_own_request(server):
    """Non-UTF-8 BYTES for an ONNX Runtime string input: 400 for that request, in decode; the
    valid requests sent at the same time (and batched together) all succeed."""
    good_body, good_headers = protocol.encode_infer_request(
        {"text": np.array([[b"ab", "h\xe9".encode()]], dtype=object)}, binary=True, binary_output=True)
    bad_body, bad_headers = protocol.encode_infer_request(
        {"text": np.array([[b"\xff\xfe", b"ok"]], dtype=object)}, binary=True)
    results: list = []
    lock = threading.Lock()

    def client(bad: bool):
        for _ in range(10):
            r = request(server.port, "POST", "/v2/models/text/infer", bad_body if bad else good_body,
                        bad_headers if bad else good_headers, T)
            with lock:
                results.append((bad, r.status, r.body))

    threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 80
    for bad, status, body in results:
        if bad:
            assert status == 400 and b"not UTF-8" in body, body
        else:
            assert status == 200, body


# ---------------------------------------------------------------------------------------------
# One client must not stall everyone; memory stays bounded


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


FLOOD = r"""
import socket, sys, time
port, size = int(sys.argv[1]), int(sys.argv[2])
n = size // 6
doc = b'{"inputs": [{"name": "x", "shape": [%d, 4], "datatype": "FP32", "data": [' % (n // 4 * 4 // 4) \
    + b"1.5, " * (n // 4 * 4 - 1) + b'NaN]}]}'
big = b"POST /v2/models/ident/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(doc) + doc
junk = b"h" * 65536
i = 0
while True:
    i += 1
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            if i % 2:
                s.sendall(b"GET /v2 HTTP/1.1\r\nX-Flood: ")
                while True:
                    s.sendall(junk)
            else:
                s.sendall(big)
                s.recv(4096)
    except OSError:
        pass
"""


def test_a_flooding_client_does_not_stall_a_well_behaved_one(repo):
    """One hostile client (another process) streams heads as fast as it can, reconnecting whenever
    cut off, and sends JSON bodies near the body limit holding a NaN (the stdlib parser's case);
    a well-behaved client's requests meanwhile keep their answers: p99 under 2 s (generous: the
    machine is shared), every one correct, over 4 s of flood. The server is `serve-kit serve` (its
    own process, uvloop), as deployed. Before issue 13: 3 answers in 8 s."""
    import subprocess
    import sys

    from rt_server import port_of, start_cli, wait_ready

    proc = start_cli([str(repo), "--http-port", "0", "--no-grpc", "--max-body-mb", "8"])
    flooder = None
    try:
        port = port_of(wait_ready(proc))
        infer_ok(port)
        flooder = subprocess.Popen([sys.executable, "-c", FLOOD, str(port), str(MAX_BODY - 4096)])
        time.sleep(1.5)
        latencies, t0 = [], time.monotonic()
        while time.monotonic() - t0 < 4.0 or len(latencies) < 20:
            latencies.append(infer_ok(port, timeout=30))
    finally:
        if flooder is not None:
            flooder.kill()
            flooder.wait(T)
        proc.terminate()
        proc.communicate(timeout=30)
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    assert p99 < 2.0, f"p99 {p99:.3f} s while flooded (p50 {p50:.3f} s, {len(latencies)} requests)"


def test_memory_stays_bounded_across_hostile_connections(server):
    """200 connections each holding a head just under the limit, then 200 cut off over it: the
    server's RSS (this process: the server runs on a thread here) grows by far less than what the
    clients sent (the heads are bounded per connection, and a closed one gives its memory back)."""
    infer_ok(server.port)
    before = _rss()
    held = []
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=T)
            s.sendall(b"GET /v2 HTTP/1.1\r\nX-Hold: " + b"m" * (DEFAULT_MAX_HEADER - 100))
            held.append(s)
        for _ in range(200):
            r, _ = answer_to(server.port, b"GET /v2 HTTP/1.1\r\nX-Big: " + b"n" * (4 * DEFAULT_MAX_HEAD))
            assert r.status == 431
        grown = _rss() - before
        # 200 x 8 KB held is 1.6 MB of heads; 200 x 64 KB were sent to be refused.
        assert grown < 48 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MiB"
    finally:
        for s in held:
            s.close()
    infer_ok(server.port)


def test_chunked_framing_and_trailers_are_bounded_like_a_head(server):
    """A chunked body whose last chunk is followed by an endless trailer (or an endless chunk
    extension) is cut off like an endless header; a body of many tiny chunks is not."""
    for tail in (b"0\r\nX-Trailer: ", b"1;ext="):
        with RawConnection(server.port, T) as c:
            c.send(b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"2\r\n{}\r\n" + tail)
            try:
                for _ in range(64):
                    c.sock.sendall(b"t" * 4096)
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                r = c.read_response()
                assert r.status == 431, r
            except (ConnectionResetError, ConnectionError):
                pass  # the answer may be lost to a reset: the client sent data the server never read
    tiny = b"".join(b"1\r\n \r\n" for _ in range(20_000)) + b"2\r\n{}\r\n0\r\n\r\n"
    with RawConnection(server.port, T) as c:
        c.send(b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + tiny)
        assert c.read_response().status == 200


@pytest.mark.parametrize("name", ["..", "%2e%2e", ".hidden", "-x", "a" * 300, "a%2Fb"])
def test_load_and_unload_take_model_names_only(repo, name):
    """With the management token, load/unload of anything but a model name is 400 from the
    frontend, before the manager looks for it on disk."""
    srv = InProcessServer(repo, management_token="t0ken").start()
    try:
        for action in ("load", "unload"):
            r = request(srv.port, "POST", f"/v2/repository/models/{name}/{action}", b"",
                        {"Authorization": "Bearer t0ken"}, T)
            assert r.status == 400 and "is not a model name" in r.json()["error"], r
            assert "/tmp" not in r.json()["error"] and str(repo) not in r.json()["error"]
        infer_ok(srv.port)
    finally:
        srv.stop()
