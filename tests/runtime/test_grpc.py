"""serve_kit.runtime.grpc_service: the KServe v2 / Triton gRPC service, driven by real tritonclient.

A real repository (Staging API) of real ONNX models built with onnx.helper, the real ModelManager
and the gRPC server on 127.0.0.1 in a background event loop; the client is tritonclient 2.51.0,
unmodified, plus its own generated stub for what tritonclient cannot send (typed `contents`).
Results are compared with ONNX Runtime run directly on the same model files.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rt_models import config, identity_onnx, mlp_onnx, mlp_weights, seq_onnx, write_version
from rt_server import GrpcServer, perf_analyzer_env, run_perf_analyzer

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is in the dev extra")
from tritonclient.utils import InferenceServerException  # noqa: E402

from serve_kit import __version__  # noqa: E402
from serve_kit.runtime.grpc_service import EXTENSIONS, serve_grpc  # noqa: E402

TOKEN = "s3cret-token"
T = 20  # seconds: every client call is bounded, so a hung server fails a test instead of the run


# ---------------------------------------------------------------------------------------------
# Models and the server


def _finish(graph) -> bytes:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def int8_onnx() -> bytes:
    """x INT8 [batch, 3] -> y = Cast(x) to INT32: exercises narrow integers and typed contents."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT32)], "int8",
        [helper.make_tensor_value_info("x", TensorProto.INT8, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["batch", 3])])
    return _finish(graph)



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc-repo")
    w = {v: mlp_weights(4, 8, 3, seed=v) for v in (1, 2)}
    mlp_cfg = config("mlp", 4, 3, max_batch_size=16, version_policy={"latest": 2},
                     dynamic_batching={"max_queue_delay_microseconds": 1000, "priority_levels": 2,
                                       "default_priority_level": 2, "max_queue_size": 64},
                     instance_group={"count": 1, "kind": "CPU"})
    files = {}
    for v in (1, 2):
        files[("mlp", v)] = mlp_onnx(*w[v])
        assert write_version(root, mlp_cfg, files[("mlp", v)]) == v
    seq_cfg = config("seq", max_batch_size=8, inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
                     outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, -1]},
                              {"name": "s", "datatype": "FP32", "shape": [-1, 1]}])
    files[("seq", 1)] = seq_onnx()
    write_version(root, seq_cfg, files[("seq", 1)])
    int8_cfg = config("int8", max_batch_size=4, inputs=[{"name": "x", "datatype": "INT8", "shape": [-1, 3]}],
                      outputs=[{"name": "y", "datatype": "INT32", "shape": [-1, 3]}])
    write_version(root, int8_cfg, int8_onnx())
    files[("spare", 1)] = identity_onnx(4)
    write_version(root, config("spare", 4, 4, max_batch_size=4), files[("spare", 1)])
    return root, files


@pytest.fixture(scope="module")
def server(models):
    s = GrpcServer(models[0], managed={"management_token": TOKEN}, plain={}).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.managed.port}")
    yield c
    c.close()


