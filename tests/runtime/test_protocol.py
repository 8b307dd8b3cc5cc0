"""serve_kit.runtime.protocol: the Open Inference Protocol REST codec (JSON and binary tensors).

Request bodies are built here by hand from the specs (json + struct), not with the module's own
encoder, so a bug shared by both directions of the codec cannot hide.
"""

from __future__ import annotations

import json
import math
import struct
import tracemalloc

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from serve_kit.config import DATATYPES, ModelConfig, numpy_dtype
from serve_kit.runtime import protocol as P
from serve_kit.runtime.types import BadRequest, InferRequest, InferResponse, Internal, RequestedOutput

ALL_DATATYPES = list(DATATYPES)
# No example database: CI starts from a clean clone, and a run must not leave files in the work tree.
HYPOTHESIS = settings(deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------
# Helpers: configs, the wire format written out from the spec, comparisons


def make_config(inputs, outputs=(("out", "FP32", [-1, 2]),), max_batch_size=4, name="m", **kw) -> ModelConfig:
    def specs(items):
        return [{"name": n, "datatype": d, "shape": list(s)} for n, d, s in items]
    return ModelConfig(name=name, backend=kw.pop("backend", "onnxruntime"), max_batch_size=max_batch_size,
                       inputs=specs(inputs), outputs=specs(outputs), **kw)


def wire_bytes(arr: np.ndarray, datatype: str) -> bytes:
    """The binary extension's layout, written from the spec text."""
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(x)) + x for x in arr.ravel().tolist())
    if datatype == "BOOL":
        return bytes(1 if v else 0 for v in arr.ravel().tolist())
    return arr.astype(np.dtype(DATATYPES[datatype]).newbyteorder("<")).tobytes()


def json_values(arr: np.ndarray, datatype: str, nested: bool):
    if datatype == "BYTES":
        arr = np.array([x.decode("utf-8") for x in arr.ravel().tolist()] or [], dtype=object).reshape(arr.shape)
    if nested and arr.ndim >= 1:
        return arr.tolist()
    return arr.ravel().tolist()


def build_body(entries, *, binary=(), nested=(), extra=None):
    """(body, header_length) for `entries` = [(name, datatype, array)]; `binary`/`nested` are names."""
    items, blobs = [], []
    for name, datatype, arr in entries:
        item = {"name": name, "shape": list(arr.shape), "datatype": datatype}
        if name in binary:
            raw = wire_bytes(arr, datatype)
            item["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            item["data"] = json_values(arr, datatype, name in nested)
        items.append(item)
    doc = {**(extra or {}), "inputs": items}
    header = json.dumps(doc).encode()
    return header + b"".join(blobs), (len(header) if blobs else None)


def assert_same(got: np.ndarray, want: np.ndarray, datatype: str, exact_bits: bool):
    assert got.shape == want.shape
    if datatype == "BYTES":
        assert got.dtype == object
        assert got.ravel().tolist() == want.ravel().tolist()
        assert all(type(x) is bytes for x in got.ravel().tolist())
        return
    assert got.dtype == numpy_dtype(datatype)
    if exact_bits:
        assert got.tobytes() == want.astype(got.dtype).tobytes()
        return
    np.testing.assert_array_equal(got, want)
    if datatype in ("FP16", "FP32", "FP64"):
        finite = ~np.isnan(want)
        assert np.array_equal(np.signbit(got[finite]), np.signbit(want[finite]))  # -0.0 survives


def sample(datatype: str, shape) -> np.ndarray:
    """Values at the edges of each datatype."""
    n = math.prod(shape)
    if datatype == "BYTES":
        pool = [b"", b"a", "\u00e9t\u00e9 \u2603".encode(), b"x" * 40, b"tab\tquote\"back\\"]
        return np.array([pool[i % len(pool)] for i in range(n)] or [], dtype=object).reshape(shape)
    if datatype == "BOOL":
        return (np.arange(n) % 3 == 0).reshape(shape)
    dt = numpy_dtype(datatype)
    if dt.kind == "f":
        fi = np.finfo(dt)
        pool = np.array([0.0, -0.0, 1.5, -2.25, fi.max, fi.min, fi.tiny, fi.smallest_subnormal,
                         np.nan, np.inf, -np.inf, 0.1], dtype=dt)
    else:
        ii = np.iinfo(dt)
        pool = np.array([0, 1, ii.max, ii.min, ii.max - 1, 7], dtype=dt)
    return pool[np.arange(n) % len(pool)].reshape(shape)


def decode(body, header_length, config, **kw) -> InferRequest:
    return P.decode_infer_request(body, header_length, config, config.name, None, **kw)


def split_response(body: bytes, headers: dict) -> tuple[dict, bytes]:
    """The response's JSON document (parsed by the stdlib, which reads NaN) and its binary tail."""
    n = int(headers[P.HEADER_LENGTH]) if P.HEADER_LENGTH in headers else len(body)
    return json.loads(body[:n]), body[n:]


# ---------------------------------------------------------------------------------------------
# The spec's own examples


def test_kserve_spec_json_example():
    config = make_config([("input0", "UINT32", [2, 2]), ("input1", "BOOL", [3])],
                         [("output0", "FP32", [3, 2])], max_batch_size=0)
    body = b"""{
      "id" : "42",
      "inputs" : [
        {"name" : "input0", "shape" : [ 2, 2 ], "datatype" : "UINT32", "data" : [ 1, 2, 3, 4 ]},
        {"name" : "input1", "shape" : [ 3 ], "datatype" : "BOOL", "data" : [ true, false, true ]}
      ],
      "outputs" : [ {"name" : "output0"} ]
    }"""
    req = decode(body, None, config)
    assert req.id == "42"
    assert req.inputs["input0"].dtype == np.uint32
    assert req.inputs["input0"].tolist() == [[1, 2], [3, 4]]
    assert req.inputs["input1"].dtype == np.bool_ and req.inputs["input1"].tolist() == [True, False, True]
    assert [(o.name, o.binary) for o in req.outputs] == [("output0", None)]

    resp = InferResponse(model="m", version=3, id="42",
                         outputs={"output0": np.array([[1.0, 1.1], [2.0, 2.1], [3.0, 3.1]], np.float32)})
    out, headers = P.encode_infer_response(resp, config, req)
    assert headers == {"Content-Type": "application/json"}
    doc = json.loads(out)
    assert doc["id"] == "42" and doc["model_name"] == "m" and doc["model_version"] == "3"
    [o] = doc["outputs"]
    assert (o["name"], o["shape"], o["datatype"]) == ("output0", [3, 2], "FP32")
    assert np.array_equal(np.array(o["data"], np.float32), resp.outputs["output0"].ravel())  # flat, row-major


def test_triton_binary_extension_example_by_hand():
    """The binary extension doc's example, as tritonclient sends it: JSON header, then raw tensors."""
    config = make_config([("input0", "UINT32", [2, 2]), ("input1", "BOOL", [3])],
                         [("output0", "FP32", [3, 2])], max_batch_size=0, name="mymodel")
    header = json.dumps({
        "model_name": "mymodel",  # the example carries it; unknown keys are ignored
        "inputs": [
            {"name": "input0", "shape": [2, 2], "datatype": "UINT32", "parameters": {"binary_data_size": 16}},
            {"name": "input1", "shape": [3], "datatype": "BOOL", "parameters": {"binary_data_size": 3}},
        ],
        "outputs": [{"name": "output0", "parameters": {"binary_data": True}}],
    }).encode()
    body = header + struct.pack("<4I", 1, 2, 3, 0xFFFFFFFF) + bytes([1, 0, 1])
    req = decode(body, len(header), config)
    assert req.inputs["input0"].tolist() == [[1, 2], [3, 0xFFFFFFFF]]
    assert req.inputs["input1"].tolist() == [True, False, True]
    assert req.outputs == [RequestedOutput(name="output0", binary=True)]

    y = np.arange(6, dtype=np.float32).reshape(3, 2) / 4
    out, headers = P.encode_infer_response(InferResponse(model="mymodel", version=1, outputs={"output0": y}),
                                           config, req)
    assert headers["Content-Type"] == "application/octet-stream"
    n = int(headers["Inference-Header-Content-Length"])
    doc = json.loads(out[:n])
    assert doc["outputs"] == [{"name": "output0", "datatype": "FP32", "shape": [3, 2],
                               "parameters": {"binary_data_size": 24}}]
    assert out[n:] == struct.pack("<6f", *y.ravel().tolist())


def test_binary_fp16_and_bytes_by_hand_mixed_with_json():
    # A backend whose BYTES are bytes, not text (ONNX Runtime's must be UTF-8: test_protocol_hostile).
    config = make_config([("half", "FP16", [-1, 2]), ("words", "BYTES", [-1]), ("ids", "INT64", [-1, 1])],
                         backend="torchscript")
    header = json.dumps({"inputs": [
        {"name": "half", "shape": [1, 2], "datatype": "FP16", "parameters": {"binary_data_size": 4}},
        {"name": "ids", "shape": [1, 1], "datatype": "INT64", "data": [[-(2 ** 63)]]},
        {"name": "words", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 7}},
    ]}).encode()
    body = header + struct.pack("<2e", 1.5, -65504.0) + struct.pack("<I", 3) + b"\x00\xffz"
    req = decode(body, len(header), config)
    assert req.inputs["half"].dtype == np.float16 and req.inputs["half"].tolist() == [[1.5, -65504.0]]
    assert req.inputs["words"].tolist() == [b"\x00\xffz"]  # BYTES need not be text in binary
    assert req.inputs["ids"].dtype == np.int64 and req.inputs["ids"].tolist() == [[-(2 ** 63)]]
    assert list(req.inputs) == ["half", "words", "ids"]  # the config's order


