"""Generated HTTP requests (hypothesis): methods, paths, versions, headers, JSON bodies and binary
bodies with Inference-Header-Content-Length, sent on raw sockets to a real `serve-kit serve`.

Every one of them is the client's mistake or a valid request: the answer must be a complete HTTP
response with a status under 500, while a well-behaved client keeps being answered.
"""

from __future__ import annotations

import json

from hostile_kit import HYPOTHESIS_CASES, exchange
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=HYPOTHESIS_CASES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

MODELS = ["mlp", "gather", "seq", "nope", "", "..", "%2e%2e", "mlp%00", "ml p", "é", "a" * 300]
VERSIONS = [None, "1", "2", "0", "-1", "01", "1.0", "0x1", "1e3", "9" * 20, "9" * 5000, "", "%31", "١"]
SUFFIXES = ["", "/infer", "/ready", "/config", "/stats", "/infer/", "/nope"]
FIXED_PATHS = ["/", "/v2", "/v2/", "/v2/health/live", "/v2/health/ready", "/metrics", "/v2/models/stats",
               "/v2/repository/index", "/v2/repository/models/mlp/load", "/v2/repository/models/mlp/unload",
               "*", "//v2", "/v2?x=1", "/v2#f", "http://127.0.0.1/v2", "/v2/models/mlp/infer?x=%zz"]
DATATYPES = ["FP32", "FP64", "FP16", "BF16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT64", "BOOL",
             "BYTES", "fp32", "", "COMPLEX", None, 7]
TOKEN = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=':'),
                min_size=1, max_size=20)
LATIN1 = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"),
                 max_size=60)


@st.composite
def paths(draw) -> str:
    if draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(FIXED_PATHS))
    model = draw(st.one_of(st.sampled_from(MODELS), st.sampled_from(["mlp", "gather", "seq"]), st.text(max_size=12).map(
        lambda t: "".join(c if c.isalnum() else f"%{ord(c) % 256:02X}" for c in t))))
    version = draw(st.one_of(st.none(), st.sampled_from(VERSIONS[1:])))
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version is not None else "")
    return path + draw(st.sampled_from(SUFFIXES))


numbers = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=False), st.booleans(), st.none(),
                    st.text(max_size=8))
shapes = st.lists(st.one_of(st.integers(-3, 6), st.sampled_from([2**31, 2**63, -2**63, 10**30]),
                            st.just("4"), st.just(1.5)), max_size=4)


@st.composite
def infer_docs(draw) -> dict:
    def tensor():
        d = {"name": draw(st.sampled_from(["x", "idx", "y", "", "x" * 100]) | TOKEN),
             "datatype": draw(st.sampled_from(DATATYPES)),
             "shape": draw(shapes)}
        data = draw(st.one_of(st.lists(numbers, max_size=12), st.lists(st.lists(numbers, max_size=4), max_size=4),
                              numbers, st.just("AAAA")))
        if draw(st.booleans()):
            d["data"] = data
        if draw(st.booleans()):
            d["parameters"] = draw(st.dictionaries(TOKEN, numbers, max_size=3))
        return d

    doc: dict = {}
    if draw(st.booleans()):
        doc["inputs"] = [tensor() for _ in range(draw(st.integers(0, 3)))]
    elif draw(st.booleans()):
        doc["inputs"] = draw(numbers)
    if draw(st.booleans()):
        doc["outputs"] = draw(st.lists(st.fixed_dictionaries(
            {"name": st.sampled_from(["y", "s", "zz"]) | TOKEN},
            optional={"parameters": st.dictionaries(st.sampled_from(["binary_data", "classification"]), numbers,
                                                    max_size=2)}), max_size=3))
    if draw(st.booleans()):
        doc["parameters"] = draw(st.dictionaries(
            st.sampled_from(["binary_data_output", "timeout", "priority", "sequence_id"]) | TOKEN, numbers,
            max_size=3))
    if draw(st.booleans()):
        doc["id"] = draw(numbers)
    return doc


def json_text(doc) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


