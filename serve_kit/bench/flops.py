"""FLOPs of an ONNX graph per sample, and this machine's measured GEMM peak.

Counted: the ops that hold nearly all the arithmetic of the models serve-kit serves: MatMul-like
(MatMul, FusedMatMul, MatMulInteger, QLinearMatMul, DynamicQuantizeMatMul, MatMulIntegerToFloat,
MatMulNBits), Gemm, and Conv-like (Conv, FusedConv, ConvInteger, QLinearConv, ConvTranspose).
A multiply-add is 2 FLOPs. Element-wise ops, normalizations and softmax are not counted (their
share is small for these models, and they are memory-bound anyway); a counted op whose shapes
could not be inferred is listed, so a partial count is never silent.

The peak is the best FP32 MatMul rate of a short ONNX Runtime run (1024 x 1024 x 1024) with the
thread count the model is served with: the floor a model's time could reach on this machine.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

_MATMUL = {"MatMul", "FusedMatMul", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul",
           "MatMulIntegerToFloat"}
_CONV = {"Conv", "FusedConv", "ConvInteger", "QLinearConv"}
_WEIGHT_INDEX = {"QLinearConv": 3, "QLinearMatMul": 3}


def _shapes(model) -> dict[str, list[int]]:
    """Known static shapes of every value (inputs, initializers, inferred intermediates)."""
    import onnx

    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    except Exception:  # noqa: BLE001 - contrib ops it cannot handle: fall back to onnx's own inference
        inferred = None
    if inferred is None:
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # noqa: BLE001
            inferred = model
    shapes: dict[str, list[int]] = {}
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if all(isinstance(d, int) and d > 0 for d in dims) or dims == []:
            shapes[vi.name] = dims
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def count_flops(path: Path, input_shapes: dict[str, list[int]]) -> dict[str, Any]:
    """FLOPs of one run of the model at `input_shapes` (use batch 1 for per-sample FLOPs)."""
    import onnx

    model = onnx.load(str(path))
    for inp in model.graph.input:
        if inp.name in input_shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, size in zip(dims, input_shapes[inp.name]):
                d.ClearField("dim_param")
                d.dim_value = int(size)
    shapes = _shapes(model)
    total = 0
    by_op: dict[str, int] = {}
    uncounted: list[str] = []
    for node in model.graph.node:
        op = node.op_type
        flops = None
        out = shapes.get(node.output[0]) if node.output else None
        if op in _MATMUL:
            a = shapes.get(node.input[0])
            if out is not None and a:
                flops = 2 * math.prod(out) * a[-1]
        elif op == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            a = shapes.get(node.input[0])
            if a and "K" in attrs and "N" in attrs:
                flops = 2 * math.prod(a[:-1]) * attrs["K"] * attrs["N"]
        elif op in ("Gemm", "FusedGemm"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            a = shapes.get(node.input[0])
            if out is not None and a and len(a) == 2:
                k = a[0] if attrs.get("transA", 0) else a[1]
                flops = 2 * math.prod(out) * k + (math.prod(out) if len(node.input) > 2 and node.input[2] else 0)
        elif op in _CONV:
            w = shapes.get(node.input[_WEIGHT_INDEX.get(op, 1)])
            if out is not None and w and len(w) >= 3:
                flops = 2 * math.prod(out) * math.prod(w[1:])
        elif op == "ConvTranspose":
            x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
            if x and w and len(w) >= 3:
                flops = 2 * math.prod(x) * math.prod(w[1:])
        else:
            continue
        if flops is None:
            uncounted.append(f"{op} {node.name or node.output[0]}")
            continue
        total += flops
        by_op[op] = by_op.get(op, 0) + flops
    return {"flops": total, "by_op": by_op, "uncounted": uncounted, "complete": not uncounted}


_PEAK_CACHE: dict[int, dict[str, Any]] = {}


def gemm_peak(threads: int, size: int = 1024, seconds: float = 0.5) -> dict[str, Any]:
    """Best FP32 MatMul rate (FLOP/s) of ONNX Runtime on this machine with `threads` intra-op
    threads (0 = ONNX Runtime's default). Cached per thread count for the process."""
    if threads in _PEAK_CACHE:
        return _PEAK_CACHE[threads]
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    b = rng.standard_normal((size, size)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])],
                              initializer=[numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    a = rng.standard_normal((size, size)).astype(np.float32)
    sess.run(None, {"a": a})
    best = math.inf
    runs = 0
    deadline = time.perf_counter() + seconds
    while runs < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        sess.run(None, {"a": a})
        best = min(best, time.perf_counter() - t0)
        runs += 1
    flops = 2 * size ** 3
    result = {"flops_per_s": flops / best, "what": f"ONNX Runtime FP32 MatMul {size}x{size}x{size}, "
                                                    f"{threads or 'default'} threads, best of {runs}",
              "threads": threads}
    _PEAK_CACHE[threads] = result
    return result