def test_binary_inputs_are_views_of_the_body():
    config = make_config([("x", "FP32", [-1, 256])])
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    body, n = build_body([("x", "FP32", x)], binary={"x"})
    got = decode(body, n, config).inputs["x"]
    assert np.shares_memory(got, np.frombuffer(body, np.uint8))  # no copy on the hot path
    assert not got.flags.writeable


def test_header_length_equal_to_body_means_no_binary():
    config = make_config([("x", "INT32", [-1, 2])])
    body, _ = build_body([("x", "INT32", np.array([[1, 2]], np.int32))])
    assert decode(body, len(body), config).inputs["x"].tolist() == [[1, 2]]


def test_request_built_by_tritonclient():
    """The real client library's request body (mixed binary and JSON inputs, output flags)."""
    httpclient = pytest.importorskip("tritonclient.http")
    config = make_config([("x", "FP32", [-1, 3]), ("s", "BYTES", [-1]), ("h", "FP16", [-1, 2])],
                         [("y", "FP32", [-1, 3]), ("z", "BYTES", [-1])], dynamic_batching={"priority_levels": 2})
    x, s, h = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([b"a", b"bc"], dtype=object), \
        np.array([[1.5, -2], [0, 65504]], dtype=np.float16)
    inputs = [httpclient.InferInput("x", [2, 3], "FP32"), httpclient.InferInput("s", [2], "BYTES"),
              httpclient.InferInput("h", [2, 2], "FP16")]
    inputs[0].set_data_from_numpy(x, binary_data=True)
    inputs[1].set_data_from_numpy(s, binary_data=False)
    inputs[2].set_data_from_numpy(h, binary_data=True)
    outputs = [httpclient.InferRequestedOutput("z", binary_data=False), httpclient.InferRequestedOutput("y", binary_data=True)]
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id="r1", priority=1, timeout=100)
    req = decode(body, json_size, config)
    assert req.inputs["x"].tolist() == x.tolist() and req.inputs["s"].tolist() == [b"a", b"bc"]
    assert req.inputs["h"].tobytes() == h.tobytes()
    assert (req.id, req.priority, req.timeout_us) == ("r1", 1, 100)
    assert req.outputs == [RequestedOutput("z", binary=False), RequestedOutput("y", binary=True)]

    # JSON only, no outputs named: tritonclient then asks for binary outputs by default.
    body, json_size = httpclient.InferenceServerClient.generate_request_body(inputs[1:2])
    req = decode(body, json_size, make_config([("s", "BYTES", [-1])]))
    assert json_size is None and req.binary_output is True and req.inputs["s"].tolist() == [b"a", b"bc"]


def test_response_read_by_tritonclient():
    httpclient = pytest.importorskip("tritonclient.http")
    config = make_config([("x", "FP32", [-1, 1])],
                         [("y", "FP16", [-1, 2]), ("z", "BYTES", [-1]), ("b", "BOOL", [-1]), ("i", "UINT64", [-1])])
    arrays = {"y": np.array([[1.5, -np.inf]], np.float16), "z": np.array([b"\xc3\xa9t\xc3\xa9"], dtype=object),
              "b": np.array([True]), "i": np.array([2 ** 64 - 1], np.uint64)}
    for binary_output in (True, False):
        req = request_with_config(config, {"id": "q", "parameters": {"binary_data_output": binary_output},
                                           "outputs": [{"name": "z", "parameters": {"binary_data": True}},
                                                       {"name": "y"}, {"name": "b"}, {"name": "i"}]})
        body, headers = P.encode_infer_response(InferResponse(model="m", version=1, outputs=arrays), config, req)
        n = int(headers[P.HEADER_LENGTH]) if P.HEADER_LENGTH in headers else None
        result = httpclient.InferResult.from_response_body(body, header_length=n)
        for name, arr in arrays.items():
            got = result.as_numpy(name)
            assert got.shape == arr.shape and got.tolist() == arr.tolist(), name
        assert result.get_response()["id"] == "q"


def request_with_config(config: ModelConfig, extra: dict) -> InferRequest:
    name = config.inputs[0].name
    body = json.dumps({"inputs": [{"name": name, "shape": [1, 1], "datatype": "FP32", "data": [1]}], **extra})
    return decode(body.encode(), None, config)


# ---------------------------------------------------------------------------------------------
# Every datatype, JSON and binary, flat and nested


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
@pytest.mark.parametrize("encoding", ["json-flat", "json-nested", "binary"])
def test_every_datatype_round_trips(datatype, encoding):
    config = make_config([("t", datatype, [-1, 3, 4])], [("o", datatype, [-1, 3, 4])])
    arr = sample(datatype, [2, 3, 4])
    binary = {"t"} if encoding == "binary" else set()
    body, n = build_body([("t", datatype, arr)], binary=binary, nested={"t"} if encoding == "json-nested" else ())
    req = decode(body, n, config)
    assert_same(req.inputs["t"], arr, datatype, exact_bits=encoding == "binary")

    req.binary_output = encoding == "binary"
    out, headers = P.encode_infer_response(InferResponse(model="m", version=1, outputs={"o": arr}), config, req)
    doc, tail = split_response(out, headers)
    [o] = doc["outputs"]
    assert (o["datatype"], o["shape"]) == (datatype, [2, 3, 4])
    if encoding == "binary":
        assert tail == wire_bytes(arr, datatype) and o["parameters"]["binary_data_size"] == len(tail)
    else:
        want = json_values(arr, datatype, nested=False)
        got = np.array(o["data"], dtype=object if datatype == "BYTES" else numpy_dtype(datatype))
        assert got.shape == (24,)  # always flat in responses
        np.testing.assert_array_equal(got, np.array(want, dtype=got.dtype))


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_raw_bytes_helpers_round_trip_every_datatype(datatype):
    arr = sample(datatype, [3, 2])
    raw = P.array_to_bytes(arr, datatype)
    assert raw == wire_bytes(arr, datatype)
    assert_same(P.array_from_bytes(raw, datatype, [3, 2]), arr, datatype, exact_bits=True)


