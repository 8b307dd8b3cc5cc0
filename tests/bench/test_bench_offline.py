"""`serve-kit bench REPO`: every version measured in-process through the runtime's backends;
FLOP counting from the ONNX graph; gates, baseline and plot on offline reports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench_servers import bench, bench_json
from rt_models import config, mlp_onnx, mlp_weights, torchscript_mlp, write_version
from serve_kit.bench import stats
from serve_kit.bench.flops import count_flops

FAST = ["--batch-sizes", "1,4", "--warmup", "0.1", "--window", "0.2", "--min-windows", "3", "--max-windows", "4"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline-repo")
    w1, w2 = mlp_weights(16, 32, 4)
    samples = {"x": np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)}
    cfg = config("mlp", 16, 4, max_batch_size=8)
    write_version(root, cfg, mlp_onnx(w1, w2), samples=samples)
    pytest.importorskip("torch")
    write_version(root, cfg.model_copy(update={"backend": "torchscript"}), torchscript_mlp(w1, w2),
                  backend="torchscript", model_file="model.pt", samples=samples)
    return root


def test_every_version_over_the_batch_sweep(repo):
    report = bench_json([str(repo), *FAST])
    rows = {(r["version"], r["batch_size"]): r for r in report["results"]}
    assert sorted(rows) == [(1, 1), (1, 4), (2, 1), (2, 4)]
    for r in rows.values():
        assert r["synthetic"] is False and 3 <= r["windows_measured"] <= 4
        # fewer windows than the limit only when the last three agreed; the flag says which
        assert r["stable"] or r["windows_measured"] == 4
        assert r["stable"] == stats.is_stable(r["per_window"]["p50_ms"], r["per_window"]["throughput"], 10)
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["calls"] == sum(w["calls"] for w in r["windows"]) >= 3 * 3
        assert r["throughput"] == pytest.approx(r["calls"] * r["batch_size"] / sum(w["seconds"] for w in r["windows"]))
        mem = r["memory"]
        assert mem["load_rss_delta_bytes"] is not None and mem["peak_rss_delta_bytes"] is not None
        assert mem["peak_rss_delta_bytes"] >= 0
        assert r["threads"]["intra_op"] >= 1  # the server's own backend options
    assert rows[(1, 1)]["backend"] == "onnxruntime" and rows[(2, 1)]["backend"] == "torchscript"
    # FLOPs: y = relu(x W1) W2 with W1 16x32 and W2 32x4: 2 * (16*32 + 32*4) per sample
    flops = rows[(1, 4)]["flops"]
    assert flops["per_sample"] == 2 * (16 * 32 + 32 * 4) and flops["complete"]
    assert flops["fraction_of_peak"] == pytest.approx(flops["per_sample"] * rows[(1, 4)]["throughput"]
                                                      / report["peak"]["flops_per_s"])
    assert "flops" not in rows[(2, 1)]  # counted from ONNX graphs only
    assert report["peak"]["flops_per_s"] > 1e8
    hashes = report["model_hashes"]
    assert set(hashes) == {"mlp/1/model.onnx", "mlp/2/model.pt"}
    assert hashes["mlp/1/model.onnx"] == json.loads((repo / "mlp/1/manifest.json").read_text())["files"][
        "model.onnx"]["sha256"]


def test_gates_baseline_and_plot_on_offline_reports(repo, tmp_path):
    base = tmp_path / "base.json"
    png = tmp_path / "curve.png"
    args = [str(repo), "--version", "1", *FAST]
    first = bench(["bench", *args, "--report", str(base), "--assert", "throughput>=1", "--plot", str(png)])
    if "needs matplotlib" in first.stderr:
        pytest.skip("matplotlib (the bench extra) is not installed")
    assert first.returncode == 0, first.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gate pass" in first.stdout and "MFLOP/sample" in first.stdout
    again = bench(["--json", "bench", *args, "--baseline", str(base), "--max-regression", "50%",
                   "--assert", "p50_ms<0.0000001"])
    assert again.returncode == 3  # the impossible latency gate, not the baseline
    doc = json.loads(again.stdout)
    assert doc["baseline"]["regressed"] == [] and len(doc["baseline"]["rows"]) == 2
    assert {g["passed"] for g in doc["gates"]} == {False}


def test_versions_without_samples_need_synthetic(tmp_path):
    w1, w2 = mlp_weights(8, 8, 2)
    write_version(tmp_path, config("nosamples", 8, 2, max_batch_size=4), mlp_onnx(w1, w2))
    run = bench(["bench", str(tmp_path), "--no-flops", *FAST])
    assert run.returncode == 1 and "samples.npz" in run.stderr and "--synthetic" in run.stderr
    report = bench_json([str(tmp_path), "--synthetic", "--no-flops", *FAST])
    assert report["synthetic"] is True and all(r["synthetic"] for r in report["results"])
    assert report["peak"] is None


def test_offline_usage_errors(repo, tmp_path):
    run = bench(["bench", str(repo), "--model", "nope"])
    assert run.returncode == 2 and "'nope'" in run.stderr and "mlp" in run.stderr
    run = bench(["bench", str(repo), "--batch-sizes", "1,64"])
    assert run.returncode == 2 and "64" in run.stderr and "max_batch_size" in run.stderr
    run = bench(["bench", str(repo), "--version", "9"])
    assert run.returncode == 2 and "9" in run.stderr
    run = bench(["bench", str(tmp_path / "missing")])
    assert run.returncode == 1 and "missing" in run.stderr


def _graph_model(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"W": rng.standard_normal((4, 1, 3, 3)), "G": rng.standard_normal((256, 10)), "bias": np.zeros(10)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "G", "bias"], ["y"])]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
                              initializer=[numpy_helper.from_array(v.astype(np.float32), k)
                                           for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "cnn.onnx"
    onnx.save(model, str(path))
    return path


def test_flops_of_conv_and_gemm(tmp_path):
    path = _graph_model(tmp_path)
    one = count_flops(path, {"x": [1, 1, 8, 8]})
    conv = 2 * (4 * 8 * 8) * (1 * 3 * 3)   # every output element: a 1x3x3 multiply-add
    gemm = 2 * 256 * 10 + 10                # plus the bias add
    assert one["by_op"] == {"Conv": conv, "Gemm": gemm} and one["flops"] == conv + gemm and one["complete"]
    assert count_flops(path, {"x": [8, 1, 8, 8]})["flops"] == 8 * (conv + gemm)


def _version_with_source(root, name, payload, samples, source):
    from serve_kit.repository import Repository

    cfg = config(name, 16, 4, max_batch_size=8)
    with Repository(root).new_version(name) as stage:
        (stage.dir / "model.onnx").write_bytes(payload)
        np.savez(stage.dir / "samples.npz", **{f"input.{k}": v for k, v in samples.items()})
        stage.commit(cfg, {"model_file": "model.onnx", "backend": "onnxruntime", "variant": "onnx",
                           "source": source})


def test_eager_source_is_measured_when_it_loads_as_the_optimized_model(tmp_path):
    pytest.importorskip("torch")
    from serve_kit.repository import sha256_file

    w1, w2 = mlp_weights(16, 32, 4)
    src = tmp_path / "source.pt"
    src.write_bytes(torchscript_mlp(w1, w2))
    samples = {"x": np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)}
    repo = tmp_path / "repo"
    _version_with_source(repo, "mlp", mlp_onnx(w1, w2), samples,
                         {"kind": "torchscript", "ref": str(src), "sha256": sha256_file(src)})
    # A source that loads but is not what was optimized (another file now at that path, say).
    _version_with_source(repo, "changed", mlp_onnx(w1, w2), samples,
                         {"kind": "torchscript", "ref": str(src), "sha256": "0" * 64})
    report = bench_json([str(repo), "--no-flops", *FAST])
    eager = [r for r in report["results"] if r["variant"] == "pytorch-eager"]
    assert [(r["model"], r["batch_size"]) for r in eager] == [("mlp", 1), ("mlp", 4)]
    for r in eager:
        assert r["backend"] == "pytorch-eager" and "/eager/" in r["key"] and r["p50_ms"] > 0
        assert r["source"]["ref"] == str(src) and r["synthetic"] is False
    skipped = {s["model"]: s["reason"] for s in report["skipped"]}
    assert "not as the model that was optimized" in skipped["changed"]
    served = {(r["model"], r["variant"]) for r in report["results"]}
    assert ("changed", "onnx") in served  # the served variant is measured either way
    assert not [r for r in bench_json([str(repo), "--no-flops", "--no-eager", *FAST])["results"]
                if r["variant"] == "pytorch-eager"]
