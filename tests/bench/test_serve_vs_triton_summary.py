"""The batching summary of benchmarks/serve_vs_triton.py: its ratios and the bounds it derives from
measured execution and client costs (figures quoted in benchmarks/README.md come from here)."""

import argparse
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_vs_triton.py"


@pytest.fixture(scope="module")
def svt():
    spec = importlib.util.spec_from_file_location("serve_vs_triton", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(mode, r, throughput, batch, client_us):
    return {"model": "mlp", "mode": mode, "round": r, "protocol": "http", "concurrency": 16,
            "throughput": throughput, "p50_ms": 1.0, "p99_ms": 2.0, "mean_batch": batch,
            "server_cores": 1.0, "client_cpu_us_per_inf": client_us}


def test_batching_ratio_and_bounds(svt, capsys):
    rows = [_run("on", 0, 12000, 7.6, 50), _run("off", 0, 5000, 1.0, 80),
            _run("on", 1, 9000, 8.4, 50), _run("off", 1, 6000, 1.0, 70),
            _run("on-pinned", 0, 13000, 5.0, 45), _run("off-pinned", 0, 10000, 1.0, 60),
            {"model": "mlp", "mode": "in-process", "batch": 1, "run_us": 28.0, "per_row_us": 28.0},
            {"model": "mlp", "mode": "in-process", "batch": 8, "run_us": 56.0, "per_row_us": 7.0}]
    args = argparse.Namespace(models=["mlp"], protocols=["http"], concurrency=[16])
    cell, = svt.summarize({"batching": rows}, args)["batching"]
    assert cell["on_ratios"] == [12000 / 5000, 9000 / 6000]  # paired round by round
    assert cell["on_ratio"] == pytest.approx((2.4 + 1.5) / 2)
    assert cell["target_met"] is False
    assert cell["on-pinned_ratio"] == pytest.approx(1.3)
    bounds = cell["bounds"]
    assert bounds["batch"] == 8  # the median mean batch (7.6, 8.4), rounded
    assert bounds["compute_bound"] == pytest.approx(28.0 / 7.0)
    # median client CPU off 75 us, on 50 us
    assert bounds["shared_cores_bound"] == pytest.approx((75 + 28.0) / (50 + 7.0))
    svt.print_tables({"batching": [cell]})
    out = capsys.readouterr().out
    assert "4.00x" in out and "1.81x" in out and "1.30x" in out


def test_no_bounds_without_in_process_costs(svt):
    rows = [_run("on", 0, 12000, 8.0, 50), _run("off", 0, 4000, 1.0, 80)]
    args = argparse.Namespace(models=["mlp"], protocols=["http"], concurrency=[16])
    cell, = svt.summarize({"batching": rows}, args)["batching"]
    assert cell["target_met"] is True and "bounds" not in cell


def test_no_bounds_without_server_statistics(svt):
    """perf_analyzer printed no server statistics: no mean batch, so no bounds (and no crash)."""
    on, off = _run("on", 0, 12000, 8.0, 50), _run("off", 0, 4000, 1.0, 80)
    del on["mean_batch"], off["mean_batch"]
    rows = [on, off, {"model": "mlp", "mode": "in-process", "batch": 1, "run_us": 28.0, "per_row_us": 28.0}]
    args = argparse.Namespace(models=["mlp"], protocols=["http"], concurrency=[16])
    cell, = svt.summarize({"batching": rows}, args)["batching"]
    assert cell["on_ratio"] == 3.0 and "bounds" not in cell