def test_raw_bytes_known_answers():
    assert P.array_to_bytes(np.array([1, 258], np.uint16), "UINT16") == b"\x01\x00\x02\x01"
    assert P.array_to_bytes(np.array([b"ab", b""], dtype=object), "BYTES") == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"
    assert P.array_to_bytes(np.array(["\u00e9"], dtype=object), "BYTES") == b"\x02\x00\x00\x00\xc3\xa9"
    assert P.array_to_bytes(np.array([True, False]), "BOOL") == b"\x01\x00"
    # Big-endian input is written little-endian all the same.
    assert P.array_to_bytes(np.array([1.0], dtype=">f4"), "FP32") == struct.pack("<f", 1.0)


def test_nested_and_flat_json_give_the_same_tensor():
    config = make_config([("x", "INT16", [-1, 2, 3])])
    arr = np.arange(12, dtype=np.int16).reshape(2, 2, 3)
    flat = decode(build_body([("x", "INT16", arr)])[0], None, config).inputs["x"]
    nested = decode(build_body([("x", "INT16", arr)], nested={"x"})[0], None, config).inputs["x"]
    assert flat.tolist() == nested.tolist() == arr.tolist()


def test_zero_sized_variable_dimension():
    config = make_config([("ids", "INT64", [-1, -1])])
    for nested in ((), {"ids"}):
        req = decode(build_body([("ids", "INT64", np.zeros((2, 0), np.int64))], nested=nested)[0], None, config)
        assert req.inputs["ids"].shape == (2, 0)


def test_non_batching_model_scalar_input():
    config = make_config([("s", "FP64", [])], [("o", "FP64", [])], max_batch_size=0)
    req = decode(b'{"inputs":[{"name":"s","shape":[],"datatype":"FP64","data":[2.5]}]}', None, config)
    assert req.inputs["s"].shape == () and float(req.inputs["s"]) == 2.5


# ---------------------------------------------------------------------------------------------
# Non-finite floats


def test_nan_and_infinity_tokens_are_read_for_float_inputs():
    config = make_config([("x", "FP32", [-1, 3])])
    req = decode(b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[NaN,Infinity,-Infinity]}]}',
                 None, config)
    x = req.inputs["x"][0]
    assert np.isnan(x[0]) and x[1] == np.inf and x[2] == -np.inf


def test_nan_is_not_an_integer():
    config = make_config([("x", "INT32", [-1, 1])])
    with pytest.raises(BadRequest, match=r"'x'.*INT32.*integers.*number"):
        decode(b'{"inputs":[{"name":"x","shape":[1,1],"datatype":"INT32","data":[NaN]}]}', None, config)


def test_non_finite_outputs_are_written_as_tokens_and_finite_ones_as_strict_json():
    config = make_config([("x", "FP32", [-1, 1])], [("y", "FP32", [-1, 3])])
    req = decode(b'{"inputs":[{"name":"x","shape":[1,1],"datatype":"FP32","data":[0]}]}', None, config)

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON token {c}"))

    finite = np.array([[0.1, -0.0, 3e38]], np.float32)
    body, _ = P.encode_infer_response(InferResponse(model="m", version=1, outputs={"y": finite}), config, req)
    got = np.array(strict(body)["outputs"][0]["data"], np.float32)
    assert got.tobytes() == finite.tobytes()

    odd = np.array([[np.nan, np.inf, -np.inf]], np.float32)
    body, _ = P.encode_infer_response(InferResponse(model="m", version=1, outputs={"y": odd}), config, req)
    assert b"NaN" in body and b"-Infinity" in body
    data = json.loads(body)["outputs"][0]["data"]
    assert math.isnan(data[0]) and data[1:] == [math.inf, -math.inf]


# ---------------------------------------------------------------------------------------------
# Requested outputs, binary flags, response documents


OUT_CONFIG = make_config([("x", "FP32", [-1, 1])],
                         [("scores", "FP32", [-1, 3]), ("label", "BYTES", [-1]), ("count", "INT64", [-1])])
OUT_ARRAYS = {"scores": np.array([[0.25, 0.5, 0.25]], np.float32), "label": np.array([b"cat"], dtype=object),
              "count": np.array([3], np.int64)}


def request_with(extra: dict) -> InferRequest:
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1]}], **extra})
    return decode(body.encode(), None, OUT_CONFIG)


def encode_outputs(req: InferRequest, **resp_kw) -> tuple[dict, bytes, dict]:
    resp = InferResponse(model="m", version=2, outputs=dict(OUT_ARRAYS), **resp_kw)
    body, headers = P.encode_infer_response(resp, OUT_CONFIG, req)
    doc, tail = split_response(body, headers)
    return doc, tail, headers


def test_outputs_default_to_every_output_in_config_order_as_json():
    doc, tail, headers = encode_outputs(request_with({}))
    assert [o["name"] for o in doc["outputs"]] == ["scores", "label", "count"]
    assert all("data" in o for o in doc["outputs"]) and tail == b""
    assert headers == {"Content-Type": "application/json"}
    assert doc["outputs"][1]["data"] == ["cat"] and doc["outputs"][2]["data"] == [3]


def test_requested_outputs_come_in_request_order_with_their_binary_flags():
    req = request_with({"outputs": [{"name": "count", "parameters": {"binary_data": True}},
                                    {"name": "scores"},
                                    {"name": "label", "parameters": {"binary_data": True}}]})
    doc, tail, headers = encode_outputs(req)
    assert [o["name"] for o in doc["outputs"]] == ["count", "scores", "label"]
    assert doc["outputs"][1]["data"] == [0.25, 0.5, 0.25]
    sizes = [o.get("parameters", {}).get("binary_data_size") for o in doc["outputs"]]
    assert sizes == [8, None, 7]
    assert tail == struct.pack("<q", 3) + struct.pack("<I", 3) + b"cat"  # binary tensors in output order
    assert headers["Content-Type"] == "application/octet-stream"


def test_binary_data_output_is_the_default_an_output_can_override():
    req = request_with({"parameters": {"binary_data_output": True},
                        "outputs": [{"name": "scores", "parameters": {"binary_data": False}}, {"name": "count"}]})
    assert req.binary_output is True
    doc, tail, _ = encode_outputs(req)
    assert "data" in doc["outputs"][0] and doc["outputs"][1]["parameters"] == {"binary_data_size": 8}
    assert tail == struct.pack("<q", 3)


def test_response_carries_id_version_and_parameters():
    req = request_with({"id": "req-\u00e9"})
    doc, _, _ = encode_outputs(req, parameters={"sequence_end": True})
    assert doc["id"] == "req-\u00e9" and doc["model_name"] == "m" and doc["model_version"] == "2"
    assert doc["parameters"] == {"sequence_end": True}
    doc, _, _ = encode_outputs(request_with({}))
    assert "id" not in doc


def test_request_parameters_are_parsed():
    req = request_with({"parameters": {"priority": 2, "timeout": 1500, "custom": "v"}})
    assert (req.priority, req.timeout_us, req.binary_output, req.parameters) == (2, 1500, False, {"custom": "v"})
    assert request_with({"outputs": []}).outputs is None  # an empty list asks for every output


