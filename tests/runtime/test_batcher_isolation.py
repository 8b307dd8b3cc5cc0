"""A backend error is attributed to the request that causes it (issue 13).

Before: an exception inside a batch failed every request in it with 500 (200 bad requests made 728
of 4,847 valid concurrent requests fail). Now the scheduler splits a failed batch until the failing
requests run alone: those are 400 when the backend runs other inputs, 500 when the backend fails
even a known-good input (then without retrying the rest one by one).

The "bad input" is real: an ONNX Gather whose indices come from the request, run by ONNX Runtime,
fails at run time on an index out of range; nothing in the config can reject it before batching.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rt_models import _finish, arun, config, probe_config, write_version
from rt_server import InProcessServer

from serve_kit.runtime.backends import Backend, load_backend, register_backend
from serve_kit.runtime.batcher import DynamicBatcher
from serve_kit.runtime.types import BadRequest, Internal

ROWS, WIDTH = 5, 3
TABLE = np.arange(ROWS * WIDTH, dtype=np.float32).reshape(ROWS, WIDTH)


def gather_onnx() -> bytes:
    """y[b] = TABLE[idx[b]]: idx [batch, 1] INT64 -> y [batch, 1, WIDTH]. ONNX Runtime raises at run
    time on an index outside [-ROWS, ROWS - 1]."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)], "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, WIDTH])],
        initializer=[numpy_helper.from_array(TABLE, "table")])
    return _finish(graph)


def gather_config(name: str = "gather", max_batch_size: int = 8, delay_us: int = 20_000):
    return config(name, max_batch_size=max_batch_size,
                  inputs=[{"name": "idx", "datatype": "INT64", "shape": [-1, 1]}],
                  outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 1, WIDTH]}],
                  dynamic_batching={"max_queue_delay_microseconds": delay_us, "adaptive_delay": False})


def valid(i: int) -> bool:
    return -ROWS <= i < ROWS


@pytest.fixture(scope="module")
def gather_backend(tmp_path_factory):
    path = tmp_path_factory.mktemp("gather") / "gather.onnx"
    path.write_bytes(gather_onnx())
    return load_backend("onnxruntime", path, ["y"], {"intra_op_threads": 1})


async def _submit_all(s: DynamicBatcher, indices: list[int]) -> list:
    futs = [s.submit_nowait({"idx": np.array([[i]], np.int64)}) for i in indices]
    return await asyncio.gather(*futs, return_exceptions=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(-2 * ROWS, 2 * ROWS), min_size=1, max_size=24), st.booleans())
def test_only_the_requests_with_bad_input_fail_and_with_400(gather_backend, indices, seeded):
    """Any mix of good and bad indices, batched together: each good one gets its row, each bad one
    400 naming the backend's complaint; the retries stay bounded. The scheduler knows a good input
    (the canary): the server's warm-up input (`seeded`), or one that ran before."""

    async def main():
        canary = {"idx": np.array([[0]], np.int64)} if seeded else None
        s = DynamicBatcher(gather_config(), [gather_backend], model="gather", canary=canary)
        if not seeded:
            await s.submit({"idx": np.array([[0]], np.int64)})
        outs = await _submit_all(s, indices)
        await s.drain(10)
        return outs, s.stats()

    outs, stats = arun(main())
    for i, out in zip(indices, outs):
        if valid(i):
            assert isinstance(out, dict), (i, out)
            np.testing.assert_array_equal(out["y"], TABLE[i].reshape(1, 1, WIDTH))
        else:
            assert isinstance(out, BadRequest) and out.status == 400, (i, out)
            assert "out of data bounds" in out.message and "cannot run this request's input" in out.message
    bad = sum(not valid(i) for i in indices)
    assert stats.fail.get(400, [0])[0] == bad and 500 not in stats.fail
    assert stats.success_count == len(indices) - bad + (not seeded)
    # Bisection: each request is in at most log2(8) + 1 extra executions, plus a canary run a batch.
    assert stats.isolation_runs <= len(indices) * 4 + stats.execution_count


def test_without_a_known_good_input_a_good_part_of_the_batch_is_the_evidence(gather_backend):
    async def main():
        s = DynamicBatcher(gather_config(), [gather_backend], model="gather")
        outs = await _submit_all(s, [99, 1, 2, 3])
        await s.drain(10)
        return outs

    bad, *good = arun(main())
    assert isinstance(bad, BadRequest) and bad.status == 400
    for i, out in zip([1, 2, 3], good):
        np.testing.assert_array_equal(out["y"], TABLE[i].reshape(1, 1, WIDTH))


# ---------------------------------------------------------------------------------------------
# A backend that is broken (fails every input) fails the batch fast, without n retries


@register_backend
class BreakableBackend(Backend):
    """y = 2x until `broken` is set, then every call raises. Counts its calls."""

    name = "test-breakable"
    file_name = "model.json"

    def _load_impl(self) -> None:
        self.input_names = ["x"]
        self.output_names = self.output_names or ["y"]
        self.broken = False
        self.calls = 0
        self.lock = threading.Lock()

    def _infer_impl(self, inputs):
        with self.lock:
            self.calls += 1
        if self.broken:
            raise RuntimeError("device lost")
        return {"y": inputs["x"] * 2}


