"""ONNX Runtime backend (CPU; CUDA/TensorRT execution providers when installed and asked for).

GPU use is explicit: a model whose config.yaml asks for a GPU provider (`providers`, or `device:
cuda:N`) fails to load where that provider is missing instead of quietly running on the CPU at a
fraction of the expected speed, unless `allow_cpu_fallback: true` says the CPU is acceptable.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ModelLoadError
from . import Backend, option_flag, register_backend

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
PROVIDER_ALIASES = {"cpu": CPU, "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
"""Short names accepted in `providers` besides ONNX Runtime's own."""


DEFAULT_DISABLED_OPTIMIZERS = "SkipLayerNormFusion"
"""Graph fusions serve-kit turns off by default (comma-separated; see _load_impl for why)."""


OPTIMIZATION_LEVELS = ("none", "basic", "extended", "all")
"""`graph_optimization` (config.yaml parameters): ONNX Runtime's graph optimization level. FP8
Q/DQ models are written with `basic` (see serve_kit/optimize/quantize/modelopt_onnx.py)."""


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

        level = self.options.get("graph_optimization", "all")
        if level not in OPTIMIZATION_LEVELS:
            raise ModelLoadError("unknown graph_optimization level", value=level,
                                 origin="config.yaml parameters.graph_optimization",
                                 hint="one of " + ", ".join(OPTIMIZATION_LEVELS))
        so = session_options(int(self.options.get("intra_op_threads", 0)),
                             int(self.options.get("inter_op_threads", 0)), level)
        providers = self._providers()
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
        self.providers = self.session.get_providers()
        # ONNX Runtime's Python wrapper retries on the CPU when a GPU provider fails to initialise
        # (e.g. a missing cuDNN), printing only a warning: check what the session really got.
        lost = [p for p in self._wanted if p != CPU and p not in self.providers]
        if lost:
            self._refuse(lost[0], f"ONNX Runtime could not initialise it (the session has "
                                  f"{', '.join(self.providers)}; its log above says why)")
        self.input_names = [i.name for i in self.session.get_inputs()]
        graph_outputs = [o.name for o in self.session.get_outputs()]
        if len(self.output_names) != len(graph_outputs):
            self.output_names = graph_outputs

    def _providers(self) -> list:
        """ONNX Runtime's providers argument from the options, each requested GPU provider checked."""
        kept = []
        for name in requested_providers(self.options):
            reason = None if name == CPU else _provider_reason(name)
            if reason is None:
                kept.append(name)
            else:
                self._refuse(name, reason)
        self._wanted = kept or [CPU]
        return provider_options(self._wanted, self.options, self.model_path)

    def _refuse(self, provider: str, reason: str) -> None:
        """Fail the load over a GPU provider that cannot be used, or with allow_cpu_fallback warn."""
        if option_flag(self.options.get("allow_cpu_fallback")):
            log.warning("%s: %s not used (%s); running on the CPU (allow_cpu_fallback)", self.model_path,
                        provider, reason)
            return
        raise ModelLoadError(f"execution provider {provider} was asked for but cannot be used: {reason}",
                             value=provider, origin="config.yaml parameters (providers / device)",
                             hint="run it where that provider works (onnxruntime-gpu on an NVIDIA GPU: "
                                  "serve-kit[gpu]), or set `allow_cpu_fallback: true` to accept the CPU")

    def _infer_impl(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Exports name their outputs after the config; positional renaming covers sources that
        # were exported elsewhere under other names.
        return dict(zip(self.output_names, self.session.run(None, {k: _ort_input(v) for k, v in inputs.items()})))


def _provider_reason(name: str) -> str | None:
    from ...gpu import ort_provider_unavailable_reason

    return ort_provider_unavailable_reason(name)


def requested_providers(options: dict[str, Any]) -> list[str]:
    """Provider names, in priority order, from the `providers` option (a list, or a comma-separated
    string as config.yaml parameters hold it; short names cpu/cuda/tensorrt allowed) and the
    `device` option (cuda or cuda:N = CUDAExecutionProvider when no provider is named). Nothing
    asked = the CPU, as before."""
    from ...gpu import cuda_device

    raw = options.get("providers") or []
    if isinstance(raw, str):
        raw = raw.split(",")
    names = [PROVIDER_ALIASES.get(p.strip().lower(), p.strip()) for p in raw if p and p.strip()]
    try:
        device = cuda_device(options.get("device"))
    except ValueError as e:
        raise ModelLoadError(str(e), value=options.get("device"), origin="config.yaml parameters.device",
                             hint="use cpu, cuda or cuda:N") from None
    if device and not names:
        names = ["CUDAExecutionProvider"]
    if not names:
        return [CPU]
    if CPU not in names:
        names.append(CPU)  # the nodes a GPU provider does not take run on the CPU
    return list(dict.fromkeys(names))


def provider_options(names: list[str], options: dict[str, Any], model_path: Path) -> list:
    """ONNX Runtime's providers argument: names, with (name, options) for the GPU providers."""
    from ...gpu import cuda_device

    device = cuda_device(options.get("device"))
    device_id = int(device.split(":")[1]) if device else None
    out: list = []
    for name in names:
        opts: dict[str, Any] = {}
        if device_id is not None and name in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
            opts["device_id"] = device_id
        if name == "TensorrtExecutionProvider":
            # The TensorRT provider compiles engines at session start (minutes for a big model);
            # its engine and timing caches make the next start fast.
            cache = str(trt_cache_dir(model_path))
            opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=cache,
                        trt_timing_cache_enable=True, trt_timing_cache_path=cache,
                        trt_fp16_enable=option_flag(options.get("trt_fp16")))
        out.append((name, opts) if opts else name)
    return out


def trt_cache_dir(model_path: Path) -> Path:
    """Where the TensorRT provider keeps its engines for this model.

    Not inside a version directory: every file there must be listed in its manifest, so a cache
    file would fail the version's verification. A version's cache goes beside the versions, with
    optimize's build caches (<model>/.build-cache/ort-tensorrt/<version>); a model outside a
    repository gets a folder beside the file; a read-only place falls back to the temp directory."""
    model_path = Path(model_path).resolve()
    parent = model_path.parent
    if (parent / "manifest.json").is_file():
        wanted = parent.parent / ".build-cache" / "ort-tensorrt" / parent.name
    else:
        wanted = parent / f".{model_path.stem}.ort-tensorrt-cache"
    try:
        wanted.mkdir(parents=True, exist_ok=True)
        probe = wanted / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
        return wanted
    except OSError:
        digest = hashlib.sha256(str(model_path).encode()).hexdigest()[:16]
        fallback = Path(tempfile.gettempdir()) / "serve-kit-ort-tensorrt" / digest
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


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