def ort_run(model_bytes: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def fp32_input(x: np.ndarray, name: str = "x"):
    i = grpcclient.InferInput(name, list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


def status_of(exc: pytest.ExceptionInfo) -> str:
    return exc.value.status()


def assert_still_serving(client) -> None:
    x = np.ones((1, 4), np.float32)
    assert client.infer("mlp", [fp32_input(x)], client_timeout=T).as_numpy("y").shape == (1, 3)


# ---------------------------------------------------------------------------------------------
# Health and metadata


def test_server_binds_to_localhost_and_reports_its_port(server):
    assert server.managed.port > 0 and server.plain.port > 0 and server.managed.port != server.plain.port
    with socket.create_connection(("127.0.0.1", server.managed.port), timeout=5):
        pass


def test_health(client):
    assert client.is_server_live(client_timeout=T)
    assert client.is_server_ready(client_timeout=T)
    assert client.is_model_ready("mlp", client_timeout=T)
    assert client.is_model_ready("mlp", "1", client_timeout=T)
    assert client.is_model_ready("mlp", "2", client_timeout=T)
    assert not client.is_model_ready("mlp", "3", client_timeout=T)
    assert not client.is_model_ready("no-such-model", client_timeout=T)


def test_server_metadata(client):
    md = client.get_server_metadata(client_timeout=T)
    assert (md.name, md.version) == ("serve-kit", __version__)
    assert list(md.extensions) == EXTENSIONS
    as_json = client.get_server_metadata(as_json=True, client_timeout=T)
    assert as_json["name"] == "serve-kit"


def test_model_metadata(client):
    md = client.get_model_metadata("mlp", client_timeout=T)
    assert md.name == "mlp" and md.platform == "onnxruntime_onnx"
    assert list(md.versions) == ["1", "2"]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [("x", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.outputs] == [("y", "FP32", [-1, 3])]
    assert list(client.get_model_metadata("mlp", "1", client_timeout=T).versions) == ["1"]
    seq = client.get_model_metadata("seq", as_json=True, client_timeout=T)
    assert [o["name"] for o in seq["outputs"]] == ["y", "s"]
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nope", client_timeout=T)
    assert status_of(e) == "StatusCode.NOT_FOUND" and "nope" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("mlp", "7", client_timeout=T)
    assert status_of(e) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("mlp", "one", client_timeout=T)
    assert status_of(e) == "StatusCode.INVALID_ARGUMENT" and "'one'" in e.value.message()


def test_model_config(client):
    cfg = client.get_model_config("mlp", client_timeout=T).config
    assert (cfg.name, cfg.platform, cfg.backend, cfg.max_batch_size) == ("mlp", "onnxruntime_onnx", "onnxruntime", 16)
    # Triton's convention: dims without the batch dimension when max_batch_size > 0.
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("x", 11, [4])]  # 11 = TYPE_FP32
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [("y", 11, [3])]
    assert cfg.HasField("dynamic_batching")
    db = cfg.dynamic_batching
    assert (db.max_queue_delay_microseconds, db.priority_levels, db.default_priority_level) == (1000, 2, 2)
    assert db.default_queue_policy.max_queue_size == 64
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, 2)]  # 2 = KIND_CPU
    assert cfg.version_policy.latest.num_versions == 2
    as_json = client.get_model_config("int8", as_json=True, client_timeout=T)["config"]
    assert as_json["input"][0]["data_type"] == "TYPE_INT8" and as_json["output"][0]["data_type"] == "TYPE_INT32"
    assert "dynamic_batching" not in as_json
    with pytest.raises(InferenceServerException) as e:
        client.get_model_config("nope", client_timeout=T)
    assert status_of(e) == "StatusCode.NOT_FOUND"


# ---------------------------------------------------------------------------------------------
# Inference


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_infer_matches_onnxruntime(client, models, batch):
    _, files = models
    x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
    res = client.infer("mlp", [fp32_input(x)], request_id=f"req-{batch}", client_timeout=T)
    got = res.as_numpy("y")
    ref = ort_run(files[("mlp", 2)], {"x": x})["y"]  # no version given: the latest
    assert got.dtype == np.float32 and got.shape == (batch, 3)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    resp = res.get_response()
    assert (resp.model_name, resp.model_version, resp.id) == ("mlp", "2", f"req-{batch}")


def test_infer_each_version(client, models):
    _, files = models
    x = np.random.default_rng(7).standard_normal((5, 4)).astype(np.float32)
    for v in ("1", "2"):
        res = client.infer("mlp", [fp32_input(x)], model_version=v, client_timeout=T)
        assert res.get_response().model_version == v
        np.testing.assert_allclose(res.as_numpy("y"), ort_run(files[("mlp", int(v))], {"x": x})["y"],
                                   rtol=1e-5, atol=1e-6)


def test_requested_outputs(client, models):
    _, files = models
    x = np.random.default_rng(3).standard_normal((2, 5)).astype(np.float32)
    ref = ort_run(files[("seq", 1)], {"x": x})
    only_s = client.infer("seq", [fp32_input(x)], outputs=[grpcclient.InferRequestedOutput("s")], client_timeout=T)
    assert [o.name for o in only_s.get_response().outputs] == ["s"]
    assert only_s.as_numpy("y") is None
    np.testing.assert_allclose(only_s.as_numpy("s"), ref["s"], rtol=1e-5, atol=1e-6)
    both = client.infer("seq", [fp32_input(x)], outputs=[grpcclient.InferRequestedOutput("s"),
                                                         grpcclient.InferRequestedOutput("y")], client_timeout=T)
    assert [o.name for o in both.get_response().outputs] == ["s", "y"]  # the request's order
    every = client.infer("seq", [fp32_input(x)], client_timeout=T)
    assert [o.name for o in every.get_response().outputs] == ["y", "s"]  # the config's order
    np.testing.assert_allclose(every.as_numpy("y"), ref["y"], rtol=1e-5, atol=1e-6)


