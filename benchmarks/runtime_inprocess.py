"""In-process throughput and overhead of the runtime's scheduler (serve_kit.runtime.batcher).

Model: y = relu(x @ W1) @ W2 with 512x512 weights (FP32, ONNX Runtime, built here with
onnx.helper), one instance, intra-op threads as the model manager sets them
(models.default_intra_op_threads: one core is left to the event loop).

1. Throughput at concurrency 16 (16 asyncio tasks, each submitting one 1-row request after
   another): dynamic batching on vs off (`dynamic_batching: null`, each request runs alone on the
   same instance pool). The two modes run in alternating windows so that both see the same
   machine noise; the ratio is the median of the per-window ratios. Target: >= 3x.
2. Overhead at concurrency 1: median latency of `await scheduler.submit()` minus the median of a
   direct `backend.infer()` on the same 1-row input, measured in alternating windows too.
   Target: within 0.5 ms.

    .venv/bin/python benchmarks/runtime_inprocess.py
    .venv/bin/python benchmarks/runtime_inprocess.py --seconds 2 --windows 5 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from serve_kit.config import ModelConfig
from serve_kit.runtime.backends import load_backend
from serve_kit.runtime.batcher import DynamicBatcher
from serve_kit.runtime.models import available_cores, default_intra_op_threads

DIM = 512


def build_mlp(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)).astype(np.float32)
    w2 = (rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])], "mlp512",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", DIM])],
        initializer=[numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def config(batching: bool, max_batch_size: int, delay_us: int) -> ModelConfig:
    return ModelConfig(
        name="mlp512", backend="onnxruntime", max_batch_size=max_batch_size,
        inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, DIM]}],
        outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, DIM]}],
        dynamic_batching={"max_queue_delay_microseconds": delay_us, "max_queue_size": 0} if batching else None)


async def closed_loop(sched: DynamicBatcher, x: np.ndarray, concurrency: int, seconds: float) -> float:
    """Requests per second with `concurrency` tasks each sending one request after another."""
    stop = time.perf_counter() + seconds
    counts = [0] * concurrency

    async def client(i: int) -> None:
        submit = sched.submit
        while time.perf_counter() < stop:
            await submit({"x": x})
            counts[i] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return sum(counts) / (time.perf_counter() - t0)


async def latencies(sched: DynamicBatcher, x: np.ndarray, seconds: float) -> list[float]:
    out = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        await sched.submit({"x": x})
        out.append(time.perf_counter() - t0)
    return out


def direct_latencies(backend, x: np.ndarray, seconds: float) -> list[float]:
    out = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        backend.infer({"x": x})
        out.append(time.perf_counter() - t0)
    return out


async def run(args) -> dict:
    cores = available_cores()
    threads = args.intra_op_threads or default_intra_op_threads(cores, 1)
    opts = {"intra_op_threads": threads}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        build_mlp(path)
        x = np.random.default_rng(1).standard_normal((1, DIM)).astype(np.float32)
        warm = np.random.default_rng(2).standard_normal((args.max_batch_size, DIM)).astype(np.float32)

        def instance():
            b = load_backend("onnxruntime", path, ["y"], opts)
            for _ in range(20):
                b.infer({"x": x})
                b.infer({"x": warm})
            return b

        direct = instance()
        on = DynamicBatcher(config(True, args.max_batch_size, args.delay_us), [instance()])
        off = DynamicBatcher(config(False, args.max_batch_size, 0), [instance()])
        await closed_loop(on, x, args.concurrency, 0.3)
        await closed_loop(off, x, args.concurrency, 0.3)

        rps_on, rps_off, ratios = [], [], []
        for w in range(args.windows):
            order = [(on, rps_on), (off, rps_off)]
            for sched, sink in (order if w % 2 == 0 else order[::-1]):
                sink.append(await closed_loop(sched, x, args.concurrency, args.seconds))
            ratios.append(rps_on[-1] / rps_off[-1])
        batch_stats = on.stats()

        lat_sched, lat_direct, overheads = [], [], []
        for w in range(args.windows):
            pair = []
            for kind in (("sched", "direct") if w % 2 == 0 else ("direct", "sched")):
                if kind == "sched":
                    lat = await latencies(on, x, args.seconds / 2)
                    lat_sched += lat
                    pair.append(("s", statistics.median(lat)))
                else:
                    lat = direct_latencies(direct, x, args.seconds / 2)
                    lat_direct += lat
                    pair.append(("d", statistics.median(lat)))
            d = dict(pair)
            overheads.append(d["s"] - d["d"])
        await on.drain(5)
        await off.drain(5)

    mean_batch = batch_stats.inference_count / max(batch_stats.execution_count, 1)
    return {
        "model": f"relu MLP {DIM}x{DIM}x{DIM}, FP32, ONNX Runtime",
        "cpu": platform.processor() or platform.machine(), "cores": cores, "intra_op_threads": threads,
        "python": platform.python_version(), "concurrency": args.concurrency,
        "max_batch_size": args.max_batch_size, "max_queue_delay_us": args.delay_us,
        "windows": args.windows, "seconds_per_window": args.seconds,
        "batching_rps": statistics.median(rps_on), "no_batching_rps": statistics.median(rps_off),
        "ratio": statistics.median(ratios), "ratios": ratios,
        "mean_batch_size": mean_batch,
        "direct_p50_ms": statistics.median(lat_direct) * 1e3,
        "scheduler_p50_ms": statistics.median(lat_sched) * 1e3,
        "scheduler_p99_ms": float(np.percentile(lat_sched, 99)) * 1e3,
        "overhead_ms": statistics.median(overheads) * 1e3,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=1.5, help="length of one measurement window")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--delay-us", type=int, default=0, help="max_queue_delay_microseconds")
    p.add_argument("--intra-op-threads", type=int, default=0, help="0 = the model manager's default")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    r = asyncio.run(run(args))
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['model']}; {r['cores']} cores, intra-op threads {r['intra_op_threads']}, Python {r['python']}")
    print(f"concurrency {r['concurrency']}: batching {r['batching_rps']:,.0f} req/s "
          f"(mean batch {r['mean_batch_size']:.1f}), no batching {r['no_batching_rps']:,.0f} req/s, "
          f"ratio {r['ratio']:.2f}x (target >= 3x)")
    print(f"concurrency 1: direct backend.infer p50 {r['direct_p50_ms']:.3f} ms, scheduler p50 "
          f"{r['scheduler_p50_ms']:.3f} ms (p99 {r['scheduler_p99_ms']:.3f}), overhead "
          f"{r['overhead_ms'] * 1e3:.0f} us (target <= 500 us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
