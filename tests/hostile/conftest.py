"""The hostile-input suite's fixtures: one real `serve-kit serve` subprocess (HTTP and gRPC on
127.0.0.1, free ports) over a small repository of real ONNX models, a well-behaved client that
keeps sending valid requests while a test attacks, and the checks every test ends with.

What every hostile test asserts (see `assert_unharmed`):
* no 5xx for client errors (gRPC: no UNKNOWN / INTERNAL);
* the well-behaved client is answered correctly throughout, each answer within STALL_BOUND_S
  (generous: the CI machine may have two busy cores) and p99 within P99_BOUND_S;
* the server's RSS stays within RSS_GROWTH_BOUND of what it was when the suite started;
* the server answers correctly afterwards.

Tests whose docstring says "frontend fix" pin the HTTP/gRPC frontend fixes of issue 13 (head
limits, half close, one answer per request, bounded versions, undecodable protobuf, the JSON
limit) and fail on a tree without them.

Crafted repositories: `tests/hostile/test_repository_hostile.py` uses `serve_once(repo)` to start
a server on a crafted repository and `assert_alive`.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hostile_kit import MLP, GoodClient, assert_alive, assert_unharmed, gather_onnx, serve_once, stop_server
from rt_models import config, mlp_onnx, seq_onnx, write_version


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if Path(str(item.fspath)).resolve().parent == here:
            item.add_marker(pytest.mark.hostile)


@pytest.fixture(scope="session")
def hostile_repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile-repo")
    write_version(root, config("mlp", 4, 3, max_batch_size=8,
                               dynamic_batching={"max_queue_delay_microseconds": 500}), mlp_onnx(*MLP))
    write_version(root, config("gather", max_batch_size=8,
                               inputs=[{"name": "idx", "datatype": "INT64", "shape": [-1, 1]}],
                               outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 1, 3]}],
                               dynamic_batching={"max_queue_delay_microseconds": 2000}), gather_onnx())
    write_version(root, config("seq", max_batch_size=8, inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
                               outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, -1]},
                                        {"name": "s", "datatype": "FP32", "shape": [-1, 1]}]), seq_onnx())
    return root


@pytest.fixture(scope="session")
def server(hostile_repo):
    s = serve_once(hostile_repo)
    assert_alive(s)
    s.baseline_rss = s.rss()
    yield s
    stop_server(s)  # tracebacks in its log are checked per test (good_client)


@pytest.fixture
def good_client(server):
    """Runs a GoodClient through the test; afterwards checks it, the server's RSS and that the
    server still answers correctly."""
    logged = len(server.log)
    with GoodClient(server.http_port) as client:
        yield client
    client.check()
    assert_unharmed(server)
    time.sleep(0.05)  # the stderr reader thread catches up
    new = "".join(server.log[logged:])
    assert "Traceback" not in new, new[-4000:]


