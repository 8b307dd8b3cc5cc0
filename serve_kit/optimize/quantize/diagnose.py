"""Where a QDQ model loses accuracy: per-tensor SQNR, streamed, within a memory budget.

ONNX Runtime's qdq_loss_debug collects every tensor of both models for every sample before it
compares them (the OCR detector at 100 pages of 3x320x320 grew past 22 GB), fails on If graphs
(`KeyError: 'float'`) and on scalar weights (`compute_weight_error`: `len()` of a numpy scalar).
This module pairs tensors by the consumer node instead (the node named N reads float tensor T at
input i in the float graph and a DequantizeLinear output at input i in the QDQ graph), runs only
the paired tensors as extra outputs, a few samples at a time, and keeps two running sums per
tensor; weights are compared directly from the initializers, scalars included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import save_model
from .feeds import FeedReader

MAX_SAMPLES = 16
"""Samples the ranking looks at: SQNR ranks tensors, it does not need the whole set."""


def _pairs(float_model, qdq_model):
    """(activation pairs float tensor -> QDQ tensor, weight pairs float name -> (q, scale, zp, axis))."""
    from onnx import helper, numpy_helper

    q_producer = {o: n for n in qdq_model.graph.node for o in n.output}
    q_inits = {i.name: i for i in qdq_model.graph.initializer}
    f_nodes = {n.name: n for n in float_model.graph.node if n.name}
    f_inits = {i.name for i in float_model.graph.initializer}
    acts: dict[str, str] = {}
    weights: dict[str, tuple] = {}
    for node in qdq_model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.name not in f_nodes:
            continue
        fnode = f_nodes[node.name]
        for i, name in enumerate(node.input):
            dq = q_producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or i >= len(fnode.input):
                continue
            ftensor = fnode.input[i]
            if ftensor in f_inits and dq.input[0] in q_inits:
                if ftensor not in weights:
                    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
                    weights[ftensor] = (numpy_helper.to_array(q_inits[dq.input[0]]),
                                        numpy_helper.to_array(q_inits[dq.input[1]]),
                                        numpy_helper.to_array(q_inits[dq.input[2]]) if len(dq.input) > 2
                                        and dq.input[2] in q_inits else None, attrs.get("axis", 1))
            elif ftensor not in f_inits:
                acts.setdefault(ftensor, name)
    return acts, weights


def _sqnr(signal: float, noise: float) -> float:
    if noise <= 0:
        return 1e9
    if signal <= 0:
        return -1e9
    return float(10 * np.log10(signal / noise))


def weight_sqnr(float_model, weights: dict[str, tuple]) -> dict[str, float]:
    from onnx import numpy_helper

    f_inits = {i.name: i for i in float_model.graph.initializer}
    out = {}
    for name, (q, scale, zp, axis) in weights.items():
        w = numpy_helper.to_array(f_inits[name]).astype(np.float64)
        zp = np.zeros((), np.float64) if zp is None else zp.astype(np.float64)
        scale = scale.astype(np.float64)
        if scale.ndim == 1 and q.ndim >= 1 and scale.size > 1:
            shape = [1] * q.ndim
            shape[axis % q.ndim] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape) if zp.ndim else zp
        deq = (q.astype(np.float64) - zp) * scale
        if deq.shape != w.shape:  # a layout the quantizer changed: not comparable here
            continue
        out[name] = _sqnr(float(np.sum(w * w)), float(np.sum((w - deq) ** 2)))
    return out


def _augmented(model, names: list[str], path: Path) -> None:
    import onnx

    have = {o.name for o in model.graph.output}
    for n in names:
        if n not in have:
            model.graph.output.append(onnx.ValueInfoProto(name=n))
    save_model(model, path)


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # Basic level: fusions above it would rename or remove the tensors asked for as outputs.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def tensor_sqnr(float_path: Path, qdq_path: Path, inputs: dict[str, np.ndarray], specs, workdir: Path,
                batch_size: int = 4, max_samples: int = MAX_SAMPLES) -> tuple[list[tuple[str, float, list[str]]], dict]:
    """Quantized tensors ranked by SQNR (dB), worst first, each with the float graph's nodes that
    must stay in float to leave it unquantized (its producer and its consumers: QDQ quantizes a
    tensor when either side is quantized). Returns (ranking, info about what was measured).

    Memory: two sessions' paired tensors for `batch_size` samples at a time, never the whole set.
    """
    import onnx

    float_model = onnx.load(str(float_path))
    qdq_model = onnx.load(str(qdq_path))
    acts, weights = _pairs(float_model, qdq_model)
    in_qdq = {n.name for n in qdq_model.graph.node}
    sqnr = weight_sqnr(float_model, weights)
    n_samples = 0
    if acts:
        names_f = sorted(acts)
        names_q = [acts[n] for n in names_f]
        aug_f, aug_q = workdir / "_diag_float.onnx", workdir / "_diag_qdq.onnx"
        _augmented(float_model, names_f, aug_f)
        _augmented(qdq_model, names_q, aug_q)
        del qdq_model
        try:
            sf, sq = _session(aug_f), _session(aug_q)
            out_f = [o.name for o in sf.get_outputs()]
            out_q = [o.name for o in sq.get_outputs()]
            pos_f = [out_f.index(n) for n in names_f]
            pos_q = [out_q.index(n) for n in names_q]
            sig = np.zeros(len(names_f))
            noise = np.zeros(len(names_f))
            from .feeds import evenly, sample_count

            index = evenly(sample_count(inputs, specs), max_samples)
            wanted = {i.name for i in sf.get_inputs()}
            reader = FeedReader(inputs, specs, batch_size, index, names=sorted(wanted))
            for feed in reader:
                rf = sf.run(None, feed)
                rq = sq.run(None, feed)
                for k, (a, b) in enumerate(zip(pos_f, pos_q)):
                    x = np.asarray(rf[a], dtype=np.float64)
                    y = np.asarray(rq[b], dtype=np.float64)
                    if x.shape != y.shape:
                        continue
                    sig[k] += float(np.sum(x * x))
                    noise[k] += float(np.sum((x - y) ** 2))
                del rf, rq
            n_samples = reader.samples
            for k, n in enumerate(names_f):
                if sig[k] or noise[k]:
                    sqnr[n] = _sqnr(sig[k], noise[k])
        finally:
            aug_f.unlink(missing_ok=True)
            aug_q.unlink(missing_ok=True)

    producer: dict[str, Any] = {}
    consumers: dict[str, list[str]] = {}
    for node in float_model.graph.node:
        for o in node.output:
            producer[o] = node
        for i in node.input:
            consumers.setdefault(i, []).append(node.name)

    def producers(tensor: str) -> list[str]:
        # A producer missing from the QDQ graph was fused into the node before it (ORT folds
        # Relu/Clip into the producer's QuantizeLinear): that node must stay in float too.
        out, node = [], producer.get(tensor)
        while node is not None:
            out.append(node.name)
            if node.name in in_qdq or not node.input:
                break
            node = producer.get(node.input[0])
        return out

    ranked = []
    for tensor, value in sqnr.items():
        nodes = producers(tensor) if tensor not in weights else []
        nodes += consumers.get(tensor, [])
        nodes = sorted({n for n in nodes if n})
        if nodes:
            ranked.append((tensor, value, nodes))
    ranked.sort(key=lambda r: r[1])
    info = {"tensors_compared": len(sqnr), "activations": len(acts), "weights": len(weights),
            "samples": n_samples, "batch_size": batch_size}
    return ranked, info


def guarded(fn, *args, **kwargs) -> tuple[Any, str | None]:
    """(fn's result, None), or (None, "diagnosis unavailable: <library>: <first line>"): a
    diagnosis that fails never costs the run its report."""
    from .prepare import first_line

    try:
        return fn(*args, **kwargs), None
    except MemoryError:
        return None, "diagnosis unavailable: out of memory"
    except Exception as e:  # the diagnosis is advice: any failure is reported, not raised
        lib = type(e).__module__.split(".")[0]
        where = "" if lib in ("builtins", "serve_kit") else f"{lib}: "
        return None, f"diagnosis unavailable: {where}{type(e).__name__}: {first_line(e)}"
