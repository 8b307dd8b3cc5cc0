"""Make a real-world ONNX graph quantizable, and check what a quantizer wrote.

Models found in the wild are rarely the clean FP32 export a quantizer expects:

- Weights stored 8-bit and dequantized in the graph (`Cast(int8) * scale`, `DequantizeLinear` on
  an initializer; PaddleOCR's tiny models ship that way) are activations to ONNX Runtime's
  quantizer: it calibrates and re-quantizes them per tensor, or writes a graph that does not load.
  `prepare_for_quantization` folds such constant chains into float initializers first.
- Old opsets: per-channel DequantizeLinear (the `axis` attribute) needs opset 13, and ORT's QDQ
  quantizer writes it at any opset (the opset-11 detector came out invalid). The graph is raised
  to 13 with ONNX's version converter; where it cannot be, quantization falls back to per-tensor
  weights, and the details say so.
- Control flow: ORT's QDQ quantizer does not enter `If`/`Loop`/`Scan` subgraphs. A graph whose
  quantizable ops all sit in subgraphs is reported as not applicable with that cause.

`check_written` is the gate every written model passes before it is reported: `onnx.checker` (by
path, so large models work) and an ONNX Runtime session. It repairs what quantizers commonly get
wrong (an op domain used without its opset import, nodes out of topological order) and otherwise
raises with the checker's or the runtime's own message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConversionError, TargetNotApplicable
from . import save_model

PER_CHANNEL_OPSET = 13
"""DequantizeLinear gained `axis` (per-channel scales) in opset 13."""
MIN_OPSET = 11
"""ORT's quantizer needs 11; below that the graph is raised or the target does not apply."""

# Ops whose output is still a (dequantized) weight when every input is constant. Anything else
# with constant inputs is left alone: folding a Shape or Range is the constant folder's business.
_FOLDABLE = {"DequantizeLinear", "Cast", "Mul", "Sub", "Add", "Div", "Identity", "Reshape", "Transpose"}
_SUBGRAPH_OPS = {"If", "Loop", "Scan"}
_INT_TYPES = {np.dtype(t) for t in ("int8", "uint8", "int16", "uint16", "int32")}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:300] if text else type(exc).__name__)


def default_opset(model) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def _subgraphs(node):
    from onnx import helper

    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if a.type == a.GRAPH:
            yield v
        elif a.type == a.GRAPHS:
            yield from v


