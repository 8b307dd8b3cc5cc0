"""trt-fp16 / trt-int8 / trt-fp8: profile shapes, flags and details (pure, run everywhere), the
targets reported unavailable with the reason through the real pipeline where TensorRT is missing,
and real engine builds on a GPU with TensorRT (marked gpu; skipped with the reason elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import sk_models
from serve_kit.config import DataSpec, LatencySpec, SourceSpec, TargetSpec, TensorSpec
from serve_kit.errors import ConfigError, ModelLoadError, TargetUnavailable
from serve_kit.gpu import TENSORRT_INSTALL_HINT, gpu_info, tensorrt_unavailable_reason
from serve_kit.optimize.calibration import Dataset
from serve_kit.optimize.export.tensorrt import (TIMING_CACHE_NAME, TensorRTConfig, builder_flags,
                                                calibration_sample_shapes, engine_details, fp8_unavailable_reason,
                                                profile_shapes, spec_shapes)
from serve_kit.optimize.pipeline import OptimizeJob, run
from serve_kit.optimize.source import load_source
from serve_kit.optimize.target import BuildContext, target_class
from serve_kit.optimize.validate import compare_outputs
from serve_kit.repository import Repository
from serve_kit.runtime.backends import load_backend
from serve_kit.runtime.backends.tensorrt import engine_compat_problems

INPUTS = [TensorSpec(name="x", datatype="FP32", shape=[-1, 64])]
OUTPUTS = [TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])]
FAST = LatencySpec(batch_sizes=[1, 4], min_seconds=0.05)

TRT_REASON = tensorrt_unavailable_reason()


def needs_tensorrt(test):
    """A GPU test that builds or runs an engine: skipped with the reason where TensorRT is missing."""
    return pytest.mark.gpu(pytest.mark.skipif(TRT_REASON is not None, reason=f"TensorRT: {TRT_REASON}")(test))


def cfg(**kw) -> TensorRTConfig:
    return target_class("trt-fp16").Config.model_validate(kw)


# ---------------------------------------------------------------------------------------------
# Pure helpers


def test_the_batch_axis_gets_one_to_max_and_opt_defaults_to_max():
    shapes = spec_shapes(INPUTS)
    assert profile_shapes(shapes, {"x": [64]}, cfg()) == {"x": {"min": [1, 64], "opt": [64, 64], "max": [64, 64]}}
    assert profile_shapes(shapes, {}, cfg(max_batch_size=16, opt_batch_size=4)) == \
        {"x": {"min": [1, 64], "opt": [4, 64], "max": [16, 64]}}
    # A model exported with a fixed batch keeps it: the engine takes exactly that.
    assert profile_shapes({"x": [1, 64]}, {}, cfg()) == {"x": {"min": [1, 64], "opt": [1, 64], "max": [1, 64]}}


def test_variable_non_batch_dims_come_from_the_real_calibration_samples():
    ids = np.zeros((10, 128), np.int64)
    calibration = Dataset({"input_ids": ids, "attention_mask": ids}, origin="tokens")
    samples = calibration_sample_shapes(calibration)
    assert samples == {"input_ids": [128], "attention_mask": [128]}
    specs = [TensorSpec(name="input_ids", datatype="INT64", shape=[-1, -1]),
             TensorSpec(name="attention_mask", datatype="INT64", shape=[-1, -1])]
    got = profile_shapes(spec_shapes(specs), samples, cfg(max_batch_size=8))
    assert got["input_ids"] == {"min": [1, 1], "opt": [8, 128], "max": [8, 128]}
    assert got["attention_mask"] == got["input_ids"]


def test_explicit_shapes_override_the_defaults_for_one_input():
    specs = {"input_ids": [-1, -1], "token_type_ids": [-1, -1]}
    c = cfg(shapes={"input_ids": {"min": [1, 1], "opt": [8, 128], "max": [32, 512]}})
    got = profile_shapes(specs, {"input_ids": [128], "token_type_ids": [128]}, c)
    assert got["input_ids"] == {"min": [1, 1], "opt": [8, 128], "max": [32, 512]}
    assert got["token_type_ids"] == {"min": [1, 1], "opt": [64, 128], "max": [64, 128]}


@pytest.mark.parametrize("shapes, samples, match", [
    ({"x": [-1, 64]}, {}, None),
    ({"x": [-1, -1]}, {}, r"dimension 1 is variable and no calibration sample gives its size"),
])
def test_a_variable_dim_without_a_size_is_a_clear_config_error(shapes, samples, match):
    if match is None:
        profile_shapes(shapes, samples, cfg())
        return
    with pytest.raises(ConfigError, match=match) as ei:
        profile_shapes(shapes, samples, cfg())
    assert "shapes:" in ei.value.hint


def test_explicit_shapes_are_checked_against_the_model():
    with pytest.raises(ConfigError, match=r"names inputs the model does not have: \['y'\]"):
        profile_shapes({"x": [-1, 64]}, {}, cfg(shapes={"y": {"min": [1, 64], "opt": [1, 64], "max": [1, 64]}}))
    with pytest.raises(ConfigError, match="has rank 3, the model's input has rank 2"):
        profile_shapes({"x": [-1, 64]}, {}, cfg(shapes={"x": {"min": [1, 1, 64], "opt": [1, 1, 64],
                                                               "max": [1, 1, 64]}}))
    with pytest.raises(ConfigError, match=r"changes fixed dimensions \[1\]"):
        profile_shapes({"x": [-1, 64]}, {}, cfg(shapes={"x": {"min": [1, 32], "opt": [1, 64], "max": [1, 64]}}))


def test_the_config_is_validated_when_built():
    with pytest.raises(ConfigError, match="opt_batch_size 65 > max_batch_size 64"):
        target_class("trt-fp16")({"opt_batch_size": 65, "max_batch_size": 64})
    # Without a max, the limit comes from the model's batching config when the engine is built.
    with pytest.raises(ConfigError, match="opt_batch_size 65 > max_batch_size 64"):
        profile_shapes({"x": [-1, 64]}, {}, cfg(opt_batch_size=65))


def test_the_engine_batch_limit_follows_the_served_max_batch_size(tmp_path):
    from serve_kit.optimize.export.tensorrt import DEFAULT_MAX_BATCH, with_batch_limit
    from serve_kit.optimize.target import BuildContext

    ctx = BuildContext(None, [], [], None, tmp_path, max_batch_size=128)
    assert with_batch_limit(cfg(), ctx).max_batch_size == 128
    assert with_batch_limit(cfg(max_batch_size=8), ctx).max_batch_size == 8  # set on purpose: kept
    ctx.max_batch_size = None
    assert with_batch_limit(cfg(), ctx).max_batch_size == DEFAULT_MAX_BATCH
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        target_class("trt-int8")({"shapes": {"x": {"min": [4, 64], "opt": [2, 64], "max": [8, 64]}}})
    with pytest.raises(ConfigError, match="workspace_mb"):
        target_class("trt-fp8")({"workspace_mb": 1})


def test_targets_declare_precision_backend_and_where_their_onnx_comes_from():
    got = {n: (target_class(n).precision, target_class(n).backend, target_class(n).quantizer)
           for n in ("trt-fp16", "trt-int8", "trt-fp8")}
    assert got == {"trt-fp16": ("fp16", "tensorrt", None), "trt-int8": ("int8", "tensorrt", "modelopt-int8"),
                   "trt-fp8": ("fp8", "tensorrt", "modelopt-fp8")}


def test_builder_flags_per_precision():
    assert builder_flags("fp16") == ["FP16"]
    assert builder_flags("int8") == ["FP16", "INT8"]
    assert builder_flags("fp8") == ["FP16", "FP8"]
    assert builder_flags("fp8", strongly_typed=True) == []


def test_details_hold_what_the_runtime_checks_and_round_trip_through_json():
    profiles = profile_shapes(spec_shapes(INPUTS), {"x": [64]}, cfg(max_batch_size=8))
    d = engine_details("10.3.0", {"name": "NVIDIA L4", "compute_capability": "8.9", "total_memory_bytes": 1},
                       profiles, ["FP16"], True, timing_cache_reused=False)
    assert d == {"tensorrt": {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA L4", "compute_capability": "8.9",
                              "profiles": {"x": {"min": [1, 64], "opt": [8, 64], "max": [8, 64]}},
                              "flags": ["FP16"], "timing_cache": True, "timing_cache_reused": False}}
    back = json.loads(json.dumps(d))["tensorrt"]
    # What the build records is what the runtime backend compares against.
    assert engine_compat_problems(back, {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA L4",
                                         "compute_capability": "8.9"}) == ([], [])


def test_fp8_needs_ada_or_hopper():
    assert "compute capability 8.9+" in fp8_unavailable_reason({"name": "NVIDIA A100", "compute_capability": "8.0"})
    assert fp8_unavailable_reason({"name": "NVIDIA H100", "compute_capability": "9.0"}) is None
    assert fp8_unavailable_reason({}) is None  # no GPU: TensorRT's own reason is reported first


# ---------------------------------------------------------------------------------------------
# Where TensorRT is missing (this CPU machine): unavailable with the reason, never skipped silently


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return sk_models.digits_npz(tmp_path_factory.mktemp("data") / "digits.npz")


@pytest.mark.skipif(TRT_REASON is None, reason="TensorRT is usable here; this checks the report without it")
def test_the_pipeline_reports_trt_targets_unavailable_with_the_reason(tmp_path, npz):
    job = OptimizeJob(source=SourceSpec(factory="sk_models:mlp"), repository=tmp_path / "repo",
                      data=DataSpec(calibration=npz), metric="top1", latency=FAST, model_name="mlp",
                      targets=[TargetSpec(name="trt-fp16"), TargetSpec(name="trt-int8"),
                               TargetSpec(name="trt-fp8", config={"max_batch_size": 8}), TargetSpec(name="onnx")])
    report = run(job)
    by = {v["name"]: v for v in report["variants"]}
    for name in ("trt-fp16", "trt-int8", "trt-fp8"):
        v = by[name]
        assert v["status"] == "unavailable" and v["backend"] == "tensorrt"
        assert v["reason"] == f"{TRT_REASON}; {TENSORRT_INSTALL_HINT}"
        assert "pypi.nvidia.com" in v["reason"]
    assert by["trt-fp8"]["config"]["max_batch_size"] == 8 and by["trt-fp8"]["precision"] == "fp8"
    # Unavailable is not a failure: the onnx variant is written.
    assert by["onnx"]["status"] == "passed"
    # (`source`: the eager model through that same onnx export, when the onnx was not measurably faster)
    assert report["written"]["variant"] in ("onnx", "source") and report["errors"] == [] and report["gate_failed"] == []
    saved = json.loads(Path(report["report_path"]).read_text())
    assert [v["status"] for v in saved["variants"]][:4] == ["unavailable"] * 3 + ["passed"]


@pytest.mark.skipif(TRT_REASON is None, reason="TensorRT is usable here; this checks the refusal without it")
def test_building_directly_raises_target_unavailable(tmp_path):
    source = load_source(SourceSpec(factory="sk_models:mlp"))
    x, _ = sk_models.digits_flat()
    ctx = BuildContext(source, INPUTS, OUTPUTS, Dataset({"x": x[:32]}), tmp_path)
    with pytest.raises(TargetUnavailable, match="TensorRT") as ei:
        target_class("trt-fp16")({}).build(ctx, tmp_path / "out")
    assert ei.value.value == "trt-fp16"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# On a GPU with TensorRT


@pytest.fixture
def gpu_ctx(tmp_path):
    x, y = sk_models.digits_flat()
    source = load_source(SourceSpec(factory="sk_models:mlp"))
    source.inputs, source.outputs = INPUTS, OUTPUTS
    return BuildContext(source, INPUTS, OUTPUTS, Dataset({"x": x[1000:1200]}, y[1000:1200], "digits"),
                        tmp_path / "work", cache_dir=tmp_path / "cache"), Dataset({"x": x[1200:1500]}, y[1200:1500])


def _ort_cpu(path, inputs):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {"logits": sess.run(None, inputs)[0]}


def _close_in_fp16(ref, got):
    err = compare_outputs(ref, got)["logits"]
    scale = float(np.abs(ref["logits"]).max())
    assert err["cosine_min"] > 0.9995, err
    assert err["max_abs_error"] < 1e-2 * scale, (err, scale)


@needs_tensorrt
def test_trt_fp16_engine_matches_onnxruntime_cpu_and_records_its_platform(gpu_ctx):
    import tensorrt as trt

    ctx, evaluation = gpu_ctx
    art = target_class("trt-fp16")({"max_batch_size": 32}).build(ctx, ctx.workdir / "trt")
    assert art.path.name == "model.plan" and art.backend == "tensorrt"
    d = art.details["tensorrt"]
    gpu = gpu_info(0)
    assert d["tensorrt_version"] == trt.__version__
    assert d["gpu_name"] == gpu["name"] and d["compute_capability"] == gpu["compute_capability"]
    assert d["profiles"] == {"x": {"min": [1, 64], "opt": [32, 64], "max": [32, 64]}}
    assert d["flags"] == ["FP16"] and d["timing_cache"] is True and d["timing_cache_reused"] is False
    assert (ctx.cache_dir / TIMING_CACHE_NAME).stat().st_size > 0

    backend = load_backend("tensorrt", art.path, ["logits"])
    ref = _ort_cpu(ctx.onnx_fp32(), {"x": evaluation.inputs["x"][:32]})
    _close_in_fp16(ref, backend.infer({"x": evaluation.inputs["x"][:32]}))

    # A rebuild starts from the saved timing cache.
    again = target_class("trt-fp16")({"max_batch_size": 32}).build(ctx, ctx.workdir / "trt2")
    assert again.details["tensorrt"]["timing_cache_reused"] is True


@needs_tensorrt
def test_pipeline_writes_a_trt_version_whose_manifest_the_backend_checks(tmp_path, npz):
    job = OptimizeJob(source=SourceSpec(factory="sk_models:mlp"), repository=tmp_path / "repo",
                      data=DataSpec(calibration=npz), metric="top1", latency=FAST, model_name="mlp",
                      targets=[TargetSpec(name="trt-fp16")], select="trt-fp16")
    report = run(job)
    v = report["variants"][0]
    assert v["status"] == "passed", v
    info = Repository(tmp_path / "repo").version("mlp")
    assert info.manifest["backend"] == "tensorrt" and info.manifest["model_file"] == "model.plan"
    assert info.manifest["details"]["tensorrt"]["profiles"]["x"]["max"] == [64, 64]
    backend = load_backend("tensorrt", info.path / "model.plan", ["output_0"])
    x = np.load(npz)["x"][:7]
    assert backend.infer({"x": x})["output_0"].shape == (7, 10)

    # The same engine, recorded as built by another TensorRT: refused before deserializing.
    other = tmp_path / "moved"
    other.mkdir()
    (other / "model.plan").write_bytes((info.path / "model.plan").read_bytes())
    manifest = dict(info.manifest)
    manifest["details"] = {"tensorrt": {**manifest["details"]["tensorrt"], "tensorrt_version": "8.6.1"}}
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="built with TensorRT 8.6.1") as ei:
        load_backend("tensorrt", other / "model.plan")
    assert "--target trt-fp16" in ei.value.hint


@needs_tensorrt
@pytest.mark.parametrize("name", ["trt-int8", "trt-fp8"])
def test_trt_from_modelopt_qdq_onnx(gpu_ctx, name):
    ctx, evaluation = gpu_ctx
    target = target_class(name)({"max_batch_size": 16})
    reason = target.unavailable_reason(ctx.source)
    if reason:
        pytest.skip(reason)
    art = target.build(ctx, ctx.workdir / name)
    d = art.details["tensorrt"]
    assert d["onnx_from"] == target.quantizer and d["flags"] == builder_flags(target.precision)
    backend = load_backend("tensorrt", art.path, ["logits"])
    x = evaluation.inputs["x"][:16]
    ref = ctx.source.run({"x": x})
    got = backend.infer({"x": x})
    assert compare_outputs({"logits": ref["logits"]}, got)["logits"]["cosine_min"] > 0.98
    assert (got["logits"].argmax(1) == ref["logits"].argmax(1)).mean() > 0.9