def test_priority_and_timeout_parameters(client):
    x = np.ones((2, 4), np.float32)
    a = client.infer("mlp", [fp32_input(x)], priority=1, timeout=5_000_000, client_timeout=T).as_numpy("y")
    b = client.infer("mlp", [fp32_input(x)], client_timeout=T).as_numpy("y")
    np.testing.assert_array_equal(a, b)


def test_concurrent_requests(client, models):
    _, files = models
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((int(rng.integers(1, 4)), 4)).astype(np.float32) for _ in range(24)]
    done: queue.Queue = queue.Queue()
    for i, x in enumerate(xs):
        client.async_infer("mlp", [fp32_input(x)], lambda result, error, i=i: done.put((i, result, error)),
                           request_id=str(i), client_timeout=T)
    seen = set()
    for _ in xs:
        i, result, error = done.get(timeout=T)
        assert error is None, error
        np.testing.assert_allclose(result.as_numpy("y"), ort_run(files[("mlp", 2)], {"x": xs[i]})["y"],
                                   rtol=1e-5, atol=1e-6)
        assert result.get_response().id == str(i)
        seen.add(i)
    assert seen == set(range(len(xs)))


def test_int8_raw(client):
    x = np.array([[-128, 0, 127], [1, -2, 3]], np.int8)
    i = grpcclient.InferInput("x", [2, 3], "INT8")
    i.set_data_from_numpy(x)
    y = client.infer("int8", [i], client_timeout=T).as_numpy("y")
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, x.astype(np.int32))


# Typed `contents`: tritonclient always sends raw bytes, so these use its generated stub directly.