def test_output_dtype_is_the_configs():
    req = request_with({})
    resp = InferResponse(model="m", version=1, outputs={**OUT_ARRAYS, "scores": np.array([[1, 2, 3]], np.float64),
                                                       "count": np.array([4], np.int32)})
    doc, _ = split_response(*P.encode_infer_response(resp, OUT_CONFIG, req))
    assert [(o["datatype"], o["data"]) for o in doc["outputs"] if o["name"] != "label"] == \
        [("FP32", [1.0, 2.0, 3.0]), ("INT64", [4])]
    bad = InferResponse(model="m", version=1, outputs={**OUT_ARRAYS, "count": np.array([1.5])})
    with pytest.raises(Internal, match="'count'.*float64.*INT64"):
        P.encode_infer_response(bad, OUT_CONFIG, req)


def test_missing_output_is_an_internal_error():
    resp = InferResponse(model="m", version=1, outputs={"scores": OUT_ARRAYS["scores"]})
    with pytest.raises(Internal, match="'label'"):
        P.encode_infer_response(resp, OUT_CONFIG, request_with({}))


def test_bytes_outputs_from_str_arrays_and_non_utf8_as_json():
    req = request_with({"outputs": [{"name": "label"}]})
    resp = InferResponse(model="m", version=1, outputs={"label": np.array(["d\u00e9j\u00e0", "vu"], dtype=object)})
    doc, _ = split_response(*P.encode_infer_response(resp, OUT_CONFIG, req))
    assert doc["outputs"][0]["data"] == ["d\u00e9j\u00e0", "vu"]
    resp = InferResponse(model="m", version=1, outputs={"label": np.array([b"\xff"], dtype=object)})
    with pytest.raises(BadRequest, match="'label'.*not UTF-8.*binary_data"):
        P.encode_infer_response(resp, OUT_CONFIG, req)
    req.outputs[0].binary = True
    body, headers = P.encode_infer_response(resp, OUT_CONFIG, req)
    assert split_response(body, headers)[1] == b"\x01\x00\x00\x00\xff"


def test_encode_error():
    assert json.loads(P.encode_error(BadRequest("input 'x': bad"))) == {"error": "input 'x': bad"}
    # A message quoting hostile input with a lone surrogate is still valid JSON.
    assert json.loads(P.encode_error(BadRequest("unknown input '\ud800'")))["error"] == "unknown input '\ud800'"


# ---------------------------------------------------------------------------------------------
# Hostile and malformed requests: a BadRequest naming the input, the fault and the expectation


BASE = make_config([("image", "FP32", [-1, 2, 2]), ("mask", "BOOL", [-1, 2]), ("text", "BYTES", [-1])],
                   [("scores", "FP32", [-1, 3]), ("label", "BYTES", [-1])],
                   dynamic_batching={"priority_levels": 2})