def _names_used(graph) -> set[str]:
    """Every tensor name read anywhere, subgraphs included (they read outer-scope names)."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for sub in _subgraphs(node):
            used |= _names_used(sub)
    return used


def _eval(node, args: list[np.ndarray | None]) -> np.ndarray | None:
    """The folded value of one node with constant inputs, or None for a case not handled."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    op = node.op_type
    if op == "DequantizeLinear":
        x, scale = args[0], args[1]
        zp = args[2] if len(args) > 2 and args[2] is not None else np.zeros((), x.dtype)
        if scale.ndim == 0:
            return ((x.astype(np.float32) - zp.astype(np.float32)) * scale).astype(scale.dtype)
        if scale.ndim != 1 or "block_size" in attrs:
            return None
        axis = attrs.get("axis", 1) % x.ndim
        shape = [1] * x.ndim
        shape[axis] = -1
        deq = (x.astype(np.float32) - zp.reshape(shape).astype(np.float32)) * scale.reshape(shape)
        return deq.astype(scale.dtype)
    if op == "Cast":
        return args[0].astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if op == "Identity":
        return args[0]
    if op in ("Mul", "Sub", "Add", "Div"):
        a, b = args[0], args[1]
        if a.dtype != b.dtype or a.dtype.kind != "f":
            return None
        return {"Mul": np.multiply, "Sub": np.subtract, "Add": np.add, "Div": np.divide}[op](a, b).astype(a.dtype)
    if op == "Reshape":
        shape = [int(d) for d in args[1]]
        if attrs.get("allowzero", 0):
            return args[0].reshape(shape)
        shape = [args[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return args[0].reshape(shape)
    if op == "Transpose":
        return np.transpose(args[0], attrs.get("perm"))
    return None


def fold_dequantized_weights(model) -> list[dict[str, Any]]:
    """Fold constant dequantization chains on initializers into float initializers, in place.

    A chain starts at an integer initializer (or Constant) and runs through `_FOLDABLE` ops whose
    inputs are all constant; its float result becomes an initializer under the chain's output name,
    so the consumer (a Conv, a MatMul) sees an ordinary constant weight. Returns one record per
    folded weight: its name, shape and the ops folded.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.output) == 1:
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(helper.get_attribute_value(a))
    from_int = {k for k, v in consts.items() if v.dtype in _INT_TYPES and v.size > 1}
    chain_ops: dict[str, list[str]] = {}
    graph_outputs = {o.name for o in graph.output}
    folded_nodes: set[int] = set()
    produced: dict[str, np.ndarray] = {}
    for idx, node in enumerate(graph.node):
        if node.op_type not in _FOLDABLE or len(node.output) != 1 or node.output[0] in graph_outputs:
            continue
        ins = [i for i in node.input if i]
        if not ins or not all(i in consts for i in ins):
            continue
        # Only chains that start from stored integers: this is dequantization, not general folding.
        if not any(i in from_int for i in ins):
            continue
        try:
            value = _eval(node, [consts.get(i) if i else None for i in node.input])
        except Exception:  # a shape or dtype case the evaluator does not cover: leave the node
            value = None
        if value is None:
            continue
        out = node.output[0]
        consts[out] = value
        produced[out] = value
        from_int.add(out)
        chain_ops[out] = [*max((chain_ops.get(i, []) for i in ins), key=len), node.op_type]
        folded_nodes.add(idx)
    if not folded_nodes:
        return []
    kept = [n for i, n in enumerate(graph.node) if i not in folded_nodes]
    del graph.node[:]
    graph.node.extend(kept)
    # A chain's intermediate results are initializers only if something still reads them.
    used = _names_used(graph)
    records = []
    for name, value in produced.items():
        if name in used and value.dtype.kind == "f":
            graph.initializer.append(numpy_helper.from_array(value, name))
            records.append({"weight": name, "shape": list(value.shape), "folded": chain_ops[name]})
        elif name in used:
            graph.initializer.append(numpy_helper.from_array(value, name))
    used = _names_used(graph)
    keep_inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    keep_nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(keep_nodes)
    names = {i.name for i in graph.initializer}
    kept_vi = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(kept_vi)
    return records


def raise_opset(model, target: int = PER_CHANNEL_OPSET):
    """(model at >= target, None) or (the model unchanged, why it could not be raised)."""
    from onnx import version_converter

    current = default_opset(model)
    if current >= target:
        return model, None
    try:
        converted = version_converter.convert_version(model, target)
        import onnx

        onnx.checker.check_model(converted)
        return converted, None
    except Exception as e:
        return model, f"onnx.version_converter could not raise opset {current} to {target}: {first_line(e)}"


def op_census(model, op_types: set[str] | None = None) -> dict[str, dict[str, int]]:
    """How many nodes of each op type sit in the main graph and inside If/Loop/Scan subgraphs."""
    main: dict[str, int] = {}
    inner: dict[str, int] = {}

    def walk(graph, into: dict[str, int]) -> None:
        for node in graph.node:
            into[node.op_type] = into.get(node.op_type, 0) + 1
            for sub in _subgraphs(node):
                walk(sub, inner)

    walk(model.graph, main)
    if op_types is not None:
        main = {k: v for k, v in main.items() if k in op_types}
        inner = {k: v for k, v in inner.items() if k in op_types}
    return {"main_graph": main, "subgraphs": inner}


def require_ops(model, op_types: set[str], target: str, what: str) -> dict[str, dict[str, int]]:
    """Counts of `op_types` in the main graph and in subgraphs (`op_census`); TargetNotApplicable
    with the real cause when the main graph has none."""
    census = op_census(model, op_types)
    if census["main_graph"]:
        return census
    if census["subgraphs"]:
        raise TargetNotApplicable(
            f"every op {target} quantizes sits inside an If/Loop/Scan subgraph "
            f"({_fmt(census['subgraphs'])}); ONNX Runtime's quantizer does not enter subgraphs",
            value=target, hint="bake the input that the If branches on into the model (--constant NAME=VALUE), "
                               "which folds the branch away, or export the model without control flow")
    raise TargetNotApplicable(f"the model has no {what} ({', '.join(sorted(op_types))})", value=target)


def _fmt(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))


def prepare_for_quantization(src: Path, dst: Path, *, per_channel: bool = True) -> dict[str, Any]:
    """Write a copy of `src` that quantizers handle: dequantize-in-graph weights folded, opset
    raised to 13 when per-channel weights are wanted. Returns the details for the report:
    `folded_weights` (count and the first few), `opset` (from, to) and `per_channel` (what is
    possible now, with `per_channel_fallback` saying why not when it had to be dropped)."""
    import onnx

    try:
        model = onnx.load(str(src))
    except Exception as e:
        raise ConversionError(f"cannot read the ONNX model to quantize: {first_line(e)}", value=src.name) from None
    details: dict[str, Any] = {}
    records = fold_dequantized_weights(model)
    if records:
        details["folded_weights"] = {"count": len(records), "first": records[:3]}
    before = default_opset(model)
    details["opset"] = {"source": before}
    if before < MIN_OPSET or (per_channel and before < PER_CHANNEL_OPSET):
        model, why = raise_opset(model, PER_CHANNEL_OPSET)
        if why and before < MIN_OPSET:
            model, why2 = raise_opset(model, MIN_OPSET)
            if why2:
                raise TargetNotApplicable(f"opset {before} is below {MIN_OPSET} (ONNX Runtime's quantizer needs "
                                          f"{MIN_OPSET}) and {why2}", value=src.name,
                                          hint=f"export the model at opset {PER_CHANNEL_OPSET} or later")
        if why and per_channel:
            details["per_channel_fallback"] = f"per-tensor weights: {why} (per-channel needs opset {PER_CHANNEL_OPSET})"
            per_channel = False
    details["opset"]["quantized_at"] = default_opset(model)
    details["per_channel"] = per_channel
    save_model(model, dst)
    return details


def _fix_opset_imports(model) -> list[str]:
    declared = {o.domain or "" for o in model.opset_import}
    used: set[str] = set()

    def walk(graph) -> None:
        for node in graph.node:
            used.add(node.domain or "")
            for sub in _subgraphs(node):
                walk(sub)

    walk(model.graph)
    fixes = []
    for domain in sorted(used - declared - {"ai.onnx"}):
        o = model.opset_import.add()
        o.domain, o.version = domain, 1
        fixes.append(f"added the missing opset import for domain {domain or 'ai.onnx'!r}")
    return fixes


def _fix_topological_order(model) -> list[str]:
    graph = model.graph
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    nodes = list(graph.node)
    produced_by_graph = {o for n in nodes for o in n.output}
    ordered, pending, in_order = [], nodes, True
    while pending:
        progress, rest = False, []
        for n in pending:
            # Names no node produces come from an outer scope or are graph inputs: not a dependency.
            # A subgraph's reads of outer-scope names are dependencies of the node that holds it.
            reads = set(n.input).union(*(_names_used(sub) for sub in _subgraphs(n)))
            if all(i in available or i not in produced_by_graph for i in reads):
                ordered.append(n)
                available.update(n.output)
                progress = True
            else:
                rest.append(n)
                in_order = False
        if not progress:
            return []  # a cycle: leave it for the checker to report
        pending = rest
    if in_order:
        return []
    del graph.node[:]
    graph.node.extend(ordered)
    return ["sorted the nodes into topological order"]


def check_written(path: Path, what: str) -> dict[str, Any]:
    """Check a model a target wrote; repair what quantizers commonly break; raise otherwise.

    Returns `{"checked": [...], "repaired": [...]}` for the artifact's details. The error names
    the tool that refused the model and its own first line, not a temp path to re-export.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    repaired = _fix_opset_imports(model) + _fix_topological_order(model)
    if repaired:
        # Loaded without external data, the initializers keep pointing at their data file: saving
        # rewrites the graph only.
        onnx.save(model, str(path))
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise ConversionError(f"{what} wrote a model that onnx.checker rejects: {first_line(e)}",
                              value=path.name, hint="this is a defect of the quantizer on this graph: exclude the "
                              "named node (nodes_to_exclude) or drop this target") from None
    try:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ConversionError(f"{what} wrote a model that ONNX Runtime cannot load: {first_line(e)}",
                              value=path.name, hint="exclude the named node (nodes_to_exclude) or drop this "
                              "target") from None
    return {"checked": ["onnx.checker", "onnxruntime session"], **({"repaired": repaired} if repaired else {})}