def breakable(tmp_path) -> BreakableBackend:
    path = tmp_path / "breakable.json"
    path.write_text("{}")
    b = BreakableBackend(path)
    b.load()
    return b


def _rows(n: int) -> list[dict]:
    return [{"x": np.full((1, 4), float(i), np.float32)} for i in range(n)]


@pytest.mark.parametrize("warm", [True, False])
def test_a_broken_backend_fails_the_batch_with_500_without_retrying_each(tmp_path, warm):
    cfg = probe_config(max_batch_size=8, dynamic_batching={"max_queue_delay_microseconds": 50_000,
                                                           "adaptive_delay": False})
    b = breakable(tmp_path)

    async def main():
        s = DynamicBatcher(cfg, [b], model="breakable")
        if warm:
            await s.submit({"x": np.ones((1, 4), np.float32)})
        b.broken = True
        before = b.calls
        outs = await asyncio.gather(*(s.submit_nowait(x) for x in _rows(8)), return_exceptions=True)
        first_batch = b.calls - before
        before = b.calls
        again = await asyncio.gather(*(s.submit_nowait(x) for x in _rows(8)), return_exceptions=True)
        second_batch = b.calls - before
        b.broken = False
        healed = await s.submit({"x": np.ones((1, 4), np.float32)})
        await s.drain(5)
        return outs + again, first_batch, second_batch, healed, s.stats()

    outs, first_batch, second_batch, healed, stats = arun(main())
    assert all(isinstance(o, Internal) and o.status == 500 and "device lost" in o.message for o in outs), outs
    # Warm: the batch, then the canary (the last good input) fails too: 2 calls. Cold: the batch,
    # halves down to one request alone, then a second request alone: 1 + 2 + 1 + 1 = 5 for 8.
    assert first_batch <= (2 if warm else 5), first_batch
    assert second_batch == 1  # known broken: no retries until something succeeds again
    np.testing.assert_array_equal(healed["y"], np.full((1, 4), 2, np.float32))
    assert stats.fail[500][0] == 16


def test_a_single_request_failing_alone_is_400_when_the_backend_runs_others(gather_backend):
    cfg = gather_config(max_batch_size=0)  # no batching: each request runs alone

    async def main():
        s = DynamicBatcher(cfg.model_copy(update={"dynamic_batching": None}), [gather_backend], model="gather")
        ok = await s.submit({"idx": np.array([[1]], np.int64)})
        with pytest.raises(BadRequest) as bad:
            await s.submit({"idx": np.array([[99]], np.int64)})
        await s.drain(5)
        return ok, bad.value, s.stats()

    ok, bad, stats = arun(main())
    np.testing.assert_array_equal(ok["y"], TABLE[1].reshape(1, 1, WIDTH))
    assert bad.status == 400 and "out of" in bad.message
    assert stats.isolation_runs == 1  # the canary, nothing else


# ---------------------------------------------------------------------------------------------
# Through the real server: concurrent valid clients are never failed by bad ones


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("isolation-repo")
    write_version(root, gather_config(delay_us=2000), gather_onnx())
    s = InProcessServer(root, exit_timeout=5).start()
    yield s
    assert s.stop() == 0


def _post(port: int, index: int) -> tuple[int, dict]:
    body = json.dumps({"inputs": [{"name": "idx", "datatype": "INT64", "shape": [1, 1], "data": [index]}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v2/models/gather/infer", body=body)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_bad_requests_mixed_with_valid_ones_over_http_fail_alone_with_400(server):
    indices = [99 if k % 4 == 0 else k % ROWS for k in range(160)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: _post(server.port, i), indices, timeout=120))
    for i, (status, doc) in zip(indices, results):
        if valid(i):
            assert status == 200, (i, doc)
            assert doc["outputs"][0]["data"] == TABLE[i].tolist()
        else:
            assert status == 400, (i, doc)
            assert "cannot run this request's input" in doc["error"]


def test_backend_errors_reach_the_client_without_server_paths(tmp_path):
    b = breakable(tmp_path)
    where = str(tmp_path / "weights" / "model.onnx")

    class Leaky(BreakableBackend):
        name = "test-leaky"

        def _infer_impl(self, inputs):
            if np.any(inputs["x"] < 0):
                raise RuntimeError(f"cannot read {where}: bad tensor")
            return {"y": inputs["x"] * 2}

    leaky = Leaky(b.model_path)
    leaky.load()
    cfg = probe_config(max_batch_size=4, dynamic_batching={"max_queue_delay_microseconds": 0})

    async def main():
        s = DynamicBatcher(cfg, [leaky], model="leaky", canary={"x": np.ones((1, 4), np.float32)})
        with pytest.raises(BadRequest) as e:
            await s.submit({"x": -np.ones((1, 4), np.float32)})
        await s.drain(5)
        return e.value

    err = arun(main())
    assert where not in err.message and str(tmp_path) not in err.message
    assert "cannot read <path>: bad tensor" in err.message
