"""NVIDIA Model Optimizer targets, on real trained models, validated with real ONNX Runtime on the CPU."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import sk_models
from serve_kit.config import SourceSpec, TargetSpec, TensorSpec
from serve_kit.errors import ConversionError, TargetNotApplicable, TargetUnavailable
from serve_kit.optimize.calibration import Dataset
from serve_kit.optimize.quantize import count_ops
from serve_kit.optimize.quantize.modelopt_onnx import ort_options_for
from serve_kit.optimize.quantize.modelopt_torch import trt_fp8_to_onnx
from serve_kit.optimize.source import load_source
from serve_kit.optimize.target import BuildContext, target_class
from serve_kit.optimize.validate import compare_outputs
from serve_kit.runtime.backends import load_backend

pytest.importorskip("modelopt.onnx.quantization", reason="nvidia-modelopt is not installed (serve-kit[modelopt])")

INPUTS, OUTPUTS = sk_models.mlp_specs()
CNN_INPUTS = [TensorSpec(name="input", datatype="FP32", shape=[-1, 1, 8, 8])]


@pytest.fixture(scope="module")
def data():
    return sk_models.mlp_datasets()


@pytest.fixture
def ctx(tmp_path, data):
    return sk_models.mlp_context(tmp_path, data[0])


@pytest.fixture(scope="module")
def cnn_data():
    from serve_kit.recipes.digits import dataset

    d = dataset()
    return (Dataset({"input": d["calibration"]["input"]}, d["calibration"]["labels"], "digits calibration"),
            Dataset({"input": d["evaluation"]["input"]}, d["evaluation"]["labels"], "digits evaluation"))


@pytest.fixture(scope="module")
def cnn_source():
    source = load_source(SourceSpec(factory="serve_kit.recipes.digits:build_model"))
    source.inputs, source.outputs = CNN_INPUTS, OUTPUTS
    return source


@pytest.fixture
def cnn_ctx(tmp_path, cnn_data, cnn_source):
    return BuildContext(cnn_source, CNN_INPUTS, OUTPUTS, cnn_data[0], tmp_path)


def _build(name, ctx, config=None, sub="out"):
    return target_class(name)(config or {}).build(ctx, ctx.workdir / sub)


def _check(art, ctx, ds, min_cosine, max_top1_drop=1.0):
    """Run the artifact as the runtime would (with its backend options); compare with eager."""
    names = [s.name for s in ctx.inputs]
    backend = load_backend(art.backend, art.path, ["logits"], {"input_names": names, **art.backend_options})
    out = backend.infer(ds.inputs)
    ref = ctx.source.run(ds.inputs)
    err = compare_outputs(ref, out)["logits"]
    assert err["cosine_mean"] > min_cosine, err
    top1 = (out["logits"].argmax(1) == ds.labels).mean() * 100
    ref_top1 = (ref["logits"].argmax(1) == ds.labels).mean() * 100
    assert top1 >= ref_top1 - max_top1_drop
    return out, backend


def test_int8_quantizes_the_convolutions(cnn_ctx, cnn_data):
    art = _build("modelopt-int8", cnn_ctx)
    ops = art.details["ops"]
    assert art.details["gemm_rewritten_as_matmul"] == 2 and "Gemm" not in ops
    assert ops["QuantizeLinear"] >= 2 and ops["DequantizeLinear"] >= 4  # activations and weights
    assert art.backend_options == {}
    _check(art, cnn_ctx, cnn_data[1], 0.99)


def test_int8_that_quantizes_nothing_fails_and_says_why(ctx):
    # The MLP's two layers are too small for Model Optimizer (N=10 < 16, and a GEMV at batch 1):
    # the target does not apply to this model (a `not applicable` row, not an error).
    with pytest.raises(TargetNotApplicable) as e:
        _build("modelopt-int8", ctx)
    assert "quantized nothing" in e.value.message and "GEMV" in e.value.hint and "MatMul" in e.value.hint


def test_int8_entropy_calibration(cnn_ctx, cnn_data):
    art = _build("modelopt-int8", cnn_ctx, {"calibration_method": "entropy", "calibration_samples": 64})
    assert art.details["calibration_method"] == "entropy" and art.details["calibration_samples"] == 64
    _check(art, cnn_ctx, cnn_data[1], 0.99)


def test_fp8_is_standard_onnx_and_served_at_the_optimization_level_it_was_validated_at(cnn_ctx, cnn_data):
    art = _build("modelopt-fp8", cnn_ctx)
    assert art.backend_options == {"graph_optimization": "basic"}
    model = onnx.load(str(art.path))
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    _check(art, cnn_ctx, cnn_data[1], 0.99)


@pytest.mark.parametrize("method", ["awq_clip", "rtn_dq"])
def test_int4_weight_only_blocks(ctx, data, method):
    art = _build("modelopt-int4", ctx, {"calibration_method": method, "block_size": 32})
    model = onnx.load(str(art.path))
    int4 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert len(int4) == 2  # both linear layers' weights, stored as 4-bit
    assert "QuantizeLinear" not in art.details["ops"]  # weight-only: activations stay float
    assert art.path.stat().st_size < 0.4 * ctx.onnx_fp32().stat().st_size
    _check(art, ctx, data[1], 0.98, max_top1_drop=2.0)


def test_int4_block_size_is_validated():
    from serve_kit.errors import ConfigError

    with pytest.raises(ConfigError, match="block_size"):
        target_class("modelopt-int4")({"block_size": 8})


@pytest.mark.parametrize("name", ["modelopt-torch-int8", "modelopt-torch-int8-sq"])
def test_torch_path_int8_exports_standard_qdq(cnn_ctx, cnn_data, name):
    art = _build(name, cnn_ctx)
    ops = art.details["ops"]
    assert ops["QuantizeLinear"] >= 4 and ops["DequantizeLinear"] >= 4
    assert art.details["exporter"] == "legacy"
    if name.endswith("-sq"):
        assert ops.get("Mul", 0) >= 1  # the smoothing scales folded in front of the layers
    _check(art, cnn_ctx, cnn_data[1], 0.99)


def test_torch_path_fp8_is_rewritten_from_tensorrt_ops_and_runs_in_onnx_runtime(cnn_ctx, cnn_data):
    art = _build("modelopt-torch-fp8", cnn_ctx)
    assert art.details["fp8_qdq_rewritten_to_onnx"] >= 8
    model = onnx.load(str(art.path))
    assert not [n for n in model.graph.node if n.domain == "trt"]
    assert not [i for i in model.opset_import if i.domain == "trt"]
    assert art.backend_options == {"graph_optimization": "basic"}
    _check(art, cnn_ctx, cnn_data[1], 0.99)


def test_fp8_needs_the_basic_optimization_level_in_onnx_runtime(cnn_ctx, cnn_data):
    """Pins the ONNX Runtime behaviour that FP8_ORT_OPTIMIZATION works around: if a newer ORT
    computes FP8 Q/DQ correctly at `all`, this fails and the workaround can go."""
    art = _build("modelopt-torch-fp8", cnn_ctx)
    ds = cnn_data[1]
    basic = load_backend("onnxruntime", art.path, ["logits"], {"graph_optimization": "basic"}).infer(ds.inputs)
    full = load_backend("onnxruntime", art.path, ["logits"], {"graph_optimization": "all"}).infer(ds.inputs)
    acc = {k: (v["logits"].argmax(1) == ds.labels).mean() for k, v in (("basic", basic), ("all", full))}
    assert acc["basic"] > 0.97 and acc["all"] < acc["basic"] - 0.05, acc


def test_trt_fp8_rewrite_leaves_other_graphs_alone(ctx, tmp_path):
    src = ctx.onnx_fp32()
    assert trt_fp8_to_onnx(src, tmp_path / "same.onnx") == 0
    assert count_ops(tmp_path / "same.onnx") == count_ops(src)
    assert ort_options_for(tmp_path / "same.onnx") == {}


def test_torch_path_needs_an_nn_module(tmp_path, data, ctx):
    onnx_source = load_source(SourceSpec(path=str(ctx.onnx_fp32())))
    reason = target_class("modelopt-torch-int8")({}).unavailable_reason(onnx_source)
    assert "needs a torch source" in reason
    with pytest.raises(TargetUnavailable):
        octx = BuildContext(onnx_source, INPUTS, OUTPUTS, data[0], tmp_path / "o")
        _build("modelopt-torch-int8", octx)


def test_a_failing_quantizer_config_is_a_conversion_error(cnn_ctx):
    # Disabling every quantizer leaves nothing quantized: a clear error, not an unquantized "INT8".
    with pytest.raises(ConversionError, match="nothing would be quantized"):
        _build("modelopt-torch-int8", cnn_ctx, {"disable": ["*"]})


def test_pipeline_writes_the_backend_options_into_config_yaml(tmp_path):
    from serve_kit.optimize.pipeline import OptimizeJob, run
    from serve_kit.config import DataSpec, RepositorySpec
    from serve_kit.config import load_model_config

    job = OptimizeJob(source=SourceSpec(factory="serve_kit.recipes.digits:build_model"), repository=tmp_path / "repo",
                      inputs=CNN_INPUTS, outputs=OUTPUTS,
                      data=DataSpec(function="serve_kit.recipes.digits:dataset", max_evaluation_samples=200),
                      metric="top1", targets=[TargetSpec(name="modelopt-fp8")],
                      repo_spec=RepositorySpec(model_name="digits", max_batch_size=8), select="modelopt-fp8")
    report = run(job)
    assert report["written"] and report["written"]["variant"] == "modelopt-fp8", report
    cfg = load_model_config(tmp_path / "repo" / "digits" / "config.yaml")
    assert cfg.parameters["graph_optimization"] == "basic"


def test_torch_path_int4_awq_quantizes_on_the_cpu_and_needs_tensorrt_to_serve(ctx, data, tmp_path):
    from serve_kit.gpu import tensorrt_unavailable_reason

    target = target_class("modelopt-torch-int4-awq")({})
    assert target.backend == "tensorrt"
    exported, details = target.export(ctx, tmp_path)
    model = onnx.load(str(exported))
    custom = [n for n in model.graph.node if n.domain == "trt" and n.op_type == "DequantizeLinear"]
    assert custom and all(any(a.name == "block_size" for a in n.attribute) for n in custom)
    assert details["config"] == "INT4_AWQ_CFG"
    if tensorrt_unavailable_reason():
        reason = target.unavailable_reason(ctx.source)
        assert "trt::DequantizeLinear" in reason and "pypi.nvidia.com" in reason


def test_onnx_runtime_static_int8_still_works_after_a_modelopt_target(cnn_ctx, cnn_data):
    """Model Optimizer patches ONNX Runtime's quantization classes in place; serve-kit puts them
    back, so a recipe can run modelopt-int8 and onnx-int8-static in one process, in any order."""
    from onnxruntime.quantization import calibrate, registry

    before = calibrate.MinMaxCalibrater.collect_data, dict(registry.QDQRegistry), dict(registry.QLinearOpsRegistry)
    _build("modelopt-int8", cnn_ctx, sub="mo")
    assert (calibrate.MinMaxCalibrater.collect_data, registry.QDQRegistry, registry.QLinearOpsRegistry) == before
    art = _build("onnx-int8-static", cnn_ctx, {"diagnose": False}, sub="ort")
    _check(art, cnn_ctx, cnn_data[1], 0.99)


def test_sensitivity_diagnosis_keeps_the_costliest_nodes_and_the_retry_quantizes_fewer(cnn_ctx, cnn_data):
    import onnx as _onnx

    from serve_kit.optimize.quantize.modelopt_onnx import _bypassed, quantized_nodes

    target = target_class("modelopt-int8")({"diagnose_target_cosine": 0.999999})
    art = target.build(cnn_ctx, cnn_ctx.workdir / "first")
    model = _onnx.load(str(art.path))
    nodes = quantized_nodes(model)
    assert len(nodes) >= 2 and all(op for op in nodes)
    # Bypassing every quantized node gives back the float model's outputs.
    import onnxruntime as ort

    probe = cnn_data[1].subset(np.arange(32))
    plain = ort.InferenceSession(_bypassed(model, nodes, list(nodes)).SerializeToString(),
                                 providers=["CPUExecutionProvider"]).run(None, probe.inputs)[0]
    assert np.allclose(plain, cnn_ctx.source.run(probe.inputs)["logits"], atol=1e-4)

    new_cfg = target.retry_config(cnn_ctx, art, cnn_data[1], attempt=1)
    plan = art.details["diagnosis"]
    assert new_cfg is not None and new_cfg.keep_nodes == plan["exclude"] and plan["exclude"]
    assert plan["probe_cosine_after"] > plan["probe_cosine_before"]
    retry = target_class("modelopt-int8")(new_cfg).build(cnn_ctx, cnn_ctx.workdir / "second")
    assert retry.details["nodes_kept_in_float"] == plan["exclude"]
    assert len(quantized_nodes(_onnx.load(str(retry.path)))) < len(nodes)
    assert target_class("modelopt-int8")({"diagnose": False}).retry_config(cnn_ctx, art, cnn_data[1], 1) is None
