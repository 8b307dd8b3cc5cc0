"""GPU use in the runtime backends: device options, explicit refusals where the GPU stack is
missing (run everywhere), and real GPU runs compared with the CPU (marked gpu; skipped with the
reason elsewhere)."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
from rt_models import arun, config, mlp_onnx, mlp_reference, mlp_weights, torchscript_mlp, write_version

from serve_kit.errors import InputError, ModelLoadError
from serve_kit.gpu import (TENSORRT_INSTALL_HINT, cuda_device, cuda_unavailable_reason, ort_provider_unavailable_reason,
                           tensorrt_unavailable_reason)
from serve_kit.runtime.backends import backend_class, load_backend
from serve_kit.runtime.backends.onnxruntime import provider_options, requested_providers, trt_cache_dir
from serve_kit.runtime.backends.tensorrt import check_engine_compat, engine_compat_problems
from serve_kit.runtime.backends.torchscript import _batch_sizes
from serve_kit.runtime.models import ModelManager, backend_options
from serve_kit.runtime.types import InferRequest

CUDA_REASON = cuda_unavailable_reason()
TRT_REASON = tensorrt_unavailable_reason()
ORT_CUDA_REASON = ort_provider_unavailable_reason("CUDAExecutionProvider")


def needs(reason: str | None, what: str):
    """Mark a test gpu and skip it with the reason where `what` is missing."""
    def wrap(test):
        return pytest.mark.gpu(pytest.mark.skipif(reason is not None, reason=f"{what}: {reason}")(test))
    return wrap


def without(reason: str | None, what: str):
    """A test of the refusal path: runs only where `what` is missing."""
    return pytest.mark.skipif(reason is None, reason=f"{what} is usable here; this checks the refusal without it")


@pytest.fixture
def mlp_file(tmp_path):
    w1, w2 = mlp_weights(16, 32, 4, seed=0)
    path = tmp_path / "model.onnx"
    path.write_bytes(mlp_onnx(w1, w2))
    return path, w1, w2


def x16(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# serve_kit.gpu.cuda_device


@pytest.mark.parametrize("value, expected", [(None, None), ("", None), ("cpu", None), ("cuda", "cuda:0"),
                                             ("cuda:0", "cuda:0"), ("cuda:3", "cuda:3")])
def test_cuda_device_normalises(value, expected):
    assert cuda_device(value) == expected


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "cuda:-1", "CUDA", "cuda:0:1"])
def test_cuda_device_rejects_anything_else(value):
    with pytest.raises(ValueError, match="is not cpu, cuda or cuda:N"):
        cuda_device(value)


# ---------------------------------------------------------------------------------------------
# ONNX Runtime: providers and device


def test_provider_options_from_config_parameters(tmp_path):
    assert requested_providers({}) == ["CPUExecutionProvider"]  # the default, unchanged
    assert requested_providers({"providers": ["CPUExecutionProvider"]}) == ["CPUExecutionProvider"]
    assert requested_providers({"device": "cuda"}) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert requested_providers({"device": "cpu"}) == ["CPUExecutionProvider"]
    # config.yaml parameters are strings: a comma-separated list, short names allowed.
    assert requested_providers({"providers": "tensorrt, cuda"}) == \
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ModelLoadError, match="is not cpu, cuda or cuda:N"):
        requested_providers({"device": "gpu0"})

    model = tmp_path / "m" / "model.onnx"
    model.parent.mkdir()
    got = provider_options(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                           {"device": "cuda:1", "trt_fp16": "true"}, model)
    trt_name, trt_opts = got[0]
    assert trt_name == "TensorrtExecutionProvider" and trt_opts["device_id"] == 1 and trt_opts["trt_fp16_enable"]
    assert trt_opts["trt_engine_cache_enable"] is True
    assert trt_opts["trt_engine_cache_path"] == str(model.parent.resolve() / ".model.ort-tensorrt-cache")
    assert got[1:] == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert provider_options(["CPUExecutionProvider"], {}, model) == ["CPUExecutionProvider"]


def test_ort_tensorrt_cache_stays_out_of_the_verified_version_dir(tmp_path):
    w1, w2 = mlp_weights(16, 32, 4)
    v = write_version(tmp_path, config("mlp", 16, 4), mlp_onnx(w1, w2))
    version_dir = tmp_path / "mlp" / str(v)
    cache = trt_cache_dir(version_dir / "model.onnx")
    assert cache == (tmp_path / "mlp" / ".build-cache" / "ort-tensorrt" / str(v)).resolve() and cache.is_dir()
    from serve_kit.repository import Repository

    repo = Repository(tmp_path)
    assert repo.verify_version(repo.version("mlp", v)) == [] and repo.version_numbers("mlp") == [v]


def test_ort_tensorrt_cache_falls_back_to_temp_when_it_cannot_write_beside_the_model(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x")
    # A file where the cache folder would go: mkdir fails even for root (unlike a chmod).
    (tmp_path / ".model.ort-tensorrt-cache").write_bytes(b"")
    cache = trt_cache_dir(tmp_path / "model.onnx")
    assert cache.parent.name == "serve-kit-ort-tensorrt" and cache.is_dir()
    assert trt_cache_dir(tmp_path / "model.onnx") == cache  # stable per model path


def test_ort_default_stays_on_the_cpu(mlp_file):
    path, w1, w2 = mlp_file
    b = load_backend("onnxruntime", path, ["y"])
    assert b.providers == ["CPUExecutionProvider"]
    np.testing.assert_allclose(b.infer({"x": x16(3)})["y"], mlp_reference(x16(3), w1, w2), rtol=1e-5, atol=1e-5)


@without(ORT_CUDA_REASON, "ONNX Runtime's CUDA provider")
@pytest.mark.parametrize("options", [{"device": "cuda"}, {"providers": "CUDAExecutionProvider,CPUExecutionProvider"},
                                     {"providers": ["cuda"]}])
def test_ort_cuda_asked_for_but_missing_fails_clearly(mlp_file, options):
    with pytest.raises(ModelLoadError) as ei:
        load_backend("onnxruntime", mlp_file[0], ["y"], options)
    e = ei.value
    assert e.message.startswith("execution provider CUDAExecutionProvider was asked for but cannot be used")
    assert "CPUExecutionProvider" in e.message and "onnxruntime-gpu" in e.message  # what is here, what to install
    assert "allow_cpu_fallback" in e.hint


@without(ORT_CUDA_REASON, "ONNX Runtime's CUDA provider")
def test_ort_allow_cpu_fallback_runs_on_the_cpu(mlp_file, caplog):
    # The CLI run in-process by other tests sets the root logger to ERROR (_quiet_libraries); the
    # warning is what this test checks, so it asks for it.
    caplog.set_level("WARNING", logger="serve_kit")
    path, w1, w2 = mlp_file
    b = load_backend("onnxruntime", path, ["y"], {"device": "cuda:1", "allow_cpu_fallback": "true"})
    assert b.providers == ["CPUExecutionProvider"]
    assert any("CUDAExecutionProvider not used" in r.message for r in caplog.records)
    np.testing.assert_allclose(b.infer({"x": x16(5)})["y"], mlp_reference(x16(5), w1, w2), rtol=1e-5, atol=1e-5)


@without(ORT_CUDA_REASON, "ONNX Runtime's CUDA provider")
def test_the_server_reports_a_gpu_model_unavailable_with_the_reason(tmp_path):
    w1, w2 = mlp_weights(16, 32, 4)
    write_version(tmp_path, config("gpu", 16, 4, parameters={"device": "cuda"}), mlp_onnx(w1, w2))
    write_version(tmp_path, config("fallback", 16, 4, parameters={"device": "cuda", "allow_cpu_fallback": "true"}),
                  mlp_onnx(w1, w2))

    async def main():
        async with ModelManager(tmp_path) as m:
            out = await m.infer(InferRequest(model="fallback", inputs={"x": x16(2)}))
            return m.index(), out

    index, out = arun(main())
    state = {e["name"]: e for e in index}
    assert state["fallback"]["state"] == "READY"
    assert state["gpu"]["state"] == "UNAVAILABLE"
    assert "CUDAExecutionProvider was asked for but cannot be used" in state["gpu"]["reason"]
    np.testing.assert_allclose(out.outputs["y"], mlp_reference(x16(2), w1, w2), rtol=1e-5, atol=1e-5)
    # The server hands config.yaml's string parameters to the backend as flags.
    assert backend_options(config("f", 16, 4, parameters={"allow_cpu_fallback": "true"}), 4)["allow_cpu_fallback"] is True


# ---------------------------------------------------------------------------------------------
# TensorRT backend


def _details(version="10.3.0", cc="8.9", name="NVIDIA L4"):
    from serve_kit.optimize.export.tensorrt import engine_details

    return engine_details(version, {"name": name, "compute_capability": cc},
                          {"x": {"min": [1, 16], "opt": [8, 16], "max": [8, 16]}}, ["FP16"], True)


HERE = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA L4", "compute_capability": "8.9"}


def test_engine_compat_same_platform_passes():
    assert engine_compat_problems(_details()["tensorrt"], HERE) == ([], [])


def test_engine_compat_names_what_was_recorded_and_what_is_here():
    errors, _ = engine_compat_problems(_details(version="10.0.1")["tensorrt"], HERE)
    assert errors == ["built with TensorRT 10.0.1, this machine has TensorRT 10.3.0"]
    errors, _ = engine_compat_problems(_details(cc="9.0", name="NVIDIA H100 80GB HBM3")["tensorrt"], HERE)
    assert errors == ["built for compute capability 9.0 (NVIDIA H100 80GB HBM3), this GPU (NVIDIA L4) has "
                      "compute capability 8.9"]
    errors, warnings = engine_compat_problems(_details(name="NVIDIA RTX 4090")["tensorrt"], HERE)
    assert errors == [] and warnings == ["built on NVIDIA RTX 4090, running on NVIDIA L4 (same compute capability "
                                         "8.9): it runs, but its kernels were timed on the other GPU"]


def _version_dir(tmp_path, details, variant="trt-int8"):
    d = tmp_path / "1"
    d.mkdir()
    (d / "model.plan").write_bytes(b"not an engine")
    (d / "manifest.json").write_text(json.dumps({"model_file": "model.plan", "backend": "tensorrt",
                                                 "variant": variant, "details": details}))
    return d / "model.plan"


def test_check_engine_compat_raises_before_tensorrt_sees_the_file(tmp_path):
    plan = _version_dir(tmp_path, _details(version="10.0.1", cc="8.0", name="NVIDIA A100-SXM4-80GB"))
    with pytest.raises(ModelLoadError) as ei:
        check_engine_compat(plan, HERE)
    e = ei.value
    assert e.message.startswith("this TensorRT engine was built for another platform: built with TensorRT 10.0.1, "
                                "this machine has TensorRT 10.3.0; built for compute capability 8.0")
    assert "recorded: TensorRT 10.0.1, NVIDIA A100-SXM4-80GB, compute capability 8.0" in e.message
    assert "here: TensorRT 10.3.0, NVIDIA L4, compute capability 8.9" in e.message
    assert "serve-kit optimize --target trt-int8" in e.hint and e.origin == str(plan)


def test_check_engine_compat_gpu_name_is_a_warning_unless_strict(tmp_path):
    plan = _version_dir(tmp_path, _details(name="NVIDIA RTX 4090"))
    assert len(check_engine_compat(plan, HERE)) == 1
    with pytest.raises(ModelLoadError, match="built on NVIDIA RTX 4090, running on NVIDIA L4"):
        check_engine_compat(plan, HERE, strict_gpu_match=True)


def test_check_engine_compat_without_a_record_defers_to_tensorrt(tmp_path):
    (tmp_path / "model.plan").write_bytes(b"x")
    assert check_engine_compat(tmp_path / "model.plan", HERE) == []  # no manifest (e.g. validation)
    plan = _version_dir(tmp_path, {"exporter": "dynamo"})
    assert check_engine_compat(plan, HERE) == []


def test_tensorrt_backend_is_registered():
    cls = backend_class("tensorrt")
    assert cls.name == "tensorrt" and cls.file_name == "model.plan"


@without(TRT_REASON, "TensorRT")
def test_tensorrt_backend_refuses_to_load_here_with_the_reason_and_hint(tmp_path):
    plan = _version_dir(tmp_path, _details())
    with pytest.raises(ModelLoadError) as ei:
        load_backend("tensorrt", plan, ["y"])
    assert ei.value.message == f"cannot run a TensorRT engine here: {TRT_REASON}"
    assert ei.value.hint == TENSORRT_INSTALL_HINT


@without(TRT_REASON, "TensorRT")
def test_the_server_reports_a_tensorrt_version_unavailable_here(tmp_path):
    write_version(tmp_path, config("eng", 16, 4, backend="tensorrt"), b"not an engine", backend="tensorrt",
                  model_file="model.plan")

    async def main():
        async with ModelManager(tmp_path) as m:
            return m.index()

    (entry,) = arun(main())
    assert entry["state"] == "UNAVAILABLE" and TRT_REASON in entry["reason"]


# ---------------------------------------------------------------------------------------------
# TorchScript on a device


def _ts_file(tmp_path):
    w1, w2 = mlp_weights(16, 32, 4, seed=2)
    path = tmp_path / "model.pt"
    path.write_bytes(torchscript_mlp(w1, w2))
    return path, w1, w2


@without(CUDA_REASON, "CUDA")
def test_torchscript_on_cuda_fails_clearly_here(tmp_path):
    path, _, _ = _ts_file(tmp_path)
    with pytest.raises(ModelLoadError) as ei:
        load_backend("torchscript", path, ["y"], {"device": "cuda", "input_names": ["x"]})
    assert ei.value.message == f"device cuda was asked for but CUDA is not usable here: {CUDA_REASON}"
    assert "device: cpu" in ei.value.hint


def test_torchscript_device_option_is_checked_and_cpu_is_the_default(tmp_path):
    path, w1, w2 = _ts_file(tmp_path)
    with pytest.raises(ModelLoadError, match="is not cpu, cuda or cuda:N"):
        load_backend("torchscript", path, ["y"], {"device": "tpu"})
    for opts in ({}, {"device": "cpu"}):
        b = load_backend("torchscript", path, ["y"], {"input_names": ["x"], **opts})
        assert b.device == "cpu"
        np.testing.assert_allclose(b.infer({"x": x16(4)})["y"], mlp_reference(x16(4), w1, w2), rtol=1e-5, atol=1e-5)


def test_cuda_graph_batch_sizes_parse():
    assert _batch_sizes(None) == [1, 2, 4, 8, 16, 32]
    assert _batch_sizes("8, 1,4") == [1, 4, 8]
    assert _batch_sizes([2, 2, 16]) == [2, 16]
    for bad in ("0,4", "a,b", []):
        with pytest.raises(ModelLoadError, match="cuda_graph_batch_sizes"):
            _batch_sizes(bad)


# ---------------------------------------------------------------------------------------------
# On a GPU


@needs(CUDA_REASON, "CUDA")
@pytest.mark.parametrize("graphs", [False, True])
def test_torchscript_on_cuda_matches_cpu(tmp_path, graphs):
    path, w1, w2 = _ts_file(tmp_path)
    opts = {"input_names": ["x"], "device": "cuda"}
    if graphs:
        opts.update(cuda_graphs="true", cuda_graph_batch_sizes="1,4,8")
    gpu = load_backend("torchscript", path, ["y"], opts)
    cpu = load_backend("torchscript", path, ["y"], {"input_names": ["x"]})
    assert gpu.device == "cuda:0"
    for rows in (1, 3, 8, 11):  # 3 pads to 4; 11 is above the largest graph and runs eagerly
        x = x16(rows, seed=rows)
        got = gpu.infer({"x": x})["y"]
        assert got.shape == (rows, 4) and isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, cpu.infer({"x": x})["y"], rtol=1e-3, atol=1e-3)
    if graphs:
        assert {k[0] for k, v in gpu._graphs._graphs.items() if v is not None} == {1, 4, 8}


@needs(ORT_CUDA_REASON or CUDA_REASON, "ONNX Runtime's CUDA provider")
def test_ort_cuda_provider_matches_cpu(mlp_file):
    path, w1, w2 = mlp_file
    gpu = load_backend("onnxruntime", path, ["y"], {"device": "cuda:0"})
    assert gpu.providers[0] == "CUDAExecutionProvider"
    x = x16(9)
    np.testing.assert_allclose(gpu.infer({"x": x})["y"], mlp_reference(x, w1, w2), rtol=1e-3, atol=1e-3)


def _engine(tmp_path, max_batch: int):
    """A real engine built from the 16-32-4 MLP through the trt-fp16 target's builder."""
    from serve_kit.optimize.export.tensorrt import TensorRTConfig, build_engine

    w1, w2 = mlp_weights(16, 32, 4, seed=3)
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(mlp_onnx(w1, w2))
    plan = tmp_path / "model.plan"
    details = build_engine(onnx_path, plan, TensorRTConfig(max_batch_size=max_batch), "fp16", {"x": [16]}, None)
    return plan, details, w1, w2