def base_doc() -> dict:
    return {"inputs": [
        {"name": "image", "shape": [2, 2, 2], "datatype": "FP32", "data": [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]},
        {"name": "mask", "shape": [2, 2], "datatype": "BOOL", "data": [[True, False], [False, True]]},
        {"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]},
    ]}


def test_base_doc_is_valid():
    req = decode(json.dumps(base_doc()).encode(), None, BASE)
    assert req.inputs["image"].shape == (2, 2, 2) and req.inputs["text"].tolist() == [b"a", b"b"]


def _set(path, value):
    def apply(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return doc
    return apply


def _del(path):
    def apply(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return doc
    return apply


def _image(**fields):
    def apply(doc):
        doc["inputs"][0].update(fields)
        return doc
    return apply


def _append_input(item):
    def apply(doc):
        doc["inputs"].append(item)
        return doc
    return apply


BAD_REQUESTS = [
    ("missing input", _del(["inputs", 1]), ["missing input", "'mask'"]),
    ("unknown input", _set(["inputs", 1, "name"], "masque"), ["unknown input 'masque'", "'mask'"]),
    ("duplicate input", _append_input({"name": "text", "shape": [2], "datatype": "BYTES", "data": ["c", "d"]}),
     ["'text'", "more than once"]),
    ("datatype", _image(datatype="FP64"), ["'image'", "FP64", "FP32"]),
    ("unknown datatype", _image(datatype="FLOAT"), ["'image'", "'FLOAT'", "FP32"]),
    ("datatype not a string", _image(datatype=32), ["'image'", "'datatype'", "'FP32'"]),
    ("rank", _image(shape=[2, 4]), ["'image'", "[2, 4]", "[-1, 2, 2]"]),
    ("fixed dimension", _image(shape=[1, 2, 3], data=[1, 2, 3, 4, 5, 6]), ["'image'", "dimension 2 is 3", "expected 2"]),
    ("batch too large", _image(shape=[5, 2, 2], data=[0] * 20), ["'image'", "batch size 5", "1..4", "max_batch_size"]),
    ("batch zero", _image(shape=[0, 2, 2], data=[]), ["'image'", "batch size 0"]),
    ("negative dimension", _image(shape=[2, -2, 2]), ["'image'", "non-negative"]),
    ("shape not integers", _image(shape=[2, 2.0, 2]), ["'image'", "'shape'", "[-1, 2, 2]"]),
    ("shape with a boolean", _image(shape=[2, True, 2]), ["'image'", "'shape'"]),
    ("shape not an array", _image(shape="2x2x2"), ["'image'", "'shape'"]),
    ("element count", _image(data=[1, 2, 3, 4, 5, 6, 7]), ["'image'", "7 elements", "needs 8"]),
    ("string in FP32", _image(data=[1, 2, 3, 4, 5, 6, 7, "8"]), ["'image'", "FP32", "numbers", "string"]),
    ("boolean in FP32", _image(data=[1, 2, 3, 4, 5, 6, 7, True]), ["'image'", "FP32", "boolean"]),
    ("null in FP32", _image(data=[1, 2, 3, 4, 5, 6, 7, None]), ["'image'", "null"]),
    ("object in FP32", _image(data=[1, 2, 3, 4, 5, 6, 7, {}]), ["'image'", "object"]),
    ("data not an array", _image(data=8), ["'image'", "'data' must be a JSON array", "integer"]),
    ("ragged nesting", _image(data=[[[1, 2], [3, 4]], [[5, 6], [7]]]), ["'image'", "nested unlike shape", "[2, 2, 2]"]),
    ("mixed nesting", _image(data=[[[1, 2], [3, 4]], [5, [6, 7]]]), ["'image'", "mixes arrays and values"]),
    ("partial nesting", _image(data=[[1, 2, 3, 4], [5, 6, 7, 8]]), ["'image'", "nested unlike shape [2, 2, 2]"]),
    ("shallow nesting", _image(data=[[1, 2], [3, 4]]), ["'image'", "nested 2 deep", "exactly like the shape"]),
    ("nested too deep", _image(data=[[[[1], [2]], [[3], [4]]], [[[5], [6]], [[7], [8]]]]), ["'image'", "deeper"]),
    ("integer in BOOL", _set(["inputs", 1, "data"], [[1, 0], [0, 1]]), ["'mask'", "BOOL", "booleans", "integer"]),
    ("number in BYTES", _set(["inputs", 2, "data"], ["a", 2]), ["'text'", "BYTES", "strings", "integer"]),
    ("different batch sizes", _set(["inputs", 2], {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}),
     ["different batch sizes", "'image': 2", "'text': 1"]),
    ("no data", _del(["inputs", 2, "data"]), ["'text'", "neither 'data' nor"]),
    ("input not an object", _set(["inputs", 0], ["image"]), ["inputs[0]", "object"]),
    ("name not a string", _set(["inputs", 0, "name"], 7), ["inputs[0]", "'name'"]),
    ("inputs empty", _set(["inputs"], []), ["'inputs'", "non-empty"]),
    ("inputs not an array", _set(["inputs"], {"image": 1}), ["'inputs'", "object"]),
    ("unknown output", _set(["outputs"], [{"name": "nope"}]), ["unknown output 'nope'", "'scores'"]),
    ("duplicate output", _set(["outputs"], [{"name": "label"}, {"name": "label"}]), ["'label'", "more than once"]),
    ("outputs not an array", _set(["outputs"], "scores"), ["'outputs'"]),
    ("classification", _set(["outputs"], [{"name": "scores", "parameters": {"classification": 2}}]),
     ["'scores'", "classification"]),
    ("binary_data not a boolean", _set(["outputs"], [{"name": "scores", "parameters": {"binary_data": 1}}]),
     ["'scores'", "binary_data", "true or false"]),
    ("priority type", _set(["parameters"], {"priority": "high"}), ["priority", "non-negative integer", "'high'"]),
    ("priority level", _set(["parameters"], {"priority": 3}), ["priority 3", "1..2"]),
    ("negative timeout", _set(["parameters"], {"timeout": -1}), ["timeout", "non-negative"]),
    ("binary_data_output type", _set(["parameters"], {"binary_data_output": "yes"}), ["binary_data_output"]),
    ("parameters not an object", _set(["parameters"], [1]), ["'parameters'", "object"]),
    ("id not a string", _set(["id"], 42), ["'id'", "string"]),
    ("binary without header", _set(["inputs", 0, "parameters"], {"binary_data_size": 32}),
     ["'image'", "binary_data_size", "Inference-Header-Content-Length"]),
]


@pytest.mark.parametrize("case, mutate, expected", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_messages(case, mutate, expected):
    body = json.dumps(mutate(base_doc())).encode()
    with pytest.raises(BadRequest) as info:
        decode(body, None, BASE)
    for part in expected:
        assert part in info.value.message, (part, info.value.message)


BAD_VALUES = [
    ("UINT8", [300], ["'v'", "300", "UINT8", "0..255"]),
    ("INT8", [-129], ["-129", "INT8", "-128..127"]),
    ("UINT64", [-1], ["-1", "UINT64"]),
    ("INT64", [2 ** 63], [str(2 ** 63), "INT64"]),
    ("INT32", [1.5], ["INT32", "integers", "number"]),
    ("INT32", [1.0], ["INT32", "integers", "number"]),  # no silent float -> int
    ("FP16", [70000], ["70000", "FP16", "out of range"]),
    ("FP32", [1e300], ["FP32", "out of range"]),
    ("FP32", [10 ** 400], ["FP32", "too large"]),
    ("BOOL", [0], ["BOOL", "booleans", "integer"]),
    ("BYTES", [None], ["BYTES", "strings", "null"]),
]


@pytest.mark.parametrize("datatype, data, expected", BAD_VALUES, ids=[f"{d}-{v[0]!r}" for d, v, _ in BAD_VALUES])
def test_values_that_do_not_fit_the_datatype(datatype, data, expected):
    config = make_config([("v", datatype, [-1])])
    body = json.dumps({"inputs": [{"name": "v", "shape": [1], "datatype": datatype, "data": data}]}).encode()
    with pytest.raises(BadRequest) as info:
        decode(body, None, config)
    for part in expected:
        assert part in info.value.message, (part, info.value.message)


def test_integer_extremes_are_accepted():
    for datatype in ("UINT64", "INT64", "UINT8", "INT8"):
        info = np.iinfo(numpy_dtype(datatype))
        config = make_config([("v", datatype, [-1])])
        body = json.dumps({"inputs": [{"name": "v", "shape": [2], "datatype": datatype,
                                       "data": [int(info.min), int(info.max)]}]}).encode()
        assert decode(body, None, config).inputs["v"].tolist() == [info.min, info.max]


def test_lone_surrogate_in_bytes_string():
    config = make_config([("s", "BYTES", [-1])])
    with pytest.raises(BadRequest, match="'s'.*not valid Unicode"):
        decode(b'{"inputs":[{"name":"s","shape":[1],"datatype":"BYTES","data":["\\ud800"]}]}', None, config)


@pytest.mark.parametrize("body, fragment", [
    (b"", "not valid JSON"),
    (b"{", "not valid JSON"),
    (b"[]", "JSON object"),
    (b"null", "JSON object"),
    (b'{"inputs": [{"name": "\xff"}]}', "not valid UTF-8"),
    (b"\xef\xbb\xbf{}", "not valid JSON"),
    ('{"inputs": []}'.encode("utf-16"), "UTF-8"),
    (b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[' + b"9" * 5000 + b"]}]}", "not valid JSON"),
])
def test_malformed_json(body, fragment):
    with pytest.raises(BadRequest, match=fragment):
        decode(body, None, make_config([("x", "FP32", [-1])]))


BIN_CONFIG = make_config([("f", "FP32", [-1, 2]), ("b", "BOOL", [-1]), ("s", "BYTES", [-1])])


def bin_body(f_size=8, b_size=1, s_size=8, tail=b"", f=None, b=b"\x01", s=None, extra_f=None):
    items = [{"name": "f", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": f_size}, **(extra_f or {})},
             {"name": "b", "shape": [1], "datatype": "BOOL", "parameters": {"binary_data_size": b_size}},
             {"name": "s", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": s_size}}]
    header = json.dumps({"inputs": items}).encode()
    data = (f if f is not None else struct.pack("<2f", 1, 2)) + b + (s if s is not None else struct.pack("<I", 4) + b"abcd")
    return header + data + tail, len(header)


def test_bin_body_is_valid():
    req = decode(*bin_body(), BIN_CONFIG)
    assert req.inputs["f"].tolist() == [[1.0, 2.0]] and req.inputs["b"].tolist() == [True]
    assert req.inputs["s"].tolist() == [b"abcd"]


@pytest.mark.parametrize("make, fragment", [
    (lambda: (bin_body()[0], len(bin_body()[0]) + 1), "Inference-Header-Content-Length is"),
    (lambda: (bin_body()[0], -1), "Inference-Header-Content-Length is"),
    (lambda: (bin_body()[0], bin_body()[1] - 3), "not valid JSON"),
    (lambda: (bin_body()[0], bin_body()[1] + 3), "JSON"),
    (lambda: bin_body(tail=b"\x00"), "1 bytes after the JSON header are not claimed"),
    (lambda: bin_body(f_size=12, f=struct.pack("<3f", 1, 2, 3)), "'f': 12 bytes of binary data, but shape [1, 2] of FP32 needs 8"),
    (lambda: bin_body(s_size=9), "'s': binary_data_size 9 runs past the end"),
    (lambda: bin_body(f_size="8"), "'f': binary_data_size must be a non-negative integer"),
    (lambda: bin_body(f_size=-8), "'f': binary_data_size must be"),
    (lambda: bin_body(extra_f={"data": [1, 2]}), "'f' has both 'data' and"),
    (lambda: bin_body(b=b"\x02"), "'b': BOOL binary data must be bytes 0 or 1"),
    (lambda: bin_body(s_size=3, s=b"\x04\x00\x00"), "'s': 1 BYTES elements need at least 4 bytes"),
    (lambda: bin_body(s_size=6, s=struct.pack("<I", 4) + b"ab"), "'s': BYTES element 0 claims 4 bytes but only 2"),
    (lambda: bin_body(s_size=10, s=struct.pack("<I", 4) + b"abcdef"), "'s': 2 bytes are left after the 1 BYTES elements"),
])
@pytest.mark.parametrize("cached", [False, True], ids=["fresh", "header-plan-cached"])
def test_bad_binary_requests(make, fragment, cached):
    # With a plan cache warmed by a valid request, a bad body with the same JSON header takes the
    # cached path, which must check the data just as strictly.
    plans = {} if cached else None
    if cached:
        decode(*bin_body(), BIN_CONFIG, plans=plans)
        assert len(plans) == 1
    body, n = make()
    with pytest.raises(BadRequest) as info:
        decode(body, n, BIN_CONFIG, plans=plans)
    assert fragment in info.value.message, info.value.message


def test_header_plans_are_reused_only_for_binary_headers_without_a_nonempty_id():
    plans: dict = {}
    first = decode(*bin_body(f=struct.pack("<2f", 1, 2)), BIN_CONFIG, plans=plans)
    second = decode(*bin_body(f=struct.pack("<2f", 3, 4)), BIN_CONFIG, plans=plans)
    assert len(plans) == 1
    assert first.inputs["f"].tolist() == [[1.0, 2.0]] and second.inputs["f"].tolist() == [[3.0, 4.0]]

    # Per-request parts of a reused plan are copies: one request's changes never reach another's.
    cfg = make_config([("x", "FP32", [-1, 2])], outputs=(("out", "FP32", [-1, 2]),))
    body, n = build_body([("x", "FP32", np.ones((1, 2), np.float32))], binary={"x"},
                         extra={"parameters": {"tag": "a"}, "outputs": [{"name": "out", "parameters": {"binary_data": True, "k": 1}}]})
    a = decode(body, n, cfg, plans=plans)
    a.parameters["tag"] = "changed"
    a.outputs[0].parameters["k"] = 2
    b = decode(body, n, cfg, plans=plans)
    assert b.parameters == {"tag": "a"} and b.outputs[0].parameters == {"k": 1} and b.outputs[0].binary is True

    # Kept: an empty id, which perf_analyzer sends with every request; it still comes back as given.
    plans.clear()
    body, n = build_body([("x", "FP32", np.ones((1, 2), np.float32))], binary={"x"}, extra={"id": ""})
    assert decode(body, n, cfg, plans=plans).id == "" and len(plans) == 1
    assert decode(body, n, cfg, plans=plans).id == "" and len(plans) == 1

    # Not kept: a header with a non-empty id (it differs per request) or with JSON data in it.
    plans.clear()
    body, n = build_body([("x", "FP32", np.ones((1, 2), np.float32))], binary={"x"}, extra={"id": "r1"})
    assert decode(body, n, cfg, plans=plans).id == "r1" and not plans
    body, n = build_body([("x", "FP32", np.ones((1, 2), np.float32)), ("y", "FP32", np.ones((1, 2), np.float32))],
                         binary={"x"})
    cfg2 = make_config([("x", "FP32", [-1, 2]), ("y", "FP32", [-1, 2])])
    assert decode(body, n, cfg2, plans=plans).inputs["y"].tolist() == [[1.0, 1.0]] and not plans

    # Bounded: many distinct headers never hold more than the limit.
    for rows in range(1, 4):
        for extra in range(40):
            body, n = build_body([("x", "FP32", np.ones((rows, 2), np.float32))], binary={"x"},
                                 extra={"parameters": {"n": extra}})
            assert decode(body, n, cfg, plans=plans).inputs["x"].shape == (rows, 2)
            assert len(plans) <= P._MAX_PLANS


def test_giant_shapes_are_refused_without_allocating():
    batched = make_config([("x", "FP32", [-1, 2]), ("s", "BYTES", [-1])], max_batch_size=8)
    flat = make_config([("x", "FP32", [-1, 2]), ("s", "BYTES", [-1])], max_batch_size=0)

    def body(shape_x, shape_s, binary):
        items = [{"name": "x", "shape": shape_x, "datatype": "FP32"}, {"name": "s", "shape": shape_s, "datatype": "BYTES"}]
        if binary:
            items[0]["parameters"] = {"binary_data_size": 8}
            items[1]["parameters"] = {"binary_data_size": 8}
            header = json.dumps({"inputs": items}).encode()
            return header + b"\x00" * 16, len(header)
        items[0]["data"], items[1]["data"] = [1, 2, 3, 4], ["a"]
        return json.dumps({"inputs": items}).encode(), None

    cases = [
        (batched, [2 ** 62, 2], [2 ** 62], False, "batch size"),
        (flat, [2 ** 62, 2], [1], False, "more than the server's limit"),
        (flat, [2 ** 40, 2], [1], True, "more than the server's limit"),
        (flat, [1, 2], [2 ** 40], True, "more than the server's limit"),
        (flat, [0, 10 ** 30], [1], False, "'x'"),
        (flat, [1, 2], [2 ** 20], True, "'s': 1048576 BYTES elements need at least"),
    ]
    tracemalloc.start()
    try:
        for config, sx, ss, binary, fragment in cases:
            tracemalloc.reset_peak()
            with pytest.raises(BadRequest) as info:
                decode(*body(sx, ss, binary), config)
            assert fragment in info.value.message, info.value.message
            assert tracemalloc.get_traced_memory()[1] < 1 << 20, (sx, ss)
    finally:
        tracemalloc.stop()


def test_max_elements_limit():
    config = make_config([("x", "UINT8", [-1, -1])])
    body, _ = build_body([("x", "UINT8", np.zeros((2, 100), np.uint8))])
    assert decode(body, None, config, max_elements=200).inputs["x"].shape == (2, 100)
    with pytest.raises(BadRequest, match="'x'.*200 elements.*limit of 199"):
        decode(body, None, config, max_elements=199)


# ---------------------------------------------------------------------------------------------
# Helpers for the gRPC service


def test_check_inputs_for_grpc():
    config = make_config([("a", "FP32", [-1, 2]), ("b", "BYTES", [-1])])
    a, b = np.zeros((3, 2), np.float32), np.array([b"x", b"y", b"z"], dtype=object)
    got = P.check_inputs([("b", "BYTES", b), ("a", "FP32", a)], config)
    assert list(got) == ["a", "b"] and got["a"] is a
    with pytest.raises(BadRequest, match="'a' is given more than once"):
        P.check_inputs([("a", "FP32", a), ("a", "FP32", a), ("b", "BYTES", b)], config)
    with pytest.raises(BadRequest, match="missing input 'b'"):
        P.check_inputs([("a", "FP32", a)], config)
    with pytest.raises(BadRequest, match="'a'.*float64.*FP32"):
        P.check_inputs([("a", "FP32", a.astype(np.float64)), ("b", "BYTES", b)], config)
    with pytest.raises(BadRequest, match="'a'.*dimension 1 is 3"):
        P.check_inputs([("a", "FP32", np.zeros((3, 3), np.float32)), ("b", "BYTES", b)], config)
    with pytest.raises(BadRequest, match="different batch sizes"):
        P.check_inputs([("a", "FP32", a), ("b", "BYTES", b[:2])], config)
    assert P.check_input("a", "FP32", [4, 2], config) == 8
    with pytest.raises(BadRequest, match="'b'.*INT8.*BYTES"):
        P.check_input("b", "INT8", [1], config)


def test_array_from_bytes_checks_size_against_shape():
    with pytest.raises(BadRequest, match="'w': 7 bytes.*needs 8"):
        P.array_from_bytes(b"\x00" * 7, "INT32", [2], name="w")
    with pytest.raises(BadRequest, match="unknown datatype"):
        P.array_from_bytes(b"", "FP8", [0])
    assert P.array_from_bytes(b"", "FP32", [0, 3]).shape == (0, 3)


# ---------------------------------------------------------------------------------------------
# Client-side codec (load generator)


def test_client_request_encoder_round_trips_through_the_decoder():
    config = make_config([("x", "FP16", [-1, 2]), ("s", "BYTES", [-1])], [("y", "FP16", [-1, 2])])
    x, s = np.array([[1.5, -2]], np.float16), np.array([b"hi"], dtype=object)
    for binary in (True, False, ["s"]):
        body, headers = P.encode_infer_request(
            {"x": x, "s": s}, binary=binary, id="9", binary_output=True,
            outputs=[RequestedOutput("y", binary=False)], parameters={"priority": 1})
        n = int(headers[P.HEADER_LENGTH]) if P.HEADER_LENGTH in headers else None
        assert (n is None) == (binary is False)
        req = decode(body, n, config)
        assert req.inputs["x"].tolist() == x.tolist() and req.inputs["s"].tolist() == [b"hi"]
        assert (req.id, req.priority, req.binary_output) == ("9", 1, True)
        assert req.outputs == [RequestedOutput("y", binary=False)]


def test_client_response_decoder():
    req = request_with({"parameters": {"binary_data_output": True}, "outputs": [{"name": "label"}, {"name": "scores"}]})
    body, headers = P.encode_infer_response(InferResponse(model="m", version=7, outputs=dict(OUT_ARRAYS)), OUT_CONFIG, req)
    got = P.decode_infer_response(body, int(headers[P.HEADER_LENGTH]))
    assert (got.model, got.version, list(got.outputs)) == ("m", 7, ["label", "scores"])
    assert got.outputs["label"].tolist() == [b"cat"] and got.outputs["scores"].tolist() == [[0.25, 0.5, 0.25]]


# ---------------------------------------------------------------------------------------------
# Metadata documents


def test_server_metadata():
    assert P.server_metadata("serve-kit", "0.1.0", ["binary_tensor_data"]) == \
        {"name": "serve-kit", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
    assert "binary_tensor_data" in P.server_metadata("s", "1")["extensions"]


@pytest.mark.parametrize("backend, platform", [("onnxruntime", "onnxruntime_onnx"),
                                               ("torchscript", "pytorch_libtorch"),
                                               ("tensorrt", "tensorrt_plan")])
def test_model_metadata_reports_the_batch_dimension_like_triton(backend, platform):
    config = make_config([("pixels", "FP32", [-1, 1, 8, 8])], [("logits", "FP32", [-1, 10])], backend=backend)
    meta = P.model_metadata(config, [1, 3])
    assert meta == {"name": "m", "versions": ["1", "3"], "platform": platform,
                    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
                    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]}
    flat = make_config([("pixels", "FP32", [1, 8, 8])], [("logits", "FP32", [10])], max_batch_size=0)
    assert P.model_metadata(flat, [1])["inputs"][0]["shape"] == [1, 8, 8]


def test_model_config_json_has_tritons_shape():
    config = make_config([("ids", "INT64", [-1, -1]), ("text", "BYTES", [-1]), ("flag", "BOOL", [-1, 1])],
                         [("emb", "FP16", [-1, 384])], max_batch_size=32, backend="torchscript",
                         dynamic_batching={"max_queue_delay_microseconds": 100, "preferred_batch_size": [8, 16],
                                           "max_queue_size": 64, "default_timeout_microseconds": 5000,
                                           "priority_levels": 2, "default_priority_level": 1},
                         instance_group={"count": 2, "kind": "CPU"}, version_policy={"latest": 2},
                         parameters={"intra_op_threads": "4"})
    doc = P.model_config_json(config)
    assert orjson.loads(orjson.dumps(doc)) == doc  # plain JSON types only
    assert (doc["name"], doc["platform"], doc["backend"], doc["max_batch_size"]) == \
        ("m", "pytorch_libtorch", "pytorch", 32)
    assert [(i["name"], i["data_type"], i["dims"]) for i in doc["input"]] == \
        [("ids", "TYPE_INT64", [-1]), ("text", "TYPE_STRING", [1]), ("flag", "TYPE_BOOL", [1])]
    assert doc["input"][1]["reshape"] == {"shape": []} and "reshape" not in doc["input"][0]
    assert all(i["optional"] is False and i["is_shape_tensor"] is False for i in doc["input"])
    assert [(o["name"], o["data_type"], o["dims"]) for o in doc["output"]] == [("emb", "TYPE_FP16", [384])]
    db = doc["dynamic_batching"]
    assert (db["max_queue_delay_microseconds"], db["preferred_batch_size"], db["priority_levels"],
            db["default_priority_level"]) == (100, [8, 16], 2, 1)
    assert db["default_queue_policy"]["max_queue_size"] == 64
    assert db["default_queue_policy"]["default_timeout_microseconds"] == 5000
    assert doc["instance_group"][0]["kind"] == "KIND_CPU" and doc["instance_group"][0]["count"] == 2
    assert doc["version_policy"] == {"latest": {"num_versions": 2}}
    assert doc["parameters"] == {"intra_op_threads": {"string_value": "4"}}
    assert doc["model_transaction_policy"] == {"decoupled": False}


def test_model_config_json_variants():
    flat = make_config([("x", "FP32", [3, 4])], max_batch_size=0, version_policy={"all": True})
    doc = P.model_config_json(flat)
    assert doc["input"][0]["dims"] == [3, 4] and doc["max_batch_size"] == 0
    assert "dynamic_batching" not in doc  # perf_analyzer reads its presence as "dynamic batching on"
    assert doc["version_policy"] == {"all": {}}
    assert P.model_config_json(make_config([("x", "FP32", [-1])], version_policy={"specific": [2, 5]}))[
        "version_policy"] == {"specific": {"versions": [2, 5]}}


def test_metadata_and_config_agree_the_way_perf_analyzer_reads_them():
    """perf_analyzer: shapes from metadata (dropping the first dim when max_batch_size > 0), and
    every config input must have a metadata entry."""
    for config in (make_config([("a", "FP32", [-1, 3, -1]), ("b", "INT32", [-1, 2])], max_batch_size=16),
                   make_config([("a", "FP32", [3, -1])], max_batch_size=0)):
        meta, cfg = P.model_metadata(config, [1]), P.model_config_json(config)
        shapes = {t["name"]: t["shape"][1:] if cfg["max_batch_size"] > 0 else t["shape"] for t in meta["inputs"]}
        assert {i["name"]: i["dims"] for i in cfg["input"]} == shapes


# ---------------------------------------------------------------------------------------------
# Property-based: random valid requests round-trip; random damage only ever gives BadRequest


NAMES = st.text(min_size=1, max_size=6)


def element_strategy(datatype: str, binary: bool):
    if datatype == "BYTES":
        text = st.text(max_size=6).map(lambda s: s.encode("utf-8"))
        return st.one_of(text, st.binary(max_size=6)) if binary else text
    return None


@st.composite
def cases(draw):
    """(config, [(name, datatype, array)], binary names, nested names)."""
    batched = draw(st.booleans())
    max_batch = draw(st.integers(1, 6)) if batched else 0
    batch = draw(st.integers(1, max_batch)) if batched else None
    names = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    specs, entries, binary, nested = [], [], set(), set()
    for name in names:
        datatype = draw(st.sampled_from(ALL_DATATYPES))
        dims = draw(st.lists(st.one_of(st.just(-1), st.integers(1, 3)), max_size=3))
        concrete = [d if d != -1 else draw(st.integers(0, 3)) for d in dims]
        shape = ([batch] if batched else []) + concrete
        is_binary = draw(st.booleans())
        if is_binary:
            binary.add(name)
        elif draw(st.booleans()):
            nested.add(name)
        if datatype == "BYTES":
            items = draw(st.lists(element_strategy(datatype, is_binary), min_size=math.prod(shape),
                                  max_size=math.prod(shape)))
            arr = np.empty(len(items), dtype=object)
            arr[:] = items
            arr = arr.reshape(shape)
        else:
            arr = draw(hnp.arrays(numpy_dtype(datatype), shape))
        specs.append((name, datatype, ([-1] if batched else []) + dims))
        entries.append((name, datatype, arr))
    # Binary BYTES may be any bytes for a backend that does not take them as text.
    config = make_config(specs, max_batch_size=max_batch, backend="torchscript")
    return config, draw(st.permutations(entries)), binary, nested


@settings(HYPOTHESIS, max_examples=150)
@given(case=cases())
def test_random_valid_requests_round_trip(case):
    config, entries, binary, nested = case
    body, n = build_body(entries, binary=binary, nested=nested)
    req = decode(body, n, config)
    assert list(req.inputs) == [t.name for t in config.inputs]
    for name, datatype, arr in entries:
        assert_same(req.inputs[name], arr, datatype, exact_bits=name in binary)


@settings(HYPOTHESIS, max_examples=100)
@given(case=cases(), data=st.data())
def test_random_responses_encode_exactly(case, data):
    config, entries, _, _ = case
    # The random tensors become the model's outputs.
    shapes = {t.name: t.shape for t in config.inputs}
    specs = [(name, dt, shapes[name]) for name, dt, _ in entries]
    outputs_config = make_config(specs, specs, max_batch_size=config.max_batch_size)
    arrays = {name: arr for name, _, arr in entries}
    datatypes = {name: dt for name, dt, _ in entries}
    # BYTES outputs that are not UTF-8 can only travel as binary.
    text_ok = {name for name, dt, arr in entries
               if dt != "BYTES" or all(_is_utf8(x) for x in arr.ravel().tolist())}
    chosen = data.draw(st.lists(st.sampled_from(sorted(arrays)), unique=True))
    flags = [data.draw(st.sampled_from([None, True, False] if name in text_ok else [True])) for name in chosen]
    default_binary = data.draw(st.booleans()) if text_ok >= set(arrays) else True
    req = InferRequest(model="m", inputs={}, outputs=[RequestedOutput(n, b) for n, b in zip(chosen, flags)] or None,
                       binary_output=default_binary, id=data.draw(st.none() | st.text(max_size=5)))
    body, headers = P.encode_infer_response(InferResponse(model="m", version=4, outputs=arrays), outputs_config, req)

    doc, tail = split_response(body, headers)
    want_order = chosen or [t.name for t in outputs_config.outputs]
    assert [o["name"] for o in doc["outputs"]] == want_order
    assert doc.get("id") == req.id and doc["model_version"] == "4"
    offset = 0
    for o, flag in zip(doc["outputs"], flags or [None] * len(want_order)):
        name = o["name"]
        arr, datatype = arrays[name], datatypes[name]
        assert (o["datatype"], o["shape"]) == (datatype, list(arr.shape))
        if (default_binary if flag is None else flag):
            size = o["parameters"]["binary_data_size"]
            assert tail[offset:offset + size] == wire_bytes(arr, datatype)
            offset += size
        else:
            if datatype == "BYTES":
                got = np.array([s.encode() for s in o["data"]] or [], dtype=object).reshape(arr.shape)
            else:
                got = np.array(o["data"], dtype=numpy_dtype(datatype)).reshape(arr.shape)
            assert_same(got, arr, datatype, exact_bits=False)
    assert offset == len(tail)
    any_binary = any("parameters" in o for o in doc["outputs"])
    assert (P.HEADER_LENGTH in headers) == any_binary
    assert headers["Content-Type"] == ("application/octet-stream" if any_binary else "application/json")


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def assert_fits_config(req: InferRequest, config: ModelConfig):
    """What a successful decode promises the scheduler, checked independently of the decoder."""
    assert set(req.inputs) == {t.name for t in config.inputs}
    batches = set()
    for t in config.inputs:
        arr = req.inputs[t.name]
        assert arr.dtype == (np.dtype(object) if t.datatype == "BYTES" else numpy_dtype(t.datatype))
        assert arr.ndim == len(t.shape)
        for i, (got, want) in enumerate(zip(arr.shape, t.shape)):
            assert want == -1 or got == want
        if config.max_batch_size:
            assert 1 <= arr.shape[0] <= config.max_batch_size
            batches.add(arr.shape[0])
        if t.datatype == "BYTES":
            assert all(type(x) is bytes for x in arr.ravel().tolist())
        if t.datatype == "BOOL" and arr.size:
            assert arr.view(np.uint8).max() <= 1  # only canonical true/false bytes reach a backend
    assert len(batches) <= 1


def decode_or_bad_request(body, n, config):
    try:
        req = decode(body, n, config)
    except BadRequest as e:
        assert e.message and len(e.message) < 2000
        return None
    assert_fits_config(req, config)
    # Byte accounting, recomputed here: the body is the JSON header and exactly the declared tensors.
    header_end = len(body) if n is None else n
    claimed = 0
    for item in json.loads(body[:header_end])["inputs"]:
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            assert size == len(wire_bytes(req.inputs[item["name"]], item["datatype"]))
            claimed += size
    assert header_end + claimed == len(body)
    return req


@settings(HYPOTHESIS, max_examples=200)
@given(case=cases(), data=st.data())
def test_damaged_bodies_give_bad_request_only(case, data):
    config, entries, binary, nested = case
    body, n = build_body(entries, binary=binary, nested=nested)
    kind = data.draw(st.sampled_from(["truncate", "flip", "insert", "delete", "header_length", "splice"]))
    if n is not None and n < len(body) and data.draw(st.booleans()):
        pos = data.draw(st.integers(n, len(body) - 1))  # aim at the binary tensors half of the time
    else:
        pos = data.draw(st.integers(0, len(body)))
    if kind == "truncate":
        body = body[:pos]
    elif kind == "flip" and body:
        pos = min(pos, len(body) - 1)
        body = body[:pos] + bytes([body[pos] ^ data.draw(st.integers(1, 255))]) + body[pos + 1:]
    elif kind == "insert":
        body = body[:pos] + data.draw(st.binary(min_size=1, max_size=8)) + body[pos:]
    elif kind == "delete":
        body = body[:pos] + body[pos + data.draw(st.integers(1, 8)):]
    elif kind == "header_length":
        n = data.draw(st.none() | st.integers(-2, len(body) + 2))
    else:
        body = body[:pos] + data.draw(st.sampled_from([b"NaN", b"[", b"]", b"{}", b'"', b"\\u0000", b"1e999", b"-"])) + body[pos:]
    decode_or_bad_request(body, n, config)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(max_size=4)
    | st.sampled_from(["FP32", "BYTES", "BOOL", "INT64", "binary_data_size", "data", "shape"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=8)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


@settings(HYPOTHESIS, max_examples=250)
@given(case=cases(), data=st.data())
def test_structurally_mutated_json_gives_bad_request_only(case, data):
    """Replace, delete or add one node anywhere in a valid request document (binary tails kept)."""
    config, entries, binary, nested = case
    body, n = build_body(entries, binary=binary, nested=nested,
                         extra=data.draw(st.sampled_from([{}, {"id": "r"}, {"outputs": [{"name": "out"}]},
                                                          {"parameters": {"binary_data_output": True}}])))
    header_len = n if n is not None else len(body)
    doc, tail = json.loads(body[:header_len]), body[header_len:]
    path = data.draw(st.sampled_from(list(_paths(doc))))
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if not path:  # the document itself
        doc = data.draw(JSON_VALUES)
        action = "done"
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if action == "replace":
        parent[path[-1]] = data.draw(JSON_VALUES)
    elif action == "delete":
        del parent[path[-1]]
    elif action == "done":
        pass
    elif isinstance(parent, dict):
        parent[data.draw(st.sampled_from(["parameters", "data", "shape", "name", "datatype", "binary_data_size",
                                          "outputs", "inputs", "priority", "timeout"]))] = data.draw(JSON_VALUES)
    else:
        parent.insert(path[-1], data.draw(JSON_VALUES))
    header = json.dumps(doc).encode()
    decode_or_bad_request(header + tail, len(header) if (tail or data.draw(st.booleans())) else None, config)


@settings(HYPOTHESIS, max_examples=150)
@given(body=st.binary(max_size=200), n=st.none() | st.integers(-3, 210))
def test_garbage_gives_bad_request_only(body, n):
    decode_or_bad_request(body, n, BIN_CONFIG)
