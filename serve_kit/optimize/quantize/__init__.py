"""Quantizers: ONNX Runtime INT8 (static QDQ, dynamic) and INT4 weight-only (MatMulNBits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


PROTOBUF_LIMIT = 1_800_000_000
"""Protobuf refuses messages of 2 GiB; above this, models are saved with their weights beside."""


def save_model(model, path: Path) -> None:
    """onnx.save, with the weights in a `<name>.data` file beside when the model is too large for
    one protobuf (a checked, loadable model either way)."""
    import onnx

    if model.ByteSize() > PROTOBUF_LIMIT:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save(model, str(path))


def is_large(path: Path) -> bool:
    """Whether a model file needs external data on the way through a quantizer."""
    return path.stat().st_size > PROTOBUF_LIMIT or (path.parent / (path.name + ".data")).exists()


def model_inputs(path: Path) -> list[str]:
    """The graph inputs a feed must name (initializers listed as inputs are not fed)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits]


def gemm_to_matmul(src: Path, dst: Path) -> int:
    """Rewrite `Gemm(A, B, C)` with a constant B into `MatMul(A, B') + C`. Returns how many.

    `nn.Linear` on 2-D inputs exports as Gemm, which ONNX Runtime's dynamic INT8 and MatMulNBits
    (INT4) quantizers do not touch; as MatMul + Add they quantize, and ORT fuses the Add back.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes, count = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            w = np.ascontiguousarray(w.T)
        w_name = f"{node.input[1]}_matmul_{count}"
        graph.initializer.append(numpy_helper.from_array(w, w_name))
        base = node.name or f"gemm_{count}"
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}_mm" if has_bias else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=f"{base}_MatMul"))
        if has_bias:
            new_nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{base}_Add"))
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(new_nodes)
        used = {i for n in graph.node for i in n.input}
        keep = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    save_model(model, dst)
    return count


def count_ops(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))