@needs(TRT_REASON, "TensorRT")
def test_tensorrt_backend_batches_1_7_and_max_and_refuses_beyond(tmp_path):
    plan, details, w1, w2 = _engine(tmp_path, 32)
    assert details["tensorrt"]["profiles"]["x"]["max"] == [32, 16]
    b = load_backend("tensorrt", plan, ["y"])
    assert b.input_names == ["x"] and b.output_names == ["y"]
    for rows in (1, 7, 32, 7):
        x = x16(rows, seed=rows)
        got = b.infer({"x": x})["y"]
        ref = mlp_reference(x, w1, w2)
        assert got.shape == (rows, 4) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2 * float(np.abs(ref).max()))
    with pytest.raises(InputError, match=r"outside the engine's profile \(min \[1, 16\], max \[32, 16\]\)"):
        b.infer({"x": x16(33)})


@needs(TRT_REASON, "TensorRT")
def test_tensorrt_backend_instances_run_side_by_side(tmp_path):
    plan, _, w1, w2 = _engine(tmp_path, 16)
    backends = [load_backend("tensorrt", plan, ["y"]) for _ in range(2)]
    errors, results = [], {}

    def work(i):
        try:
            for j in range(50):
                x = x16(1 + (i + j) % 16, seed=i * 100 + j)
                results[(i, j)] = (x, backends[i].infer({"x": x})["y"])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for x, y in results.values():
        ref = mlp_reference(x, w1, w2)
        np.testing.assert_allclose(y, ref, rtol=2e-2, atol=2e-2 * float(np.abs(ref).max()))


@needs(TRT_REASON, "TensorRT")
def test_tensorrt_backend_refuses_an_engine_recorded_for_another_gpu(tmp_path):
    plan, details, _, _ = _engine(tmp_path, 8)
    rec = details["tensorrt"]
    d = tmp_path / "7"
    d.mkdir()
    (d / "model.plan").write_bytes(plan.read_bytes())
    (d / "manifest.json").write_text(json.dumps({"variant": "trt-fp16", "details": {
        "tensorrt": {**rec, "compute_capability": "7.5", "gpu_name": "Tesla T4"}}}))
    with pytest.raises(ModelLoadError, match=r"built for compute capability 7\.5 \(Tesla T4\)"):
        load_backend("tensorrt", d / "model.plan", ["y"])
    # A corrupt file with a matching record: TensorRT's own refusal, as a ModelLoadError.
    (d / "manifest.json").write_text(json.dumps({"details": details}))
    (d / "model.plan").write_bytes(io.BytesIO(b"\0" * 64).getvalue())
    with pytest.raises(ModelLoadError, match="could not deserialize"):
        load_backend("tensorrt", d / "model.plan", ["y"])
