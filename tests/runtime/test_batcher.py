"""serve_kit.runtime.batcher: dynamic batching and queue policy over real backends.

ONNX Runtime runs real models built with onnx.helper; the "backend that hangs or fails" is
ProbeBackend (rt_models), a real Backend subclass that records every call it receives.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from rt_models import (ProbeBackend, arun, config, masked_pool_onnx, mlp_onnx, mlp_reference, mlp_weights, probe,
                       probe_config, seq_onnx)

from serve_kit.runtime.backends import load_backend
from serve_kit.runtime.batcher import DynamicBatcher, SchedulerClosed
from serve_kit.runtime.types import BadRequest, Internal, Timeout, Unavailable


def ort(tmp_path, payload: bytes, outputs=("y",), name="m.onnx"):
    path = tmp_path / name
    path.write_bytes(payload)
    return load_backend("onnxruntime", path, list(outputs), {"intra_op_threads": 1})


def row(v: float, width: int = 4) -> np.ndarray:
    return np.full((1, width), v, np.float32)


async def wait_calls(n: int, timeout: float = 5.0) -> None:
    """Until the probe backend has received `n` calls (e.g. a request is now running)."""
    end = time.monotonic() + timeout
    while len(ProbeBackend.calls) < n:
        assert time.monotonic() < end, f"expected {n} backend calls, saw {ProbeBackend.calls}"
        await asyncio.sleep(0.002)


def call_values() -> list[list[float]]:
    return [c["first"] for c in ProbeBackend.calls]


# ---------------------------------------------------------------------------------------------
# Batching


@pytest.mark.parametrize("integer", [True, False])
def test_concurrent_requests_form_batches_with_the_unbatched_results(tmp_path, integer):
    w1, w2 = mlp_weights(32, 64, 8, seed=1, integer=integer)
    cfg = config("mlp", 32, 8, max_batch_size=16,
                 dynamic_batching={"max_queue_delay_microseconds": 2000})
    backend = ort(tmp_path, mlp_onnx(w1, w2))
    rng = np.random.default_rng(0)
    xs = [(rng.integers(-4, 5, (int(rng.integers(1, 4)), 32)) if integer
           else rng.standard_normal((int(rng.integers(1, 4)), 32))).astype(np.float32) for _ in range(96)]
    alone = [backend.infer({"x": x})["y"] for x in xs]  # before the worker thread owns it

    async def main():
        s = DynamicBatcher(cfg, [backend])
        outs = await asyncio.gather(*(s.submit({"x": x}) for x in xs))
        await s.drain(5)
        return outs, s.stats()

    outs, st = arun(main())
    for x, out, ref in zip(xs, outs, alone):
        assert out["y"].shape == (len(x), 8)
        if integer:  # exact arithmetic: batching must not change a single bit
            assert np.array_equal(out["y"], ref)
        else:
            np.testing.assert_allclose(out["y"], ref, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(out["y"], mlp_reference(x, w1, w2), rtol=1e-4, atol=1e-4)
    assert st.success_count == 96 and st.fail_count == 0
    assert st.inference_count == sum(len(x) for x in xs)
    assert st.execution_count < 96 and max(st.batches) > 1 and max(st.batches) <= 16
    assert sum(size * b[0] for size, b in st.batches.items()) == st.inference_count
    assert st.queue_count == 96 and sum(st.queue_hist) == 96 and sum(st.compute_hist) == 96


def test_without_dynamic_batching_each_request_runs_alone_on_the_instance_pool(tmp_path):
    cfg = probe_config(max_batch_size=8)  # dynamic_batching: null
    s_backends = [probe(tmp_path, delay_s=0.01), probe(tmp_path, delay_s=0.01)]

    async def main():
        s = DynamicBatcher(cfg, s_backends, model="probe")
        outs = await asyncio.gather(*(s.submit({"x": row(i)}) for i in range(12)))
        await s.drain(5)
        return outs, s.stats()

    outs, st = arun(main())
    assert [o["y"][0, 0] for o in outs] == [2.0 * i for i in range(12)]
    assert [c["rows"] for c in ProbeBackend.calls] == [1] * 12
    assert len({c["thread"] for c in ProbeBackend.calls}) == 2  # both instances worked
    assert st.batches.keys() == {1} and st.execution_count == 12


def test_selective_batching_never_mixes_shapes(tmp_path):
    cfg = config("seq", max_batch_size=8, inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
                 outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, -1]},
                          {"name": "s", "datatype": "FP32", "shape": [-1, 1]}],
                 dynamic_batching={"max_queue_delay_microseconds": 3000})
    backend = ort(tmp_path, seq_onnx(), outputs=("y", "s"))
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, [3, 5, 7][i % 3])).astype(np.float32) for i in range(60)]

    async def main():
        s = DynamicBatcher(cfg, [backend])
        outs = await asyncio.gather(*(s.submit({"x": x}) for x in xs))
        await s.drain(5)
        return outs, s.stats()

    outs, st = arun(main())
    for x, out in zip(xs, outs):
        np.testing.assert_array_equal(out["y"], 2 * np.maximum(x, 0))
        np.testing.assert_allclose(out["s"], x.sum(1, keepdims=True), rtol=1e-5)
    assert st.fail_count == 0 and max(st.batches) > 1

    # The batches themselves, as a backend sees them: each has one shape.
    ProbeBackend.reset()
    pcfg = config("p", max_batch_size=8, inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
                  outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, -1]}],
                  dynamic_batching={"max_queue_delay_microseconds": 3000})

    async def probed():
        s = DynamicBatcher(pcfg, [probe(tmp_path, delay_s=0.002)])
        outs = await asyncio.gather(*(s.submit({"x": x}) for x in xs))
        await s.drain(5)
        return outs

    for x, out in zip(xs, arun(probed())):
        np.testing.assert_array_equal(out["y"], 2 * x)
    widths = {c["shape"][1] for c in ProbeBackend.calls}
    assert widths == {3, 5, 7}
    assert max(c["rows"] for c in ProbeBackend.calls) > 1


def test_a_full_batch_of_one_shape_does_not_wait_behind_another_shape(tmp_path):
    cfg = config("p", max_batch_size=4, inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
                 outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, -1]}],
                 dynamic_batching={"max_queue_delay_microseconds": 400_000, "adaptive_delay": False})

    async def main():
        s = DynamicBatcher(cfg, [probe(tmp_path)])
        t0 = time.monotonic()
        lone = asyncio.ensure_future(s.submit({"x": np.ones((1, 3), np.float32)}))
        await asyncio.sleep(0.01)
        full = await asyncio.gather(*(s.submit({"x": np.full((1, 5), i, np.float32)}) for i in range(4)))
        full_s = time.monotonic() - t0
        await lone
        lone_s = time.monotonic() - t0
        await s.drain(5)
        return full, full_s, lone_s

    full, full_s, lone_s = arun(main())
    assert [o["y"][0, 0] for o in full] == [0, 2, 4, 6]
    assert full_s < 0.3 <= lone_s  # the width-5 batch went at once; the width-3 one waited its delay
    assert [c["shape"] for c in ProbeBackend.calls] == [(4, 5), (1, 3)]


def test_adaptive_delay_runs_a_lone_request_at_once_and_still_batches_a_stream(tmp_path):
    # A 400 ms delay, the default adaptive_delay: a request after a quiet period does not wait for
    # company; requests arriving every 10 ms (far more than one per delay) are batched again once
    # the moving average of their gaps has caught up (~11 arrivals after the quiet period).
    cfg = probe_config(max_batch_size=4, dynamic_batching={"max_queue_delay_microseconds": 400_000})

    async def main():
        s = DynamicBatcher(cfg, [probe(tmp_path)])
        t0 = time.monotonic()
        await s.submit({"x": row(-1)})
        lone_s = time.monotonic() - t0
        stream = []
        for i in range(24):
            stream.append(asyncio.ensure_future(s.submit({"x": row(i)})))
            await asyncio.sleep(0.01)
        outs = await asyncio.gather(*stream)
        await s.drain(5)
        return lone_s, outs

    lone_s, outs = arun(main())
    assert lone_s < 0.2  # not the 400 ms delay
    assert [o["y"][0, 0] for o in outs] == [2.0 * i for i in range(24)]
    rows = [c["rows"] for c in ProbeBackend.calls[1:]]
    assert sum(rows) == 24 and rows.count(4) >= 2, rows  # the stream formed full batches again
    # The first arrivals of the stream came after a quiet period and ran alone or in short
    # batches; once the arrival rate was known, batches waited to fill up.
    assert rows[-1] == 4 or rows[-2] == 4, rows


def padding_config(**padding):
    return config("pool", max_batch_size=8,
                  inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, -1, 4]},
                          {"name": "mask", "datatype": "INT64", "shape": [-1, -1]}],
                  outputs=[{"name": "pooled", "datatype": "FP32", "shape": [-1, 4]},
                           {"name": "tokens", "datatype": "FP32", "shape": [-1, -1, 4]}],
                  dynamic_batching={"max_queue_delay_microseconds": 300_000, "adaptive_delay": False,
                                    "padding": {"mask_input": "mask", "inputs": {"x": 1, "mask": 1},
                                                "outputs": {"tokens": 1}, "buckets": [4, 8], **padding}})


def test_bucketed_padding_batches_lengths_of_one_bucket_and_answers_as_unpadded(tmp_path):
    cfg = padding_config()
    rng = np.random.default_rng(0)
    lengths = [2, 3, 4, 5, 7, 9, 9]  # buckets 4, 4, 4, 8, 8, past the largest (exact), exact
    requests = [{"x": rng.standard_normal((1, n, 4)).astype(np.float32), "mask": np.ones((1, n), np.int64)}
                for n in lengths]
    alone = ort(tmp_path, masked_pool_onnx(), outputs=("pooled", "tokens"), name="alone.onnx")
    expected = [alone.infer(r) for r in requests]

    async def main():
        s = DynamicBatcher(cfg, [ort(tmp_path, masked_pool_onnx(), outputs=("pooled", "tokens"))])
        outs = await asyncio.gather(*(s.submit(r) for r in requests))
        stats = s.stats()
        await s.drain(5)
        return outs, stats

    outs, stats = arun(main())
    # Three batches, not seven: lengths 2-4 padded to 4, 5 and 7 to 7, the two 9s exactly.
    assert stats.execution_count == 3 and sorted(stats.batches) == [2, 3], stats.batches
    for n, got, want in zip(lengths, outs, expected):
        assert got["tokens"].shape == (1, n, 4)  # cut back to the request's own length
        np.testing.assert_allclose(got["tokens"], want["tokens"], rtol=1e-6)
        np.testing.assert_allclose(got["pooled"], want["pooled"], rtol=1e-5, atol=1e-6)


def test_padding_config_is_checked_against_the_model():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="mask_input 'attention' must be one of the padded inputs"):
        padding_config(mask_input="attention")
    with pytest.raises(ValidationError, match="names input 'ids', which the model does not have"):
        padding_config(inputs={"ids": 1, "mask": 1})
    with pytest.raises(ValidationError, match="input 'x' axis 2 must be a variable"):
        padding_config(inputs={"x": 2, "mask": 1})
    with pytest.raises(ValidationError, match="strictly increasing"):
        padding_config(buckets=[8, 4])
    with pytest.raises(ValidationError, match="pad_values names inputs that are not padded"):
        padding_config(pad_values={"other": 1})


def test_preferred_batch_size_and_max_batch_size_cut_batches(tmp_path):
    cfg = probe_config(max_batch_size=8, dynamic_batching={"max_queue_delay_microseconds": 30_000,
                                                           "preferred_batch_size": [4]})

    async def main():
        s = DynamicBatcher(cfg, [probe(tmp_path, hang_value=-1)])
        first = asyncio.ensure_future(s.submit({"x": row(-1)}))  # occupies the only instance
        await wait_calls(1)
        rest = [asyncio.ensure_future(s.submit({"x": row(i)})) for i in range(10)]
        await asyncio.sleep(0.01)
        ProbeBackend.release.set()
        outs = await asyncio.gather(first, *rest)
        await s.drain(5)
        return outs

    outs = arun(main())
    assert [o["y"][0, 0] for o in outs[1:]] == [2.0 * i for i in range(10)]
    # 10 queued: two preferred batches of 4 at once, the remaining 2 after the queue delay.
    assert [c["rows"] for c in ProbeBackend.calls] == [1, 4, 4, 2]
    assert call_values()[1:] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_queue_delay_waits_for_more_but_a_full_batch_goes_at_once(tmp_path):
    # Triton's semantics: a short batch always waits out the delay (adaptive_delay off).
    cfg = probe_config(max_batch_size=4, dynamic_batching={"max_queue_delay_microseconds": 300_000,
                                                           "adaptive_delay": False})

    async def main():
        s = DynamicBatcher(cfg, [probe(tmp_path)])
        t0 = time.monotonic()
        full = await asyncio.gather(*(s.submit({"x": row(i)}) for i in range(4)))
        full_s = time.monotonic() - t0
        t0 = time.monotonic()
        a = asyncio.ensure_future(s.submit({"x": row(10)}))
        await asyncio.sleep(0.05)
        b = asyncio.ensure_future(s.submit({"x": row(11)}))
        await asyncio.gather(a, b)
        partial_s = time.monotonic() - t0
        await s.drain(5)
        return full, full_s, partial_s

    full, full_s, partial_s = arun(main())
    assert full_s < 0.2  # max_batch_size reached: no waiting for the 300 ms delay
    assert 0.25 < partial_s < 2.0  # two requests 50 ms apart waited for more, then ran together
    assert call_values() == [[0, 1, 2, 3], [10, 11]]


# ---------------------------------------------------------------------------------------------
# Queue policy


def test_full_queue_rejects_at_once_and_the_queued_still_run(tmp_path):
    cfg = probe_config(max_batch_size=1, dynamic_batching={"max_queue_size": 2})

    async def main():
        s = DynamicBatcher(cfg, [probe(tmp_path, hang_value=-1)], model="probe")
        first = asyncio.ensure_future(s.submit({"x": row(-1)}))
        await wait_calls(1)  # running, so not in the queue
        queued = [asyncio.ensure_future(s.submit({"x": row(i)})) for i in range(2)]
        await asyncio.sleep(0)
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="queue is full") as ei:
            await s.submit({"x": row(9)})
        rejected_in = time.monotonic() - t0
        assert s.queue_depth == 2
        ProbeBackend.release.set()
        outs = await asyncio.gather(first, *queued)
        await s.drain(5)
        return ei.value, rejected_in, outs, s.stats()

    err, rejected_in, outs, st = arun(main())
    assert err.status == 503 and "max_queue_size 2" in err.message
    assert rejected_in < 0.05
    assert [o["y"][0, 0] for o in outs] == [-2.0, 0.0, 2.0]
    assert st.fail[503][0] == 1 and st.success_count == 3
    assert [9] not in call_values()


def test_timeouts_expire_in_the_queue_and_never_run(tmp_path):
    cfg = probe_config(max_batch_size=4, dynamic_batching={"max_queue_delay_microseconds": 0,
                                                           "default_timeout_microseconds": 150_000})

    async def main():
        s = DynamicBatcher(cfg, [probe(tmp_path, hang_value=-1)])
        first = asyncio.ensure_future(s.submit({"x": row(-1)}))
        await wait_calls(1)
        t0 = time.monotonic()
        short = asyncio.ensure_future(s.submit({"x": row(1)}, timeout_us=30_000))
        default = asyncio.ensure_future(s.submit({"x": row(2)}))
        longer = asyncio.ensure_future(s.submit({"x": row(3)}, timeout_us=10_000_000))  # may not extend
        results = []
        for fut in (short, default, longer):
            with pytest.raises(Timeout) as ei:
                await fut
            results.append((time.monotonic() - t0, ei.value))
        assert s.queue_depth == 0
        ProbeBackend.release.set()
        await first
        after = await s.submit({"x": row(4)})
        await s.drain(5)
        return results, after, s.stats()

    results, after, st = arun(main())
    (t_short, e), (t_default, _), (t_longer, _) = results
    assert e.status == 504 and "timed out" in e.message
    assert 0.02 < t_short < 0.13
    assert 0.13 < t_default < 1.0 and 0.13 < t_longer < 1.0
    assert after["y"][0, 0] == 8.0
    assert call_values() == [[-1], [4]]  # the expired requests never reached the backend
    assert st.fail[504][0] == 3


def test_expired_request_is_dropped_when_its_batch_forms(tmp_path):
    # Without a loop timer firing first (timeout shorter than the time the worker is busy), the
    # worker itself must notice the deadline while forming the batch.
    cfg = probe_config(max_batch_size=4, dynamic_batching={"max_queue_delay_microseconds": 0})

    async def main():
        s = DynamicBatcher(cfg, [probe(tmp_path, delay_s=0.1)])
        first = asyncio.ensure_future(s.submit({"x": row(0)}))
        await wait_calls(1)
        late = asyncio.ensure_future(s.submit({"x": row(1)}, timeout_us=20_000))
        ok = asyncio.ensure_future(s.submit({"x": row(2)}))
        out = await asyncio.gather(first, late, ok, return_exceptions=True)
        await s.drain(5)
        return out

    first, late, ok = arun(main())
    assert isinstance(late, Timeout)
    assert ok["y"][0, 0] == 4.0
    assert call_values() == [[0], [2]]


def test_priorities_run_highest_first(tmp_path):
    cfg = probe_config(max_batch_size=1, dynamic_batching={"priority_levels": 3, "default_priority_level": 2})

    async def main():
        s = DynamicBatcher(cfg, [probe(tmp_path, hang_value=-1)])
        first = asyncio.ensure_future(s.submit({"x": row(-1)}))
        await wait_calls(1)
        order = [(30, 3), (31, 3), (20, 2), (21, 0), (10, 1), (11, 1), (22, 99)]  # 0, 99 -> default (2)
        futs = [asyncio.ensure_future(s.submit({"x": row(v)}, priority=p)) for v, p in order]
        await asyncio.sleep(0.01)
        ProbeBackend.release.set()
        await asyncio.gather(first, *futs)
        await s.drain(5)

    arun(main())
    assert [v[0] for v in call_values()[1:]] == [10, 11, 20, 21, 22, 30, 31]


def test_priorities_order_rows_inside_a_batch(tmp_path):
    cfg = probe_config(max_batch_size=8, dynamic_batching={"priority_levels": 2, "default_priority_level": 2,
                                                           "max_queue_delay_microseconds": 0})

    async def main():
        s = DynamicBatcher(cfg, [probe(tmp_path, hang_value=-1)])
        first = asyncio.ensure_future(s.submit({"x": row(-1)}))
        await wait_calls(1)
        futs = [asyncio.ensure_future(s.submit({"x": row(v)}, priority=p)) for v, p in
                [(20, 2), (21, 2), (10, 1), (22, 0), (11, 1)]]
        await asyncio.sleep(0.01)
        ProbeBackend.release.set()
        outs = await asyncio.gather(*futs)
        await first
        await s.drain(5)
        return outs

    outs = arun(main())
    assert [o["y"][0, 0] for o in outs] == [40, 42, 20, 44, 22]  # each got its own row back
    assert call_values()[1] == [10, 11, 20, 21, 22]


def test_cancelled_request_leaves_the_queue(tmp_path):
    cfg = probe_config(max_batch_size=4, dynamic_batching={"max_queue_delay_microseconds": 0})

    async def main():
        s = DynamicBatcher(cfg, [probe(tmp_path, hang_value=-1)])
        first = asyncio.ensure_future(s.submit({"x": row(-1)}))
        await wait_calls(1)
        gone = asyncio.ensure_future(s.submit({"x": row(5)}))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        assert s.queue_depth == 0 and s.inflight == 1
        ProbeBackend.release.set()
        await first
        assert (await s.submit({"x": row(6)}))["y"][0, 0] == 12
        await s.drain(5)

    arun(main())
    assert call_values() == [[-1], [6]]


def test_bad_batch_dimension_is_a_bad_request(tmp_path):
    cfg = probe_config(max_batch_size=4, dynamic_batching={})

    async def main():
        s = DynamicBatcher(cfg, [probe(tmp_path)])
        with pytest.raises(BadRequest, match="batch size 5 is out of range 1..4"):
            await s.submit({"x": np.zeros((5, 4), np.float32)})
        with pytest.raises(BadRequest, match="inputs must be arrays named"):
            await s.submit({"other": np.zeros((1, 4), np.float32)})
        await s.drain(5)
        return s.stats()

    assert arun(main()).fail[400][0] == 2
    assert ProbeBackend.calls == []


# ---------------------------------------------------------------------------------------------
# Failures


def test_backend_error_fails_only_the_request_that_causes_it(tmp_path):
    cfg = probe_config(max_batch_size=3, dynamic_batching={"max_queue_delay_microseconds": 0})

    async def main():
        s = DynamicBatcher(cfg, [probe(tmp_path, hang_value=-1, fail_value=666)], model="probe")
        first = asyncio.ensure_future(s.submit({"x": row(-1)}))
        await wait_calls(1)
        values = [1, 666, 2, 3, 4, 5, 6]  # batches: [1, 666, 2] fails and is split; [3, 4, 5], [6] succeed
        futs = [asyncio.ensure_future(s.submit({"x": row(v)})) for v in values]
        await asyncio.sleep(0.01)
        ProbeBackend.release.set()
        outs = await asyncio.gather(*futs, return_exceptions=True)
        await first
        again = await s.submit({"x": row(7)})  # the worker survived
        await s.drain(5)
        return outs, again, s.stats()

    outs, again, st = arun(main())
    assert isinstance(outs[1], BadRequest) and outs[1].status == 400 and "poison value" in outs[1].message
    assert [o["y"][0, 0] for i, o in enumerate(outs) if i != 1] == [2, 4, 6, 8, 10, 12]
    assert again["y"][0, 0] == 14
    assert st.fail == {400: [1, st.fail[400][1]]} and st.success_count == 8 and st.isolation_runs >= 2


def test_hung_instance_blocks_neither_the_others_nor_the_loop(tmp_path):
    cfg = probe_config(max_batch_size=4, dynamic_batching={"max_queue_delay_microseconds": 0},
                       instance_group={"count": 2})

    async def main():
        s = DynamicBatcher(cfg, [probe(tmp_path, hang_value=-1), probe(tmp_path, hang_value=-1)])
        hung = asyncio.ensure_future(s.submit({"x": row(-1)}))
        await wait_calls(1)
        t0 = time.monotonic()
        outs = await asyncio.gather(*(s.submit({"x": row(i)}) for i in range(40)))
        served_in = time.monotonic() - t0
        t0 = time.monotonic()
        await asyncio.sleep(0.02)  # the loop is not blocked by the hung thread
        slept = time.monotonic() - t0
        assert not hung.done()
        drained = await s.drain(0.2)  # gives up on the hung request and answers it
        with pytest.raises(Unavailable):
            await hung
        return outs, served_in, slept, drained

    outs, served_in, slept, drained = arun(main())
    assert [o["y"][0, 0] for o in outs] == [2.0 * i for i in range(40)]
    assert served_in < 2.0 and slept < 0.5
    assert drained is False
    assert len({c["thread"] for c in ProbeBackend.calls[1:]}) == 1  # all by the healthy instance


# ---------------------------------------------------------------------------------------------
# Drain / close


def test_drain_finishes_queued_and_running_then_refuses(tmp_path):
    cfg = probe_config(max_batch_size=2, dynamic_batching={"max_queue_delay_microseconds": 100_000})

    async def main():
        s = DynamicBatcher(cfg, [probe(tmp_path, delay_s=0.02)])
        futs = [asyncio.ensure_future(s.submit({"x": row(i)})) for i in range(9)]
        await asyncio.sleep(0)
        t0 = time.monotonic()
        assert await s.drain(5) is True
        took = time.monotonic() - t0
        with pytest.raises(SchedulerClosed):
            await s.submit({"x": row(0)})
        outs = [f.result() for f in futs]
        return outs, took, s.threads_alive()

    outs, took, alive = arun(main())
    assert [o["y"][0, 0] for o in outs] == [2.0 * i for i in range(9)]
    assert took < 1.0  # closing does not wait out the 100 ms queue delay per batch
    assert alive == 0


def test_scheduler_stats_add_up(tmp_path):
    w1, w2 = mlp_weights(8, 8, 4, seed=2)
    cfg = config("mlp", 8, 4, max_batch_size=8, dynamic_batching={"max_queue_delay_microseconds": 1000})

    async def main():
        s = DynamicBatcher(cfg, [ort(tmp_path, mlp_onnx(w1, w2))])
        await asyncio.gather(*(s.submit({"x": np.ones((1, 8), np.float32)}) for _ in range(20)))
        await s.drain(5)
        return s.stats()

    st = arun(main())
    assert st.success_count == st.queue_count == st.compute_count == 20
    assert st.success_ns >= st.queue_ns > 0 and st.compute_infer_ns > 0
    assert sum(b[0] for b in st.batches.values()) == st.execution_count
    assert st.last_inference_ms > 0 and st.queue_depth == 0 and st.inflight == 0
    twice = st + st
    assert twice.success_count == 40 and twice.batches[max(st.batches)][0] == 2 * st.batches[max(st.batches)][0]