@pytest.fixture(scope="module")
def stub(server):
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{server.managed.port}")
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def typed_request(model: str, name: str, datatype: str, shape, **contents):
    from tritonclient.grpc import service_pb2

    req = service_pb2.ModelInferRequest(model_name=model)
    t = req.inputs.add(name=name, datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(t.contents, field).extend(values)
    return req


def rpc_error(call, request):
    import grpc

    with pytest.raises(grpc.RpcError) as e:
        call(request, timeout=T)
    return e.value.code().name, e.value.details()


def test_typed_contents(stub, models):
    _, files = models
    x = np.arange(8, dtype=np.float32).reshape(2, 4) - 3
    resp = stub.ModelInfer(typed_request("mlp", "x", "FP32", [2, 4], fp32_contents=x.ravel().tolist()), timeout=T)
    (out,) = resp.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("y", "FP32", [2, 3])
    y = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(2, 3)
    np.testing.assert_allclose(y, ort_run(files[("mlp", 2)], {"x": x})["y"], rtol=1e-5, atol=1e-6)

    resp = stub.ModelInfer(typed_request("int8", "x", "INT8", [1, 3], int_contents=[-5, 0, 9]), timeout=T)
    np.testing.assert_array_equal(np.frombuffer(resp.raw_output_contents[0], "<i4"), [-5, 0, 9])


@pytest.mark.parametrize("contents, words", [
    ({"int_contents": [1, 2, 300]}, ["'x'", "300", "INT8"]),
    ({"int_contents": [1, 2]}, ["'x'", "2 values", "3"]),
    ({"fp32_contents": [1.0, 2.0, 3.0]}, ["'x'", "int_contents", "fp32_contents"]),
])
def test_bad_typed_contents(stub, contents, words):
    code, message = rpc_error(stub.ModelInfer, typed_request("int8", "x", "INT8", [1, 3], **contents))
    assert code == "INVALID_ARGUMENT"
    assert all(w in message for w in words), message


def test_raw_and_typed_contents_cannot_mix(stub):
    req = typed_request("mlp", "x", "FP32", [1, 4], fp32_contents=[1, 2, 3, 4])
    req.raw_input_contents.append(np.ones(4, np.float32).tobytes())
    code, message = rpc_error(stub.ModelInfer, req)
    assert code == "INVALID_ARGUMENT" and "'x'" in message and "contents" in message


# The codec on its own, for datatypes the test models do not have (no ONNX model needed).


def _config_with(datatype: str, shape=(-1, 2)):
    return config("t", max_batch_size=4, inputs=[{"name": "x", "datatype": datatype, "shape": list(shape)}],
                  outputs=[{"name": "y", "datatype": datatype, "shape": list(shape)}])


def _ours(datatype: str, shape, raw: bytes | None = None, **contents):
    from serve_kit.runtime.proto import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name="t")
    t = req.inputs.add(name="x", datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(t.contents, field).extend(values)
    if raw is not None:
        req.raw_input_contents.append(raw)
    return req


def test_decode_bytes_bool_uint64_and_fp16():
    from serve_kit.runtime.grpc_service import decode_infer_request

    raw = b"".join(len(b).to_bytes(4, "little") + b for b in (b"ab", b"", b"\xc3\xa9\x00", b"z"))
    x = decode_infer_request(_ours("BYTES", [2, 2], raw), _config_with("BYTES")).inputs["x"]
    assert x.dtype == object and x.tolist() == [[b"ab", b""], [b"\xc3\xa9\x00", b"z"]]
    typed = decode_infer_request(_ours("BYTES", [1, 2], bytes_contents=[b"q", b"r"]), _config_with("BYTES"))
    assert typed.inputs["x"].tolist() == [[b"q", b"r"]]
    b = decode_infer_request(_ours("BOOL", [1, 2], bool_contents=[True, False]), _config_with("BOOL")).inputs["x"]
    assert b.dtype == np.bool_ and b.tolist() == [[True, False]]
    big = 2**64 - 1
    u = decode_infer_request(_ours("UINT64", [1, 2], uint64_contents=[big, 0]), _config_with("UINT64")).inputs["x"]
    assert u.dtype == np.uint64 and u.tolist() == [[big, 0]]
    h = np.array([[1.5, -2]], np.float16)
    f = decode_infer_request(_ours("FP16", [1, 2], h.tobytes()), _config_with("FP16")).inputs["x"]
    np.testing.assert_array_equal(f, h)

    from serve_kit.runtime.types import BadRequest

    with pytest.raises(BadRequest, match="'x': FP16 data has no typed form"):
        decode_infer_request(_ours("FP16", [1, 2], fp32_contents=[1, 2]), _config_with("FP16"))
    with pytest.raises(BadRequest, match="'x'.*BYTES element"):
        decode_infer_request(_ours("BYTES", [1, 2], raw[:7]), _config_with("BYTES"))
    with pytest.raises(BadRequest, match="'x'.*does not fit UINT16"):
        decode_infer_request(_ours("UINT16", [1, 2], uint_contents=[70000, 1]), _config_with("UINT16"))


def test_message_size_limit(server):
    async def small():
        return await serve_grpc(server.manager, port=0, max_message_bytes=4096)

    s = server.call(small(), timeout=T)
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{s.port}")
    try:
        with pytest.raises(InferenceServerException) as e:
            c.infer("mlp", [fp32_input(np.ones((16, 100), np.float32))], client_timeout=T)
        assert status_of(e) == "StatusCode.RESOURCE_EXHAUSTED"
        assert c.infer("mlp", [fp32_input(np.ones((1, 4), np.float32))], client_timeout=T).as_numpy("y").shape == (1, 3)
    finally:
        c.close()
        server.call(s.stop(1), timeout=T)


# ---------------------------------------------------------------------------------------------
# Bad requests: the right status, a message naming the input, and the server keeps serving


def _raw_input(name, datatype, shape, data: bytes):
    """An InferInput whose raw bytes are whatever the test says (tritonclient checks sizes itself)."""
    i = grpcclient.InferInput(name, shape, datatype)
    i._raw_content = data
    return i


@pytest.mark.parametrize("inputs, status, words", [
    ([_raw_input("x", "FP32", [2, 4], b"\0" * 30)], "INVALID_ARGUMENT", ["'x'", "30 bytes", "32"]),
    ([_raw_input("z", "FP32", [1, 4], b"\0" * 16)], "INVALID_ARGUMENT", ["'z'", "unknown input"]),
    ([_raw_input("x", "FP64", [1, 4], b"\0" * 32)], "INVALID_ARGUMENT", ["'x'", "FP64", "FP32"]),
    ([_raw_input("x", "FP32", [1, 5], b"\0" * 20)], "INVALID_ARGUMENT", ["'x'", "[1, 5]"]),
    ([_raw_input("x", "FP32", [4], b"\0" * 16)], "INVALID_ARGUMENT", ["'x'", "dimensions"]),
    ([_raw_input("x", "FP32", [17, 4], b"\0" * 17 * 16)], "INVALID_ARGUMENT", ["'x'", "batch size 17"]),
    ([_raw_input("x", "FP32", [1, 4], b"\0" * 16), _raw_input("x", "FP32", [1, 4], b"\0" * 16)],
     "INVALID_ARGUMENT", ["'x'", "more than once"]),
    ([], "INVALID_ARGUMENT", ["missing input", "'x'"]),
])
def test_bad_inputs(client, inputs, status, words):
    with pytest.raises(InferenceServerException) as e:
        client.infer("mlp", inputs, client_timeout=T)
    assert status_of(e) == f"StatusCode.{status}", e.value
    assert all(w in e.value.message() for w in words), e.value.message()
    assert_still_serving(client)


def test_bad_requests_other_than_inputs(client):
    x = np.ones((1, 4), np.float32)
    cases = [
        (lambda: client.infer("nope", [fp32_input(x)], client_timeout=T), "NOT_FOUND", "nope"),
        (lambda: client.infer("mlp", [fp32_input(x)], model_version="9", client_timeout=T), "NOT_FOUND", "9"),
        (lambda: client.infer("mlp", [fp32_input(x)], model_version="-1", client_timeout=T),
         "INVALID_ARGUMENT", "version"),
        (lambda: client.infer("mlp", [fp32_input(x)], outputs=[grpcclient.InferRequestedOutput("q")],
                              client_timeout=T), "INVALID_ARGUMENT", "'q'"),
        (lambda: client.infer("mlp", [fp32_input(x)], outputs=[grpcclient.InferRequestedOutput("y", class_count=2)],
                              client_timeout=T), "INVALID_ARGUMENT", "classification"),
    ]
    for call, status, word in cases:
        with pytest.raises(InferenceServerException) as e:
            call()
        assert status_of(e) == f"StatusCode.{status}", e.value
        assert word in e.value.message(), e.value.message()
    assert_still_serving(client)


def test_bad_parameters(stub):
    from tritonclient.grpc import service_pb2

    req = typed_request("mlp", "x", "FP32", [1, 4], fp32_contents=[0, 0, 0, 0])
    req.parameters["priority"].CopyFrom(service_pb2.InferParameter(string_param="high"))
    code, message = rpc_error(stub.ModelInfer, req)
    assert code == "INVALID_ARGUMENT" and "priority" in message
    req.parameters["priority"].CopyFrom(service_pb2.InferParameter(int64_param=-1))
    code, message = rpc_error(stub.ModelInfer, req)
    assert code == "INVALID_ARGUMENT" and "priority" in message


def test_unimplemented_methods_say_so(client):
    with pytest.raises(InferenceServerException) as e:
        client.get_system_shared_memory_status(client_timeout=T)
    assert status_of(e) == "StatusCode.UNIMPLEMENTED"


# ---------------------------------------------------------------------------------------------
# Streaming


def test_stream_infer(server, models):
    _, files = models
    results: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.managed.port}")
    try:
        c.start_stream(callback=lambda result, error: results.put((result, error)), stream_timeout=T)
        rng = np.random.default_rng(5)
        xs = {str(i): rng.standard_normal((i % 3 + 1, 4)).astype(np.float32) for i in range(8)}
        for rid, x in xs.items():
            c.async_stream_infer("mlp", [fp32_input(x)], request_id=rid)
        c.async_stream_infer("mlp", [_raw_input("x", "FP32", [1, 4], b"\0" * 3)], request_id="bad")
        got, errors = {}, []
        for _ in range(len(xs) + 1):
            result, error = results.get(timeout=T)
            if error is not None:
                errors.append(error)
            else:
                got[result.get_response().id] = result.as_numpy("y")
        assert set(got) == set(xs)
        for rid, x in xs.items():
            np.testing.assert_allclose(got[rid], ort_run(files[("mlp", 2)], {"x": x})["y"], rtol=1e-5, atol=1e-6)
        assert len(errors) == 1 and "'x'" in str(errors[0]) and "3 bytes" in str(errors[0])
    finally:
        c.stop_stream()
        c.close()


