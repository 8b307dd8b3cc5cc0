"""`serve-kit bench tune`: real runs of the runtime pick batching settings; config.yaml is
rewritten only with a verified choice."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench_servers import bench
from rt_models import config, mlp_onnx, mlp_weights, write_version
from serve_kit.config import load_model_config
from serve_kit.repository import Repository

QUICK = ["--batch-sizes", "1,8", "--concurrency", "1,8", "--warmup", "0.2", "--window", "0.3", "--min-windows", "2",
         "--max-windows", "2"]


@pytest.fixture
def repo(tmp_path):
    w1, w2 = mlp_weights(32, 64, 4)
    cfg = config("mlp", 32, 4, max_batch_size=16, dynamic_batching={"max_queue_delay_microseconds": 100})
    samples = {"x": np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32)}
    write_version(tmp_path, cfg, mlp_onnx(w1, w2), samples=samples)
    return tmp_path


def test_tune_writes_a_verified_config(repo):
    before = (repo / "mlp" / "config.yaml").read_text()
    run = bench(["--json", "bench", "tune", str(repo), "--model", "mlp", "--p99-budget-ms", "200", *QUICK],
                timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["kind"] == "tune" and result["verified"] and result["written"]
    assert [r["batch_size"] for r in result["service_time"]] == [1, 8]
    tried = {(c["max_batch_size"], c["max_queue_delay_microseconds"], c["instances"]) for c in result["candidates"]}
    assert {(16, 100, 1), (1, 0, 1), (8, 0, 1)} <= tried  # the current settings, then each batch size
    chosen = result["chosen"]
    assert chosen["feasible"] and chosen["best"]["p99_ms"] <= 200
    # the written config is the chosen one, valid, and the version still verifies
    cfg = load_model_config(repo / "mlp" / "config.yaml")
    assert (repo / "mlp" / "config.yaml").read_text() != before
    assert cfg.max_batch_size == chosen["max_batch_size"]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == chosen["max_queue_delay_microseconds"]
    assert cfg.dynamic_batching.max_queue_size == chosen["max_queue_size"] >= 2 * cfg.max_batch_size
    assert cfg.instance_group.count == chosen["instances"]
    assert result["config_after"]["max_batch_size"] == cfg.max_batch_size
    assert result["verification"]["p99_ms"] <= 200 and result["verification"]["errors_total"] == 0
    r = Repository(repo)
    assert r.verify_version(r.version("mlp")) == []


def test_tune_refuses_an_impossible_budget_and_writes_nothing(repo):
    before = (repo / "mlp" / "config.yaml").read_text()
    run = bench(["bench", "tune", str(repo), "--model", "mlp", "--p99-budget-ms", "0.0001", *QUICK], timeout=300)
    assert run.returncode == 3, run.stderr
    assert "budget" in run.stderr
    assert (repo / "mlp" / "config.yaml").read_text() == before


def test_tune_usage_errors(repo):
    run = bench(["bench", "tune", str(repo), "--model", "mlp"])
    assert run.returncode == 2 and "--p99-budget-ms" in run.stderr
    run = bench(["bench", "tune", "--p99-budget-ms", "5"])
    assert run.returncode == 2 and "repository" in run.stderr
    run = bench(["bench", "tune", str(repo), "--model", "nope", "--p99-budget-ms", "5"])
    assert run.returncode == 2 and "'nope'" in run.stderr
