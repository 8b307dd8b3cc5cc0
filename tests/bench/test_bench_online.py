"""`serve-kit bench --url`: against the real serve-kit runtime (a `serve-kit serve` subprocess
running a real ONNX model with ONNX Runtime), over HTTP and gRPC, closed and open loop; gates,
baselines and bad input, each through the CLI as a user runs it."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from bench_servers import ServeProcess, TinyServer, bench, bench_json
from rt_models import config, mlp_onnx, mlp_weights, write_probe, write_version
from serve_kit.bench import stats

FAST = ["--warmup", "0.3", "--duration", "1.5", "--window", "0.5"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-repo")
    w1, w2 = mlp_weights(16, 32, 4)
    rng = np.random.default_rng(0)
    write_version(root, config("mlp", 16, 4, max_batch_size=8), mlp_onnx(w1, w2),
                  samples={"x": rng.standard_normal((8, 16)).astype(np.float32)})
    # One request at a time, 20 ms each, one waiting at most: an overloaded model answers 503.
    write_probe(root, config("slow", 4, 4, max_batch_size=1,
                             dynamic_batching={"max_queue_size": 1, "max_queue_delay_microseconds": 0}),
                samples={"x": np.ones((2, 4), np.float32)}, delay_s=0.02)
    return root


@pytest.fixture(scope="module")
def server(repo):
    s = ServeProcess(repo, test_backends=True)
    yield s
    s.stop()


def _check_point(r: dict) -> None:
    assert r["ok"] > 0 and r["errors_total"] == 0, r["errors"]
    assert r["throughput"] > 0 and r["windows_measured"] == 3
    assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    # the histogram in the report holds every successful request
    assert stats.decode(r["histogram"]).get_total_count() == r["ok"]
    assert sum(w["ok"] for w in r["windows"]) == r["ok"]


def test_closed_loop_http_binary_sweep(server, repo):
    report = bench_json(["--url", server.http, "--model", "mlp", "--data", str(repo), "--concurrency", "1,4", *FAST])
    assert [r["concurrency"] for r in report["results"]] == [1, 4]
    for r in report["results"]:
        _check_point(r)
    manifest = json.loads((repo / "mlp" / "1" / "manifest.json").read_text())
    assert report["model_hashes"] == {"mlp/1/model.onnx": manifest["files"]["model.onnx"]["sha256"]}
    assert report["synthetic"] is False and report["inputs"]["origin"].endswith("samples.npz")
    assert report["target"]["encoding"] == "binary" and report["target"]["max_batch_size"] == 8
    env = report["environment"]
    assert env["cpu_count"] >= 1 and env["cpu_model"] and env["libraries"]["numpy"] and env["serve_kit"]


def test_closed_loop_http_json_with_batches(server, repo):
    report = bench_json(["--url", server.http, "--model", "mlp", "--data", str(repo / "mlp" / "1" / "samples.npz"),
                         "--encoding", "json", "--batch-size", "4", "-c", "2", *FAST])
    r = report["results"][0]
    _check_point(r)
    assert r["throughput"] == pytest.approx(4 * r["requests_per_s"])
    assert report["target"]["outputs"]["y"]["shape"] == [4, 4]


def test_open_loop_http(server, repo):
    report = bench_json(["--url", server.http, "--model", "mlp", "--data", str(repo), "--rate", "200", *FAST])
    r = report["results"][0]
    _check_point(r)
    assert r["offered_rate"] == 200 and 120 <= r["offered_per_s"] <= 280  # Poisson arrivals over 1.5 s
    assert r["requests"] == round(r["offered_per_s"] * r["duration_s"])  # every offered request is accounted for
    assert r["send_lag"]["p50_ms"] is not None


def test_grpc_closed_and_open_loop(server, repo):
    closed = bench_json(["--url", server.grpc, "--model", "mlp", "--data", str(repo), "-c", "2", *FAST])
    _check_point(closed["results"][0])
    assert closed["target"]["protocol"] == "grpc"
    opened = bench_json(["--url", server.grpc, "--model", "mlp", "--data", str(repo), "--rate", "150",
                         "--arrival", "constant", *FAST])
    r = opened["results"][0]
    _check_point(r)
    assert r["offered_per_s"] == pytest.approx(150, rel=0.05)  # constant arrivals


def test_overloaded_queue_limited_model_answers_503_counted_by_status(server, repo):
    report = bench_json(["--url", server.http, "--model", "slow", "--data", str(repo), "-c", "6", *FAST])
    r = report["results"][0]
    assert r["ok"] > 0 and r["errors"].get("503", 0) > 0, r["errors"]
    assert r["error_rate"] == pytest.approx(r["errors_total"] / r["requests"])
    assert any("503" in w for w in report["warnings"])
    report = bench_json(["--url", server.grpc, "--model", "slow", "--data", str(repo), "-c", "6", *FAST])
    r = report["results"][0]
    assert r["ok"] > 0 and r["errors"].get("UNAVAILABLE", 0) > 0, r["errors"]


def test_gates_pass_and_fail(server, repo):
    args = ["--url", server.http, "--model", "mlp", "--data", str(repo), "-c", "1", *FAST]
    ok = bench(["bench", *args, "--assert", "throughput>=1", "--assert", "p99_ms<60000", "--assert", "errors==0"])
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("gate pass") == 3
    failed = bench(["--json", "bench", *args, "--assert", "p50_ms<0.000001", "--assert", "throughput>=1"])
    assert failed.returncode == 3, failed.stderr
    doc = json.loads(failed.stdout)
    assert [g["passed"] for g in doc["gates"]] == [False, True]
    assert "p50_ms<0.000001" in failed.stderr


def test_baseline_rerun_of_the_same_server_passes(server, repo, tmp_path):
    args = ["--url", server.http, "--model", "mlp", "--data", str(repo), "-c", "2", "--warmup", "0.3",
            "--window", "0.5", "--min-windows", "4", "--max-windows", "4"]
    base = tmp_path / "base.json"
    first = bench(["bench", *args, "--report", str(base)])
    assert first.returncode == 0, first.stderr
    again = bench(["--json", "bench", *args, "--baseline", str(base), "--max-regression", "10%"])
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr
    comparison = json.loads(again.stdout)["baseline"]
    assert comparison["regressed"] == []
    assert {c["metric"] for c in comparison["rows"][0]["checks"]} == {"throughput", "p50_ms"}


def test_baseline_regression_fails_with_exit_3(tmp_path):
    args = ["--model", "tiny", "--synthetic", "-c", "2", "--warmup", "0.3", "--window", "0.5", "--min-windows", "4",
            "--max-windows", "4"]
    fast = TinyServer(delay_s=0.002).start()
    try:
        base = tmp_path / "base.json"
        assert bench(["bench", "--url", fast.url, *args, "--report", str(base)]).returncode == 0
    finally:
        fast.stop()
    slow = TinyServer(delay_s=0.02).start()  # 10x the service time
    try:
        run = bench(["--json", "bench", "--url", slow.url, *args, "--baseline", str(base)])
    finally:
        slow.stop()
    assert run.returncode == 3, run.stderr
    comparison = json.loads(run.stdout)["baseline"]
    assert comparison["regressed"] == ["concurrency=2"]
    checks = {c["metric"]: c for c in comparison["rows"][0]["checks"]}
    assert checks["throughput"]["regressed"] and checks["p50_ms"]["regressed"]
    assert checks["p50_ms"]["ci_low_pct"] > 100
    assert "regressed" in run.stderr


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error naming the value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_url():
    url = f"http://127.0.0.1:{_free_port()}"
    run = bench(["bench", "--url", url, "--model", "m", "--synthetic"])
    assert run.returncode == 1
    assert "cannot reach the server" in run.stderr and url in run.stderr and "Traceback" not in run.stderr
    grpc_url = f"grpc://127.0.0.1:{_free_port()}"
    run = bench(["bench", "--url", grpc_url, "--model", "m", "--synthetic"])
    assert run.returncode == 1 and "cannot reach the server" in run.stderr and grpc_url in run.stderr


def test_unknown_model_names_it_and_the_served_ones(server):
    for url in (server.http, server.grpc):
        run = bench(["bench", "--url", url, "--model", "nope", "--synthetic"])
        assert run.returncode == 1, run.stderr
        assert "'nope'" in run.stderr and "mlp" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("expr", ["p99<20", "p99_ms<<20", "throughput>=fast"])
def test_bad_assert_is_a_usage_error_naming_it(expr):
    run = bench(["bench", "--url", "http://127.0.0.1:1", "--model", "m", "--synthetic", "--assert", expr])
    assert run.returncode == 2 and expr in run.stderr


def test_data_of_the_wrong_dtype_or_shape(server, tmp_path):
    f64 = tmp_path / "f64.npz"
    np.savez(f64, x=np.zeros((4, 16), np.float64))
    run = bench(["bench", "--url", server.http, "--model", "mlp", "--data", str(f64)])
    assert run.returncode == 1, run.stderr
    assert "float64" in run.stderr and "FP32" in run.stderr and "Traceback" not in run.stderr
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((4, 5), np.float32))
    run = bench(["bench", "--url", server.http, "--model", "mlp", "--data", str(wide)])
    assert run.returncode == 1 and "[4, 5]" in run.stderr and "16" in run.stderr
    wrong_name = tmp_path / "named.npz"
    np.savez(wrong_name, x=np.zeros((4, 16), np.float32), z=np.zeros((4, 1), np.float32))
    run = bench(["bench", "--url", server.http, "--model", "mlp", "--data", str(wrong_name)])
    assert run.returncode == 1 and "'z'" in run.stderr


def test_no_data_without_synthetic_and_other_usage_errors(server):
    run = bench(["bench", "--url", server.http, "--model", "mlp"])
    assert run.returncode == 2 and "--synthetic" in run.stderr
    run = bench(["bench", "--url", "https://127.0.0.1:8000", "--model", "mlp", "--synthetic"])
    assert run.returncode == 2 and "https" in run.stderr
    run = bench(["bench", "--url", server.http, "--model", "mlp", "--synthetic", "-c", "2", "--rate", "10"])
    assert run.returncode == 2 and "not both" in run.stderr
    run = bench(["bench", "--url", server.http, "--model", "mlp", "--synthetic", "-c", "0"])
    assert run.returncode == 2 and "--concurrency" in run.stderr