# ---------------------------------------------------------------------------------------------
# Statistics and the repository extension


def test_statistics(client):
    before = client.get_inference_statistics("mlp", "2", client_timeout=T).model_stats[0]
    x = np.ones((3, 4), np.float32)
    for _ in range(4):
        client.infer("mlp", [fp32_input(x)], model_version="2", client_timeout=T)
    after = client.get_inference_statistics("mlp", "2", client_timeout=T).model_stats
    assert [(s.name, s.version) for s in after] == [("mlp", "2")]
    (s,) = after
    assert s.inference_count - before.inference_count == 12  # samples, not requests
    assert s.inference_stats.success.count - before.inference_stats.success.count == 4
    assert s.inference_stats.success.ns > before.inference_stats.success.ns
    assert s.execution_count > before.execution_count and s.last_inference > 0
    assert s.batch_stats and all(b.batch_size >= 1 and b.compute_infer.count > 0 for b in s.batch_stats)

    mlp = client.get_inference_statistics("mlp", client_timeout=T).model_stats
    assert [(m.name, m.version) for m in mlp] == [("mlp", "1"), ("mlp", "2")]
    everything = client.get_inference_statistics(as_json=True, client_timeout=T)["model_stats"]
    assert {m["name"] for m in everything} >= {"mlp", "seq", "int8", "spare"}
    with pytest.raises(InferenceServerException) as e:
        client.get_inference_statistics("nope", client_timeout=T)
    assert status_of(e) == "StatusCode.NOT_FOUND"