@st.composite
def bodies(draw) -> tuple[bytes, list[tuple[str, str]]]:
    kind = draw(st.sampled_from(["none", "json", "json", "raw", "binary", "json-garbage"]))
    if kind == "none":
        return b"", []
    if kind == "json":
        return json_text(draw(infer_docs())), [("Content-Type", "application/json")]
    if kind == "raw":
        return draw(st.binary(max_size=300)), []
    if kind == "json-garbage":
        text = json_text(draw(infer_docs()))
        cut = draw(st.integers(0, len(text)))
        junk = draw(st.sampled_from([b"", b"NaN", b"\xff\xfe", b"}}}", b"[" * 50, b"\x00", b" Infinity"]))
        return text[:cut] + junk + text[cut:], []
    # Binary tensor extension: a JSON header then raw tensor bytes; the header length is right,
    # off, or nonsense.
    header = json_text(draw(infer_docs()))
    tail = draw(st.binary(max_size=200))
    declared = draw(st.one_of(st.just(str(len(header))), st.integers(-5, len(header) + len(tail) + 5).map(str),
                              st.sampled_from(["", "abc", "1e3", "99999999999999999999", " 4", "0x10"])))
    return header + tail, [("Inference-Header-Content-Length", declared),
                           ("Content-Type", "application/octet-stream")]


headers_st = st.lists(st.one_of(
    st.tuples(st.sampled_from(["Accept", "Content-Type", "Expect", "Accept-Encoding", "Content-Encoding", "Authorization",
                               "Host", "Connection", "Inference-Header-Content-Length", "X-Forwarded-For", "Upgrade"]),
              LATIN1),
    st.tuples(TOKEN, LATIN1)), max_size=6)



def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1."), response[:300]
    return int(response.split(b" ", 2)[1])


METHODS = st.sampled_from(["GET", "POST", "POST", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE"])


@SETTINGS
@given(method=st.one_of(METHODS, METHODS, METHODS, TOKEN),
       path=paths(), version=st.sampled_from(["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "HTTP/9.9"]),
       headers=headers_st, body=bodies())
def test_generated_requests_get_a_complete_answer_under_500(server, good_client, method, path, version, headers, body):
    payload, body_headers = body
    lines = [f"{method} {path} {version}", "Host: 127.0.0.1"]
    drop = {"content-length", "transfer-encoding", "connection", "upgrade"}
    for k, v in body_headers + headers:
        if k.lower() in drop:
            continue  # framing stays right here: test_hostile_raw mutates it on purpose
        lines.append(f"{k}: {v}")
    lines += [f"Content-Length: {len(payload)}", "Connection: close"]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
    response = exchange(server.http_port, head + payload)
    status = status_of(response)
    assert status < 500, response[:600]
    if status >= 400 and method != "HEAD":
        # Errors are JSON with a message, never a traceback or a server path.
        body = response.split(b"\r\n\r\n", 1)[1]
        doc = json.loads(body)
        assert "error" in doc and "Traceback" not in doc["error"] and str(server_repo_marker()) not in doc["error"]


def server_repo_marker() -> str:
    """A string every path of the server's repository contains (pytest's temporary folders)."""
    return "hostile-repo"


@SETTINGS
@given(indices=st.lists(st.integers(-10, 10), min_size=1, max_size=8))
def test_values_the_backend_rejects_fail_alone_with_400(server, good_client, indices):
    """The gather model fails at run time (in ONNX Runtime) on an index out of range: a request
    with one is 400, alone: the others are answered."""
    doc = {"inputs": [{"name": "idx", "datatype": "INT64", "shape": [len(indices), 1], "data": indices}]}
    response = exchange(server.http_port, b"POST /v2/models/gather/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    + f"Content-Length: {len(json_text(doc))}\r\n\r\n".encode() + json_text(doc))
    status = status_of(response)
    if all(-5 <= i < 5 for i in indices):
        assert status == 200, response[:400]
        out = json.loads(response.split(b"\r\n\r\n", 1)[1])["outputs"][0]
        assert out["data"] == [float(3 * (i % 5) + j) for i in indices for j in range(3)]
    else:
        assert status == 400, response[:400]


def test_nan_and_huge_numbers_in_json_are_answered_not_crashed(server, good_client):
    for text in [b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[NaN,Infinity,-Infinity,1]}]}',
                 b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1e999,2,3,4]}]}',
                 b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[' + b"9" * 5000 + b',2,3,4]}]}',
                 b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":' + b"[" * 10_000 + b"]" * 10_000 + b"}]}"]:
        response = exchange(server.http_port, b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                        + f"Content-Length: {len(text)}\r\n\r\n".encode() + text)
        assert status_of(response) < 500, (text[:80], response[:400])
