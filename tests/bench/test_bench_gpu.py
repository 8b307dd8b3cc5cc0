"""GPU measurements in `serve-kit bench`: NVML sampling, CUDA-event timing and the H2D / compute /
D2H split, the GEMM peak and the fraction of it, and their place in offline reports.

Everywhere: the refusal paths (no NVML, no CUDA: a reason, never a crash or a hang), the
arithmetic, and that a CPU-only offline report is exactly what it was. On a CUDA machine (marked
gpu; skipped elsewhere with the reason): real events, NVML samples, the peak and a whole bench run.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from bench_servers import bench, bench_json
from rt_models import config, mlp_onnx, mlp_weights, torchscript_mlp, write_version
from serve_kit.bench import gpu
from serve_kit.errors import ServeKitError
from serve_kit.gpu import cuda_unavailable_reason, ort_provider_unavailable_reason

FAST = ["--batch-sizes", "1,4", "--warmup", "0.1", "--window", "0.2", "--min-windows", "3", "--max-windows", "4"]
CUDA_REASON = cuda_unavailable_reason()


def _nvml_reason() -> str | None:
    s = gpu.NvmlSampler().start()
    s.stop()
    return s.unavailable


NVML_REASON = _nvml_reason()


def needs_cuda(test):
    return pytest.mark.gpu(pytest.mark.skipif(CUDA_REASON is not None, reason=f"CUDA: {CUDA_REASON}")(test))


def without(reason: str | None, what: str):
    """A test of the refusal path: runs only where `what` is missing."""
    return pytest.mark.skipif(reason is None, reason=f"{what} is usable here; this checks the refusal without it")


# ---------------------------------------------------------------------------------------------
# Everywhere


@without(NVML_REASON, "NVML")
def test_nvml_sampler_without_nvml_reports_why_and_returns_at_once():
    t0 = time.perf_counter()
    with gpu.NvmlSampler(0, interval_s=0.01) as s:
        time.sleep(0.1)
    assert time.perf_counter() - t0 < 2.0  # no thread left waiting, no retry loop
    summary = s.summary(work_items=100)
    assert summary == {"unavailable": NVML_REASON} and NVML_REASON.startswith("NVML: ")
    assert len(NVML_REASON) > len("NVML: ") and s.samples == []
    assert gpu.NvmlSampler("cuda:0").start().stop() == {"unavailable": NVML_REASON}


def test_nvml_sampler_rejects_a_nonpositive_interval():
    with pytest.raises(ValueError, match="positive"):
        gpu.NvmlSampler(0, interval_s=0)


def test_nvml_device_for_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu.nvml_device_for("cuda:1") == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,2")
    assert gpu.nvml_device_for("cuda:0") == 3 and gpu.nvml_device_for("cuda:1") == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-0a1b,GPU-2c3d")
    assert gpu.nvml_device_for("cuda:1") == "GPU-2c3d"


def test_fraction_of_peak_arithmetic():
    peaks = {"fp32": 50.0, "tf32": 400.0, "fp16": 800.0, "bf16": None}
    # 2 GFLOP per sample at 1000 samples/s = 2 TFLOP/s
    assert gpu.fraction_of_peak(2e9, 1000, "fp32", peaks) == pytest.approx(2 / 50)
    assert gpu.fraction_of_peak(2e9, 1000, "fp16", peaks) == pytest.approx(2 / 800)
    assert gpu.fraction_of_peak(2e9, 1000, "bf16", peaks) is None  # not calibrated
    with pytest.raises(ValueError, match="int8"):
        gpu.fraction_of_peak(2e9, 1000, "int8", peaks)


@pytest.mark.parametrize("precision, backend, fp32_matmul, expected", [
    ("fp16", "tensorrt", None, "fp16"), ("bf16", "torchscript", None, "bf16"), ("int8", "tensorrt", None, "fp16"),
    ("fp8", "tensorrt", None, "fp16"), (None, "tensorrt", None, "tf32"), ("fp32", "onnxruntime", None, "tf32"),
    ("fp32", "torchscript", "highest", "fp32"), ("fp32", "torchscript", "high", "tf32")])
def test_peak_dtype(precision, backend, fp32_matmul, expected):
    assert gpu.peak_dtype(precision, backend, fp32_matmul) == expected


def test_gpu_request_reads_the_backend_options():
    assert gpu.gpu_request("onnxruntime", {}) is None
    assert gpu.gpu_request("onnxruntime", {"providers": "CPUExecutionProvider"}) is None
    r = gpu.gpu_request("onnxruntime", {"providers": "cuda,cpu"})
    assert r["device"] == "cuda:0" and r["provider"] == "CUDAExecutionProvider"
    r = gpu.gpu_request("onnxruntime", {"device": "cuda:1"})
    assert r["device"] == "cuda:1" and r["provider"] == "CUDAExecutionProvider"
    assert gpu.gpu_request("onnxruntime", {"device": "nonsense"}) is None  # the backend refuses it on load
    assert gpu.gpu_request("torchscript", {}) is None and gpu.gpu_request("torchscript", {"device": "cpu"}) is None
    assert gpu.gpu_request("torchscript", {"device": "cuda"})["device"] == "cuda:0"
    assert gpu.gpu_request("tensorrt", {})["device"] == "cuda:0"
    assert gpu.gpu_request("tensorrt", {"device": "cuda:2"})["device"] == "cuda:2"


@without(CUDA_REASON, "CUDA")
def test_cuda_timing_without_cuda_is_a_clear_error():
    torch = pytest.importorskip("torch")
    calls = [lambda: gpu.time_cuda(torch.matmul, torch.ones(2, 2), torch.ones(2, 2)),
             lambda: gpu.split_module(torch.nn.Linear(2, 2), {"x": np.ones((1, 2), np.float32)}),
             lambda: gpu.gemm_peak(),
             lambda: gpu.fraction_of_peak(1e9, 10, "fp16")]
    for call in calls:
        with pytest.raises(ServeKitError) as e:
            call()
        assert CUDA_REASON in e.value.message and e.value.hint and e.value.value == "cuda:0"
    assert gpu.probe("cuda:0") == {"device": "cuda:0", "unavailable": CUDA_REASON}
    assert gpu.probe_in_subprocess("cuda:0") == {"device": "cuda:0", "unavailable": CUDA_REASON}


ROW_KEYS = {"key", "model", "version", "backend", "batch_size", "synthetic", "calls", "windows_measured", "stable",
            "min_ms", "mean_ms", "max_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "p999_ms", "throughput",
            "per_window", "windows", "memory", "threads", "histogram", "warnings", "flops", "variant", "precision"}
REPORT_KEYS = {"format", "kind", "created", "environment", "repository", "model_hashes", "synthetic", "settings",
               "peak", "results", "skipped", "warnings", "gates"}


def test_cpu_offline_report_is_unchanged(tmp_path):
    w1, w2 = mlp_weights(16, 32, 4)
    samples = {"x": np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)}
    write_version(tmp_path, config("mlp", 16, 4, max_batch_size=8), mlp_onnx(w1, w2), samples=samples)
    path = tmp_path / "report.json"
    run = bench(["bench", str(tmp_path), *FAST, "--report", str(path)])
    assert run.returncode == 0, run.stderr
    report = json.loads(path.read_text())
    assert set(report) == REPORT_KEYS and report["skipped"] == []
    assert [set(r) for r in report["results"]] == [ROW_KEYS, ROW_KEYS]
    assert all(r["flops"]["fraction_of_peak"] > 0 for r in report["results"])  # against the CPU peak
    assert "GPU" not in run.stdout and "NVML" not in run.stdout


def _gpu_repo(root):
    """Three models asking for a GPU: ONNX Runtime on CUDA, the same allowing the CPU, TorchScript on CUDA."""
    w1, w2 = mlp_weights(16, 32, 4)
    samples = {"x": np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)}
    write_version(root, config("ort_cuda", 16, 4, max_batch_size=8, parameters={"providers": "cuda"}),
                  mlp_onnx(w1, w2), samples=samples)
    write_version(root, config("ort_fallback", 16, 4, max_batch_size=8,
                               parameters={"providers": "cuda", "allow_cpu_fallback": "true"}),
                  mlp_onnx(w1, w2), samples=samples)
    write_version(root, config("ts_cuda", 16, 4, max_batch_size=8, backend="torchscript",
                               parameters={"device": "cuda"}),
                  torchscript_mlp(w1, w2), backend="torchscript", model_file="model.pt", samples=samples)


ORT_CUDA_REASON = ort_provider_unavailable_reason("CUDAExecutionProvider")


@without(CUDA_REASON, "CUDA")
@without(ORT_CUDA_REASON, "ONNX Runtime's CUDA provider")
def test_gpu_versions_without_a_gpu_say_why(tmp_path):
    pytest.importorskip("torch")
    _gpu_repo(tmp_path)
    path = tmp_path / "report.json"
    run = bench(["bench", str(tmp_path), *FAST, "--report", str(path)])
    assert run.returncode == 0, run.stderr
    report = json.loads(path.read_text())
    assert report["gpu_devices"] == {"cuda:0": {"device": "cuda:0", "unavailable": CUDA_REASON}}
    # Versions the server would refuse to load here are not measured, with the reason.
    skipped = {s["model"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"ort_cuda", "ts_cuda"}
    assert ORT_CUDA_REASON in skipped["ort_cuda"] and "CUDAExecutionProvider" in skipped["ort_cuda"]
    assert CUDA_REASON in skipped["ts_cuda"] and "parameters.device" in skipped["ts_cuda"]
    # The one that allows the CPU is measured there, and says why it is not on the GPU.
    rows = report["results"]
    assert [r["model"] for r in rows] == ["ort_fallback", "ort_fallback"]
    for r in rows:
        assert r["gpu"]["device"] == "cuda:0" and ORT_CUDA_REASON in r["gpu"]["unavailable"]
        assert "nvml" not in r["gpu"] and r["flops"]["fraction_of_peak"] > 0  # it ran on the CPU
    assert "not on the GPU" in run.stdout and "GPU cuda:0 unavailable" in run.stdout
    assert "not measured" in run.stdout and "ts_cuda" in run.stdout


# ---------------------------------------------------------------------------------------------
# On a CUDA GPU


@needs_cuda
def test_cuda_events_time_the_gpu_work():
    import torch

    a = torch.randn(4096, 4096, device="cuda")
    one = gpu.time_cuda(torch.matmul, a, a, min_iterations=20)
    eight = gpu.time_cuda(lambda: [torch.matmul(a, a) for _ in range(8)], min_iterations=20)
    assert one.iterations >= 20 and 0 < one.gpu_ms["p50"] <= one.wall_ms["p50"] * 1.05 + 0.05
    # The events see the GPU's work, not the launches: eight GEMMs take about eight times one.
    assert 4 < eight.gpu_ms["p50"] / one.gpu_ms["p50"] < 16


@needs_cuda
def test_phase_split_adds_up_to_the_call():
    import torch

    module = torch.nn.Linear(4096, 4096).cuda().eval()
    x = {"x": np.random.default_rng(0).standard_normal((2048, 4096)).astype(np.float32)}
    t = gpu.split_module(module, x, "cuda:0", min_iterations=20)
    assert set(t.phases_ms) == {"h2d", "compute", "d2h"} and t.method == "torch-module"
    assert all(p["p50"] > 0 for p in t.phases_ms.values())
    assert sum(p["mean"] for p in t.phases_ms.values()) == pytest.approx(t.total_ms["mean"], rel=1e-6)
    # The GPU time of a call is most of its wall time, and never more.
    assert 0.5 * t.wall_ms["mean"] <= t.total_ms["mean"] <= t.wall_ms["mean"] * 1.02 + 0.05
    # 32 MiB in and 8 MiB out: the copy in takes longer than the copy back.
    assert t.phases_ms["h2d"]["p50"] > t.phases_ms["d2h"]["p50"]


@needs_cuda
@pytest.mark.skipif(NVML_REASON is not None, reason=f"{NVML_REASON}")
def test_nvml_samples_a_busy_gpu():
    import torch

    a = torch.randn(8192, 8192, device="cuda")
    with gpu.NvmlSampler("cuda:0", interval_s=0.05) as s:
        deadline = time.perf_counter() + 1.0
        while time.perf_counter() < deadline:
            torch.matmul(a, a)
            torch.cuda.synchronize()
    summary = s.summary(work_items=10)
    assert summary["samples"] >= 10 and summary["name"]
    assert summary["util_max_pct"] > 0 and summary["memory_used_max_bytes"] > a.nbytes
    assert summary["power_max_w"] > 0 and summary["energy_j"] > 0
    assert summary["joules_per_item"] == pytest.approx(summary["energy_j"] / 10)
    bad = gpu.NvmlSampler("GPU-00000000-0000-0000-0000-000000000000").start()
    assert bad.stop()["unavailable"].startswith("NVML: device")


@needs_cuda
def test_gemm_peak_is_measured_once_per_process():
    peak = gpu.gemm_peak("cuda:0")
    t = peak["tflops"]
    assert set(t) == set(gpu.DTYPES) and all(v > 0 for v in t.values())
    assert t["fp16"] > t["fp32"] and t["tf32"] > t["fp32"]  # tensor cores
    assert gpu.gemm_peak("cuda:0") is peak
    assert gpu.fraction_of_peak(1e12, 1.0, "fp16") == pytest.approx(1 / t["fp16"])


@needs_cuda
def test_offline_bench_on_the_gpu(tmp_path):
    from serve_kit.repository import Repository, sha256_file

    w1, w2 = mlp_weights(16, 32, 4)
    samples = {"x": np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)}
    src = tmp_path / "source.pt"
    src.write_bytes(torchscript_mlp(w1, w2))
    source = {"kind": "torchscript", "ref": str(src), "sha256": sha256_file(src)}
    cfg = config("mlp", 16, 4, max_batch_size=8, parameters={"device": "cuda", "allow_cpu_fallback": "true"})
    repo = tmp_path / "repo"
    for payload, backend, file in ((mlp_onnx(w1, w2), "onnxruntime", "model.onnx"),
                                   (src.read_bytes(), "torchscript", "model.pt")):
        with Repository(repo).new_version("mlp") as stage:
            (stage.dir / file).write_bytes(payload)
            np.savez(stage.dir / "samples.npz", x=samples["x"])
            stage.commit(cfg.model_copy(update={"backend": backend}),
                         {"model_file": file, "backend": backend, "variant": backend, "source": source})
    path = tmp_path / "report.json"
    run = bench(["bench", str(repo), "--no-eager", *FAST, "--report", str(path)], timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(path.read_text())
    peak = report["gpu_devices"]["cuda:0"]
    assert peak["info"]["name"] and peak["gemm_peak"]["tflops"]["fp16"] > 0
    ts = [r for r in report["results"] if r["backend"] == "torchscript"]
    assert [r["batch_size"] for r in ts] == [1, 4]
    for r in ts:
        g = r["gpu"]
        assert g["device"] == "cuda:0" and "unavailable" not in g
        ev = g["cuda_events"]
        assert ev["method"] == "torch-module" and set(ev["phases_ms"]) == {"h2d", "compute", "d2h"}
        assert ev["total_ms"]["p50"] > 0 and g["torch_peak_allocated_bytes"] > 0
        if NVML_REASON is None:
            assert g["nvml"]["samples"] >= 2 and g["nvml"]["memory_used_max_bytes"] > 0
        else:
            assert g["nvml"] == {"unavailable": NVML_REASON}
        # FLOPs borrowed from the ONNX version made from the same source
        assert g["flops_from"] == "mlp/v1" and g["flops_per_sample"] == 2 * (16 * 32 + 32 * 4)
        assert g["peak_dtype"] == "fp32" and 0 < g["fraction_of_peak"] < 1
        assert g["fraction_of_peak"] == pytest.approx(
            g["flops_per_sample"] * r["throughput"] / (g["gemm_peak_tflops"]["fp32"] * 1e12))
        assert "fraction_of_peak" not in (r.get("flops") or {})  # no CPU fraction for a GPU result
    assert "GPU cuda:0" in run.stdout and "torch-module" in run.stdout


@needs_cuda
def test_bench_json_report_of_a_gpu_run_is_valid_json(tmp_path):
    """The report goes through `--json` too (no NaN or non-JSON values from the GPU fields)."""
    pytest.importorskip("torch")
    w1, w2 = mlp_weights(16, 32, 4)
    samples = {"x": np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)}
    write_version(tmp_path, config("ts", 16, 4, max_batch_size=8, backend="torchscript",
                                   parameters={"device": "cuda"}),
                  torchscript_mlp(w1, w2), backend="torchscript", model_file="model.pt", samples=samples)
    report = bench_json([str(tmp_path), "--no-flops", *FAST], timeout=300)
    assert "gemm_peak" not in report["gpu_devices"]["cuda:0"]  # --no-flops skips the calibration
    assert all(r["gpu"]["cuda_events"]["phases_ms"] for r in report["results"])