def test_repository_index(client):
    index = client.get_model_repository_index(client_timeout=T)
    entries = {(m.name, m.version): m.state for m in index.models}
    assert entries[("mlp", "1")] == entries[("mlp", "2")] == entries[("seq", "1")] == "READY"
    assert {name for name, _ in entries} == {"mlp", "seq", "int8", "spare"}


def test_load_and_unload_need_the_token(server, client):
    bearer = {"authorization": f"Bearer {TOKEN}"}
    for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
        for call in (client.unload_model, client.load_model):
            with pytest.raises(InferenceServerException) as e:
                call("spare", headers=headers, client_timeout=T)
            assert status_of(e) == "StatusCode.PERMISSION_DENIED" and "token" in e.value.message()
    assert client.is_model_ready("spare", client_timeout=T)

    plain = grpcclient.InferenceServerClient(f"127.0.0.1:{server.plain.port}")
    try:
        for call in (plain.unload_model, plain.load_model):
            with pytest.raises(InferenceServerException) as e:
                call("spare", headers=bearer, client_timeout=T)
            assert status_of(e) == "StatusCode.UNAVAILABLE" and "disabled" in e.value.message()
        assert plain.get_model_repository_index(client_timeout=T).models  # reading stays open
    finally:
        plain.close()

    x = np.ones((1, 4), np.float32)
    client.unload_model("spare", headers=bearer, client_timeout=T)
    assert not client.is_model_ready("spare", client_timeout=T)
    with pytest.raises(InferenceServerException) as e:
        client.infer("spare", [fp32_input(x)], client_timeout=T)
    assert status_of(e) == "StatusCode.NOT_FOUND" and "spare" in e.value.message()
    states = {m.name: m.state for m in client.get_model_repository_index(client_timeout=T).models}
    assert states["spare"] != "READY"
    index = client.get_model_repository_index(as_json=True, client_timeout=T)["models"]
    assert "spare" not in {m["name"] for m in index if m.get("state") == "READY"}

    client.load_model("spare", headers=bearer, client_timeout=T)
    assert client.is_model_ready("spare", client_timeout=T)
    np.testing.assert_array_equal(client.infer("spare", [fp32_input(x)], client_timeout=T).as_numpy("y"), x)

    with pytest.raises(InferenceServerException) as e:
        client.load_model("not-in-repo", headers=bearer, client_timeout=T)
    assert status_of(e) == "StatusCode.INVALID_ARGUMENT" and "not-in-repo" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.load_model("spare", headers=bearer, config='{"max_batch_size": 1}', client_timeout=T)
    assert status_of(e) == "StatusCode.INVALID_ARGUMENT" and "config" in e.value.message()
    assert_still_serving(client)


def test_ready_filter_of_the_index(stub):
    from tritonclient.grpc import service_pb2

    ready = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), timeout=T)
    assert ready.models and all(m.state == "READY" for m in ready.models)


# ---------------------------------------------------------------------------------------------
# Wire compatibility and serving


def _shape(desc) -> dict:
    fields = {}
    for f in desc.fields:
        kind = f.message_type.full_name if f.message_type else f.enum_type.full_name if f.enum_type else f.type
        fields[f.name] = (f.number, kind, f.is_repeated if hasattr(f, "is_repeated") else f.label == 3,
                          f.containing_oneof.name if f.containing_oneof else None)
    return fields


