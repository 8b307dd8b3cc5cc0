"""Each optimize target, built from a real trained model and run with real ONNX Runtime / TorchScript."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import sk_models
from serve_kit.config import SourceSpec
from serve_kit.errors import ConfigError, TargetUnavailable
from serve_kit.optimize.quantize import count_ops, gemm_to_matmul
from serve_kit.optimize.source import load_source
from serve_kit.optimize.target import BuildContext, target_class
from serve_kit.optimize.validate import compare_outputs
from serve_kit.runtime.backends import load_backend

INPUTS, OUTPUTS = sk_models.mlp_specs()


@pytest.fixture(scope="module")
def data():
    return sk_models.mlp_datasets()


@pytest.fixture
def ctx(tmp_path, data):
    return sk_models.mlp_context(tmp_path, data[0])


def _reference(ctx, ds):
    return ctx.source.run(ds.inputs)


def _run(artifact, ds):
    backend = load_backend(artifact.backend, artifact.path, ["logits"], {"input_names": ["x"]})
    return backend.infer(ds.inputs), backend


def _build(name, ctx, config=None, sub="out"):
    return target_class(name)(config or {}).build(ctx, ctx.workdir / sub)


def test_torchscript_trace_matches_eager_and_batches_dynamically(ctx, data):
    art = _build("torchscript", ctx)
    out, backend = _run(art, data[1])
    err = compare_outputs(_reference(ctx, data[1]), out)["logits"]
    assert err["max_abs_error"] < 1e-4 and err["cosine_min"] > 0.99999
    assert backend.infer({"x": data[1].inputs["x"][:1]})["logits"].shape == (1, 10)


def test_torchscript_script_method(ctx, data):
    art = _build("torchscript", ctx, {"method": "script"})
    assert art.details["method"] == "script"
    out, _ = _run(art, data[1])
    assert compare_outputs(_reference(ctx, data[1]), out)["logits"]["max_abs_error"] < 1e-4


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_onnx_exporters_match_and_have_a_dynamic_batch_axis(ctx, data, exporter):
    art = _build("onnx", ctx, {"exporter": exporter})
    assert art.details["exporter"] == exporter
    graph = onnx.load(str(art.path)).graph
    assert [i.name for i in graph.input] == ["x"] and [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    out, backend = _run(art, data[1])
    assert compare_outputs(_reference(ctx, data[1]), out)["logits"]["max_abs_error"] < 1e-5
    for b in (1, 7):
        assert backend.infer({"x": data[1].inputs["x"][:b]})["logits"].shape == (b, 10)


def test_onnx_offline_optimization(ctx, data):
    art = _build("onnx", ctx, {"ort_optimization": "extended"})
    assert art.details["ort_optimization"] == "extended"
    out, _ = _run(art, data[1])
    assert compare_outputs(_reference(ctx, data[1]), out)["logits"]["max_abs_error"] < 1e-5


def test_unknown_target_config_field_is_rejected():
    with pytest.raises(ConfigError, match="exportr"):
        target_class("onnx")({"exportr": "dynamo"})


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_int8_static_qdq_per_channel(ctx, data, method):
    art = _build("onnx-int8-static", ctx, {"calibration_method": method})
    ops = count_ops(art.path)
    assert ops.get("QuantizeLinear", 0) >= 2 and ops.get("DequantizeLinear", 0) >= 4
    out, _ = _run(art, data[1])
    err = compare_outputs(_reference(ctx, data[1]), out)["logits"]
    assert 0.99 < err["cosine_mean"] < 1.0  # quantized: close, but not bit-identical
    assert art.path.stat().st_size < 0.5 * ctx.onnx_fp32().stat().st_size


def test_int8_dynamic_quantizes_linear_layers(ctx, data):
    art = _build("onnx-int8-dynamic", ctx)
    assert art.details["gemm_rewritten_to_matmul"] == 2
    assert art.details["ops"].get("MatMulInteger") == 2
    out, _ = _run(art, data[1])
    assert compare_outputs(_reference(ctx, data[1]), out)["logits"]["cosine_mean"] > 0.99


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq"])
def test_int4_weight_only(ctx, data, method):
    art = _build("onnx-int4", ctx, {"method": method, "block_size": 32})
    assert art.details["ops"].get("MatMulNBits") == 2
    out, _ = _run(art, data[1])
    err = compare_outputs(_reference(ctx, data[1]), out)["logits"]
    assert 0.97 < err["cosine_mean"] < 1.0


def test_int4_block_size_must_be_a_power_of_two():
    with pytest.raises(ConfigError, match="block_size"):
        target_class("onnx-int4")({"block_size": 48})


def test_gemm_to_matmul_is_exact(ctx, data, tmp_path):
    fp32 = ctx.onnx_fp32()
    dst = tmp_path / "mm.onnx"
    assert gemm_to_matmul(fp32, dst) == 2
    assert "Gemm" not in count_ops(dst) and count_ops(dst)["MatMul"] == 2
    import onnxruntime as ort

    x = data[1].inputs["x"]
    a = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    b = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_torchscript_target_is_unavailable_for_an_onnx_source(ctx, tmp_path, data):
    onnx_path = ctx.onnx_fp32()
    source = load_source(SourceSpec(path=str(onnx_path)))
    assert source.kind == "onnx" and [s.name for s in source.inputs] == ["x"]
    t = target_class("torchscript")({})
    assert "onnx" in t.unavailable_reason(source)
    with pytest.raises(TargetUnavailable):
        t.build(BuildContext(source, INPUTS, OUTPUTS, data[0], tmp_path), tmp_path / "ts")


def test_torchscript_source_exports_to_onnx_with_the_legacy_exporter(tmp_path, data):
    scripted = torch.jit.script(sk_models.mlp())
    path = tmp_path / "m.pt"
    torch.jit.save(scripted, str(path))
    source = load_source(SourceSpec(path=str(path)))
    source.inputs, source.outputs = INPUTS, OUTPUTS
    ctx = BuildContext(source, INPUTS, OUTPUTS, data[0], tmp_path)
    art = _build("onnx", ctx)
    assert art.details["exporter"] == "legacy"
    out, _ = _run(art, data[1])
    assert compare_outputs(source.run(data[1].inputs), out)["logits"]["max_abs_error"] < 1e-5


@pytest.mark.parametrize("name", ["torchscript-cuda-fp16", "torchscript-cuda-bf16"])
def test_half_precision_cuda_targets_say_why_they_cannot_run_here(ctx, name):
    from serve_kit.gpu import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason is None:
        pytest.skip("CUDA is available here: the gpu test below builds it")
    assert target_class(name)({}).unavailable_reason(ctx.source) == reason
    with pytest.raises(TargetUnavailable):
        _build(name, ctx)


@pytest.mark.gpu
@pytest.mark.parametrize("name,min_cosine", [("torchscript-cuda-fp16", 0.9995), ("torchscript-cuda-bf16", 0.999)])
def test_half_precision_cuda_targets_match_eager(ctx, data, name, min_cosine):
    from serve_kit.gpu import cuda_unavailable_reason

    if cuda_unavailable_reason():
        pytest.skip(f"CUDA: {cuda_unavailable_reason()}")
    art = _build(name, ctx)
    assert art.backend_options == {"device": "cuda"} and art.details["gpu"]["name"]
    backend = load_backend(art.backend, art.path, ["logits"], {"input_names": ["x"], **art.backend_options})
    out = backend.infer(data[1].inputs)
    assert out["logits"].dtype == np.float32  # FP32 in and out; half precision inside
    err = compare_outputs(_reference(ctx, data[1]), out)["logits"]
    assert err["cosine_mean"] > min_cosine
    assert backend.infer({"x": data[1].inputs["x"][:3]})["logits"].shape == (3, 10)
