"""Generated gRPC requests against a real `serve-kit serve`: random and garbage ModelInferRequest
fields, and raw undecodable bytes sent through a generic channel with identity serializers.

A client's mistake is never UNKNOWN or INTERNAL (nor a hang: every call has a deadline), and the
well-behaved HTTP client keeps being answered. Raw undecodable bytes frontend fix (on main
they were UNKNOWN instead of INVALID_ARGUMENT).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hostile_kit import HYPOTHESIS_CASES, MLP
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rt_models import mlp_reference

from serve_kit.runtime.proto import grpc_service_pb2 as pb

SETTINGS = settings(max_examples=HYPOTHESIS_CASES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
BAD_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}
SERVICE = "/inference.GRPCInferenceService/"
INT64 = st.integers(-2**63, 2**63 - 1)


@pytest.fixture(scope="module")
def channel(server):
    ch = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}",
                               options=[("grpc.max_receive_message_length", 64 << 20)])
    yield ch
    ch.close()


def call(channel, method: str, request, response_type=None, timeout: float = 20):
    """A unary call; raw bytes when `response_type` is None. Returns (code, response or None)."""
    fn = channel.unary_unary(SERVICE + method, request_serializer=None if isinstance(request, bytes)
                             else type(request).SerializeToString,
                             response_deserializer=None if response_type is None else response_type.FromString)
    try:
        return grpc.StatusCode.OK, fn(request, timeout=timeout)
    except grpc.RpcError as e:
        return e.code(), e.details()


params = st.dictionaries(st.sampled_from(["binary_data_size", "timeout", "priority", "shared_memory_region", "x"]),
                         st.one_of(st.builds(lambda v: pb.InferParameter(bool_param=v), st.booleans()),
                                   st.builds(lambda v: pb.InferParameter(int64_param=v), INT64),
                                   st.builds(lambda v: pb.InferParameter(string_param=v), st.text(max_size=10)),
                                   st.builds(lambda v: pb.InferParameter(double_param=v), st.floats())),
                         max_size=3)


@st.composite
def infer_requests(draw) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(
        model_name=draw(st.sampled_from(["mlp", "gather", "seq", "", "nope", "../mlp", "mlp\x00"]) | st.text(max_size=8)),
        model_version=draw(st.sampled_from(["", "1", "2", "0", "-1", "01", "9" * 5000, "1.5", " 1"])
                           | st.text(max_size=6)),
        id=draw(st.text(max_size=10)))
    for k, v in draw(params).items():
        req.parameters[k].CopyFrom(v)
    for _ in range(draw(st.integers(0, 3))):
        t = req.inputs.add()
        t.name = draw(st.sampled_from(["x", "idx", "y", ""]) | st.text(max_size=5))
        t.datatype = draw(st.sampled_from(["FP32", "INT64", "BYTES", "BOOL", "FP16", "UINT8", "", "fp32", "INT4"]))
        t.shape.extend(draw(st.lists(st.one_of(st.integers(-2, 6), st.sampled_from([2**31, 2**62, -2**63])),
                                     max_size=4)))
        for k, v in draw(params).items():
            t.parameters[k].CopyFrom(v)
        which = draw(st.sampled_from(["none", "fp32", "int64", "bytes", "bool", "mixed"]))
        if which in ("fp32", "mixed"):
            t.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=12)))
        if which in ("int64", "mixed"):
            t.contents.int64_contents.extend(draw(st.lists(INT64, max_size=12)))
        if which == "bytes":
            t.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=8), max_size=6)))
        if which == "bool":
            t.contents.bool_contents.extend(draw(st.lists(st.booleans(), max_size=12)))
    if draw(st.booleans()):
        req.raw_input_contents.extend(draw(st.lists(st.binary(max_size=64), max_size=3)))
    for name in draw(st.lists(st.sampled_from(["y", "s", "zz", ""]), max_size=2)):
        req.outputs.add().name = name
    return req


@SETTINGS
@given(req=infer_requests())
def test_generated_infer_requests_are_never_unknown_or_internal(server, good_client, channel, req):
    code, got = call(channel, "ModelInfer", req, pb.ModelInferResponse)
    assert code not in BAD_CODES, (code, str(got)[:300])


@SETTINGS
@given(data=st.binary(max_size=300), method=st.sampled_from(["ModelInfer", "ModelMetadata", "ModelReady",
                                                             "ModelConfig", "ModelStatistics", "RepositoryIndex"]))
def test_raw_bytes_are_never_unknown_or_internal(server, good_client, channel, data, method):
    """frontend fix: undecodable protobuf was UNKNOWN, not INVALID_ARGUMENT."""
    code, got = call(channel, method, data)
    assert code not in BAD_CODES, (code, str(got)[:300])


@pytest.mark.parametrize("data", [b"\xff" * 16, b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05ab", b"\x80"])
def test_undecodable_protobuf_is_invalid_argument(server, good_client, channel, data):
    """frontend fix."""
    code, got = call(channel, "ModelInfer", data)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, got)


def test_valid_grpc_inference_still_answers_correctly_after_the_garbage(server, channel):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    req = pb.ModelInferRequest(model_name="mlp")
    t = req.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    req.raw_input_contents.append(x.tobytes())
    t.ClearField("contents")
    code, resp = call(channel, "ModelInfer", req, pb.ModelInferResponse)
    assert code == grpc.StatusCode.OK, resp
    y = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(2, 3)
    np.testing.assert_allclose(y, mlp_reference(x, *MLP), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,request_type", [("ModelInfer", pb.ModelInferRequest), ("ModelReady", pb.ModelReadyRequest),
                                                 ("ModelMetadata", pb.ModelMetadataRequest)])
def test_a_version_of_thousands_of_digits_is_not_internal(server, good_client, channel, method, request_type):
    """frontend fix: was INTERNAL with a traceback per request (Python's int-size guard)."""
    fields = {"model_name": "mlp", "model_version": "9" * 5000} if method == "ModelInfer" else \
        {"name": "mlp", "version": "9" * 5000}
    code, got = call(channel, method, request_type(**fields), None)
    assert code not in BAD_CODES, (code, got)
