"""ONNX Runtime backend (CPU; CUDA/TensorRT execution providers when installed and asked for)."""

from __future__ import annotations

import numpy as np

from ...errors import ModelLoadError
from . import Backend, register_backend


DEFAULT_DISABLED_OPTIMIZERS = "SkipLayerNormFusion"
"""Graph fusions serve-kit turns off by default (comma-separated; see _load_impl for why)."""


def session_options(intra_op_threads: int = 0, inter_op_threads: int = 0, optimization: str = "all"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = inter_op_threads
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    so.log_severity_level = 3
    return so


@register_backend
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    file_name = "model.onnx"

    def _load_impl(self) -> None:
        import onnxruntime as ort

        so = session_options(int(self.options.get("intra_op_threads", 0)),
                             int(self.options.get("inter_op_threads", 0)))
        wanted = self.options.get("providers") or ["CPUExecutionProvider"]
        providers = [p for p in wanted if p in ort.get_available_providers()] or ["CPUExecutionProvider"]
        # SkipLayerNormalization (fused from Add + LayerNormalization in transformer graphs) ran 8x
        # slower than the unfused pair on this project's AVX-512 CPU (198 us vs 26 us per node in
        # MiniLM; INT8 speedup 1.99x -> 2.33x without it). A model can re-enable it with
        # `disabled_optimizers: ""` in config.yaml's parameters.
        disabled = self.options.get("disabled_optimizers", DEFAULT_DISABLED_OPTIMIZERS)
        disabled = [d for d in (disabled.split(",") if isinstance(disabled, str) else disabled) if d]
        try:
            self.session = ort.InferenceSession(str(self.model_path), so, providers=providers,
                                                disabled_optimizers=disabled or None)
        except Exception as e:  # ORT raises its own exception types for corrupt or unsupported files
            raise ModelLoadError(f"ONNX Runtime cannot load the model: {str(e).strip().splitlines()[0]}",
                                 origin=str(self.model_path),
                                 hint="is it a complete .onnx file? re-export it or check the opset") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        graph_outputs = [o.name for o in self.session.get_outputs()]
        if len(self.output_names) != len(graph_outputs):
            self.output_names = graph_outputs

    def _infer_impl(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Exports name their outputs after the config; positional renaming covers sources that
        # were exported elsewhere under other names.
        return dict(zip(self.output_names, self.session.run(None, {k: _ort_input(v) for k, v in inputs.items()})))


def _ort_input(arr: np.ndarray) -> np.ndarray:
    """ONNX Runtime string tensors take `str`; given `bytes` (how the protocol decodes BYTES) it
    silently stores their repr ("b'ab'"). Decode UTF-8 here; other bytes stay a clear error."""
    if arr.dtype != object or not arr.size or not isinstance(arr.flat[0], (bytes, bytearray)):
        return arr
    from ..types import BadRequest

    try:
        return np.vectorize(lambda b: bytes(b).decode("utf-8"), otypes=[object])(arr)
    except UnicodeDecodeError as e:
        raise BadRequest(f"a BYTES input element is not UTF-8 text, which ONNX Runtime string tensors "
                         f"need: {e}") from None
