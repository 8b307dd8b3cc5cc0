"""Tiny real models and repositories for the runtime tests (built with onnx.helper, no downloads),
and test-only backends: real Backend subclasses that sleep, hang or fail on a poison value."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import numpy as np

from serve_kit.config import ModelConfig
from serve_kit.repository import Repository
from serve_kit.runtime.backends import Backend, register_backend


def _finish(graph) -> bytes:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def mlp_weights(d_in: int, hidden: int, d_out: int, seed: int = 0, integer: bool = False):
    rng = np.random.default_rng(seed)
    if integer:
        # Small integers keep every product and sum exact in float32, so batched and unbatched
        # results must be bit-identical whatever GEMM kernel or summation order runs.
        return (rng.integers(-3, 4, (d_in, hidden)).astype(np.float32),
                rng.integers(-3, 4, (hidden, d_out)).astype(np.float32))
    return ((rng.standard_normal((d_in, hidden)) / np.sqrt(d_in)).astype(np.float32),
            (rng.standard_normal((hidden, d_out)) / np.sqrt(hidden)).astype(np.float32))


def mlp_onnx(w1: np.ndarray, w2: np.ndarray) -> bytes:
    """y = relu(x @ W1) @ W2 with a dynamic batch dim: input `x` [batch, d_in], output `y`."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", w1.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", w2.shape[1]])],
        initializer=[numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    return _finish(graph)


def mlp_reference(x: np.ndarray, w1: np.ndarray, w2: np.ndarray) -> np.ndarray:
    return np.maximum(x @ w1, 0) @ w2


def seq_onnx() -> bytes:
    """A model with a variable non-batch dim: x [batch, seq] -> y = 2*relu(x) [batch, seq] and
    s = sum over seq [batch, 1]. Requests of different seq lengths must never share a batch."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "two"], ["y"]),
         helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1)], "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch", 1])],
        initializer=[numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                     numpy_helper.from_array(np.array([1], np.int64), "axes")])
    return _finish(graph)


def masked_pool_onnx(width: int = 4) -> bytes:
    """A model that ignores padded positions by its mask, like a BERT encoder with mean pooling:
    x [batch, seq, width] FP32 and mask [batch, seq] INT64 -> pooled = mean of x over the positions
    where mask is 1 [batch, width], and tokens = 2 * x * mask [batch, seq, width] (per position)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["m", "axis2"], ["m3"]),
         helper.make_node("Mul", ["x", "m3"], ["xm"]),
         helper.make_node("ReduceSum", ["xm", "axis1"], ["total"], keepdims=0),
         helper.make_node("ReduceSum", ["m", "axis1"], ["count"], keepdims=1),
         helper.make_node("Div", ["total", "count"], ["pooled"]),
         helper.make_node("Mul", ["xm", "two"], ["tokens"])], "masked_pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", width]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", width]),
         helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "seq", width])],
        initializer=[numpy_helper.from_array(np.array([1], np.int64), "axis1"),
                     numpy_helper.from_array(np.array([2], np.int64), "axis2"),
                     numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    return _finish(graph)


def identity_onnx(width: int = 4) -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])])
    return _finish(graph)


def torchscript_mlp(w1: np.ndarray, w2: np.ndarray) -> bytes:
    import torch

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = torch.nn.Parameter(torch.from_numpy(w1.copy()), requires_grad=False)
            self.w2 = torch.nn.Parameter(torch.from_numpy(w2.copy()), requires_grad=False)

        def forward(self, x):
            return torch.relu(x @ self.w1) @ self.w2

    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(M().eval()), buf)
    return buf.getvalue()


def config(name: str, d_in: int | None = 4, d_out: int | None = 4, max_batch_size: int = 16,
           inputs=None, outputs=None, **kw) -> ModelConfig:
    inputs = inputs or [{"name": "x", "datatype": "FP32", "shape": [-1, d_in]}]
    outputs = outputs or [{"name": "y", "datatype": "FP32", "shape": [-1, d_out]}]
    return ModelConfig(name=name, backend=kw.pop("backend", "onnxruntime"), max_batch_size=max_batch_size,
                       inputs=inputs, outputs=outputs, **kw)