def test_messages_match_tritonclient_field_for_field():
    """Every field we declare has the public protocol's number, type and cardinality: the wire
    contract. (Fields we leave out are fine; a renumbered one would corrupt data silently.)"""
    from tritonclient.grpc import model_config_pb2 as their_mc
    from tritonclient.grpc import service_pb2 as their_svc

    from serve_kit.runtime.proto import grpc_service_pb2 as our_svc
    from serve_kit.runtime.proto import model_config_pb2 as our_mc

    def walk(desc):
        yield desc
        for nested in desc.nested_types:
            yield from walk(nested)

    checked = 0
    for ours, theirs in ((our_mc, their_mc), (our_svc, their_svc)):
        pool = theirs.DESCRIPTOR.pool
        for top in ours.DESCRIPTOR.message_types_by_name.values():
            for desc in walk(top):
                their_desc = pool.FindMessageTypeByName(desc.full_name)
                mine, public = _shape(desc), _shape(their_desc)
                for name, spec in mine.items():
                    assert public.get(name) == spec, f"{desc.full_name}.{name}: ours {spec}, public {public.get(name)}"
                    checked += 1
        for enum in ours.DESCRIPTOR.enum_types_by_name.values():
            their_enum = pool.FindEnumTypeByName(enum.full_name)
            assert {v.name: v.number for v in enum.values}.items() <= \
                {v.name: v.number for v in their_enum.values}.items()
    assert checked > 150

    their_service = their_svc.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    our_service = our_svc.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert our_service.full_name == their_service.full_name == "inference.GRPCInferenceService"
    for m in our_service.methods:
        t = their_service.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming) == \
            (t.input_type.full_name, t.output_type.full_name, t.client_streaming, t.server_streaming)


def test_generated_modules_are_up_to_date(tmp_path):
    """The committed *_pb2*.py are what scripts/gen_proto.sh makes from the committed .proto files."""
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the protobuf modules")
    from importlib.metadata import version

    if not version("grpcio-tools").startswith("1.62."):
        pytest.skip(f"scripts/gen_proto.sh needs grpcio-tools 1.62.x, found {version('grpcio-tools')}")
    repo = Path(__file__).resolve().parents[2]
    work = tmp_path / "repo"
    (work / "scripts").mkdir(parents=True)
    shutil.copy(repo / "scripts" / "gen_proto.sh", work / "scripts")
    shutil.copytree(repo / "serve_kit" / "runtime" / "proto", work / "serve_kit" / "runtime" / "proto",
                    ignore=shutil.ignore_patterns("*_pb2*.py", "__pycache__"))
    subprocess.run(["bash", "scripts/gen_proto.sh"], cwd=work, check=True, timeout=60, capture_output=True,
                   env={**os.environ, "PYTHON": sys.executable})
    generated = sorted(p.name for p in (work / "serve_kit/runtime/proto").glob("*_pb2*.py"))
    assert generated == ["grpc_service_pb2.py", "grpc_service_pb2_grpc.py", "model_config_pb2.py"]
    for name in generated:
        assert (work / "serve_kit/runtime/proto" / name).read_text() == \
            (repo / "serve_kit/runtime/proto" / name).read_text(), f"{name} is stale: run scripts/gen_proto.sh"


def test_busy_port_is_an_error(server):
    async def second():
        return await serve_grpc(server.manager, port=server.managed.port)

    with pytest.raises(OSError, match="cannot listen"):
        server.call(second(), timeout=T)


# ---------------------------------------------------------------------------------------------
# perf_analyzer (tritonclient 2.51.0's binary) against the gRPC endpoint


def test_perf_analyzer_over_grpc(server, client, tmp_path):
    exe, env = perf_analyzer_env()
    before = client.get_inference_statistics("mlp", "2", client_timeout=T).model_stats[0].inference_count
    run_perf_analyzer(exe, env, ["-m", "mlp", "-i", "grpc", "-u", f"127.0.0.1:{server.managed.port}", "-b", "2",
                                 "--concurrency-range", "2", "--request-count", "400"], tmp_path / "perf.csv")
    after = client.get_inference_statistics("mlp", "2", client_timeout=T).model_stats[0].inference_count
    assert after - before >= 2 * 400  # it really ran its requests of batch 2 through this server
