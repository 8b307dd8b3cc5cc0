"""The gRPC frontend against hostile clients (issue 13): undecodable messages, versions of any text,
oversized metadata and messages, BYTES that are not text. Real gRPC server, real ONNX Runtime
models, raw channels (the generated stub and byte-level calls); hypothesis for the version space."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rt_models import config, identity_onnx, write_ident_and_text, write_version
from rt_server import GrpcServer

from serve_kit.runtime.grpc_service import serve_grpc
from serve_kit.runtime.proto import grpc_service_pb2 as pb
from serve_kit.runtime.proto import grpc_service_pb2_grpc as pb_grpc

T = 20
CASES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SERVICE = "/inference.GRPCInferenceService/"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc-hostile")
    write_ident_and_text(root)
    s = GrpcServer(root, grpc={"max_message_bytes": 1 << 20}).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def channel(server):
    ch = grpc.insecure_channel(f"127.0.0.1:{server.grpc.port}")
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.GRPCInferenceServiceStub(channel)


def ident_request(version: str = "", x=None) -> pb.ModelInferRequest:
    x = np.ones((1, 4), np.float32) if x is None else x
    req = pb.ModelInferRequest(model_name="ident", model_version=version)
    req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req


def assert_serving(stub) -> None:
    out = stub.ModelInfer(ident_request(), timeout=T)
    assert np.frombuffer(out.raw_output_contents[0], np.float32).tolist() == [1.0] * 4


@pytest.mark.parametrize("method", ["ModelInfer", "ModelMetadata", "ModelReady", "ServerLive", "RepositoryIndex"])
@pytest.mark.parametrize("raw", [b"\xff\xff\xff\xff", b"\x0a\xff\x01", b"\x08" + b"\xff" * 11, b"\x12\x05abc"])
def test_undecodable_messages_are_invalid_argument(server, channel, stub, method, raw):
    call = channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as e:
        call(raw, timeout=T)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details())
    assert "not a valid inference." in e.value.details()
    assert_serving(stub)


def test_an_undecodable_message_in_a_stream_gets_an_error_and_the_stream_goes_on(server, channel):
    call = channel.stream_stream(SERVICE + "ModelStreamInfer", request_serializer=None,
                                 response_deserializer=pb.ModelStreamInferResponse.FromString)
    good = ident_request().SerializeToString()
    answers = list(call(iter([good, b"\xff\xff\xff", good]), timeout=T))
    assert len(answers) == 3
    errors = [a.error_message for a in answers if a.error_message]
    assert len(errors) == 1 and "not a valid inference.ModelInferRequest" in errors[0]


@CASES
@given(text=st.one_of(st.integers(0, 2**70).map(str), st.text(max_size=30),
                      st.sampled_from(["9" * 5000, "1" * 4301, "-1", "1_0", " 1", "１"])))
def test_any_version_is_invalid_argument_or_not_found(server, stub, text):
    valid = text.isascii() and text.isdigit() and len(text) <= 19 and 1 <= int(text) < 2**63
    for call in (lambda: stub.ModelInfer(ident_request(text), timeout=T),
                 lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="ident", version=text), timeout=T),
                 lambda: stub.ModelReady(pb.ModelReadyRequest(name="ident", version=text), timeout=T)):
        try:
            call()
            assert text == "" or (valid and int(text) == 1) or valid, text
        except grpc.RpcError as e:
            expected = grpc.StatusCode.NOT_FOUND if valid else grpc.StatusCode.INVALID_ARGUMENT
            assert e.code() == expected, (text[:40], e.code(), e.details()[:200])
            assert "internal" not in e.details().lower()


def test_metadata_over_the_limit_is_refused(server, stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.ServerLive(pb.ServerLiveRequest(), metadata=[("x-big", "m" * 64 * 1024)], timeout=T)
    assert e.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL), e.value.code()
    assert stub.ServerLive(pb.ServerLiveRequest(), metadata=[("x-small", "s" * 1024)], timeout=T).live
    assert_serving(stub)


def test_message_over_the_body_limit_is_resource_exhausted(server, stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(ident_request(x=np.ones((8, 40000), np.float32)), timeout=T)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_serving(stub)


def test_bytes_that_are_not_text_fail_only_their_own_request(server, stub):
    def text_request(items):
        req = pb.ModelInferRequest(model_name="text")
        req.inputs.add(name="text", datatype="BYTES", shape=[1, 2])
        req.raw_input_contents.append(b"".join(len(b).to_bytes(4, "little") + b for b in items))
        return req

    good, bad = text_request([b"ab", "h\xe9".encode()]), text_request([b"\xff\xfe", b"ok"])
    futures = [(i % 2 == 0, stub.ModelInfer.future(bad if i % 2 == 0 else good, timeout=T)) for i in range(40)]
    for is_bad, fut in futures:
        if is_bad:
            with pytest.raises(grpc.RpcError) as e:
                fut.result()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not UTF-8" in e.value.details()
        else:
            out = fut.result()
            assert out.raw_output_contents[0].endswith("h\xe9".encode())


def test_serve_gives_grpc_the_same_body_limit_as_http(tmp_path):
    """`serve --max-body-mb` bounds gRPC messages too (it was a fixed 64 MiB)."""
    from rt_server import InProcessServer

    write_version(tmp_path, config("ident", 4, 4, max_batch_size=8), identity_onnx(4))
    srv = InProcessServer(tmp_path, max_body_bytes=1 << 20)
    srv.options.grpc_port = 0
    srv.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.info['grpc_port']}") as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(ident_request(x=np.ones((8, 40000), np.float32)), timeout=T)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
            assert_serving(stub)
    finally:
        srv.stop()


@pytest.mark.parametrize("name", ["..", "/etc", "../x", ".hidden", "a" * 300])
def test_load_and_unload_take_model_names_only(server, name):
    async def managed():
        return await serve_grpc(server.manager, port=0, management_token="t0ken")

    s = server.call(managed(), timeout=T)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{s.port}") as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            for call, req in ((stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=name)),
                              (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=name))):
                with pytest.raises(grpc.RpcError) as e:
                    call(req, metadata=[("authorization", "Bearer t0ken")], timeout=T)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "is not a model name" in e.value.details()
    finally:
        server.call(s.stop(1), timeout=T)