def write_version(root: Path, cfg: ModelConfig, payload: bytes, *, backend: str = "onnxruntime",
                  model_file: str = "model.onnx", samples: dict[str, np.ndarray] | None = None) -> int:
    """Write one real version into a repository through the Staging API; returns its number."""
    repo = Repository(root)
    with repo.new_version(cfg.name) as stage:
        (stage.dir / model_file).write_bytes(payload)
        if samples is not None:
            np.savez(stage.dir / "samples.npz", **{f"input.{k}": v for k, v in samples.items()})
        return stage.commit(cfg, {"model_file": model_file, "backend": backend, "variant": "test"})


def strings_onnx() -> bytes:
    """An Identity over a [batch, 2] STRING tensor (text BYTES inputs, ONNX Runtime)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["text"], ["out"])], "strings",
                              [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", 2])],
                              [helper.make_tensor_value_info("out", TensorProto.STRING, ["batch", 2])])
    return _finish(graph)


def write_ident_and_text(root: Path) -> Path:
    """The hostile-input tests' repository: `ident` (FP32 [b, 4]) and `text` (BYTES [b, 2], batched
    with a 20 ms window so that bad and good text requests share batches)."""
    write_version(root, config("ident", 4, 4, max_batch_size=8), identity_onnx(4))
    write_version(root, config("text", max_batch_size=16,
                               inputs=[{"name": "text", "datatype": "BYTES", "shape": [-1, 2]}],
                               outputs=[{"name": "out", "datatype": "BYTES", "shape": [-1, 2]}],
                               dynamic_batching={"max_queue_delay_microseconds": 20000}),
                  strings_onnx())
    return root


# ---------------------------------------------------------------------------------------------
# Test-only backends: real classes implementing the Backend protocol.


@register_backend
class ProbeBackend(Backend):
    """y = 2x, recording every call. Its model file is JSON:
    {"delay_s": seconds per call, "fail_value": v (raise if any input equals v),
     "hang_value": v (block until `release` is set, at most 20 s, if any input equals v),
     "fail_file": path (raise while that file exists: a backend that starts failing, then recovers)}."""

    name = "test-probe"
    file_name = "model.json"
    calls: list[dict] = []
    release = threading.Event()
    lock = threading.Lock()

    def _load_impl(self) -> None:
        self.spec = json.loads(self.model_path.read_text())
        self.input_names = list(self.options.get("input_names") or ["x"])
        if not self.output_names:
            self.output_names = ["y"]

    def _infer_impl(self, inputs):
        x = inputs[self.input_names[0]]
        with ProbeBackend.lock:
            ProbeBackend.calls.append({"thread": threading.current_thread().name, "instance": id(self),
                                       "rows": x.shape[0],
                                       "shape": x.shape, "first": x[:, 0].tolist() if x.ndim > 1 else x.tolist(),
                                       "t": time.monotonic()})
        if self.spec.get("fail_value") is not None and np.any(x == self.spec["fail_value"]):
            raise RuntimeError("poison value in the batch")
        if self.spec.get("fail_file") and Path(self.spec["fail_file"]).exists():
            raise RuntimeError("failing while the flag file exists")
        if self.spec.get("hang_value") is not None and np.any(x == self.spec["hang_value"]):
            ProbeBackend.release.wait(20)
        if self.spec.get("delay_s"):
            time.sleep(self.spec["delay_s"])
        return {self.output_names[0]: x * 2}

    @classmethod
    def reset(cls) -> None:
        with cls.lock:
            cls.calls.clear()
        cls.release.clear()


def probe(tmp: Path, **spec) -> ProbeBackend:
    """A loaded ProbeBackend instance with the given spec (for scheduler tests without a repo)."""
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"probe-{len(list(tmp.glob('probe-*')))}.json"
    path.write_text(json.dumps(spec))
    b = ProbeBackend(path)
    b.load()
    return b


def arun(coro, timeout: float = 15.0):
    """Run a coroutine on a fresh event loop, failing the test if it takes longer than `timeout`."""
    import asyncio

    return asyncio.run(asyncio.wait_for(coro, timeout))


def probe_config(name: str = "probe", width: int = 4, max_batch_size: int = 8, **kw) -> ModelConfig:
    return config(name, width, width, max_batch_size=max_batch_size, **kw)


def write_probe(root: Path, cfg: ModelConfig, samples: dict[str, np.ndarray] | None = None, **spec) -> int:
    return write_version(root, cfg, json.dumps(spec).encode(), backend="test-probe", model_file="model.json",
                         samples=samples)
